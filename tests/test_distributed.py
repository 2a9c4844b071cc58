"""torch.distributed with gloo: 2 CPU processes launched the way torchrun does (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment), compared with one process computing the same chains."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch

from thermo_ebm import measure
from thermo_ebm.files.checkpoint import load_checkpoint
from thermo_ebm.files.results import read_group

BUDGET = dict(ais_chains=64, ais_steps=60, chains=8, burn_in=20, samples=40, replicas=4, reverse_steps=20, bridge_chains=64,
              data_refs=16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, n=2):
    """Run `python -m thermo_ebm ARGS` as n ranks of one gloo group; returns (returncodes, stderr of rank 0)."""
    port = str(_free_port())
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "thermo_ebm", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


def _flags(budget):
    return [x for k, v in budget.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_sharded_measure_equals_single_process(digits_ckpt):
    ckpt = digits_ckpt["checkpoint"]
    codes, outs = launch(["measure", "--ckpt", ckpt, "--temps", "0.5,1,2", "--ensemble", "joint", "--device", "cpu",
                          "--out", "dist.h5", "--seed", "3", *_flags(BUDGET)])
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "wrote group" in outs[0][0] and "wrote group" not in outs[1][0]  # rank 0 alone writes
    pooled = read_group("dist.h5", "measure_joint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = measure(ckpt, [0.5, 1, 2], ensemble="joint", seed=3, device="cpu", shards=2, **BUDGET)
    finally:
        torch.set_num_threads(threads)
    assert pooled.attrs["settings"] == single.attrs["settings"]
    for name in single.data_vars:
        np.testing.assert_allclose(pooled[name].values, single[name].values, rtol=1e-9, atol=1e-12,
                                   equal_nan=True, err_msg=name)
    # the shards are really different chains: two shards differ from one shard of the same total
    one = measure(ckpt, [0.5, 1, 2], ensemble="joint", seed=3, device="cpu", shards=1, **BUDGET)
    assert not np.allclose(one.log_Z.values, single.log_Z.values)


def test_ddp_training_matches_single_process_global_batch(tmp_path):
    """dcl has no sampler, so DDP over 2 ranks with half batches must follow the single-process run with
    the same global batches (DistributedSampler interleaves one shared shuffle)."""
    args = ["train", "--objective", "dcl", "--dataset", "digits", "--batch-size", "32", "--max-steps", "12",
            "--epochs", "1", "--model-size", "32", "--device", "cpu"]
    codes, outs = launch([*args, "--name", "ddp"])
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "thermo_ebm", *args, "--name", "one"], check=True, env=env,
                   capture_output=True)
    a, b = load_checkpoint("checkpoints/ddp.pt"), load_checkpoint("checkpoints/one.pt")
    assert a["world"] == 2 and a["step"] == b["step"] == 12
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["history"]["loss"].numpy(), b["history"]["loss"].numpy(), rtol=1e-4)


def test_ddp_ebm_training_and_resume(tmp_path):
    args = ["train", "--name", "j", "--objective", "j_ebm", "--dataset", "digits", "--batch-size", "32",
            "--buffer-size", "128", "--mc-steps", "3", "--model-size", "16", "--device", "cpu"]
    codes, outs = launch([*args, "--epochs", "1", "--max-steps", "8"])
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    st = load_checkpoint("checkpoints/j.pt")
    assert st["world"] == 2 and len(st["ranks"]) == 2
    b0, b1 = (r["buffers"]["marginal/x"] for r in st["ranks"])  # j_ebm exact: marginal chains
    assert b0.shape[0] == b1.shape[0] == 64 and not torch.equal(b0, b1)  # each rank keeps its own shard
    codes, outs = launch(["train", "--name", "j", "--resume", "--max-steps", "16"])
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert load_checkpoint("checkpoints/j.pt")["step"] == 16
    one = subprocess.run([sys.executable, "-m", "thermo_ebm", "train", "--name", "j", "--resume", "--max-steps", "20"],
                         capture_output=True, text=True)
    assert one.returncode == 2 and "nproc-per-node 2" in one.stderr


def test_max_time_under_torchrun_decides_once_for_every_rank(digits_ckpt):
    """With --max-time the ranks repeat (or stop) together: rank 0 decides, no rank waits forever."""
    import json
    codes, outs = launch(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "0.5,1", "--device", "cpu",
                          "--out", "dist_mt.h5", "--max-time", "40", "--data", "none", *_flags(BUDGET)])
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ds = read_group("dist_mt.h5", "measure_joint")
    assert ds.attrs["attempts"] >= 2 and len(json.loads(ds.attrs["attempt_seconds"])) == ds.attrs["attempts"]


def test_a_worker_rank_leaves_without_the_interpreter_finalisation_that_could_abort_it():
    """After its orderly teardown a rank other than 0 exits 0 at once, flushing what it printed: here an
    exit handler that aborts (as C++ destructors did, rarely, under load) never runs; rank 0 carries on."""
    code = ("import atexit, os, sys\n"
            "from thermo_ebm import distributed as dist\n"
            "atexit.register(os.abort)\n"
            "print('before', flush=False)\n"
            "dist.leave_worker()\n"
            "atexit.unregister(os.abort)\n"
            "print('rank 0 goes on')\n")
    runs = {r: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r)}) for r in (0, 1)}
    assert (runs[1].returncode, runs[1].stdout) == (0, "before\n"), runs[1].stderr
    assert (runs[0].returncode, runs[0].stdout) == (0, "before\nrank 0 goes on\n"), runs[0].stderr
