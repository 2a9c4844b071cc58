"""Annealing from a data-informed base distribution to p_beta, at every sweep temperature at once.

Base of temperature group t (an exactly normalised density):
    q_t(x) = w_u 2^-D 1_box(x) + sum_m w_m prod_i TN(x_i; mu_tmi, sigma_tmi) + w_g N(x; m_t, Sigma_t)
uniform mixed with box-truncated Gaussian kernels on M reference states (states of the low-temperature phase
seeded from data, and states that annealing from uniform reached) and a full-covariance Gaussian fitted to the
data-seeded reference chains (normalised on R^D: a draw outside the box starts with weight 0, since the target
is 0 there; ill-conditioned, correlated targets then cost a short path rather than one that grows with their
information). Group t anneals
    pi_lambda ∝ q_t^(1 - lambda) g_beta_t^lambda,  lambda: 0 -> 1,
so its AIS weights estimate Z(beta_t) without any chain crossing a phase boundary: each chain starts in the
phase its kernel sits in, and the weights set the phases' proportions. The chains of a group form independent
populations (one per replica of the SE); a population whose weights degenerate (ESS below half its size) is
resampled (systematic resampling, an SMC sampler): chains that reached a deep, narrow region multiply instead of
leaving the estimate to one lucky weight. Pipeline, in this order:
`references` (pilot chains from data and forward-AIS states; kernel centres and widths) -> `tune_bridge`
(pilot anneal: step sizes and Var(log g - log q) per lambda, then frozen) -> `bridge_schedule` (lambdas equally
spaced in thermodynamic length per group) -> `run_bridge` (the counted anneal).
Chains are laid out [G, n] (G groups = ascending sweep betas) and flattened to [G * n].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .estimators import thermodynamic_length
from .gaussians import fit
from .progress import progress_bar
from .sampling import EAGER, MAX_STEP, MIN_STEP, MalaInfo, MalaState, adapt_step, evaluate, mala_init, mala_step, take, uniform

SIGMA_FLOOR = 1e-3
RESAMPLE_ESS = 0.5  # a population is resampled when its ESS falls below this fraction of its size
COV_SNAPSHOTS = 12  # states per data-seeded pilot chain that enter the fitted mixture


@dataclass
class KernelBase:
    """q_t per group t: kernel centres and widths [G, M, D], fitted Gaussian mixtures (gaussians.GaussMixture,
    normalised on R^D; none or several) and mixture weights [G, M + F + 1] (kernels, one column per fitted
    mixture, uniform last)."""
    centres: torch.Tensor
    sigma: torch.Tensor
    weights: torch.Tensor
    gauss: tuple = ()

    def __post_init__(self):
        mu, sig = self.centres.double(), self.sigma.double().clamp_min(SIGMA_FLOOR)
        self.centres, self.sigma = mu, sig
        g, m, d = mu.shape
        w = self.weights.double().to(mu.device)
        self.weights = w / w.sum(-1, keepdim=True)
        self.gauss = tuple(self.gauss)
        if w.shape[-1] != m + 1 + len(self.gauss):
            raise ValueError(f"weights need {m + 1 + len(self.gauss)} columns, got {w.shape[-1]}")
        inv = 1.0 / (sig * sig)
        self._a, self._b = inv, mu * inv                                  # [G, M, D]
        self._c = (mu * mu * inv).sum(-1)                                 # [G, M]
        r2 = math.sqrt(2.0)
        mass = 0.5 * (torch.erf((1 - mu) / (sig * r2)) - torch.erf((-1 - mu) / (sig * r2)))
        log_norm = (-(torch.log(sig) + 0.5 * math.log(2 * math.pi)) - torch.log(mass)).sum(-1)
        self._log_k = torch.log(self.weights[:, :m]) + log_norm            # [G, M]
        self._log_u = torch.log(self.weights[:, -1]) - d * math.log(2.0)   # [G]

    @property
    def groups(self):
        return self.centres.shape[0]

    def log_prob(self, x):
        """log q(x) [N] and its gradient [N, D] (float64); x: [G * n, D] grouped as the chains, in the box."""
        g, m, d = self.centres.shape
        xg = x.double().reshape(g, -1, d)
        quad = (torch.bmm(xg * xg, self._a.transpose(1, 2)) - 2.0 * torch.bmm(xg, self._b.transpose(1, 2))
                + self._c[:, None, :])                                    # [G, n, M]
        comps = [self._log_k[:, None, :] - 0.5 * quad, self._log_u[:, None, None].expand(g, xg.shape[1], 1)]
        solved = []
        for f, mix in enumerate(self.gauss):
            log_g, t = mix.log_components(xg)                             # [G, n, C_f]
            comps.append(torch.log(self.weights[:, m + f])[:, None, None] + log_g)
            solved.append(t)
        logc = torch.cat(comps, -1)
        logq = torch.logsumexp(logc, -1)                                  # [G, n]
        r = torch.exp(logc - logq[..., None])                             # responsibilities
        rk = r[..., :m]
        grad = torch.bmm(rk, self._b) - xg * torch.bmm(rk, self._a)
        col = m + 1
        for mix, t in zip(self.gauss, solved):
            grad = grad + mix.gradient(xg, r[..., col:col + mix.components], t)
            col += mix.components
        return logq.reshape(-1), grad.reshape(-1, d)

    def sample(self, n: int, generator):
        """n exact draws from each q_t: x [G * n, D] float64, grouped, and their population [G, n] (M: the
        fitted mixture when there is one, the last: uniform). Draws of the fitted mixture may lie outside the box."""
        g, m, d = self.centres.shape
        dev = self.centres.device
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        k = comp.clamp_max(m - 1)
        mu = torch.gather(self.centres, 1, k[..., None].expand(g, n, d))
        sig = torch.gather(self.sigma, 1, k[..., None].expand(g, n, d))
        lo, hi = torch.special.ndtr((-1 - mu) / sig), torch.special.ndtr((1 - mu) / sig)
        u = torch.rand((g, n, d), generator=generator, device=dev, dtype=torch.float64)
        x = (mu + sig * torch.special.ndtri(lo + u * (hi - lo))).clamp(-1.0, 1.0)
        xu = uniform(g * n, (d,), generator, dev).double().reshape(g, n, d)
        x = torch.where((comp == self.weights.shape[-1] - 1)[..., None], xu, x)
        for f, mix in enumerate(self.gauss):
            which = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
            x = torch.where((comp == m + f)[..., None], mix.sample(which, generator), x)
        return x.reshape(g * n, d), comp


def start_states(base: KernelBase, n: int, generator, shape):
    """Draws of q_t as chain states [G * n, *shape] (float32, in the box) and their initial log-weights [G * n]
    (0, or -inf for a Gaussian draw outside the box, where the target has no mass), and their components."""
    x, comp = base.sample(n, generator)
    inside = (x.abs() <= 1.0).all(-1)
    lw0 = torch.where(inside, torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], -math.inf))
    return x.clamp(-1.0, 1.0).float().reshape(-1, *shape), lw0, comp


def population_weights(sizes, shares, floor):
    """Mixture weights [G, M + 1] giving population j (sizes[j] consecutive kernels, then the uniform last)
    the share shares[:, j] (floored at `floor`, renormalised), split equally over its kernels."""
    shares = np.maximum(np.asarray(shares, dtype=np.float64), floor)
    shares = shares / shares.sum(-1, keepdims=True)
    cols = [np.repeat(shares[:, j:j + 1] / max(n, 1), n, axis=1) for j, n in enumerate(sizes)]
    return torch.as_tensor(np.concatenate(cols, 1))


def resample(logw, pop: int, generator):
    """SMC resampling step. logw: [N] float64 log-weights of populations of `pop` consecutive chains. A
    population whose ESS is below RESAMPLE_ESS * pop is resampled systematically, and each of its chains then
    carries the population's log mean weight, so that logmeanexp over a population stays its running, unbiased
    estimate of Z (for fixed resampling times; ESS-triggered times keep it consistent).
    Returns (indices [N] of the chains to continue, log-weights [N], number of populations resampled)."""
    lw = torch.nan_to_num(logw, nan=-math.inf, neginf=-math.inf).reshape(-1, pop)
    top = lw.max(-1, keepdim=True).values
    alive = torch.isfinite(top[:, 0])
    w = torch.exp(lw - torch.where(alive[:, None], top, torch.zeros_like(top)))
    w = w / w.sum(-1, keepdim=True)
    need = alive & (1.0 / (w * w).sum(-1) < RESAMPLE_ESS * pop)
    idx = torch.arange(lw.numel(), device=lw.device).reshape(-1, pop)
    n_need = int(need.sum())
    if n_need:
        cdf = torch.cumsum(w[need], -1)
        cdf[:, -1] = 1.0
        u = (torch.rand((n_need, 1), generator=generator, device=lw.device, dtype=lw.dtype)
             + torch.arange(pop, device=lw.device, dtype=lw.dtype)) / pop
        j = torch.searchsorted(cdf, u).clamp_max(pop - 1)
        idx[need] = torch.gather(idx[need], 1, j)
        lw = lw.clone()
        lw[need] = (torch.logsumexp(lw[need], -1, keepdim=True) - math.log(pop)).expand(-1, pop)
    return idx.reshape(-1), lw.reshape(-1), n_need


class BridgeState(NamedTuple):
    """A chain of the data-seeded anneal: the MALA state plus log q and its gradient (float64)."""
    x: torch.Tensor       # [N, *shape]
    logits: torch.Tensor  # [N, K]
    ugrad: torch.Tensor   # [N, *shape] gradient of the ensemble's unit potential
    log_q: torch.Tensor   # [N] float64
    qgrad: torch.Tensor   # [N, D] float64


def bridge_init(model, ensemble, base: KernelBase, x) -> BridgeState:
    """BridgeState of states x [N, *shape] (logits, potential gradient, log q and its gradient)."""
    logits, g = evaluate(model, ensemble, x)
    lq, qg = base.log_prob(x.reshape(x.shape[0], -1))
    return BridgeState(x.detach(), logits, g, lq, qg)


def log_target(ensemble, logits, log_q, lam, beta):
    """log pi_lambda = (1 - lambda) log q + lambda log g_beta; [N] float64."""
    return (1.0 - lam) * log_q + lam * ensemble.logp(logits, beta).double()


def _drift(state, lam, beta):
    n = state.x.shape[0]
    return ((1.0 - lam)[:, None] * state.qgrad
            + (lam * beta)[:, None].double() * state.ugrad.reshape(n, -1).double()).float()


def bridge_step(state: BridgeState, model, ensemble, base, lam, beta, step, generator, kernel=EAGER):
    """One reflected-MALA step on pi_lambda (lam, beta, step: [N]); MH-exact (the drift for the joint
    ensemble is the approximate one the sampler uses, as in mala_step). Returns (state, MalaInfo)."""
    n = state.x.shape[0]
    x = state.x.reshape(n, -1)
    s, one = step[:, None], torch.ones_like(step)[:, None]
    lam64 = lam.double()
    dx = _drift(state, lam64, beta)
    y = kernel.propose(x, dx, s, one, kernel.noise(x, generator))
    new = bridge_init(model, ensemble, base, y.reshape(state.x.shape))
    dy = _drift(new, lam64, beta)
    lp_y = log_target(ensemble, new.logits, new.log_q, lam64, beta)
    lp_x = log_target(ensemble, state.logits, state.log_q, lam64, beta)
    log_u = torch.rand(n, generator=generator, device=x.device, dtype=x.dtype).log()
    finite = torch.isfinite(lp_y)
    _, _, acc = kernel.accept(x, y, dx, dy, s, one, (lp_y - lp_x).float(), log_u, finite)
    out = BridgeState(*(torch.where(acc.reshape(-1, *[1] * (a.ndim - 1)), b, a) for a, b in zip(state, new)))
    return out, MalaInfo(acc, finite)


def _group_tensor(values, n, device, dtype=torch.float32):
    """[G] per-group values -> [G * n] per-chain tensor."""
    return torch.as_tensor(np.repeat(np.asarray(values, dtype=np.float64), n), dtype=dtype, device=device)


@dataclass
class References:
    """Kernel centres and widths, tuned steps and the fitted Gaussian's moments, per temperature group."""
    centres: torch.Tensor   # [G, M, D] pilot chains' time averages (data-seeded first, then forward states)
    sigma: torch.Tensor     # [G, M, D] per-population, per-coordinate within-chain standard deviations
    step: np.ndarray        # [G] tuned MALA step sizes at beta_t
    gauss: tuple            # GaussMixtures fitted to the data-seeded chains' states: per predicted class, pooled


def references(model, ensemble, shape, data, forward: MalaState, betas, step0, *, n_data, n_gauss, n_steps,
               generator, device, kernel=EAGER, progress=False) -> References:
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
    d = int(np.prod(shape))
    n_f = forward.x.shape[0] // g
    n_seed = max(n_data, n_gauss)
    idx = torch.randint(data.shape[0], (g, n_seed), generator=generator, device=device)
    xd = data.to(device)[idx.reshape(-1)].reshape(g, n_seed, d)
    x = torch.cat([xd, forward.x.reshape(g, n_f, d)], 1).reshape(-1, *shape)
    m = n_seed + n_f
    state = mala_init(model, ensemble, x)
    beta = _group_tensor(betas, m, device)
    step_t = torch.as_tensor(step0, dtype=torch.float32, device=device).clamp(MIN_STEP, MAX_STEP)
    s1 = torch.zeros(g, m, d, dtype=torch.float64, device=device)
    s2 = torch.zeros_like(s1)
    snaps, labels = [], []
    half = n_steps // 2
    stride = max(1, (n_steps - half) // COV_SNAPSHOTS)
    for i in progress_bar(range(n_steps), desc="references", enabled=progress):
        state, info = mala_step(state, model, ensemble, beta, step_t.repeat_interleave(m), generator, kernel)
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
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0) * n / max(n - 1, 1)
    keep = torch.cat([torch.arange(n_data), torch.arange(n_seed, m)]).to(device)
    sig = torch.cat([var[:, :n_seed].mean(1, keepdim=True).sqrt().expand(g, n_data, d),
                     var[:, n_seed:].mean(1, keepdim=True).sqrt().expand(g, n_f, d)], 1)
    per_chain, snaps, labels = len(snaps), torch.cat(snaps, 1), torch.cat(labels, 1)
    gauss = (fit(snaps, labels, state.logits.shape[-1], per_chain=per_chain),
             fit(snaps, torch.zeros_like(labels), 1, per_chain=per_chain, full=n_seed >= d))
    return References(mean[:, keep], sig, step_t.cpu().numpy().astype(np.float64), gauss)


@dataclass
class BridgeTuning:
    """The pilot of the data-seeded anneal: lambdas, step sizes, the path metric and population shares."""
    lambdas: np.ndarray    # [P] pilot lambdas from 0 to 1
    log_step: np.ndarray   # [P, G] tuned log step sizes
    var: np.ndarray        # [P, G] Var_pi_lambda(log g - log q) (pilot chains weighted by their AIS weights)
    shares: np.ndarray     # [G, C] share of the pilot's Z estimate delivered by chains from each population

    def length(self):
        """Cumulative thermodynamic length [P, G] of each group's path."""
        return thermodynamic_length(self.lambdas, self.var)


def tune_bridge(model, ensemble, shape, base: KernelBase, betas, step0, population, *, n_chains, n_stages,
                n_adapt, generator, device, kernel=EAGER, progress=False) -> BridgeTuning:
    """Pilot anneal of every group on a shared lambda grid, step sizes adapted (so its weights are not
    counted). The variance that sets the schedule is taken under pi_lambda, i.e. with the pilot's AIS weights:
    chains started where the target has no mass (most uniform draws at low T) would otherwise dominate it.
    population: [M + 1] population index of each mixture component (for `shares`)."""
    g = base.groups
    lambdas = np.unique(np.concatenate([[0.0], np.geomspace(1e-4, 1.0, n_stages)]))
    x, lw0, comp = start_states(base, n_chains, generator, shape)
    state = bridge_init(model, ensemble, base, x)
    beta = _group_tensor(betas, n_chains, device)
    step_t = torch.as_tensor(step0, dtype=torch.float32, device=device).clamp(MIN_STEP, MAX_STEP)
    logw = lw0.reshape(g, n_chains).clone()
    origin = comp.reshape(-1)  # the base component each chain descends from
    steps, var = [], []
    prev = 0.0
    for lam in progress_bar(lambdas, desc="tune bridge", enabled=progress):
        delta = torch.nan_to_num((ensemble.logp(state.logits, beta).double() - state.log_q).reshape(g, n_chains),
                                 nan=-np.inf, neginf=-np.inf)
        logw += (lam - prev) * delta
        prev = lam
        w = torch.softmax(torch.nan_to_num(logw, nan=-np.inf, neginf=-np.inf), 1)
        finite = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        mean = (w * finite).sum(1, keepdim=True)
        var.append(torch.nan_to_num((w * (finite - mean) ** 2).sum(1), nan=0.0, posinf=0.0))
        idx, lw, _ = resample(logw.reshape(-1), n_chains, generator)  # the pilot is an SMC sampler too
        state, origin, logw = take(state, idx), origin[idx], lw.reshape(g, n_chains)
        w = torch.softmax(logw, 1)
        lam_t = torch.full((g * n_chains,), float(lam), device=device)
        for _ in range(n_adapt):  # acceptance of the chains that carry the weight sets the step
            state, info = bridge_step(state, model, ensemble, base, lam_t, beta,
                                      step_t.repeat_interleave(n_chains), generator, kernel)
            step_t = adapt_step(step_t, (w.float() * info.accepted.float().reshape(g, n_chains)).sum(1))
        steps.append(step_t.clone())
    log_step = torch.log(torch.stack(steps)).cpu().numpy().astype(np.float64)
    pop = torch.as_tensor(population, device=device)[origin].reshape(g, n_chains)  # w: the final weights
    n_pop = int(max(population)) + 1
    shares = torch.stack([(w * (pop == j)).sum(1) for j in range(n_pop)], 1)
    return BridgeTuning(lambdas, log_step, torch.stack(var).cpu().numpy(), shares.cpu().numpy())


def bridge_schedule(tuning: BridgeTuning, n_steps: int):
    """Per-group lambdas [n_steps + 1, G], equally spaced in that group's thermodynamic length, and the
    pilot's step sizes interpolated to them (frozen)."""
    L = tuning.length()
    g = L.shape[1]
    lam = np.empty((n_steps + 1, g))
    step = np.empty_like(lam)
    for t in range(g):
        lam[:, t] = np.interp(np.linspace(0.0, L[-1, t], n_steps + 1), L[:, t], tuning.lambdas)
        lam[0, t], lam[-1, t] = 0.0, 1.0
        step[:, t] = np.exp(np.interp(lam[:, t], tuning.lambdas, tuning.log_step[:, t]))
    return lam, step


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


def run_bridge(model, ensemble, shape, base: KernelBase, betas, lam, step, *, n_chains, n_keep, pop, generator,
               device, kernel=EAGER, progress=False) -> BridgeResult:
    """The counted anneal from q_t to p_beta_t for every group, with frozen lambdas and step sizes [K+1, G]:
    reweight, resample (populations of `pop` consecutive chains, see `resample`), move."""
    if n_chains % pop:
        raise ValueError(f"populations of {pop} chains do not divide {n_chains} chains")
    g = base.groups
    x, logw, _ = start_states(base, n_chains, generator, shape)
    state = bridge_init(model, ensemble, base, x)
    beta = _group_tensor(betas, n_chains, device)
    lam_t = torch.as_tensor(np.repeat(lam, n_chains, axis=1), dtype=torch.float64, device=device)
    step_t = torch.as_tensor(np.repeat(step, n_chains, axis=1), dtype=torch.float32, device=device)
    acc_sum = torch.zeros(g, device=device)
    bad = torch.zeros(g, device=device)
    resampled = 0
    for k in progress_bar(range(1, lam.shape[0]), desc="bridge SMC", enabled=progress):
        logw += (lam_t[k] - lam_t[k - 1]) * (ensemble.logp(state.logits, beta).double() - state.log_q)
        idx, logw, n_res = resample(logw, pop, generator)
        if n_res:
            state, resampled = take(state, idx), resampled + n_res
        state, info = bridge_step(state, model, ensemble, base, lam_t[k], beta, step_t[k], generator, kernel)
        acc_sum += info.accepted.float().reshape(g, n_chains).mean(1)
        bad += (~info.finite).float().reshape(g, n_chains).sum(1)
    lw = torch.where(torch.isnan(logw), torch.full_like(logw, -np.inf), logw).reshape(g, n_chains)
    e, e2 = ensemble.energy_moments(state.logits, beta)
    p_y = (torch.softmax(beta[:, None] * state.logits, -1) if ensemble.kind == "joint"
           else torch.ones_like(state.logits[:, :1]))
    idx = torch.multinomial(torch.softmax(lw, 1).float(), n_keep, replacement=True, generator=generator)
    idx = (idx + n_chains * torch.arange(g, device=device)[:, None]).reshape(-1)
    kept = take(MalaState(state.x, state.logits, state.ugrad), idx)
    return BridgeResult(lw, e.double().reshape(g, -1), e2.double().reshape(g, -1),
                        p_y.double().reshape(g, n_chains, -1), kept,
                        acc_sum / max(lam.shape[0] - 1, 1), bad, resampled / (g * n_chains // pop))
