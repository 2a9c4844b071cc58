"""Held-out likelihood from a measured log Z(T), and the maximum-likelihood temperature T_ML.

log p_T(x) = log g_T(x) - log Z(T), with g_T the ensemble's unnormalised density on the box (joint: summed over
y) and log Z the measurement's estimate; with labels (joint) also log p_T(x, y) = f_y(x) / T - log Z(T) and
log p_T(y | x). Values are means over the held-out images, in nats per image; their SE combines the SE of
log Z (with its covariance between temperatures) and the sampling SE of the held-out mean.

Quantised images are dequantised first: an image of L grey levels (k = 0..L-1 at x = -1 + 2k / (L - 1)) becomes
x = -1 + (2 / L)(k + u), u ~ U(0, 1), so that the L bins tile the box. Then -log P(image) = -log p_T(x) +
d log(L / 2), and bits per dimension = log2(L) - (bits saved over uniform coding) / d, where the bits saved
are (log p_T(x) + d log 2) / log 2 (uniform coding: 2^-d on the box).

T_ML maximises the held-out likelihood of the images, log p_T(x): d/dbeta of its mean is U(T) - <E>_heldout(T)
= 0, with <E>_heldout the held-out images' energy (joint: <E | x> under p_T(y | x), which depends on T).
U rises with T, so the root is bracketed by a sign change of h(T) = U(T) - <E>_heldout(T); its SE is by the
delta method, SE(h) / (dh/dT) at the root.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data import check_states, is_auto, is_none, load_states_file
from ..errors import ThermoEBMError

log = logging.getLogger("thermo_ebm")

LN2 = math.log(2.0)
LEVELS = {"mnist": 256, "fashion-mnist": 256, "cifar10": 256, "digits": 17}  # grey levels of each dataset


@dataclass
class HeldOut:
    """Held-out states x [M, D] in the box (dequantised when `levels`), labels y [M] or None, and a description."""
    x: torch.Tensor
    y: torch.Tensor | None
    source: str
    levels: int | None = None


def grid_levels(x: torch.Tensor) -> int | None:
    """256 when every value of x lies on the 8-bit grid -1 + 2k / 255, else None (continuous states)."""
    k = (x.double() + 1.0) * 127.5
    return 256 if bool(((k - k.round()).abs() < 1e-3).all()) else None


def dequantise(x: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """x on the grid -1 + 2k / (levels - 1) -> -1 + (2 / levels)(k + u), u ~ U(0, 1) (inside the box)."""
    k = ((x.double() + 1.0) * (levels - 1) / 2.0).round()
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    return (-1.0 + (2.0 / levels) * (k + u)).float()


def resolve_heldout(heldout, shape, ckpt, dataset, why, n_classes, seed,
                    n_max=None) -> tuple[HeldOut | None, HeldOut | None]:
    """(held-out set, training-split set of the same size or None). heldout: None; "auto" (the held-out split of
    a checkpoint's `dataset`, from measurement.inputs.checkpoint_dataset, with its training split for the
    generalisation gap; none for other models or where the dataset is not readable here, which the log says with
    `why`); a tensor/array [M, *shape]; a tuple (x, y); or a .pt file holding one of these or a dict with keys
    'x' (and 'y')."""
    if is_none(heldout):
        return None, None
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    d = int(np.prod(shape))
    if is_auto(heldout):
        if ckpt is None:
            return None, None
        if dataset is None:  # no likelihood, and the log says why
            log.info("held-out likelihood: %s", why)
            return None, None
        cfg, data = ckpt.get("config", {}), dataset
        levels = LEVELS.get(cfg["dataset"])
        n = len(data.x_test) if n_max is None else min(n_max, len(data.x_test))
        pick = torch.randperm(len(data.x_train), generator=gen)[:n]
        sets = []
        for x, y, name in ((data.x_test[:n], data.y_test[:n], "held-out"), (data.x_train[pick], data.y_train[pick], "training")):
            x = x.reshape(len(x), d)
            sets.append(HeldOut(dequantise(x, levels, gen) if levels else x, y.long(), f"{len(x)} {name} images "
                                f"({cfg['dataset']})", levels))
        return sets[0], sets[1]
    src = "array"
    if isinstance(heldout, (str, bytes)) or hasattr(heldout, "__fspath__"):
        src = str(heldout)
        heldout = load_states_file(heldout, "held-out", "auto, none")
    y = None
    if isinstance(heldout, dict):
        heldout, y = heldout.get("x"), heldout.get("y")
    elif isinstance(heldout, (tuple, list)) and len(heldout) == 2:
        heldout, y = heldout
    if heldout is None:
        raise ThermoEBMError(f"{src} holds no held-out states (a tensor [M, *shape] or a dict with key 'x')")
    x = check_states(heldout, shape, "held-out")
    if y is not None:
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().reshape(-1)
        if len(y) != len(x) or (y < 0).any() or (y >= n_classes).any():
            raise ThermoEBMError(f"held-out labels must be {len(x)} integers in 0..{n_classes - 1}")
    levels = grid_levels(x)
    if levels:
        x = dequantise(x, levels, gen)
    return HeldOut(x, y, f"{len(x)} states ({src})", levels), None


@torch.no_grad()
def _logits(net, shape, x, device, batch=1024):
    return torch.cat([net(x[i:i + batch].to(device).reshape(-1, *shape)).double().cpu()
                      for i in range(0, len(x), batch)])


def _mean_cov(a):
    """Mean over images [T] and the covariance of that mean between temperatures [T, T]; a: [T, M]."""
    return a.mean(-1), np.atleast_2d(np.cov(a, ddof=1)) / a.shape[-1]


def per_image(net, shape, ens, betas, ho: HeldOut, device, joint_labels: bool):
    """Per image and temperature [T, M]: log g_T(x) (the x-marginal), log g_T(x, y) and log p_T(y | x) (with
    labels, joint), and the energy <E | x>_T whose mean T_ML matches."""
    lg = _logits(net, shape, ho.x, device)
    out = {"x": [], "xy": [], "y_x": [], "e": []}
    for b in betas:
        bt = torch.full((len(lg),), float(b), dtype=lg.dtype)
        lx = ens.logp(lg, bt)
        out["x"].append(lx)
        if joint_labels:
            fy = lg.gather(1, ho.y[:, None])[:, 0]
            out["xy"].append(b * fy)
            out["y_x"].append(b * fy - lx)
        out["e"].append(ens.energy_moments(lg, bt)[0])
    return {k: torch.stack(v).numpy() for k, v in out.items() if v}


@dataclass
class Likelihood:
    """Held-out likelihood per temperature (ascending beta), name -> (value [T], se [T]); covariance [T, T] of
    log_lik_heldout; T_ML (value, se) and which side of the range it lies on when outside."""
    out: dict
    cov: np.ndarray
    t_ml: tuple
    t_ml_side: str


def t_ml_root(temps, u, u_se, e, e_se, paired=None):
    """(T_ML, SE, side) from h(T) = U - <E>_heldout on ascending temps [T]: the root by linear interpolation
    at the bracketing sign change (the one of largest slope if noise makes several), SE = SE(h at the root) / slope
    (the delta method for the interpolated root: the slope's error enters through the two ends' weights) with the
    held-out energies' error common to every temperature (the same images); side is "inside", "below" (h > 0
    everywhere: T_ML under the lowest T) or "above". paired [T, n]: h per independent unit (a chain and the image
    it started from, at every temperature), whose correlations across temperatures and with the image's energy
    then give SE(h) directly."""
    h = u - e
    if len(temps) < 2 or np.all(h > 0):
        return math.nan, math.nan, "below" if np.all(h > 0) else "undetermined"
    if np.all(h < 0):
        return math.nan, math.nan, "above"
    cross = np.where((h[:-1] <= 0) & (h[1:] > 0))[0]
    if len(cross) == 0:
        return math.nan, math.nan, "undetermined"
    slopes = (h[cross + 1] - h[cross]) / (temps[cross + 1] - temps[cross])
    i = cross[int(np.argmax(slopes))]
    s = (h[i + 1] - h[i]) / (temps[i + 1] - temps[i])
    w = -h[i] / (h[i + 1] - h[i])
    t = temps[i] + w * (temps[i + 1] - temps[i])
    if paired is not None:
        at_root = (1 - w) * paired[i] + w * paired[i + 1]
        se_h = float(at_root.std(ddof=1)) / math.sqrt(at_root.size)
    else:  # the images are the same at every temperature: their energy's error is common to both ends
        se_h = math.sqrt(((1 - w) * u_se[i]) ** 2 + (w * u_se[i + 1]) ** 2
                         + ((1 - w) * e_se[i] + w * e_se[i + 1]) ** 2)
    return float(t), float(se_h / s), "inside"


def heldout_likelihood(net, shape, ens, betas, temps_asc, d, ho: HeldOut, train: HeldOut | None, log_z, log_z_cov,
                       u, u_se, device) -> Likelihood:
    """Likelihood of held-out (and training-split) images at every beta (ascending) from log Z [T] and its
    covariance [T, T]; U, U_se [T] (ascending beta) for T_ML."""
    joint_labels = ens.kind == "joint" and ho.y is not None
    a = per_image(net, shape, ens, betas, ho, device, joint_labels)
    zc = np.nan_to_num(np.asarray(log_z_cov, dtype=np.float64))
    out = {}

    def add(name, per, with_z=True):
        m, c = _mean_cov(per)
        c = c + (zc if with_z else 0.0)
        out[name] = (m - (log_z if with_z else 0.0), np.sqrt(np.diag(c)))
        return c
    cov = add("log_lik_heldout", a["x"])
    if joint_labels:
        add("log_lik_xy_heldout", a["xy"])
        add("log_lik_y_given_x_heldout", a["y_x"], with_z=False)
    v, se = out["log_lik_heldout"]
    info = (v + d * LN2) / LN2
    out["info_heldout_bits"] = (info, se / LN2)
    if ho.levels:
        out["bits_per_dim_heldout"] = (math.log2(ho.levels) - info / d, se / LN2 / d)
    if train is not None:
        b = per_image(net, shape, ens, betas, train, device, joint_labels)
        mt, ct = _mean_cov(b["x"])
        mh, ch = _mean_cov(a["x"])
        out["log_lik_train"] = (mt - log_z, np.sqrt(np.diag(ct + zc)))
        out["generalisation_gap"] = (mt - mh, np.sqrt(np.diag(ct) + np.diag(ch)))  # log Z cancels
    e_mean = a["e"].mean(-1)
    e_se = a["e"].std(-1, ddof=1) / math.sqrt(a["e"].shape[-1])
    rev = slice(None, None, -1)
    t_ml = t_ml_root(np.asarray(temps_asc), np.asarray(u)[rev], np.asarray(u_se)[rev], e_mean[rev], e_se[rev])
    out["E_heldout"] = (e_mean, e_se)
    return Likelihood(out, cov, t_ml[:2], t_ml[2])


QUICK_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # temperatures of the quick estimate, in units of T_train


@torch.no_grad()
def quick_t_ml(model, ensemble, x, t_train: float, generator, device, n_chains=64, n_tune=100, n_steps=200):
    """A quick T_ML / T_train after training: reflected-MALA chains (MH-corrected; step tuned for n_tune steps,
    then frozen) started from held-out images x [M, *shape] at QUICK_FACTORS x T_train, all temperatures in one
    batch (a beta per chain, a step per temperature); U(T) is the chains' mean energy over the last n_steps,
    compared with the images' own energy. Chains started at the data and run briefly stay close to it, so this
    is a screening number (the measurement gives T_ML with its SE).
    Returns (T_ML / T_train or nan, SE, side) as `t_ml_root`."""
    from ..samplers.kernels import adapt_step, mala_init, mala_step
    x = x[:n_chains].to(device)
    n, k = len(x), len(QUICK_FACTORS)
    temps = np.asarray(QUICK_FACTORS)
    beta = torch.tensor([1.0 / (float(f) * t_train) for f in temps], device=device).repeat_interleave(n)  # [k n]
    st = mala_init(model, ensemble, x.repeat(k, *([1] * (x.dim() - 1))))
    e0 = ensemble.energy_moments(st.logits.double(), beta.double())[0].cpu().numpy().reshape(k, n)
    step = torch.full((k, 1), 0.01, device=device)
    trace = []
    for i in range(n_tune + n_steps):
        st, info = mala_step(st, model, ensemble, beta, step.expand(k, n).reshape(-1), generator)
        if i < n_tune:
            step = adapt_step(step, info.accepted.float().reshape(k, n).mean(1, keepdim=True))
        else:
            trace.append(ensemble.energy_moments(st.logits.double(), beta.double())[0].cpu().numpy())
    per_chain = np.mean(trace, axis=0).reshape(k, n)
    u, u_se = per_chain.mean(1), per_chain.std(1, ddof=1) / math.sqrt(n)
    e, e_se = e0.mean(1), e0.std(1, ddof=1) / math.sqrt(n)
    # each chain's energy is correlated with its image's and with its own copies' at the other temperatures
    return t_ml_root(temps, u, u_se, e, e_se, paired=per_chain - e0)
