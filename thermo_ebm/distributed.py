"""torch.distributed helpers: process-group set-up from torchrun's environment, and the collectives
the estimators need (concatenate per-chain arrays across ranks). With one process every helper is the
identity, so the same code runs under `python` and under `torchrun --nproc-per-node N`."""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import ThermoEBMError


def active() -> bool:
    """Whether a torch.distributed group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """Number of processes (1 without a group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is rank 0 (the one that logs and writes files)."""
    return rank() == 0


def setup(device: str = "auto") -> bool:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): nccl when the run is on CUDA,
    gloo on CPU; each rank takes GPU LOCAL_RANK. Returns whether a group is active."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:  # one voice: rank 0 logs, the others only report errors
        logging.getLogger("thermo_ebm").setLevel(logging.ERROR)
    return active()


def synchronize():
    """Wait for every rank (no-op with one process): called before a successful teardown, so that no rank
    closes its connections while another's gloo threads still use them (seen as SIGABRT, ~1 run in 20)."""
    if active():
        dist.barrier()


LEAVE_TIMEOUT = timedelta(seconds=60)  # longest rank 0 waits for the other ranks to leave after a success


def teardown(orderly: bool = False):
    """Leave the process group, if one was joined. orderly (after `synchronize`, on success): rank 0, whose
    process serves the group's TCP store, exits only once every other rank has left the group, so that no
    rank's teardown finds the store gone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    r, n = dist.get_rank(), dist.get_world_size()
    store = _default_store() if orderly and n > 1 else None
    dist.destroy_process_group()
    if store is None:
        return
    try:
        if r:
            store.set(f"thermo_ebm/left/{r}", "1")
        else:
            store.wait([f"thermo_ebm/left/{i}" for i in range(1, n)], LEAVE_TIMEOUT)
    except RuntimeError as e:  # a rank that died after its work is reported by its own exit code
        logging.getLogger("thermo_ebm").warning("process group teardown: %s", e)


def leave_worker():
    """End a rank other than 0 at once, after its orderly teardown: it has written nothing and has nothing
    left to say, and skipping the interpreter's finalisation skips the C++ destructors that, about once in
    tens of runs under load, aborted such a rank on its way out (SIGABRT, 'terminate called without an active
    exception') after its work had succeeded. Rank 0 and single processes return normally."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("leave_worker before teardown")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _default_store():
    """The default group's key-value store (None where this torch does not expose it)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except RuntimeError:
        return None


def resolve_device(device: str) -> torch.device:
    """The device this process computes on, from auto | cpu | cuda | cuda:N: under a multi-GPU group each
    rank takes cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ThermoEBMError(f"unknown device {device!r}; use auto, cpu or cuda")
    elif device != "cpu":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.partition(":")[2]
        if n == 0:
            raise ThermoEBMError(f"--device {device} requested but no CUDA device is available (use --device cpu)")
        if index and (not index.isdigit() or int(index) >= n):
            raise ThermoEBMError(f"--device {device}: this machine has CUDA devices 0..{n - 1}")
    device = torch.device(device)
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_cat(a: np.ndarray, axis: int) -> np.ndarray:
    """Concatenate each rank's array along `axis`, in rank order (all_gather; shapes must agree)."""
    if not active():
        return a
    t = torch.as_tensor(np.ascontiguousarray(a)).to(_comm_device())
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t)
    return np.concatenate([p.cpu().numpy() for p in parts], axis=axis)


def broadcast(obj):
    """Rank 0's picklable object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if active():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (all_gather_object)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
