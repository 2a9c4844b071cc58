"""Accuracy of `measure` on exactly solvable systems: prints (system, d, T, quantity, estimate, exact, SE,
z-score, flagged, seconds) and writes benchmarks/results/measure_accuracy.json (or --out).

    python benchmarks/measure_accuracy.py [--dims 64,784] [--temps 0.5,1,2] [--systems gaussian,wells,rotated_data]

gaussian and wells run at the default budget without data. rotated_data is the non-separable case of
tests/test_phases.py::test_non_separable_784_dimensional_system_with_data (marked slow, this benchmark covers it):
`RotatedGaussian(d, cond=4, sd_max=0.05, seed=1)` with 2,000 exact draws at T = 0.5 as data and that test's
budget; the test asserts |z| < 4 or a flag at each temperature, and log Z within 1 nat.
"""
import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from thermo_ebm import measure
from thermo_ebm.testing import DoubleWells, RotatedGaussian, TruncatedGaussian

# rotated_data's budget: the arguments the slow test passes
ROTATED_BUDGET = dict(seed=5, ais_chains=64, replicas=8, crosscheck_steps=2000, chains=32, burn_in=200, samples=500,
                      reverse_steps=100, bridge_chains=256)


def case(name, d):
    """(system, measure's keyword arguments) of one named system at dimension d."""
    if name == "gaussian":
        return TruncatedGaussian(d), {}
    if name == "wells":
        return DoubleWells(d), {}
    if name == "rotated_data":
        system = RotatedGaussian(d, cond=4.0, sd_max=0.05, seed=1)
        return system, dict(data=system.sample(0.5, 2000, seed=3), **ROTATED_BUDGET)
    raise SystemExit(f"unknown system {name!r}")


p = argparse.ArgumentParser()
p.add_argument("--dims", default="64,784")
p.add_argument("--temps", default="0.5,1,2")
p.add_argument("--systems", default="gaussian,wells,rotated_data")
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "measure_accuracy.json"))
args = p.parse_args()
temps = [float(t) for t in args.temps.split(",")]
rows = []
print(f"{'system':<13}{'d':>5}{'T':>6} {'quantity':<10}{'estimate':>13}{'exact':>13}{'SE':>10}{'z':>7} flagged"
      f"{'sec':>7}")
for d in (int(x) for x in args.dims.split(",")):
    for name in args.systems.split(","):
        system, kwargs = case(name, d)
        t0 = time.perf_counter()
        ds = measure(system, temps, device="cpu", **kwargs)
        sec = time.perf_counter() - t0
        exact = system.exact(temps)
        flags = np.any([ds[k].values for k in ds.data_vars if k.startswith("flag_")], axis=0)
        raised = {k: ds[k].values.astype(int).tolist() for k in ds.data_vars if k.startswith("flag_") and ds[k].any()}
        for i, t in enumerate(temps):
            for q in ("log_Z", "U", "C", "S"):
                est, se, ex = float(ds[q][i]), float(ds[q + "_err"][i]), float(exact[q][i])
                z = (est - ex) / se
                rows.append(dict(system=name, d=d, T=t, quantity=q, estimate=est, exact=ex, se=se, z=z,
                                 flagged=bool(flags[i]), seconds=sec))
                print(f"{name:<13}{d:>5}{t:>6.2f} {q:<10}{est:>13.4f}{ex:>13.4f}{se:>10.4f}{z:>7.2f} "
                      f"{'yes' if flags[i] else 'no':>7}{sec:>7.0f}", flush=True)
        print(f"{name} d = {d}: flags raised {raised or 'none'}", flush=True)
out = Path(args.out)
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, 2 CPU cores", rows=rows),
                          indent=1))
print("max |z| =", max(abs(r["z"]) for r in rows), "; over unflagged entries:",
      max((abs(r["z"]) for r in rows if not r["flagged"]), default=float("nan")), "->", out)
