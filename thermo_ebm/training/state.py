"""A Trainer's resumable state as the dict a checkpoint holds (layout: checkpoint.py): `capture` (this rank),
`gather` (every rank's buffers, RNG and data order, for the checkpoint) and `restore` (a capture, or this
rank's part of a checkpoint). Resume from it is bit-exact."""
from __future__ import annotations

import copy
from dataclasses import asdict

import torch

from .. import distributed as dist
from ..errors import ThermoEBMError
from ..files.checkpoint import training_temperature


def capture(tr) -> dict:
    """Everything `restore` needs to continue tr (a training.Trainer) exactly where it is."""
    return {
        "config": asdict(tr.cfg),
        "model_spec": tr.model.spec,
        "training_temperature": training_temperature(asdict(tr.cfg)),
        "model": {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()},
        "optimizer": copy.deepcopy(tr.opt.state_dict()),
        "buffers": tr.chains.state_dict(),
        "rng": {"data": tr.g_data.get_state(), "mc": tr.chains.generator.get_state().cpu(),
                "torch": torch.get_rng_state()},
        "epoch": tr.epoch, "step": tr.step, "batch_in_epoch": tr.batch_in_epoch,
        "perm": tr.perm.clone() if tr.perm is not None else torch.zeros(0, dtype=torch.long),
        "lr": tr.lr, "rollbacks": tr.rollbacks,
        **tr.history.state_dict(),
        "meta": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in tr.data.meta.items()}
        | {"classes": [int(c) for c in tr.data.classes]},
    }


def gather(tr, st: dict) -> dict:
    """A checkpoint of every rank: the state of rank 0 plus each rank's buffers, RNG and data order."""
    if not dist.active():
        return st
    mine = {"buffers": st["buffers"], "rng": st["rng"], "perm": st["perm"]}
    return dict(st, world=tr.world, ranks=dist.gather_objects(mine))


def restore(tr, st: dict, from_checkpoint: bool = False):
    """Put a capture() (this rank's snapshot) or, with from_checkpoint, this rank's part of a checkpoint into tr."""
    if from_checkpoint:
        world = int(st.get("world", 1))
        if world != tr.world:
            raise ThermoEBMError(f"the checkpoint was written by {world} process(es); resume with the same number "
                                 f"(torchrun --nproc-per-node {world})")
        if world > 1:
            st = dict(st, **st["ranks"][tr.rank])
    tr.model.load_state_dict(st["model"])
    tr.opt.load_state_dict(copy.deepcopy(st["optimizer"]))
    tr.chains.load_state_dict(st["buffers"])
    tr.g_data.set_state(st["rng"]["data"])
    g_mc = tr.chains.generator
    g_mc.set_state(st["rng"]["mc"].to(g_mc.device) if tr.dev.type == "cpu" else st["rng"]["mc"])
    torch.set_rng_state(st["rng"]["torch"])
    tr.epoch, tr.step, tr.batch_in_epoch = st["epoch"], st["step"], st["batch_in_epoch"]
    tr.perm = st["perm"].clone() if st["perm"].numel() else None
    tr.lr, tr.rollbacks = st["lr"], st["rollbacks"]
    tr.history.load_state_dict(st)
    for g in tr.opt.param_groups:
        g["lr"] = tr.lr
