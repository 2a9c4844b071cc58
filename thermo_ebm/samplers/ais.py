"""Annealed importance sampling from the uniform distribution on the box (beta = 0) to beta_max.

Three phases, in this order:
1. `tune`: a pilot anneal (few chains, its weights discarded) adapts the reflected-MALA step size at each
   pilot beta towards the target acceptance and records Var_beta(E).
2. `make_schedule`: betas equally spaced in thermodynamic length (integral of sqrt(Var_beta E) d beta),
   with every requested sweep beta inserted exactly; step sizes interpolated from the pilot and frozen.
3. `run_forward`: the counted anneal; log-weights at each sweep beta give log Z there (with replicas).
`run_reverse` anneals sweep samples downwards between consecutive sweep betas (BDMC-style upper bound).
Both counted anneals are the SMC stage (`smc.stage`) without resampling, with `mala_moves` as the move.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..estimators import thermodynamic_length
from ..progress import progress_bar
from .kernels import MAX_STEP, MalaState, Sampler, adapt_step, mala_init, mala_step, take, uniform
from .paths import Tempering, weighted_pick
from .smc import stage


@dataclass
class Tuning:
    """Pilot anneal from uniform: step sizes and Var(E) per pilot beta (frozen before any counted run)."""
    betas: np.ndarray      # [P] pilot betas, ascending from 0
    log_step: np.ndarray   # [P] tuned log step size at each pilot beta
    var_e: np.ndarray      # [P] Var_beta(E) from the pilot chains

    def step_at(self, betas):
        return np.exp(np.interp(betas, self.betas, self.log_step))


def tune(s: Sampler, sweep_betas, *, n_chains, n_stages, n_adapt) -> Tuning:
    """Pilot anneal from uniform over n_stages geometric betas plus the sweep betas, steps adapted: a Tuning."""
    model, ensemble, generator, device = s.model, s.ensemble, s.generator, s.device
    b_max = float(np.max(sweep_betas))
    betas = np.unique(np.concatenate([[0.0], np.geomspace(b_max * 1e-5, b_max, n_stages), sweep_betas]))
    state = mala_init(model, ensemble, uniform(n_chains, s.shape, generator, device))
    step = torch.full((n_chains,), MAX_STEP, device=device)
    steps, var = [], []
    for b in progress_bar(betas, desc="tune", enabled=s.progress):
        beta = torch.full((n_chains,), float(b), device=device)
        for _ in range(n_adapt):
            state, info = mala_step(state, model, ensemble, beta, step, generator, s.kernel)
            step = adapt_step(step, info.acceptance)
        u, m2 = ensemble.energy_moments(state.logits, beta)
        steps.append(step[0])
        var.append(m2.double().mean() - u.double().mean() ** 2)
    log_step = torch.log(torch.stack(steps)).cpu().numpy().astype(np.float64)
    var_e = torch.stack(var).clamp_min(0).cpu().numpy()
    return Tuning(betas, log_step, np.nan_to_num(var_e, nan=0.0, posinf=0.0))


def path_length(tuning: Tuning):
    """Cumulative thermodynamic length L(beta) on the pilot grid."""
    return thermodynamic_length(tuning.betas, tuning.var_e)


def make_schedule(tuning: Tuning, sweep_betas, n_steps: int):
    """Ascending betas from 0 (n_steps points equally spaced in thermodynamic length, sweep betas added)."""
    L = path_length(tuning)
    targets = np.linspace(0.0, L[-1], n_steps + 1)
    betas = np.interp(targets, L, tuning.betas)
    betas = np.unique(np.concatenate([betas, sweep_betas]))
    return betas, tuning.step_at(betas)


@dataclass
class ForwardResult:
    """Forward AIS from uniform: log-weights and energies per sweep beta, resampled states, diagnostics."""
    logw: torch.Tensor           # [T, N] log-weights at each sweep beta (ascending beta order)
    energy: torch.Tensor         # [T, N] <E | x> of each chain at each sweep beta
    energy2: torch.Tensor        # [T, N] <E^2 | x>
    states: MalaState            # resampled states, [T * n_keep, ...], grouped by sweep beta
    accept: torch.Tensor         # [T] mean acceptance over the annealing segment ending at each sweep beta
    nonfinite: torch.Tensor      # [T] number of non-finite proposal densities in that segment


def mala_moves(s: Sampler, beta, step, n_steps: int):
    """The anneals' move for `smc.stage`: n_steps reflected-MALA steps at beta [N] with frozen step sizes [N];
    returns (state, acceptance [N], non-finite proposals [N]) averaged / summed over the steps."""
    def move(state, logw):
        acc = torch.zeros(len(beta), device=beta.device)
        bad = torch.zeros_like(acc)
        for _ in range(n_steps):
            state, info = mala_step(state, s.model, s.ensemble, beta, step, s.generator, s.kernel)
            acc += info.accepted.float()
            bad += (~info.finite).float()
        return state, acc / max(n_steps, 1), bad
    return move


def run_forward(s: Sampler, schedule, step_sizes, sweep_betas, *, n_chains, n_keep, mcmc_steps) -> ForwardResult:
    """Counted AIS with frozen schedule and step sizes, one `smc.stage` per beta (reweight, no resampling,
    mcmc_steps MALA steps); resamples n_keep states by weight at each sweep beta."""
    ensemble, generator, device = s.ensemble, s.generator, s.device
    path = Tempering(s)
    betas = torch.as_tensor(schedule, dtype=torch.float32, device=device)
    steps = torch.as_tensor(step_sizes, dtype=torch.float32, device=device)
    is_sweep = np.isin(schedule, sweep_betas)
    n_t = int(is_sweep.sum())
    state = mala_init(s.model, ensemble, uniform(n_chains, s.shape, generator, device))
    logw = torch.zeros(n_chains, dtype=torch.float64, device=device)
    ones = torch.ones(n_chains, device=device)
    logws, kept, energies = [], [], []
    acc_sum = torch.zeros(n_t, device=device)
    acc_n = torch.zeros(n_t, device=device)
    bad = torch.zeros(n_t, device=device)
    seg = 0
    for k in progress_bar(range(1, len(schedule)), desc="AIS", enabled=s.progress):
        b = betas[k] * ones
        st = stage(path, state, logw, betas[k - 1] * ones, b, None, generator,
                   mala_moves(s, b, steps[k] * ones, mcmc_steps))
        state, logw = st.particles, st.logw
        acc_sum[seg] += st.accept.mean()
        acc_n[seg] += 1
        bad[seg] += st.nonfinite.sum()
        if is_sweep[k]:
            lw = torch.where(torch.isnan(logw), torch.full_like(logw, -np.inf), logw)
            logws.append(lw.clone())
            energies.append(torch.stack(ensemble.energy_moments(state.logits, b)).double())
            kept.append(take(state, weighted_pick(lw[None], n_keep, generator)))
            seg += 1
    states = MalaState(*(torch.cat([getattr(s, f) for s in kept]) for f in MalaState._fields))
    en = torch.stack(energies)
    return ForwardResult(torch.stack(logws), en[:, 0], en[:, 1], states, acc_sum / acc_n.clamp_min(1), bad)


def run_reverse(s: Sampler, states: MalaState, sweep_betas, tuning: Tuning, *, n_steps):
    """Reverse AIS from sweep samples at each sweep beta down to the next lower sweep beta (or 0).

    states: [T * C] chains grouped by ascending sweep beta. All segments run at once with per-chain betas;
    segment k gets a number of intermediate betas proportional to its thermodynamic length.
    Returns reverse log-weights [T, C]: -logmeanexp over chains is a stochastic upper bound of
    log Z(beta_k) - log Z(beta_{k-1}).
    """
    device = s.device
    sweep = np.asarray(sweep_betas, dtype=np.float64)
    n_t = len(sweep)
    c = states.x.shape[0] // n_t
    lower = np.concatenate([[0.0], sweep[:-1]])
    L = path_length(tuning)
    lengths = np.interp(sweep, tuning.betas, L) - np.interp(lower, tuning.betas, L)
    m = np.maximum(np.ceil(n_steps * lengths / max(lengths.sum(), 1e-300)).astype(int), 4)
    n_max = int(m.max())
    # per segment: betas from sweep[k] down to lower[k] in m[k] steps, then held at lower[k]
    grid = np.empty((n_max + 1, n_t))
    for k in range(n_t):
        lk = np.linspace(np.interp(sweep[k], tuning.betas, L), np.interp(lower[k], tuning.betas, L), m[k] + 1)
        bk = np.interp(lk, L, tuning.betas)
        bk[0], bk[-1] = sweep[k], lower[k]
        grid[:, k] = np.concatenate([bk, np.full(n_max - m[k], lower[k])])
    steps = tuning.step_at(grid)
    betas = torch.as_tensor(np.repeat(grid, c, axis=1), dtype=torch.float32, device=device)
    steps = torch.as_tensor(np.repeat(steps, c, axis=1), dtype=torch.float32, device=device)
    logw = torch.zeros(n_t * c, dtype=torch.float64, device=device)
    state, path = states, Tempering(s)
    for j in progress_bar(range(1, n_max + 1), desc="reverse AIS", enabled=s.progress):
        st = stage(path, state, logw, betas[j - 1], betas[j], None, s.generator, mala_moves(s, betas[j], steps[j], 1))
        state, logw = st.particles, st.logw
    lw = logw.reshape(n_t, c).cpu().numpy()
    return np.where(np.isnan(lw), -np.inf, lw)
