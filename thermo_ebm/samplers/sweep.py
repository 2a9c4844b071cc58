"""Temperature-sweep chains: all temperatures in one batch with a per-chain beta, reflected MALA,
replica-exchange swaps between neighbouring temperatures, burn-in (step sizes adapted per temperature,
then frozen) and production (per-chain sums of the statistics the estimators need).
Chains are laid out [T, C] (ascending beta) and flattened to [T * C].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..progress import progress_bar
from .kernels import MAX_STEP, MIN_STEP, MalaState, Sampler, adapt_step, mala_step, take


@dataclass
class SweepResult:
    """Sweep at every temperature: per-chain statistic means, energy traces, logits, final states, rates."""
    chain_means: np.ndarray   # [T, C, S] per-chain production means of stats (see `stat_names`)
    stat_names: list
    u_trace: np.ndarray       # [n_prod, T, C] per-sample <E|x>, for autocorrelation times
    logits: np.ndarray        # [n_thin, T, C, K] thinned logits (for MBAR)
    accept: np.ndarray        # [T] production acceptance rate
    swap_accept: np.ndarray   # [T-1] swap acceptance between temperature t and t+1
    nonfinite: np.ndarray     # [T] non-finite proposal densities (burn-in + production)
    step: np.ndarray          # [T] frozen step sizes
    final: MalaState          # [T * C] final states


def _stats(ensemble, logits, beta):
    u, m2 = ensemble.energy_moments(logits, beta)
    cols = [u, m2]
    if ensemble.kind == "joint":
        p = torch.softmax(beta[:, None] * logits, dim=-1)
        h = -(p * torch.log_softmax(beta[:, None] * logits, dim=-1)).sum(-1)
        cols += [h, *p.unbind(-1)]
    return torch.stack(cols, dim=-1).double()


def stat_names(ensemble):
    """Names of the per-chain statistics the sweep averages for `ensemble`."""
    names = ["u", "m2"]
    if ensemble.kind == "joint":
        names += ["h_y_given_x"] + [f"p_{k}" for k in range(ensemble.n_classes)]
    return names


def _swap(state, ensemble, beta, n_t, c, phase, generator):
    lo_t = torch.arange(phase, n_t - 1, 2, device=beta.device)
    if len(lo_t) == 0:
        return state, None, lo_t
    lo = (lo_t[:, None] * c + torch.arange(c, device=beta.device)).reshape(-1)
    hi = lo + c
    lg = state.logits
    log_a = (ensemble.logp(lg[hi], beta[lo]) + ensemble.logp(lg[lo], beta[hi])
             - ensemble.logp(lg[lo], beta[lo]) - ensemble.logp(lg[hi], beta[hi]))
    u = torch.rand(lo.shape[0], generator=generator, device=beta.device)
    acc = torch.log(u) < log_a
    perm = torch.arange(n_t * c, device=beta.device)
    perm[lo] = torch.where(acc, hi, lo)
    perm[hi] = torch.where(acc, lo, hi)
    return take(state, perm), acc.float().reshape(-1, c).mean(1), lo_t


def run_sweep(s: Sampler, init: MalaState, betas, step0, *, n_burn, n_prod, exchange, thin) -> SweepResult:
    """betas: [T] ascending; init: [T * C] states grouped by temperature; step0: [T] initial step sizes."""
    ensemble = s.ensemble
    t = sweep_loop(s, init, betas, step0, n_burn=n_burn, n_prod=n_prod, exchange=exchange, thin=thin)
    n_t = len(betas)
    c = init.x.shape[0] // n_t
    return SweepResult(
        chain_means=(t["sums"] / n_prod).reshape(n_t, c, -1).cpu().numpy(),
        stat_names=stat_names(ensemble),
        u_trace=t["u_trace"].reshape(n_prod, n_t, c).cpu().numpy(),
        logits=t["logits"].reshape(len(t["logits"]), n_t, c, -1).cpu().double().numpy(),
        accept=(t["acc_sum"] / n_prod).cpu().numpy(),
        swap_accept=(t["swap_sum"] / t["swap_n"].clamp_min(1)).cpu().numpy()[: n_t - 1],
        nonfinite=t["bad"].cpu().numpy(),
        step=t["step"].cpu().numpy(),
        final=t["state"],
    )


def sweep_loop(s: Sampler, init: MalaState, betas, step0, *, n_burn, n_prod, exchange, thin) -> dict:
    """The step loop of `run_sweep` (same arguments; betas and step0 may already be device tensors): device
    tensors out, and nothing in the loop waits for the device (`perf.py gpu` runs it under CUDA's sync debug
    mode "error")."""
    model, ensemble, generator, device = s.model, s.ensemble, s.generator, s.device
    n_t = len(betas)
    c = init.x.shape[0] // n_t
    beta = torch.as_tensor(betas, dtype=torch.float32, device=device).repeat_interleave(c)
    step_t = torch.as_tensor(step0, dtype=torch.float32, device=device).clamp(MIN_STEP, MAX_STEP)
    state = init
    swap_sum = torch.zeros(max(n_t - 1, 1), device=device)
    swap_n = torch.zeros_like(swap_sum)
    acc_sum = torch.zeros(n_t, device=device)
    bad = torch.zeros(n_t, device=device)
    sums, u_trace, logits = None, [], []
    total = n_burn + n_prod
    for i in progress_bar(range(total), desc="sweep", enabled=s.progress):
        step = step_t.repeat_interleave(c)
        state, info = mala_step(state, model, ensemble, beta, step, generator, s.kernel)
        acc_t = info.accepted.float().reshape(n_t, c).mean(1)
        bad += (~info.finite).float().reshape(n_t, c).sum(1)
        if i < n_burn:
            step_t = adapt_step(step_t, acc_t)
        if exchange and n_t > 1:
            state, sacc, lo_t = _swap(state, ensemble, beta, n_t, c, i % 2, generator)
            if sacc is not None and i >= n_burn:
                swap_sum[lo_t] += sacc
                swap_n[lo_t] += 1
        if i >= n_burn:
            acc_sum += acc_t
            st = _stats(ensemble, state.logits, beta)
            sums = st if sums is None else sums + st
            u_trace.append(st[:, 0].float())
            if (i - n_burn) % thin == 0:
                logits.append(state.logits)
    return dict(sums=sums, u_trace=torch.stack(u_trace), logits=torch.stack(logits), acc_sum=acc_sum,
                swap_sum=swap_sum, swap_n=swap_n, bad=bad, step=step_t, state=state)
