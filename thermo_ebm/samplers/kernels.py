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
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from .rng import draw_key, normals_like

MAX_STEP = 0.5  # keeps the omitted mirror images of the folded Gaussian below ~e^-24 relative weight
MIN_STEP = 1e-5
TARGET_ACCEPT = 0.574  # MALA's optimal acceptance (Roberts & Rosenthal 1998)


def uniform(n, shape, generator, device) -> torch.Tensor:
    """n uniform draws on the box [-1, 1]^shape; [n, *shape] float32."""
    return torch.rand((n, *shape), generator=generator, device=device) * 2.0 - 1.0


def adapt_step(step: torch.Tensor, acceptance: torch.Tensor, lo=MIN_STEP, hi=MAX_STEP) -> torch.Tensor:
    """The sampler's step-size policy during tuning: step * exp(acceptance - TARGET_ACCEPT), kept in [lo, hi]
    (any shape; acceptance broadcasts). Used only before counting starts."""
    return (step * torch.exp(acceptance - TARGET_ACCEPT)).clamp(lo, hi)


# --------------------------------------------------------------------------- Langevin (training)
class LangevinState(NamedTuple):
    """Unadjusted Langevin chain state: x, E(x) [N], dE/dx."""
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
    """LangevinState of x under energy_fn."""
    e, g = energy_and_grad(energy_fn, x)
    return LangevinState(x.detach(), e, g)


def gaussian(like, generator):
    """Standard normals shaped like `like` (its device and dtype) from torch.randn."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def langevin_move(state: LangevinState, step_size: float, noise_std: float, generator) -> torch.Tensor:
    """One SGLD position update (no energy evaluation); result kept in the box by clamping."""
    x = gaussian(state.x, generator)
    return x.mul_(noise_std).add_(state.grad, alpha=-step_size).add_(state.x).clamp_(-1.0, 1.0)


def langevin_step(state, energy_fn, step_size, noise_std, generator) -> LangevinState:
    """One unadjusted Langevin step (training's SGLD move) and the new state."""
    return langevin_init(energy_fn, langevin_move(state, step_size, noise_std, generator))


# --------------------------------------------------------------------------- reflected MALA
class MalaState(NamedTuple):
    """Reflected-MALA chain state: x [N, *shape], logits [N, K], gradient of the unit potential."""
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
    """MalaState of x [N, *shape] for `ensemble`."""
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
    quad, extra = _image_terms(y, mu, s)
    return (torch.log1p(extra) + quad).sum(-1)


def _image_terms(y, mu, s):
    """Per coordinate [N, D]: the direct image's exponent -r^2/(2 s^2) and the mirror images' relative weight
    (the log1p argument of log_folded_normal)."""
    m = fold(mu)
    r = y - m
    inv = 1.0 / (s * s)
    extra = (_exp(-2.0 * inv * (1.0 - y) * (1.0 - m)) + _exp(-2.0 * inv * (1.0 + y) * (1.0 + m))
             + _exp(-inv * (8.0 - 4.0 * r.abs())))
    return -0.5 * inv * r * r, extra


def _exp(a):
    """exp(a) for a <= 0, with a floored at -80. The terms are added to 1 (1 + 2e-35 == 1 in float32 and
    float64), so the floor changes a log density by < 1e-34 absolute; exponents below ~-87 make the
    vectorised exp produce denormals and out-of-range intermediates that run 2-3x slower (docs/performance.md)."""
    return torch.exp(a.clamp_min(-80.0))


def _drift_mean(x, ugrad, s, b):
    """The proposal's unfolded mean mu = x + (s^2/2) b ugrad; [N, D]."""
    return x + 0.5 * s * s * b * ugrad


def propose(x, ugrad, s, b, xi):
    """Reflected MALA proposal y = fold(mu_x + s xi) [N, D]; x, ugrad [N, D]; xi: N(0, 1) draws [N, D], or an int64
    [2] key from which they are drawn (rng.py; in the same loop when compiled). mu_x is not returned: `accept`
    recomputes it from x and ugrad, which it reads anyway."""
    if xi.dtype == torch.int64:
        xi = normals_like(x, xi)
    return fold(_drift_mean(x, ugrad, s, b) + s * xi)


def log_q_ratio(x, y, g_x, g_y, s, b):
    """log q(x | y) - log q(y | x) of the folded proposal; [N]; g_x, g_y: unit-potential gradients at x and y.
    The two mirror sums enter as one log((1 + A) / (1 + B)) = log1p(A) - log1p(B) per coordinate: one log instead
    of two log1p (the costliest ops of the step). Where A, B < 1e-7 (interior coordinates) both are 0 to float32
    precision; elsewhere the absolute error is float32 rounding, ~1e-7."""
    quad_x, a = _image_terms(x, _drift_mean(y, g_y, s, b), s)
    quad_y, b_ = _image_terms(y, _drift_mean(x, g_x, s, b), s)
    return (torch.log((1.0 + a) / (1.0 + b_)) + quad_x - quad_y).sum(-1)


def accept(x, y, ugrad, g_y, s, b, dlp, log_u, finite):
    """The Metropolis-Hastings decision and the selected state: accept where log u < dlp + log q ratio and the
    proposal is finite; dlp = log p(y) - log p(x), log_u, finite: [N]. Returns (x', ugrad' [N, D], accepted [N])."""
    acc = (log_u < dlp + log_q_ratio(x, y, ugrad, g_y, s, b)) & finite
    a = acc[:, None]
    return torch.where(a, y, x), torch.where(a, g_y, ugrad), acc


class MalaKernel(NamedTuple):
    """The elementwise parts of a reflected-MALA step (eager, or fused by torch.compile) and its source of
    randomness for `propose`: (like, generator) -> N(0, 1) draws shaped like `like`, or a Threefry key."""
    noise: Callable
    propose: Callable
    accept: Callable


EAGER = MalaKernel(gaussian, propose, accept)


def _with_fallback(compiled, eager, box):
    def call(*args):
        if box["eager"]:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as e:  # compiler missing or failing: the eager path
            logging.getLogger("thermo_ebm").warning("torch.compile unavailable (%s); using the eager sampler",
                                                    str(e).splitlines()[0][:120])
            box["eager"] = True
            return eager(*args)
    return call


def mala_kernel(compile: bool) -> MalaKernel:
    """EAGER, or the same functions through torch.compile: one fused loop each instead of one pass over
    [N, D] tensors per elementwise op (the reflected-MALA overhead at large d; docs/performance.md). On CPU the
    compiled proposal draws its noise itself from the counter-based generator of rng.py instead of the
    single-threaded torch.randn. Falls back to EAGER, with a warning, when compilation is unavailable (e.g. no
    C++ compiler)."""
    if not compile:
        return EAGER
    box = {"eager": False}

    def key_or_normals(like, generator):
        if box["eager"] or like.device.type != "cpu" or like.dtype != torch.float32:
            return gaussian(like, generator)  # CUDA's torch.randn already is a parallel counter-based generator
        return draw_key(generator, like.device)
    return MalaKernel(key_or_normals, *(_with_fallback(torch.compile(f, dynamic=True), f, box) for f in EAGER[1:]))


@dataclass(frozen=True)
class Sampler:
    """What every sampler call of one run shares, built once: the model (x [N, *shape] -> logits [N, K]), the
    ensemble, the state shape, the random generator, the device, the MALA kernel and whether to show progress."""
    model: Callable
    ensemble: object
    shape: tuple
    generator: torch.Generator
    device: object
    kernel: MalaKernel = EAGER
    progress: bool = False

    def with_generator(self, generator) -> "Sampler":
        return replace(self, generator=generator)


class MalaInfo(NamedTuple):
    """What one MH-corrected step did, per chain: accepted [N] bool, finite [N] bool (the proposal's log density
    was finite; non-finite proposals are rejected and counted)."""
    accepted: torch.Tensor
    finite: torch.Tensor

    @property
    def acceptance(self) -> torch.Tensor:
        """Mean acceptance over the chains (0-d float tensor)."""
        return self.accepted.float().mean()


def mala_step(state: MalaState, model, ensemble, beta, step, generator, kernel: MalaKernel = EAGER):
    """One reflected-MALA step at inverse temperatures beta [N] with step sizes step [N].

    Returns (new_state, MalaInfo).
    """
    n = state.x.shape[0]
    x = state.x.reshape(n, -1)
    s = step[:, None]
    b = beta[:, None]
    ugrad = state.ugrad.reshape(n, -1)
    xi = kernel.noise(x, generator)  # N(0, 1) draws or a key for propose
    y = kernel.propose(x, ugrad, s, b, xi)
    logits_y, g_y = evaluate(model, ensemble, y.reshape(state.x.shape))
    lp_y = ensemble.logp(logits_y, beta)
    log_u = torch.rand(n, generator=generator, device=x.device, dtype=x.dtype).log()
    finite = torch.isfinite(lp_y)
    x_new, g_new, acc = kernel.accept(x, y, ugrad, g_y.reshape(n, -1), s, b,
                                      lp_y - ensemble.logp(state.logits, beta), log_u, finite)
    new = MalaState(x_new.reshape(state.x.shape), torch.where(acc[:, None], logits_y, state.logits),
                    g_new.reshape(state.x.shape))
    return new, MalaInfo(acc, finite)


def take(state, idx):
    """The chains at index `idx` of a chain state (a MalaState or any NamedTuple of per-chain tensors)."""
    return type(state)(*(v[idx] for v in state))


def mala_moves(state: LangevinState, energy_fn, sgld_step: float, sgld_noise: float, steps: int, generator):
    """`steps` reflected-MALA moves from a LangevinState [b, *shape]: the SGLD proposal (drift -sgld_step dE/dx,
    noise sgld_noise) folded into the box, accepted with the Metropolis-Hastings ratio of p ∝ exp(-E / T_train),
    T_train = sgld_noise^2 / (2 sgld_step). Returns (x [b, *shape], the mean acceptance)."""
    s, beta = sgld_noise, 2.0 * sgld_step / sgld_noise ** 2  # beta = 1 / T_train
    shape, b = state.x.shape, len(state.x)
    x, e, ugrad = state.x.reshape(b, -1), state.energy, -state.grad.reshape(b, -1)
    accepted = torch.zeros((), device=x.device)
    for _ in range(steps):
        y = propose(x, ugrad, s, beta, gaussian(x, generator))
        e_y, g_y = energy_and_grad(energy_fn, y.view(shape))
        log_u = torch.log(torch.rand(b, generator=generator, device=x.device))
        x, ugrad, acc = accept(x, y, ugrad, -g_y.reshape(b, -1), s, beta, beta * (e - e_y), log_u,
                               torch.isfinite(e_y))
        e = torch.where(acc, e_y, e)
        accepted += acc.float().mean()
    return x.view(shape), float(accepted) / steps
