"""Wall time of `measure` at the default budget: the MNIST MLP (784-512-512-512-10), 16 temperatures,
marginal and joint ensembles. Target: under 10 minutes each on 2 CPU cores. Writes
benchmarks/results/measure_budget.json (measure_budget_trained.json with --ckpt).

    python benchmarks/measure_budget.py [--ckpt CKPT] [--ensembles marginal,joint]

Without --ckpt the network has its (seeded) initial weights; pass a trained checkpoint to time a real model.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from thermo_ebm import measure
from thermo_ebm.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default=None)
p.add_argument("--ensembles", default="marginal,joint")
a = p.parse_args()
torch.manual_seed(0)
model = a.ckpt or build_model("shallow", (1, 28, 28), 10, 512, depth=3)
temps = np.round(np.linspace(0.5, 2.0, 16), 3)
rows = []
for ens in a.ensembles.split(","):
    t0 = time.perf_counter()
    ds = measure(model, temps, ensemble=ens, device="cpu")
    sec = time.perf_counter() - t0
    flags = {k: int(ds[k].sum()) for k in ds.data_vars if k.startswith("flag_")}
    rows.append(dict(ensemble=ens, seconds=sec, temperatures=len(temps), threads=torch.get_num_threads(),
                     settings=json.loads(ds.attrs["settings"]), flags=flags,
                     max_log_Z_err=float(ds.log_Z_err.max()), max_abs_U_resid_z=float(abs(ds.U_resid / ds.U_resid_err).max())))
    print(f"{ens:<9} {sec:7.1f} s for 16 temperatures (target < 600 s); max SE(log Z) {rows[-1]['max_log_Z_err']:.3f}; "
          f"flags {flags}", flush=True)
out = Path(__file__).parent / "results" / ("measure_budget_trained.json" if a.ckpt else "measure_budget.json")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(dict(model=str(a.ckpt or "784-512-512-512-10 MLP, initial weights"), rows=rows), indent=1))
print("->", out)
