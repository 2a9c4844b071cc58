"""Accuracy of `measure` on exactly solvable systems: prints (system, d, T, quantity, estimate, exact, SE,
z-score, seconds) and writes benchmarks/results/measure_accuracy.json.

    python benchmarks/measure_accuracy.py [--dims 64,784] [--temps 0.5,1,2]
"""
import argparse
import json
import time
from pathlib import Path

from thermo_ebm import measure
from thermo_ebm.testing import DoubleWells, TruncatedGaussian

p = argparse.ArgumentParser()
p.add_argument("--dims", default="64,784")
p.add_argument("--temps", default="0.5,1,2")
args = p.parse_args()
temps = [float(t) for t in args.temps.split(",")]
rows = []
print(f"{'system':<10}{'d':>5}{'T':>6} {'quantity':<10}{'estimate':>13}{'exact':>13}{'SE':>10}{'z':>7}{'sec':>7}")
for d in (int(x) for x in args.dims.split(",")):
    for name, system in (("gaussian", TruncatedGaussian(d)), ("wells", DoubleWells(d))):
        t0 = time.perf_counter()
        ds = measure(system, temps, device="cpu")
        sec = time.perf_counter() - t0
        exact = system.exact(temps)
        for i, t in enumerate(temps):
            for q in ("log_Z", "U", "C", "S"):
                est, se, ex = float(ds[q][i]), float(ds[q + "_err"][i]), float(exact[q][i])
                z = (est - ex) / se
                rows.append(dict(system=name, d=d, T=t, quantity=q, estimate=est, exact=ex, se=se, z=z, seconds=sec))
                print(f"{name:<10}{d:>5}{t:>6.2f} {q:<10}{est:>13.4f}{ex:>13.4f}{se:>10.4f}{z:>7.2f}{sec:>7.0f}")
out = Path(__file__).parent / "results" / "measure_accuracy.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(rows, indent=1))
print("max |z| =", max(abs(r["z"]) for r in rows), "->", out)
