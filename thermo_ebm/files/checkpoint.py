"""Checkpoints: plain dicts of tensors and built-in types, written atomically, loaded with weights_only=True.

Layout (format_version 1), the one place it is written down:
  format_version (int); config (dict: TrainConfig); model_spec (dict); training_temperature (float, T_train =
  sgld_noise^2 / (2 sgld_step); older checkpoints: derived from config by `training_temperature`);
  model (state_dict); optimizer (state_dict);
  buffers: PersistentChains.state_dict(), {"<population>/<x|y|W|Q|e_last>": tensor} of this rank's walkers;
  rng: {"data": ByteTensor, "mc": ByteTensor (the chains' generator), "torch": ByteTensor};
  epoch, step, batch_in_epoch (int); perm (int64 tensor, empty between epochs); lr (float); rollbacks (int);
  History.state_dict(): j0 ({population: float}), history ({metric: float64 [steps]}),
  epoch_history ({metric: float64 [epochs]}), events ([[step, message]]);
  meta (dict: the dataset's split notes and classes);
  under torchrun also world (int) and ranks (per rank: buffers, rng, perm).
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch

from ..errors import ThermoEBMError
from ..models import EBM, model_from_spec
from .fileio import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path, payload: dict) -> None:
    """Write a checkpoint dict (tensors and plain types) atomically, stamped with FORMAT_VERSION."""
    payload = dict(payload, format_version=FORMAT_VERSION)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _torch_load(path: Path):
    """torch.load(weights_only=True) with one-line errors that say what is wrong with the file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # zip archive (torch >= 1.6) or legacy pickle
        raise ThermoEBMError(f"{path} is not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ThermoEBMError(f"refusing to load {path}: not a checkpoint of tensors and plain types as "
                             "thermo-ebm writes (loading it fully could run code)") from None
    except Exception:
        raise ThermoEBMError(f"checkpoint {path} is truncated or corrupt") from None


def check_checkpoint_file(path) -> Path:
    """A checkpoint path names a non-empty file (the quick check before any work starts)."""
    path = Path(path)
    if path.is_dir():
        raise ThermoEBMError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ThermoEBMError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ThermoEBMError(f"checkpoint {path} is empty")
    return path


def load_checkpoint(path) -> dict:
    """Load a thermo-ebm checkpoint safely (no code execution); every failure is a ThermoEBMError."""
    path = check_checkpoint_file(path)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model_spec" not in ckpt or "model" not in ckpt:
        raise ThermoEBMError(f"{path} is not a thermo-ebm checkpoint (no model_spec/model entries)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ThermoEBMError(f"{path} has checkpoint format {version!r}; this thermo-ebm reads up to "
                             f"{FORMAT_VERSION} (upgrade thermo-ebm)")
    return ckpt


def training_temperature(config: dict) -> float:
    """T_train = sgld_noise^2 / (2 sgld_step), the temperature (logits' units, k_B = 1) whose Boltzmann
    distribution the training Langevin chains target (x <- x - s dE/dx + n xi is Langevin at T = n^2 / (2 s)).
    1.0 where training ran no sampler (dcl: softmax(f) is p(y|x) at T = 1) or its step or noise is 0."""
    if config.get("objective") == "dcl":
        return 1.0
    step, noise = float(config.get("sgld_step", 0.0)), float(config.get("sgld_noise", 0.0))
    return noise * noise / (2.0 * step) if step > 0 and noise > 0 else 1.0


def training_config(ckpt: dict) -> dict:
    """The `train` settings a checkpoint records ({} if none), settings added since it was written at the values it
    trained with (joint_estimator: "chains", the only estimator before "exact" existed; penalty: "magnitude", the
    only energy penalty before "centred"; class_balance: 0, before the label-marginal term; sampler: "sgld", the
    only training sampler before "mala"; base_components: 0, before the base; fit_class_weights: False, before the
    fit)."""
    before = {"joint_estimator": "chains", "penalty": "magnitude", "class_balance": 0.0, "sampler": "sgld",
              "base_components": 0, "fit_class_weights": False}
    return {**before, **ckpt["config"]} if "config" in ckpt else {}


def checkpoint_data_dir(ckpt: dict, path) -> str:
    """Where the checkpoint's dataset lives, seen from here. A relative data_dir was relative to the folder `train`
    ran in (the checkpoint at TRAIN_FOLDER/checkpoint_dir/NAME.pt): that path when it exists, else data_dir as given
    (absolute, or relative to here)."""
    cfg = ckpt.get("config", {})
    data_dir = str(cfg.get("data_dir", "data"))
    ckpt_dir = Path(str(cfg.get("checkpoint_dir", "checkpoints")))
    if not isinstance(path, (str, Path)) or Path(data_dir).is_absolute() or ckpt_dir.is_absolute():
        return data_dir
    folder = Path(path).resolve().parent
    for _ in ckpt_dir.parts:
        folder = folder.parent
    there = Path(os.path.normpath(folder / data_dir))
    return str(there) if there.is_dir() else data_dir


def checkpoint_temperature(ckpt: dict) -> float:
    """The training temperature a checkpoint records (derived from its config for older checkpoints)."""
    t = ckpt.get("training_temperature")
    return float(t) if t is not None else training_temperature(ckpt.get("config", {}))


def model_from_checkpoint(ckpt: dict, path="checkpoint") -> EBM:
    """The EBM a loaded checkpoint describes, with its weights (one-line error on a mismatch)."""
    try:
        model = model_from_spec(ckpt["model_spec"])
        model.load_state_dict(ckpt["model"])
    except ThermoEBMError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise ThermoEBMError(f"weights in {path} do not match its recorded architecture: {msg}") from None
    return model


def load_model(path) -> EBM:
    """The trained model in a checkpoint, in eval mode on the CPU."""
    return model_from_checkpoint(load_checkpoint(path), path).eval()
