"""Samplers over a small state, with an explicit torch.Generator (BlackJAX style).

* Langevin/SGLD (training): x <- clamp(x - step * dE/dx + noise * xi, -1, 1). Not MH-corrected; used
  only where no unbiasedness is claimed.
* Reflected MALA (measurement): proposal z = x + (s^2/2) beta grad u(x) + s xi, folded into the box
  [-1,1] by reflection; the Metropolis-Hastings ratio uses the exact folded-Gaussian density (sum over
  mirror images), so each kernel leaves p_beta(x) ∝ g_beta(x) on the box exactly invariant.
  Tempering is a per-chain beta tensor [N]; step sizes are per chain [N].
Shapes: x [N, *shape]; logits [N, K]; energies and betas [N].
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

MAX_STEP = 0.5  # keeps the omitted mirror images of the folded Gaussian below ~e^-24 relative weight


# --------------------------------------------------------------------------- Langevin (training)
class LangevinState(NamedTuple):
    x: torch.Tensor
    energy: torch.Tensor
    grad: torch.Tensor


def energy_and_grad(energy_fn: Callable, x: torch.Tensor):
    """E(x) [N] and dE/dx [N, *shape] by autograd on the input only (parameters untouched)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy_fn(x)
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g


def langevin_init(energy_fn, x) -> LangevinState:
    e, g = energy_and_grad(energy_fn, x)
    return LangevinState(x.detach(), e, g)


def langevin_move(state: LangevinState, step_size: float, noise_std: float, generator) -> torch.Tensor:
    """One SGLD position update (no energy evaluation); result kept in the box by clamping."""
    x = torch.randn(state.x.shape, generator=generator, device=state.x.device, dtype=state.x.dtype)
    return x.mul_(noise_std).add_(state.grad, alpha=-step_size).add_(state.x).clamp_(-1.0, 1.0)


def langevin_step(state, energy_fn, step_size, noise_std, generator) -> LangevinState:
    return langevin_init(energy_fn, langevin_move(state, step_size, noise_std, generator))


# --------------------------------------------------------------------------- reflected MALA
class MalaState(NamedTuple):
    x: torch.Tensor       # [N, *shape] in the box
    logits: torch.Tensor  # [N, K] at x
    ugrad: torch.Tensor   # [N, *shape], gradient of the ensemble's unit potential at x


def evaluate(model, ensemble, x):
    """Logits and the unit-potential gradient at x (one forward + one input-gradient backward)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (g,) = torch.autograd.grad(ensemble.unit_potential(logits).sum(), x)
    return logits.detach(), g


def mala_init(model, ensemble, x) -> MalaState:
    logits, g = evaluate(model, ensemble, x)
    return MalaState(x.detach(), logits, g)


def fold(z: torch.Tensor) -> torch.Tensor:
    """Reflect any real z into [-1, 1] (period 4). w = a - 4 floor(a/4) lies in [0, 4] in floating point
    (a/4 and 4k are exact, rounding is monotone), so the result stays in the box; written with floor and
    abs rather than remainder and where, which compile to a ~1.4x slower loop."""
    a = z + 1.0
    w = a - 4.0 * torch.floor(a * 0.25)
    return 1.0 - (w - 2.0).abs()


def log_folded_normal(y, mu, s):
    """log density (up to the s-only constant) of fold(N(mu, s^2)) at y, summed over dims; [N].

    y, mu: [N, D]; s: [N, 1]. The density is a sum over the mirror images of y; by the fold's symmetry
    mu can be folded first (m), after which the images y, 2-y, -2-y, y+4, y-4 hold all mass above
    ~e^-24 for s <= 0.5. Written relative to the direct image, with r = y - m in [-2, 2]:
    log sum = -r^2/(2 s^2) + log1p(e^{-2(1-y)(1-m)/s^2} + e^{-2(1+y)(1+m)/s^2} + e^{-(8-4|r|)/s^2} + e^{-(8+4|r|)/s^2}),
    every exponent <= 0 (no max needed, no [N, D, 5] tensor). The last term is below e^{-8/s^2} <= e^{-32}
    (relative weight 1.3e-14, far below the e^-24 images already omitted) and is dropped: three exps per element.
    """
    m = fold(mu)
    r = y - m
    inv = 1.0 / (s * s)
    extra = (torch.exp(-2.0 * inv * (1.0 - y) * (1.0 - m)) + torch.exp(-2.0 * inv * (1.0 + y) * (1.0 + m))
             + torch.exp(-inv * (8.0 - 4.0 * r.abs())))
    return (torch.log1p(extra) - 0.5 * inv * r * r).sum(-1)


def propose(x, ugrad, s, b, xi):
    """Reflected MALA proposal y = fold(mu_x + s xi) with mu_x = x + (s^2/2) b ugrad; x, ugrad, xi [N, D]."""
    mu_x = x + 0.5 * s * s * b * ugrad
    return fold(mu_x + s * xi), mu_x


def log_q_ratio(x, y, mu_x, g_y, s, b):
    """log q(x | y) - log q(y | x) of the folded proposal; [N]."""
    mu_y = y + 0.5 * s * s * b * g_y
    return log_folded_normal(x, mu_y, s) - log_folded_normal(y, mu_x, s)


class MalaKernel(NamedTuple):
    """The elementwise parts of a reflected-MALA step (eager, or fused by torch.compile)."""
    propose: Callable
    log_q_ratio: Callable


EAGER = MalaKernel(propose, log_q_ratio)


def _with_fallback(compiled, eager, box):
    def call(*args):
        if box["eager"]:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as e:  # compiler missing or failing: the exact eager path
            logging.getLogger("thermo_ebm").warning("torch.compile unavailable (%s); using eager MALA",
                                                    str(e).splitlines()[0][:120])
            box["eager"] = True
            return eager(*args)
    return call


def mala_kernel(compile: bool) -> MalaKernel:
    """EAGER, or the same functions through torch.compile: one fused loop each instead of one pass over
    [N, D] tensors per elementwise op (the reflected-MALA overhead at large d; docs/performance.md). Falls back to eager, with a
    warning, when compilation is unavailable (e.g. no C++ compiler)."""
    if not compile:
        return EAGER
    box = {"eager": False}
    return MalaKernel(*(_with_fallback(torch.compile(f, dynamic=True), f, box) for f in EAGER))


def mala_step(state: MalaState, model, ensemble, beta, step, generator, kernel: MalaKernel = EAGER):
    """One reflected-MALA step at inverse temperatures beta [N] with step sizes step [N].

    Returns (new_state, accepted [N] bool, finite [N] bool: proposal log-density finite).
    """
    n = state.x.shape[0]
    x = state.x.reshape(n, -1)
    s = step[:, None]
    b = beta[:, None]
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    y, mu_x = kernel.propose(x, state.ugrad.reshape(n, -1), s, b, xi)
    logits_y, g_y = evaluate(model, ensemble, y.reshape(state.x.shape))
    lp_x = ensemble.logp(state.logits, beta)
    lp_y = ensemble.logp(logits_y, beta)
    log_a = lp_y - lp_x + kernel.log_q_ratio(x, y, mu_x, g_y.reshape(n, -1), s, b)
    u = torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)
    finite = torch.isfinite(lp_y)
    acc = (torch.log(u) < log_a) & finite
    a = acc[:, None]
    new = MalaState(
        torch.where(a, y, x).reshape(state.x.shape),
        torch.where(a, logits_y, state.logits),
        torch.where(a, g_y.reshape(n, -1), state.ugrad.reshape(n, -1)).reshape(state.x.shape),
    )
    return new, acc, finite


def take(state: MalaState, idx) -> MalaState:
    return MalaState(state.x[idx], state.logits[idx], state.ugrad[idx])
