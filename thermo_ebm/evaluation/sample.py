"""Samples at temperature T with the engine's reflected-MALA kernel: anneal from uniform noise (or start from a
model's fixed base) with step-size adaptation, then run at T with the step frozen."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..ensembles import Ensemble
from ..errors import ThermoEBMError
from ..files.checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint
from ..files.fileio import check_writable_folder
from ..models import base_of
from ..samplers.kernels import MAX_STEP, adapt_step, mala_init, mala_step, uniform


def draw(model, temp: float, *, label=None, n=64, steps=500, seed=0, device="auto", start=None):
    """Samples [n, *shape] from p_T(x) (or p_T(x | label)) of a thermo-ebm model by reflected-MALA chains.
    Without `start` they begin as uniform noise and anneal from beta = 1e-3 / T to 1 / T over the first half of
    the steps (step sizes tuned meanwhile), then run the second half at T. With `start` [n, *shape] (states in the
    box, e.g. a replay buffer; n is then its length) every step is at T: the step sizes are tuned over the first
    tenth of the steps, then frozen. A model with a fixed base (models.GaussianBase) starts them, without `start`,
    from exact draws of its base (of the label's mixture with `label`): in the data's phase, which chains from noise
    do not find among its narrow components."""
    if not (temp > 0 and math.isfinite(temp)):
        raise ThermoEBMError(f"--temp must be a positive number, got {temp}")
    if n < 1 or steps < 2:
        raise ThermoEBMError("-n must be >= 1 and --steps >= 2")
    dev = dist.resolve_device(device)
    model = model.to(dev).eval()
    if label is not None and model.n_classes < 2:
        raise ThermoEBMError("--label needs a model with several classes")
    ens = Ensemble("conditional", model.n_classes, label) if label is not None else Ensemble("marginal", model.n_classes)
    g = torch.Generator(device=dev).manual_seed(seed)
    base = base_of(model)
    if start is None and base is not None:
        start = base.sample(n, g, label).reshape(n, *model.shape)
    if start is None:
        x0, betas, tune = uniform(n, model.shape, g, dev), np.geomspace(1e-3, 1.0, steps // 2) / temp, steps // 2
    else:
        x0, betas, tune = start.float().to(dev), np.zeros(0), max(1, steps // 10)
        n = len(x0)
    state = mala_init(model, ens, x0)
    step = torch.full((n,), MAX_STEP, device=dev)
    for i in range(steps):
        b = float(betas[i]) if i < len(betas) else 1.0 / temp
        state, info = mala_step(state, model, ens, torch.full((n,), b, device=dev), step, g)
        if i < tune:
            step = adapt_step(step, info.acceptance)
    return state.x


def save_grid(x, out, shape):
    """Save samples [n, *shape] in [-1, 1] as an image grid at `out`; returns the path."""
    import torchvision.utils as vu
    if len(shape) == 1:
        side = int(math.isqrt(shape[0]))
        x = x.reshape(-1, 1, side, -1) if side * side == shape[0] else x.reshape(-1, 1, 1, shape[0])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vu.save_image(x.cpu(), out, nrow=int(math.ceil(math.sqrt(len(x)))), normalize=True, value_range=(-1, 1),
                  pad_value=1.0)
    return out


def check_image_path(out) -> None:
    """Before sampling: `out` has an image format PIL can write, in a folder that can be written."""
    from PIL import Image
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ThermoEBMError(f"cannot write images as {out.suffix or 'a file without extension'!r}: "
                             f"use .png, .jpg, .pdf or another format PIL writes")
    check_writable_folder(out, "image")


def sample_to_png(ckpt, temp, *, units="train", label=None, n=64, out="samples.png", steps=500, seed=0,
                  device="auto"):
    """Samples at T (units="train": T x T_train on the logits' scale; "raw": T itself) saved as an image grid."""
    if units not in ("train", "raw"):
        raise ThermoEBMError(f"unknown temperature units {units!r}; choose train or raw")
    check_image_path(out)
    st = load_checkpoint(ckpt)
    model = model_from_checkpoint(st, ckpt).eval()
    if units == "train" and math.isfinite(temp):
        temp = temp * checkpoint_temperature(st)
    if label is not None and not 0 <= label < model.n_classes:
        raise ThermoEBMError(f"--label must be in 0..{model.n_classes - 1}")
    if label is not None and st.get("config", {}).get("objective") == "m_ebm":
        logging.getLogger("thermo_ebm").warning("--label on an m_ebm checkpoint: its labels were never trained, so "
                                                "p(x | y) is an arbitrary split of the logits")
    return save_grid(draw(model, temp, label=label, n=n, steps=steps, seed=seed, device=device), out, model.shape)
