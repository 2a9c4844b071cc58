"""Temperature-sweep chains: all temperatures in one batch with a per-chain beta, reflected MALA,
replica-exchange swaps between neighbouring temperatures, burn-in (step sizes adapted per temperature,
then frozen) and production (per-chain sums of the statistics the estimators need, in chunks of CHUNK steps).
A sweep that is short against tau_E runs on at its frozen steps and drops its first chunks as more burn-in
(`sweep_length`). Chains are laid out [T, C] (ascending beta) and flattened to [T * C].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..estimators import integrated_autocorr_time
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
    length: "SweepLength"     # the burn-in and kept production steps it ran


CHUNK = 25  # production steps per partial sum: the unit in which a sweep's first steps can be dropped
MARGIN = 1.5  # a sweep run on aims at MARGIN x the poor-mixing thresholds (10 tau_E kept, 5 tau_E burn-in)


@dataclass(frozen=True)
class SweepLength:
    """Steps per chain before the kept samples (the adapted burn-in plus dropped production) and kept samples."""
    burn_in: int
    samples: int


def sweep_length(u_trace, n_burn: int, n_prod: int, most: int) -> SweepLength:
    """How long a sweep with production trace u_trace [n_prod, T, C] should run: as it is when every temperature
    has 10 tau_E samples and 5 tau_E burn-in; else MARGIN x both, its first production steps (whole chunks) dropped
    as burn-in, with at most `most` production steps in all (then at least n_prod kept)."""
    tau = max(integrated_autocorr_time(u_trace[:, t, :]) for t in range(u_trace.shape[1]))
    if not np.isfinite(tau) or (n_prod >= 10 * tau and n_burn >= 5 * tau):
        return SweepLength(n_burn, n_prod)
    drop = CHUNK * int(np.ceil(max(0.0, MARGIN * 5 * tau - n_burn) / CHUNK))
    total = min(max(most, n_prod), max(n_prod, drop + int(np.ceil(MARGIN * 10 * tau))))
    drop = min(drop, CHUNK * ((total - n_prod) // CHUNK)) if total - drop < n_prod else drop
    return SweepLength(n_burn + drop, total - drop)


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


def run_sweep(s: Sampler, init: MalaState, betas, step0, *, n_burn, n_prod, exchange, thin, most=None,
              agree=None) -> SweepResult:
    """betas: [T] ascending; init: [T * C] states grouped by temperature; step0: [T] initial step sizes. most: the
    most production steps a sweep short against tau_E may run (`sweep_length`; None: n_prod, as asked); agree:
    maps this sweep's SweepLength to the one to run (e.g. the first shard's, so that shards pool)."""
    n_t = len(betas)
    c = init.x.shape[0] // n_t
    t = sweep_loop(s, init, betas, step0, n_burn=n_burn, n_prod=n_prod, exchange=exchange, thin=thin)
    length = SweepLength(n_burn, n_prod)
    if most is not None and most > n_prod:
        length = sweep_length(t["u_trace"].reshape(n_prod, n_t, c).cpu().numpy(), n_burn, n_prod, most)
    if agree is not None:
        length = agree(length)
    more = length.burn_in + length.samples - n_burn - n_prod
    if more > 0:
        t = _go_on(s, t, betas, more, exchange, thin)
    n_prod = n_prod + max(more, 0)
    drop = min(start for start in t["starts"] if start >= length.burn_in - n_burn)  # a chunk's first step
    keep = [i for i, start in enumerate(t["starts"]) if start >= drop]
    length = SweepLength(n_burn + drop, n_prod - drop)
    return SweepResult(
        chain_means=(sum(t["chunks"][i] for i in keep) / (n_prod - drop)).reshape(n_t, c, -1).cpu().numpy(),
        stat_names=stat_names(s.ensemble),
        u_trace=t["u_trace"][drop:].reshape(n_prod - drop, n_t, c).cpu().numpy(),
        logits=t["logits"][torch.as_tensor(np.flatnonzero(t["logit_steps"] >= drop), device=t["logits"].device)]
        .reshape(-1, n_t, c, t["logits"].shape[-1]).cpu().double().numpy(),
        accept=(t["acc_sum"] / n_prod).cpu().numpy(),
        swap_accept=(t["swap_sum"] / t["swap_n"].clamp_min(1)).cpu().numpy()[: n_t - 1],
        nonfinite=t["bad"].cpu().numpy(),
        step=t["step"].cpu().numpy(),
        final=t["state"],
        length=length,
    )


def _go_on(s: Sampler, t: dict, betas, n_more: int, exchange, thin) -> dict:
    """`sweep_loop`'s output t run on by n_more production steps at its frozen step sizes."""
    u = sweep_loop(s, t["state"], betas, t["step"], n_burn=0, n_prod=n_more, exchange=exchange, thin=thin)
    n_prod = t["u_trace"].shape[0]
    return dict(chunks=t["chunks"] + u["chunks"], starts=t["starts"] + [n_prod + k for k in u["starts"]],
                u_trace=torch.cat([t["u_trace"], u["u_trace"]]), logits=torch.cat([t["logits"], u["logits"]]),
                logit_steps=np.concatenate([t["logit_steps"], n_prod + u["logit_steps"]]),
                **{k: t[k] + u[k] for k in ("acc_sum", "swap_sum", "swap_n", "bad")}, step=t["step"],
                state=u["state"])


def sweep_loop(s: Sampler, init: MalaState, betas, step0, *, n_burn, n_prod, exchange, thin) -> dict:
    """The step loop of `run_sweep` (same arguments; betas and step0 may already be device tensors): device
    tensors out (the statistics' sums over each chunk of CHUNK production steps, `chunks`, from the steps
    `starts`), and nothing in the loop waits for the device (`perf.py gpu` runs it under CUDA's sync debug
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
    chunks, starts, u_trace, logits = [], [], [], []
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
            if (i - n_burn) % CHUNK == 0:
                chunks.append(st)
                starts.append(i - n_burn)
            else:
                chunks[-1] = chunks[-1] + st
            u_trace.append(st[:, 0].float())
            if (i - n_burn) % thin == 0:
                logits.append(state.logits)
    return dict(chunks=chunks, starts=starts, u_trace=torch.stack(u_trace), logits=torch.stack(logits),
                logit_steps=np.arange(0, n_prod, thin),
                acc_sum=acc_sum, swap_sum=swap_sum, swap_n=swap_n, bad=bad, step=step_t, state=state)
