"""Evaluation of a trained checkpoint and its link to the thermodynamics: T_cal (the temperature that
calibrates softmax(f / T) on held-out data), the heat-capacity peak and I(X;Y)(T) on one raw-temperature axis.
Prints and writes benchmarks/results/evaluate_trained_<name>.json and docs/evaluation_<name>.png.

    python benchmarks/evaluate_trained.py          # the digits demo model (trained if needed), its measurement
                                                   # from benchmarks/measure_trained.py (run that first)
    python benchmarks/evaluate_trained.py --name mnist --also mnist_raw   # both MNIST measurements on one axis
"""
import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from thermo_ebm import evaluate  # noqa: E402
from thermo_ebm.reporting.plot import flagged  # noqa: E402
from thermo_ebm.files.results import groups_of_kind, read_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--name", default="digits")
p.add_argument("--also", action="append", default=[], metavar="NAME",
               help="another measure_trained.py result of the same checkpoint to draw (e.g. mnist_raw)")
p.add_argument("--work", default="/tmp/thermo_ebm_measure_trained", help="measure_trained.py's folder")
a = p.parse_args()
work = Path(a.work)
os.chdir(work)
runs = []
for name in [a.name, *a.also]:
    h5 = work / f"measure_trained_{name}.h5"
    if not h5.exists():
        raise SystemExit(f"{h5} not found: run benchmarks/measure_trained.py --name {name} first")
    runs.append((name, read_group(h5, groups_of_kind(h5, "measurement")[0])))
meas = runs[0][1]
ckpt = meas.attrs["checkpoint"]
t0 = time.perf_counter()
ev = evaluate(ckpt, seed=0, device="cpu")
sec = time.perf_counter() - t0
t_train = float(meas.attrs["T_train"])
t_cal, t_cal_se = float(ev.t_cal), float(ev.t_cal_err)

fig, ax = plt.subplots(figsize=(6.2, 3.6), constrained_layout=True)
peaks, t_all = {}, [t_cal, t_train]
for i, (name, ds) in enumerate(runs):
    t_raw, y, e = ds.temperature_raw.values, ds.I_XY_bits.values, ds.I_XY_bits_err.values
    t_all += list(t_raw)
    ax.plot(t_raw, y, "-o", ms=3, color=f"C{3 * i}", label=f"$I(X;Y)$ (bits), {name}")
    ax.fill_between(t_raw, y - e, y + e, color=f"C{3 * i}", alpha=0.25, lw=0)
    flag = flagged(ds)
    ax.plot(t_raw[flag], y[flag], "x", color="red", ms=6, label="flagged temperatures" if i == 0 else None)
    scale = float(ds.temperature_raw[0] / ds.temperature[0])
    peak, peak_se = float(ds.C_peak_T) * scale, float(ds.C_peak_T_err) * scale
    peaks[name] = [peak, peak_se]
    if np.isfinite(peak):
        bad = " (C flagged there)" if int(ds.get("C_peak_flag", 0)) else ""
        if not bad:  # a flagged peak's SE is not trustworthy: no band
            ax.axvspan(peak - peak_se, peak + peak_se, color="C2", alpha=0.3)
        ax.axvline(peak, color="C2", ls="--", label=f"C peak ({name}) = {peak:.3g} ± {peak_se:.2g}{bad}")
ax.axvspan(t_cal - t_cal_se, t_cal + t_cal_se, color="C1", alpha=0.3)
ax.axvline(t_cal, color="C1", label=f"$T_{{cal}}$ = {t_cal:.3g} ± {t_cal_se:.2g}")
ax.axvline(t_train, color="grey", ls=":", label=f"$T_{{train}}$ = {t_train:.3g}")
if max(t_all) / min(t_all) > 20:  # temperatures over decades: log axis
    ax.set_xscale("log")
if not any(np.isfinite(v[0]) for v in peaks.values()):
    ax.text(0.02, 0.97, "no interior heat-capacity peak in the measured range", transform=ax.transAxes, va="top",
            fontsize=7, color="0.35")
ax.set(xlabel="temperature on the logits' scale", ylabel="bits",
       title=f"{a.name}: calibration temperature, heat-capacity peak, I(X;Y)")
ax.legend(fontsize=7)
fig_path = ROOT / "docs" / f"evaluation_{a.name}.png"
fig.savefig(fig_path, dpi=150)
row = dict(checkpoint=ckpt, date=str(date.today()), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
           seconds=round(sec, 1), T_train=t_train, T_cal=[t_cal, t_cal_se], C_peak_raw=peaks,
           **{k: [float(ev[k]), float(ev[k + "_err"])] for k in ("accuracy", "nll", "brier", "ece")},
           auroc={f"{s}/{c}": [float(ev.auroc.sel(ood_set=s, score=c)), float(ev.auroc_err.sel(ood_set=s, score=c))]
                  for s in ev.ood_set.values for c in ev.score.values},
           samples={k: dict(saturated=float(ev.saturated_fraction[i]), confidence=float(ev.confidence[i]),
                            pca_frechet=[float(ev.pca_frechet[i]), float(ev.pca_frechet_err[i])],
                            **({"mnist_feature_frechet": [float(ev.mnist_feature_frechet[i]),
                                                          float(ev.mnist_feature_frechet_err[i])]}
                               if "mnist_feature_frechet" in ev else {}))
                    for i, k in enumerate(ev.chain_kind.values)},
           figure=str(fig_path.relative_to(ROOT)))
print(json.dumps(row, indent=1))
out = ROOT / "benchmarks" / "results" / f"evaluate_trained_{a.name}.json"
out.write_text(json.dumps(row, indent=1))
print("->", out)
