"""Evaluation of a trained checkpoint and its link to the thermodynamics: T_cal (the temperature that
calibrates softmax(f / T) on held-out data), the heat-capacity peak and I(X;Y)(T) on one raw-temperature axis.
Prints and writes benchmarks/results/evaluate_trained_<name>.json and docs/evaluation_<name>.png.

    python benchmarks/evaluate_trained.py          # the digits demo model (trained if needed), its measurement
                                                   # from benchmarks/measure_trained.py (run that first)
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
from thermo_ebm.results import groups_of_kind, read_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--name", default="digits")
p.add_argument("--work", default="/tmp/thermo_ebm_measure_trained", help="measure_trained.py's folder")
a = p.parse_args()
work = Path(a.work)
os.chdir(work)
h5 = work / f"measure_trained_{a.name}.h5"
if not h5.exists():
    raise SystemExit(f"{h5} not found: run benchmarks/measure_trained.py --name {a.name} first")
meas = read_group(h5, groups_of_kind(h5, "measurement")[0])
ckpt = meas.attrs["checkpoint"]
t0 = time.perf_counter()
ev = evaluate(ckpt, seed=0, device="cpu")
sec = time.perf_counter() - t0
t_train = float(meas.attrs["T_train"])
t_raw = meas.temperature_raw.values
peak, peak_se = float(meas.C_peak_T) * t_train, float(meas.C_peak_T_err) * t_train
t_cal, t_cal_se = float(ev.t_cal), float(ev.t_cal_err)

fig, ax = plt.subplots(figsize=(6.2, 3.6), constrained_layout=True)
y, e = meas.I_XY_bits.values, meas.I_XY_bits_err.values
ax.plot(t_raw, y, "-o", ms=3, label="$I(X;Y)$ (bits), measured")
ax.fill_between(t_raw, y - e, y + e, alpha=0.25, lw=0)
flag = np.any([meas[f].values for f in meas.data_vars if f.startswith("flag_")], axis=0).astype(bool)
ax.plot(t_raw[flag], y[flag], "x", color="red", ms=6, label="flagged temperatures")
ax.axvspan(t_cal - t_cal_se, t_cal + t_cal_se, color="C1", alpha=0.3)
ax.axvline(t_cal, color="C1", label=f"$T_{{cal}}$ = {t_cal:.3g} ± {t_cal_se:.2g}")
ax.axvspan(peak - peak_se, peak + peak_se, color="C2", alpha=0.3)
ax.axvline(peak, color="C2", ls="--", label=f"C peak = {peak:.3g} ± {peak_se:.2g}")
ax.axvline(t_train, color="grey", ls=":", label=f"$T_{{train}}$ = {t_train:.3g}")
ax.set(xlabel="temperature on the logits' scale", ylabel="bits",
       title=f"{a.name}: calibration temperature, heat-capacity peak, I(X;Y)")
ax.legend(fontsize=7)
fig_path = ROOT / "docs" / f"evaluation_{a.name}.png"
fig.savefig(fig_path, dpi=150)
row = dict(checkpoint=ckpt, date=str(date.today()), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
           seconds=round(sec, 1), T_train=t_train, T_cal=[t_cal, t_cal_se], C_peak_raw=[peak, peak_se],
           **{k: [float(ev[k]), float(ev[k + "_err"])] for k in ("accuracy", "nll", "brier", "ece")},
           auroc={f"{s}/{c}": [float(ev.auroc.sel(ood_set=s, score=c)), float(ev.auroc_err.sel(ood_set=s, score=c))]
                  for s in ev.ood_set.values for c in ev.score.values},
           samples={k: dict(saturated=float(ev.saturated_fraction[i]), confidence=float(ev.confidence[i]),
                            pca_frechet=[float(ev.pca_frechet[i]), float(ev.pca_frechet_err[i])])
                    for i, k in enumerate(ev.chain_kind.values)},
           figure=str(fig_path.relative_to(ROOT)))
print(json.dumps(row, indent=1))
out = ROOT / "benchmarks" / "results" / f"evaluate_trained_{a.name}.json"
out.write_text(json.dumps(row, indent=1))
print("->", out)
