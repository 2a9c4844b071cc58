"""Inputs of a measurement: the model in its own temperature units, the temperatures, the ensemble, reference
and held-out data, checked before any work (`prepare` -> `Problem`)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..config import NEEDS, NOMINAL, MeasureConfig, needs
from ..data import check_states, is_auto, is_none, load_data, load_states_file
from ..ensembles import Ensemble
from ..errors import ThermoEBMError
from ..files.checkpoint import (checkpoint_data_dir, checkpoint_temperature, load_checkpoint, model_from_checkpoint,
                               training_config)
from ..files.results import file_sha256
from ..models import EBM, ScaledLogits
from ..samplers.kernels import MalaKernel, mala_kernel
from ..training.chains import moves_acceptance
from .likelihood import HeldOut, resolve_heldout

log = logging.getLogger("thermo_ebm")


@dataclass
class Problem:
    """What is measured: the model in the units of the measurement, the temperatures, the reference data."""
    net: object             # callable x [N, *shape] -> logits [N, K], already divided by t_ref
    ens: Ensemble
    shape: tuple
    temps: np.ndarray       # [T] ascending, as given (units of `units`)
    betas: np.ndarray       # [T] ascending 1 / T (so descending temperature)
    t_train: float          # the model's training temperature on the logits' scale
    units: str              # "train": T in units of t_train; "raw": T on the logits' scale
    data: torch.Tensor | None  # [M, D] reference states of the low-temperature phase, or None
    data_source: str
    desc: dict
    device: torch.device
    kernel: MalaKernel
    cfg: MeasureConfig
    seed: int
    heldout: HeldOut | None = None  # held-out images for the likelihood (and a training-split set of the same size)
    train_split: HeldOut | None = None

    @property
    def d(self) -> int:
        return int(np.prod(self.shape))

    @property
    def t_ref(self) -> float:
        return self.t_train if self.units == "train" else 1.0


def resolve_model(model, shape):
    """(module, shape, n_classes, description, checkpoint or None) from a checkpoint path, an EBM or a callable."""
    if isinstance(model, (str, Path)):
        ckpt = load_checkpoint(model)
        m = model_from_checkpoint(ckpt, model)
        desc = {"checkpoint": str(model), "checkpoint_abs": str(Path(model).resolve()), "checkpoint_sha256": file_sha256(model),
                "checkpoint_step": int(ckpt.get("step", -1)), "checkpoint_epoch": int(ckpt.get("epoch", -1)),
                "model_spec": json.dumps(m.spec)}
        return m.eval(), m.shape, m.n_classes, desc, ckpt
    if isinstance(model, EBM):
        return model.eval(), model.shape, model.n_classes, {"model_spec": json.dumps(model.spec)}, None
    if not callable(model):
        raise ThermoEBMError("model must be a checkpoint path, a thermo-ebm model or a callable")
    if shape is None:
        shape = getattr(model, "shape", None)
    if shape is None:
        raise ThermoEBMError("shape is required when model is a plain callable")
    shape = tuple(int(s) for s in shape)
    with torch.no_grad():
        out = model(torch.zeros((2, *shape)))
    if out.ndim != 2 or out.shape[0] != 2:
        raise ThermoEBMError(f"model must map [N, *shape] to logits [N, K]; got output shape {list(out.shape)}")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, shape, int(out.shape[1]), {"model_spec": type(model).__name__}, None


def check_temps(temps) -> np.ndarray:
    """Temperatures as given, ascending; duplicates, non-finite or non-positive values are errors."""
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ThermoEBMError("no temperatures given")
    if t.size > 1000:
        raise ThermoEBMError(f"{t.size} temperatures requested; at most 1000")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ThermoEBMError("temperatures must be finite and > 0")
    t = np.sort(t)
    if np.any(np.diff(t) == 0):
        raise ThermoEBMError(f"duplicate temperature(s): {', '.join(f'{v:g}' for v in np.unique(t[1:][np.diff(t) == 0]))}")
    return t


def checkpoint_dataset(ckpt, path):
    """(the checkpoint's dataset as data.Data, "") when it is readable here, else (None, why: one line)."""
    cfg = ckpt.get("config", {})
    try:
        return load_data(cfg["dataset"], checkpoint_data_dir(ckpt, path), cfg.get("labels")), ""
    except Exception as e:
        return None, f"the dataset of {path} is not readable here ({' '.join(str(e).split())[:120]})"


def _checkpoint_data(ckpt, dataset, why):
    """The training split of a checkpoint's dataset (None where it is not readable here: `why`) and its stored
    sampler chains."""
    parts, notes = [], []
    if dataset is not None:
        parts.append(dataset.x_train.reshape(len(dataset.x_train), -1))
        notes.append(f"{len(dataset.x_train)} training images ({dataset.meta['dataset']})")
    else:
        log.info("reference data: %s; using the stored chains", why)
    for key, v in ckpt.get("buffers", {}).items():
        if key.endswith("/x") and v.numel():
            parts.append(v.float().reshape(len(v), -1))
            notes.append(f"{len(v)} stored {key.split('/')[0]} chains")
    if not parts:
        return None, "none (no training data or stored chains found)"
    return torch.cat(parts), ", ".join(notes)


def resolve_data(data, shape, ckpt, dataset=None, why=""):
    """Reference states [M, D] (float32, in the box) and a description; data: None, 'auto' (the checkpoint's
    `dataset`, from `checkpoint_dataset`, and stored chains), a tensor/array [M, *shape] or a .pt file holding one
    (or a dict with key 'x')."""
    if is_none(data):
        return None, "none"
    if is_auto(data):
        if ckpt is None:
            return None, "none (auto: not a checkpoint)"
        return _checkpoint_data(ckpt, dataset, why)
    src = "array"
    if isinstance(data, (str, Path)):
        src = str(data)
        obj = load_states_file(data, "data", "none, auto")
        data = obj.get("x") if isinstance(obj, dict) else obj
        if not isinstance(data, torch.Tensor):
            raise ThermoEBMError(f"{src} holds no tensor of states (a tensor [M, *shape] or a dict with key 'x')")
    x = check_states(data, shape, "data")
    return x, f"{len(x)} states ({src})"


JOINT_OBJECTIVES = ("j_ebm", "gcl", "hybrid", "dcl")  # objectives whose labels mean something


def resolve_ensemble(ensemble: str, ckpt: dict | None, n_classes: int) -> str:
    """"auto": joint for a checkpoint trained as a classifier (JOINT_OBJECTIVES) or any other model with
    K > 1 logits, marginal for m_ebm and single-logit models (`prepare` logs the choice once every input is
    checked)."""
    if ensemble != "auto":
        if ensemble not in ("marginal", "joint"):
            raise ThermoEBMError(f"unknown ensemble {ensemble!r}; choose auto, marginal or joint")
        if ensemble == "joint" and ckpt is not None and ckpt.get("config", {}).get("objective") == "m_ebm":
            log.warning("ensemble joint on an m_ebm checkpoint: its labels were never trained, so H(Y) and I(X;Y) "
                        "describe an arbitrary split of the logits")
        return ensemble
    objective = ckpt.get("config", {}).get("objective") if ckpt is not None else None
    return "joint" if (objective in JOINT_OBJECTIVES or (objective is None and n_classes > 1)) else "marginal"


def prepare(model, temps, *, shape, ensemble, units, t_train, data, device, seed, cfg, heldout=None) -> Problem:
    """Check every input and put the model in the measurement's units (before any sampling)."""
    temps = check_temps(temps)
    if ensemble not in ("auto", "marginal", "joint"):
        raise ThermoEBMError(f"unknown ensemble {ensemble!r}; choose auto, marginal or joint")
    if units not in ("train", "raw"):
        raise ThermoEBMError(f"unknown temperature units {units!r}; choose train or raw")
    dev = dist.resolve_device(device)
    net, shape, k, desc, ckpt = resolve_model(model, shape)
    ensemble_arg, ensemble = ensemble, resolve_ensemble(ensemble, ckpt, k)
    if t_train is None:
        t_train = checkpoint_temperature(ckpt) if ckpt is not None else float(getattr(net, "training_temperature", 1.0))
    if not (isinstance(t_train, (int, float)) and 0 < t_train < math.inf):
        raise ThermoEBMError(f"training temperature must be a finite number > 0, got {t_train!r}")
    # the inputs given explicitly are checked first; then the checkpoint's dataset is read once, for whichever of
    # the reference states and the held-out likelihood asks for it ("auto")
    if not is_auto(data):
        states, source = resolve_data(data, shape, ckpt)
    if not is_auto(heldout):
        held, train_split = resolve_heldout(heldout, shape, ckpt, None, "", k, seed)
    if is_auto(data) or is_auto(heldout):
        dataset, why = checkpoint_dataset(ckpt, model) if ckpt is not None else (None, "not a checkpoint")
        if is_auto(data):
            states, source = resolve_data(data, shape, ckpt, dataset, why)
        if is_auto(heldout):
            held, train_split = resolve_heldout(heldout, shape, ckpt, dataset, why, k, seed)
    for key, f in (("data_sha256", data), ("heldout_sha256", heldout)):  # files given by path: their content
        if isinstance(f, (str, Path)) and not (is_auto(f) or is_none(f)) and Path(f).is_file():
            desc[key] = file_sha256(f)
    c = training_config(ckpt) if ckpt is not None else {}
    if c.get("objective") in NEEDS:  # which ensembles the training chains sampled at T_train (docs/training.md)
        desc["training_chains"] = " and ".join(needs(c["objective"], c["joint_estimator"])) or "none"
        accepted = moves_acceptance(net, ckpt.get("buffers", {}), c)  # as `train` logged it
        if not math.isnan(accepted):
            desc["training_moves_accepted"] = accepted
            if accepted < NOMINAL:
                log.info("T_train is nominal for this model: its training moves pass the Metropolis test there %.1f%% "
                         "of the time, so its chains did not sample p at T_train", 100 * accepted)
    log.info("ensemble: %s%s", ensemble, " (auto)" if ensemble_arg == "auto" else "")
    if isinstance(net, torch.nn.Module):
        net = net.to(dev)
    t_ref = float(t_train) if units == "train" else 1.0
    if t_ref != 1.0:
        net = ScaledLogits(net, t_ref, shape)
    d = int(np.prod(shape))
    kernel = mala_kernel(cfg.compile if cfg.compile is not None else d >= 256)
    return Problem(net, Ensemble(ensemble, k), tuple(shape), temps, 1.0 / temps[::-1], float(t_train), units,
                   states, source, desc, dev, kernel, cfg, int(seed), held, train_split)
