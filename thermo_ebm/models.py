"""Networks mapping images x in [-1,1]^d (shape [N, *shape]) to K logits f(x) (shape [N, K])."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from .errors import ThermoEBMError

ARCHS = ("shallow", "cnn")


class EBM(nn.Module):
    """Wraps a network with the metadata `measure` needs: input shape and number of classes."""

    def __init__(self, net: nn.Module, shape, n_classes: int, spec: dict):
        super().__init__()
        self.net = net
        self.shape = tuple(int(s) for s in shape)
        self.n_classes = int(n_classes)
        self.spec = dict(spec)

    def forward(self, x):
        return self.net(x)


class ScaledLogits(nn.Module):
    """f(x) / t_ref: a logits model in units of a reference temperature (its training temperature), so that
    T = 1 of the scaled model is T = t_ref of the original and energies come out in units of t_ref."""

    def __init__(self, net, t_ref: float, shape):
        super().__init__()
        self.net, self.inv = net, 1.0 / float(t_ref)
        self.shape = tuple(shape)

    def forward(self, x):
        return self.net(x) * self.inv


def _mlp(d, width, depth, k):
    layers, n_in = [nn.Flatten()], d
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.SiLU()]
        n_in = width
    layers.append(nn.Linear(n_in, k))
    return nn.Sequential(*layers)


def _cnn(shape, width, k):
    c, h, w = shape
    net = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1), nn.SiLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_out = net(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(net, nn.Linear(n_out, k))


def build_model(arch: str, shape, n_classes: int, size: int | None = None, depth: int = 2,
                spectral_norm: bool = False) -> EBM:
    """Build `shallow` (MLP, `depth` hidden layers of width `size`) or `cnn` (base channels `size`)."""
    shape = tuple(int(s) for s in shape)
    if arch == "shallow":
        size = size or 256
        net = _mlp(math.prod(shape), size, depth, n_classes)
    elif arch == "cnn":
        if len(shape) != 3 or min(shape[1:]) < 4:
            raise ThermoEBMError(f"--arch cnn needs image input [C,H,W] with H,W >= 4, got {list(shape)}")
        size = size or 32
        net = _cnn(shape, size, n_classes)
    else:
        raise ThermoEBMError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if spectral_norm:
        for name, m in list(net.named_modules()):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _sn(m)
    spec = dict(arch=arch, shape=list(shape), n_classes=int(n_classes), size=int(size), depth=int(depth),
                spectral_norm=bool(spectral_norm))
    return EBM(net, shape, n_classes, spec)


def model_from_spec(spec: dict) -> EBM:
    """Build the EBM a checkpoint's model_spec describes (untrained weights)."""
    return build_model(spec["arch"], spec["shape"], spec["n_classes"], spec["size"], spec["depth"],
                       spec["spectral_norm"])


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y]; logits [N, K] -> [N]."""
    return -torch.logsumexp(logits, dim=-1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E(x, y) = -f(x)[y]; logits [N, K], y [N] -> [N]."""
    return -logits.gather(1, y[:, None])[:, 0]
