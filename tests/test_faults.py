"""Fault injection: SIGKILL a training process at random moments. Afterwards the newest checkpoint must
load (weights_only), `--resume` must continue from it, and the results file must open and hold every
step up to that checkpoint with the same values."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from thermo_ebm.files.checkpoint import load_checkpoint

ARGS = ["train", "--name", "f", "--objective", "j_ebm", "--dataset", "digits", "--labels", "0,1",
        "--batch-size", "32", "--buffer-size", "128", "--mc-steps", "3", "--model-size", "16"]


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "thermo_ebm", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _check_consistent(ckpt, res):
    st = load_checkpoint(ckpt)
    with xr.open_dataset(res, group="training", engine="h5netcdf") as ds:
        ds = ds.load()
    n = st["step"]
    assert ds.sizes["step"] >= n > 0
    for k, v in st["history"].items():
        np.testing.assert_array_equal(ds[k].values[:n], v.numpy()[:n], err_msg=k)
    return st


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(2026)
    kills = 0
    for trial in range(4):
        proc = _cli([*ARGS, "--epochs", "1000"] + (["--resume"] if trial else []))
        # wait until the first checkpoint of this process exists, then kill at a random later moment
        t0 = time.time()
        ckpt, res = Path("checkpoints/f.pt"), Path("results/f.h5")
        start_mtime = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        while (not ckpt.exists() or ckpt.stat().st_mtime_ns == start_mtime) and time.time() - t0 < 60:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        st = _check_consistent(ckpt, res)
        assert st["epoch"] >= 1
    assert kills == 4
    # a final resume runs to completion and continues exactly from the checkpoint's step
    st = load_checkpoint(Path("checkpoints/f.pt"))
    done = _cli([*ARGS, "--epochs", str(st["epoch"] + 1), "--resume"])
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    st2 = _check_consistent(Path("checkpoints/f.pt"), Path("results/f.h5"))
    assert st2["epoch"] == st["epoch"] + 1 and st2["step"] > st["step"]
    # every temporary file the kills left was removed when the run next started: only the run's files remain
    # (the locks live in the system's temporary folder)
    left = sorted(p.name for d in ("checkpoints", "results") for p in Path(d).iterdir())
    assert left == ["f.h5", "f.pt", "f_samples"], left


def test_kill_during_write_never_leaves_partial_file(tmp_path, monkeypatch):
    """Simulate a crash between writing the temporary file and os.replace: the old file survives intact."""
    from thermo_ebm.files import fileio
    from thermo_ebm.files.checkpoint import save_checkpoint
    path = Path("c.pt")
    save_checkpoint(path, {"step": 1, "model_spec": {}, "model": {"w": torch.ones(3)}})

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "model_spec": {}, "model": {"w": torch.zeros(3)}})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in Path(".").iterdir() if p.suffix == ".pt"] == ["c.pt"]
