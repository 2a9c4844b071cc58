"""Tempered log-densities log g_beta(x) (unnormalised, on the box) built from logits f(x).

marginal:    log g = beta * logsumexp_y f_y          (E(x) = -logsumexp f)
joint:       log g = logsumexp_y (beta * f_y)        (x-marginal of p_T(x,y) ∝ exp(beta f_y(x)))
conditional: log g = beta * f_label                  (p_T(x | y = label))
All take logits [N, K] and beta [N] and return [N] (float).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ThermoEBMError

KINDS = ("marginal", "joint", "conditional")


@dataclass(frozen=True)
class Ensemble:
    """Which distribution of a K-logit model: marginal p(x), joint p(x, y) or conditional p(x | label)."""
    kind: str
    n_classes: int
    label: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ThermoEBMError(f"unknown ensemble {self.kind!r}; choose marginal or joint")
        if self.kind == "conditional" and not (self.label is not None and 0 <= self.label < self.n_classes):
            raise ThermoEBMError(f"label must be in 0..{self.n_classes - 1}, got {self.label}")

    def unit_potential(self, logits):
        """The beta-free function whose x-gradient (times beta) is the sampler's drift; [N]."""
        if self.kind == "conditional":
            return logits[:, self.label]
        return torch.logsumexp(logits, dim=-1)

    def logp(self, logits, beta):
        if self.kind == "joint":
            return torch.logsumexp(beta[:, None] * logits, dim=-1)
        return beta * self.unit_potential(logits)

    def log_omega(self, d: int) -> float:
        """log of the reference volume: d log 2 (times K states for joint)."""
        return d * math.log(2.0) + (math.log(self.n_classes) if self.kind == "joint" else 0.0)

    def energy_moments(self, logits, beta):
        """Per-sample conditional moments (<E | x>, <E^2 | x>) under p_T; each [N]."""
        if self.kind == "joint":
            p = torch.softmax(beta[:, None] * logits, dim=-1)
            return -(p * logits).sum(-1), (p * logits * logits).sum(-1)
        e = -self.unit_potential(logits)
        return e, e * e
