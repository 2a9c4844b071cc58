"""Thermodynamics from the pooled anneals and sweep: log Z, F, U, S, C and information with SEs (`thermodynamics`
-> `Thermo`), and the MBAR cross-check."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..estimators import (class_mix_se, delta_log_mean_se, derivative, integrated_autocorr_time, jackknife, jackknife_cov,
                          label_entropy, log_mean_weight, logmeanexp, missed_phase, pareto_k, peak_position,
                          population_weights, weight_ess, weighted_heat, weighted_mean)
from ..samplers.sweep import stat_names
from .inputs import Problem
from .records import Pooled

log = logging.getLogger("thermo_ebm")
logging.getLogger("pymbar").setLevel(logging.ERROR)
LN2 = math.log(2.0)
MBAR_MAX = 1000


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
    sweep_se: dict         # "U", "C" -> [T] the sweep chains' own SEs (without U_missed, C_missed)
    missed_carried: np.ndarray  # [T] replica ESS / R of the annealing weights' mass in the missed phase
    label_z: np.ndarray | None = None  # joint with data: `_label_mix_z`
    p_y: tuple | None = None  # joint: p_T(y) and its SE, [T, K] each


def _label_mix_z(blocks, ip, weighted) -> np.ndarray:
    """max over y of |p_T(y) of the sweep chains - p_T(y) of the data-seeded weights| / combined SE, per
    temperature [T]: the two disagree on how the mass splits between classes (a phase one of them mis-weighs).
    weighted: per class y, (p_T(y), SE) [T] from the weights. The SE is at least 1 / (number of sweep chains), the
    finest share those chains can resolve (where every chain and every weight sits in one class, both replica and
    jackknife SEs are 0)."""
    floor = 1.0 / blocks.shape[1]
    z = []
    for y, (pw, pw_se) in enumerate(weighted):
        ps, ps_se = jackknife(blocks, lambda m: m[..., ip.start + y])
        z.append(np.abs(ps - pw) / np.maximum(np.sqrt(ps_se ** 2 + pw_se ** 2), floor))
    return np.max(z, axis=0)


def thermodynamics(p: Problem, pooled: Pooled) -> Thermo:
    """log Z, F, U, S, C, info (joint: H_Y, H_Y|X, I_XY) with SEs, and the cross-checks."""
    cfg, betas, ens = p.cfg, p.betas, p.ens
    n_t = len(betas)
    log_omega = ens.log_omega(p.d)
    label_z, p_y = None, None
    # SMC: one replica per population (chains of a population share ancestors and are not independent)
    smc_run = cfg.engine == "smc"
    n_rep = cfg.smc_populations if smc_run else cfg.replicas
    f, b, sw = pooled.forward, pooled.seeded, pooled.sweep
    fwd = log_z_estimate(f.logw, f.energy, log_omega, n_rep, smc_run)
    seeded = None
    if b is not None:
        # weights relative to the normalised base: log Z = log mean w (no reference volume)
        seeded = log_z_estimate(b.logw, b.energy, 0.0, n_rep, smc_run)
    rep = seeded or fwd
    log_z, log_z_se = rep.value, rep.se
    # C from the annealing weights (which carry a rare phase's mass that a few sweep chains cannot hold)
    w_src = (b.logw, b.energy, b.energy2) if seeded else (f.logw, f.energy, f.energy2)
    c_w, c_w_se = weighted_heat(*w_src, betas, n_rep)
    # ... and their share at energies the sweep chains never visited (a phase too rare for them to hold)
    lo, hi = sw.u_trace.min(axis=(0, 2)), sw.u_trace.max(axis=(0, 2))
    du, du_se, dc, dc_se, _, carried = missed_phase(*w_src, lo, hi, betas, n_rep)

    # ---- sweep estimators: jackknife over chains (independent blocks)
    names = stat_names(ens)
    blocks = sw.chain_means
    iu, im2 = names.index("u"), names.index("m2")
    U, U_sweep_se = jackknife(blocks, lambda m: m[..., iu])
    U, U_se = U + du, np.sqrt(U_sweep_se ** 2 + du_se ** 2)  # plus what the chains miss (zero when they miss nothing)
    mix_c_se = np.zeros(n_t)
    if b is not None and ens.kind == "joint":  # the chains start from the data-seeded weights' mix of classes
        ih = names.index("h_y_given_x")
        mix_u_se, mix_c_se = class_mix_se(blocks[..., iu], blocks[..., im2], blocks[..., ih + 1: ih + 1 + ens.n_classes],
                                          b.logw, b.p_y, betas, n_rep)
        U_se = np.sqrt(U_se ** 2 + np.nan_to_num(mix_u_se) ** 2)
        mix_c_se = np.nan_to_num(mix_c_se)

    def heat(m):
        b = betas.reshape((-1,) + (1,) * (m.ndim - 2))
        return b ** 2 * (m[..., im2] - m[..., iu] ** 2)
    # C's jackknife covariance between temperatures: its diagonal is C's SE; the peak temperature of C(T) needs
    # all of it, since C at neighbouring T is positively correlated through the swaps
    C_cov = jackknife_cov(blocks, heat)
    sweep_se = {"U": U_sweep_se, "C": np.sqrt(np.diag(C_cov))}
    C_cov = C_cov + np.diag(dc_se ** 2 + mix_c_se ** 2)
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
            shares = [jackknife(blocks, lambda m, y=y: m[..., ip.start + y]) for y in range(ens.n_classes)]
        else:  # p_T(y) from the data-seeded weights: phases the sweep chains rarely visit still count
            hy = label_entropy(b.logw, b.p_y, n_rep)
            ixy = (hy[0] - hyx[0], np.sqrt(hy[1] ** 2 + hyx[1] ** 2))
            shares = [weighted_mean(b.logw, b.p_y[..., y], n_rep) for y in range(ens.n_classes)]
            label_z = _label_mix_z(blocks, ip, shares)
        # a share no chain (or no weight) resolves: the SE is at least one chain's part, 1 / (effective chains)
        floor = 1.0 / (blocks.shape[1] if seeded is None else np.maximum(weight_ess(b.logw), 1.0))
        p_y = (np.stack([v for v, _ in shares], -1), np.maximum(np.stack([e for _, e in shares], -1),
                                                                 np.reshape(floor, (-1, 1))))
        out.update(H_Y_bits=hy, H_Y_given_X_bits=hyx, I_XY_bits=ixy)

    # ---- cross-checks: the reverse direction, MBAR, consistency residuals, the two origins
    tau = np.array([integrated_autocorr_time(sw.u_trace[:, t, :]) for t in range(n_t)])
    rev_lw = pooled.reverse.logw
    rev_ratio, rev_se = -logmeanexp(rev_lw, axis=-1), delta_log_mean_se(rev_lw)
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
            diag["log_Z_mbar"] = _mbar_log_z(sw.logits, betas, ens, log_z, log_z_se[0], np.max(tau) / cfg.thin)
            mbar_ok = True
        except Exception as e:  # MBAR failing (no overlap) is a diagnostic, not a fatal error
            log.warning("MBAR cross-check failed: %s", " ".join(str(e).split())[:200])
    if not mbar_ok:
        diag["log_Z_mbar"] = (np.full(n_t, np.nan), np.full(n_t, np.nan))
    return Thermo(out, diag, fwd, rep, seeded, peak, tau, mbar_ok, {"log_Z": rep.cov, "C": C_cov}, sweep_se, carried,
                  label_z, p_y)


MBAR_GROUPS = 16  # independent chain groups whose MBAR estimates give the cross-check's SE
MBAR_MIN_OVERLAP = 2.0  # effective samples reweighted between neighbouring temperatures below which MBAR is skipped


def _pymbar():
    """pymbar with its numpy solver. pymbar switches to a JAX solver whenever jax imports (and turns on 64-bit
    floats for all of JAX): with jax installed, MBAR at MNIST size took minutes instead of seconds here, JIT-
    compiling each of its 17 calls. Unless the program already uses JAX, jax is hidden while pymbar loads.
    Its import prints notices: silenced."""
    if "pymbar" not in sys.modules:
        hide = "jax" not in sys.modules
        if hide:
            sys.modules["jax"] = None  # `import jax` raises ImportError while this is set
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                import pymbar  # noqa: F401
        finally:
            if hide:
                del sys.modules["jax"]
    return sys.modules["pymbar"]


def _reduced_potentials(lg, betas, ensemble):
    """u_kn [T, T * n_per] (-log g_beta_k of every sample, grouped by the state that drew it) and n_per, from
    logits lg [steps, T, chains, K]."""
    k, n_per = lg.shape[3], lg.shape[0] * lg.shape[2]
    lt = torch.as_tensor(lg.transpose(1, 0, 2, 3).reshape(-1, k))
    u_kn = np.stack([-ensemble.logp(lt, torch.full((lt.shape[0],), float(b), dtype=lt.dtype)).numpy()
                     for b in betas])
    return u_kn, n_per


def _no_overlap(u_kn, n_per, betas):
    """The first pair of neighbouring temperatures between which MBAR has nothing to work with (fewer than
    MBAR_MIN_OVERLAP effective samples in both directions, each state's samples reweighted to the other), or None."""
    for i in range(len(betas) - 1):
        ess = [weight_ess(u_kn[a, a * n_per:(a + 1) * n_per] - u_kn[b, a * n_per:(a + 1) * n_per])
               for a, b in ((i, i + 1), (i + 1, i))]
        if max(ess) < MBAR_MIN_OVERLAP:
            return 1.0 / betas[i], 1.0 / betas[i + 1]
    return None


def _mbar_delta_f(lg, betas, ensemble, f_init):
    """MBAR f_k - f_0 (f = -log Z; state 0 = lowest beta) from logits lg [steps, T, chains, K], its solver started
    from f_init [T] (the AIS values). MBAR's solution does not depend on the start; from zeros, with f spread
    over hundreds of nats at d = 784, its solver can stop short of it (pymbar's "Should have sum_n W_nk = 1")."""
    pymbar = _pymbar()
    u_kn, n_per = _reduced_potentials(lg, betas, ensemble)
    with contextlib.redirect_stdout(io.StringIO()):
        start = f_init - f_init[0] if np.all(np.isfinite(f_init)) else None
        mbar = pymbar.MBAR(u_kn, np.full(len(betas), n_per), initial_f_k=start)
        return mbar.compute_free_energy_differences()["Delta_f"][0]


def _mbar_log_z(logits, betas, ensemble, log_z_ais, anchor_se, tau):
    """log Z at every sweep beta from MBAR on the sweep samples, anchored at the lowest beta's AIS value
    (log_z_ais [T], which also starts the solver). The SE
    comes from MBAR_GROUPS independent groups of chain ladders (each chain slot keeps its own replica-exchange
    ladder), not from MBAR's asymptotic covariance, which takes the thinned samples as independent and was
    2-3x too small on the 2-d neural joint system."""
    stride = max(1, int(math.ceil(tau)))
    lg = logits[::stride]  # roughly independent samples, at most MBAR_MAX per state
    lg = lg[:, :, : max(1, MBAR_MAX // lg.shape[0])][: MBAR_MAX]
    gap = _no_overlap(*_reduced_potentials(lg, betas, ensemble), betas)
    if gap is not None:  # MBAR would iterate to its limit (minutes at d = 784) for a number that means nothing
        raise ValueError(f"no overlap between the samples at T = {gap[0]:.3g} and {gap[1]:.3g}: the sweep "
                         "temperatures are too far apart for MBAR (the other estimates do not need it)")
    f_init = -np.asarray(log_z_ais, dtype=np.float64)
    f = _mbar_delta_f(lg, betas, ensemble, f_init)
    b = min(MBAR_GROUPS, lg.shape[2])
    if b < 2:
        raise ValueError("MBAR's SE needs at least two chains per temperature")
    parts = np.stack([_mbar_delta_f(g, betas, ensemble, f_init) for g in np.array_split(lg, b, axis=2)])
    df = parts.std(0, ddof=1) / math.sqrt(b)
    return log_z_ais[0] - f, np.sqrt(df ** 2 + anchor_se ** 2)
