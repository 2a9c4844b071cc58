"""How far the counted data-seeded anneal's move pairs decorrelate the quantity its weights integrate,
delta = log g_beta - log q (the log-weight increment per unit lambda), on an exact system with data.

For every stage of `run_bridge` and every temperature: the correlation over chains of delta at the start of the
stage's moves with delta after each of its `bridge_moves` pairs (lag 1, 2, ...), within the class each chain's
logits predict (a chain does not cross between modes at d = 784, so the between-class part of delta's spread is
the weights' job, not the moves'), and over all chains. Summaries per lambda band, and the pairs per lambda that a
correlation-threshold rule (PyMC's SMC: move until the correlation falls below a threshold) would ask for at
thresholds 0.1 and 0.01, next to the accuracy of the run itself. Wraps the bridge's moves to read the states;
run it alone. Writes benchmarks/results/bridge_decorrelation_<system>.json.

    python benchmarks/bridge_decorrelation.py [--system digits784|modeswitch16] [--moves 2] [--seed 0]
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

from thermo_ebm import measure
from thermo_ebm.samplers import bridge
from thermo_ebm.testing import DigitMixture, ModeSwitch

SYSTEMS = {  # name: (system, temperatures, temperature of the exact draws used as data, number of draws)
    "digits784": (DigitMixture, [0.5, 1.0, 2.0], 1.0, 2000),
    "modeswitch16": (lambda: ModeSwitch(16), [0.6, 0.8, 1.25], 0.6, 1000),
}
BANDS = [0.0, 0.01, 0.1, 0.3, 0.6, 0.9, 1.0001]

p = argparse.ArgumentParser()
p.add_argument("--system", default="digits784", choices=sorted(SYSTEMS))
p.add_argument("--moves", type=int, default=2, help="bridge_moves of the run (its default: 2)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default=None)
args = p.parse_args()
torch.set_num_threads(2)

counting = {"on": False}
stages = []   # per stage of the counted anneal: (beta [N], lambda [N], class [N], [delta at start, after pair 1, ...])
outs = []     # states after each move of the current stage: ("mala" | "sub", delta)


def snap(p):
    return (p.lp - p.lq).double().cpu().numpy()


def wrap_run(f):
    def run(*a, **k):
        counting["on"] = True
        try:
            return f(*a, **k)
        finally:
            counting["on"] = False
    return run


def wrap_stage(f):
    def stage(path, p, logw, lam, lam_new, pop, generator, move):
        if not counting["on"]:
            return f(path, p, logw, lam, lam_new, pop, generator, move)

        def recorded(q, lw):
            outs.clear()
            start = (path.beta.cpu().numpy(), lam_new.cpu().numpy(), q.logits.argmax(-1).cpu().numpy(), snap(q))
            res = move(q, lw)
            subs = [d for kind, d in outs if kind == "sub"]
            after = subs if subs else [d for kind, d in outs if kind == "mala"]
            stages.append((*start[:3], [start[3]] + after))
            return res
        return f(path, p, logw, lam, lam_new, pop, generator, recorded)
    return stage


def wrap_move(f, kind):
    def move(*a, **k):
        out = f(*a, **k)
        if counting["on"]:
            outs.append((kind, snap(out[0])))
        return out
    return move


bridge.run_bridge = wrap_run(bridge.run_bridge)
bridge.stage = wrap_stage(bridge.stage)
bridge.mala_move = wrap_move(bridge.mala_move, "mala")
bridge.subspace_move = wrap_move(bridge.subspace_move, "sub")


def corr(a, b, labels=None):
    """Correlation over chains of a and b [n] (finite pairs), each centred within its class when labels are given."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if labels is not None:
        lab = labels[ok]
        a, b = a.copy(), b.copy()
        for c in np.unique(lab):
            m = lab == c
            a[m] -= a[m].mean()
            b[m] -= b[m].mean()
    else:
        a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


make, temps, t_data, n_data = SYSTEMS[args.system]
system = make()
data = system.sample(t_data, n_data, seed=args.seed)[0]
t0 = time.perf_counter()
ds = measure(system, temps, ensemble="joint", data=data, device="cpu", seed=args.seed, bridge_moves=args.moves)
seconds = time.perf_counter() - t0
exact = system.exact(temps, "joint")["log_Z"]
rows = []
for i, t in enumerate(temps):
    beta = 1.0 / t
    per = []  # (lambda, [within-class corr per lag], [pooled corr per lag])
    for b, lam, lab, seq in stages:
        sel = np.isclose(b, beta, rtol=1e-5)
        if not sel.any():
            continue
        within = [corr(seq[0][sel], s[sel], lab[sel]) for s in seq[1:]]
        pooled = [corr(seq[0][sel], s[sel]) for s in seq[1:]]
        per.append((float(lam[sel][0]), within, pooled))
    bands = []
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        inside = [r for r in per if lo <= r[0] < hi]
        if not inside:
            continue
        w = np.nanmean([r[1] for r in inside], 0)
        pl = np.nanmean([r[2] for r in inside], 0)
        rho = float(np.clip(w[0], 1e-12, 1 - 1e-12))
        need = {str(thr): int(math.ceil(math.log(thr) / math.log(rho))) if rho > thr else 1 for thr in (0.1, 0.01)}
        bands.append(dict(lam_from=lo, lam_to=min(hi, 1.0), stages=len(inside), within_class=w.tolist(),
                          pooled=pl.tolist(), pairs_for_threshold=need))
    err, se = float(ds.log_Z[i] - exact[i]), float(ds.log_Z_err[i])
    rows.append(dict(T=t, log_Z_error=err, se=se, z=err / se, bands=bands,
                     flags=[k for k in ds.data_vars if k.startswith("flag_") and bool(ds[k][i])]))
    print(f"T = {t:g}: log Z error {err:+.3f} +- {se:.3f} (z {err / se:+.1f}), {len(per)} stages, flags {rows[-1]['flags']}")
    for band in bands:
        print(f"  lambda [{band['lam_from']:g}, {band['lam_to']:g}): {band['stages']:4d} stages; within-class corr by lag "
              + " ".join(f"{v:.3f}" for v in band["within_class"]) + "; over all chains "
              + " ".join(f"{v:.3f}" for v in band["pooled"])
              + f"; a threshold rule asks for {band['pairs_for_threshold']['0.1']} (0.1) / "
              f"{band['pairs_for_threshold']['0.01']} (0.01) pairs")
out = Path(args.out or Path(__file__).parent / "results" / f"bridge_decorrelation_{args.system}.json")
out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, 2 threads", system=args.system,
                               moves=args.moves, seed=args.seed, seconds=seconds, rows=rows), indent=1))
print(f"{seconds:.0f} s ->", out)
