"""After training: the class weights of a model's fixed base (models.GaussianBase), fitted by maximum likelihood
with the network fixed.

At T_train the model's x-marginal is p(x) = sum_y w_y q_y(x) exp(h(x)) / Z with h = logsumexp f_net(x) / T_train,
so Z = sum_y w_y Z_y, Z_y = E_{q_y}[exp h] (class y's mass under the network's tilt), and the base's class y holds
w_y Z_y / Z of p. Training's chains start from q and keep its class weights: moves at T_train do not carry mass
between classes, so the likelihood gradient never sees the Z_y. The training images' log-likelihood,
    L(w) = mean_i log sum_y w_y q_y(x_i) - log sum_y w_y Z_y   (+ terms without w),
is stationary where each class's responsibility for the data, mean_i w_y q_y(x_i) / q(x_i), equals its mass
w_y Z_y / Z: the maximum-likelihood moment condition of these K parameters. `class_masses` estimates log Z_y by SMC
along q_y exp(lambda h) (paths.Tilt, the engine's stage function: a pilot places the stages, then a counted run in
independent populations gives log Z_y and its SE); `fit_class_weights` maximises L given them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from ..estimators import logmeanexp
from ..samplers import paths, smc
from ..samplers.base import KernelBase
from ..samplers.kernels import Sampler

log = logging.getLogger("thermo_ebm")


@dataclass(frozen=True)
class SMCSettings:
    """The class-mass SMC, one group per base component: counted chains per component in populations of
    `population` chains (a component's replicas: chains / population of them), pilot chains per component, the
    pilot's conditional ESS target, leapfrog steps per HMC move, most moves per stage and the lag correlation at
    which a stage's moves stop (smc.tune)."""
    chains: int = 16
    population: int = 2
    pilot: int = 8
    cess: float = 0.9
    leapfrog: int = 8
    max_moves: int = 10
    corr: float = 0.2


@dataclass
class ClassWeightFit:
    """log Z_y [K] and SE [K] (nats, T_train); the class weights before and after [K]; each class's mass at T_train
    after the fit [K]; the training and held-out images' mean log-likelihood gain (nats per image); SMC stages;
    seconds."""
    log_z: np.ndarray
    log_z_se: np.ndarray
    before: np.ndarray
    after: np.ndarray
    mass: np.ndarray
    gain: float
    gain_heldout: float
    stages: int
    seconds: float


def class_masses(model, t_train: float, generator: torch.Generator, settings: SMCSettings = SMCSettings(),
                 progress: bool = False):
    """(log Z_y [K], SE [K], stages) of an EBM with a GaussianBase: Z_y = E_{q_y}[exp(logsumexp f_net / t_train)]
    = sum_m v_m E_{q_ym}[exp h] over class y's components (weights v_m within the class). Every component is its own
    SMC group, so a component whose tilted mass is rare among the class's draws (a narrow, deep mode) is annealed
    as surely as the rest. Replica r of log Z_y sums population r of every component; the SE is their spread."""
    own = model.base
    k, m = own.n_classes, own.components
    dev = generator.device
    mu, sd = (t[:, None, :].to(dev) for t in own.components_moments())      # [K M, 1, D]
    base = KernelBase(mu, sd, torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(k * m, 2).to(dev))

    def tilt(x):
        return torch.logsumexp(model.net(x), -1) / t_train
    s = Sampler(None, None, model.shape, generator, dev, progress=progress)
    path = paths.Tilt(s, base, tilt)
    stops = np.ones((1, k * m))
    sched = smc.tune(s, path, stops, k * m, n_chains=settings.pilot, target_cess=settings.cess,
                     n_leap=settings.leapfrog, max_moves=settings.max_moves, corr=settings.corr,
                     population=np.zeros(2, dtype=int), desc="class masses: pilot")
    res = smc.run(s, path, sched, stops, k * m, n_chains=settings.chains, pop=settings.population,
                  desc="class masses")
    r = settings.chains // settings.population
    lw = res.logw[0].reshape(k, m, r, settings.population).cpu().numpy()
    within = torch.log_softmax(own.logw.double().reshape(k, m), -1).cpu().numpy()
    reps = logsumexp(within[..., None] + logmeanexp(lw, -1), 1)                 # [K, R]
    return logmeanexp(reps, -1), reps.std(-1, ddof=1) / np.sqrt(r), len(sched.lambdas)


def _log_likelihood(log_w, log_qy, log_z):
    """L(w) of class log-weights [K] (any normalisation), class log densities [N, K] and log Z_y [K]."""
    la = log_w - logsumexp(log_w)
    return float(logsumexp(la + log_qy, 1).mean() - logsumexp(la + log_z))


def ml_class_weights(log_qy: np.ndarray, log_z: np.ndarray, log_w0: np.ndarray) -> np.ndarray:
    """The class log-weights [K] (normalised) that maximise L, from log_w0 [K]: there mean_i r_y(x_i) = w_y Z_y / Z.
    log_qy [N, K]: log q_y of the training images; log_z [K]."""
    def neg(a):
        la = a - logsumexp(a)
        resp = softmax(la + log_qy, 1).mean(0)
        return -_log_likelihood(a, log_qy, log_z), -(resp - softmax(la + log_z))
    a = minimize(neg, log_w0 - logsumexp(log_w0), jac=True, method="L-BFGS-B",
                 options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000}).x
    return a - logsumexp(a)


def fit_class_weights(model, x_train, x_heldout, t_train: float, generator: torch.Generator,
                      settings: SMCSettings = SMCSettings(), progress: bool = False) -> ClassWeightFit:
    """Estimate every class's mass (class_masses), set the base's class weights to the maximum-likelihood ones
    (ml_class_weights) and its class masses in place, and return the fit. x_train, x_heldout: images [N, *shape]."""
    t0 = time.perf_counter()
    own = model.base
    log_z, se, stages = class_masses(model, t_train, generator, settings, progress)
    dens = [torch.cat([own.class_log_densities(b.to(own.prec.device)) for b in x.split(1000)]).cpu().numpy()
            for x in (x_train, x_heldout)]
    before = own.class_log_weights().cpu().numpy()
    after = ml_class_weights(dens[0], log_z, before)
    own.set_class_log_weights(torch.from_numpy(after), torch.from_numpy(log_z))
    gains = [_log_likelihood(after, d, log_z) - _log_likelihood(before, d, log_z) for d in dens]
    return ClassWeightFit(log_z, se, np.exp(before), np.exp(after), softmax(after + log_z), gains[0], gains[1],
                          stages, time.perf_counter() - t0)
