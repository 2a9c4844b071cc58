"""Sequential Monte Carlo along a path of densities on the box (paths.py: `Tempering` from uniform, `Bridge` from a
data-informed base), with one stage function for every anneal: this engine's, the data-seeded anneal's
(bridge.py) and engine ais's forward and reverse AIS (ais.py: the stage without resampling, MALA moves).

The stage (`stage`, the pilot's and the counted run's): reweight (incremental weights to the next lambda) ->
resample (systematic, per population, when its ESS falls below half its size) -> move (reflective HMC in a
diagonal metric: a coordinate leaving the box is reflected and its momentum flipped, a volume-preserving
reversible map, then Metropolis-Hastings; so each move leaves gamma_lambda on the box exactly invariant). Two phases, in this order:
1. `tune`: a pilot (one population per group) places each next lambda by bisection at a target conditional
   ESS (Zhou, Johansen & Aston 2016), with requested stops inserted exactly; at each stage it sets the metric
   (per coordinate, the smaller of the population's spread and the local scale 1 / sqrt(<g_i^2>), g the
   gradient of log gamma: by the Fisher identity a within-mode scale that ignores the gaps between modes),
   adapts the leapfrog step towards TARGET_ACCEPT and moves until the population has decorrelated from where
   the stage began (measured, `decorrelation`), at most max_moves. The `Schedule` is then frozen.
2. `run`: the counted anneal on the frozen schedule, in independent populations of `pop` consecutive chains
   (the SE's replicas). A population's running log mean weight estimates log Z (unbiased in Z for fixed
   resampling times; ESS-triggered times keep it consistent).
Chains are flat [N, D], grouped [G, n] -> [G * n]; lambdas and betas are per chain [N].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..progress import progress_bar
from .kernels import MalaInfo, Sampler, fold, mala_init, take
from .paths import Particles, resample, reweight, select, weighted_pick

TARGET_ACCEPT = 0.75   # HMC acceptance the pilot adapts the leapfrog step towards
MAX_SCALE = 1.0        # per-coordinate metric scale cap: the box's half-width
MIN_MOVES = 2


def hmc_move(path, p: Particles, lam, eps, scale, n_leap, generator):
    """One reflective-HMC transition of every chain: n_leap leapfrog steps of size eps [N] in the metric
    diag(scale^2) (scale [N, D]) on gamma_lambda (lam [N]); H = -log gamma + |rho|^2 / 2 with rho ~ N(0, I).
    Returns (particles, MalaInfo)."""
    rho = torch.randn(p.x.shape, generator=generator, device=p.x.device, dtype=p.x.dtype)
    h0 = -path.log_gamma(p, lam) + 0.5 * (rho * rho).sum(-1).double()
    es = eps[:, None] * scale
    q = p
    rho = rho + 0.5 * es * path.grad(q, lam)
    for i in range(n_leap):
        z = q.x + es * rho
        a = z + 1.0
        w = a - 4.0 * torch.floor(a * 0.25)  # fold's phase (sampling.fold): the momentum flips where w > 2
        rho = torch.where(w > 2.0, -rho, rho)
        q = path.evaluate(fold(z))
        rho = rho + (0.5 if i == n_leap - 1 else 1.0) * es * path.grad(q, lam)
    h1 = -path.log_gamma(q, lam) + 0.5 * (rho * rho).sum(-1).double()
    finite = torch.isfinite(h1)
    log_u = torch.rand(len(h0), generator=generator, device=h0.device, dtype=h0.dtype).log()
    acc = (log_u < h0 - h1) & finite
    return select(acc, q, p), MalaInfo(acc, finite)


def metric_scale(path, p: Particles, lam, logw, groups) -> torch.Tensor:
    """Per group and coordinate [G, D]: min(population std, 1 / sqrt(<g_i^2>)), weighted by logw [N], capped
    at MAX_SCALE."""
    w = torch.softmax(logw.reshape(groups, -1), -1).to(p.x.dtype)[..., None]     # [G, n, 1]
    x = p.x.reshape(groups, -1, p.x.shape[-1])
    g = path.grad(p, lam).reshape(groups, -1, p.x.shape[-1])
    mean = (w * x).sum(1, keepdim=True)
    sd = (w * (x - mean) ** 2).sum(1).sqrt()
    fisher = (w * g * g).sum(1).clamp_min(1e-12).rsqrt()
    return torch.minimum(sd, fisher).clamp(1e-4, MAX_SCALE)


def decorrelation(x0, x, logw, groups) -> torch.Tensor:
    """Per group [G]: the weighted correlation over chains between where the chains began the stage (x0) and
    where they are (x), per coordinate, averaged over coordinates [N, D]. Variance-weighted, so the slow,
    wide directions of an ill-conditioned phase dominate it (a jump measured at the local scale would be
    dominated by the fast ones); between-mode spread keeps it high, so multi-modal stages spend max_moves."""
    w = torch.softmax(logw.reshape(groups, -1), -1).to(x.dtype)[..., None]
    a, b = x0.reshape(groups, -1, x.shape[-1]), x.reshape(groups, -1, x.shape[-1])
    a = a - (w * a).sum(1, keepdim=True)
    b = b - (w * b).sum(1, keepdim=True)
    cov = (w * a * b).sum(1)
    sd = ((w * a * a).sum(1) * (w * b * b).sum(1)).sqrt().clamp_min(1e-30)
    return (cov / sd).mean(-1)


def cess(logw, inc) -> torch.Tensor:
    """Conditional ESS fraction per group of incremental log-weights inc [G, n] given log-weights logw [G, n]."""
    w = torch.softmax(logw, -1)
    inc = torch.nan_to_num(inc, nan=-math.inf)
    m = inc.max(-1, keepdim=True).values
    v = torch.exp(inc - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return (w * v).sum(-1) ** 2 / (w * v * v).sum(-1).clamp_min(1e-300)


def next_lambda(path, p: Particles, logw, lam, stop, target, groups) -> torch.Tensor:
    """Per group [G]: the largest lambda' in (lam, stop] whose conditional ESS is at least `target` (bisection);
    lam, stop: [G] float64."""
    n = len(p.x) // groups
    base = path.log_gamma(p, lam.repeat_interleave(n).to(p.x.device)).reshape(groups, -1)
    lw = logw.reshape(groups, -1)

    def ok(b):
        inc = path.log_gamma(p, b.repeat_interleave(n).to(p.x.device)).reshape(groups, -1) - base
        return cess(lw, inc) >= target
    lo, hi = lam.clone(), stop.clone()
    done = ok(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    step = torch.where(done, stop, torch.maximum(lo, lam + 1e-9 * stop.clamp_min(1.0)))
    return torch.minimum(step, stop)


@dataclass
class Schedule:
    """The pilot's frozen stages: lambdas [S, G] (every requested stop included), leapfrog step eps [S, G],
    HMC moves [S] (common to all groups), metric scale [S, G, D]; the pilot's acceptance [S, G]."""
    lambdas: np.ndarray
    eps: np.ndarray
    moves: np.ndarray
    scale: np.ndarray
    n_leap: int
    accept: np.ndarray
    shares: np.ndarray     # [G, C] share of the pilot's final weight descending from each base population


class Stage(NamedTuple):
    """What a stage leaves: particles, log-weights [N], the resampling ancestors [N] (identity where a population
    was not resampled), populations resampled, accepted fraction [N], non-finite proposals [N]."""
    particles: Particles
    logw: torch.Tensor
    ancestors: torch.Tensor
    resampled: int
    accept: torch.Tensor | None
    nonfinite: torch.Tensor | None


def stage(path, p: Particles, logw, lam, lam_new, pop, generator, move) -> Stage:
    """The SMC stage: reweight from lam to lam_new [N], resample each population of `pop` chains whose ESS fell
    below half (pop None: never, i.e. AIS), then move(p, logw) -> (particles, accepted fraction [N], non-finite
    proposals [N]). p may be any per-chain NamedTuple the path's log_gamma reads (Particles, or MalaState for
    `Tempering`)."""
    logw = reweight(path, p, logw, lam, lam_new)
    if pop is None:
        idx, n_res = torch.arange(len(logw), device=logw.device), 0
    else:
        idx, logw, n_res = resample(logw, pop, generator)
    if n_res:
        p = take(p, idx)
    p, acc, bad = move(p, logw)
    return Stage(p, logw, idx, n_res, acc, bad)


def fixed_moves(path, lam, eps, scale, n_moves, n_leap, generator):
    """The counted run's move: n_moves HMC transitions at lam [N] with frozen eps [N] and scale [N, D]."""
    def move(p, logw):
        acc = torch.zeros(len(p.x), device=p.x.device)
        bad = torch.zeros(len(p.x), device=p.x.device)
        for _ in range(n_moves):
            p, info = hmc_move(path, p, lam, eps, scale, n_leap, generator)
            acc += info.accepted.float()
            bad += (~info.finite).float()
        return p, acc / max(n_moves, 1), bad
    return move


def tune(s: Sampler, path, stops, groups, *, n_chains, target_cess, n_leap, max_moves, corr, population=(0,),
         desc="SMC pilot") -> Schedule:
    """The pilot: one population per group of n_chains; stops [P, G] ascending lambdas every group must hit
    (the last row is the end of the path); population [components]: the population of each base component."""
    generator, device, progress = s.generator, s.device, s.progress
    stops = np.asarray(stops, dtype=np.float64).reshape(-1, groups)
    n = n_chains
    x, logw, origin = path.start(n * groups, generator, device)
    p = path.evaluate(x)
    lam = torch.zeros(groups, dtype=torch.float64)
    eps = torch.ones(groups, dtype=torch.float64)
    rows = []
    k = np.zeros(groups, dtype=int)
    bar = progress_bar(total=len(stops), desc=desc, enabled=progress)
    while (k < len(stops)).any():
        stop = torch.as_tensor(stops[np.minimum(k, len(stops) - 1), np.arange(groups)])
        stop = torch.where(torch.as_tensor(k < len(stops)), stop, lam)
        new = next_lambda(path, p, logw, lam, stop, target_cess, groups)
        lam_c = new.repeat_interleave(n).to(device)
        record = {}

        def move(p, logw):  # the pilot's: set the metric, adapt the step, move until decorrelated
            nonlocal eps
            scale = metric_scale(path, p, lam_c, logw, groups)                    # [G, D]
            sc = scale.repeat_interleave(n, 0)
            x0, acc = p.x, []
            while len(acc) < max_moves:
                p, info = hmc_move(path, p, lam_c, eps.repeat_interleave(n).to(device).float(), sc, n_leap, generator)
                acc.append(info.accepted.float().reshape(groups, -1).mean(-1).double().cpu())
                eps = (eps * torch.exp(2.0 * (acc[-1] - TARGET_ACCEPT))).clamp(1e-3, 2.0)
                if len(acc) >= MIN_MOVES and bool((decorrelation(x0, p.x, logw, groups) < corr).all()):
                    break
            record.update(scale=scale, moves=len(acc), accept=torch.stack(acc).mean(0))
            return p, None, None
        out = stage(path, p, logw, lam.repeat_interleave(n).to(device), lam_c, n, generator, move)
        p, logw, origin = out.particles, out.logw, origin[out.ancestors]
        rows.append((new.numpy(), eps.numpy().copy(), record["moves"], record["scale"].cpu().numpy(),
                     record["accept"].numpy()))
        hit = (new.numpy() >= stops[np.minimum(k, len(stops) - 1), np.arange(groups)]) & (k < len(stops))
        before = int(k.min())
        k = k + hit
        bar.set_postfix(stages=len(rows), lam=f"{float(new.min()):.3g}")  # a stop can be many stages away
        bar.update(int(k.min()) - before)
        lam = new
    bar.close()
    lam_s, eps_s, moves_s, scale_s, acc_s = zip(*rows)
    w = torch.softmax(torch.nan_to_num(logw, nan=-math.inf).reshape(groups, n), -1)
    pops = torch.as_tensor(np.asarray(population), device=device)[origin].reshape(groups, n)
    shares = torch.stack([(w * (pops == j)).sum(-1) for j in range(int(max(population)) + 1)], -1)
    return Schedule(np.stack(lam_s), np.stack(eps_s), np.array(moves_s, dtype=int), np.stack(scale_s), n_leap,
                    np.stack(acc_s), shares.cpu().numpy())


@dataclass
class Result:
    """Counted SMC at every stop: per-chain log-weights whose logmeanexp over a population estimates
    log Z of gamma at the stop (relative to the start's normaliser), <E | x> and <E^2 | x>, resampled states,
    diagnostics."""
    logw: torch.Tensor       # [P, N]
    energy: torch.Tensor     # [P, N]
    energy2: torch.Tensor    # [P, N] <E^2 | x>
    particles: list          # [P] Particles at each stop (all chains)
    accept: torch.Tensor     # [P, G] mean acceptance over the stages ending at each stop
    nonfinite: torch.Tensor  # [P, G]
    resampled: int


def run(s: Sampler, path, schedule: Schedule, stops, groups, *, n_chains, pop, desc="SMC") -> Result:
    """The counted anneal on the frozen schedule: n_chains per group in populations of `pop` chains."""
    generator, device, progress = s.generator, s.device, s.progress
    stops = np.asarray(stops, dtype=np.float64).reshape(-1, groups)
    n = n_chains
    x, logw, _ = path.start(n * groups, generator, device)
    p = path.evaluate(x)
    lam = torch.zeros(n * groups, dtype=torch.float64, device=device)
    logws, energies, kept = [], [], []
    acc_sum, acc_n, bad = torch.zeros(len(stops), groups), torch.zeros(len(stops), 1), torch.zeros(len(stops), groups)
    k, n_res = 0, 0   # stops recorded so far
    for s in progress_bar(range(len(schedule.lambdas)), desc=desc, enabled=progress):
        lam_new = torch.as_tensor(schedule.lambdas[s]).repeat_interleave(n).to(device)
        eps = torch.as_tensor(schedule.eps[s], dtype=torch.float32).repeat_interleave(n).to(device)
        sc = torch.as_tensor(schedule.scale[s], dtype=p.x.dtype, device=device).repeat_interleave(n, 0)
        move = fixed_moves(path, lam_new, eps, sc, int(schedule.moves[s]), schedule.n_leap, generator)
        p, logw, _, r, acc, nb = stage(path, p, logw, lam, lam_new, pop, generator, move)
        lam = lam_new
        n_res += r
        acc_sum[k] += acc.reshape(groups, -1).mean(-1).cpu()
        bad[k] += nb.reshape(groups, -1).sum(-1).cpu()
        acc_n[k] += 1
        if np.all(schedule.lambdas[s] >= stops[k]):
            logws.append(torch.nan_to_num(logw, nan=-math.inf).clone())
            energies.append(path.energy(p, lam))
            kept.append(p)
            k += 1
            if k == len(stops):
                break
    en = torch.stack(energies)
    return Result(torch.stack(logws), en[:, 0], en[:, 1], kept, acc_sum / acc_n.clamp_min(1), bad, n_res)


def resampled_states(s: Sampler, p: Particles, logw, groups, n_keep):
    """n_keep chains per group drawn by weight, as MALA states [G * n_keep, *shape] for the sweep."""
    pick = weighted_pick(logw.reshape(groups, -1), n_keep, s.generator)
    return mala_init(s.model, s.ensemble, p.x[pick].reshape(-1, *s.shape))
