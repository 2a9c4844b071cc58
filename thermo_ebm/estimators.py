"""Statistical estimators that return values together with standard errors (numpy, float64)."""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import logsumexp


def logmeanexp(a, axis=-1):
    """log mean exp(a) along `axis`, stable; -inf for all -inf entries."""
    a = np.asarray(a, dtype=np.float64)
    return logsumexp(a, axis=axis) - np.log(a.shape[axis])


def log_mean_weight(logw, n_replicas: int):
    """AIS: log mean exp(logw) over chains, with SE from independent replicas.

    logw: [..., N] log-weights of N iid chains. The chains are split into `n_replicas` groups; each gives
    an independent estimate, and the SE of the pooled estimate is std(replica estimates)/sqrt(R).
    Returns (estimate [...], se [...], per-replica estimates [..., R], ess [...]).
    """
    logw = np.where(np.isnan(logw), -np.inf, np.asarray(logw, dtype=np.float64))
    r, n_use = replica_split(logw.shape[-1], n_replicas)
    reps = logmeanexp(logw[..., :n_use].reshape(*logw.shape[:-1], r, n_use // r), axis=-1)
    est = logmeanexp(logw, axis=-1)
    se = np.std(reps, axis=-1, ddof=1) / np.sqrt(r)
    ess = weight_ess(logw)
    return est, se, reps, ess


def replica_split(n: int, n_replicas: int):
    """(R, N_used): R >= 2 equal groups of the first N_used = R * (n // R) chains."""
    r = max(2, min(n_replicas, n // 2))
    return r, (n // r) * r


def thermodynamic_length(grid, var):
    """Cumulative thermodynamic length [S, ...] of a path sampled at grid points [S] (betas or lambdas) with
    Var(d log p / d grid) [S, ...] there: the trapezoid integral of its standard deviation, from 0."""
    sd = np.sqrt(var) + 1e-12
    seg = 0.5 * (sd[1:] + sd[:-1]) * np.diff(grid).reshape((-1,) + (1,) * (sd.ndim - 1))
    return np.concatenate([np.zeros((1,) + sd.shape[1:]), np.cumsum(seg, 0)])


def replica_weights(logw, r: int, k: int, mask=None):
    """Each replica's part [T, R] of the total weight (on one common scale, not normalised), the replicas being R
    equal groups of the first k chains of logw [T, N]; with mask [T, N], only the chains where it is true."""
    w = np.exp(logw[:, :k] - logw.max(-1, keepdims=True))
    if mask is not None:
        w = w * mask[:, :k]
    return w.reshape(len(logw), r, -1).sum(-1)


def replica_means(logw, values, r: int, k: int):
    """Each replica's self-normalised weighted mean [T, R, ...] of values [T, N, ...] under logw [T, N] (the
    replicas of `replica_weights`), each on its own weight scale so that every replica with weight has a value."""
    lr = logw[:, :k].reshape(len(logw), r, -1)
    top = lr.max(-1, keepdims=True)
    w = np.exp(lr - np.where(np.isfinite(top), top, 0.0))
    vr = values[:, :k].reshape(len(logw), r, -1, *values.shape[2:])
    w = w.reshape(w.shape + (1,) * (vr.ndim - 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * vr).sum(2) / w.sum(2)


def replica_se(reps, logw, r: int, k: int):
    """SE [T] of a self-normalised estimate from its R replicas' values reps [T, R] (`replica_weights`' groups of
    logw [T, N]): the replicas' spread times sqrt(sum of squared weight shares) (Kish). Equal shares give
    spread / sqrt(R); where one replica holds all the weight, the spread itself."""
    w = replica_weights(logw, r, k)
    share = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    reps = np.where(share > 0, reps, np.nan)  # a replica without weight has no value and no say
    with warnings.catch_warnings():  # fewer than two replicas with weight: no spread (nan)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(reps, axis=-1, ddof=1) * np.sqrt((share ** 2).sum(-1))


def weighted_mean(logw, values, n_replicas: int):
    """Self-normalised weighted mean over chains [T, N] with SE from independent replicas (`replica_se`)."""
    logw = np.where(np.isnan(logw), -np.inf, logw)
    w = np.exp(logw - logw.max(-1, keepdims=True))
    est = (w * values).sum(-1) / w.sum(-1)
    r, k = replica_split(logw.shape[-1], n_replicas)
    return est, replica_se(replica_means(logw, values, r, k), logw, r, k)


def class_mix_se(u, m2, p_chain, logw, p_y, betas, n_replicas: int):
    """SEs [T] of U and C that sweep-chain means inherit from the class mix of the annealing weights the chains were
    drawn from, where chains keep their class: each chain's class is the argmax of its mean p_T(y | x), p_chain
    [T, C, K]; each replica of the weights logw [T, N] (p_y [T, N, K]: p_T(y | x) of its chains) gives class shares
    P_r, and over the classes the chains hold (ubar_y, m2bar_y: their chains' mean E and E^2, u and m2 [T, C])
    U_r = sum_y P_r(y) ubar_y and C_r = beta^2 (sum_y P_r(y) m2bar_y - U_r^2) vary between replicas as the mix
    does. Returns the Kish replica SEs (`replica_se`) of U_r and C_r; the chains' own SEs miss this part."""
    k_cls = p_chain.shape[-1]
    onehot = p_chain.argmax(-1)[..., None] == np.arange(k_cls)                       # [T, C, K]
    n_k = onehot.sum(1)
    held = n_k > 0

    def per_class(a):                                                                # [T, K]
        return np.where(held, (onehot * a[..., None]).sum(1) / np.maximum(n_k, 1), 0.0)
    lw = np.where(np.isnan(logw), -np.inf, logw)
    r, k = replica_split(lw.shape[-1], n_replicas)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = replica_means(lw, p_y, r, k) * held[:, None]                           # [T, R, K]
        share = share / share.sum(-1, keepdims=True)
    u_r = (share * per_class(u)[:, None]).sum(-1)                                     # [T, R]
    c_r = np.asarray(betas, dtype=np.float64)[:, None] ** 2 * ((share * per_class(m2)[:, None]).sum(-1) - u_r ** 2)
    return replica_se(u_r, lw, r, k), replica_se(c_r, lw, r, k)


def weighted_heat(logw, u, m2, betas, n_replicas: int):
    """C = beta^2 (E_w[<E^2 | x>] - E_w[<E | x>]^2) from importance weights logw [T, N] and per-chain moments
    u, m2 [T, N] at betas [T]; SE from independent replicas (`replica_se`)."""
    logw = np.where(np.isnan(logw), -np.inf, np.asarray(logw, dtype=np.float64))
    b2 = np.asarray(betas, dtype=np.float64)[:, None] ** 2

    def heat(lw, a, a2):
        w = np.exp(lw - lw.max(-1, keepdims=True))
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
        mu = (w * a).sum(-1)
        return b2[..., 0] * ((w * a2).sum(-1) - mu * mu)
    c = heat(logw, u, m2)
    r, k = replica_split(logw.shape[-1], n_replicas)
    reps = np.stack([heat(logw[:, i * (k // r):(i + 1) * (k // r)], u[:, i * (k // r):(i + 1) * (k // r)],
                          m2[:, i * (k // r):(i + 1) * (k // r)]) for i in range(r)], -1)
    return c, replica_se(reps, logw, r, k)


def missed_phase(logw, u, m2, lo, hi, betas, n_replicas: int):
    """What the sweep chains miss: the annealing weights' share of U and C at energies outside the range
    [lo, hi] [T] the sweep chains visited. A phase holding a fraction m of the mass at an energy gap dE adds
    about m dE to U and m dE^2 beta^2 to C; below m ~ 1 / chains no sweep chain sits there and the jackknife SE
    cannot see it. dU = U_w - U_w(inside), dC = C_w - C_w(inside), weighted by logw [T, N] over particles with
    <E | x> = u and <E^2 | x> = m2 [T, N]; zero when every particle lies inside. SEs from independent replicas.
    Returns (dU, dU_se, dC, dC_se, mass outside, replica ESS of the mass outside / R), each [T]: the last is
    below 1/2 when the replicas' parts of that mass spread by more than their mean (nan with none outside)."""
    logw = np.where(np.isnan(logw), -np.inf, np.asarray(logw, dtype=np.float64))
    b2 = np.asarray(betas, dtype=np.float64) ** 2
    lo, hi = np.asarray(lo)[:, None], np.asarray(hi)[:, None]

    def parts(w, inside, wi, a, a2):
        u_all, u_in = (w * a).sum(-1), (wi * a).sum(-1)
        c_all = b2 * ((w * a2).sum(-1) - u_all ** 2)
        c_in = b2 * ((wi * a2).sum(-1) - u_in ** 2)
        return np.stack([u_all - u_in, c_all - c_in, (w * ~inside).sum(-1)])
    full = _inside_weights(logw, u, lo, hi)
    est = parts(*full, u, m2)
    r, k = replica_split(logw.shape[-1], n_replicas)
    m = k // r
    reps = np.stack([parts(*_inside_weights(logw[:, i * m:(i + 1) * m], u[:, i * m:(i + 1) * m], lo, hi),
                           u[:, i * m:(i + 1) * m], m2[:, i * m:(i + 1) * m]) for i in range(r)], -1)
    du_se, dc_se = replica_se(reps[0], logw, r, k), replica_se(reps[1], logw, r, k)
    # at least the delta-method SE over single particles: a part carried by a few heavy weights has relative
    # error ~ 1 / sqrt(their ESS), which replicas that all hold a few of them can understate
    du_lin, dc_lin = _missed_phase_delta_se(full[0], full[2], u, m2, b2)
    du_se, dc_se = np.fmax(du_se, du_lin), np.fmax(dc_se, dc_lin)
    part = replica_weights(logw, r, k, (u < lo) | (u > hi))  # each replica's part of the mass outside
    with np.errstate(invalid="ignore"):
        ess = part.sum(-1) ** 2 / (part ** 2).sum(-1)
    return est[0], du_se, est[1], dc_se, est[2], ess / r


def _inside_weights(logw, u, lo, hi):
    """(w, inside, w_inside) [T, N]: normalised weights, whether <E | x> lies in [lo, hi], and the weights
    renormalised over those inside."""
    w = np.exp(logw - logw.max(-1, keepdims=True))
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    inside = (u >= lo) & (u <= hi)
    wi = w * inside
    return w, inside, wi / np.maximum(wi.sum(-1, keepdims=True), 1e-300)


def _missed_phase_delta_se(w, wi, u, m2, b2):
    """Delta-method SEs [T] of `missed_phase`'s dU and dC over independent particles, from the normalised weights
    w and wi (inside the visited range) [T, N]: the root sum of squares of each particle's influence on
    U_w - U_w(inside) and C_w - C_w(inside)."""

    def influence(v):  # of U_v and C_v = b2 (M2_v - U_v^2) under normalised weights v
        mu, s2 = (v * u).sum(-1, keepdims=True), (v * m2).sum(-1, keepdims=True)
        return v * (u - mu), b2[:, None] * v * (m2 - s2 - 2 * mu * (u - mu))
    (iu, ic), (ju, jc) = influence(w), influence(wi)
    return np.sqrt(((iu - ju) ** 2).sum(-1)), np.sqrt(((ic - jc) ** 2).sum(-1))


def label_entropy(logw, p_y, n_replicas):
    """H(Y) in bits of p_T(y) = E_w[p_T(y | x)] from importance weights logw [T, N] and p_y [T, N, K]; SE from
    independent replicas (`replica_se`)."""
    def h(lw, q):
        w = np.exp(lw - lw.max(-1, keepdims=True))
        py = np.clip((w[..., None] * q).sum(-2) / np.maximum(w.sum(-1), 1e-300)[..., None], 1e-300, None)
        return -(py * np.log(py)).sum(-1) / math.log(2.0)
    lw = np.where(np.isnan(logw), -np.inf, logw)
    r, k = replica_split(lw.shape[-1], n_replicas)
    reps = h(lw[:, :k].reshape(len(lw), r, -1), p_y[:, :k].reshape(len(lw), r, -1, p_y.shape[-1]))
    return h(lw, p_y), replica_se(reps, lw, r, k)


def weight_ess(logw):
    """Effective sample size (sum w)^2 / sum w^2 of importance weights given as logs; [...]."""
    logw = np.asarray(logw, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(2 * logsumexp(logw, axis=-1) - logsumexp(2 * logw, axis=-1))


def pareto_k(logw):
    """Shape k of a generalised Pareto fit to the largest importance weights, per row of logw [..., N].

    The tail is the M = min(N/5, 3 sqrt(N)) largest weights above the next largest; k by the
    Zhang-Stephens (2009) profile-likelihood estimator with the weak prior of Vehtari et al. (PSIS, JMLR
    2024). k < 1/2: finite variance; above `heavy_tail_limit(N)` the variance is so poorly determined that
    the sample gives no trustworthy SE of log mean w, whatever the ESS says. Returns [...]: nan with 20 or
    fewer finite weights, inf when fewer than 5 weights stand above the tail's threshold.
    """
    logw = np.asarray(logw, dtype=np.float64)
    flat = logw.reshape(-1, logw.shape[-1])
    return np.array([_pareto_k_row(row) for row in flat]).reshape(logw.shape[:-1])


def _pareto_k_row(logw):
    logw = np.sort(logw[np.isfinite(logw)])
    n = len(logw)
    m = int(min(np.ceil(0.2 * n), np.ceil(3 * np.sqrt(n))))
    if m < 5:  # n <= 20
        return np.nan
    if logw[-1] == logw[-m - 1]:
        return 0.0  # the largest weights are all equal: no tail
    # exceedances over the threshold, scaled by the largest weight (ties with the threshold carry no tail)
    x = np.exp(logw[-m:] - logw[-1]) - np.exp(logw[-m - 1] - logw[-1])
    x = x[x > 0]
    m = len(x)
    if m < 5:
        return np.inf  # a handful of weights dominate the rest beyond float64 resolution
    # profile likelihood over theta = -k / sigma on Zhang & Stephens' grid, posterior-mean theta
    g = 30 + int(np.sqrt(m))
    q1 = x[int(np.floor(m / 4 + 0.5)) - 1]
    theta = 1 / x[-1] + (1 - np.sqrt(g / (np.arange(1, g + 1) - 0.5))) / (3 * q1)
    k = np.mean(np.log1p(-theta[:, None] * x), axis=1)  # profile MLE of the shape at each theta
    with np.errstate(divide="ignore", invalid="ignore"):
        loglik = m * (np.log(-theta / k) - k - 1)
    loglik = np.where(np.isfinite(loglik), loglik, -np.inf)
    w = np.exp(loglik - loglik.max())
    theta_hat = np.sum(theta * w) / np.sum(w)
    k_hat = np.mean(np.log1p(-theta_hat * x))
    return float((m * k_hat + 10 * 0.5) / (m + 10))


def population_weights(logw, n_populations: int):
    """SMC weights [..., N] in `n_populations` populations of consecutive chains (each population's chains carry
    its running log Z since its last resampling). Returns (effective chains: the sum of within-population ESS
    [...], the Pareto k of the weights relative to their population's mean, pooled over populations [...], the
    population ESS (sum Z_p)^2 / sum Z_p^2 [...]). A population ESS below half the populations means the
    populations' Z estimates spread by more than their mean (relative SD > 1): their sample SD then says little
    about the error of log mean Z."""
    logw = np.where(np.isnan(logw), -np.inf, np.asarray(logw, dtype=np.float64))
    lw = logw.reshape(*logw.shape[:-1], n_populations, -1)
    lz = logmeanexp(lw, axis=-1)
    ess = weight_ess(lw).sum(-1)
    rel = np.where(np.isfinite(lz)[..., None], lw - np.where(np.isfinite(lz), lz, 0.0)[..., None], -np.inf)
    k = pareto_k(rel.reshape(logw.shape))
    return ess, k, weight_ess(lz)


def heavy_tail_limit(n: int) -> float:
    """Largest Pareto k of n importance weights for which their sample SE is trusted (PSIS: min(0.7, 1 - 1/log10 n))."""
    return min(0.7, 1.0 - 1.0 / math.log10(n))


def delta_log_mean_se(logw):
    """Delta-method SE of log mean exp(logw) over the last axis (for cross-checks)."""
    n = logw.shape[-1]
    return np.sqrt(np.maximum(np.exp(logsumexp(2 * logw, -1) - 2 * logsumexp(logw, -1)) - 1.0 / n, 0.0))


def jackknife(blocks, fn):
    """Delete-one-block jackknife.

    blocks: [T, n, S] means of S statistics over n independent blocks (here: one block per chain) at
    each of T temperatures; fn maps [..., S] means to a derived quantity [...] (any shape after T).
    Returns (estimate, se) with the estimate fn(mean over all blocks).
    """
    blocks = np.asarray(blocks, dtype=np.float64)
    n = blocks.shape[1]
    est = fn(blocks.mean(axis=1))
    vals = fn(_leave_one_out(blocks))  # [T, n, ...]
    se = np.sqrt((n - 1) / n * ((vals - vals.mean(axis=1, keepdims=True)) ** 2).sum(axis=1))
    return est, se


def _leave_one_out(blocks):
    """[T, n, S] -> [T, n, S]: the means over all blocks but block i, for each i."""
    blocks = np.asarray(blocks, dtype=np.float64)
    n = blocks.shape[1]
    return (blocks.sum(axis=1, keepdims=True) - blocks) / (n - 1)


def jackknife_cov(blocks, fn):
    """Jackknife covariance [T, T] between temperatures of fn (as in `jackknife`, fn: [T, S] -> [T]). A block
    must be the same unit at every temperature: here one replica ladder (swaps exchange configurations between
    chain c at neighbouring temperatures, so ladders, not single chains, are independent)."""
    vals = fn(_leave_one_out(blocks))  # [T, n]
    n = vals.shape[1]
    dev = vals - vals.mean(axis=1, keepdims=True)
    return (n - 1) / n * dev @ dev.T


def parabola_peak(t, y):
    """Position of the maximum of y [..., T] on an ascending grid t [T >= 3]: the vertex of the parabola
    through the largest point and its two neighbours (the end triple when the largest point is at an end;
    the middle point when those three are not concave); [...]."""
    t, y = np.asarray(t, dtype=np.float64), np.asarray(y, dtype=np.float64)
    j = np.clip(np.argmax(y, axis=-1), 1, len(t) - 2)[..., None]
    t0, t1, t2 = t[j - 1][..., 0], t[j][..., 0], t[j + 1][..., 0]
    y0, y1, y2 = (np.take_along_axis(y, j + k, -1)[..., 0] for k in (-1, 0, 1))
    d1, d2 = (y1 - y0) / (t1 - t0), (y2 - y1) / (t2 - t1)
    a = (d2 - d1) / (t2 - t0)  # y = y0 + d1 (t - t0) + a (t - t0)(t - t1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a < 0, 0.5 * (t0 + t1) - d1 / (2 * a), t1)


def has_interior_max(y):
    """Whether the largest of y [T] (NaNs ignored; False if all are NaN) lies strictly inside the grid (T >= 3)."""
    y = np.asarray(y, dtype=np.float64)
    return len(y) >= 3 and not np.isnan(y).all() and 0 < int(np.nanargmax(y)) < len(y) - 1


def peak_position(t, y, cov, n_draws: int = 4000, seed: int = 0):
    """(T*, SE) of the maximum of y(t) [T] (`parabola_peak`), SE from draws y* ~ N(y, cov [T, T]): the
    covariance carries the correlation between temperatures, the draws the chance that another grid point
    is the largest. (nan, nan) without an interior maximum or with a non-finite y; the SE is nan where cov is not
    finite (a frozen temperature's C can have no SE)."""
    y, cov = np.asarray(y, dtype=np.float64), np.asarray(cov, dtype=np.float64)
    if not has_interior_max(y) or not np.isfinite(y).all():
        return np.nan, np.nan
    if not np.isfinite(cov).all():
        return float(parabola_peak(t, y)), np.nan
    draws = np.random.default_rng(seed).multivariate_normal(y, cov, size=n_draws, method="eigh")
    return float(parabola_peak(t, y)), float(np.std(parabola_peak(t, draws)))


def integrated_autocorr_time(series, c: float = 5.0):
    """Integrated autocorrelation time (steps) with Sokal's automatic window.

    series: [n_steps, n_chains] for one observable; the autocorrelation is averaged over chains.
    Returns tau >= 1 (float); a constant series gives 1.
    """
    x = np.asarray(series, dtype=np.float64)
    n = x.shape[0]
    x = x - x.mean(axis=0, keepdims=True)
    f = np.fft.rfft(x, n=2 * n, axis=0)
    acf = np.fft.irfft(f * np.conj(f), axis=0)[:n].mean(axis=1)
    if acf[0] <= 0:
        return 1.0
    rho = acf / acf[0]
    taus = 2.0 * np.cumsum(rho) - 1.0
    m = np.arange(n)
    window = m >= c * taus
    k = int(np.argmax(window)) if window.any() else n - 1
    return float(max(taus[k], 1.0))


def derivative(x, y):
    """dy/dx on a non-uniform grid: three-point formula inside, one-sided at the ends; [..., n]."""
    return np.gradient(y, x, axis=-1, edge_order=2) if len(x) > 2 else np.gradient(y, x, axis=-1)
