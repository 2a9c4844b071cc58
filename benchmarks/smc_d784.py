"""Both engines on the d = 784 exact system (`testing.DigitMixture`, joint ensemble) at three temperatures, with
exact draws at T = 1 as data: log Z, U, C against the exact values (z-scores), flags, wall time per stage.
Run it alone (two heavy jobs on 2 cores distort timings). Writes benchmarks/results/smc_d784_seed<seed>.json.

    python benchmarks/smc_d784.py [--engines ais,smc] [--temps 0.5,1,2] [--seed 0] [--data-temp 1.0|none]
                                  [--max-time SECONDS]   (measure's retries: attempts, their seconds and budgets)
"""
import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from thermo_ebm import measure
from thermo_ebm.testing import DigitMixture

p = argparse.ArgumentParser()
p.add_argument("--engines", default="ais,smc")
p.add_argument("--temps", default="0.5,1,2")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--data-temp", default="1.0")
p.add_argument("--max-time", type=float, default=None, help="measure's max_time (None: one attempt)")
p.add_argument("--out", default=None)
args = p.parse_args()
torch.set_num_threads(2)
temps = sorted(float(t) for t in args.temps.split(","))  # measure reports ascending temperatures
system = DigitMixture()
exact = system.exact(temps, "joint")
data = None if args.data_temp == "none" else system.sample(float(args.data_temp), 2000, seed=args.seed)[0]
runs = []
for engine in args.engines.split(","):
    t0 = time.perf_counter()
    ds = measure(system, temps, ensemble="joint", data=data, device="cpu", seed=args.seed, engine=engine,
                 max_time=args.max_time)
    sec = time.perf_counter() - t0
    row = dict(engine=engine, seconds=sec, stage_seconds=json.loads(ds.attrs["stage_seconds"]), temps=temps,
               attempt_seconds=json.loads(ds.attrs["attempt_seconds"]),
               budget={k: v for k, v in json.loads(ds.attrs["settings"]).items()
                       if k in ("ais_steps_per_l2", "bridge_moves", "samples", "smc_data_chains")},
               flags={k: ds[k].values.astype(int).tolist() for k in ds.data_vars if k.startswith("flag_")},
               bridge_lambdas=json.loads(ds.attrs.get("bridge_schedule_lengths", "null")))
    for q in ("log_Z", "log_Z_forward", "U", "C", "I_XY_bits"):
        ref = exact["log_Z" if q == "log_Z_forward" else q]
        est, se = ds[q].values, ds[q + "_err"].values
        row[q] = dict(estimate=est.tolist(), se=se.tolist(), exact=ref.tolist(), error=(est - ref).tolist(),
                      z=((est - ref) / se).tolist())
        print(f"{engine:<4} {q:<14} error " + " ".join(f"{e:+9.2f}" for e in est - ref)
              + "   SE " + " ".join(f"{v:7.2f}" for v in se), flush=True)
    print(f"{engine:<4} {sec:.0f} s in attempts of {row['attempt_seconds']} s (last budget {row['budget']}), "
          f"stages {row['stage_seconds']}, data-seeded lambdas {row['bridge_lambdas']}, "
          "flags raised: "
          + ", ".join(k for k, v in row["flags"].items() if any(v)), flush=True)
    runs.append(row)
out = Path(args.out or Path(__file__).parent / "results" / f"smc_d784_seed{args.seed}.json")
out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, 2 threads",
                               system="DigitMixture()", data_temp=args.data_temp, seed=args.seed,
                               max_time=args.max_time, runs=runs), indent=1))
print("->", out)
