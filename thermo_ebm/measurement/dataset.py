"""A measurement as an xarray Dataset (`to_dataset`, `add_likelihood`) and its place in a results file
(`save_measurement`)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import xarray as xr

from ..files.results import annotate, provenance, write_group
from .anneal import Plan
from .flags import AFFECTS, peak_flagged
from .inputs import Problem
from .likelihood import heldout_likelihood
from .records import Pooled
from .thermo import Thermo

log = logging.getLogger("thermo_ebm")


def to_dataset(p: Problem, pl: Plan, th: Thermo, flags: dict, extra: dict, pooled: Pooled, seconds: float) -> xr.Dataset:
    """The xarray.Dataset a measurement returns (ascending temperature, CF metadata, provenance)."""
    cfg = p.cfg
    rev = slice(None, None, -1)  # ascending beta -> ascending temperature
    data_vars = {}
    for name, (v, e) in {**th.out, **th.diag}.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
        data_vars[name + "_err"] = ("temperature", np.asarray(e, dtype=np.float64)[rev])
    for name, v in extra.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
    for name, f in flags.items():
        data_vars[name] = ("temperature", np.asarray(f)[rev].astype(np.int8))
    data_vars["C_peak_T"], data_vars["C_peak_T_err"] = ((), th.peak[0]), ((), th.peak[1])
    data_vars["C_peak_flag"] = ((), np.int8(peak_flagged(th.out["C"][0], flags, th.peak[0])))
    for name, cov in th.cov.items():  # between temperatures: SE of differences such as F(T1) - F(T2)
        data_vars[name + "_cov"] = (["temperature", "temperature_b"], np.asarray(cov, dtype=np.float64)[rev, rev])
    xs = pooled.sweep.samples[:, : cfg.keep_samples][rev]
    sdims = ["temperature", "sample"] + [f"pixel_dim{i}" for i in range(len(p.shape))]
    data_vars["samples"] = (sdims, xs.astype(np.float32))
    if th.p_y is not None:  # the class shares p_T(y), [T, K]
        data_vars["p_y"] = (["temperature", "class"], th.p_y[0][rev])
        data_vars["p_y_err"] = (["temperature", "class"], th.p_y[1][rev])
    if p.ens.kind == "joint":
        data_vars["sample_labels"] = (["temperature", "sample"], pooled.sweep.labels[:, : cfg.keep_samples][rev])
    energy_units = "T_train (multiply by T_train for the logits' units)" if p.units == "train" and p.t_train != 1.0 \
        else "the logits' units"
    attrs = {
        "kind": "measurement", "ensemble": p.ens.kind, "n_classes": p.ens.n_classes, "dimension": p.d,
        "shape": json.dumps(list(p.shape)), "log_Omega": p.ens.log_omega(p.d), "seed": p.seed,
        "device": str(p.device), "settings": json.dumps(asdict(cfg)), **provenance(),
        "ais_schedule_length": len(pl.schedule), "thermodynamic_length": pl.length, "mbar_ok": int(th.mbar_ok),
        "ais_schedule_capped": int(pl.capped),
        "sweep_burn_in": int(pooled.sweep.length[0, 0]), "sweep_samples": int(pooled.sweep.length[0, 1]),
        "seconds": seconds, "units": "log_Z, S, C and likelihoods in nats (k_B = 1), names ending in _bits in bits, F and U in "
                 "energy_units, temperatures in temperature_units (each variable's units and units_metadata say which)",
        "T_train": p.t_train, "temperature_units": p.units, "energy_units": energy_units,
        "data": p.data_source, "log_Z_source": "data-seeded anneal" if th.from_data is not None else "forward AIS from uniform",
        **p.desc,
    }
    if th.from_data is not None:
        attrs["bridge_schedule_length"] = int(pooled.seeded.steps.max())   # the longest temperature's path
        attrs["bridge_schedule_lengths"] = json.dumps(pooled.seeded.steps.max(0)[rev].tolist())  # ascending T
        attrs["bridge_thermodynamic_length_max"] = float(pooled.seeded.length.max())
        attrs["bridge_resamples_per_population"] = float(pooled.seeded.resampled.mean())
    coords = {"temperature": p.temps, "temperature_raw": ("temperature", p.temps * p.t_ref),
              "temperature_b": ("temperature_b", p.temps)}
    if th.p_y is not None:
        coords["class"] = np.arange(p.ens.n_classes)
    return annotate(xr.Dataset(data_vars, coords=coords, attrs=attrs), p.units, energy_units)


def add_likelihood(ds: xr.Dataset, p: Problem, th: Thermo, flags: dict) -> xr.Dataset:
    """The held-out likelihood per temperature, T_ML and its side, into the dataset (`likelihood.py`)."""
    lik = heldout_likelihood(p.net, p.shape, p.ens, p.betas, p.temps, p.d, p.heldout, p.train_split,
                             th.reported.value, th.cov["log_Z"], *th.out["U"], p.device)
    rev = slice(None, None, -1)
    new = {}
    for name, (v, e) in lik.out.items():
        new[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
        new[name + "_err"] = ("temperature", np.asarray(e, dtype=np.float64)[rev])
    new["log_lik_heldout_cov"] = (["temperature", "temperature_b"], lik.cov[rev, rev])
    new["T_ML"], new["T_ML_err"] = ((), lik.t_ml[0]), ((), lik.t_ml[1])
    ds = ds.assign(new)
    # T_ML rests on U at the two temperatures that bracket it (outside the range: the nearest edge)
    t_asc = p.temps
    if lik.t_ml_side == "inside":
        i = int(np.searchsorted(t_asc, lik.t_ml[0]))
        near = [max(i - 1, 0), min(i, len(t_asc) - 1)]
    else:
        near = [0] if lik.t_ml_side == "below" else [len(t_asc) - 1]
    u_flags = [n for n in AFFECTS if "T_ML" in AFFECTS[n] or AFFECTS[n].startswith("all")]
    flagged = any(bool(np.asarray(flags[n])[rev][near].any()) for n in u_flags if n in flags)
    ds.attrs.update(heldout=p.heldout.source, T_ML_side=lik.t_ml_side,
                    T_ML_flagged=int(flagged), heldout_levels=int(p.heldout.levels or 0),
                    heldout_dequantisation="x = -1 + (2 / L)(k + u), u ~ U(0, 1), L grey levels" if p.heldout.levels
                    else "none (continuous states)")
    if p.train_split is not None:
        ds.attrs["train_split"] = p.train_split.source
    msg = {"inside": f"T_ML = {lik.t_ml[0]:.4g} +- {lik.t_ml[1]:.2g}", "below": "T_ML lies below the lowest temperature",
           "above": "T_ML lies above the highest temperature"}.get(lik.t_ml_side, "T_ML undetermined")
    log.info("held-out likelihood (%s): %s (%s units)", p.heldout.source, msg, p.units)
    return annotate(ds, p.units, ds.attrs["energy_units"])


def save_measurement(ds: xr.Dataset, path, group: str | None = None, replace: bool = False) -> str:
    """Write a measurement as a group of results file `path`: `group` (refused if it exists, unless replace)
    or the first free name measure_<ensemble>[_n], chosen under the file's lock."""
    return write_group(path, group, ds, replace=replace, base=f"measure_{ds.attrs['ensemble']}")
