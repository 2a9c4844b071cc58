"""Exactly solvable systems for validating estimators. Each is an nn.Module mapping x [N, d] in the box
to logits [N, K] (float32), with `shape` set and `exact(temps, ensemble)` returning a dict of float64
arrays [T]: log_Z, F, U, S, C, info_bits (+ H_Y_bits, H_Y_given_X_bits, I_XY_bits and p_y [T, K] for joint, K > 1).

* TruncatedGaussian: E = sum_i (x_i - m_i)^2 / (2 s_i^2); log Z by erf, U and Var(E) by exact
  (float64 autograd) beta-derivatives of that closed form.
* DoubleWells: E = sum_i a (x_i^2 - c^2)^2 + h x_i (asymmetric; heat-capacity peak); scipy quadrature.
* ClassGaussian: f_y(x) = b_y - (x_0 - c_y)^2/(2 s^2) - sum_{i>0} (x_i - m_i)^2/(2 s^2); exact per label
  (erf for the Gaussian dimensions, quadrature over x_0 for the class-dependent one, incl. H(Y|X)).
* Neural2D: a fixed smooth random MLP R^2 -> R^K; fine midpoint grid on [-1,1]^2.
* ModeSwitch: Gaussian modes as classes, wide shallow ones and narrow deep ones elsewhere, whose mass swaps
  at T = t_switch (a first-order transition that annealing from uniform misses); joint log Z, U, C, H(Y) by erf,
  H(Y|X) and the marginal ensemble by exact draws (float64, SE below 1e-3 of the measured SEs' scale).
  `sample(T, n)` draws exactly from p_T(x, y): the "data" of the low-temperature phase.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import integrate
from scipy.special import logsumexp, ndtr, ndtri
from torch import nn

LN2 = math.log(2.0)


def _assemble(temps, log_z, u, var, log_omega, extra=None):
    t = np.asarray(temps, dtype=np.float64)
    b = 1.0 / t
    s = b * u + log_z
    out = {"log_Z": log_z, "F": -t * log_z, "U": u, "S": s, "C": b * b * var,
           "info_bits": (log_omega - s) / LN2}
    out.update(extra or {})
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _gauss_moments(m, s, beta):
    """Sum over dims of (log Z, U, Var E) of the box-truncated Gaussian factor at inverse temp beta."""
    m = torch.as_tensor(m, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    b = torch.tensor(float(beta), dtype=torch.float64, requires_grad=True)
    sig = s / torch.sqrt(b)
    r2 = math.sqrt(2.0)
    mass = 0.5 * (torch.erf((1 - m) / (sig * r2)) - torch.erf((-1 - m) / (sig * r2)))
    lz = (torch.log(sig * math.sqrt(2 * math.pi)) + torch.log(mass)).sum()
    (g,) = torch.autograd.grad(lz, b, create_graph=True)
    (h,) = torch.autograd.grad(g, b)
    return lz.item(), -g.item(), h.item()


def _quad_moments(energies, beta, weights_fn=None):
    """1-D factor over x in [-1,1] and the states y of `energies` (list of callables e_y(x)).

    Returns log Z = log int sum_y exp(-beta e_y), <e>, Var(e), p(y) [K], H(Y|X) (nats).
    """
    xs = np.linspace(-1, 1, 20001)
    e0 = min(float(np.min(e(xs))) for e in energies)
    pts = list(np.linspace(-1, 1, 41))

    def q(f):
        return integrate.quad(f, -1, 1, points=pts, limit=400, epsabs=1e-13, epsrel=1e-12)[0]

    zs = np.array([q(lambda x, e=e: math.exp(-beta * (e(x) - e0))) for e in energies])
    z = zs.sum()
    m1 = sum(q(lambda x, e=e: e(x) * math.exp(-beta * (e(x) - e0))) for e in energies) / z
    m2 = sum(q(lambda x, e=e: e(x) ** 2 * math.exp(-beta * (e(x) - e0))) for e in energies) / z

    def cond_entropy_density(x):
        a = np.array([-beta * e(x) for e in energies])
        lse = logsumexp(a)
        p = np.exp(a - lse)
        return math.exp(lse + beta * e0) * float(-(p * (a - lse)).sum())

    hyx = q(cond_entropy_density) / z if len(energies) > 1 else 0.0
    return math.log(z) - beta * e0, m1, m2 - m1 * m1, zs / z, hyx


class _System(nn.Module):
    ensembles = ("marginal", "joint")

    def __init__(self, d, k):
        super().__init__()
        self.shape = (d,)
        self.d, self.k = d, k

    def log_omega(self, ensemble):
        return self.d * LN2 + (math.log(self.k) if ensemble == "joint" else 0.0)


class TruncatedGaussian(_System):
    """Independent Gaussians truncated to the box: exact log Z, U, C per coordinate by erf."""
    def __init__(self, d=64, seed=0, mean_scale=0.3, std_range=(0.3, 0.6)):
        super().__init__(d, 1)
        rng = np.random.default_rng(seed)
        self.m = rng.uniform(-mean_scale, mean_scale, d)
        self.s = rng.uniform(*std_range, d)
        self.register_buffer("mt", torch.tensor(self.m, dtype=torch.float32))
        self.register_buffer("st", torch.tensor(self.s, dtype=torch.float32))

    def forward(self, x):
        return -(((x - self.mt) / self.st) ** 2).sum(-1, keepdim=True) / 2

    def exact(self, temps, ensemble="marginal"):
        r = np.array([_gauss_moments(self.m, self.s, 1.0 / t) for t in temps])
        return _assemble(temps, r[:, 0], r[:, 1], r[:, 2], self.log_omega(ensemble))


class DoubleWells(_System):
    """Product of d identical asymmetric double wells a (x^2 - c^2)^2 + h x (C(T) peaks at T = 0.2945)."""

    def __init__(self, d=64, a=4.0, c=0.7, h=0.6):
        super().__init__(d, 1)
        self.a, self.c, self.h = a, c, h

    def e1(self, x):
        return self.a * (x * x - self.c ** 2) ** 2 + self.h * x

    def forward(self, x):
        return -self.e1(x).sum(-1, keepdim=True)

    def exact(self, temps, ensemble="marginal"):
        r = np.array([_quad_moments([self.e1], 1.0 / t)[:3] for t in temps])
        return _assemble(temps, self.d * r[:, 0], self.d * r[:, 1], self.d * r[:, 2], self.log_omega(ensemble))


class ClassGaussian(_System):
    """K classes that differ only along x_0 (centres c_y, biases b_y); other dims share a Gaussian."""

    def __init__(self, d=16, k=3, s=0.35, seed=0):
        super().__init__(d, k)
        rng = np.random.default_rng(seed)
        self.c = np.linspace(-0.6, 0.6, k)
        self.b = rng.uniform(-0.5, 0.5, k)
        self.sig = s
        self.m = rng.uniform(-0.3, 0.3, d - 1)
        self.register_buffer("ct", torch.tensor(self.c, dtype=torch.float32))
        self.register_buffer("bt", torch.tensor(self.b, dtype=torch.float32))
        self.register_buffer("mt", torch.tensor(self.m, dtype=torch.float32))

    def forward(self, x):
        rest = (((x[:, 1:] - self.mt) / self.sig) ** 2).sum(-1, keepdim=True) / 2
        return self.bt - ((x[:, :1] - self.ct) / self.sig) ** 2 / 2 - rest

    def _class_energies(self):
        return [lambda x, y=y: -self.b[y] + (x - self.c[y]) ** 2 / (2 * self.sig ** 2) for y in range(self.k)]

    def exact(self, temps, ensemble="marginal"):
        rows, extra = [], {"H_Y_bits": [], "H_Y_given_X_bits": [], "I_XY_bits": [], "p_y": []}
        ey = self._class_energies()
        for t in temps:
            beta = 1.0 / t
            g = _gauss_moments(self.m, np.full(self.d - 1, self.sig), beta)
            if ensemble == "joint":
                lz, u, v, py, hyx = _quad_moments(ey, beta)
                hy = float(-(py * np.log(py)).sum())
                extra["p_y"].append(py)
                extra["H_Y_bits"].append(hy / LN2)
                extra["H_Y_given_X_bits"].append(hyx / LN2)
                extra["I_XY_bits"].append((hy - hyx) / LN2)
            else:
                def e_marg(x):
                    return -logsumexp(np.stack([-e(x) for e in ey]), axis=0)
                lz, u, v = _quad_moments([e_marg], beta)[:3]
            rows.append((lz + g[0], u + g[1], v + g[2]))
        r = np.array(rows)
        return _assemble(temps, r[:, 0], r[:, 1], r[:, 2], self.log_omega(ensemble),
                         extra if ensemble == "joint" else None)


class Neural2D(_System):
    """A fixed smooth random MLP 2 -> 32 -> 32 -> K (tanh), logits scaled by `scale`; exact by midpoint grid."""

    def __init__(self, k=3, seed=1, scale=1.5, grid=1500):
        super().__init__(2, k)
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, k))
        lins = [m for m in self.net if isinstance(m, nn.Linear)]
        with torch.no_grad():  # hidden weights ~N(0, 2.5^2), biases ~N(0, 1); readout ~N(0, 0.5^2), no bias
            for i, m in enumerate(lins):
                last = i == len(lins) - 1
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.5 if last else 2.5))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * (0.0 if last else 1.0))
        self.scale, self.grid = scale, grid
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.scale * self.net(x)

    def exact(self, temps, ensemble="marginal"):
        n = self.grid
        h = 2.0 / n
        c = torch.linspace(-1 + h / 2, 1 - h / 2, n, dtype=torch.float64)
        xy = torch.cartesian_prod(c, c)
        with torch.no_grad():
            w = [(m.weight.double(), m.bias.double()) for m in self.net if isinstance(m, nn.Linear)]
            z = xy
            for i, (W, bb) in enumerate(w):
                z = z @ W.T + bb
                if i < len(w) - 1:
                    z = torch.tanh(z)
            f = (self.scale * z).numpy()  # [n*n, K]
        rows, extra = [], {"H_Y_bits": [], "H_Y_given_X_bits": [], "I_XY_bits": [], "p_y": []}
        for t in temps:
            beta = 1.0 / t
            if ensemble == "joint":
                a = beta * f  # log weight of (x, y)
                lz = logsumexp(a) + math.log(h * h)
                p = np.exp(a - logsumexp(a))
                e = -f
                u = (p * e).sum()
                v = (p * e * e).sum() - u * u
                py = p.sum(0)
                hy = float(-(py * np.log(py)).sum())
                extra["p_y"].append(py)
                px = p.sum(1)
                cond = np.exp(a - logsumexp(a, axis=1, keepdims=True))
                hyx = float((px * -(cond * np.log(np.clip(cond, 1e-300, None))).sum(1)).sum())
                extra["H_Y_bits"].append(hy / LN2)
                extra["H_Y_given_X_bits"].append(hyx / LN2)
                extra["I_XY_bits"].append((hy - hyx) / LN2)
            else:
                e = -logsumexp(f, axis=1)
                a = -beta * e
                lz = logsumexp(a) + math.log(h * h)
                p = np.exp(a - logsumexp(a))
                u = (p * e).sum()
                v = (p * e * e).sum() - u * u
            rows.append((lz, u, v))
        r = np.array(rows)
        return _assemble(temps, r[:, 0], r[:, 1], r[:, 2], self.log_omega(ensemble),
                         extra if ensemble == "joint" else None)


def _trunc_gauss_log_z(m, s):
    """Per mode: sum over dims of log int_{-1}^{1} exp(-(x - m)^2 / (2 s^2)) dx; m [K, d], s [K] -> [K]."""
    sd = s[:, None]
    mass = ndtr((1 - m) / sd) - ndtr((-1 - m) / sd)
    return (np.log(sd * math.sqrt(2 * math.pi)) + np.log(mass)).sum(-1)


class _Modes(_System):
    """Gaussian modes as classes. Subclasses give `_mode_log_z(T)` [K] and `_mode_moments(T)` -> per mode
    (log Z_y, <E>_y, Var_y E) in closed form, `_draw(y, T, rng)` -> exact draws of p_T(x | y) [n, d] (float64)
    and `logits64(x)` -> f(x) [n, K] (float64). Joint log Z, U, C and H(Y) are then exact; H(Y|X) and the
    marginal ensemble come from `n_exact` exact draws of p_T(x, y) (importance ratio
    (sum_y e^f_y)^beta / sum_y e^(beta f_y), close to 1 for separated modes)."""

    def sample(self, temp, n, seed=0):
        """n exact draws (x [n, d] float32 tensor, y [n] int64 tensor) of p_T(x, y)."""
        rng = np.random.default_rng([seed, 7])
        lz = self._mode_log_z(temp)
        y = rng.choice(self.k, size=n, p=np.exp(lz - logsumexp(lz)))
        return torch.tensor(self._draw(y, temp, rng), dtype=torch.float32), torch.tensor(y)

    def exact(self, temps, ensemble="joint"):
        rows, extra = [], {"H_Y_bits": [], "H_Y_given_X_bits": [], "I_XY_bits": [], "p_y": []}
        for i, t in enumerate(temps):
            beta = 1.0 / t
            lz_y, u_y, v_y = self._mode_moments(t)
            lz = logsumexp(lz_y)
            p = np.exp(lz_y - lz)
            u = (p * u_y).sum()
            var = (p * (v_y + u_y ** 2)).sum() - u * u
            rng = np.random.default_rng([self.seed, i, 11])
            y = rng.choice(self.k, size=self.n_exact, p=p)
            f = self.logits64(self._draw(y, t, rng))
            if ensemble == "joint":
                hy = float(-(p * np.log(p)).sum())
                extra["p_y"].append(p)
                logpost = beta * f - logsumexp(beta * f, axis=1, keepdims=True)
                hyx = float(-logpost[np.arange(len(y)), y].mean())
                extra["H_Y_bits"].append(hy / LN2)
                extra["H_Y_given_X_bits"].append(hyx / LN2)
                extra["I_XY_bits"].append((hy - hyx) / LN2)
                rows.append((lz, u, var))
            else:
                e = -logsumexp(f, axis=1)
                lr = -beta * e - logsumexp(beta * f, axis=1)   # log importance ratio, marginal / joint
                w = np.exp(lr - lr.max())
                um = (w * e).sum() / w.sum()
                vm = (w * e * e).sum() / w.sum() - um * um
                rows.append((lz + logsumexp(lr) - math.log(len(lr)), um, vm))
        r = np.array(rows)
        return _assemble(temps, r[:, 0], r[:, 1], r[:, 2], self.log_omega(ensemble),
                         extra if ensemble == "joint" else None)


class ModeSwitch(_Modes):
    """Modes as classes: f_y(x) = b_y - |x - mu_y|^2 / (2 s_y^2) on the box. `n_wide` wide modes (std s_wide,
    b = 0) near the centre, `n_narrow` narrow deep modes (std s_narrow) near random corners at +-corner, their
    depth set so that the narrow modes hold exactly half of p_T(x, y)'s mass at T = t_switch: above it the wide
    modes dominate, below it the narrow ones (exponentially in d). Joint ensemble: log Z(T) = logsumexp_y
    [b_y / T + sum_i log int exp(-(x_i - mu_yi)^2 / (2 s_y^2 T)) dx_i] exactly (erf), U and C from the modes'
    exact moments (float64 autograd of the same closed form), H(Y) exactly; H(Y|X) and every quantity of the
    marginal ensemble (E = -logsumexp_y f_y) by `n_exact` exact draws of p_T(x, y) (importance ratio
    (sum_y e^f_y)^beta / sum_y e^(beta f_y), close to 1 for separated modes)."""

    def __init__(self, d=16, n_wide=2, n_narrow=2, s_wide=0.35, s_narrow=0.05, corner=0.55, t_switch=1.0,
                 seed=0, n_exact=200_000):
        super().__init__(d, n_wide + n_narrow)
        rng = np.random.default_rng(seed)
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        wide = np.outer(np.linspace(-0.25, 0.25, n_wide) if n_wide > 1 else [0.0], direction * math.sqrt(d) / 2)
        wide = np.clip(wide, -0.5, 0.5)
        narrow = corner * rng.choice([-1.0, 1.0], size=(n_narrow, d))
        self.mu = np.concatenate([wide, narrow])
        self.sd = np.array([s_wide] * n_wide + [s_narrow] * n_narrow, dtype=np.float64)
        self.b = np.zeros(self.k)
        self.n_wide, self.t_switch, self.n_exact, self.seed = n_wide, t_switch, n_exact, seed
        lz = self._mode_log_z(t_switch)  # with b = 0
        self.b[n_wide:] = t_switch * (logsumexp(lz[:n_wide]) - logsumexp(lz[n_wide:]))
        self.register_buffer("mut", torch.tensor(self.mu, dtype=torch.float32))
        self.register_buffer("sdt", torch.tensor(self.sd, dtype=torch.float32))
        self.register_buffer("bt", torch.tensor(self.b, dtype=torch.float32))

    def forward(self, x):
        sq = (x * x).sum(-1, keepdim=True) - 2 * x @ self.mut.T + (self.mut * self.mut).sum(-1)
        return self.bt - sq.clamp_min(0) / (2 * self.sdt ** 2)

    def logits64(self, x):
        """f(x) [n, K] in float64 (numpy), x [n, d]."""
        sq = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)
        return self.b - sq / (2 * self.sd ** 2)

    def _mode_log_z(self, temp):
        return self.b / temp + _trunc_gauss_log_z(self.mu, self.sd * math.sqrt(temp))

    def _mode_moments(self, temp):
        """Per mode (log Z_y, <E>_y, Var_y E) at temperature temp, E = -f_y."""
        rows = [_gauss_moments(self.mu[y], np.full(self.d, self.sd[y]), 1.0 / temp) for y in range(self.k)]
        r = np.array(rows)
        return r[:, 0] + self.b / temp, r[:, 1] - self.b, r[:, 2]

    def _draw(self, y, temp, rng):
        mu, sd = self.mu[y], self.sd[y][:, None] * math.sqrt(temp)
        lo, hi = ndtr((-1 - mu) / sd), ndtr((1 - mu) / sd)
        return np.clip(mu + sd * ndtri(lo + rng.random(mu.shape) * (hi - lo)), -1.0, 1.0)

class RotatedGaussian(_System):
    """E(x) = (x - mu)^T A (x - mu) / 2 with A = R diag(1 / sd^2) R^T, R a random rotation: non-separable and
    ill-conditioned (variance condition number `cond`), its mass so far inside the box (mu = 0, largest std
    `sd_max` sqrt(T) << 1) that the box truncation is below float64 resolution at T <= `t_max`. Exact:
    log Z = (d/2) log(2 pi T) + sum log sd, U = d T / 2, C = d / 2; `sample(T, n)` draws exactly."""

    def __init__(self, d=64, cond=400.0, sd_max=0.05, seed=0, t_max=4.0):
        super().__init__(d, 1)
        if sd_max * math.sqrt(t_max) > 1.0 / 9.0:  # P(|x_i| > 1) < 1e-18 per coordinate
            raise ValueError("sd_max too large for an exact log Z on the box up to t_max")
        rng = np.random.default_rng(seed)
        self.sd = sd_max * np.geomspace(1.0 / math.sqrt(cond), 1.0, d)
        self.rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
        self.t_max = t_max
        prec = (self.rot / self.sd ** 2) @ self.rot.T
        self.register_buffer("prec", torch.tensor(prec, dtype=torch.float32))

    def forward(self, x):
        return -0.5 * ((x @ self.prec) * x).sum(-1, keepdim=True)

    def sample(self, temp, n, seed=0):
        """n exact draws [n, d] (float32 tensor) of p_T."""
        rng = np.random.default_rng([seed, 13])
        z = rng.normal(size=(n, self.d)) * self.sd * math.sqrt(temp)
        return torch.tensor(z @ self.rot.T, dtype=torch.float32)

    def exact(self, temps, ensemble="marginal"):
        t = np.asarray(temps, dtype=np.float64)
        if np.any(t > self.t_max):
            raise ValueError(f"exact only up to T = {self.t_max}")
        log_z = 0.5 * self.d * np.log(2 * math.pi * t) + np.log(self.sd).sum()
        return _assemble(t, log_z, 0.5 * self.d * t, 0.5 * self.d * t * t, self.log_omega(ensemble))


def _digit_means(n_modes, seed):
    """n_modes images [n_modes, 784] in [-1, 1]: class means of scikit-learn's 8x8 digits (offline), upsampled
    to 28 x 28; beyond 10 modes, means of random halves of a class."""
    from sklearn.datasets import load_digits
    dig = load_digits()
    rng = np.random.default_rng([seed, 5])
    imgs = []
    for j in range(n_modes):
        rows = dig.images[dig.target == j % 10]
        if j >= 10:
            rows = rows[rng.permutation(len(rows))[: len(rows) // 2]]
        imgs.append(rows.mean(0) / 8.0 - 1.0)
    t = torch.tensor(np.stack(imgs), dtype=torch.float64)[:, None]
    up = torch.nn.functional.interpolate(t, size=(28, 28), mode="bilinear", align_corners=False)
    return up.reshape(n_modes, 784).numpy().clip(-1, 1)


class DigitMixture(_Modes):
    """d = 784 (28 x 28 images): `n_modes` Gaussian modes as classes, centred on `scale` x the upsampled class
    means of scikit-learn's 8x8 digits, f_y(x) = log N(x; mu_y, Sigma_y) with
    Sigma_y = s_y^2 (I + Q_y diag(stretch_yj) Q_y^T): `rank` random dense directions per mode (non-separable,
    condition number 1 + max stretch), s_y = s exp(spread z_y), so the modes' entropies differ and their shares
    of p_T(x, y) trade places with T (equal at T = 1). Exact: log Z_y(T) = log N's normaliser / T +
    (d/2) log(2 pi T) + log det(Sigma_y) / 2 and <E>_y = a_y + d T / 2, Var_y E = d T^2 / 2 (the box truncation
    is bounded below 1e-9 of Z up to t_max, checked); H(Y|X) and the marginal ensemble by exact draws."""

    def __init__(self, n_modes=10, rank=16, s=0.05, spread=0.003, stretch=(5.0, 20.0), scale=0.4, t_max=2.0,
                 seed=0, n_exact=4000):
        d = 784
        super().__init__(d, n_modes)
        rng = np.random.default_rng([seed, 3])
        self.mu = scale * _digit_means(n_modes, seed)
        self.s = s * np.exp(spread * rng.normal(size=n_modes))
        self.q = np.stack([np.linalg.qr(rng.normal(size=(d, rank)))[0] for _ in range(n_modes)])   # [K, d, r]
        self.lam = rng.uniform(*stretch, size=(n_modes, rank))                                      # [K, r]
        self.logdet = 2 * d * np.log(self.s) + np.log1p(self.lam).sum(-1)
        self.c = -0.5 * d * math.log(2 * math.pi) - 0.5 * self.logdet   # log N's normaliser
        self.n_exact, self.seed, self.t_max = n_exact, seed, t_max
        marg = self.s[:, None] * np.sqrt(1.0 + (self.q ** 2 * self.lam[:, None, :]).sum(-1)) * math.sqrt(t_max)
        out = (ndtr(-(1 - self.mu) / marg) + ndtr(-(1 + self.mu) / marg)).sum(-1)
        if out.max() > 1e-9:
            raise ValueError(f"box truncation {out.max():.1e} of Z at T = {t_max}: lower s or scale")
        # forward as matmuls, |x - mu_y|^2 in float64 (its terms are ~100x the result): float32 rounding of logits64
        self.register_buffer("mu64", torch.tensor(self.mu, dtype=torch.float64))                      # [K, d]
        self.register_buffer("mu_sq", torch.tensor((self.mu ** 2).sum(-1), dtype=torch.float64))      # [K]
        self.register_buffer("q_flat", torch.tensor(self.q.transpose(1, 0, 2).reshape(d, -1), dtype=torch.float32))
        self.register_buffer("mu_q", torch.tensor(np.einsum("kd,kdr->kr", self.mu, self.q), dtype=torch.float32))
        self.register_buffer("shrink", torch.tensor(self.lam / (1 + self.lam), dtype=torch.float32))
        self.register_buffer("inv_s2", torch.tensor(1.0 / self.s ** 2, dtype=torch.float64))
        self.register_buffer("ct", torch.tensor(self.c, dtype=torch.float64))

    def forward(self, x):
        xd = x.double()
        sq = (xd * xd).sum(-1, keepdim=True) - 2.0 * xd @ self.mu64.T + self.mu_sq          # [N, K]
        proj = (x @ self.q_flat).reshape(len(x), *self.mu_q.shape) - self.mu_q             # [N, K, r]
        return (self.ct - 0.5 * (sq - (self.shrink * proj * proj).sum(-1).double()) * self.inv_s2).float()

    def logits64(self, x):
        out = np.empty((len(x), self.k))
        for i in range(0, len(x), 2000):
            r = x[i:i + 2000, None, :] - self.mu[None]
            proj = np.einsum("nkd,kdr->nkr", r, self.q)
            shrink = self.lam / (1 + self.lam)
            out[i:i + 2000] = self.c - 0.5 * ((r * r).sum(-1) - (shrink * proj * proj).sum(-1)) / self.s ** 2
        return out

    def _mode_log_z(self, temp):
        return self.c / temp + 0.5 * self.d * math.log(2 * math.pi * temp) + 0.5 * self.logdet

    def _mode_moments(self, temp):
        return self._mode_log_z(temp), -self.c + 0.5 * self.d * temp, np.full(self.k, 0.5 * self.d * temp * temp)

    def _draw(self, y, temp, rng):
        z = rng.normal(size=(len(y), self.d))
        zr = rng.normal(size=(len(y), self.q.shape[-1])) * np.sqrt(self.lam[y])
        x = self.mu[y] + math.sqrt(temp) * self.s[y][:, None] * (z + np.einsum("ndr,nr->nd", self.q[y], zr))
        return np.clip(x, -1.0, 1.0)
