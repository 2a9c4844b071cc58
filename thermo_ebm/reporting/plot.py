"""Publication figures from results files (headless, Agg): thermodynamics (+ information for joint),
samples at low/middle/high temperature, training history, and evaluation (reliability diagram, OOD score
histograms, samples by chain length). Several files overlay by run name."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import ThermoEBMError  # noqa: E402
from ..estimators import has_interior_max, parabola_peak  # noqa: E402
from ..files.fileio import check_writable_folder  # noqa: E402
from ..files.results import groups_of_kind, list_groups, read_group  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "figure.dpi": 150, "savefig.bbox": "tight", "axes.grid": True, "grid.alpha": 0.3})

PANELS = [("F", "free energy $F$ (nats)"), ("U", "internal energy $U$ (nats)"), ("S", "entropy $S$ (nats)"),
          ("C", "heat capacity $C$"), ("info_bits", "information (bits)")]
JOINT = [("H_Y_bits", "$H(Y)$ (bits)"), ("H_Y_given_X_bits", "$H(Y|X)$ (bits)"), ("I_XY_bits", "$I(X;Y)$ (bits)")]


def heat_capacity_peak(ds):
    """(T*, SE) of the C(T) maximum as `measure` stored it (parabola vertex; SE from the jackknife covariance
    of C between temperatures); None without an interior maximum. Files written before it was stored: the
    vertex, SE nan."""
    if "C_peak_T" in ds:
        t_star, se = float(ds.C_peak_T), float(ds.C_peak_T_err)
        return (t_star, se) if math.isfinite(t_star) else None
    t, c = ds.temperature.values, ds.C.values
    if not has_interior_max(c):
        return None
    return parabola_peak(t, c), math.nan


def _label(path, group, multi_groups):
    return f"{Path(path).stem}:{group}" if multi_groups else Path(path).stem


def _measurements(files, groups=None):
    """[(label, dataset, T_cal of the file's evaluation on the logits' scale or None)]; groups: names to keep."""
    out = []
    for f in files:
        gs = [g for g in groups_of_kind(f, "measurement") if groups is None or g in groups]
        ev = groups_of_kind(f, "evaluation")
        t_cal = float(read_group(f, ev[0]).t_cal) if ev else None
        for g in gs:
            out.append((_label(f, g, len(gs) > 1), read_group(f, g), t_cal))
    return out


MARKS = {"T_ML": "-", "T*": "--", "T_cal": "-.", "T_train": ":"}


def likelihood_panel(ax, ds, label, col, t_cal, first):
    """Held-out log p_T(x) per image (training split dashed) with 1-SE bands, and the reference temperatures
    T_ML, T*, T_cal (T_train: every panel's dotted line) as vertical lines (report.reference_temperatures)."""
    from .report import reference_temperatures
    _band(ax, ds, "log_lik_heldout", f"{label}: held-out", col)
    if "log_lik_train" in ds:
        ax.plot(ds.temperature.values, ds.log_lik_train.values, "--", lw=1, color=col, label=f"{label}: training split")
    for name, (v, se, note) in reference_temperatures(ds, t_cal).items():
        if name == "T_train" and not first:
            continue
        if np.isfinite(v) and ds.temperature.values.min() / 3 <= v <= 3 * ds.temperature.values.max():
            txt = f"{name} = {v:.3g}" + (f"±{se:.1g}" if np.isfinite(se) and se > 0 else "") + note
            ax.axvline(v, color=col if name != "T_train" else "0.6", ls=MARKS[name], lw=0.9, label=txt, gid=name)
        elif name == "T_ML" and note:
            ax.text(0.03, 0.05 if first else 0.12, f"$T_{{ML}}$ {note}", transform=ax.transAxes, fontsize=7, color=col)
    ax.set_ylabel("held-out $\\log p_T(x)$ (nats / image)")
    ax.set_title("held-out likelihood; $T_{ML}$ maximises it")


def flagged(ds) -> np.ndarray:
    """[T] bool: temperatures where any flag_* is raised (`show` lists which)."""
    flags = [ds[v].values.astype(bool) for v in ds.data_vars if v.startswith("flag_")]
    return np.any(flags, axis=0) if flags else np.zeros(ds.sizes["temperature"], bool)


def _band(ax, ds, var, label, color):
    t, y, e = ds.temperature.values, ds[var].values, ds[var + "_err"].values
    ax.plot(t, y, "-o", ms=2.5, lw=1.2, color=color, label=label)
    ax.fill_between(t, y - e, y + e, color=color, alpha=0.25, lw=0)
    bad = flagged(ds)
    if bad.any():
        ax.plot(t[bad], y[bad], "x", ms=5, color="tab:red", gid="flagged")


def _diagnostics(ax_gap, ax_res, ds, col, first):
    """Left: log Z cross-checks minus AIS log Z (nats). Right: consistency residuals in SE units."""
    t = ds.temperature.values
    checks = (("log_Z_reverse", "^", "reverse AIS"), ("log_Z_mbar", "s", "MBAR"), ("log_Z_forward", "v", "from uniform"))
    for var, mk, name in checks:
        if var == "log_Z_forward" and ds.attrs.get("log_Z_source") != "data-seeded anneal":
            continue  # the reported log Z itself
        if var in ds and np.any(np.isfinite(ds[var].values)):
            ax_gap.errorbar(t, ds[var].values - ds.log_Z.values, yerr=ds[var + "_err"].values, fmt=mk, ms=3,
                            color=col, alpha=0.8, lw=0.8, label=name if first else None,
                            mfc="none" if var == "log_Z_mbar" else col)
    if "flag_hysteresis" in ds:  # the two origins disagree: shade those temperatures
        for x in t[ds.flag_hysteresis.values.astype(bool)]:
            ax_gap.axvline(x, color="tab:red", alpha=0.15, lw=6)
    for var, mk, name in (("U_resid", "o", r"$U - (-\partial_\beta \log Z)$"), ("C_resid", "D", r"$C - dU/dT$")):
        if var in ds and np.any(np.isfinite(ds[var].values)):
            ax_res.plot(t, ds[var].values / ds[var + "_err"].values, mk, ms=3, color=col,
                        mfc=col if var == "U_resid" else "none", label=name if first else None)


def thermo_figure(runs, out):
    """F, U, S, C, info (+ H(Y), H(Y|X), I(X;Y) for joint) vs T with 1-SE bands, the C peak, and two
    diagnostics panels (log Z cross-checks; consistency residuals in SE units)."""
    joint = any(ds.attrs.get("ensemble") == "joint" for _, ds, _ in runs)
    n_rows = 3 if joint else 2
    fig, axes = plt.subplots(n_rows, 4, figsize=(12.5, 2.9 * n_rows), constrained_layout=True)
    axes = axes.ravel()
    ax_gap, ax_res = axes[5], axes[6]
    has_lik = any("log_lik_heldout" in ds for _, ds, _ in runs)
    if not has_lik:
        axes[7].set_visible(False)
    if joint:
        axes[11].set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (label, ds, t_cal) in enumerate(runs):
        col = colors[r % len(colors)]
        if "log_lik_heldout" in ds:
            likelihood_panel(axes[7], ds, label, col, t_cal, r == 0)
        for ax, (var, ylab) in zip(axes, PANELS):
            _band(ax, ds, var, label, col)
            ax.set_ylabel(ylab)
        peak = heat_capacity_peak(ds)
        if peak:
            se = f"±{peak[1]:.2g}" if math.isfinite(peak[1]) else " (no SE in this file)"
            axes[3].axvline(peak[0], color=col, ls="--", lw=0.8)
            why = "C flagged there" if int(ds.get("C_peak_flag", 0)) else "possible phase transition"
            axes[3].annotate(f"peak $T^*$={peak[0]:.3g}{se}\n({why})",
                             xy=(peak[0], float(np.nanmax(ds.C.values))), xytext=(4, -22),
                             textcoords="offset points", fontsize=7, color=col)
        elif r == 0:
            from .report import peak_outside
            where = peak_outside(ds).split(": ", 1)[1].split(" (")[0]
            axes[3].text(0.97, 0.95, f"peak: {where}", transform=axes[3].transAxes, ha="right",
                         va="top", fontsize=7, color="0.35")
        _diagnostics(ax_gap, ax_res, ds, col, r == 0)
        if ds.attrs.get("ensemble") == "joint":
            for ax, (var, ylab) in zip(axes[8:], JOINT):
                _band(ax, ds, var, label, col)
                ax.set_ylabel(ylab)
    ax_gap.axhline(0, color="k", lw=0.8)
    ax_gap.set_ylabel(r"cross-check $-$ AIS $\log Z$ (nats)")
    ax_gap.set_title("diagnostics: $\\log Z$ cross-checks")
    ax_res.axhspan(-2, 2, color="0.85", lw=0, zorder=0)
    ax_res.axhline(0, color="k", lw=0.8)
    ax_res.set_ylabel("residual / SE")
    ax_res.set_title("diagnostics: consistency (band = ±2 SE)")
    for ax in (ax_gap, ax_res) + ((axes[7],) if has_lik else ()):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7, framealpha=0.9)
    axes[3].set_title("heat capacity $C = \\mathrm{Var}(E)/T^2$")
    axes[4].set_title("information $= KL(p_T\\,\\|\\,$uniform$)$")
    xlabel = temperature_label(runs[0][1])
    for ax in axes:
        ax.set_xlabel(xlabel)
        if any(_train_units(ds) for _, ds, _ in runs) and not (has_lik and ax is axes[7]):
            ax.axvline(1.0, color="0.6", lw=0.8, ls=":", gid="T_train")
    axes[0].legend(loc="best")
    units = "; $U, F$ in units of $T_{train}$" if _train_units(runs[0][1]) else ""
    fig.suptitle(f"Thermodynamics vs temperature (±1 SE bands; red x: flagged temperatures; nats, $k_B=1${units})",
                 fontsize=11)
    return _save(fig, out)


def _train_units(ds) -> bool:
    return ds.attrs.get("temperature_units") == "train" and float(ds.attrs.get("T_train", 1.0)) != 1.0


def temperature_label(ds) -> str:
    """The x-axis label: which temperature scale the file holds (T = 1 marked where it is T_train)."""
    if _train_units(ds):
        return f"$T / T_{{train}}$ ($T_{{train}}$ = {float(ds.attrs['T_train']):.3g}; dotted: training chains)"
    return "temperature $T$ (logits' units)"


def _image_shape(shape):
    shape = list(shape)
    if len(shape) == 3:
        return shape
    d = int(np.prod(shape))
    s = int(math.isqrt(d))
    return [1, s, s] if s * s == d else None


def samples_figure(runs, out):
    """Figure of stored samples at the lowest, middle and highest temperature of a measurement."""
    label, ds, _ = runs[0]
    t = ds.temperature.values
    idx = sorted({0, len(t) // 2, len(t) - 1})
    shape = json.loads(ds.attrs.get("shape", "[]")) or list(ds.samples.shape[2:])
    img = _image_shape(shape)
    fig, axes = plt.subplots(1, len(idx), figsize=(3.2 * len(idx), 3.4), constrained_layout=True, squeeze=False)
    if "sample_labels" in ds:  # the same rows (every class) and columns in every panel
        all_labels = ds.sample_labels.values[idx]
        classes = np.arange(int(ds.attrs.get("n_classes", all_labels.max() + 1)))
        width = max(int((lab == y).sum()) for lab in all_labels for y in classes)
    for ax, i in zip(axes[0], idx):
        x = ds.samples.values[i].reshape(ds.samples.shape[1], -1)
        labels = ds.sample_labels.values[i] if "sample_labels" in ds else None
        if labels is not None:
            order = np.argsort(labels, kind="stable")
            x, labels = x[order], labels[order]
        if img is None:
            ax.scatter(x[:, 0], x[:, 1] if x.shape[1] > 1 else np.zeros(len(x)), s=6,
                       c=labels if labels is not None else None, cmap="tab10")
            ax.set_xlim(-1, 1)
            ax.set_ylim(-1, 1)
            ax.set_aspect("equal")
            ax.set_xlabel("$x_1$")
            ax.set_ylabel("$x_2$")
        else:
            c, h, w = img
            if labels is not None:      # one row per class, labelled on the left
                slots = [(r_, c_) for r_, y in enumerate(classes) for c_ in range(int((labels == y).sum()))]
                cols, rows = width, len(classes)
                ax.set_yticks([r_ * (h + 1) + h / 2 for r_ in range(rows)], [f"y={int(y)}" for y in classes])
            else:
                cols = int(math.ceil(math.sqrt(len(x))))
                rows = int(math.ceil(len(x) / cols))
                slots = [divmod(k, cols) for k in range(len(x))]
                ax.set_yticks([])
            canvas = np.ones((rows * (h + 1), cols * (w + 1), c))
            for k, (r_, c_) in enumerate(slots):
                canvas[r_ * (h + 1):r_ * (h + 1) + h, c_ * (w + 1):c_ * (w + 1) + w] = \
                    (x[k].reshape(c, h, w).transpose(1, 2, 0) + 1) / 2
            ax.imshow(canvas.squeeze(-1) if c == 1 else canvas.clip(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.grid(False)
        ax.set_title(f"T = {t[i]:.3g}")
    note = "; rows: label drawn from $p_T(y|x)$, empty where no stored sample drew it" if "sample_labels" in ds else ""
    fig.suptitle(f"Samples from $p_T$ ({label}, {ds.attrs.get('ensemble')} ensemble{note})", fontsize=10)
    return _save(fig, out)


def training_figure(files, out):
    """Figure of training histories: losses, held-out accuracy, energies, W, Q, dF."""
    runs = [(Path(f).stem, read_group(f, "training")) for f in files if "training" in list_groups(f)]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), constrained_layout=True)
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def smooth(v, k=None):
        k = k or max(1, len(v) // 100)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v
    for r, (name, ds) in enumerate(runs):
        col = colors[r % len(colors)]
        s = ds.step.values
        for var, ls in (("loss", "-"), ("ce", "--"), ("joint_ml", ":"), ("marginal_ml", "-."), ("reg", (0, (4, 1, 1, 1, 1, 1)))):
            if var in ds:
                v = smooth(ds[var].values)
                axes[0].plot(s[:len(v)], v, ls=ls, color=col, lw=1, label=f"{name}: {var}")
        if "heldout_acc" in ds and ds.sizes.get("epoch", 0):
            axes[1].plot(ds.epoch_end_step.values, ds.heldout_acc.values, "-o", ms=3, color=col, label=name)
        if "chains_top_class_mass" in ds and np.any(np.isfinite(ds.chains_top_class_mass.values)):
            axes[1].plot(ds.epoch_end_step.values, ds.chains_top_class_mass.values, "--s", ms=3, color=col, lw=1,
                         label=f"{name}: chains' largest class")
        for pop, ls in (("joint", "-"), ("marginal", "--")):
            for var, mk in (("e_data", "data"), ("e_model", "model")):
                if f"{pop}_{var}" in ds:
                    v = smooth(ds[f"{pop}_{var}"].values)
                    axes[2].plot(s[:len(v)], v, ls=ls, lw=1, color=col, alpha=1.0 if mk == "data" else 0.55,
                                 label=f"{name}: {pop} {mk}")
        for ax, key in ((axes[3], "W"), (axes[4], "Q"), (axes[5], "dF")):
            for pop, ls in (("joint", "-"), ("marginal", "--")):
                if f"{pop}_{key}" in ds and np.any(np.isfinite(ds[f"{pop}_{key}"].values)):
                    v = smooth(ds[f"{pop}_{key}"].values)
                    ax.plot(s[:len(v)], v, ls=ls, lw=1, color=col, label=f"{name}: {pop}")
    titles = ["loss terms", "held-out accuracy; the chains' largest class mass", "mean energies (nats)",
              "cumulative work $W$ per walker (nats)", "cumulative heat $Q$ per walker (nats)",
              "Jarzynski $\\Delta F$ since start (nats)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=6)
    fig.suptitle("Training history", fontsize=11)
    return _save(fig, out)


def _save(fig, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def evaluation_figure(ds, out):
    """Reliability diagram, OOD score histograms (held-out vs each shifted set, per score) and sample grids of
    the replay buffer and the long-run chains."""
    scores = list(ds.score.values)
    kinds = list(ds.chain_kind.values)
    ncol = max(len(scores) + 1, len(kinds))
    fig, axes = plt.subplots(2, ncol, figsize=(3.0 * ncol, 6.0), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.plot(ds.reliability_confidence.values, ds.reliability_accuracy.values, "-o", ms=3)
    ax.set(xlabel="confidence (equal-mass bins)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"ECE {float(ds.ece):.3f} ± {float(ds.ece_err):.3f}, T_cal {float(ds.t_cal):.3g}")
    sets = list(ds.input_set.values)
    for j, name in enumerate(scores):
        ax = axes[0, j + 1]
        v = ds.scores.values[:, j]
        lo, hi = np.nanpercentile(v, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for i, s in enumerate(sets):
            ax.hist(np.clip(v[i], lo, hi), bins=bins, histtype="step" if i else "stepfilled", alpha=1 if i else 0.35,
                    lw=1, label=s, density=True)
        ax.set(title=f"OOD score: {name}", xlabel="score (larger: more in-distribution)")
        if j == 0:
            ax.legend(fontsize=6)
    for j in range(ncol):
        axes[1, j].axis("off")
    for j, kind in enumerate(kinds):
        x = ds.chain_samples.values[j]
        n = x.shape[0]
        side = int(math.ceil(math.sqrt(n)))
        img = x.reshape(n, -1)
        pix = int(round(math.sqrt(img.shape[1])))
        if pix * pix != img.shape[1]:
            continue
        grid = np.ones((side * (pix + 1), side * (pix + 1)))
        for k in range(n):
            r, c = divmod(k, side)
            grid[r * (pix + 1):r * (pix + 1) + pix, c * (pix + 1):c * (pix + 1) + pix] = img[k].reshape(pix, pix)
        axes[1, j].imshow(grid, cmap="gray", vmin=-1, vmax=1)
        axes[1, j].set_title(f"{kind}: saturated {float(ds.saturated_fraction[j]):.2f}", fontsize=8)
    fig.suptitle("Evaluation: calibration, out-of-distribution scores, samples by chain length", fontsize=11)
    return _save(fig, out)


def plot_files(files, out=None, fmt="png", groups=None):
    """Render every figure the files support (measurements: only `groups`, when given); returns the written
    paths."""
    files = [Path(f) for f in files]
    kinds = {f: set(list_groups(f).values()) for f in files}
    if groups:
        have = {g for f in files for g in groups_of_kind(f, "measurement")}
        missing = [g for g in groups if g not in have]
        if missing:
            raise ThermoEBMError(f"no measurement group {missing[0]!r} in {', '.join(map(str, files))} "
                                 f"(measurement groups: {', '.join(sorted(have)) or 'none'})")
    for f, k in kinds.items():
        if not k & {"measurement", "training", "evaluation"}:
            raise ThermoEBMError(f"{f} has no measurement or training group (run `thermo-ebm measure` or `train`)")
    stem = Path(out) if out else files[0].with_suffix("")
    stem = stem.with_suffix("") if stem.suffix in (".png", ".pdf") else stem
    check_writable_folder(stem.with_suffix(f".{fmt}"), "figure")  # before any figure is drawn
    written = []
    runs = _measurements([f for f in files if "measurement" in kinds[f]], groups)
    if runs:
        written.append(thermo_figure(runs, stem.with_suffix(f".{fmt}")))
        written.append(samples_figure(runs, Path(f"{stem}_samples.{fmt}")))
    if any("training" in kinds[f] for f in files):
        written.append(training_figure([f for f in files if "training" in kinds[f]], Path(f"{stem}_training.{fmt}")))
    for f in files:
        for g in groups_of_kind(f, "evaluation"):
            name = f"{stem}_{g}.{fmt}" if f == files[0] else f"{f.with_suffix('')}_{g}.{fmt}"
            written.append(evaluation_figure(read_group(f, g), Path(name)))
    return written
