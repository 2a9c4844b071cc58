"""The data-informed base distribution of the data-seeded anneals (an exactly normalised density per temperature
group t):
    q_t(x) = w_u 2^-D 1_box(x) + sum_m w_m prod_i TN(x_i; mu_tmi, sigma_tmi) + sum_f w_f GaussMixture_f(x)
uniform mixed with box-truncated Gaussian kernels on M reference states and fitted Gaussian mixtures
(`gaussians.py`, normalised on R^D: a draw outside the box starts with weight 0, since the target is 0 there):
`KernelBase` (log density, gradient, exact draws), `start_states`, `population_weights`.

Precision. The quadratic forms over every component (the cost of the data-seeded anneals at d = 784) are products
over D coordinates, taken in float32 on coordinates centred at the group's mean centre (so that the terms a form
cancels stay near its size); constants, the Woodbury solve and the log-sum are float64. The rounding of a D-term
float32 product is at most ~2^-24 sqrt(D) times the size of its terms (`gaussians.rounding`); where that bound,
averaged over a group's chains at their nearest component, exceeds gaussians.ROUNDING_TOL nats (narrow kernels far
from the centre: a cold, concentrated phase), the group's products are float64 instead. Measured on the bases of
the d = 784 exact system and of the MNIST JEM at 16 temperatures: log q within 4e-3 nats of float64 at every state,
SD 7e-4, mean 1e-5 (a zero-mean error of that size moves log Z by far less than 1e-3 nats)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .gaussians import centre_of, centred, quad_form, quadratic
from .kernels import uniform

SIGMA_FLOOR = 1e-3


@dataclass
class KernelBase:
    """q_t per group t: kernel centres and widths [G, M, D], fitted Gaussian mixtures (gaussians.GaussMixture,
    normalised on R^D; none or several) and mixture weights [G, M + F + 1] (kernels, one column per fitted
    mixture, uniform last)."""
    centres: torch.Tensor
    sigma: torch.Tensor
    weights: torch.Tensor
    gauss: tuple = ()

    def __post_init__(self):
        mu, sig = self.centres.double(), self.sigma.double().clamp_min(SIGMA_FLOOR)
        self.centres, self.sigma = mu, sig
        g, m, d = mu.shape
        w = self.weights.double().to(mu.device)
        self.weights = w / w.sum(-1, keepdim=True)
        inv = 1.0 / (sig * sig)
        self._o = centre_of(mu)                                           # [G, 1, D] centre of every product
        self._form = quad_form(mu, inv, self._o)                          # the kernels' exponents
        self.gauss = tuple(mix.recentred(self._o) for mix in self.gauss)
        if w.shape[-1] != m + 1 + len(self.gauss):
            raise ValueError(f"weights need {m + 1 + len(self.gauss)} columns, got {w.shape[-1]}")
        r2 = math.sqrt(2.0)
        mass = 0.5 * (torch.erf((1 - mu) / (sig * r2)) - torch.erf((-1 - mu) / (sig * r2)))
        log_norm = (-(torch.log(sig) + 0.5 * math.log(2 * math.pi)) - torch.log(mass)).sum(-1)
        self._log_k = torch.log(self.weights[:, :m]) + log_norm            # [G, M]
        self._log_u = torch.log(self.weights[:, -1]) - d * math.log(2.0)   # [G]
        # the gradient only steers proposals (their MH ratios use it consistently), so it is formed in float32, in
        # three products over every component: sum_c r_c (b_c - a_c u) + sum_f sum_c r_c (D^-1 W)_c t_c, with
        # b_c = a_c (mu_c - o) and u = x - o
        self._grad_a = torch.cat([inv, *(mix.inv_diag for mix in self.gauss)], 1).float()      # [G, M + C, D]
        self._grad_b = torch.cat([self._form.binv, *(mix.form.binv for mix in self.gauss)], 1).float()
        self._grad_w = (torch.cat([mix.inv_diag_factor for mix in self.gauss], 2).transpose(1, 2).float().contiguous()
                        if self.gauss else None)                                                # [G, sum C r, D]

    @property
    def groups(self):
        return self.centres.shape[0]

    def take(self, groups) -> "KernelBase":
        """The base of the groups `groups` [G'] (long) only: each group's density is unchanged."""
        return KernelBase(self.centres[groups], self.sigma[groups], self.weights[groups],
                          tuple(mix.take(groups) for mix in self.gauss))

    def log_prob(self, x):
        """log q(x) [N] (float64) and its gradient [N, D] (float32); x: [G * n, D] grouped as the chains, in the
        box."""
        g, m, d = self.centres.shape
        xg = x.reshape(g, -1, d)
        u, sq = centred(xg, self._o)
        quad, _ = quadratic(self._form, u, sq, xg, self._o)              # [G, n, M]
        comps = [self._log_k[:, None, :] - 0.5 * quad, self._log_u[:, None, None].expand(g, xg.shape[1], 1)]
        solved = []
        for f, mix in enumerate(self.gauss):
            log_g, t = mix.log_components(xg, u, sq)                      # [G, n, C_f]
            comps.append(torch.log(self.weights[:, m + f])[:, None, None] + log_g)
            solved.append(t)
        logc = torch.cat(comps, -1)
        logq = torch.logsumexp(logc, -1)                                  # [G, n]
        r = torch.exp(logc - logq[..., None])                             # responsibilities (uniform: column m)
        rd = torch.cat([r[..., :m], r[..., m + 1:]], -1).float()          # of every Gaussian component
        grad = torch.bmm(rd, self._grad_b) - u * torch.bmm(rd, self._grad_a)
        if self.gauss:
            parts = rd[..., m:].split([mix.components for mix in self.gauss], -1)
            rt = torch.cat([(rc[..., None] * t.float()).flatten(2) for rc, t in zip(parts, solved)], -1)
            grad = grad + torch.bmm(rt, self._grad_w)                   # rt: [G, n, sum C r]
        return logq.reshape(-1), grad.reshape(-1, d)

    def sample(self, n: int, generator, block: int | None = None):
        """n exact draws from each q_t: x [G * n, D] float64, grouped, and their population [G, n] (M: the
        fitted mixture when there is one, the last: uniform). Draws of the fitted mixture may lie outside the box.
        block: the components are allotted by `stratified` within each run of `block` consecutive draws (each
        draw still has q_t's law); None: independently."""
        g, m, d = self.centres.shape
        dev = self.centres.device
        if block is None:
            comp, which = torch.multinomial(self.weights, n, replacement=True, generator=generator), None
        else:
            comp, which = self._stratified(n, block, generator)
        k = comp.clamp_max(m - 1)
        mu = torch.gather(self.centres, 1, k[..., None].expand(g, n, d))
        sig = torch.gather(self.sigma, 1, k[..., None].expand(g, n, d))
        lo, hi = torch.special.ndtr((-1 - mu) / sig), torch.special.ndtr((1 - mu) / sig)
        u = torch.rand((g, n, d), generator=generator, device=dev, dtype=torch.float64)
        x = (mu + sig * torch.special.ndtri(lo + u * (hi - lo))).clamp(-1.0, 1.0)
        xu = uniform(g * n, (d,), generator, dev).double().reshape(g, n, d)
        x = torch.where((comp == self.weights.shape[-1] - 1)[..., None], xu, x)
        for f, mix in enumerate(self.gauss):
            sub = (torch.multinomial(mix.weights, n, replacement=True, generator=generator) if which is None
                   else which[f])
            x = torch.where((comp == m + f)[..., None], mix.sample(sub, generator), x)
        return x.reshape(g * n, d), comp

    def _stratified(self, n, block, generator):
        """`sample`'s components [G, n], and for each fitted mixture its own component [G, n] (used where the
        first is that mixture's), allotted by `stratified` over every component of every mixture at once."""
        m = self.centres.shape[1]
        parts = [self.weights[:, :m], *(self.weights[:, m + f, None] * mix.weights for f, mix in enumerate(self.gauss)),
                 self.weights[:, -1:]]                                        # kernels, mixtures' components, uniform
        pick = stratified(torch.cat(parts, 1), n, block, generator)
        first = torch.as_tensor(np.cumsum([0] + [q.shape[1] for q in parts]), device=pick.device)
        comp = torch.where(pick < m, pick, torch.bucketize(pick, first[1:], right=True) - 1 + m)
        which = [(pick - first[1 + f]).clamp(0, mix.components - 1) for f, mix in enumerate(self.gauss)]
        return comp, which


def stratified(weights, n: int, block: int, generator):
    """Component indices [G, n] with law weights [G, K] at every draw, allotted by systematic sampling within
    each run of `block` consecutive draws (the last run may be shorter) and shuffled there: a component's count
    in a run is within 1 of its expectation, where independent draws leave it binomial (a phase the base holds
    with 10% of 32 draws: 3.2 +- 1.7). Runs are independent, so statistics over runs keep their meaning."""
    g, k = weights.shape
    dev = weights.device
    slot = torch.arange(n, device=dev)
    run = slot // block
    size = torch.clamp(n - run * block, max=block).double()
    offset = torch.rand((g, int(run[-1]) + 1), generator=generator, device=dev, dtype=torch.float64)
    pos = (offset[:, run] + (slot - run * block).double()) / size
    cdf = torch.cumsum(weights.double(), -1)
    cdf = cdf / cdf[:, -1:]
    pick = torch.searchsorted(cdf, pos.contiguous(), right=True).clamp_max(k - 1)
    key = run.double() + torch.rand((g, n), generator=generator, device=dev, dtype=torch.float64)
    return torch.gather(pick, 1, torch.argsort(key, dim=-1))


def start_states(base: KernelBase, n: int, generator, shape, block: int | None = None):
    """Draws of q_t as chain states [G * n, *shape] (float32, in the box) and their initial log-weights [G * n]
    (0, or -inf for a Gaussian draw outside the box, where the target has no mass), and their components;
    block: see `KernelBase.sample`."""
    x, comp = base.sample(n, generator, block)
    inside = (x.abs() <= 1.0).all(-1)
    lw0 = torch.where(inside, torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], -math.inf))
    return x.clamp(-1.0, 1.0).float().reshape(-1, *shape), lw0, comp


def population_weights(sizes, shares, floor, inner=None):
    """Mixture weights [G, M + 1] giving population j (sizes[j] consecutive kernels, then the uniform last)
    the share shares[:, j] (floored at `floor`, renormalised), split equally over its kernels, or as
    inner[j] [G, sizes[j]] (rows summing to 1) says."""
    shares = np.maximum(np.asarray(shares, dtype=np.float64), floor)
    shares = shares / shares.sum(-1, keepdims=True)
    inner = inner or {}
    cols = [shares[:, j:j + 1] * np.asarray(inner[j], dtype=np.float64) if j in inner
            else np.repeat(shares[:, j:j + 1] / max(n, 1), n, axis=1) for j, n in enumerate(sizes)]
    return torch.as_tensor(np.concatenate(cols, 1))
