"""Throughput of `measure` vs number of processes under torchrun (gloo on CPU, nccl on GPUs).
Prints chain-steps per second and writes benchmarks/results/distributed_scaling.json.

    python benchmarks/distributed_scaling.py [--procs 1,2] [--device cpu]

Chain-steps counted: forward-AIS chains x annealing betas (the schedule length stored in the results file)
+ sweep chains x (burn-in + samples) x T. Reverse AIS (200 betas over all segments) and process start-up
are in the wall time but not in the count, so the rate is a lower bound.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xarray as xr

from thermo_ebm.files.checkpoint import save_checkpoint
from thermo_ebm.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--procs", default="1,2")
p.add_argument("--device", default="cpu")
p.add_argument("--threads-per-proc", type=int, default=1)
a = p.parse_args()
temps, ais_chains, ais_steps, chains, burn, samples, rev = [0.5, 1.0, 2.0], 256, 400, 64, 100, 200, 200
work = Path(tempfile.mkdtemp())
torch.manual_seed(0)
model = build_model("shallow", (1, 28, 28), 10, 256, depth=2)
save_checkpoint(work / "m.pt", {"model_spec": model.spec, "model": model.state_dict(), "config": {}})
rows = []
for n in (int(x) for x in a.procs.split(",")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "thermo_ebm",
           "measure", "--ckpt", str(work / "m.pt"), "--temps", ",".join(map(str, temps)), "--device", a.device,
           "--ais-chains", str(ais_chains), "--ais-steps", str(ais_steps), "--chains", str(chains),
           "--burn-in", str(burn), "--samples", str(samples), "--reverse-steps", str(rev), "--out", str(work / f"r{n}.h5"), "--no-mbar"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads_per_proc)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    sec = time.perf_counter() - t0
    with xr.open_dataset(work / f"r{n}.h5", group="measure_marginal", engine="h5netcdf") as ds:
        schedule = int(ds.attrs["ais_schedule_length"])
    steps = ais_chains * schedule + chains * len(temps) * (burn + samples)
    rows.append(dict(processes=n, seconds=sec, chain_steps=steps, chain_steps_per_s=steps / sec))
    print(f"{n} process(es): {sec:6.1f} s  {steps / sec:10.0f} chain-steps/s  "
          f"(x{rows[0]['seconds'] / sec:.2f} vs 1 process)")
out = Path(__file__).parent / "results" / "distributed_scaling.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(dict(device=a.device, threads_per_process=a.threads_per_proc, rows=rows,
                               note="wall time includes process start-up and the (rank-0) pilot tuning"), indent=1))
print("->", out)
