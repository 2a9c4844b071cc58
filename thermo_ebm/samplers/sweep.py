"""Temperature-sweep chains: all temperatures in one batch with a per-chain beta, reflected MALA,
replica-exchange swaps between neighbouring temperatures, burn-in (step sizes adapted per temperature,
then frozen) and production (per-chain sums of the statistics the estimators need, in chunks of CHUNK steps).
Optionally, where neighbouring temperatures are too far apart for swaps to be accepted, helper temperatures are
inserted between them (`ladder`): their chains only carry states along the ladder and are not reported.
A sweep that is short against tau_E runs on at its frozen steps and drops its first chunks as more burn-in
(`sweep_length`). Chains are laid out [T, C] (ascending beta) and flattened to [T * C].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import log_ndtr, ndtr

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
    swap_accept: np.ndarray   # [T-1] swap acceptance between temperature t and t+1 (with helpers: the lowest on
                              # the ladder between them)
    helpers: np.ndarray       # [T-1] helper temperatures inserted between temperature t and t+1
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


def swap_acceptance(beta_a, beta_b, u_a, u_b, var_a, var_b):
    """Predicted replica-exchange acceptance E[min(1, exp(log a))] between inverse temperatures beta_a and beta_b
    (arrays broadcast), to first order in the gap: log a = (beta_a - beta_b) (u(x_a) - u(x_b)) with u = <E | x>
    (d log p_beta(x) / d beta = -u for both ensembles) Gaussian across states, mean u_t and variance var_t at each
    end. The mean of log a is taken as -|(beta_a - beta_b)(u_a - u_b)| (U falls as beta rises)."""
    db = np.abs(np.asarray(beta_a, np.float64) - beta_b)
    mu = -np.abs(db * (np.asarray(u_a, np.float64) - u_b))
    s = db * np.sqrt(np.maximum(np.asarray(var_a, np.float64) + var_b, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = mu / s
        acc = ndtr(r) + np.exp(mu + s * s / 2 + log_ndtr(-r - s))
    return np.where(s > 0, np.clip(acc, 0.0, 1.0), np.exp(mu))


JUMP = 1.5  # a gap whose U changes by more than this x max(Var) x its beta width holds a phase transition


def transitions(betas, u, var) -> np.ndarray:
    """[T - 1] gaps between neighbouring betas (ascending) across which U jumps: within one phase U changes by
    dU = -Var(u) dbeta, so |U_b - U_a| <= max(var_a, var_b) |beta_b - beta_a| wherever the variance is monotone
    across the gap; a latent heat adds a jump that the ends' variances do not account for (MNIST j_ebm at its
    freezing point: 4.2 x; smooth gaps 0.7-1.0 x). Swaps across such a gap cannot equalise the phases' shares in
    a sweep's length; helpers there would carry a few states of one phase into the other's temperatures, and the
    chains would then visit, without holding its share, a phase that the annealing weights otherwise supply
    (`estimators.missed_phase`)."""
    betas, u, var = (np.asarray(a, np.float64) for a in (betas, u, var))
    return np.abs(np.diff(u)) > JUMP * np.abs(np.diff(betas)) * np.maximum(var[1:], var[:-1])


def ladder(betas, u, var, target: float, most: int):
    """Helper temperatures for replica exchange: betas [T] ascending, u and var [T] the mean and variance of
    <E | x> over each temperature's states. Helpers go one at a time into the gap with the lowest predicted swap
    acceptance (`swap_acceptance`, u and var interpolated linearly in log beta, the gap split into equal steps
    of log beta) until every step reaches `target` or `most` helpers are placed; none across a phase transition
    (`transitions`). Returns (the ladder's betas [T + H] ascending, the index of each given temperature in it [T],
    helpers per gap [T - 1])."""
    betas, u, var = (np.asarray(a, np.float64) for a in (betas, u, var))
    lb = np.log(betas)

    def lowest(g, k):  # lowest predicted acceptance in gap g split into k + 1 equal steps of log beta
        f = np.linspace(0.0, 1.0, k + 2)
        b = np.exp(lb[g] + f * (lb[g + 1] - lb[g]))
        uu, vv = u[g] + f * (u[g + 1] - u[g]), var[g] + f * (var[g + 1] - var[g])
        return float(np.min(swap_acceptance(b[1:], b[:-1], uu[1:], uu[:-1], vv[1:], vv[:-1])))

    h = np.zeros(max(len(betas) - 1, 0), dtype=int)
    acc = np.array([lowest(g, 0) for g in range(len(h))])
    acc[transitions(betas, u, var)] = np.inf  # no helpers across a phase transition
    while len(h) and h.sum() < most:
        g = int(np.argmin(acc))
        if not acc[g] < target:
            break
        h[g] += 1
        acc[g] = lowest(g, h[g])
    parts = [np.exp(lb[g] + np.linspace(0.0, 1.0, h[g] + 2)[:-1] * (lb[g + 1] - lb[g])) for g in range(len(h))]
    full, idx = np.concatenate(parts + [betas[-1:]]), np.concatenate([[0], np.cumsum(h + 1)])
    full[idx] = betas  # the given temperatures exactly
    return full, idx, h


def _with_helpers(s: Sampler, init: MalaState, betas, step0, target: float, most: int):
    """The ladder (`ladder`) from the initial states' <E | x> at each temperature, its initial states and step sizes
    (interpolated in log beta). A helper's chains are drawn from the nearest given temperature's (in log beta) by
    weight p_helper(x) / p_given(x): copies alone would start it with that temperature's mix of phases, which the
    swaps would then carry into its neighbours. The draw is degenerate where the swap it replaces is unlikely, so a
    helper can hold the wrong mix of modes the chains cannot leave (why helpers are opt-in: docs/estimators.md).
    Returns (ladder betas, index of the given temperatures, helpers per gap, states, steps)."""
    n_t = len(betas)
    c = init.x.shape[0] // n_t
    dev, dt = init.logits.device, init.logits.dtype
    beta = torch.as_tensor(betas, dtype=dt, device=dev).repeat_interleave(c)
    u = s.ensemble.energy_moments(init.logits, beta)[0].double().reshape(n_t, c).cpu().numpy()
    full, idx, h = ladder(betas, u.mean(1), u.var(1, ddof=1), target, most)
    near = np.abs(np.log(full)[:, None] - np.log(betas)[None]).argmin(1)
    rows = []
    for j, k in enumerate(near):
        own = torch.arange(k * c, (k + 1) * c, device=dev)
        if j not in idx:
            lg = init.logits[own]
            log_w = (s.ensemble.logp(lg, torch.full((c,), float(full[j]), dtype=dt, device=dev))
                     - s.ensemble.logp(lg, torch.full((c,), float(betas[k]), dtype=dt, device=dev)))
            own = own[torch.multinomial(torch.softmax(log_w.double(), 0), c, replacement=True, generator=s.generator)]
        rows.append(own)
    steps = np.exp(np.interp(np.log(full), np.log(betas), np.log(np.asarray(step0, np.float64))))
    return full, idx, h, take(init, torch.cat(rows)), steps


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
              agree=None, swap_target: float = 0.0, max_helpers: int = 0) -> SweepResult:
    """betas: [T] ascending; init: [T * C] states grouped by temperature; step0: [T] initial step sizes. most: the
    most production steps a sweep short against tau_E may run (`sweep_length`; None: n_prod, as asked); agree:
    maps this sweep's SweepLength to the one to run (e.g. the first shard's, so that shards pool). With exchange,
    up to max_helpers helper temperatures are inserted where the predicted swap acceptance is below swap_target
    (`ladder`); everything returned is at the given temperatures."""
    n_t = len(betas)
    c = init.x.shape[0] // n_t
    full, idx, helpers = np.asarray(betas, np.float64), np.arange(n_t), np.zeros(max(n_t - 1, 0), dtype=int)
    if exchange and n_t > 1 and swap_target > 0 and max_helpers > 0:
        full, idx, helpers, init, step0 = _with_helpers(s, init, betas, step0, swap_target, max_helpers)
    n_l = len(full)
    t = sweep_loop(s, init, full, step0, n_burn=n_burn, n_prod=n_prod, exchange=exchange, thin=thin)
    length = SweepLength(n_burn, n_prod)
    if most is not None and most > n_prod:
        length = sweep_length(t["u_trace"].reshape(n_prod, n_l, c)[:, idx].cpu().numpy(), n_burn, n_prod, most)
    if agree is not None:
        length = agree(length)
    more = length.burn_in + length.samples - n_burn - n_prod
    if more > 0:
        t = _go_on(s, t, full, more, exchange, thin)
    n_prod = n_prod + max(more, 0)
    drop = min(start for start in t["starts"] if start >= length.burn_in - n_burn)  # a chunk's first step
    keep = [i for i, start in enumerate(t["starts"]) if start >= drop]
    length = SweepLength(n_burn + drop, n_prod - drop)
    dev = t["u_trace"].device
    rows = torch.as_tensor((idx[:, None] * c + np.arange(c)).reshape(-1), device=dev)  # the given temperatures' chains
    swap = (t["swap_sum"] / t["swap_n"].clamp_min(1)).cpu().numpy()[: n_l - 1]
    return SweepResult(
        chain_means=(sum(t["chunks"][i] for i in keep) / (n_prod - drop))[rows].reshape(n_t, c, -1).cpu().numpy(),
        stat_names=stat_names(s.ensemble),
        u_trace=t["u_trace"][drop:][:, rows].reshape(n_prod - drop, n_t, c).cpu().numpy(),
        logits=t["logits"][torch.as_tensor(np.flatnonzero(t["logit_steps"] >= drop), device=dev)][:, rows]
        .reshape(-1, n_t, c, t["logits"].shape[-1]).cpu().double().numpy(),
        accept=(t["acc_sum"] / n_prod).cpu().numpy()[idx],
        swap_accept=np.array([swap[idx[g]:idx[g + 1]].min() for g in range(n_t - 1)]),
        helpers=helpers,
        nonfinite=t["bad"].cpu().numpy()[idx],
        step=t["step"].cpu().numpy()[idx],
        final=take(t["state"], rows),
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
