"""`show`: the groups of a results file and, per measurement, a table with standard errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import NOMINAL
from ..errors import ThermoEBMError
from ..files.results import file_sha256, list_groups, read_group

COLS = ["F", "U", "S", "C", "info_bits"]


# the attributes `show --json` carries for every group: how and from what it was made
PROVENANCE = ("command_line", "created_utc", "working_directory", "git_commit", "versions", "platform", "checkpoint",
              "checkpoint_abs", "checkpoint_sha256", "checkpoint_step", "data", "data_sha256", "heldout",
              "heldout_sha256", "seed", "device", "settings", "config", "seconds")


def read_attrs(path, group) -> dict:
    """A group's attributes, read without its variables."""
    import h5py
    with h5py.File(path, "r") as f:
        return {k: (v.item() if isinstance(v, np.generic) else v.decode() if isinstance(v, bytes) else v)
                for k, v in f[group].attrs.items() if not k.startswith("_")}


def scale_line(ds) -> str:
    """Which temperature scale a measurement is on (and where the training distribution sits)."""
    t_train = float(ds.attrs.get("T_train", 1.0))
    if ds.attrs.get("temperature_units") == "train" and t_train != 1.0:
        chains, accepted = ds.attrs.get("training_chains"), ds.attrs.get("training_moves_accepted")
        if accepted is not None and accepted < NOMINAL:
            where = (f"T_train, nominal: the training moves pass the Metropolis test there {100 * accepted:.0f}% of "
                     "the time, so the chains did not sample it (docs/training.md, Sampler)")
        elif chains is None or ds.attrs.get("ensemble") in chains.split(" and "):
            where = "the distribution the training chains targeted"
        elif chains == "none":
            where = "T_train, nominal: this model was trained without chains"
        else:
            where = (f"the training chains' temperature, but they sampled the {chains} ensemble, not this one "
                     f"(docs/training.md, Objectives)")
        return f"T in units of T_train = {t_train:.4g} (T = 1: {where}; raw T = T x T_train); U, F in units of T_train"
    return f"T on the logits' scale (T_train = {t_train:.4g})" if "T_train" in ds.attrs else "T on the logits' scale"


def free_energy_difference(ds, t1: float, t2: float) -> dict:
    """F(t2) - F(t1) and log Z(t2) - log Z(t1) with SEs from the stored covariance of log Z between
    temperatures (F = -T log Z); t1, t2 on the measurement's temperature coordinate."""
    temps = ds.temperature.values
    idx = []
    for t in (t1, t2):
        hit = np.flatnonzero(np.isclose(temps, t, rtol=1e-9, atol=0))
        if hit.size == 0:
            raise ThermoEBMError(f"T = {t:g} is not a measured temperature ({', '.join(f'{v:g}' for v in temps)})")
        idx.append(int(hit[0]))
    if "log_Z_cov" not in ds:
        raise ThermoEBMError("this measurement stores no log_Z_cov (written by an older thermo-ebm); re-measure")
    i, j = idx
    c = ds.log_Z_cov.values
    lz = ds.log_Z.values
    var_lz = c[i, i] + c[j, j] - 2 * c[i, j]
    var_f = (t2 * t2 * c[j, j] + t1 * t1 * c[i, i] - 2 * t1 * t2 * c[i, j])
    return {"T1": t1, "T2": t2, "dlog_Z": float(lz[j] - lz[i]), "dlog_Z_err": float(np.sqrt(max(var_lz, 0.0))),
            "dF": float(-t2 * lz[j] + t1 * lz[i]), "dF_err": float(np.sqrt(max(var_f, 0.0)))}


def checkpoint_path(ds, results_file=None) -> Path | None:
    """Where the measured checkpoint is now: its absolute path as recorded, else its recorded (relative) path
    from the folder the measurement ran in, beside the results file, or from here; None if none exists."""
    rel = ds.attrs.get("checkpoint")
    if not rel:
        return None
    tries = [ds.attrs.get("checkpoint_abs")]
    if not Path(rel).is_absolute():
        tries += [Path(ds.attrs["working_directory"]) / rel if ds.attrs.get("working_directory") else None,
                  Path(results_file).parent / rel if results_file else None,
                  Path(results_file).parent / Path(rel).name if results_file else None]
    tries.append(rel)
    return next((Path(t) for t in tries if t and Path(t).is_file()), None)


def checkpoint_note(ds, results_file=None) -> str | None:
    """A warning when the checkpoint a measurement names is gone or no longer the one measured."""
    name, digest = ds.attrs.get("checkpoint"), ds.attrs.get("checkpoint_sha256")
    if not name or not digest:
        return None
    path = checkpoint_path(ds, results_file)
    if path is None:
        return f"warning: the measured checkpoint {ds.attrs.get('checkpoint_abs', name)} is no longer on disk"
    if file_sha256(path) != digest:
        return (f"warning: {path} has changed since it was measured (sha256 {digest[:12]}... measured); "
                "these numbers describe the earlier model")
    return None


def _on_scale(ds, t_raw: float) -> float:
    """A temperature on the logits' scale, on this measurement's temperature scale."""
    return t_raw / float(ds.attrs.get("T_train", 1.0)) if ds.attrs.get("temperature_units") == "train" else t_raw


def reference_temperatures(ds, t_cal_raw: float | None = None) -> dict:
    """T_train, T_ML, T* (the C peak) and T_cal (from an evaluation, given on the logits' scale), each as
    (value, SE or nan, note) on the measurement's temperature scale; absent ones are left out."""
    out = {"T_train": (_on_scale(ds, float(ds.attrs.get("T_train", 1.0))), 0.0, "")}
    side = ds.attrs.get("T_ML_side")
    if side is not None:
        flag = " (flagged)" if int(ds.attrs.get("T_ML_flagged", 0)) else ""
        if side == "inside":
            out["T_ML"] = (float(ds.T_ML), float(ds.T_ML_err), flag)
        else:
            out["T_ML"] = (np.nan, np.nan, {"below": "below the range", "above": "above the range"}.get(side, side))
    if "C_peak_T" in ds and np.isfinite(float(ds.C_peak_T)):
        out["T*"] = (float(ds.C_peak_T), float(ds.C_peak_T_err), " (flagged)" if bool(ds.get("C_peak_flag", 0)) else "")
    if t_cal_raw is not None and np.isfinite(t_cal_raw):
        out["T_cal"] = (_on_scale(ds, t_cal_raw), np.nan, "")
    return out


def reference_line(ds, t_cal_raw: float | None = None) -> str:
    """The reference temperatures in one line, on the measurement's scale (named)."""
    unit = "T_train" if ds.attrs.get("temperature_units") == "train" else "the logits' scale"
    parts = []
    for name, (v, se, note) in reference_temperatures(ds, t_cal_raw).items():
        if not np.isfinite(v):
            parts.append(f"{name} {note}")
        else:
            parts.append(f"{name} = {v:.4g}" + (f" ±{se:.2g}" if np.isfinite(se) and se > 0 else "") + note)
    return f"temperatures (in units of {unit}): " + ", ".join(parts)


def _t_cal(path, groups) -> float | None:
    """T_cal (logits' scale) of the file's evaluation group, if any."""
    for name, kind in groups.items():
        if kind == "evaluation":
            ds = read_group(path, name)
            if "t_cal" in ds:
                return float(ds.t_cal)
    return None


def _likelihood_lines(ds, rows) -> list:
    """The held-out likelihood table (primary log-likelihood, bits saved, bits/dim, generalisation gap)."""
    cols = ["log_lik_heldout", "info_heldout_bits"] + [c for c in ("bits_per_dim_heldout", "generalisation_gap") if c in ds]
    lines = [f"held-out likelihood ({ds.attrs.get('heldout')}; nats per image, bits saved over uniform coding"
             + (f", bits/dim of the images dequantised at their {int(ds.attrs.get('heldout_levels', 0))} grey levels"
                if "bits_per_dim_heldout" in ds else "") + ")",
             f"{'T':>6} " + " ".join(f"{c:>24}" for c in cols)]
    for i, r in enumerate(rows):
        for c in cols:
            r[c], r[c + "_err"] = float(ds[c].values[i]), float(ds[c + "_err"].values[i])
        lines.append(f"{r['T']:>6.3g} " + " ".join(f"{r[c]:>15.5g} ±{r[c + '_err']:<7.2g}" for c in cols))
    return lines


def peak_outside(ds) -> str:
    """Where the heat-capacity maximum lies when it is not inside the measured range."""
    t, c = ds.temperature.values, ds.C.values
    if len(t) < 2 or not np.all(np.isfinite(c)):
        return "heat-capacity peak: none inside the temperature range"
    i = int(np.argmax(c))
    if i == 0:
        return (f"heat-capacity peak: below the range (C rises towards the lowest temperature, {c[0]:.4g} at "
                f"T = {t[0]:g}); measure lower, or let --temps auto find it")
    if i == len(t) - 1:
        return (f"heat-capacity peak: above the range (C rises towards the highest temperature, {c[-1]:.4g} at "
                f"T = {t[-1]:g}); measure higher, or let --temps auto find it")
    return "heat-capacity peak: none inside the temperature range"


ONE_CLASS = 0.99  # a class share p_T(y) at or above which `show` says one class holds the joint ensemble


def class_share_line(ds) -> str | None:
    """Where one class holds the joint ensemble's mass (p_T(y) >= ONE_CLASS), the line that says so: H(Y), and
    with it I(X;Y), is then ~0 however well the classifier separates the data. None elsewhere."""
    share, top, temps = ds.p_y.values.max(1), ds.p_y.values.argmax(1), ds.temperature.values
    one = share >= ONE_CLASS
    if not one.any():
        return None
    ts = temps[one]
    where = (", ".join(f"{t:g}" for t in ts) if len(ts) <= 6
             else f"{ts[0]:g} to {ts[-1]:g} ({len(ts)} of {len(temps)} temperatures)")
    cls = ", ".join(str(int(c)) for c in sorted(set(top[one])))
    return (f"one class holds the joint ensemble (p_T(y) >= {ONE_CLASS} for class {cls}) at T = {where}: H(Y) and "
            "I(X;Y) are ~0 there, since the model's samples are all of that class, however well it classifies data")


def _flags(ds, i):
    """The names of the flags raised at temperature i, in the order the results file holds them, or "ok"."""
    return ",".join(f.replace("flag_", "") for f in ds.data_vars if f.startswith("flag_") and int(ds[f].values[i])) or "ok"


def peak_line(ds) -> str:
    """The heat-capacity peak T* with its SE (and its flag), or where the maximum lies outside the range."""
    if "C_peak_T" in ds and np.isfinite(float(ds.C_peak_T)):
        bad = " (flagged: C is flagged at or next to its maximum)" if bool(ds.get("C_peak_flag", 0)) else ""
        return f"heat-capacity peak T* = {float(ds.C_peak_T):.4g} ±{float(ds.C_peak_T_err):.2g}{bad}"
    return peak_outside(ds)


def flags_line(ds) -> str:
    """How many temperatures are unflagged, and the flags of the others."""
    marks = [_flags(ds, i) for i in range(ds.sizes["temperature"])]
    bad = [f"{t:g} ({m})" for t, m in zip(ds.temperature.values, marks) if m != "ok"]
    return (f"unflagged at {len(marks) - len(bad)} of {len(marks)} temperatures"
            + (f"; flagged: T = {', '.join(bad)} (docs/estimators.md, Flags)" if bad else ""))


def information_line(ds) -> str | None:
    """A joint measurement's class information at the training temperature (T = 1 on the T_train scale), when
    the grid holds it."""
    if "I_XY_bits" not in ds or ds.attrs.get("temperature_units") != "train":
        return None
    at = np.flatnonzero(np.isclose(ds.temperature.values, 1.0))
    if not len(at):
        return None
    i = int(at[0])
    mark = _flags(ds, i)

    def bits(name):  # to a thousandth of a bit: a one-class ensemble reads 0.000, not -1e-15
        return f"{round(float(ds[name].values[i]), 3) + 0.0:.3f} ±{float(ds[name + '_err'].values[i]):.3f} bits"
    return (f"at T_train: I(X;Y) = {bits('I_XY_bits')}, H(Y) = {bits('H_Y_bits')}"
            + (f" (flagged: {mark})" if mark != "ok" else ""))


def summary_lines(ds) -> list:
    """What `measure` prints when it is done: flags, the class information at T_train, a class holding the
    ensemble, the heat-capacity peak and the reference temperatures."""
    one = class_share_line(ds) if "p_y" in ds else None
    return [line for line in (flags_line(ds), information_line(ds), one, peak_line(ds), reference_line(ds)) if line]


def report(path, as_json=False, diff=None, groups=None) -> str:
    """The text (or JSON) `show` prints; diff=(T1, T2) adds F(T2) - F(T1) with its SE per measurement; groups:
    the names to print (default all)."""
    every = list_groups(path)
    missing = [g for g in groups or () if g not in every]
    if missing:
        raise ThermoEBMError(f"{path} has no group {missing[0]!r} (groups: {', '.join(every) or 'none'})")
    groups = {g: k for g, k in every.items() if groups is None or g in groups}
    doc = {"file": str(path), "groups": {}}
    lines = [f"{path}"]
    if not groups:
        lines.append("no groups yet (a results file gets one per `train`, `measure` or `eval`)")
    t_cal = _t_cal(path, groups)
    for name, kind in groups.items():
        if kind == "measurement":
            ds = read_group(path, name)
            cols = COLS + [c for c in ("I_XY_bits",) if c in ds]
            rows = []
            for i, t in enumerate(ds.temperature.values):
                row = {"T": float(t)}
                for c in cols + ["log_Z"]:
                    row[c], row[c + "_err"] = float(ds[c].values[i]), float(ds[c + "_err"].values[i])
                row["flags"] = _flags(ds, i)
                rows.append(row)
            doc["groups"][name] = {"kind": kind, "ensemble": ds.attrs.get("ensemble"), "rows": rows,
                                   "temperature_units": ds.attrs.get("temperature_units", "raw"),
                                   "T_train": float(ds.attrs.get("T_train", 1.0))}
            lines.append(f"\n[{name}] measurement, ensemble={ds.attrs.get('ensemble')}, d={ds.attrs.get('dimension')}, "
                         "nats (k_B = 1), info in bits")
            lines.append(scale_line(ds) + f"; log Z from {ds.attrs.get('log_Z_source', 'forward AIS from uniform')}"
                         + (f" (data: {ds.attrs['data']})" if ds.attrs.get("data", "none") != "none" else ""))
            head = f"{'T':>6} " + " ".join(f"{c:>20}" for c in cols) + "  flags"
            lines.append(head)
            for r in rows:
                cells = " ".join(f"{r[c]:>11.4g} ±{r[c + '_err']:<7.2g}" for c in cols)
                lines.append(f"{r['T']:>6.3g} {cells}  {r['flags']}")
            if "log_lik_heldout" in ds:
                lines += _likelihood_lines(ds, rows)
            neg = [r["T"] for r in rows if "I_XY_bits" in r and r["I_XY_bits"] < 0]
            if neg:
                lines.append("I_XY_bits below 0 at T = " + ", ".join(f"{t:g}" for t in neg) + ": H(Y) - H(Y|X) from two "
                             "estimators; I(X;Y) >= 0, so read these as 0 within their SEs")
            if "p_y" in ds:
                doc["groups"][name]["p_y"] = {"values": ds.p_y.values.tolist(), "se": ds.p_y_err.values.tolist()}
                one = class_share_line(ds)
                if one:
                    lines.append(one)
            note = checkpoint_note(ds, path)
            if note:
                lines.append(note)
                doc["groups"][name]["warning"] = note
            if diff is not None:
                dd = free_energy_difference(ds, *diff)
                doc["groups"][name]["diff"] = dd
                lines.append(f"F({dd['T2']:g}) - F({dd['T1']:g}) = {dd['dF']:.6g} ±{dd['dF_err']:.2g}; "
                             f"log Z({dd['T2']:g}) - log Z({dd['T1']:g}) = {dd['dlog_Z']:.6g} ±{dd['dlog_Z_err']:.2g} "
                             "(SEs from log_Z_cov)")
            if "C_peak_T" in ds:
                doc["groups"][name].update(C_peak_T=float(ds.C_peak_T), C_peak_T_err=float(ds.C_peak_T_err),
                                           C_peak_flag=bool(ds.get("C_peak_flag", 0)))
                lines.append(peak_line(ds))
            refs = reference_temperatures(ds, t_cal)
            doc["groups"][name]["reference_temperatures"] = {k: {"value": v, "se": e, "note": n.strip()}
                                                             for k, (v, e, n) in refs.items()}
            lines.append(reference_line(ds, t_cal))
        elif kind == "evaluation":
            from ..evaluation.evaluate import summary, table
            ds = read_group(path, name)
            doc["groups"][name] = {"kind": kind, **summary(ds)}
            lines.append(f"\n[{name}] evaluation")
            lines.append(table(ds))
        elif kind == "training":
            ds = read_group(path, name)
            info = {"kind": kind, "steps": int(ds.sizes.get("step", 0)), "epochs": int(ds.sizes.get("epoch", 0))}
            if "heldout_acc" in ds and ds.sizes.get("epoch", 0):
                info["heldout_acc"] = float(ds.heldout_acc.values[-1])
            chains = ""
            if "chains_class_mass" in ds.attrs:  # how the training chains split over the classes (training/loop.py)
                mass = json.loads(ds.attrs["chains_class_mass"])
                classes, top = json.loads(ds.attrs.get("classes", "null")) or list(range(len(mass))), int(np.argmax(mass))
                info["chains_class_mass"] = mass
                chains = (f"; the training chains' largest class: {classes[top]}, {mass[top]:.2f} of their "
                          "softmax(f / T_train) mass")
            moves = ""
            if np.isfinite(ds.attrs.get("sampler_acceptance", np.nan)):  # training/loop.py log_sampler_acceptance
                info["sampler_acceptance"] = float(ds.attrs["sampler_acceptance"])
                moves = (f"; the training moves pass the Metropolis test at T_train "
                         f"{100 * info['sampler_acceptance']:.1f}% of the time")
            fit = ""
            if "base_class_weights" in ds.attrs:  # the base's class weights fitted after training (training/loop.py)
                for key in ("base_class_weights", "base_class_log_mass", "base_class_log_mass_se",
                            "base_class_model_mass"):
                    info[key] = json.loads(ds.attrs[key])
                info["base_class_fit_gain"] = float(ds.attrs["base_class_fit_gain"])
                fit = (f"; the base's class weights fitted after training: {min(info['base_class_weights']):.3g}-"
                       f"{max(info['base_class_weights']):.3g}, the data's log-likelihood "
                       f"+{info['base_class_fit_gain']:.2f} nats per image")
            doc["groups"][name] = info
            acc = f", held-out accuracy {info['heldout_acc']:.4f}" if "heldout_acc" in info else ""
            lines.append(f"\n[{name}] training: {info['steps']} steps, {info['epochs']} epochs{acc}{chains}{moves}{fit}")
        else:
            doc["groups"][name] = {"kind": kind}
            lines.append(f"\n[{name}] ({kind})")
    for name in doc["groups"]:
        attrs = read_attrs(path, name)
        doc["groups"][name]["provenance"] = {k: attrs[k] for k in PROVENANCE if k in attrs}
    if as_json:
        return json.dumps(doc, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    return "\n".join(lines)
