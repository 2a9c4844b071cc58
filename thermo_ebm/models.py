"""Networks mapping images x in [-1,1]^d (shape [N, *shape]) to K logits f(x) (shape [N, K])."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from .errors import ThermoEBMError

ARCHS = ("shallow", "cnn")


class GaussianBase(nn.Module):
    """A fixed base density q(x) on the box [-1, 1]^D under a network: the logit offset t_base * log q(x), the same
    for every class ([N, K] of x [N, *shape]). q = sum_k pi_k q_k, with pi the data's class frequencies and q_k a
    mixture of M box-truncated diagonal Gaussians fitted to class k's images (k-means clusters: weights, per-pixel
    means and standard deviations, the latter at least SD_FLOOR), normalised exactly on the box. Added to a
    network's logits it makes p_T(x, y) at T = t_base q(x) exp(f_net(x)[y] / t_base) / Z: the base carries the
    digits' shapes, the network learns the rest, and p(y|x) = softmax f_net(x) is the network's alone. Buffers
    only: nothing in it trains.
    Precision: the quadratic forms are float32 matmuls on coordinates centred at the data's mean (against float64,
    log q within 0.015 nats on MNIST images, draws of q and uniform noise, mean 0.001); constants are float64 at
    fit."""

    SD_FLOOR = 0.1  # at T_train the SGLD proposal (noise 0.0447) stays well inside a component's width

    def __init__(self, n_classes: int, d: int, components: int, t_base: float):
        super().__init__()
        self.t_base, self.components, self.n_classes = float(t_base), int(components), int(n_classes)
        km = n_classes * components
        self.register_buffer("centre", torch.zeros(d))
        self.register_buffer("prec", torch.ones(d, km))      # 1 / sd^2 per pixel and component
        self.register_buffer("lin", torch.zeros(d, km))      # (mu - centre) / sd^2
        self.register_buffer("const", torch.zeros(km))       # log w - sum log(sd Z sqrt(2 pi)) - quad at the centre / 2
        self.register_buffer("logw", torch.zeros(km))        # log w: component weights, summing to 1
        self.register_buffer("class_log_mass", torch.zeros(n_classes))  # log E_{q_y}[exp h] (0: not yet estimated)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "class_log_mass", torch.zeros(self.n_classes))  # checkpoints before it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, x, y, seed: int = 0):
        """Fit every class's mixture to images x [N, *shape] with labels y [N] (k-means, float64); returns self."""
        from sklearn.cluster import KMeans
        from scipy.special import ndtr
        x = x.reshape(len(x), -1).double().cpu().numpy()
        y = y.cpu().numpy()
        n_classes, m = self.n_classes, self.components
        centre = x.mean(0)
        prec, lin, const, logw = [], [], [], []
        for k in range(n_classes):
            xk = x[y == k]
            if len(xk) < 2 * m:
                raise ThermoEBMError(f"the base needs at least {2 * m} images of every class ({m} components); "
                                     f"class {k} has {len(xk)}")
            lab = KMeans(m, n_init=2, random_state=seed).fit_predict(xk) if m > 1 else np.zeros(len(xk), int)
            for j in range(m):
                c = xk[lab == j]
                mu, sd = c.mean(0), np.maximum(c.std(0), self.SD_FLOOR)
                log_mass = np.log(ndtr((1 - mu) / sd) - ndtr((-1 - mu) / sd))  # >= log 1/2: mu lies in the box
                p = 1.0 / sd ** 2
                prec.append(p)
                logw.append(math.log(len(c) / len(x)))
                lin.append((mu - centre) * p)
                const.append(logw[-1] - (np.log(sd) + log_mass + 0.5 * math.log(2 * math.pi)).sum()
                             - 0.5 * ((mu - centre) ** 2 * p).sum())
        self.centre.copy_(torch.from_numpy(centre))
        self.prec.copy_(torch.from_numpy(np.stack(prec, 1)))
        self.lin.copy_(torch.from_numpy(np.stack(lin, 1)))
        self.const.copy_(torch.from_numpy(np.array(const)))
        self.logw.copy_(torch.from_numpy(np.array(logw)))
        return self

    def components_moments(self):
        """Every component's per-pixel mean and standard deviation before truncation, [K M, D] each (float64)."""
        prec = self.prec.double().T
        return self.centre.double() + self.lin.double().T / prec, prec.rsqrt()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, label: int | None = None):
        """n exact draws [n, D] of the density draw_log_density (a component by its draw weight, then box-truncated
        normals by the inverse CDF, float64) on the generator's device; with `label`, from that class's mixture
        q_label."""
        dev = generator.device
        w = self.draw_log_weights().exp().to(dev)
        if label is not None:
            keep = torch.zeros_like(w)
            keep[label * self.components:(label + 1) * self.components] = 1.0
            w = w * keep
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        mu, sd = (t.to(dev)[comp] for t in self.components_moments())
        lo, hi = torch.special.ndtr((-1 - mu) / sd), torch.special.ndtr((1 - mu) / sd)
        u = lo + (hi - lo) * torch.rand(mu.shape, generator=generator, device=dev, dtype=torch.float64)
        return (mu + sd * torch.special.ndtri(u)).clamp(-1, 1).to(self.prec.dtype)

    def _components(self, x):
        """log of every weighted component at x [N, *shape]: [N, K M]."""
        u = x.reshape(len(x), -1) - self.centre
        return self.const - 0.5 * (u ** 2) @ self.prec + u @ self.lin

    def draw_log_weights(self):
        """log of each component's share of the draws [K M] (float64): its weight in q times its class's mass
        exp(class_log_mass), so that once the masses are estimated (training/class_weights.py) the draws split over
        the classes as the model does at t_base; before, q's own weights."""
        lw = self.logw.double() + self.class_log_mass.double().repeat_interleave(self.components)
        return lw - torch.logsumexp(lw, 0)

    @torch.no_grad()
    def draw_log_density(self, x):
        """log density of the draws (`sample`) at x [N, *shape], [N] float64; log q(x) before the masses are
        estimated."""
        comp = self._components(x).double() - self.logw.double() + self.draw_log_weights()
        return torch.logsumexp(comp, -1)

    def class_log_weights(self):
        """log w_y, the class weights of the mixture [K] (float64)."""
        return torch.logsumexp(self.logw.double().reshape(self.n_classes, -1), -1)

    @torch.no_grad()
    def class_log_densities(self, x):
        """log q_y(x) of every class's own mixture (normalised on the box), [N, K] float64, of x [N, *shape]."""
        comp = self._components(x).double().reshape(len(x), self.n_classes, -1)
        return torch.logsumexp(comp, -1) - self.class_log_weights()

    @torch.no_grad()
    def set_class_log_weights(self, log_w, class_log_mass=None):
        """Give the classes the weights exp(log_w) [K] (normalised here), each class's mixture unchanged, and, where
        given, their masses under the network (class_log_mass [K], log E_{q_y}[exp h])."""
        log_w = torch.as_tensor(log_w, dtype=torch.float64)
        if class_log_mass is not None:
            self.class_log_mass.copy_(torch.as_tensor(class_log_mass).to(self.class_log_mass))
        shift = (log_w - torch.logsumexp(log_w, 0) - self.class_log_weights()).repeat_interleave(self.components)
        self.logw.add_(shift.to(self.logw))
        self.const.add_(shift.to(self.const))

    def forward(self, x):
        comp = self._components(x)  # const - (u^2 . prec) / 2 + u . lin, inside the box
        logq = torch.logsumexp(comp, -1, keepdim=True)
        return (self.t_base * logq).expand(len(x), self.n_classes)


class EBM(nn.Module):
    """Wraps a network with the metadata `measure` needs: input shape and number of classes. Its logits are the
    network's plus, where it has one, a fixed base's (GaussianBase)."""

    def __init__(self, net: nn.Module, shape, n_classes: int, spec: dict, base: GaussianBase | None = None):
        super().__init__()
        self.net = net
        self.base = base
        self.shape = tuple(int(s) for s in shape)
        self.n_classes = int(n_classes)
        self.spec = dict(spec)

    def forward(self, x):
        out = self.net(x)
        return out if self.base is None else out + self.base(x)

    def base_energy(self, x):
        """The fixed base's part of every energy, -t_base log q(x) [N] (None without a base)."""
        return None if self.base is None else -self.base(x)[:, 0]


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
                spectral_norm: bool = False, base_components: int = 0, t_base: float = 1.0) -> EBM:
    """Build `shallow` (MLP, `depth` hidden layers of width `size`) or `cnn` (base channels `size`);
    base_components > 0 adds a GaussianBase of that many components per class at temperature t_base (unfitted:
    GaussianBase.fit or a checkpoint fills it)."""
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
                spectral_norm=bool(spectral_norm), base_components=int(base_components), t_base=float(t_base))
    base = GaussianBase(n_classes, math.prod(shape), base_components, t_base) if base_components > 0 else None
    return EBM(net, shape, n_classes, spec, base)


def model_from_spec(spec: dict) -> EBM:
    """Build the EBM a checkpoint's model_spec describes (untrained weights)."""
    return build_model(spec["arch"], spec["shape"], spec["n_classes"], spec["size"], spec["depth"],
                       spec["spectral_norm"], spec.get("base_components", 0), spec.get("t_base", 1.0))


def base_of(model) -> GaussianBase | None:
    """The fixed base of a model (an EBM, or a ScaledLogits around one), or None."""
    for m in (model, getattr(model, "net", None)):
        if isinstance(getattr(m, "base", None), GaussianBase):
            return m.base
    return None


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y]; logits [N, K] -> [N]."""
    return -torch.logsumexp(logits, dim=-1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E(x, y) = -f(x)[y]; logits [N, K], y [N] -> [N]."""
    return -logits.gather(1, y[:, None])[:, 0]
