"""Calibration of the quick T_ML (`train`'s and `eval`'s screening estimate, measurement/likelihood.py) over seeds
on exact Gaussians: held-out images drawn exactly at T = 1 (T_train = 1), so the population T_ML is 1, and
z = (T_ML - 1) / SE per seed. The SE of the root comes from each chain paired with the image it started from
(`paired`); the unpaired formula (chains, temperatures and images independent) is reported beside it from the
same runs. Prints a table and writes benchmarks/results/quick_t_ml_calibration.json.

    python benchmarks/quick_t_ml_calibration.py [--seeds 400,200] [--systems rotated16,rotated64]

Target: SD of z within 2 of its own SEs of 1.
"""
import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import thermo_ebm.measurement.likelihood as likelihood
from thermo_ebm.ensembles import Ensemble
from thermo_ebm.testing import RotatedGaussian

SYSTEMS = {  # name: the exact system (T_ML = 1 for images drawn at T = 1)
    "rotated16": lambda: RotatedGaussian(16, cond=4.0),          # well conditioned: chains decorrelate quickly
    "rotated64": lambda: RotatedGaussian(64, cond=400.0),        # ill conditioned: chains keep their image's energy
}

p = argparse.ArgumentParser()
p.add_argument("--systems", default="rotated16,rotated64")
p.add_argument("--seeds", default="400,200", help="seeds per system (one number, or one per system)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quick_t_ml_calibration.json"))
args = p.parse_args()
torch.set_num_threads(args.threads)
names = args.systems.split(",")
seeds = [int(v) for v in args.seeds.split(",")]
seeds = seeds * len(names) if len(seeds) == 1 else seeds

root = likelihood.t_ml_root
summary = []
for name, n_seeds in zip(names, seeds):
    system, calls = SYSTEMS[name](), []

    def both(temps, u, u_se, e, e_se, paired=None):
        """The paired root (returned) and the unpaired SE of the same chains (recorded)."""
        out = root(temps, u, u_se, e, e_se, paired=paired)
        calls.append((out, root(temps, u, u_se, e, e_se)[1]))
        return out
    likelihood.t_ml_root = both
    t0 = time.perf_counter()
    for k in range(n_seeds):
        x = system.sample(1.0, 64, seed=10_000 + k)
        likelihood.quick_t_ml(system, Ensemble("marginal", 1), x, 1.0, torch.Generator().manual_seed(k), "cpu")
    likelihood.t_ml_root = root
    t = np.array([c[0][0] for c in calls])
    row = dict(system=name, seeds=n_seeds, seconds=round(time.perf_counter() - t0, 1),
               inside=int(sum(c[0][2] == "inside" for c in calls)), mean_T_ML=float(np.nanmean(t)))
    for label, se in (("paired", np.array([c[0][1] for c in calls])), ("unpaired", np.array([c[1] for c in calls]))):
        z = (t - 1.0) / se
        z = z[np.isfinite(z)]
        row[label] = dict(sd_z=float(z.std(ddof=1)), sd_z_err=float(z.std(ddof=1) / math.sqrt(2 * (len(z) - 1))),
                          mean_z=float(z.mean()), max_abs_z=float(np.abs(z).max()),
                          frac_abs_z_gt_2=float(np.mean(np.abs(z) > 2)))
        print(f"{name:<10} {label:<9} n={len(z):<4} SD(z)={row[label]['sd_z']:.3f} ± {row[label]['sd_z_err']:.3f} "
              f"mean={row[label]['mean_z']:+.3f} max|z|={row[label]['max_abs_z']:.2f} "
              f"|z|>2: {100 * row[label]['frac_abs_z_gt_2']:.1f}%", flush=True)
    summary.append(row)
out = Path(args.out)
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                               summary=summary), indent=1))
