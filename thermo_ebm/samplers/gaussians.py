"""Mixtures of low-rank-plus-diagonal Gaussians on R^D, one mixture per temperature group: fit, exact log density
(and the solve its gradient needs), exact draws. The data-informed base of the data-seeded anneal uses one as its fitted
population: a component per cluster of reference states, covariance diag(v) + W W^T (W: [D, r], the leading
principal directions the states resolve). Full covariances would need far more states than a pilot has at
D = 784 (the fit's KL grows as D^2 / n); low rank plus diagonal grows as D r / n.
Shapes: G groups, C components, D coordinates, r directions; x grouped [G, n, D]. Parameters are float64; the
products over D coordinates of the log density are float32 on centred coordinates where their rounding bound
allows (`quadratic`; base.py's Precision note)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

RANK = 32          # most principal directions per component
MIN_STATES = 32    # a cluster with fewer states joins no component (its states fall to the others' tails)
VAR_FLOOR = 0.1    # a coordinate's diagonal variance is at least this fraction of its total variance
ROUNDING_TOL = 0.05  # nats: most mean float32 rounding bound of a group's log q before it is formed in float64


def rounding(terms, d: int):
    """Bound on the float32 rounding of 0.5 * a sum of products over d coordinates whose terms add up (in size) to
    `terms` (any shape): 0.5 * 2^-24 sqrt(d) * terms (blocked summation; measured 3-4x above the rounding seen)."""
    return 0.5 * 2.0 ** -24 * math.sqrt(d) * terms


def centre_of(mean):
    """The point [G, 1, D] the products are centred at: the mean of the means [G, C, D], rounded to float32 (so
    that x - o of a float32 x is one float32 rounding of an exact difference); float64."""
    return mean.mean(1, keepdim=True).float().double()


class QuadForm(NamedTuple):
    """sum_i inv_i (x_i - mu_i)^2 of every component on centred coordinates u = x - o: inv [G, C, D],
    binv = (mu - o) inv, c = sum_i (mu_i - o_i)^2 inv_i [G, C] (float64), float32 copies of inv and binv."""
    inv: torch.Tensor
    binv: torch.Tensor
    c: torch.Tensor
    inv32: torch.Tensor
    binv32: torch.Tensor


def quad_form(mean, inv, o) -> QuadForm:
    """The QuadForm of components with means [G, C, D] and inverse variances inv [G, C, D] about o [G, 1, D]."""
    binv = (mean - o) * inv
    return QuadForm(inv, binv, (binv * (mean - o)).sum(-1), inv.float(), binv.float())


def centred(x, o):
    """u = x - o in float32 and u * u, for x [G, n, D] (any float dtype) and o [G, 1, D] from `centre_of`."""
    u = x.float() - o.float()
    return u, u * u


def quadratic(form: QuadForm, u, sq, x, o):
    """The form at every chain and component [G, n, C] (float64) from u, sq = `centred(x, o)`: float32 products
    unless their rounding bound at each chain's nearest component, averaged over the group's chains, exceeds
    ROUNDING_TOL nats; those groups are formed in float64 from x. Also returns which groups those are [G] (bool)."""
    s = torch.bmm(sq, form.inv32.transpose(1, 2))
    quad = (s - 2.0 * torch.bmm(u, form.binv32.transpose(1, 2))).double() + form.c[:, None, :]
    bound = rounding(s.double() + form.c[:, None, :], u.shape[-1]).gather(-1, quad.argmin(-1, keepdim=True))[..., 0]
    loose = bound.mean(1) > ROUNDING_TOL
    if bool(loose.any()):
        ul = x[loose].double() - o[loose]
        quad[loose] = (torch.bmm(ul * ul, form.inv[loose].transpose(1, 2))
                       - 2.0 * torch.bmm(ul, form.binv[loose].transpose(1, 2)) + form.c[loose][:, None, :])
    return quad, loose


@dataclass
class GaussMixture:
    """weights [G, C] (a row sums to 1; 0 for an empty component), mean [G, C, D], diag [G, C, D] > 0,
    factor [G, C, D, r]: component c of group g is N(mean, diag(diag) + factor factor^T)."""
    weights: torch.Tensor
    mean: torch.Tensor
    diag: torch.Tensor
    factor: torch.Tensor
    centre: torch.Tensor | None = None  # [G, 1, D] where the products are centred (`centre_of`; default: its means')

    def __post_init__(self):
        g, c, d = self.mean.shape
        r = self.factor.shape[-1]
        self.inv_diag = 1.0 / self.diag                                                  # D^-1  [G, C, D]
        if self.centre is None:
            self.centre = centre_of(self.mean)
        self.form = quad_form(self.mean, self.inv_diag, self.centre)
        dw = self.inv_diag[..., None] * self.factor                                      # D^-1 W  [G, C, D, r]
        cap = torch.eye(r, dtype=self.factor.dtype, device=self.factor.device)
        cap = cap + self.factor.transpose(-1, -2) @ dw                                   # I + W^T D^-1 W
        self._cap_chol = torch.linalg.cholesky(cap)                                      # [G, C, r, r]
        self.inv_diag_factor = dw.permute(0, 2, 1, 3).reshape(g, d, c * r)               # D^-1 W  [G, D, C r]
        self._dw32 = self.inv_diag_factor.float()
        self._mdw = ((self.mean - self.centre)[..., None] * dw).sum(2)                   # (m - o)^T D^-1 W  [G, C, r]
        logdet = torch.log(self.diag).sum(-1) + 2.0 * torch.log(torch.diagonal(self._cap_chol, dim1=-2, dim2=-1)).sum(-1)
        self._log_norm = torch.log(self.weights) - 0.5 * (logdet + d * math.log(2.0 * math.pi))   # [G, C]

    @property
    def components(self):
        return self.mean.shape[1]

    def take(self, groups) -> "GaussMixture":
        """The mixture of the groups `groups` [G'] (long) only."""
        return GaussMixture(self.weights[groups], self.mean[groups], self.diag[groups], self.factor[groups],
                            self.centre[groups])

    def recentred(self, centre) -> "GaussMixture":
        """The same mixture with its products centred at `centre` [G, 1, D] (shared with a KernelBase's kernels)."""
        return GaussMixture(self.weights, self.mean, self.diag, self.factor, centre)

    def log_components(self, x, u=None, sq=None):
        """log(w_c N_c(x)) [G, n, C] for x [G, n, D], and t = (I + W^T D^-1 W)^-1 W^T D^-1 (x - m_c) [G, n, C, r],
        with which the gradient of log N_c is D^-1 (m_c - x) + D^-1 W t (`base.KernelBase.log_prob` forms it).
        Written as matrix products over all components (the Woodbury identity for Sigma_c^-1) on the centred
        coordinates u, sq = `centred(x, self.centre)` (formed here unless given)."""
        g, n, d = x.shape
        c, r = self.components, self.factor.shape[-1]
        if u is None:
            u, sq = centred(x, self.centre)
        quad, loose = quadratic(self.form, u, sq, x, self.centre)                       # (x-m)^T D^-1 (x-m)
        proj = torch.bmm(u, self._dw32).double()
        if bool(loose.any()):
            proj[loose] = torch.bmm(x[loose].double() - self.centre[loose], self.inv_diag_factor[loose])
        proj = proj.reshape(g, n, c, r) - self._mdw[:, None]                                      # W^T D^-1 (x - m)
        t = torch.cholesky_solve(proj.permute(0, 2, 3, 1), self._cap_chol).permute(0, 3, 1, 2)
        quad = quad - (proj * t).sum(-1)
        return self._log_norm[:, None, :] - 0.5 * quad, t

    def sample(self, comp, generator):
        """Draws [G, n, D] of the components comp [G, n] (long)."""
        g, n = comp.shape
        d, r = self.mean.shape[-1], self.factor.shape[-1]
        idx = comp[..., None].expand(g, n, d)
        z = torch.randn((g, n, d), generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        zr = torch.randn((g, n, r), generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        w = torch.gather(self.factor, 1, comp[..., None, None].expand(g, n, d, r))
        return (torch.gather(self.mean, 1, idx) + torch.gather(self.diag, 1, idx).sqrt() * z
                + (w @ zr[..., None])[..., 0])


def directions(states, labels, n_labels: int, rank: int = RANK):
    """Principal directions [C, D, r] per label of independent states [S, D] (e.g. the data), each kept when its
    variance exceeds the Marchenko-Pastur edge of pure noise (`fit`); zero columns where fewer are resolved.
    Independent states resolve far more directions than a pilot's correlated chains: at D = 784 the edge of n
    states is (1 + sqrt(D / n))^2 times the rest, about 42 for the 26 chains a pilot has per class."""
    states = states.double()
    out = torch.zeros(n_labels, states.shape[-1], rank, dtype=states.dtype, device=states.device)
    for c in range(n_labels):
        xs = states[labels == c]
        if len(xs) >= MIN_STATES:
            v, k = _principal(xs - xs.mean(0), rank, 1, False)
            out[c, :, :k] = v[:, :k]
    return out


def _principal(u, rank, per_chain, full):
    """Orthonormal principal directions [D, rank] of centred states u [n, D] and how many of them are resolved
    (above the Marchenko-Pastur edge of n / per_chain independent states; all of them when full)."""
    n, d = u.shape
    var = (u * u).sum(0) / (n - 1)
    _, sv, vt = torch.linalg.svd(u, full_matrices=False)
    lam = sv[:rank] ** 2 / (n - 1)
    edge = (1.0 + math.sqrt(d * per_chain / n)) ** 2
    k = len(lam) if full else 0
    while k < len(lam) and lam[k] > edge * (var.sum() - lam[:k + 1].sum()).clamp_min(0.0) / max(d - k - 1, 1):
        k += 1
    return vt[:len(lam)].T, k


def fit(states, labels, n_labels: int, per_chain: int = 1, rank: int = RANK, full: bool = False,
        known=None) -> GaussMixture:
    """A component per label with at least MIN_STATES states (all states in one component when none has): the
    mean, per-coordinate variances on the diagonal, and the principal directions the states resolve. A direction
    is kept (at most `rank`) when its variance lambda exceeds the detection edge of pure noise,
    rest * (1 + sqrt(D / n))^2 (Marchenko-Pastur; n = states / per_chain, counting a chain's correlated states
    once), and enters W with the excess lambda - rest (rest: the mean variance the kept directions leave), so
    that noise does not widen the base in directions the target does not have; the diagonal keeps what W does
    not explain (at least VAR_FLOOR of each coordinate's variance, and 1e-6). full: the sample covariance itself
    (every direction, 1e-6 on the diagonal), for when the chains outnumber the coordinates. known: directions
    [C, D, r'] resolved elsewhere (`directions` of the data): the states' variance along each of them (a
    one-dimensional estimate, free of the edge) enters W with its excess over the rest, beside the states' own
    directions orthogonal to them (ignored when full). states: [G, S, D]; labels: [G, S] in [0, n_labels)."""
    if full:
        rank = states.shape[-1]
    states = states.double()
    g, _, d = states.shape
    counts = torch.stack([(labels == c).sum(1) for c in range(n_labels)], 1)            # [G, C]
    if not bool((counts >= MIN_STATES).any(1).all()):
        labels, n_labels = torch.zeros_like(labels), 1
    mean = torch.zeros(g, n_labels, d, dtype=states.dtype, device=states.device)
    diag = torch.ones_like(mean)
    factor = torch.zeros(g, n_labels, d, rank, dtype=states.dtype, device=states.device)
    kept = 1
    weights = torch.zeros(g, n_labels, dtype=states.dtype, device=states.device)
    for t in range(g):
        for c in range(n_labels):
            xs = states[t][labels[t] == c]
            if len(xs) < MIN_STATES:
                continue
            m = xs.mean(0)
            u = xs - m
            var = (u * u).sum(0) / (len(xs) - 1)
            v = torch.zeros(d, 0, dtype=u.dtype, device=u.device)
            if known is not None and c < len(known) and not full:  # full: the sample covariance already is
                v = known[c][:, known[c].abs().sum(0) > 0][:, :rank].to(u)               # [D, k0] orthonormal
            own, k = _principal(u - (u @ v) @ v.T, rank - v.shape[1], per_chain, full)
            v = torch.cat([v, own[:, :k]], 1)
            k = v.shape[1]
            lam = ((u @ v) ** 2).sum(0) / (len(xs) - 1)                                    # variance along each
            rest = 0.0 if full or k == d else float((var.sum() - lam.sum()).clamp_min(0.0)) / (d - k)
            w = v * (lam - rest).clamp_min(0.0).sqrt()                                     # [D, k]
            mean[t, c], weights[t, c] = m, float(len(xs))
            factor[t, c, :, :k] = w
            kept = max(kept, k)
            diag[t, c] = (torch.full_like(var, 1e-6) if full
                          else torch.maximum(var - (w * w).sum(1), VAR_FLOOR * var).clamp_min(1e-6))
    return GaussMixture(weights / weights.sum(1, keepdim=True), mean, diag, factor[..., :kept].contiguous())
