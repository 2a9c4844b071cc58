"""`measure`: thermodynamics of a model over a temperature sweep, with standard errors.

Stages (each passes a small dataclass to the next; one module each in thermo_ebm/analysis/):
prepare (model in its own temperature units, reference data) -> plan (pilot anneal from uniform, frozen
schedule) -> anneal (per shard: counted forward AIS from uniform; with data, the counted anneal from a
data-informed base at every temperature; temperature-sweep chains; reverse AIS) -> thermodynamics (log Z,
F, U, S, C, information with SEs) -> diagnose (cross-checks, the two origins compared, flags) -> dataset.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from .. import distributed as dist
from ..config import MeasureConfig
from ..errors import ThermoEBMError
from ..estimators import has_interior_max, parabola_peak
from ..models import EBM
from . import temperatures
from .anneal import STAGES, Plan, plan, pool
from .dataset import add_likelihood, to_dataset
from .flags import LENGTHEN, Diagnosis, diagnose, growth, lengthen, scale_hint
from .inputs import Problem, prepare
from .records import Pooled
from .thermo import Thermo, thermodynamics

log = logging.getLogger("thermo_ebm")


def auto_temperatures(model, cfg: MeasureConfig, **kw) -> tuple[np.ndarray, str, dict]:
    """`--temps auto` (temperatures.py): scan quickly, extend the scan until it brackets the structure, then
    place cfg.auto_temps temperatures. Returns (temperatures, explanation, the scan's figures)."""
    scan_cfg = MeasureConfig(**{**asdict(cfg), **temperatures.SCAN, "max_time": None})
    grid = temperatures.initial_grid()
    parts = []
    t_ml = None
    for block in range(2 * temperatures.SCAN_EXTEND + 1):
        t_block = time.perf_counter()
        quiet = log.level
        log.setLevel(logging.ERROR)  # the scan's own flags and notes are not the measurement's
        try:
            ds = measure(model, grid, config=scan_cfg, **kw)
        finally:
            log.setLevel(quiet)
        log.info("--temps auto: scan of T = %s (%.0f s)", ", ".join(f"{v:.3g}" for v in ds.temperature.values),
                 time.perf_counter() - t_block)
        parts.append(ds)
        if ds.attrs.get("T_ML_side") == "inside":
            t_ml = float(ds.T_ML)
        t = np.concatenate([q.temperature.values for q in parts])
        order = np.argsort(t)
        flagged = np.concatenate([np.any([q[v].values.astype(bool) for v in q.data_vars if v.startswith("flag_")],
                                         axis=0) for q in parts])
        scan = xr.Dataset({"info_bits": ("temperature", np.concatenate([q.info_bits.values for q in parts])[order]),
                           "C": ("temperature", np.concatenate([q.C.values for q in parts])[order]),
                           "flag_any": ("temperature", flagged[order].astype(np.int8))},
                          coords={"temperature": t[order]})
        c_ok = np.where(scan.flag_any.values.astype(bool), np.nan, scan.C.values)  # a flagged C places no peak
        if has_interior_max(c_ok) and np.isfinite(c_ok[np.nanargmax(c_ok) - 1:np.nanargmax(c_ok) + 2]).all():
            scan["C_peak_T"] = ((), float(parabola_peak(scan.temperature.values, np.nan_to_num(c_ok, nan=-np.inf))))
        more = temperatures.extend(scan)
        if more is None or block == 2 * temperatures.SCAN_EXTEND:
            break
        grid = np.setdiff1d(more, t)
    temps, expl = temperatures.choose(scan, cfg.auto_temps, t_ml)
    return temps, expl, {"temperature": scan.temperature.values.tolist(), "C": scan.C.values.tolist(),
                         "info_bits": scan.info_bits.values.tolist(), "flagged": scan.flag_any.values.tolist()}


@dataclass
class Attempts:
    """The last attempt of a measurement (its problem, plan, pooled chains, thermodynamics, diagnosis), the
    seconds of every attempt, the pilot's seconds of the last, and a note when `max_time` stopped a doubling."""
    problem: Problem
    plan: Plan
    pooled: Pooled
    thermo: Thermo
    diagnosis: Diagnosis
    seconds: list
    plan_seconds: float
    note: str


def attempts(p: Problem, t0: float, progress) -> Attempts:
    """Measure once; with `max_time`, measure again with doubled schedules (`lengthen`) while a flag that more
    sampling can clear is raised, a first run being always checked by one doubling, and the next attempt
    (`growth` times the last, with a 10% margin) fits within max_time counted from t0."""
    cfg, seconds, previous = p.cfg, [], None
    while True:
        t_run = time.perf_counter()
        pl = plan(p, progress)
        t_plan = time.perf_counter() - t_run
        pooled = pool(p, pl, progress)
        th = thermodynamics(p, pooled)
        dg = diagnose(p, pl, th, pooled, previous)
        seconds.append(time.perf_counter() - t_run)
        if cfg.max_time is None:
            return Attempts(p, pl, pooled, th, dg, seconds, t_plan, "")
        longer = lengthen(p.cfg, dg.flags if previous is not None else {**dg.flags, "flag_unconverged": True})
        # the next attempt's expected seconds (inf: no attempt to make); need adds a 10% margin
        expected = seconds[-1] * growth(p.cfg, longer, pooled.seconds.sum(0), t_plan) if longer is not None else np.inf
        need = 1.1 * expected
        # under torchrun rank 0 decides for every rank (their clocks differ; their pooled flags do not)
        again = dist.broadcast(time.perf_counter() - t0 + need <= cfg.max_time)
        if not again:
            note = (f" (the next doubling would take ~{need:.0f} s beyond --max-time {cfg.max_time:.0f} s)"
                    if longer is not None else "")
            return Attempts(p, pl, pooled, th, dg, seconds, t_plan, note)
        log.info("attempt %d (%.0f s): %s; measuring again with doubled schedules (~%.0f s expected; --max-time %.0f s)",
                 len(seconds), seconds[-1], ", ".join(n for n, f in dg.flags.items() if n in LENGTHEN and np.any(f))
                 or "checking convergence", expected, cfg.max_time)
        previous, p = th.reported, replace(p, cfg=longer)


def measure(model: str | Path | EBM | Callable[[torch.Tensor], torch.Tensor], temps: Sequence[float] | np.ndarray | str = "auto", *,
            shape: Sequence[int] | None = None, ensemble: str = "auto", units: str = "train",
            t_train: float | None = None, data: str | Path | torch.Tensor | np.ndarray | None = "auto",
            seed: int = 0, device: str = "auto", progress: bool = False, config: MeasureConfig | None = None,
            heldout: str | Path | torch.Tensor | np.ndarray | tuple | None = "auto", **budget) -> xr.Dataset:
    """Estimate log Z, F, U, S, C, information (and the joint information quantities) at temperatures `temps`,
    every value with its standard error.

    Parameters
    ----------
    model : checkpoint path (.pt from `train`), thermo-ebm EBM, or a callable / nn.Module mapping float
        x [N, *shape] in the box [-1, 1]^d to logits f(x) [N, K]; E(x) = -logsumexp_y f(x)[y] (marginal) or
        E(x, y) = -f(x)[y] (joint).
    temps : temperatures T > 0 (any order; duplicates are an error), in `units`; or "auto" (the default): a quick
        scan locates the freezing point, the heat-capacity peak, T_ML and melting, and `auto_temps` temperatures
        are placed between them at equal thermodynamic length (temperatures.py; attributes temperatures_chosen,
        temperature_scan).
    shape : input shape, needed only for a plain callable.
    ensemble : "marginal" (p_T(x) on the box), "joint" (p_T(x, y); adds H_Y, H_Y_given_X, I_XY in bits) or
        "auto" (default): joint for a classifier's objective (j_ebm, gcl, hybrid, dcl) and for other models with
        K > 1 logits, marginal for m_ebm and single-logit models; the log names the choice.
    units : "train" (default): T in units of the training temperature T_train (a checkpoint's
        sgld_noise^2 / (2 sgld_step); else `t_train`, else a model's `training_temperature`, else 1), so T = 1 is
        the distribution the training chains targeted and U, F are in units of T_train; "raw": T and energies
        on the logits' scale.
    t_train : training temperature (logits' scale) for models that do not record one.
    data : reference states of the low-temperature phase, [M, *shape] in the box (tensor, array or .pt file);
        "auto": a checkpoint's training split and stored chains (none for other models); None or "none": none.
        With data, log Z comes from annealing a data-informed base at every temperature and the estimate from
        uniform is kept as log_Z_forward (flag_hysteresis where the two disagree).
    heldout : held-out images for the normalised likelihood: [M, *shape] in the box, a tuple (x, y), a .pt file
        of either (or a dict with 'x' and 'y'), or "auto": a checkpoint's held-out split (with as many
        training-split images for the generalisation gap; none for other models, or when the dataset is not
        readable here); None or "none": no likelihood. Images on the 8-bit grid are dequantised (one grey
        level of uniform noise); docs/estimators.md gives the convention.
    seed : seed of every chain (shards and ranks derive theirs from it).
    device : "auto", "cpu", "cuda" or "cuda:N".
    progress : progress bars (a terminal) or periodic log lines (elsewhere).
    config, **budget : a MeasureConfig and/or its fields as keywords (ais_chains=..., samples=...). With
        max_time (seconds), the run is repeated with the anneals (the data-seeded one's lambdas and move pairs per
        lambda; for mixing flags, the sweep) doubled while
        flags fire or the last doubling moved log Z beyond 4 SE (flag_unconverged, log_Z_shift), as long as the
        doubled run fits in the time left; attributes attempts, attempt_seconds and settings (the final budget)
        record what was spent, and a surviving flag's warning says what the next doubling would take.

    Returns
    -------
    xarray.Dataset on ascending `temperature` (as given; `temperature_raw` = T x T_train) with, per temperature:
    log_Z, F, U, S, C, info_bits (joint: H_Y_bits, H_Y_given_X_bits, I_XY_bits), each with `<name>_err`;
    cross-checks log_Z_forward, log_Z_reverse, log_Z_gap, log_Z_mbar, U_resid, C_resid (with data also
    origin_gap, origin_U_gap), all with SEs; diagnostics ess, ess_forward, pareto_k, ais_accept, accept,
    swap_accept, sweep_helpers, tau_E, step_size (engine smc: population_ess; joint with data: label_mix_z, the largest
    disagreement in p_T(y) between the sweep chains and the data-seeded weights, in SEs; with check_chains: base_gap,
    how far a second, independent base's replicas exceed log_Z + 4 SE, nats); int8 flags flag_nonfinite, flag_low_acceptance, flag_low_ess,
    flag_heavy_tails, flag_poor_mixing, flag_inconsistent, flag_rare_phase, flag_hysteresis (with data; a phase one origin
    or base missed); C_peak_T and C_peak_T_err (C_peak_flag: C is flagged at or next to its maximum); log_Z_cov and
    C_cov [temperature, temperature_b], the covariances between temperatures (SE of F(T2) - F(T1) = sqrt(T2^2 c22 + T1^2 c11 - 2 T1 T2 c12)); samples (and
    sample_labels); with held-out images: log_lik_heldout (log p_T(x), nats per image; joint with labels also
    log_lik_xy_heldout, log_lik_y_given_x_heldout), info_heldout_bits, bits_per_dim_heldout (quantised
    images), log_lik_train and generalisation_gap (auto), E_heldout, log_lik_heldout_cov, and T_ML with
    T_ML_err (attributes T_ML_side, T_ML_flagged). Units: log Z, S, C and likelihoods in nats (k_B = 1), names
    ending in _bits in bits; F and U in units of T_train (units "train") or the logits' scale (attribute
    energy_units); every variable carries `units` (UDUNITS; "1" with `units_metadata` for nats, bits and
    temperature scales) and `long_name`, the dataset its provenance. docs/estimators.md describes each estimator and flag.

    Example
    -------
    >>> ds = thermo_ebm.measure("checkpoints/run.pt", [0.5, 1.0, 2.0], ensemble="joint")
    >>> float(ds.I_XY_bits.sel(temperature=1.0)), float(ds.I_XY_bits_err.sel(temperature=1.0))
    """
    cfg = config or MeasureConfig()
    unknown = set(budget) - {f.name for f in fields(MeasureConfig)}
    if unknown:
        raise ThermoEBMError(f"unknown budget option(s): {', '.join(sorted(unknown))}")
    cfg = MeasureConfig(**{**asdict(cfg), **budget})
    if dist.active():  # under torchrun every process runs one shard
        if cfg.shards not in (1, dist.world()):
            raise ThermoEBMError(f"shards={cfg.shards} conflicts with the {dist.world()} processes")
        cfg.shards = dist.world()
    cfg.validate()
    kw = dict(shape=shape, ensemble=ensemble, units=units, t_train=t_train, data=data, device=device, seed=seed,
              heldout=heldout)
    auto = temps is None or (isinstance(temps, str) and temps == "auto")
    t0 = time.perf_counter()
    if auto:  # the scan's first step checks every input, before any sampling
        temps, why, scan = auto_temperatures(model, cfg, **kw)
        log.info("%s", why)
    p = prepare(model, temps, cfg=cfg, **kw)
    run = attempts(p, t0, progress)
    p, th, dg = run.problem, run.thermo, run.diagnosis
    for name, line in dg.warnings.items():
        log.warning("%s%s", line, run.note if name in LENGTHEN else "")
    hint = scale_hint(p, dg.flags)
    if hint:
        log.warning("%s", hint)
    ds = to_dataset(p, run.plan, th, dg.flags, dg.extra, run.pooled, time.perf_counter() - t0)
    if auto:
        ds.attrs.update(temperatures_chosen=why, temperature_scan=json.dumps(scan))
    if p.heldout is not None:
        ds = add_likelihood(ds, p, th, dg.flags)
    stages = {"pilot": round(run.plan_seconds, 1),
              **{k: round(float(v), 1) for k, v in zip(STAGES, run.pooled.seconds.sum(0))}}
    ds.attrs.update(attempts=len(run.seconds), attempt_seconds=json.dumps([round(a, 1) for a in run.seconds]),
                    stage_seconds=json.dumps(stages))
    return ds
