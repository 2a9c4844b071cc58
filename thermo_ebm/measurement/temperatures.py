"""`--temps auto`: temperatures chosen from the model's measured structure.

1. Scan: a quick measurement (SCAN budget) at temperatures a factor SCAN_FACTOR apart around the reference
   (T = 1 on the measurement's scale), extended upwards while the model still holds information at the top
   (it has not melted) and downwards while the bottom is unflagged and C still rises towards it, at most
   SCAN_EXTEND blocks each way. The scan caps each data-seeded path (max_bridge_steps): a frozen temperature,
   whose path would take millions of lambdas, is then flagged in seconds instead of measured for hours
   (`flags.bridge_capped`).
2. Range: from the freezing point (the lowest scan temperature below which every one is flagged: a phase the
   chains no longer equilibrate) or T_ML when that lies higher ... to melting (the lowest temperature whose
   information is below MELT_FRACTION of the largest measured).
3. Placement: n temperatures at equal thermodynamic length, i.e. equally spaced in the integral of
   sqrt(C(T)) / T dT (interpolated from the scan), so they crowd where the heat capacity is large; the C peak
   and T_ML are always added.
"""
from __future__ import annotations

import math

import numpy as np

SCAN = dict(ais_chains=128, replicas=8, ais_steps=500, tune_stages=60, chains=16, burn_in=100, samples=200,
            reverse_steps=64, mbar=False, keep_samples=1, bridge_chains=64, data_refs=32, gauss_refs=64,
            reference_steps=200, crosscheck_steps=5000, max_bridge_steps=2000, bridge_moves=1, smc_chains=256,
            smc_data_chains=64, smc_crosscheck_chains=64, smc_populations=4, smc_pilot_chains=128)
SCAN_FACTOR = 4.0      # ratio of neighbouring scan temperatures
SCAN_HALF = 2          # scan temperatures on each side of the reference in the first block
SCAN_EXTEND = 4        # most blocks added on each side
MELT_FRACTION = 0.02   # melted: information below this fraction of the largest measured


def initial_grid() -> np.ndarray:
    """The first scan: SCAN_FACTOR^k, k = -SCAN_HALF..SCAN_HALF."""
    return SCAN_FACTOR ** np.arange(-SCAN_HALF, SCAN_HALF + 1, dtype=np.float64)


def _flagged(scan) -> np.ndarray:
    names = [v for v in scan.data_vars if v.startswith("flag_")]
    return np.any([scan[v].values.astype(bool) for v in names], axis=0) if names else np.zeros(scan.sizes["temperature"], bool)


def _largest_info(info, bad) -> float:
    """The largest information of the unflagged scan temperatures (a frozen, flagged one's is no reference)."""
    ok = info[~bad & np.isfinite(info)]
    return max(float(ok.max()), 1e-12) if ok.size else math.inf


def extend(scan) -> np.ndarray | None:
    """Temperatures to add to a scan (ascending dataset), or None when it brackets the structure: more above
    while every scan temperature is flagged (a model frozen at all of them, e.g. on a nominal T_train's scale)
    or the top still holds information, more below while the bottom is unflagged and C rises towards it."""
    t, info, c = scan.temperature.values, scan.info_bits.values, scan.C.values
    bad = _flagged(scan)
    add = []
    if bad.all() or (info[-1] > MELT_FRACTION * _largest_info(info, bad) and info[-1] > 0.5):
        add.append(t[-1] * SCAN_FACTOR ** np.arange(1, 3))
    if not bad[0] and len(c) > 1 and c[0] >= c[1]:
        add.append(t[0] / SCAN_FACTOR ** np.arange(1, 3))
    return np.concatenate(add) if add else None


def thermodynamic_positions(t, c) -> np.ndarray:
    """Cumulative thermodynamic length s(T) = int sqrt(C) / T dT on the scan grid t [n] (trapezoid in log T)."""
    f = np.sqrt(np.clip(np.nan_to_num(c), 0.0, None))
    lt = np.log(t)
    return np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(lt))])


def choose(scan, n: int, t_ml: float | None = None) -> tuple[np.ndarray, str]:
    """(temperatures [>= n] ascending, explanation) from a scan dataset (ascending temperature)."""
    t, info, c = scan.temperature.values, scan.info_bits.values, scan.C.values
    bad = _flagged(scan)
    ok = np.flatnonzero(~bad)
    if ok.size == 0:
        lo, why_lo = t[0], f"every scan temperature is flagged; from the lowest scanned, T = {t[0]:.3g}"
    else:
        lo = t[ok[0]]
        why_lo = (f"freezing point T = {lo:.3g} (flagged below: the chains no longer equilibrate)" if ok[0] > 0
                  else f"the lowest scanned, T = {lo:.3g} (unflagged)")
    melt = np.flatnonzero((info < MELT_FRACTION * _largest_info(info, bad)) & (t > lo) & ~bad)
    hi = t[melt[0]] if melt.size else t[-1]
    why_hi = (f"melting at T = {hi:.3g} (information below {MELT_FRACTION:.0%} of its largest)" if melt.size
              else f"the highest scanned, T = {hi:.3g} (the model still holds {info[-1]:.3g} bits there)")
    if hi <= lo:
        hi = t[-1] if t[-1] > lo else lo * SCAN_FACTOR
    inside = (t >= lo) & (t <= hi)
    s = thermodynamic_positions(t[inside], c[inside])
    if s[-1] > 0:
        temps = np.exp(np.interp(np.linspace(0, s[-1], n), s, np.log(t[inside])))
    else:
        temps = np.geomspace(lo, hi, n)
    extra = []
    peak = float(scan.C_peak_T) if "C_peak_T" in scan else math.nan
    if math.isfinite(peak) and lo < peak < hi:
        extra.append(peak)
    if t_ml is not None and math.isfinite(t_ml) and lo < t_ml < hi:
        extra.append(t_ml)
    temps = np.unique(np.round(np.concatenate([temps, extra]), 6))
    expl = (f"--temps auto: {len(temps)} temperatures from {why_lo} to {why_hi}, at equal thermodynamic length "
            f"(crowded where C is large)" + (f"; C peak T* = {peak:.3g} included" if peak in extra else "")
            + (f"; T_ML = {t_ml:.3g} included" if t_ml in extra else "") + f" (scan of {len(t)} temperatures)")
    return temps, expl
