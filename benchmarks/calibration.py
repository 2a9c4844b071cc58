"""Calibration of `measure` over seeds on exactly solvable systems: for log Z, U and C (and, where exact draws
give held-out data, the held-out log-likelihood and T_ML), the z-scores
(estimate - exact) / SE of every seed and temperature, their SD, the fraction with |z| > 3 and the number of
unflagged |z| > 4 (a flag must name every quantity it affects). Prints a table and writes
benchmarks/results/calibration.json.

    python benchmarks/calibration.py [--seeds 30] [--first-seed 0] [--systems gauss64,wells64,...] [--engine ais|smc] [--device cuda]
    python benchmarks/calibration.py --merge part0.json part1.json ... --out all.json   (seeds run in parallel)

Targets (issue #25): SD of z in [0.8, 1.25], |z| > 3 below 2%, no unflagged |z| > 4.
"""
import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from thermo_ebm import measure
from thermo_ebm.measurement.flags import AFFECTS
from thermo_ebm.testing import (ClassGaussian, DigitMixture, DoubleWells, ModeSwitch, Neural2D, RotatedGaussian,
                                TruncatedGaussian)

SYSTEMS = {  # name: (system, ensemble, temperatures, data drawn exactly at this temperature or None)
    "gauss64": (lambda: TruncatedGaussian(64), "marginal", [0.5, 1.0, 2.0], None),
    "wells64": (lambda: DoubleWells(64), "marginal", [0.5, 1.0, 2.0], None),
    "classgauss16": (lambda: ClassGaussian(16), "joint", [0.5, 1.0, 2.0], None),
    "neural2d": (lambda: Neural2D(), "joint", [0.5, 1.0, 2.0], None),
    "rotated64": (lambda: RotatedGaussian(64, cond=400.0), "marginal", [0.5, 1.0, 2.0], None),
    "modeswitch16": (lambda: ModeSwitch(16), "joint", [0.6, 0.8, 1.25], 0.6),
    "digits784": (lambda: DigitMixture(), "joint", [0.5, 1.0, 2.0], 1.0),
}
QUANTITIES = ("log_Z", "U", "C")
# marginal systems with exact draws: held-out data at T0 = 1, whose population log-likelihood
# E_{p_1}[log p_T(x)] = -U(1) / T - log Z(T) and T_ML = 1 are exact (the SEs include the held-out sampling)
HELDOUT = {"rotated64": 1.0}
# engine ais from uniform alone cannot reach these systems' lowest temperature (rotated64 at T = 0.5 needs 2.5
# million betas and `measure` refuses): ais measures them as a user would, with exact draws at this temperature as data
AIS_DATA = {"rotated64": 0.5}
N_HELDOUT = 500

p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, default=30)
p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
p.add_argument("--systems", default="gauss64,wells64,classgauss16,neural2d,rotated64,modeswitch16")
p.add_argument("--engine", default="ais", choices=["ais", "smc"])
p.add_argument("--populations", type=int, default=None, help="smc_populations (default: MeasureConfig's)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--budget", default="", help="extra MeasureConfig fields, e.g. bridge_chains=512,smc_chains=2048")
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration.json"))
p.add_argument("--merge", nargs="+", default=None, help="result files of disjoint seeds to pool (nothing is run)")
args = p.parse_args()
torch.set_num_threads(args.threads)
extra = {} if args.populations is None else {"smc_populations": args.populations}
for item in filter(None, args.budget.split(",")):
    k, v = item.split("=")
    extra[k] = int(v) if v.isdigit() else float(v)

def summarise(name, rows, sec):
    """The calibration summary of one system from its rows so far."""
    out = []
    for q in QUANTITIES + (("log_lik_heldout", "T_ML") if name in HELDOUT else ()):
        z = np.array([r["z"] for r in rows if r["system"] == name and r["quantity"] == q])
        fl = np.array([r["flagged"] for r in rows if r["system"] == name and r["quantity"] == q])
        missing = int(np.sum(~np.isfinite(z)))  # T_ML outside the range: no z
        fl, z = fl[np.isfinite(z)], z[np.isfinite(z)]
        out.append(dict(system=name, quantity=q, n=len(z), missing=missing, sd_z=float(z.std()), mean_z=float(z.mean()),
                        frac_abs_z_gt_3=float(np.mean(np.abs(z) > 3)),
                        unflagged_abs_z_gt_4=int(np.sum((np.abs(z) > 4) & ~fl)), frac_flagged=float(fl.mean()),
                        seconds_per_run=sec))
    return out


def write(out, rows, summary, seeds_done):
    """The results so far (rewritten after every seed, so that a long run keeps what it has done)."""
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(date=str(date.today()), machine=(torch.cuda.get_device_name() if args.device.startswith("cuda") else
                                            f"{platform.machine()}, {torch.get_num_threads()} threads"),
                                   engine=args.engine, seeds=args.seeds, seeds_done=seeds_done, **extra,
                                   summary=summary, rows=rows), indent=1))


def report(s):
    """One summary row as a line of the printed table."""
    print(f"{s['system']:<14}{s['quantity']:<16} n={s['n']:<4} SD(z)={s['sd_z']:.2f} mean={s['mean_z']:+.2f} "
          f"|z|>3: {100 * s['frac_abs_z_gt_3']:.1f}%  unflagged |z|>4: {s['unflagged_abs_z_gt_4']}  "
          f"flagged {100 * s['frac_flagged']:.0f}%  {s['seconds_per_run']:.0f} s/run", flush=True)


def merge(files, out):
    """Pool the rows of result files of disjoint seeds (e.g. parallel runs) and summarise them again."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for d in parts for r in d["rows"]]
    keys = [(r["system"], r["seed"], r["T"], r["quantity"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("the files share seeds: pool disjoint runs only")
    names = list(dict.fromkeys(r["system"] for r in rows))
    secs = {n: np.mean([s["seconds_per_run"] for d in parts for s in d["summary"] if s["system"] == n] or [np.nan])
            for n in names}
    done = {n: len({r["seed"] for r in rows if r["system"] == n}) for n in names}
    engines = {d["engine"] for d in parts}
    extras = {k: v for d in parts for k, v in d.items()
              if k not in ("date", "machine", "engine", "seeds", "seeds_done", "parts", "summary", "rows")}
    summary = [s for n in names for s in summarise(n, rows, float(secs[n]))]
    out.write_text(json.dumps(dict(date=str(date.today()), machine=" + ".join(dict.fromkeys(d["machine"] for d in parts)),
                                   engine=" + ".join(sorted(engines)), seeds=max(done.values()), seeds_done=done,
                                   parts=[q for f, d in zip(files, parts) for q in d.get("parts", [str(f)])], **extras, summary=summary, rows=rows), indent=1))
    for s in summary:
        report(s)
    print("->", out)


out = Path(args.out)
if args.merge:
    merge(args.merge, out)
    raise SystemExit(0)
rows, summary = [], []
for name in args.systems.split(","):
    make, kind, temps, t_data = SYSTEMS[name]
    t_data = AIS_DATA.get(name, t_data) if args.engine == "ais" else t_data
    system = make()
    exact = system.exact(temps, kind)
    t0 = time.perf_counter()
    for i, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
        drawn = system.sample(t_data, 1000, seed=seed) if t_data is not None else None
        data = drawn[0] if isinstance(drawn, tuple) else drawn  # joint systems draw (x, y)
        t_ho = HELDOUT.get(name)
        heldout = system.sample(t_ho, N_HELDOUT, seed=10_000 + seed) if t_ho is not None else None
        ds = measure(system, temps, ensemble=kind, data=data, heldout=heldout, device=args.device, seed=seed,
                     engine=args.engine, **extra)
        if t_ho is not None:
            u0 = system.exact([t_ho], kind)["U"][0]
            ll = (ds.log_lik_heldout.values - (-u0 / np.asarray(temps) - exact["log_Z"])) / ds.log_lik_heldout_err.values
            fl = np.zeros(len(temps), bool)
            for f, text in AFFECTS.items():
                if f in ds and ("log_lik" in text or text.startswith("all")):
                    fl |= ds[f].values.astype(bool)
            rows += [dict(system=name, seed=seed, T=t, quantity="log_lik_heldout", z=float(zz), flagged=bool(f))
                     for t, zz, f in zip(temps, ll, fl)]
            inside = ds.attrs["T_ML_side"] == "inside"
            z_ml = (float(ds.T_ML) - t_ho) / float(ds.T_ML_err) if inside else float("nan")
            rows.append(dict(system=name, seed=seed, T=t_ho, quantity="T_ML", z=z_ml,
                             flagged=bool(ds.attrs["T_ML_flagged"]), side=ds.attrs["T_ML_side"]))
        for q in QUANTITIES:
            flagged = np.zeros(len(temps), bool)
            for f, text in AFFECTS.items():
                if f in ds and (q in text or text.startswith("all")):
                    flagged |= ds[f].values.astype(bool)
            err, se = ds[q].values - exact[q], ds[q + "_err"].values
            rows += [dict(system=name, seed=seed, T=t, quantity=q, z=float(e / s), err=float(e), se=float(s), flagged=bool(fl))
                     for t, e, s, fl in zip(temps, err, se, flagged)]
        write(out, rows, summary + summarise(name, rows, (time.perf_counter() - t0) / (i + 1)),
              {**{r["system"]: args.seeds for r in summary}, name: i + 1})
    sec = (time.perf_counter() - t0) / args.seeds
    for s in summarise(name, rows, sec):
        summary.append(s)
        report(s)
write(out, rows, summary, {r["system"]: args.seeds for r in summary})
print("->", out)
