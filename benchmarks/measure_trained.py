"""The flagship measurement: a trained checkpoint at the design-card temperatures 0.5:2:0.1 in units of its
training temperature, joint ensemble, reference data from its own training split and stored chains
(`thermo-ebm measure` defaults). Prints and writes benchmarks/results/measure_trained_<name>.json and the figure
docs/measure_trained_<name>.png: wall time, flags per temperature, the forward (uniform-started) vs data-seeded
log Z gap, the reverse-AIS gap, the C-peak temperature +- SE, I(X;Y) and info at T = 1.

    python benchmarks/measure_trained.py                       # trains the digits demo model if needed
    (measure runs with max_time = --max-time, 240 s by default: flagged runs are repeated with doubled schedules)
    python benchmarks/measure_trained.py --ckpt checkpoints/mnist_j_ebm.pt --name mnist
    python benchmarks/measure_trained.py --ckpt ... --name mnist_raw --raw-temps 4e-3:1:16 --max-time 0   # raw scale
    python benchmarks/measure_trained.py ... --raw-temps 4e-3:1:16 --add-raw-temps 0.0064,0.007   # a finer grid there
    python benchmarks/measure_trained.py ... --set samples=4000 --set burn_in=1500   # MeasureConfig fields (a longer sweep)
"""
import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from thermo_ebm import measure
from thermo_ebm.reporting.plot import plot_files
from thermo_ebm.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--ckpt", default=None, help="checkpoint [default: train the `make demo` digits model]")
p.add_argument("--name", default="digits")
p.add_argument("--work", default="/tmp/thermo_ebm_measure_trained")
p.add_argument("--max-time", type=float, default=240.0,
               help="measure's max_time: seconds for lengthening flagged runs (0: one attempt)")
p.add_argument("--engine", default="ais", choices=["ais", "smc"], help="measure's engine")
p.add_argument("--raw-temps", default=None, metavar="START:STOP:N",
               help="N geometrically spaced temperatures on the logits' scale instead of the design card's")
p.add_argument("--add-raw-temps", default="", metavar="T1,T2,...",
               help="temperatures on the logits' scale added to --raw-temps' grid (e.g. between two around a transition)")
p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
               help="a MeasureConfig field for this run, e.g. --set samples=4000 --set burn_in=1500")
a = p.parse_args()
budget = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
work = Path(a.work)
work.mkdir(parents=True, exist_ok=True)
os.chdir(work)
ckpt = a.ckpt
if ckpt is None:
    ckpt = "checkpoints/demo.pt"
    if not Path(ckpt).exists():  # the `make demo` training run
        # the model docs/estimators.md and README record: j_ebm with class-conditional chains
        train(name="demo", objective="j_ebm", dataset="digits", epochs=15, buffer_size=1000, lr_schedule="cosine",
              joint_estimator="chains", progress=False)
units = "train"
temps = np.round(np.arange(0.5, 2.0001, 0.1), 3)
if a.raw_temps:
    lo, hi, n = a.raw_temps.split(":")
    units, temps = "raw", np.geomspace(float(lo), float(hi), int(n))
    if a.add_raw_temps:
        temps = np.unique(np.concatenate([temps, [float(t) for t in a.add_raw_temps.split(",")]]))
t0 = time.perf_counter()
ds = measure(ckpt, temps, ensemble="joint", units=units, device="cpu", seed=0, max_time=a.max_time or None,
             engine=a.engine, **budget)
sec = time.perf_counter() - t0
h5 = work / f"measure_trained_{a.name}.h5"
h5.unlink(missing_ok=True)
from thermo_ebm.measurement.dataset import save_measurement  # noqa: E402
save_measurement(ds, h5)
fig = plot_files([h5], out=str(ROOT / "docs" / f"measure_trained_{a.name}"))[0]
flags = {k.replace("flag_", ""): [float(t) for t in ds.temperature.values[ds[k].values.astype(bool)]]
         for k in ds.data_vars if k.startswith("flag_")}
i1 = int(np.argmin(abs(ds.temperature.values - 1.0)))
row = dict(
    checkpoint=str(ckpt), date=str(date.today()), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
    threads=torch.get_num_threads(), seconds=round(sec, 1), T_train=ds.attrs["T_train"], units=units,
    temperatures=[float(t) for t in temps], flags=flags, stage_seconds=json.loads(ds.attrs["stage_seconds"]),
    C_peak_T=float(ds.C_peak_T), C_peak_T_err=float(ds.C_peak_T_err),
    temperature_raw=[float(t) for t in ds.temperature_raw.values],
    I_XY_bits=[[float(v), float(e)] for v, e in zip(ds.I_XY_bits.values, ds.I_XY_bits_err.values)],
    **({} if units != "train" else dict(
        I_XY_bits_at_1=[float(ds.I_XY_bits[i1]), float(ds.I_XY_bits_err[i1])],
        info_bits_at_1=[float(ds.info_bits[i1]), float(ds.info_bits_err[i1])])),
    origin_gap=[float(v) for v in ds.origin_gap.values] if "origin_gap" in ds else None,
    log_Z_gap_reverse=[float(v) for v in ds.log_Z_gap.values],
    C=[[float(v), float(e)] for v, e in zip(ds.C.values, ds.C_err.values)],
    ess=[float(v) for v in ds.ess.values], tau_E=[float(v) for v in ds.tau_E.values],
    swap_accept=[float(v) for v in ds.swap_accept.values] if "swap_accept" in ds else None,
    sweep_helpers=[float(v) for v in ds.sweep_helpers.values] if "sweep_helpers" in ds else None,
    sweep_length=[ds.attrs.get("sweep_burn_in"), ds.attrs.get("sweep_samples")], bridge_schedule_length=ds.attrs.get("bridge_schedule_length"),
    bridge_schedule_lengths=json.loads(ds.attrs.get("bridge_schedule_lengths", "null")),
    ais_schedule_length=ds.attrs["ais_schedule_length"], figure=str(Path(fig).relative_to(ROOT)),
    engine=a.engine, max_time=a.max_time, settings=budget, attempts=int(ds.attrs["attempts"]), attempt_seconds=json.loads(ds.attrs["attempt_seconds"]),
)
print(json.dumps(row, indent=1))
out = ROOT / "benchmarks" / "results" / f"measure_trained_{a.name}.json"
out.write_text(json.dumps(row, indent=1))
print("->", out)
