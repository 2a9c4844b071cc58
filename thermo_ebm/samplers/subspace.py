"""A MALA move along the principal directions of a fitted Gaussian mixture (`gaussians.GaussMixture`), for the
slow, stretched directions of each mode that an isotropic step crosses only in O(condition number) steps.

A chain of group t whose model predicts class c (argmax of its logits) moves within x + span(L_tc), L_tc [D, r]
the component's orthonormal directions scaled by its standard deviation along each: Langevin in the subspace
coordinates a (x = x0 + L a), a' = a + (s^2/2) L^T grad log gamma(x) + s zeta. The proposal is rejected when it
leaves the box (gamma is 0 there) or when the model predicts another class at y (the reverse move would use
other directions); otherwise the MH ratio is that of MALA in a. The fibres x + span(L_c) partition each class's
region, so the move leaves gamma on the box exactly invariant.
Shapes: chains [N, D] grouped [G, n]; directions [G, C, D, r] float32."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .gaussians import GaussMixture
from .kernels import MalaInfo
from .paths import Particles, select


class Directions(NamedTuple):
    """L of every component, [G, C, D, r] float32 (C: the model's classes, or 1 for one component that serves every
    chain)."""
    lf: torch.Tensor

    @property
    def components(self):
        return self.lf.shape[1]


def factors(mix: GaussMixture) -> Directions:
    """The scaled directions L_tc of every group and component. Column j of component c is its j-th direction
    v_j (orthonormal, from the factor W = V diag(sqrt(excess))) times sqrt(v_j^T (diag + W W^T) v_j), the
    component's full standard deviation along it; directions the component does not resolve are zero columns."""
    w = mix.factor                                                               # [G, C, D, r]
    norm = w.norm(dim=2, keepdim=True)                                           # [G, C, 1, r]
    v = torch.where(norm > 0, w / norm.clamp_min(1e-300), torch.zeros_like(w))
    var = (v * v * mix.diag[..., None]).sum(2, keepdim=True) + norm * norm       # [G, C, 1, r]
    return Directions((v * var.sqrt()).float().contiguous())


def by_class(labels, n_comp):
    """The chains of each class, for `project` and `expand`: per class c that some chain predicts, (c, rows [G * K],
    dest [G * K]), flat indices into the [G * n] chains of each group's chains of class c (labels [G, n]), padded to
    the largest group's count K; dest is rows with the padding sent to index G * n (a spare row); rows is None where
    every chain is of class c."""
    g, n = labels.shape
    order = torch.argsort(labels, dim=1, stable=True)
    counts = torch.zeros(g, n_comp, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))                   # [G, C]
    starts = counts.cumsum(1) - counts
    first = torch.arange(g, device=labels.device)[:, None] * n
    plan = []
    for c, k in enumerate(counts.max(0).values.tolist()):
        if k == n and bool((counts[:, c] == n).all()):
            plan.append((c, None, None))
        elif k:
            j = torch.arange(k, device=labels.device)
            rows = order.gather(1, (starts[:, c, None] + j).clamp_max(n - 1)) + first
            dest = torch.where(j < counts[:, c, None], rows, torch.full_like(rows, g * n))
            plan.append((c, rows.reshape(-1), dest.reshape(-1)))
    return plan


def _per_class(x, plan, mat):
    """x [G, n, k] -> [G, n, k'], each chain's row times mat(c) [G, k, k'] of its class c (plan from `by_class`):
    one product per class, over its chains only."""
    g, n, k = x.shape
    out = None
    for c, rows, dest in plan:
        m = mat(c)
        if rows is None:
            return torch.bmm(x, m)
        res = torch.bmm(x.reshape(g * n, k).index_select(0, rows).reshape(g, -1, k), m)
        if out is None:
            out = x.new_empty(g * n + 1, m.shape[-1])
        out.index_copy_(0, dest, res.reshape(-1, m.shape[-1]))
    return out[:-1].reshape(g, n, -1)


def project(v, dirs: Directions, plan):
    """L_tc^T v of each chain in its class c: v [G, n, D] float32 -> [G, n, r]; plan = `by_class(labels, C)`."""
    return _per_class(v, plan, lambda c: dirs.lf[:, c])


def expand(a, dirs: Directions, plan):
    """L_tc a of each chain in its class c: a [G, n, r] float32 -> [G, n, D]; plan = `by_class(labels, C)`."""
    return _per_class(a, plan, lambda c: dirs.lf[:, c].transpose(1, 2))


def subspace_move(path, p: Particles, lam, step, dirs: Directions, generator):
    """One subspace-MALA transition of every chain on gamma_lambda of `path` (lam, step: [N]; dirs from `factors`,
    whose components are the classes of the model's logits, or one for all). Returns (particles, MalaInfo)."""
    g, n_comp, d, r = dirs.lf.shape
    n = len(p.x) // g

    def label(q):
        return (q.logits.argmax(-1) if n_comp > 1 else torch.zeros(len(q.x), dtype=torch.long,
                                                                    device=q.x.device)).reshape(g, n)

    s = step.reshape(g, n, 1).float()
    lab = label(p)
    plan = by_class(lab, n_comp)  # the chains of each class (the move keeps each chain in its class)

    def along(q):  # L^T grad log gamma at q, in the chain's class: [G, n, r]
        return project(path.grad(q, lam).reshape(g, n, d).float(), dirs, plan)

    zeta = torch.randn((g, n, r), generator=generator, device=p.x.device, dtype=torch.float32)
    da = 0.5 * s * s * along(p) + s * zeta
    y = p.x + expand(da, dirs, plan).reshape(-1, d).to(p.x.dtype)
    inside = (y.abs() <= 1.0).all(-1)
    q = path.evaluate(y.clamp(-1.0, 1.0))
    same = (label(q) == lab).reshape(-1)
    rev = (-da - 0.5 * s * s * along(q)) / s
    log_q = (0.5 * (zeta * zeta).sum(-1) - 0.5 * (rev * rev).sum(-1)).reshape(-1).double()
    dlp = path.log_gamma(q, lam) - path.log_gamma(p, lam)
    finite = torch.isfinite(dlp)
    log_u = torch.rand(len(p.x), generator=generator, device=p.x.device, dtype=torch.float64).log()
    acc = (log_u < dlp + log_q) & finite & inside & same
    return select(acc, q, p), MalaInfo(acc, finite)
