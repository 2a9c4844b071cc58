"""`measure`: thermodynamics of a model over a temperature sweep, with standard errors.

Stages (each passes a small dataclass to the next):
prepare (model in its own temperature units, reference data) -> plan (pilot anneal from uniform, frozen
schedule) -> anneal (per shard: counted forward AIS from uniform; with data, the counted anneal from a
data-informed base at every temperature; temperature-sweep chains; reverse AIS) -> thermodynamics (log Z,
F, U, S, C, information with SEs) -> diagnose (cross-checks, the two origins compared, flags) -> dataset.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from . import ais, bridge, smc, temperatures
from . import distributed as dist
from .checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint
from .config import MeasureConfig
from .ensembles import Ensemble
from .errors import ThermoEBMError
from .estimators import (missed_phase, weighted_heat, delta_log_mean_se, derivative, has_interior_max, heavy_tail_limit, integrated_autocorr_time, jackknife,
                         jackknife_cov, label_entropy, log_mean_weight, logmeanexp, parabola_peak, pareto_k, peak_position,
                         population_weights, replica_split, weighted_mean)
from .likelihood import HeldOut, heldout_likelihood, resolve_heldout
from .data import check_states, load_states_file
from .models import EBM, ScaledLogits
from .results import annotate, file_sha256, provenance
from .rng import stream_seed
from .sampling import MalaKernel, MalaState, mala_kernel
from .sweep import run_sweep, stat_names

log = logging.getLogger("thermo_ebm")
LN2 = math.log(2.0)
MBAR_MAX = 1000
BASE_FLOOR = 0.05   # least weight of each population (data kernels, forward kernels, uniform) in the base
MAX_BETAS = 2_000_000  # longest forward schedule a measurement may ask for (memory and time)
HYSTERESIS_Z = 4.0  # the two origins disagree when |difference| exceeds this many combined SEs
logging.getLogger("pymbar").setLevel(logging.ERROR)


@dataclass
class Problem:
    """What is measured: the model in the units of the measurement, the temperatures, the reference data."""
    net: object             # callable x [N, *shape] -> logits [N, K], already divided by t_ref
    ens: Ensemble
    shape: tuple
    temps: np.ndarray       # [T] ascending, as given (units of `units`)
    betas: np.ndarray       # [T] ascending 1 / T (so descending temperature)
    t_train: float          # the model's training temperature on the logits' scale
    units: str              # "train": T in units of t_train; "raw": T on the logits' scale
    data: torch.Tensor | None  # [M, D] reference states of the low-temperature phase, or None
    data_source: str
    desc: dict
    device: torch.device
    kernel: MalaKernel
    cfg: MeasureConfig
    seed: int
    heldout: HeldOut | None = None  # held-out images for the likelihood (and a training-split set of the same size)
    train_split: HeldOut | None = None

    @property
    def d(self) -> int:
        return int(np.prod(self.shape))

    @property
    def t_ref(self) -> float:
        return self.t_train if self.units == "train" else 1.0


def resolve_model(model, shape):
    """(module, shape, n_classes, description, checkpoint or None) from a checkpoint path, an EBM or a callable."""
    if isinstance(model, (str, Path)):
        ckpt = load_checkpoint(model)
        m = model_from_checkpoint(ckpt, model)
        desc = {"checkpoint": str(model), "checkpoint_abs": str(Path(model).resolve()), "checkpoint_sha256": file_sha256(model),
                "checkpoint_step": int(ckpt.get("step", -1)), "checkpoint_epoch": int(ckpt.get("epoch", -1)),
                "model_spec": json.dumps(m.spec)}
        return m.eval(), m.shape, m.n_classes, desc, ckpt
    if isinstance(model, EBM):
        return model.eval(), model.shape, model.n_classes, {"model_spec": json.dumps(model.spec)}, None
    if not callable(model):
        raise ThermoEBMError("model must be a checkpoint path, a thermo-ebm model or a callable")
    if shape is None:
        shape = getattr(model, "shape", None)
    if shape is None:
        raise ThermoEBMError("shape is required when model is a plain callable")
    shape = tuple(int(s) for s in shape)
    with torch.no_grad():
        out = model(torch.zeros((2, *shape)))
    if out.ndim != 2 or out.shape[0] != 2:
        raise ThermoEBMError(f"model must map [N, *shape] to logits [N, K]; got output shape {list(out.shape)}")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, shape, int(out.shape[1]), {"model_spec": type(model).__name__}, None


def check_temps(temps) -> np.ndarray:
    """Temperatures as given, ascending; duplicates, non-finite or non-positive values are errors."""
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ThermoEBMError("no temperatures given")
    if t.size > 1000:
        raise ThermoEBMError(f"{t.size} temperatures requested; at most 1000")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ThermoEBMError("temperatures must be finite and > 0")
    t = np.sort(t)
    if np.any(np.diff(t) == 0):
        raise ThermoEBMError(f"duplicate temperature(s): {', '.join(f'{v:g}' for v in np.unique(t[1:][np.diff(t) == 0]))}")
    return t


def _checkpoint_data(ckpt, path):
    """The training split of a checkpoint's dataset (when readable here) and its stored sampler chains."""
    parts, notes = [], []
    cfg = ckpt.get("config", {})
    try:
        from .data import load_data
        tr = load_data(cfg["dataset"], cfg.get("data_dir", "data"), cfg.get("labels"))
        parts.append(tr.x_train.reshape(len(tr.x_train), -1))
        notes.append(f"{len(tr.x_train)} training images ({cfg['dataset']})")
    except Exception as e:  # the dataset is not readable here: the stored chains alone
        log.info("reference data: training split of %s not readable here (%s); using the stored chains",
                 path, " ".join(str(e).split())[:120])
    for key, v in ckpt.get("buffers", {}).items():
        if key.endswith("/x") and v.numel():
            parts.append(v.float().reshape(len(v), -1))
            notes.append(f"{len(v)} stored {key.split('/')[0]} chains")
    if not parts:
        return None, "none (no training data or stored chains found)"
    return torch.cat(parts), ", ".join(notes)


def resolve_data(data, shape, ckpt, path):
    """Reference states [M, D] (float32, in the box) and a description; data: None, 'auto', a tensor/array
    [M, *shape] or a .pt file holding one (or a dict with key 'x')."""
    if data is None or (isinstance(data, str) and data == "none"):
        return None, "none"
    if isinstance(data, str) and data == "auto":
        if ckpt is None:
            return None, "none (auto: not a checkpoint)"
        return _checkpoint_data(ckpt, path)
    src = "array"
    if isinstance(data, (str, Path)):
        src = str(data)
        obj = load_states_file(data, "data", "none, auto")
        data = obj.get("x") if isinstance(obj, dict) else obj
        if not isinstance(data, torch.Tensor):
            raise ThermoEBMError(f"{src} holds no tensor of states (a tensor [M, *shape] or a dict with key 'x')")
    x = check_states(data, shape, "data")
    return x, f"{len(x)} states ({src})"


JOINT_OBJECTIVES = ("j_ebm", "gcl", "hybrid", "dcl")  # objectives whose labels mean something


def resolve_ensemble(ensemble: str, ckpt: dict | None, n_classes: int) -> str:
    """"auto": joint for a checkpoint trained as a classifier (JOINT_OBJECTIVES) or any other model with
    K > 1 logits, marginal for m_ebm and single-logit models (`prepare` logs the choice once every input is
    checked)."""
    if ensemble != "auto":
        if ensemble not in ("marginal", "joint"):
            raise ThermoEBMError(f"unknown ensemble {ensemble!r}; choose auto, marginal or joint")
        if ensemble == "joint" and ckpt is not None and ckpt.get("config", {}).get("objective") == "m_ebm":
            log.warning("ensemble joint on an m_ebm checkpoint: its labels were never trained, so H(Y) and I(X;Y) "
                        "describe an arbitrary split of the logits")
        return ensemble
    objective = ckpt.get("config", {}).get("objective") if ckpt is not None else None
    return "joint" if (objective in JOINT_OBJECTIVES or (objective is None and n_classes > 1)) else "marginal"


def prepare(model, temps, *, shape, ensemble, units, t_train, data, device, seed, cfg, heldout=None) -> Problem:
    """Check every input and put the model in the measurement's units (before any sampling)."""
    temps = check_temps(temps)
    if ensemble not in ("auto", "marginal", "joint"):
        raise ThermoEBMError(f"unknown ensemble {ensemble!r}; choose auto, marginal or joint")
    if units not in ("train", "raw"):
        raise ThermoEBMError(f"unknown temperature units {units!r}; choose train or raw")
    dev = dist.resolve_device(device)
    net, shape, k, desc, ckpt = resolve_model(model, shape)
    ensemble_arg, ensemble = ensemble, resolve_ensemble(ensemble, ckpt, k)
    if t_train is None:
        t_train = checkpoint_temperature(ckpt) if ckpt is not None else float(getattr(net, "training_temperature", 1.0))
    if not (isinstance(t_train, (int, float)) and 0 < t_train < math.inf):
        raise ThermoEBMError(f"training temperature must be a finite number > 0, got {t_train!r}")
    states, source = resolve_data(data, shape, ckpt, model)
    held, train_split = resolve_heldout(heldout, shape, ckpt, model, k, seed)
    for key, f in (("data_sha256", data), ("heldout_sha256", heldout)):  # files given by path: their content
        if isinstance(f, (str, Path)) and f not in ("auto", "none") and Path(f).is_file():
            desc[key] = file_sha256(f)
    log.info("ensemble: %s%s", ensemble, " (auto)" if ensemble_arg == "auto" else "")
    if isinstance(net, torch.nn.Module):
        net = net.to(dev)
    t_ref = float(t_train) if units == "train" else 1.0
    if t_ref != 1.0:
        net = ScaledLogits(net, t_ref, shape)
    d = int(np.prod(shape))
    kernel = mala_kernel(cfg.compile if cfg.compile is not None else d >= 256)
    return Problem(net, Ensemble(ensemble, k), tuple(shape), temps, 1.0 / temps[::-1], float(t_train), units,
                   states, source, desc, dev, kernel, cfg, int(seed), held, train_split)


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
        tuning = ais.tune(p.net, p.ens, p.shape, p.betas, n_chains=cfg.tune_chains, n_stages=cfg.tune_stages,
                          n_adapt=cfg.tune_adapt, generator=gen, device=p.device, progress=progress, kernel=p.kernel)
    tuning = dist.broadcast(tuning)
    # AIS needs O(L^2) betas: with K equal-length steps Var(log w) ~ L^2 / K, and fewer steps bias log Z low
    # while the replica SE stays small (docs/estimators.md)
    length = float(ais.thermodynamic_length(tuning)[-1])
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
            sched = smc.tune(smc.Tempering(p.net, p.ens, p.shape), p.betas[:, None], 1,
                             n_chains=cfg.smc_pilot_chains, target_cess=cfg.smc_cess, n_leap=cfg.smc_leapfrog,
                             max_moves=cfg.smc_max_moves, corr=cfg.smc_corr, generator=gen, device=p.device,
                             progress=progress)
        sched = dist.broadcast(sched)
        log.info("SMC from uniform: %d stages, %d HMC moves of %d leapfrog steps (pilot)", len(sched.lambdas),
                 int(sched.moves.sum()), sched.n_leap)
        return Plan(tuning, sched.lambdas[:, 0], tuning.step_at(sched.lambdas[:, 0]), length, False, sched)
    schedule, steps = ais.make_schedule(tuning, p.betas, n_ais)
    return Plan(tuning, schedule, steps, length, n_ais < n_rule)


# axis along which each per-shard array is concatenated (per-temperature summaries get a leading shard axis)
SHARD_AXES = dict(logw=1, energy=1, energy2=1, ais_accept=0, ais_nonfinite=0, chain_means=1, u_trace=2, logits=2,
                  accept=0, swap_accept=0, nonfinite=0, step=0, rev_lw=1, samples=1, labels=1,
                  b_logw=1, b_energy=1, b_energy2=1, b_p_y=1, b_accept=0, b_nonfinite=0, b_steps=0, b_length=0, b_shares=0,
                  b_resampled=0, seconds=0)
STAGES = ("forward", "data_seeded", "sweep", "reverse")  # `seconds` columns: wall time of each stage per shard


def shard_seed(seed: int, shard: int) -> int:
    """The seed of one shard's chains (one rank under torchrun)."""
    return stream_seed(seed, shard)


def _anneal_from_data(p: Problem, fwd, step0, gen, progress):
    """Reference states, base, pilot and the counted anneal from the data-informed base (one shard). The base
    mixes four populations: kernels on data-seeded states, kernels on forward-AIS states, a Gaussian fitted to
    the data-seeded chains, uniform; the pilot
    sets each population's weight at each temperature to the share of Z it delivered (at least BASE_FLOOR)."""
    cfg = p.cfg
    refs = bridge.references(p.net, p.ens, p.shape, p.data, fwd, p.betas, step0, n_data=cfg.data_refs,
                             n_gauss=cfg.gauss_refs, n_steps=cfg.reference_steps, generator=gen, device=p.device, kernel=p.kernel,
                             progress=progress)
    n_t, n_f = len(p.betas), refs.centres.shape[1] - cfg.data_refs
    sizes = (cfg.data_refs, n_f, 1, 1)  # kernels on data-seeded states, on forward states; fitted Gaussian; uniform
    population = np.repeat(np.arange(4), sizes)
    first = np.tile([(1 - cfg.bridge_uniform) / 3] * 3 + [cfg.bridge_uniform], (n_t, 1))

    def make_base(shares):
        return bridge.KernelBase(refs.centres, refs.sigma, bridge.population_weights(sizes, shares, BASE_FLOOR),
                                 refs.mean, refs.cov)
    base = make_base(first)
    if cfg.engine == "smc":
        return _smc_from_data(p, base, first, gen, progress)
    bt = bridge.tune_bridge(p.net, p.ens, p.shape, base, p.betas, refs.step, population,
                            n_chains=cfg.tune_chains // 2, n_stages=cfg.tune_stages, n_adapt=cfg.tune_adapt,
                            generator=gen, device=p.device, kernel=p.kernel, progress=progress)
    base = make_base(bt.shares)
    length = bt.length()[-1]
    n_steps = max(cfg.bridge_steps, int(math.ceil(cfg.ais_steps_per_l2 * float(length.max()) ** 2)))
    lam, steps = bridge.bridge_schedule(bt, n_steps)
    # SMC populations never straddle a replica (the SE's independent groups) or a shard
    n_rep = replica_split(cfg.bridge_chains, cfg.replicas)[0]
    pop = math.gcd(cfg.bridge_chains // cfg.shards, cfg.bridge_chains // n_rep)
    res = bridge.run_bridge(p.net, p.ens, p.shape, base, p.betas, lam, steps, n_chains=cfg.bridge_chains // cfg.shards,
                            n_keep=cfg.chains // cfg.shards, pop=pop, generator=gen, device=p.device, kernel=p.kernel,
                            progress=progress)
    out = dict(b_logw=res.logw.cpu().numpy(), b_energy=res.energy.cpu().numpy(), b_energy2=res.energy2.cpu().numpy(),
               b_p_y=res.p_y.cpu().numpy(),
               b_accept=res.accept.cpu().numpy()[None], b_nonfinite=res.nonfinite.cpu().numpy()[None],
               b_steps=np.array([n_steps]), b_length=length[None], b_shares=bt.shares[None],
               b_resampled=np.array([res.resampled]))
    return res.states, out


def _smc_forward(p: Problem, pl: Plan, n_keep: int, gen, progress) -> ais.ForwardResult:
    """The counted SMC from uniform on the pilot's frozen stages (one shard's populations), as a ForwardResult."""
    cfg = p.cfg
    n = cfg.smc_chains // cfg.shards
    res = smc.run(smc.Tempering(p.net, p.ens, p.shape), pl.smc, p.betas[:, None], 1, n_chains=n,
                  pop=cfg.smc_chains // cfg.smc_populations, generator=gen, device=p.device, progress=progress)
    states = [smc.resampled_states(p.net, p.ens, p.shape, q, lw, 1, n_keep, gen) for q, lw in zip(res.particles, res.logw)]
    states = MalaState(*(torch.cat([getattr(s, f) for s in states]) for f in MalaState._fields))
    return ais.ForwardResult(res.logw, res.energy, res.energy2, states, res.accept[:, 0], res.nonfinite[:, 0])


def _smc_from_data(p: Problem, base, shares, gen, progress):
    """Engine "smc" with data: every temperature's SMC from the data-informed base (the stage function of
    smc.py, adaptive lambdas, HMC moves), bridge_chains per temperature in smc_populations populations."""
    cfg = p.cfg
    n_t = len(p.betas)
    path = smc.Bridge(p.net, p.ens, p.shape, base, p.betas, cfg.smc_pilot_chains)
    sched = smc.tune(path, np.ones((1, n_t)), n_t, n_chains=cfg.smc_pilot_chains, target_cess=cfg.smc_cess,
                     n_leap=cfg.smc_leapfrog, max_moves=cfg.smc_max_moves, corr=cfg.smc_corr, generator=gen,
                     device=p.device, progress=progress, desc="data-seeded SMC pilot")
    n = cfg.bridge_chains // cfg.shards
    path = smc.Bridge(p.net, p.ens, p.shape, base, p.betas, n)
    res = smc.run(path, sched, np.ones((1, n_t)), n_t, n_chains=n, pop=cfg.bridge_chains // cfg.smc_populations,
                  generator=gen, device=p.device, progress=progress, desc="data-seeded SMC")
    q, lw = res.particles[0], res.logw[0]
    beta = path.beta
    out = dict(b_logw=lw.reshape(n_t, n).cpu().numpy(), b_energy=res.energy[0].reshape(n_t, n).cpu().numpy(),
               b_energy2=res.energy2[0].reshape(n_t, n).cpu().numpy(),
               b_p_y=torch.softmax(beta[:, None] * q.logits, -1).reshape(n_t, n, -1).cpu().numpy(),
               b_accept=res.accept[0].numpy()[None], b_nonfinite=res.nonfinite[0].numpy()[None],
               b_steps=np.array([len(sched.lambdas)]), b_length=np.full((1, n_t), np.nan),
               b_shares=np.asarray(shares)[None], b_resampled=np.array([res.resampled]))
    states = smc.resampled_states(p.net, p.ens, p.shape, q, lw, n_t, cfg.chains // cfg.shards, gen)
    return states, out


def anneal(p: Problem, pl: Plan, shard: int, progress=False) -> dict:
    """Forward AIS, (with data) the anneal from the data-informed base, sweep and reverse AIS for one shard of
    the chains (its own generator). Returns numpy arrays keyed as SHARD_AXES."""
    cfg, betas = p.cfg, p.betas
    gen = torch.Generator(device=p.device)
    gen.manual_seed(shard_seed(p.seed, shard))
    c = cfg.chains // cfg.shards
    n_keep = max(c, cfg.data_refs) if p.data is not None else c
    clock = [time.perf_counter()]

    def lap():
        clock.append(time.perf_counter())
    if pl.smc is not None:
        fwd = _smc_forward(p, pl, n_keep, gen, progress)
    else:
        fwd = ais.run_forward(p.net, p.ens, p.shape, pl.schedule, pl.steps, betas,
                              n_chains=cfg.ais_chains // cfg.shards, n_keep=n_keep, mcmc_steps=cfg.ais_mcmc,
                              generator=gen, device=p.device, progress=progress, kernel=p.kernel)
    n_t = len(betas)
    out = dict(logw=fwd.logw.cpu().numpy(), energy=fwd.energy.cpu().numpy(), energy2=fwd.energy2.cpu().numpy(),
               ais_accept=fwd.accept.cpu().numpy()[None], ais_nonfinite=fwd.nonfinite.cpu().numpy()[None])
    init = fwd.states  # [T * c] without data
    lap()
    if p.data is not None:
        init, extra = _anneal_from_data(p, _keep_first(fwd.states, n_t, cfg.data_refs), pl.tuning.step_at(betas),
                                        gen, progress)
        out.update(extra)
    lap()
    sw = run_sweep(p.net, p.ens, init, betas, pl.tuning.step_at(betas), n_burn=cfg.burn_in,
                   n_prod=cfg.samples, exchange=cfg.exchange, thin=cfg.thin, generator=gen, device=p.device,
                   progress=progress, kernel=p.kernel)
    lap()
    rev_lw = ais.run_reverse(p.net, p.ens, sw.final, betas, pl.tuning, n_steps=cfg.reverse_steps,
                             generator=gen, device=p.device, progress=progress, kernel=p.kernel)
    lap()
    out["seconds"] = np.diff(clock)[None]
    keep = min(cfg.keep_samples, c)
    out.update(chain_means=sw.chain_means, u_trace=sw.u_trace, logits=sw.logits, accept=sw.accept[None],
               swap_accept=sw.swap_accept[None], nonfinite=sw.nonfinite[None], step=sw.step[None], rev_lw=rev_lw,
               samples=sw.final.x.reshape(n_t, c, *p.shape)[:, :keep].cpu().numpy())
    if p.ens.kind == "joint":
        lg = sw.final.logits.reshape(n_t, c, -1)[:, :keep]
        pr = torch.softmax(torch.as_tensor(betas, dtype=lg.dtype, device=lg.device)[:, None, None] * lg, -1)
        out["labels"] = torch.multinomial(pr.reshape(n_t * keep, -1), 1, generator=gen).reshape(n_t, keep).cpu().numpy()
    return out


def _keep_first(states: MalaState, n_t: int, n: int) -> MalaState:
    """The first n of each temperature's resampled states ([T * n_keep] grouped) -> [T * n]."""
    k = states.x.shape[0] // n_t
    return MalaState(*(v.reshape(n_t, k, *v.shape[1:])[:, :n].reshape(n_t * n, *v.shape[1:]) for v in states))


def _pool(p: Problem, pl: Plan, progress) -> dict:
    if dist.active():  # this rank runs its shard; per-chain arrays are concatenated in rank order
        part = anneal(p, pl, dist.rank(), progress)
        return {k: dist.gather_cat(v, SHARD_AXES[k]) if v.size else v for k, v in part.items()}
    parts = [anneal(p, pl, s, progress) for s in range(p.cfg.shards)]
    return {k: np.concatenate([q[k] for q in parts], axis=SHARD_AXES[k]) for k in parts[0]}


@dataclass
class LogZ:
    """An AIS estimate of log Z at every temperature (ascending beta) with its diagnostics."""
    value: np.ndarray
    se: np.ndarray
    ess: np.ndarray
    k_hat: np.ndarray
    u: np.ndarray          # weighted <E> (= -d log Z / d beta of the estimator) and its SE
    u_se: np.ndarray
    cov: np.ndarray        # [T, T] covariance of `value` between temperatures (from the replicas)
    pop_ess: np.ndarray | None = None  # SMC: ESS of the populations' Z estimates (`population_weights`)


def log_z_estimate(logw, energy, log_omega, n_replicas, populations=False) -> LogZ:
    """log Z = log Omega + log mean w with replica SEs, and U from the same weights (arrays [T, N]). With
    `populations` (SMC) the replicas are the populations, and ESS and Pareto k are those within them."""
    lmw, se, reps, ess = log_mean_weight(logw, n_replicas)
    k_hat, pop_ess = pareto_k(logw), None
    if populations:
        ess, k_hat, pop_ess = population_weights(logw, n_replicas)
    u, u_se = weighted_mean(logw, energy, n_replicas)
    finite = np.isfinite(reps).all(-1)
    cov = np.full((len(lmw), len(lmw)), np.nan)
    if finite.any():
        sub = np.atleast_2d(np.cov(reps[finite], ddof=1)) / reps.shape[-1]
        cov[np.ix_(finite, finite)] = sub
    return LogZ(log_omega + lmw, se, ess, k_hat, u, u_se, cov, pop_ess)


@dataclass
class Thermo:
    """Estimates (ascending beta) keyed as in the dataset: name -> (value [T], se [T])."""
    out: dict
    diag: dict
    forward: LogZ
    reported: LogZ
    from_data: LogZ | None
    peak: tuple
    tau: np.ndarray
    mbar_ok: bool
    cov: dict              # name -> [T, T] covariance between temperatures (log_Z, C)
    label_z: np.ndarray | None = None  # joint with data: `_label_mix_z`


def _label_mix_z(blocks, ip, b_logw, b_p_y, n_replicas) -> np.ndarray:
    """max over y of |p_T(y) of the sweep chains - p_T(y) of the data-seeded weights| / combined SE, per
    temperature [T]: the two disagree on how the mass splits between classes (a phase one of them mis-weighs).
    The SE is at least 1 / (number of sweep chains), the finest share those chains can resolve (where every
    chain and every weight sits in one class, both replica and jackknife SEs are 0)."""
    floor = 1.0 / blocks.shape[1]
    z = []
    for y in range(ip.stop - ip.start):
        ps, ps_se = jackknife(blocks, lambda m: m[..., ip.start + y])
        pw, pw_se = weighted_mean(b_logw, b_p_y[..., y], n_replicas)
        z.append(np.abs(ps - pw) / np.maximum(np.sqrt(ps_se ** 2 + pw_se ** 2), floor))
    return np.max(z, axis=0)


def thermodynamics(p: Problem, pooled: dict) -> Thermo:
    """log Z, F, U, S, C, info (joint: H_Y, H_Y|X, I_XY) with SEs, and the cross-checks."""
    cfg, betas, ens = p.cfg, p.betas, p.ens
    n_t = len(betas)
    log_omega = ens.log_omega(p.d)
    label_z = None
    # SMC: one replica per population (chains of a population share ancestors and are not independent)
    smc_run = cfg.engine == "smc"
    n_rep = cfg.smc_populations if smc_run else cfg.replicas
    fwd = log_z_estimate(pooled["logw"], pooled["energy"], log_omega, n_rep, smc_run)
    seeded = None
    if "b_logw" in pooled:
        # weights relative to the normalised base: log Z = log mean w (no reference volume)
        seeded = log_z_estimate(pooled["b_logw"], pooled["b_energy"], 0.0, n_rep, smc_run)
    rep = seeded or fwd
    log_z, log_z_se = rep.value, rep.se
    # C from the annealing weights (which carry a rare phase's mass that a few sweep chains cannot hold)
    w_src = ((pooled["b_logw"], pooled["b_energy"], pooled["b_energy2"]) if seeded
             else (pooled["logw"], pooled["energy"], pooled["energy2"]))
    c_w, c_w_se = weighted_heat(*w_src, betas, n_rep)
    # ... and their share at energies the sweep chains never visited (a phase too rare for them to hold)
    lo, hi = pooled["u_trace"].min(axis=(0, 2)), pooled["u_trace"].max(axis=(0, 2))
    du, du_se, dc, dc_se, m_out = missed_phase(*w_src, lo, hi, betas, n_rep)

    # ---- sweep estimators: jackknife over chains (independent blocks)
    names = stat_names(ens)
    blocks = pooled["chain_means"]
    iu, im2 = names.index("u"), names.index("m2")
    U, U_se = jackknife(blocks, lambda m: m[..., iu])
    U, U_se = U + du, np.sqrt(U_se ** 2 + du_se ** 2)  # plus what the chains miss (zero when they miss nothing)

    def heat(m):
        b = betas.reshape((-1,) + (1,) * (m.ndim - 2))
        return b ** 2 * (m[..., im2] - m[..., iu] ** 2)
    # C's jackknife covariance between temperatures: its diagonal is C's SE; the peak temperature of C(T) needs
    # all of it, since C at neighbouring T is positively correlated through the swaps
    C_cov = jackknife_cov(blocks, heat) + np.diag(dc_se ** 2)
    C, C_se = heat(blocks.mean(axis=1)) + dc, np.sqrt(np.diag(C_cov))
    t_asc = 1.0 / betas[::-1]
    peak = peak_position(t_asc, C[::-1], C_cov[::-1, ::-1], seed=p.seed)
    S = betas * U + log_z
    S_se = np.sqrt((betas * U_se) ** 2 + log_z_se ** 2)
    out = {
        "log_Z": (log_z, log_z_se), "F": (-log_z / betas, log_z_se / betas), "U": (U, U_se),
        "S": (S, S_se), "C": (C, C_se), "info_bits": ((log_omega - S) / LN2, S_se / LN2),
    }
    if ens.kind == "joint":
        ih = names.index("h_y_given_x")
        ip = slice(ih + 1, ih + 1 + ens.n_classes)

        def h_y(m):
            q = np.clip(m[..., ip], 1e-300, None)
            return -(q * np.log(q)).sum(-1) / LN2
        hyx = jackknife(blocks, lambda m: m[..., ih] / LN2)
        if seeded is None:
            hy = jackknife(blocks, h_y)
            ixy = jackknife(blocks, lambda m: h_y(m) - m[..., ih] / LN2)
        else:  # p_T(y) from the data-seeded weights: phases the sweep chains rarely visit still count
            hy = label_entropy(pooled["b_logw"], pooled["b_p_y"], n_rep)
            ixy = (hy[0] - hyx[0], np.sqrt(hy[1] ** 2 + hyx[1] ** 2))
            label_z = _label_mix_z(blocks, ip, pooled["b_logw"], pooled["b_p_y"], n_rep)
        out.update(H_Y_bits=hy, H_Y_given_X_bits=hyx, I_XY_bits=ixy)

    # ---- cross-checks: the reverse direction, MBAR, consistency residuals, the two origins
    tau = np.array([integrated_autocorr_time(pooled["u_trace"][:, t, :]) for t in range(n_t)])
    rev_ratio, rev_se = -logmeanexp(pooled["rev_lw"], axis=-1), delta_log_mean_se(pooled["rev_lw"])
    log_z_rev, log_z_rev_se = log_omega + np.cumsum(rev_ratio), np.sqrt(np.cumsum(rev_se ** 2))
    if n_t > 1:  # dU/dT on the ascending-T grid; SEs propagated through the linear stencil
        D = np.stack([derivative(t_asc, col) for col in np.eye(n_t)], axis=1)
        dU = (D @ U[::-1])[::-1]
        dU_se = np.sqrt((D ** 2) @ (U_se[::-1] ** 2))[::-1]
    else:
        dU, dU_se = np.full(n_t, np.nan), np.full(n_t, np.nan)
    diag = {
        "log_Z_reverse": (log_z_rev, log_z_rev_se),
        "log_Z_gap": (log_z_rev - log_z, np.sqrt(log_z_rev_se ** 2 + log_z_se ** 2)),
        "log_Z_forward": (fwd.value, fwd.se),
        "U_resid": (U - rep.u, np.sqrt(U_se ** 2 + rep.u_se ** 2)),
        "C_anneal_resid": (C - c_w, np.sqrt(C_se ** 2 + c_w_se ** 2)),
        "U_missed": (du, du_se), "C_missed": (dc, dc_se),
        "C_resid": (C - dU, np.sqrt(C_se ** 2 + dU_se ** 2)),
    }
    if seeded is not None:
        diag["origin_gap"] = (seeded.value - fwd.value, np.sqrt(seeded.se ** 2 + fwd.se ** 2))
        diag["origin_U_gap"] = (seeded.u - fwd.u, np.sqrt(seeded.u_se ** 2 + fwd.u_se ** 2))
    mbar_ok = False
    if cfg.mbar and n_t > 1:
        try:
            diag["log_Z_mbar"] = _mbar_log_z(pooled["logits"], betas, ens, log_z[0], log_z_se[0], np.max(tau) / cfg.thin)
            mbar_ok = True
        except Exception as e:  # MBAR failing (no overlap) is a diagnostic, not a fatal error
            log.warning("MBAR cross-check failed: %s", " ".join(str(e).split())[:200])
    if not mbar_ok:
        diag["log_Z_mbar"] = (np.full(n_t, np.nan), np.full(n_t, np.nan))
    return Thermo(out, diag, fwd, rep, seeded, peak, tau, mbar_ok, {"log_Z": rep.cov, "C": C_cov}, label_z)


# what each flag makes unreliable (named in the warning and in docs/estimators.md)
AFFECTS = {
    "flag_nonfinite": "all quantities",
    "flag_low_acceptance": "all quantities",
    "flag_low_ess": "log_Z, F, S, info_bits, log_lik",
    "flag_heavy_tails": "log_Z, F, S, info_bits, log_lik",
    "flag_poor_mixing": "U, C, S, info_bits, T_ML and the joint information quantities",
    "flag_inconsistent": "U, C, S, info_bits, T_ML and the joint information quantities",
    "flag_hysteresis": "all quantities (a phase one origin did not reach)",
    "flag_unconverged": "log_Z, F, S, info_bits, log_lik (and with data H_Y_bits, I_XY_bits)",
}
# the flags whose AFFECTS include C (`peak_flagged`)
C_FLAGS = ("flag_nonfinite", "flag_low_acceptance", "flag_poor_mixing", "flag_inconsistent", "flag_hysteresis")


def diagnose(p: Problem, pl: Plan, th: Thermo, pooled: dict) -> tuple[dict, dict, dict]:
    """Per-temperature flags (ascending beta), the diagnostics stored beside them, and one warning line per
    raised flag, by flag name (its temperatures, what it affects, what to do)."""
    cfg = p.cfg
    rep = th.reported
    n_chains = pooled["b_logw"].shape[-1] if th.from_data is not None else pooled["logw"].shape[-1]
    acc = pooled["b_accept"].mean(0) if th.from_data is not None else pooled["ais_accept"].mean(0)
    bad = pooled["ais_nonfinite"].sum(0) + pooled["nonfinite"].sum(0)
    if th.from_data is not None:
        bad = bad + pooled["b_nonfinite"].sum(0)
    sw_acc = pooled["accept"].mean(0)
    # the SE of log mean w needs enough effective chains and a light tail (Pareto k) of the weights
    low_ess = rep.ess < max(10.0, 0.05 * n_chains)
    if rep.pop_ess is not None:  # SMC: within populations, and the populations' Z estimates must agree
        n_pop = cfg.smc_populations
        low_ess = low_ess | (rep.pop_ess < 0.5 * n_pop)
        heavy = rep.k_hat > heavy_tail_limit(n_chains)
    else:
        heavy = rep.k_hat > heavy_tail_limit(n_chains)  # nan (too few finite weights): left to the ESS flag
    poor_mix = (cfg.samples < 10 * th.tau) | (cfg.burn_in < 5 * th.tau)
    flags = {"flag_nonfinite": bad > 0, "flag_low_acceptance": (sw_acc < 0.05) | (acc < 0.05),
             "flag_low_ess": low_ess, "flag_heavy_tails": heavy, "flag_poor_mixing": poor_mix}
    # the sweep chains disagree with the annealing weights on U: the chains hold the wrong mix of phases
    ur, ur_se = th.diag["U_resid"]
    flags["flag_inconsistent"] = np.abs(ur) > HYSTERESIS_Z * ur_se
    if th.label_z is not None:  # ... or split the mass between the classes differently
        flags["flag_inconsistent"] |= th.label_z > HYSTERESIS_Z
    if th.from_data is not None:  # the two origins (uniform, data) disagree: a phase one of them missed
        g, gs = th.diag["origin_gap"]
        ug, ugs = th.diag["origin_U_gap"]
        if pl.capped:  # an under-annealed forward estimate is low by design: only more mass from uniform counts
            flags["flag_hysteresis"] = -g > HYSTERESIS_Z * gs
        else:
            flags["flag_hysteresis"] = (np.abs(g) > HYSTERESIS_Z * gs) | (np.abs(ug) > HYSTERESIS_Z * ugs)
    if th.from_data is not None:
        n_sched = int(pooled["b_steps"].max())
        longer = (f"anneal longer (data-seeded path: {n_sched} lambdas = max(bridge_steps {cfg.bridge_steps}, "
                  f"ais_steps_per_l2 {cfg.ais_steps_per_l2:g} x L^2 {float(pooled['b_length'].max()) ** 2:.0f}); "
                  "raise --ais-steps-per-l2 or --bridge-chains)")
    else:
        longer = (f"anneal longer (schedule {len(pl.schedule)} betas = max(ais_steps {cfg.ais_steps}, ais_steps_per_l2 "
                  f"{cfg.ais_steps_per_l2:g} x L^2 {pl.length ** 2:.0f}) + sweep betas; 4x the betas fixed the "
                  "784-d benchmark, docs/estimators.md)")
    if cfg.engine == "smc":
        longer = (f"larger SMC populations: raise --smc-chains ({cfg.smc_chains} from uniform) and --bridge-chains "
                  f"({cfg.bridge_chains} from data), each split into {cfg.smc_populations} populations")
    remedy = {"flag_nonfinite": "proposals with a non-finite log density (rejected and counted)",
              "flag_low_acceptance": "sampler acceptance below 5%", "flag_low_ess": longer, "flag_heavy_tails": longer,
              "flag_poor_mixing": "raise --samples and --burn-in (the sweep chains are short against tau_E)",
              "flag_inconsistent": "U (U_resid) or, joint with data, p_T(y) (label_mix_z) of the "
                                   "sweep chains and of the annealing weights differ beyond 4 SE: the chains hold the wrong mix of phases; "
                                   "a longer sweep (--burn-in) or more chains",
              "flag_hysteresis": "annealing from uniform and from the data disagree: log_Z is the data-seeded "
                                 "estimate; compare log_Z_forward, origin_gap; more --data-refs and a longer anneal"}
    affects = dict(AFFECTS)
    if th.from_data is not None and p.ens.kind == "joint":  # p_T(y) comes from the same weights as log Z
        for name in ("flag_low_ess", "flag_heavy_tails"):
            affects[name] += ", H_Y_bits, I_XY_bits"
    warnings = {name: warning_line(p, name, f, affects[name], remedy[name]) for name, f in flags.items() if np.any(f)}
    extra = {"ess": rep.ess, "pareto_k": rep.k_hat, "ess_forward": th.forward.ess, "ais_accept": acc,
             **({"population_ess": rep.pop_ess} if rep.pop_ess is not None else {}),
             "accept": sw_acc, "tau_E": th.tau, "step_size": pooled["step"].mean(0)}
    if th.label_z is not None:
        extra["label_mix_z"] = th.label_z
    n_t = len(p.betas)
    sw = pooled["swap_accept"].mean(0)
    extra["swap_accept"] = np.concatenate([sw, [np.nan]]) if n_t > 1 else np.array([np.nan])
    return flags, extra, warnings


# what `max_time` lengthens when a flag survives: the anneals (both origins) or the sweep
LENGTHEN = {"flag_low_ess": "anneal", "flag_heavy_tails": "anneal", "flag_hysteresis": "anneal",
            "flag_unconverged": "anneal", "flag_poor_mixing": "sweep", "flag_inconsistent": "sweep"}


def warning_line(p: Problem, name: str, flag, affects: str, remedy: str) -> str:
    """One warning for a raised flag: its temperatures, what it affects, what to do."""
    at = ", ".join(f"{v:g}" for v in np.sort(1.0 / p.betas[np.asarray(flag, bool)]))
    return f"{name.replace('flag_', '').replace('_', ' ')} at T = {at} (affects {affects}): {remedy}"


SCALE_HINT_MIN = 3


def scale_hint(p: Problem, flags: dict) -> str | None:
    """A warning when every temperature is flagged in units of T_train: a sampler with negligible noise (JEM-style
    SGLD: T_train = 5e-5) trains at a nominal temperature, and the model can be frozen at that scale."""
    raised = np.any([np.asarray(f, bool) for f in flags.values()], axis=0)
    # fewer than SCALE_HINT_MIN temperatures say nothing about the scale (a short budget flags them just as well)
    if p.units != "train" or p.t_train == 1.0 or raised.size < SCALE_HINT_MIN or not np.all(raised):
        return None
    return (f"every temperature is flagged: the model may be frozen at these temperatures (T_train = {p.t_train:g} "
            "from the sampler settings; noise-free SGLD trains at a nominal temperature). Measure on the logits' "
            "scale over decades, e.g. --units raw --temps 0.001,0.003,0.01,0.03,0.1,0.3,1 (docs/estimators.md, "
            "Trained models)")


def lengthen(cfg: MeasureConfig, flags: dict) -> MeasureConfig | None:
    """The next attempt's budget for the flags raised (the schedules or the sweep doubled), or None."""
    raised = {LENGTHEN[name] for name, f in flags.items() if name in LENGTHEN and np.any(f)}
    if not raised:
        return None
    new = MeasureConfig(**asdict(cfg))
    if "anneal" in raised:
        new.smc_chains, new.smc_cess = 2 * cfg.smc_chains, 1.0 - (1.0 - cfg.smc_cess) / 2
        new.ais_steps_per_l2 = 2 * cfg.ais_steps_per_l2
        new.ais_steps, new.bridge_steps, new.crosscheck_steps = 2 * cfg.ais_steps, 2 * cfg.bridge_steps, 2 * cfg.crosscheck_steps
    if "sweep" in raised:
        new.samples, new.burn_in = 2 * cfg.samples, 2 * cfg.burn_in
    return new


def peak_flagged(c, flags: dict, t_star: float) -> bool:
    """Whether a flag that affects C is raised at the largest C [T] or at a neighbour (the points the peak's
    parabola rests on)."""
    if not math.isfinite(t_star):
        return False
    i = int(np.argmax(c))
    near = slice(max(i - 1, 0), i + 2)
    return bool(any(np.any(np.asarray(flags[n])[near]) for n in C_FLAGS if n in flags))


def to_dataset(p: Problem, pl: Plan, th: Thermo, flags: dict, extra: dict, pooled: dict, seconds: float) -> xr.Dataset:
    """The xarray.Dataset a measurement returns (ascending temperature, CF metadata, provenance)."""
    cfg = p.cfg
    rev = slice(None, None, -1)  # ascending beta -> ascending temperature
    data_vars = {}
    for name, (v, e) in {**th.out, **th.diag}.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
        data_vars[name + "_err"] = ("temperature", np.asarray(e, dtype=np.float64)[rev])
    for name, v in extra.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
    for name, f in flags.items():
        data_vars[name] = ("temperature", np.asarray(f)[rev].astype(np.int8))
    data_vars["C_peak_T"], data_vars["C_peak_T_err"] = ((), th.peak[0]), ((), th.peak[1])
    data_vars["C_peak_flag"] = ((), np.int8(peak_flagged(th.out["C"][0], flags, th.peak[0])))
    for name, cov in th.cov.items():  # between temperatures: SE of differences such as F(T1) - F(T2)
        data_vars[name + "_cov"] = (["temperature", "temperature_b"], np.asarray(cov, dtype=np.float64)[rev, rev])
    xs = pooled["samples"][:, : cfg.keep_samples][rev]
    sdims = ["temperature", "sample"] + [f"pixel_dim{i}" for i in range(len(p.shape))]
    data_vars["samples"] = (sdims, xs.astype(np.float32))
    if p.ens.kind == "joint":
        data_vars["sample_labels"] = (["temperature", "sample"], pooled["labels"][:, : cfg.keep_samples][rev])
    energy_units = "T_train (multiply by T_train for the logits' units)" if p.units == "train" and p.t_train != 1.0 \
        else "the logits' units"
    attrs = {
        "kind": "measurement", "ensemble": p.ens.kind, "n_classes": p.ens.n_classes, "dimension": p.d,
        "shape": json.dumps(list(p.shape)), "log_Omega": p.ens.log_omega(p.d), "seed": p.seed,
        "device": str(p.device), "settings": json.dumps(asdict(cfg)), **provenance(),
        "ais_schedule_length": len(pl.schedule), "thermodynamic_length": pl.length, "mbar_ok": int(th.mbar_ok),
        "ais_schedule_capped": int(pl.capped),
        "seconds": seconds, "units": "log_Z, S, C and likelihoods in nats (k_B = 1), names ending in _bits in bits, F and U in "
                 "energy_units, temperatures in temperature_units (each variable's units and units_metadata say which)",
        "T_train": p.t_train, "temperature_units": p.units, "energy_units": energy_units,
        "data": p.data_source, "log_Z_source": "data-seeded anneal" if th.from_data is not None else "forward AIS from uniform",
        **p.desc,
    }
    if th.from_data is not None:
        attrs["bridge_schedule_length"] = int(pooled["b_steps"].max())
        attrs["bridge_thermodynamic_length_max"] = float(pooled["b_length"].max())
        attrs["bridge_resamples_per_population"] = float(pooled["b_resampled"].mean())
    coords = {"temperature": p.temps, "temperature_raw": ("temperature", p.temps * p.t_ref),
              "temperature_b": ("temperature_b", p.temps)}
    return annotate(xr.Dataset(data_vars, coords=coords, attrs=attrs), p.units, energy_units)


def add_likelihood(ds: xr.Dataset, p: Problem, th: Thermo, flags: dict) -> xr.Dataset:
    """The held-out likelihood per temperature, T_ML and its side, into the dataset (`likelihood.py`)."""
    lik = heldout_likelihood(p.net, p.shape, p.ens, p.betas, p.temps, p.d, p.heldout, p.train_split,
                             th.reported.value, th.cov["log_Z"], *th.out["U"], p.device)
    rev = slice(None, None, -1)
    new = {}
    for name, (v, e) in lik.out.items():
        new[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
        new[name + "_err"] = ("temperature", np.asarray(e, dtype=np.float64)[rev])
    new["log_lik_heldout_cov"] = (["temperature", "temperature_b"], lik.cov[rev, rev])
    new["T_ML"], new["T_ML_err"] = ((), lik.t_ml[0]), ((), lik.t_ml[1])
    ds = ds.assign(new)
    # T_ML rests on U at the two temperatures that bracket it (outside the range: the nearest edge)
    t_asc = p.temps
    if lik.t_ml_side == "inside":
        i = int(np.searchsorted(t_asc, lik.t_ml[0]))
        near = [max(i - 1, 0), min(i, len(t_asc) - 1)]
    else:
        near = [0] if lik.t_ml_side == "below" else [len(t_asc) - 1]
    u_flags = [n for n in AFFECTS if "T_ML" in AFFECTS[n] or AFFECTS[n].startswith("all")]
    flagged = any(bool(np.asarray(flags[n])[rev][near].any()) for n in u_flags if n in flags)
    ds.attrs.update(heldout=p.heldout.source, T_ML_side=lik.t_ml_side,
                    T_ML_flagged=int(flagged), heldout_levels=int(p.heldout.levels or 0),
                    heldout_dequantisation="x = -1 + (2 / L)(k + u), u ~ U(0, 1), L grey levels" if p.heldout.levels
                    else "none (continuous states)")
    if p.train_split is not None:
        ds.attrs["train_split"] = p.train_split.source
    msg = {"inside": f"T_ML = {lik.t_ml[0]:.4g} +- {lik.t_ml[1]:.2g}", "below": "T_ML lies below the lowest temperature",
           "above": "T_ML lies above the highest temperature"}.get(lik.t_ml_side, "T_ML undetermined")
    log.info("held-out likelihood (%s): %s (%s units)", p.heldout.source, msg, p.units)
    return annotate(ds, p.units, ds.attrs["energy_units"])


def auto_temperatures(model, cfg: MeasureConfig, **kw) -> tuple[np.ndarray, str, dict]:
    """`--temps auto` (temperatures.py): scan quickly, extend the scan until it brackets the structure, then
    place cfg.auto_temps temperatures. Returns (temperatures, explanation, the scan's figures)."""
    scan_cfg = MeasureConfig(**{**asdict(cfg), **temperatures.SCAN, "max_time": None})
    grid = temperatures.initial_grid()
    parts = []
    t_ml = None
    for block in range(2 * temperatures.SCAN_EXTEND + 1):
        t_block = time.perf_counter()
        quiet = log.level
        log.setLevel(logging.ERROR)  # the scan's own flags and notes are not the measurement's
        try:
            ds = measure(model, grid, config=scan_cfg, **kw)
        finally:
            log.setLevel(quiet)
        log.info("--temps auto: scan of T = %s (%.0f s)", ", ".join(f"{v:.3g}" for v in ds.temperature.values),
                 time.perf_counter() - t_block)
        parts.append(ds)
        if ds.attrs.get("T_ML_side") == "inside":
            t_ml = float(ds.T_ML)
        t = np.concatenate([q.temperature.values for q in parts])
        order = np.argsort(t)
        flagged = np.concatenate([np.any([q[v].values.astype(bool) for v in q.data_vars if v.startswith("flag_")],
                                         axis=0) for q in parts])
        scan = xr.Dataset({"info_bits": ("temperature", np.concatenate([q.info_bits.values for q in parts])[order]),
                           "C": ("temperature", np.concatenate([q.C.values for q in parts])[order]),
                           "flag_any": ("temperature", flagged[order].astype(np.int8))},
                          coords={"temperature": t[order]})
        if has_interior_max(scan.C.values):
            scan["C_peak_T"] = ((), float(parabola_peak(scan.temperature.values, scan.C.values)))
        more = temperatures.extend(scan)
        if more is None or block == 2 * temperatures.SCAN_EXTEND:
            break
        grid = np.setdiff1d(more, t)
    temps, expl = temperatures.choose(scan, cfg.auto_temps, t_ml)
    return temps, expl, {"temperature": scan.temperature.values.tolist(), "C": scan.C.values.tolist(),
                         "info_bits": scan.info_bits.values.tolist(), "flagged": scan.flag_any.values.tolist()}


def measure(model: str | Path | EBM | Callable[[torch.Tensor], torch.Tensor], temps: Sequence[float] | np.ndarray | str = "auto", *,
            shape: Sequence[int] | None = None, ensemble: str = "auto", units: str = "train",
            t_train: float | None = None, data: str | Path | torch.Tensor | np.ndarray | None = "auto",
            seed: int = 0, device: str = "auto", progress: bool = False, config: MeasureConfig | None = None,
            heldout: str | Path | torch.Tensor | np.ndarray | tuple | None = "auto", **budget) -> xr.Dataset:
    """Estimate log Z, F, U, S, C, information (and the joint information quantities) at temperatures `temps`,
    every value with its standard error.

    Parameters
    ----------
    model : checkpoint path (.pt from `train`), thermo-ebm EBM, or a callable / nn.Module mapping float
        x [N, *shape] in the box [-1, 1]^d to logits f(x) [N, K]; E(x) = -logsumexp_y f(x)[y] (marginal) or
        E(x, y) = -f(x)[y] (joint).
    temps : temperatures T > 0 (any order; duplicates are an error), in `units`; or "auto" (the default): a quick
        scan locates the freezing point, the heat-capacity peak, T_ML and melting, and `auto_temps` temperatures
        are placed between them at equal thermodynamic length (temperatures.py; attributes temperatures_chosen,
        temperature_scan).
    shape : input shape, needed only for a plain callable.
    ensemble : "marginal" (p_T(x) on the box), "joint" (p_T(x, y); adds H_Y, H_Y_given_X, I_XY in bits) or
        "auto" (default): joint for a classifier's objective (j_ebm, gcl, hybrid, dcl) and for other models with
        K > 1 logits, marginal for m_ebm and single-logit models; the log names the choice.
    units : "train" (default): T in units of the training temperature T_train (a checkpoint's
        sgld_noise^2 / (2 sgld_step); else `t_train`, else a model's `training_temperature`, else 1), so T = 1 is
        the distribution the training chains targeted and U, F are in units of T_train; "raw": T and energies
        on the logits' scale.
    t_train : training temperature (logits' scale) for models that do not record one.
    data : reference states of the low-temperature phase, [M, *shape] in the box (tensor, array or .pt file);
        "auto": a checkpoint's training split and stored chains (none for other models); None: none. With data,
        log Z comes from annealing a data-informed base at every temperature and the estimate from uniform is
        kept as log_Z_forward (flag_hysteresis where the two disagree).
    heldout : held-out images for the normalised likelihood: [M, *shape] in the box, a tuple (x, y), a .pt file
        of either (or a dict with 'x' and 'y'), or "auto": a checkpoint's held-out split (with as many
        training-split images for the generalisation gap; none for other models, or when the dataset is not
        readable here). Images on the 8-bit grid are dequantised (one grey
        level of uniform noise); docs/estimators.md gives the convention. None: no likelihood.
    seed : seed of every chain (shards and ranks derive theirs from it).
    device : "auto", "cpu", "cuda" or "cuda:N".
    progress : progress bars (a terminal) or periodic log lines (elsewhere).
    config, **budget : a MeasureConfig and/or its fields as keywords (ais_chains=..., samples=...). With
        max_time (seconds), the run is repeated with the anneals (or, for mixing flags, the sweep) doubled while
        flags fire or the last doubling moved log Z beyond 4 SE (flag_unconverged, log_Z_shift), as long as the
        doubled run fits in the time left; attributes attempts, attempt_seconds and settings (the final budget)
        record what was spent, and a surviving flag's warning says what the next doubling would take.

    Returns
    -------
    xarray.Dataset on ascending `temperature` (as given; `temperature_raw` = T x T_train) with, per temperature:
    log_Z, F, U, S, C, info_bits (joint: H_Y_bits, H_Y_given_X_bits, I_XY_bits), each with `<name>_err`;
    cross-checks log_Z_forward, log_Z_reverse, log_Z_gap, log_Z_mbar, U_resid, C_resid (with data also
    origin_gap, origin_U_gap), all with SEs; diagnostics ess, ess_forward, pareto_k, ais_accept, accept,
    swap_accept, tau_E, step_size (engine smc: population_ess; joint with data: label_mix_z, the largest
    disagreement in p_T(y) between the sweep chains and the data-seeded weights, in SEs); int8 flags flag_nonfinite, flag_low_acceptance, flag_low_ess,
    flag_heavy_tails, flag_poor_mixing, flag_inconsistent, flag_hysteresis (with data; a phase one origin
    missed); C_peak_T and C_peak_T_err (C_peak_flag: C is flagged at or next to its maximum); log_Z_cov and
    C_cov [temperature, temperature_b], the covariances between temperatures (SE of F(T2) - F(T1) = sqrt(T2^2 c22 + T1^2 c11 - 2 T1 T2 c12)); samples (and
    sample_labels); with held-out images: log_lik_heldout (log p_T(x), nats per image; joint with labels also
    log_lik_xy_heldout, log_lik_y_given_x_heldout), info_heldout_bits, bits_per_dim_heldout (quantised
    images), log_lik_train and generalisation_gap (auto), E_heldout, log_lik_heldout_cov, and T_ML with
    T_ML_err (attributes T_ML_side, T_ML_flagged). Units: log Z, S, C and likelihoods in nats (k_B = 1), names
    ending in _bits in bits; F and U in units of T_train (units "train") or the logits' scale (attribute
    energy_units); every variable carries `units` (UDUNITS; "1" with `units_metadata` for nats, bits and
    temperature scales) and `long_name`, the dataset its provenance. docs/estimators.md describes each estimator and flag.

    Example
    -------
    >>> ds = thermo_ebm.measure("checkpoints/run.pt", [0.5, 1.0, 2.0], ensemble="joint")
    >>> float(ds.I_XY_bits.sel(temperature=1.0)), float(ds.I_XY_bits_err.sel(temperature=1.0))
    """
    cfg = config or MeasureConfig()
    unknown = set(budget) - {f.name for f in fields(MeasureConfig)}
    if unknown:
        raise ThermoEBMError(f"unknown budget option(s): {', '.join(sorted(unknown))}")
    cfg = MeasureConfig(**{**asdict(cfg), **budget})
    if dist.active():  # under torchrun every process runs one shard
        if cfg.shards not in (1, dist.world()):
            raise ThermoEBMError(f"shards={cfg.shards} conflicts with the {dist.world()} processes")
        cfg.shards = dist.world()
    cfg.validate()
    kw = dict(shape=shape, ensemble=ensemble, units=units, t_train=t_train, data=data, device=device, seed=seed,
              heldout=heldout)
    auto = temps is None or (isinstance(temps, str) and temps == "auto")
    t0 = time.perf_counter()
    if auto:  # the scan's first step checks every input, before any sampling
        temps, why, scan = auto_temperatures(model, cfg, **kw)
        log.info("%s", why)
    p = prepare(model, temps, cfg=cfg, **kw)
    attempts = []  # seconds per attempt; with max_time, runs are repeated with longer budgets (see `lengthen`)
    previous = None
    while True:
        t_run = time.perf_counter()
        pl = plan(p, progress)
        t_plan = time.perf_counter() - t_run
        pooled = _pool(p, pl, progress)
        th = thermodynamics(p, pooled)
        flags, extra, warnings = diagnose(p, pl, th, pooled)
        if previous is not None:  # the doubled schedule moved log Z beyond its errors: not converged
            moved = np.abs(th.reported.value - previous.value)
            flags["flag_unconverged"] = moved > HYSTERESIS_Z * np.sqrt(th.reported.se ** 2 + previous.se ** 2)
            extra["log_Z_shift"] = th.reported.value - previous.value
            if np.any(flags["flag_unconverged"]):
                warnings["flag_unconverged"] = warning_line(
                    p, "flag_unconverged", flags["flag_unconverged"], AFFECTS["flag_unconverged"],
                    "doubling the schedules moved log Z beyond 4 SE (log_Z_shift); the estimate is still moving")
        attempts.append(time.perf_counter() - t_run)
        if cfg.max_time is None:
            longer = None
            break
        # a first run is always checked by one doubling of its schedules, if the time allows
        longer = lengthen(p.cfg, flags if previous is not None else {**flags, "flag_unconverged": True})
        need = 2.2 * attempts[-1]  # a doubled budget costs about twice the last attempt
        # under torchrun rank 0 decides for every rank (their clocks differ; their pooled flags do not)
        again = dist.broadcast(longer is not None and time.perf_counter() - t0 + need <= cfg.max_time)
        if not again:
            break
        log.info("attempt %d (%.0f s): %s; measuring again with doubled schedules (--max-time %.0f s)",
                 len(attempts), attempts[-1], ", ".join(n for n, f in flags.items() if n in LENGTHEN and np.any(f))
                 or "checking convergence", cfg.max_time)
        previous, p = th.reported, replace(p, cfg=longer)
    note = ""
    if longer is not None:
        note = f" (the next doubling would take ~{need:.0f} s beyond --max-time {cfg.max_time:.0f} s)"
    for name, line in warnings.items():
        log.warning("%s%s", line, note if name in LENGTHEN else "")
    hint = scale_hint(p, flags)
    if hint:
        log.warning("%s", hint)
    ds = to_dataset(p, pl, th, flags, extra, pooled, time.perf_counter() - t0)
    if auto:
        ds.attrs.update(temperatures_chosen=why, temperature_scan=json.dumps(scan))
    if p.heldout is not None:
        ds = add_likelihood(ds, p, th, flags)
    stages = {"pilot": round(t_plan, 1), **{k: round(float(v), 1) for k, v in zip(STAGES, pooled["seconds"].sum(0))}}
    ds.attrs.update(attempts=len(attempts), attempt_seconds=json.dumps([round(a, 1) for a in attempts]),
                    stage_seconds=json.dumps(stages))
    return ds


MBAR_GROUPS = 16 # independent chain groups whose MBAR estimates give the cross-check's SE


def _mbar_delta_f(lg, betas, ensemble):
    """MBAR f_k - f_0 (f = -log Z; state 0 = lowest beta) from logits lg [steps, T, chains, K]."""
    import pymbar
    n_t, k = lg.shape[1], lg.shape[3]
    n_per = lg.shape[0] * lg.shape[2]
    lt = torch.as_tensor(lg.transpose(1, 0, 2, 3).reshape(-1, k))  # [T * n_per, K] grouped by state
    u_kn = np.stack([-ensemble.logp(lt, torch.full((lt.shape[0],), float(b), dtype=lt.dtype)).numpy()
                     for b in betas])
    with contextlib.redirect_stdout(io.StringIO()):
        return pymbar.MBAR(u_kn, np.full(n_t, n_per)).compute_free_energy_differences()["Delta_f"][0]


def _mbar_log_z(logits, betas, ensemble, log_z_anchor, anchor_se, tau):
    """log Z at every sweep beta from MBAR on the sweep samples, anchored at the lowest beta's AIS value. The SE
    comes from MBAR_GROUPS independent groups of chain ladders (each chain slot keeps its own replica-exchange
    ladder), not from MBAR's asymptotic covariance, which takes the thinned samples as independent and was
    2-3x too small on the 2-d neural joint system."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import pymbar  # noqa: F401  (its import prints notices)
    stride = max(1, int(math.ceil(tau)))
    lg = logits[::stride]  # roughly independent samples, at most MBAR_MAX per state
    lg = lg[:, :, : max(1, MBAR_MAX // lg.shape[0])][: MBAR_MAX]
    f = _mbar_delta_f(lg, betas, ensemble)
    b = min(MBAR_GROUPS, lg.shape[2])
    if b < 2:
        raise ValueError("MBAR's SE needs at least two chains per temperature")
    parts = np.stack([_mbar_delta_f(g, betas, ensemble) for g in np.array_split(lg, b, axis=2)])
    df = parts.std(0, ddof=1) / math.sqrt(b)
    return log_z_anchor - f, np.sqrt(df ** 2 + anchor_se ** 2)


def save_measurement(ds: xr.Dataset, path, group: str | None = None, replace: bool = False) -> str:
    """Write a measurement as a group of results file `path`: `group` (refused if it exists, unless replace)
    or the first free name measure_<ensemble>[_n], chosen under the file's lock."""
    from .results import write_group
    return write_group(path, group, ds, replace=replace, base=f"measure_{ds.attrs['ensemble']}")
