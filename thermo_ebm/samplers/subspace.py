"""A MALA move along the principal directions of a fitted Gaussian mixture (`gaussians.GaussMixture`), for the
slow, stretched directions of each mode that an isotropic step crosses only in O(condition number) steps.

A chain of group t whose model predicts class c (argmax of its logits) moves within x + span(L_tc), L_tc [D, r]
the component's orthonormal directions scaled by its standard deviation along each: Langevin in the subspace
coordinates a (x = x0 + L a), a' = a + (s^2/2) L^T grad log gamma(x) + s zeta. The proposal is rejected when it
leaves the box (gamma is 0 there) or when the model predicts another class at y (the reverse move would use
other directions); otherwise the MH ratio is that of MALA in a. The fibres x + span(L_c) partition each class's
region, so the move leaves gamma on the box exactly invariant.
Shapes: chains [N, D] grouped [G, n]; directions [G, D, C r] float32."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .gaussians import GaussMixture
from .kernels import MalaInfo
from .paths import Particles, select


class Directions(NamedTuple):
    """L of every component side by side, [G, D, C r] float32, and the number of components C (the model's
    classes, or 1 for one component that serves every chain)."""
    lf: torch.Tensor
    components: int


def factors(mix: GaussMixture) -> Directions:
    """The scaled directions L_tc of every group and component. Column j of component c is its j-th direction
    v_j (orthonormal, from the factor W = V diag(sqrt(excess))) times sqrt(v_j^T (diag + W W^T) v_j), the
    component's full standard deviation along it; directions the component does not resolve are zero columns."""
    w = mix.factor                                                               # [G, C, D, r]
    norm = w.norm(dim=2, keepdim=True)                                           # [G, C, 1, r]
    v = torch.where(norm > 0, w / norm.clamp_min(1e-300), torch.zeros_like(w))
    var = (v * v * mix.diag[..., None]).sum(2, keepdim=True) + norm * norm       # [G, C, 1, r]
    lf = v * var.sqrt()
    g, c, d, r = lf.shape
    return Directions(lf.permute(0, 2, 1, 3).reshape(g, d, c * r).float().contiguous(), c)


def _class_columns(labels, r):
    """Index [G, n, r] of the r columns of each chain's class in a [G, n, C r] tensor (labels [G, n] in [0, C))."""
    return labels[..., None] * r + torch.arange(r, device=labels.device)


def subspace_move(path, p: Particles, lam, step, dirs: Directions, generator):
    """One subspace-MALA transition of every chain on gamma_lambda of `path` (lam, step: [N]; dirs from `factors`,
    whose components are the classes of the model's logits, or one for all). Returns (particles, MalaInfo)."""
    lf, n_comp = dirs
    g, d, cr = lf.shape
    r = cr // n_comp
    n = len(p.x) // g

    def label(q):
        return (q.logits.argmax(-1) if n_comp > 1 else torch.zeros(len(q.x), dtype=torch.long,
                                                                    device=q.x.device)).reshape(g, n)

    s = step.reshape(g, n, 1).float()
    lab = label(p)
    cols = _class_columns(lab, r)

    def along(q):  # L^T grad log gamma at q, in the chain's class: [G, n, r]
        return torch.gather(torch.bmm(path.grad(q, lam).reshape(g, n, d).float(), lf), 2, cols)

    zeta = torch.randn((g, n, r), generator=generator, device=p.x.device, dtype=torch.float32)
    da = 0.5 * s * s * along(p) + s * zeta
    spread = torch.zeros(g, n, cr, dtype=da.dtype, device=da.device).scatter_(2, cols, da)  # 0 outside the class
    y = p.x + torch.bmm(spread, lf.transpose(1, 2)).reshape(-1, d).to(p.x.dtype)
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
