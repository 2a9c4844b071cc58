"""The anneals of a measurement: `plan` (pilot from uniform, frozen schedule) and, per shard, `anneal` (counted
forward AIS or SMC from uniform; with data, the anneal from a data-informed base at every temperature; sweep
chains; reverse AIS), pooled over shards (`pool`)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed as dist
from ..errors import ThermoEBMError
from ..estimators import replica_split
from ..models import base_of
from ..samplers import ais, bridge, paths, smc
from ..samplers.base import KernelBase, population_weights
from ..samplers.kernels import MalaState, Sampler
from ..samplers.rng import stream_seed
from ..samplers.sweep import SweepLength, run_sweep
from .inputs import Problem
from .records import ForwardRecord, Pooled, ReverseRecord, SeededRecord, SweepRecord

log = logging.getLogger("thermo_ebm")
BASE_FLOOR = 0.05   # least weight of each population (data kernels, forward kernels, uniform) in the base
CROSSCHECK_CESS = 0.5  # with data, the SMC from uniform is a cross-check: stages placed at this conditional ESS
MAX_BETAS = 2_000_000  # longest forward schedule a measurement may ask for (memory and time)
CHECK_STREAM = 20_000  # random stream of the check base (check_chains), beside the shard's own


@dataclass
class Plan:
    """The frozen forward schedule from the pilot anneal (shared by every shard)."""
    tuning: ais.Tuning
    schedule: np.ndarray   # [S] ascending betas from 0
    steps: np.ndarray      # [S] MALA step sizes
    length: float          # thermodynamic length L of the path from uniform to the lowest temperature
    capped: bool           # with data: the schedule is shorter than the length rule asks (a one-sided cross-check)
    smc: smc.Schedule | None = None  # engine "smc": the pilot's frozen stages


def plan(p: Problem, progress=False) -> Plan:
    """The pilot anneal from uniform (rank 0) and the frozen forward schedule sized by its length."""
    cfg = p.cfg
    tuning = None
    if dist.is_main():  # one pilot, shared by every shard
        gen = torch.Generator(device=p.device)
        gen.manual_seed(p.seed)
        tuning = ais.tune(sampler(p, gen, progress), p.betas, n_chains=cfg.tune_chains, n_stages=cfg.tune_stages,
                          n_adapt=cfg.tune_adapt)
    tuning = dist.broadcast(tuning)
    # AIS needs O(L^2) betas: with K equal-length steps Var(log w) ~ L^2 / K, and fewer steps bias log Z low
    # while the replica SE stays small (docs/estimators.md)
    length = float(ais.path_length(tuning)[-1])
    n_rule = max(cfg.ais_steps, int(math.ceil(cfg.ais_steps_per_l2 * length ** 2)))
    # with data the reported log Z comes from the data-informed base; the anneal from uniform is a cross-check
    # whose cost would otherwise grow with the information the model holds
    n_ais = min(n_rule, max(cfg.ais_steps, cfg.crosscheck_steps)) if p.data is not None else n_rule
    if n_ais > MAX_BETAS and cfg.engine == "ais":
        raise ThermoEBMError(f"the anneal down to T = {1.0 / p.betas[-1]:g} ({p.units} units) needs {n_ais:,} betas "
                             f"(thermodynamic length {length:.3g}); at most {MAX_BETAS:,}: measure at higher "
                             "temperatures, or on the logits' scale (--units raw)")
    if n_ais < n_rule:
        log.info("AIS from uniform: thermodynamic length %.1f asks for %d betas; capped at %d (crosscheck_steps): "
                 "a one-sided cross-check of the data-seeded log Z", length, n_rule, n_ais)
    elif n_ais > cfg.ais_steps:
        log.info("AIS: thermodynamic length %.1f -> %d annealing steps (ais_steps %d)", length, n_ais, cfg.ais_steps)
    if cfg.engine == "smc":
        sched = None
        if dist.is_main():
            gen = torch.Generator(device=p.device)
            gen.manual_seed(stream_seed(p.seed, 10_000))
            cess = min(cfg.smc_cess, CROSSCHECK_CESS) if p.data is not None else cfg.smc_cess
            s = sampler(p, gen, progress)
            sched = smc.tune(s, paths.Tempering(s), p.betas[:, None], 1,
                             n_chains=cfg.smc_pilot_chains, target_cess=cess, n_leap=cfg.smc_leapfrog,
                             max_moves=cfg.smc_max_moves, corr=cfg.smc_corr)
        sched = dist.broadcast(sched)
        log.info("SMC from uniform: %d stages, %d HMC moves of %d leapfrog steps (pilot)", len(sched.lambdas),
                 int(sched.moves.sum()), sched.n_leap)
        return Plan(tuning, sched.lambdas[:, 0], tuning.step_at(sched.lambdas[:, 0]), length, False, sched)
    schedule, steps = ais.make_schedule(tuning, p.betas, n_ais)
    return Plan(tuning, schedule, steps, length, n_ais < n_rule)


STAGES = ("forward", "data_seeded", "sweep", "reverse")  # `seconds` columns: wall time of each stage per shard


def shard_seed(seed: int, shard: int) -> int:
    """The seed of one shard's chains (one rank under torchrun)."""
    return stream_seed(seed, shard)


def sampler(p: Problem, generator, progress) -> Sampler:
    """The sampler context of one of the measurement's random streams."""
    return Sampler(p.net, p.ens, p.shape, generator, p.device, p.kernel, progress)


def model_base_kernels(p: Problem):
    """The model's own fixed base (models.GaussianBase: box-truncated diagonal Gaussians with weights w_m, entering
    the density as q^(beta t_base / t_ref)) as kernels of the data-informed base, tempered to each beta: per
    component the width sd / sqrt(a), a = beta t_base / t_ref, and the weight of its tempered mass,
    (w_m M_m)^a prod_i Z_mi^-a (2 pi sd_mi^2)^((1 - a) / 2) a^(-1/2) Z'_mi (Z, Z': the box masses of the component
    and of its tempered form; M_m its class's mass under the network, GaussianBase.class_log_mass: exact for separated
    components and a network flat over each class). (centres [G, B, D], widths [G, B, D], weights [G, B]) or
    None for a model without one."""
    own = base_of(p.net)
    if own is None:
        return None
    mu, sd = (t.cpu() for t in own.components_moments())                     # [B, D]
    a = torch.as_tensor(p.betas, dtype=torch.float64)[:, None, None] * own.t_base / p.t_ref   # [G, 1, 1]

    def log_mass(width):
        return torch.log(torch.special.ndtr((1 - mu) / width) - torch.special.ndtr((-1 - mu) / width))

    width = sd / a.sqrt()                                                    # [G, B, D]
    per_pixel = -a * log_mass(sd) + 0.5 * (1 - a) * torch.log(2 * math.pi * sd ** 2) - 0.5 * torch.log(a)
    tilt = own.class_log_mass.double().repeat_interleave(own.components)  # each class's mass under the network
    logw = a[..., 0] * (own.logw.double() + tilt).cpu() + (per_pixel + log_mass(width)).sum(-1)
    w = torch.softmax(logw, -1)
    return mu.expand_as(width).contiguous(), width, w.numpy()


def _anneal_from_data(p: Problem, fwd, step0, s: Sampler, total: int | None = None):
    """Reference states, base, pilot and the counted anneal from the data-informed base (one shard of `total`
    chains per temperature, default bridge_chains). The base mixes five populations: kernels on data-seeded states,
    kernels on forward-AIS states, a Gaussian per predicted class and one pooled Gaussian fitted to the
    data-seeded chains, uniform (and a sixth for a model with a base of its own: model_base_kernels); the pilot
    sets each population's weight at each temperature to the share of Z it delivered (at least BASE_FLOOR)."""
    cfg = p.cfg
    refs = bridge.references(s, p.data, fwd, p.betas, step0, n_data=cfg.data_refs, n_gauss=cfg.gauss_refs,
                             n_steps=cfg.reference_steps)
    n_t, n_f = len(p.betas), refs.centres.shape[1] - cfg.data_refs
    centres, sigma, inner = refs.centres, refs.sigma, {}
    own = model_base_kernels(p)
    if own is not None:  # the model's own base, tempered to each beta, as one more population of kernels
        centres, sigma = torch.cat([centres, own[0].to(centres)], 1), torch.cat([sigma, own[1].to(sigma)], 1)
        inner = {2: own[2]}
    # kernels on data-seeded states, on forward states[, the model's base]; the fitted mixtures (per class, pooled);
    # uniform
    sizes = (cfg.data_refs, n_f) + ((own[0].shape[1],) if own is not None else ()) + (1,) * len(refs.gauss) + (1,)
    population = np.repeat(np.arange(len(sizes)), sizes)
    first = np.tile([(1 - cfg.bridge_uniform) / (len(sizes) - 1)] * (len(sizes) - 1) + [cfg.bridge_uniform], (n_t, 1))

    def make_base(shares):
        return KernelBase(centres, sigma, population_weights(sizes, shares, BASE_FLOOR, inner), refs.gauss)
    base = make_base(first)
    if cfg.engine == "smc":
        return _smc_from_data(p, base, make_base, population, s)
    bt = bridge.tune_bridge(s, base, p.betas, refs.step, population, n_chains=cfg.tune_chains // 2,
                            n_stages=cfg.tune_stages, n_adapt=cfg.tune_adapt)
    base = make_base(bt.shares)
    length = bt.length()[-1]   # [T]
    # each temperature's path gets the lambdas its own length asks for (the rule of the forward anneal)
    n_steps = np.maximum(cfg.bridge_steps, np.ceil(cfg.ais_steps_per_l2 * length ** 2)).astype(int)
    if cfg.max_bridge_steps is not None:  # under-annealed where the rule asks for more (flags.bridge_capped)
        n_steps = np.minimum(n_steps, max(cfg.max_bridge_steps, cfg.bridge_steps))
    log.info("data-seeded anneal: thermodynamic length up to %.1f asks for %d lambdas in all (%d-%d per temperature, "
             "%d move pairs each)%s", float(length.max()), int(n_steps.sum()), int(n_steps.min()), int(n_steps.max()),
             cfg.bridge_moves, "; deep energies: --device cuda, or fewer --temps, shortens it" if n_steps.sum() > 20000
             else "")
    lam, steps, sub = bridge.bridge_schedule(bt, n_steps)
    # SMC populations never straddle a replica (the SE's independent groups) or a shard
    total = total or cfg.bridge_chains
    n_rep = replica_split(total, cfg.replicas)[0]
    pop = math.gcd(total // cfg.shards, total // n_rep)
    res = bridge.run_bridge(s, base, p.betas, lam, steps, sub, n_steps, n_chains=total // cfg.shards,
                            n_keep=cfg.chains // cfg.shards, pop=pop, n_moves=cfg.bridge_moves)
    out = SeededRecord(res.logw.cpu().numpy(), res.energy.cpu().numpy(), res.energy2.cpu().numpy(),
                       res.p_y.cpu().numpy(), res.accept.cpu().numpy()[None], res.nonfinite.cpu().numpy()[None],
                       n_steps[None], length[None], bt.shares[None], np.array([res.resampled]))
    return res.states, out


def _smc_forward(p: Problem, pl: Plan, n_keep: int, s: Sampler) -> ais.ForwardResult:
    """The counted SMC from uniform on the pilot's frozen stages (one shard's populations), as a ForwardResult;
    with data a cross-check of smc_crosscheck_chains."""
    cfg = p.cfg
    total = cfg.smc_crosscheck_chains if p.data is not None else cfg.smc_chains
    res = smc.run(s, paths.Tempering(s), pl.smc, p.betas[:, None], 1,
                  n_chains=total // cfg.shards, pop=total // cfg.smc_populations)
    states = [smc.resampled_states(s, q, lw, 1, n_keep) for q, lw in zip(res.particles, res.logw)]
    states = MalaState(*(torch.cat([getattr(s, f) for s in states]) for f in MalaState._fields))
    return ais.ForwardResult(res.logw, res.energy, res.energy2, states, res.accept[:, 0], res.nonfinite[:, 0])


def _smc_from_data(p: Problem, base, make_base, population, s: Sampler):
    """Engine "smc" with data: every temperature's SMC from the data-informed base (the stage function of
    smc.py, adaptive lambdas, HMC moves), smc_data_chains per temperature in smc_populations populations. The
    counted run's base gives each population the share of the pilot's final weight it delivered."""
    cfg = p.cfg
    n_t = len(p.betas)
    path = paths.Bridge(s, base, p.betas, cfg.smc_pilot_chains)
    sched = smc.tune(s, path, np.ones((1, n_t)), n_t, n_chains=cfg.smc_pilot_chains, target_cess=cfg.smc_cess,
                     n_leap=cfg.smc_leapfrog, max_moves=cfg.smc_max_moves, corr=cfg.smc_corr, population=population,
                     desc="data-seeded SMC pilot")
    shares = sched.shares
    base = make_base(shares)
    log.info("SMC from data: %d stages, %d HMC moves of %d leapfrog steps (pilot), %d chains per temperature in %d "
             "populations", len(sched.lambdas), int(sched.moves.sum()), sched.n_leap, cfg.smc_data_chains,
             cfg.smc_populations)
    n = cfg.smc_data_chains // cfg.shards
    path = paths.Bridge(s, base, p.betas, n)
    res = smc.run(s, path, sched, np.ones((1, n_t)), n_t, n_chains=n, pop=cfg.smc_data_chains // cfg.smc_populations,
                  desc="data-seeded SMC")
    q, lw = res.particles[0], res.logw[0]
    beta = path.beta
    out = SeededRecord(lw.reshape(n_t, n).cpu().numpy(), res.energy[0].reshape(n_t, n).cpu().numpy(),
                       res.energy2[0].reshape(n_t, n).cpu().numpy(),
                       torch.softmax(beta[:, None] * q.logits, -1).reshape(n_t, n, -1).cpu().numpy(),
                       res.accept[0].numpy()[None], res.nonfinite[0].numpy()[None], np.full((1, n_t), len(sched.lambdas)),
                       np.full((1, n_t), np.nan), np.asarray(shares)[None], np.array([res.resampled]))
    states = smc.resampled_states(s, q, lw, n_t, cfg.chains // cfg.shards)
    return states, out


def anneal(p: Problem, pl: Plan, shard: int, progress=False, length: SweepLength | None = None) -> Pooled:
    """Forward AIS, (with data) the anneal from the data-informed base, sweep and reverse AIS for one shard of
    the chains (its own generator), as the shard's records. The sweep runs on where it is short against tau_E
    (`sweep_length`, up to sweep_max_factor x its steps): as long as `length` when given, else as long as this
    shard's own chains ask (under torchrun: rank 0's), so that every shard's chains run equally long."""
    cfg, betas = p.cfg, p.betas
    gen = torch.Generator(device=p.device)
    gen.manual_seed(shard_seed(p.seed, shard))
    s = sampler(p, gen, progress)
    c = cfg.chains // cfg.shards
    n_keep = max(c, cfg.data_refs) if p.data is not None else c
    clock = [time.perf_counter()]

    def lap():
        clock.append(time.perf_counter())
    if pl.smc is not None:
        fwd = _smc_forward(p, pl, n_keep, s)
    else:
        # a capped anneal from uniform is a one-sided check beside the data-seeded log Z (and the source of the
        # base's forward kernels): crosscheck_chains of it suffice
        n_fwd = min(cfg.crosscheck_chains, cfg.ais_chains) if pl.capped else cfg.ais_chains
        fwd = ais.run_forward(s, pl.schedule, pl.steps, betas, n_chains=max(n_fwd // cfg.shards, 2), n_keep=n_keep,
                              mcmc_steps=cfg.ais_mcmc)
    n_t = len(betas)
    forward = ForwardRecord(fwd.logw.cpu().numpy(), fwd.energy.cpu().numpy(), fwd.energy2.cpu().numpy(),
                            fwd.accept.cpu().numpy()[None], fwd.nonfinite.cpu().numpy()[None])
    init, seeded, check = fwd.states, None, None  # [T * c] without data
    lap()
    if p.data is not None:
        refs, step0 = _keep_first(fwd.states, n_t, cfg.data_refs), pl.tuning.step_at(betas)
        init, seeded = _anneal_from_data(p, refs, step0, s)
        if cfg.check_chains:  # a second base on its own random stream: the reported anneal's draws stay as they were
            g2 = torch.Generator(device=p.device)
            g2.manual_seed(stream_seed(shard_seed(p.seed, shard), CHECK_STREAM))
            check = _anneal_from_data(p, refs, step0, sampler(p, g2, progress), cfg.check_chains)[1]
    lap()
    most = int(cfg.sweep_max_factor * (cfg.burn_in + cfg.samples)) - cfg.burn_in
    sw = run_sweep(s, init, betas, pl.tuning.step_at(betas), n_burn=cfg.burn_in, n_prod=cfg.samples,
                   exchange=cfg.exchange, thin=cfg.thin, most=most,
                   agree=(lambda own: length) if length is not None else dist.broadcast,
                   swap_target=cfg.swap_target, max_helpers=cfg.sweep_helpers)
    lap()
    rev_lw = ais.run_reverse(s, sw.final, betas, pl.tuning, n_steps=cfg.reverse_steps)
    lap()
    keep, labels = min(cfg.keep_samples, c), None
    if p.ens.kind == "joint":
        lg = sw.final.logits.reshape(n_t, c, -1)[:, :keep]
        pr = torch.softmax(torch.as_tensor(betas, dtype=lg.dtype, device=lg.device)[:, None, None] * lg, -1)
        labels = torch.multinomial(pr.reshape(n_t * keep, -1), 1, generator=gen).reshape(n_t, keep).cpu().numpy()
    sweep = SweepRecord(sw.chain_means, sw.u_trace, sw.logits, sw.accept[None], sw.swap_accept[None],
                        sw.nonfinite[None], sw.step[None], sw.final.x.reshape(n_t, c, *p.shape)[:, :keep].cpu().numpy(),
                        labels, np.array([[sw.length.burn_in, sw.length.samples]]), sw.helpers[None])
    return Pooled(forward, seeded, sweep, ReverseRecord(rev_lw), np.diff(clock)[None], check)


def _keep_first(states: MalaState, n_t: int, n: int) -> MalaState:
    """The first n of each temperature's resampled states ([T * n_keep] grouped) -> [T * n]."""
    k = states.x.shape[0] // n_t
    return MalaState(*(v.reshape(n_t, k, *v.shape[1:])[:, :n].reshape(n_t * n, *v.shape[1:]) for v in states))


def pool(p: Problem, pl: Plan, progress) -> Pooled:
    """Every shard's records: under torchrun this rank's shard, gathered in rank order; else all shards here."""
    if dist.active():
        return Pooled.cat([anneal(p, pl, dist.rank(), progress)])
    first = anneal(p, pl, 0, progress)  # its sweep's length is every shard's (as rank 0's is under torchrun)
    length = SweepLength(*map(int, first.sweep.length[0]))
    return Pooled.cat([first] + [anneal(p, pl, s, progress, length) for s in range(1, p.cfg.shards)])
