"""Paths of densities gamma_lambda on the box that the anneals move along, and the moves, reweighting and
resampling every anneal shares. A path gives log gamma_lambda(x) and its gradient for chains in G groups (each
group its own lambda, per chain [N]):
* `Tempering`: lambda is beta itself, gamma_beta = g_beta (the model at inverse temperature beta), from the
  uniform distribution (beta = 0);
* `Bridge`: group t anneals gamma = q_t^(1 - lambda) g_beta_t^lambda from an exactly normalised base q_t
  (base.KernelBase) to g_beta_t, lambda: 0 -> 1;
* `Tilt`: group t anneals gamma = q_t exp(lambda h) from q_t, for a factor h of the model's density (the
  network's part over a model's fixed base: training's class-weight fit).
`mala_move` is a reflected-MALA step on any path (the HMC move is smc.hmc_move); `reweight`, `resample`
(systematic, per population) and `weighted_pick` (states drawn by weight for the sweep) serve every anneal.
Paths take the run's `Sampler` context (model, ensemble, state shape). Chains are flat [N, D], grouped [G, n] ->
[G * n]."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .base import KernelBase, start_states
from .kernels import EAGER, MalaInfo, Sampler, uniform

RESAMPLE_ESS = 0.5  # a population is resampled when its ESS falls below this fraction of its size


def per_chain(values, n: int, device, dtype=torch.float32) -> torch.Tensor:
    """[G] per-group values -> [G * n] per-chain tensor (n consecutive chains per group)."""
    return torch.as_tensor(np.repeat(np.asarray(values, dtype=np.float64), n), dtype=dtype, device=device)


class Particles(NamedTuple):
    """Chain state: x [N, D], logits [N, K], log g of the model part [N] (float64) and the gradient the
    dynamics use [N, D], log q of the base [N] (float64) and its gradient [N, D] (zeros without a base)."""
    x: torch.Tensor
    logits: torch.Tensor
    lp: torch.Tensor
    gp: torch.Tensor
    lq: torch.Tensor
    gq: torch.Tensor


class Tempering:
    """gamma_beta(x) = g_beta(x) on the box, lambda = beta, from uniform. The dynamics use beta times the
    gradient of the unit potential (exact for the marginal ensemble; for the joint a surrogate, which keeps HMC
    exact: the leapfrog map stays volume-preserving and reversible, and the MH test uses the true density)."""

    def __init__(self, s: Sampler):
        self.model, self.ens, self.shape = s.model, s.ensemble, tuple(s.shape)
        self.d = int(np.prod(s.shape))

    def start(self, n, generator, device):
        """n uniform draws [n, D], their initial log-weights (0) and base components (0) [n]."""
        x = uniform(n, (self.d,), generator, device)
        return x, torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.long, device=device)

    def evaluate(self, x) -> Particles:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = self.model(x.reshape(len(x), *self.shape))
            u = self.ens.unit_potential(logits)
            (g,) = torch.autograd.grad(u.sum(), x)
        z = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        return Particles(x.detach(), logits.detach(), u.detach().double(), g, z, torch.zeros_like(g))

    def log_gamma(self, p: Particles, lam):
        return self.ens.logp(p.logits, lam.to(p.logits.dtype)).double()

    def grad(self, p: Particles, lam):
        return lam[:, None].to(p.gp.dtype) * p.gp

    def energy(self, p: Particles, lam):
        """(<E | x>, <E^2 | x>) at the chains' beta (lambda); [2, N] float64."""
        return torch.stack(self.ens.energy_moments(p.logits, lam.to(p.logits.dtype))).double()


class Bridge:
    """gamma_lambda = q_t^(1 - lambda) g_beta_t^lambda for group t (betas [G], n chains per group), starting from
    exact draws of the normalised base q_t (a draw outside the box starts with weight 0)."""

    def __init__(self, s: Sampler, base: KernelBase, betas, n):
        self.model, self.ens, self.shape, self.base = s.model, s.ensemble, tuple(s.shape), base
        self.d = int(np.prod(s.shape))
        self.n = n
        self.beta = per_chain(betas, n, base.centres.device)

    def start(self, n, generator, device, block=None):
        """n draws [n, D] of the bases (n / G per group), their initial log-weights and mixture components [n];
        block: components allotted within runs of that many chains (`KernelBase.sample`)."""
        x, lw0, comp = start_states(self.base, n // self.base.groups, generator, (self.d,), block)
        return x, lw0.to(device), comp.reshape(-1).to(device)

    def evaluate(self, x) -> Particles:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = self.model(x.reshape(len(x), *self.shape))
            lp = self.ens.logp(logits, self.beta)
            (g,) = torch.autograd.grad(lp.sum(), x)
        lq, gq = self.base.log_prob(x.detach())
        return Particles(x.detach(), logits.detach(), lp.detach().double(), g, lq, gq.to(g.dtype))

    def log_gamma(self, p: Particles, lam):
        lam = lam.double()
        return (1.0 - lam) * p.lq + lam * p.lp

    def grad(self, p: Particles, lam):
        lam = lam[:, None].to(p.gp.dtype)
        return (1.0 - lam) * p.gq + lam * p.gp

    def energy(self, p: Particles, lam):
        """(<E | x>, <E^2 | x>) at the group's beta; [2, N] float64."""
        return torch.stack(self.ens.energy_moments(p.logits, self.beta)).double()


class Tilt:
    """gamma_lambda = q_t exp(lambda h) for group t (n chains per group), from exact draws of the normalised q_t
    (base.KernelBase, one group per q_t); h: x [N, *shape] -> [N], a log density factor (differentiable). At
    lambda = 1, log Z = log E_{q_t}[exp h]. Particles hold h in lp (and in logits, [N, 1])."""

    def __init__(self, s: Sampler, base: KernelBase, tilt):
        self.shape, self.base, self.tilt = tuple(s.shape), base, tilt
        self.d = int(np.prod(s.shape))

    start = Bridge.start  # exact draws of the bases q_t

    def evaluate(self, x) -> Particles:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            h = self.tilt(x.reshape(len(x), *self.shape))
            (g,) = torch.autograd.grad(h.sum(), x)
        lq, gq = self.base.log_prob(x.detach())
        h = h.detach()
        return Particles(x.detach(), h[:, None], h.double(), g, lq, gq.to(g.dtype))

    def log_gamma(self, p: Particles, lam):
        return p.lq + lam.double() * p.lp

    def grad(self, p: Particles, lam):
        return p.gq + lam[:, None].to(p.gp.dtype) * p.gp

    def energy(self, p: Particles, lam):
        """(-h, h^2) per chain; [2, N] float64."""
        return torch.stack([-p.lp, p.lp * p.lp])


def mala_move(path, p: Particles, lam, step, generator, kernel=EAGER):
    """One reflected-MALA step of every chain on gamma_lambda of `path` (lam, step: [N]), MH-exact on the box.
    Returns (particles, MalaInfo)."""
    s = step[:, None]
    one = torch.ones_like(s)
    gx = path.grad(p, lam)
    y = kernel.propose(p.x, gx, s, one, kernel.noise(p.x, generator))
    q = path.evaluate(y)
    dlp = (path.log_gamma(q, lam) - path.log_gamma(p, lam)).float()
    log_u = torch.rand(len(p.x), generator=generator, device=p.x.device, dtype=p.x.dtype).log()
    finite = torch.isfinite(dlp)
    _, _, acc = kernel.accept(p.x, y, gx, path.grad(q, lam), s, one, dlp, log_u, finite)
    return select(acc, q, p), MalaInfo(acc, finite)


def select(acc, new, old):
    """Per chain, `new` where acc [N] is true, else `old` (NamedTuples of per-chain tensors)."""
    return type(old)(*(torch.where(acc.reshape(-1, *[1] * (b.ndim - 1)), b, a) for a, b in zip(old, new)))


def reweight(path, p: Particles, logw, lam, lam_new):
    """log-weights [N] after moving the target from lam to lam_new [N]: + log gamma_new - log gamma_old."""
    return logw + path.log_gamma(p, lam_new) - path.log_gamma(p, lam)


def resample(logw, pop: int, generator):
    """SMC resampling step. logw: [N] float64 log-weights of populations of `pop` consecutive chains. A
    population whose ESS is below RESAMPLE_ESS * pop is resampled systematically, and each of its chains then
    carries the population's log mean weight, so that logmeanexp over a population stays its running, unbiased
    estimate of Z (for fixed resampling times; ESS-triggered times keep it consistent).
    Returns (indices [N] of the chains to continue, log-weights [N], number of populations resampled)."""
    lw = torch.nan_to_num(logw, nan=-math.inf, neginf=-math.inf).reshape(-1, pop)
    top = lw.max(-1, keepdim=True).values
    alive = torch.isfinite(top[:, 0])
    w = torch.exp(lw - torch.where(alive[:, None], top, torch.zeros_like(top)))
    w = w / w.sum(-1, keepdim=True)
    need = alive & (1.0 / (w * w).sum(-1) < RESAMPLE_ESS * pop)
    idx = torch.arange(lw.numel(), device=lw.device).reshape(-1, pop)
    n_need = int(need.sum())
    if n_need:
        cdf = torch.cumsum(w[need], -1)
        cdf[:, -1] = 1.0
        u = (torch.rand((n_need, 1), generator=generator, device=lw.device, dtype=lw.dtype)
             + torch.arange(pop, device=lw.device, dtype=lw.dtype)) / pop
        j = torch.searchsorted(cdf, u).clamp_max(pop - 1)
        idx[need] = torch.gather(idx[need], 1, j)
        lw = lw.clone()
        lw[need] = (torch.logsumexp(lw[need], -1, keepdim=True) - math.log(pop)).expand(-1, pop)
    return idx.reshape(-1), lw.reshape(-1), n_need


def weighted_pick(logw, n_keep: int, generator):
    """n_keep chain indices per group drawn by weight (multinomial, with replacement) from log-weights [G, n]:
    flat indices [G * n_keep] into the [G * n] chains."""
    lw = torch.nan_to_num(logw, nan=-math.inf)
    pick = torch.multinomial(torch.softmax(lw, -1).float(), n_keep, replacement=True, generator=generator)
    return (pick + torch.arange(lw.shape[0], device=pick.device)[:, None] * lw.shape[1]).reshape(-1)
