"""Calibration of the AIS log Z error bars and of the two flags that guard them (flag_low_ess,
flag_heavy_tails) over seeds, on exactly solvable systems: prints one row per (seed, T) and writes
benchmarks/results/ais_tails.json (appending to the rows already there for other settings).

    python benchmarks/ais_tails.py --system gauss --dim 784 --seeds 0:8
    python benchmarks/ais_tails.py --system gauss --dim 784 --seeds 0:8 --budget '{"ais_chains": 128, "ais_steps_per_l2": 32}'
"""
import argparse
import json
from pathlib import Path

from thermo_ebm import measure
from thermo_ebm.testing import DoubleWells, TruncatedGaussian

p = argparse.ArgumentParser()
p.add_argument("--system", choices=["gauss", "wells"], default="gauss")
p.add_argument("--dim", type=int, default=784)
p.add_argument("--seeds", default="0:8")
p.add_argument("--temps", default="0.5,1,2")
p.add_argument("--budget", default="{}", help="MeasureConfig overrides as JSON")
args = p.parse_args()
budget = json.loads(args.budget)
temps = [float(t) for t in args.temps.split(",")]
lo, hi = (int(s) for s in args.seeds.split(":"))
system = (TruncatedGaussian if args.system == "gauss" else DoubleWells)(args.dim)
exact = system.exact(temps)["log_Z"]
out = Path(__file__).parent / "results" / "ais_tails.json"
rows = json.loads(out.read_text()) if out.exists() else []
key = dict(system=args.system, d=args.dim, budget=budget)
rows = [r for r in rows if not (dict(system=r["system"], d=r["d"], budget=r["budget"]) == key
                                and lo <= r["seed"] < hi)]
print(f"{'seed':>4}{'T':>6}{'z':>8}{'ess':>7}{'k':>7} flags")
for seed in range(lo, hi):
    ds = measure(system, temps, device="cpu", seed=seed, **budget)
    for i, t in enumerate(temps):
        r = dict(**key, seed=seed, T=t, log_Z=float(ds.log_Z[i]), log_Z_err=float(ds.log_Z_err[i]),
                 exact=float(exact[i]), ess=float(ds.ess[i]), pareto_k=float(ds.pareto_k[i]),
                 flag_low_ess=int(ds.flag_low_ess[i]), flag_heavy_tails=int(ds.flag_heavy_tails[i]),
                 schedule=int(ds.attrs["ais_schedule_length"]), seconds=float(ds.attrs["seconds"]))
        r["z"] = (r["log_Z"] - r["exact"]) / r["log_Z_err"]
        rows.append(r)
        flags = ",".join(f[5:] for f in ("flag_low_ess", "flag_heavy_tails") if r[f]) or "ok"
        print(f"{seed:>4}{t:>6.2f}{r['z']:>8.2f}{r['ess']:>7.0f}{r['pareto_k']:>7.2f} {flags}", flush=True)
out.write_text(json.dumps(rows, indent=1))
print("->", out)
