"""Annealing from a data-informed base distribution to p_beta, at every sweep temperature at once (engine ais).

Group t anneals pi_lambda ∝ q_t^(1 - lambda) g_beta_t^lambda, lambda: 0 -> 1 (`paths.Bridge`; the base q_t, an
exactly normalised mixture of uniform, box-truncated kernels on reference states and fitted Gaussians, is
`base.KernelBase`), so its AIS weights estimate Z(beta_t) without any chain crossing a phase boundary: each chain
starts in the phase its kernel sits in, and the weights set the phases' proportions. The chains of a group form
independent populations (one per replica of the SE); a population whose weights degenerate (ESS below half its
size) is resampled (systematic resampling, an SMC sampler): chains that reached a deep, narrow region multiply
instead of leaving the estimate to one lucky weight. Pipeline, in this order:
`references` (pilot chains from data and forward-AIS states; kernel centres and widths) -> `tune_bridge`
(pilot anneal through the same stage, `smc.stage`: step sizes and Var(log g - log q) per lambda, then frozen) ->
`bridge_schedule` (lambdas equally spaced in thermodynamic length per group) -> `run_bridge` (the counted anneal:
per lambda the SMC stage `smc.stage`, reweight -> resample -> move, the move `bridge_moves` pairs of a
reflected-MALA step `paths.mala_move` and a MALA step along the fitted mixture's principal directions of the
chain's class, `subspace.subspace_move`).
Chains are laid out [G, n] (G groups = ascending sweep betas) and flattened to [G * n].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..estimators import thermodynamic_length
from ..progress import progress_bar
from .base import KernelBase
from .gaussians import directions, fit
from .kernels import MAX_STEP, MIN_STEP, MalaState, Sampler, adapt_step, mala_init, mala_step, take
from .paths import Bridge, mala_move, per_chain, reweight, weighted_pick
from .smc import stage
from .subspace import factors, subspace_move

COV_SNAPSHOTS = 12  # states per data-seeded pilot chain that enter the fitted mixture
SUB_STEP = (1e-3, 4.0)  # bounds of the subspace move's step, in units of the component's SD along a direction
DATA_STATES = 4096  # most data states whose principal directions the fitted mixture uses


@dataclass
class References:
    """Kernel centres and widths, tuned steps and the fitted Gaussian's moments, per temperature group."""
    centres: torch.Tensor   # [G, M, D] pilot chains' time averages (data-seeded first, then forward states)
    sigma: torch.Tensor     # [G, M, D] per-population, per-coordinate within-chain standard deviations
    step: np.ndarray        # [G] tuned MALA step sizes at beta_t
    gauss: tuple            # GaussMixtures fitted to the data-seeded chains' states: per predicted class, pooled


def references(s: Sampler, data, forward: MalaState, betas, step0, *, n_data, n_gauss, n_steps) -> References:
    """Pilot chains at each sweep beta from max(n_data, n_gauss) data states and from the forward-AIS states
    (grouped [G * n_f]): n_steps reflected-MALA steps, step sizes adapted per group over the first half. The
    second half of the first n_data data-seeded chains and of the forward chains gives local Gaussians:
    centre = the chain's time average, width = the within-chain standard deviation pooled over its population,
    per coordinate. A kernel centred on the local mean rather than on one sample keeps the mixture from being
    over-dispersed by a factor 2 in variance (a KL that grows linearly with the dimension). The states of all
    data-seeded chains (second half, COV_SNAPSHOTS per chain) give the fitted mixture (`gaussians.fit`): a
    low-rank-plus-diagonal Gaussian per class the model predicts (argmax of its logits), so each mode of a
    classifier's density gets its own; its error in KL shrinks with the number of chains, since a chain's states
    are strongly correlated. A second fit pools all states in one component: with its full sample covariance
    when the chains outnumber the coordinates, otherwise as above (more states resolve more directions)."""
    g = len(betas)
    d = int(np.prod(s.shape))
    n_f = forward.x.shape[0] // g
    n_seed = max(n_data, n_gauss)
    idx = torch.randint(data.shape[0], (g, n_seed), generator=s.generator, device=s.device)
    xd = data.to(s.device)[idx.reshape(-1)].reshape(g, n_seed, d)
    x = torch.cat([xd, forward.x.reshape(g, n_f, d)], 1).reshape(-1, *s.shape)
    m = n_seed + n_f
    state = mala_init(s.model, s.ensemble, x)
    beta = per_chain(betas, m, s.device)
    step_t = torch.as_tensor(step0, dtype=torch.float32, device=s.device).clamp(MIN_STEP, MAX_STEP)
    s1 = torch.zeros(g, m, d, dtype=torch.float64, device=s.device)
    s2 = torch.zeros_like(s1)
    snaps, labels = [], []
    half = n_steps // 2
    stride = max(1, (n_steps - half) // COV_SNAPSHOTS)
    for i in progress_bar(range(n_steps), desc="references", enabled=s.progress):
        state, info = mala_step(state, s.model, s.ensemble, beta, step_t.repeat_interleave(m), s.generator, s.kernel)
        if i < half:
            step_t = adapt_step(step_t, info.accepted.float().reshape(g, m).mean(1))
            continue
        xs = state.x.reshape(g, m, d).double()
        s1 += xs
        s2 += xs * xs
        if (i - half) % stride == 0 and len(snaps) < COV_SNAPSHOTS:
            snaps.append(state.x.reshape(g, m, d)[:, :n_seed].clone())
            labels.append(state.logits.reshape(g, m, -1)[:, :n_seed].argmax(-1))
    n = n_steps - half
    known = _data_directions(s, data, state.logits.shape[-1])
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0) * n / max(n - 1, 1)
    keep = torch.cat([torch.arange(n_data), torch.arange(n_seed, m)]).to(s.device)
    sig = torch.cat([var[:, :n_seed].mean(1, keepdim=True).sqrt().expand(g, n_data, d),
                     var[:, n_seed:].mean(1, keepdim=True).sqrt().expand(g, n_f, d)], 1)
    n_snap, snaps, labels = len(snaps), torch.cat(snaps, 1), torch.cat(labels, 1)
    gauss = (fit(snaps, labels, state.logits.shape[-1], per_chain=n_snap, known=known[0]),
             fit(snaps, torch.zeros_like(labels), 1, per_chain=n_snap, full=n_seed >= d, known=known[1]))
    return References(mean[:, keep], sig, step_t.cpu().numpy().astype(np.float64), gauss)


def _data_directions(s: Sampler, data, n_labels):
    """Principal directions of (at most DATA_STATES of) the data: per class the model predicts [K, D, r], and pooled
    [1, D, r] (`gaussians.directions`). The data are independent states, so they resolve the slow directions of
    each mode that the pilot's few, correlated chains cannot; `fit` takes the variance along them from the pilot."""
    n = min(DATA_STATES, data.shape[0])
    idx = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    x = data[idx].to(s.device).reshape(n, *s.shape)
    with torch.no_grad():
        labels = torch.cat([s.model(b).argmax(-1) for b in x.split(1024)])
    flat = x.reshape(n, -1)
    return directions(flat, labels, n_labels), directions(flat, torch.zeros_like(labels), 1)


def _directions(base: KernelBase):
    """The per-class fitted mixture's scaled directions for `subspace_move`, or None where it resolved none (the
    move would stand still: no evaluation is spent on it)."""
    if not base.gauss:
        return None
    dirs = factors(base.gauss[0])
    return dirs if bool(dirs.lf.abs().sum() > 0) else None


@dataclass
class BridgeTuning:
    """The pilot of the data-seeded anneal: lambdas, step sizes, the path metric and population shares."""
    lambdas: np.ndarray    # [P] pilot lambdas from 0 to 1
    log_step: np.ndarray   # [P, G] tuned log step sizes (reflected MALA)
    log_sub: np.ndarray    # [P, G] tuned log step sizes of the subspace move
    var: np.ndarray        # [P, G] Var_pi_lambda(log g - log q) (pilot chains weighted by their AIS weights)
    shares: np.ndarray     # [G, C] share of the pilot's Z estimate delivered by chains from each population

    def length(self):
        """Cumulative thermodynamic length [P, G] of each group's path."""
        return thermodynamic_length(self.lambdas, self.var)


def tune_bridge(s: Sampler, base: KernelBase, betas, step0, population, *, n_chains, n_stages,
                n_adapt) -> BridgeTuning:
    """Pilot anneal of every group on a shared lambda grid, step sizes adapted (so its weights are not
    counted). The variance that sets the schedule is taken under pi_lambda, i.e. with the pilot's AIS weights:
    chains started where the target has no mass (most uniform draws at low T) would otherwise dominate it.
    population: [M + 1] population index of each mixture component (for `shares`)."""
    g = base.groups
    dirs = _directions(base)
    sub_t = torch.ones(g, device=s.device)
    lambdas = np.unique(np.concatenate([[0.0], np.geomspace(1e-4, 1.0, n_stages)]))
    path = Bridge(s, base, betas, n_chains)
    x, lw0, comp = path.start(g * n_chains, s.generator, s.device)
    p = path.evaluate(x)
    step_t = torch.as_tensor(step0, dtype=torch.float32, device=s.device).clamp(MIN_STEP, MAX_STEP)
    logw, origin = lw0, comp  # origin: the base component each chain descends from
    steps, subs, var = [], [], []
    prev = torch.zeros(g * n_chains, dtype=torch.float64, device=s.device)
    for lam in progress_bar(lambdas, desc="tune bridge", enabled=s.progress):
        lam_t = torch.full((g * n_chains,), float(lam), dtype=torch.float64, device=s.device)
        # the schedule's variance under pi_lambda: the reweighted chains, before the stage resamples them
        w = torch.softmax(torch.nan_to_num(reweight(path, p, logw, prev, lam_t), nan=-np.inf).reshape(g, n_chains), 1)
        delta = torch.nan_to_num((p.lp - p.lq).reshape(g, n_chains), nan=-np.inf, neginf=-np.inf)
        finite = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        mean = (w * finite).sum(1, keepdim=True)
        var.append(torch.nan_to_num((w * (finite - mean) ** 2).sum(1), nan=0.0, posinf=0.0))

        def move(p, logw):  # adapt both steps to the acceptance of the chains that carry the weight
            nonlocal step_t, sub_t
            w = torch.softmax(logw.reshape(g, n_chains), 1).float()

            def carried(info):  # [G]
                return (w * info.accepted.float().reshape(g, n_chains)).sum(1)
            for _ in range(n_adapt):
                p, info = mala_move(path, p, lam_t, step_t.repeat_interleave(n_chains), s.generator, s.kernel)
                step_t = adapt_step(step_t, carried(info))
                if dirs is not None:
                    p, info = subspace_move(path, p, lam_t, sub_t.repeat_interleave(n_chains), dirs, s.generator)
                    sub_t = adapt_step(sub_t, carried(info), *SUB_STEP)
            return p, None, None
        st = stage(path, p, logw, prev, lam_t, n_chains, s.generator, move)  # the pilot is an SMC sampler too
        p, logw, origin, prev = st.particles, st.logw, origin[st.ancestors], lam_t
        steps.append(step_t.clone())
        subs.append(sub_t.clone())
    w = torch.softmax(logw.reshape(g, n_chains), 1)
    log_step = torch.log(torch.stack(steps)).cpu().numpy().astype(np.float64)
    log_sub = torch.log(torch.stack(subs)).cpu().numpy().astype(np.float64)
    pop = torch.as_tensor(population, device=s.device)[origin].reshape(g, n_chains)  # w: the final weights
    n_pop = int(max(population)) + 1
    shares = torch.stack([(w * (pop == j)).sum(1) for j in range(n_pop)], 1)
    return BridgeTuning(lambdas, log_step, log_sub, torch.stack(var).cpu().numpy(), shares.cpu().numpy())


def bridge_schedule(tuning: BridgeTuning, n_steps):
    """Per-group lambdas, n_steps[t] + 1 of them for group t equally spaced in its thermodynamic length, and the
    pilot's step sizes of both moves interpolated to them (frozen): (lam, step, sub) [K + 1, G] each, K =
    max(n_steps); a group's column stays at lambda = 1 after its last stage (`run_bridge` runs no stage there)."""
    L = tuning.length()
    g = L.shape[1]
    n_steps = np.broadcast_to(np.asarray(n_steps, dtype=int), (g,)).copy()
    lam = np.ones((int(n_steps.max()) + 1, g))
    step, sub = np.empty_like(lam), np.empty_like(lam)
    for t in range(g):
        k = n_steps[t]
        lam[:k + 1, t] = np.interp(np.linspace(0.0, L[-1, t], k + 1), L[:, t], tuning.lambdas)
        lam[0, t], lam[k:, t] = 0.0, 1.0
        step[:, t] = np.exp(np.interp(lam[:, t], tuning.lambdas, tuning.log_step[:, t]))
        sub[:, t] = np.exp(np.interp(lam[:, t], tuning.lambdas, tuning.log_sub[:, t]))
    return lam, step, sub


@dataclass
class BridgeResult:
    """The counted data-seeded anneal: log-weights, energies, p_T(y|x), resampled states, diagnostics."""
    logw: torch.Tensor       # [G, n] log-weights: log Z(beta_t) estimates relative to the normalised q_t
    energy: torch.Tensor     # [G, n] <E | x> at beta_t of each chain at the end
    energy2: torch.Tensor    # [G, n] <E^2 | x>
    p_y: torch.Tensor        # [G, n, K] p_T(y | x) (joint ensemble; K = 1 column of ones otherwise)
    states: MalaState        # [G * n_keep] states resampled by weight, grouped by beta
    accept: torch.Tensor     # [G] mean acceptance
    nonfinite: torch.Tensor  # [G] non-finite proposal densities
    resampled: float         # resampling events per population


def run_bridge(s: Sampler, base: KernelBase, betas, lam, step, sub, n_steps=None, *, n_chains, n_keep,
               pop, n_moves=1) -> BridgeResult:
    """The counted anneal from q_t to p_beta_t, group t on its frozen lambdas and step sizes of both moves
    ([K + 1, G]) for n_steps[t] stages (default: K): reweight, resample (populations of `pop` consecutive chains,
    see `resample`), move (n_moves pairs of a MALA step and a subspace move). Every group starts at lambda = 0
    together; a group that reaches lambda = 1 leaves the batch, so the anneal costs sum_t n_steps[t] group-stages,
    not G K."""
    if n_chains % pop:
        raise ValueError(f"populations of {pop} chains do not divide {n_chains} chains")
    g, n = base.groups, n_chains
    n_steps = np.broadcast_to(np.asarray(lam.shape[0] - 1 if n_steps is None else n_steps, dtype=int), (g,)).copy()
    idx = np.arange(g)   # the groups in the batch
    path, dirs, lam_t, step_t, sub_t = _batch(s, base, betas, idx, lam, step, sub, n)
    x, logw, _ = path.start(g * n, s.generator, s.device, block=pop)  # each population holds the base's mix
    p = path.evaluate(x)
    acc_sum = torch.zeros(g, device=s.device)
    bad = torch.zeros(g, device=s.device)
    done = {}  # group -> (log-weights, <E | x>, <E^2 | x>, p_T(y | x), x) at lambda = 1
    resampled = 0

    def moves(k):  # n_moves x (a MALA step, then, where the base resolves directions, a subspace move) at lambda_k
        def move(p, logw):
            acc, bad = 0.0, 0.0
            for _ in range(n_moves):
                p, info = mala_move(path, p, lam_t[k], step_t[k], s.generator, s.kernel)
                acc, bad = acc + info.accepted.float(), bad + (~info.finite).float()
                if dirs is not None:
                    p, sub_info = subspace_move(path, p, lam_t[k], sub_t[k], dirs, s.generator)
                    bad = bad + (~sub_info.finite).float()
            return p, acc / n_moves, bad
        return move
    bar = progress_bar(total=int(n_steps.sum()), desc="bridge SMC", enabled=s.progress)
    for k in range(1, lam.shape[0]):
        st = stage(path, p, logw, lam_t[k - 1], lam_t[k], pop, s.generator, moves(k))
        p, logw, resampled = st.particles, st.logw, resampled + st.resampled
        acc_sum[idx] += st.accept.reshape(len(idx), n).mean(1)
        bad[idx] += st.nonfinite.reshape(len(idx), n).sum(1)
        bar.update(len(idx))
        leave = n_steps[idx] == k
        if not leave.any():
            continue
        e, e2 = path.energy(p, lam_t[k])
        p_y = (torch.softmax(path.beta[:, None] * p.logits, -1) if s.ensemble.kind == "joint"
               else torch.ones_like(p.logits[:, :1]))
        lw = torch.where(torch.isnan(logw), torch.full_like(logw, -np.inf), logw)
        for j in np.flatnonzero(leave):
            rows = slice(j * n, (j + 1) * n)
            done[int(idx[j])] = (lw[rows], e[rows], e2[rows], p_y[rows].double(), p.x[rows])
        if leave.all():
            break
        keep = torch.as_tensor(np.repeat(~leave, n), device=s.device)
        idx = idx[~leave]
        p, logw = take(p, keep.nonzero()[:, 0]), logw[keep]
        path, dirs, lam_t, step_t, sub_t = _batch(s, base, betas, idx, lam, step, sub, n)
    bar.close()
    lw, e, e2, p_y, xs = (torch.stack(v) for v in zip(*(done[t] for t in range(g))))
    kept = mala_init(s.model, s.ensemble, xs.reshape(g * n, -1)[weighted_pick(lw, n_keep, s.generator)]
                     .reshape(-1, *s.shape))
    return BridgeResult(lw, e, e2, p_y, kept, acc_sum / torch.as_tensor(n_steps, device=s.device).clamp_min(1),
                        bad, resampled / (g * n // pop))


def _batch(s: Sampler, base: KernelBase, betas, idx, lam, step, sub, n):
    """The path of the groups idx [G'] (the base's rows), the fitted directions of the subspace move, and their
    frozen lambdas and step sizes per chain [K + 1, G' n]."""
    b = base if len(idx) == base.groups else base.take(torch.as_tensor(idx, device=base.centres.device))

    def per(a, dtype):
        return torch.as_tensor(np.repeat(a[:, idx], n, axis=1), dtype=dtype, device=s.device)
    return (Bridge(s, b, np.asarray(betas)[idx], n), _directions(b), per(lam, torch.float64), per(step, torch.float32),
            per(sub, torch.float32))
