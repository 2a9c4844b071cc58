"""Training objectives. Each returns (loss, terms) from logits of data and of sampler chains.

Energies (nats): marginal E(x) = -logsumexp f(x); joint E(x, y) = -f(x)[y].
  dcl    : CE(f(x_data), y_data)
  m_ebm  : <E(x_data)> - <E(x_m)>,                       x_m ~ marginal chains
  j_ebm  : maximum likelihood of p(x, y), by one of two estimators (joint_estimator):
           "exact":  CE + m_ebm, since log p(x, y) = log p(y | x) + log p(x): the p(y | x) part exactly, the
                     p(x) part from marginal chains (no class-conditional sampling noise in the classifier);
           "chains": <E(x_data, y_data)> - <E(x_j, y_j)>,  (x_j, y_j) ~ class-conditional chains (JEM-style)
           With chains at T = T_train these have the same expected gradient only at T = 1: "chains" is ML of
           p(x, y) ~ exp(f[y] / T), "exact" is CE on the logits' scale plus ML of q(x) ~ exp(logsumexp f / T).
  gcl    : j_ebm - gamma * m_ebm (gamma = 1, T = 1: expected gradient of CE, i.e. of -log p(y|x))
  hybrid : CE + m_ebm
plus reg * penalty for every EBM term, always added, in one of two forms (`penalty`):
  magnitude: <E_data^2> + <E_model^2> (IGEBM/JEM);
  centred:   Var E_data + Var E_model + (<E_data> - <E_model>)^2 / 2, the magnitude penalty less its part
             2 ((<E_data> + <E_model>) / 2)^2, the only part that sees the energies' additive constant.
A shift of every energy changes no probability; the magnitude penalty turns a shift of the class that holds the
chains into a force against the bias gradient that balances the classes (its trained MNIST j_ebm models put >= 0.99 of
p(y) on one class), which the centred form leaves out. The centred form's gap term and the likelihood term share
the two means, so the gradient is (1 - reg g)(grad <E_data> - grad <E_model>) + reg grad(variances) with
g = <E_model> - <E_data>: training holds g at 1 / reg, where the likelihood gradient cancels.
plus, for the classes of a model trained with marginal chains (j_ebm "exact", hybrid), class_balance times the
label-marginal term: the maximum-likelihood gradient of the labels' marginal, sum_y pi_y log p(y) with pi the data's
class frequencies and p(y) = E_x p(y|x) the chains' class split, self-normalised over the chains (exact at T = 1).
Maximum likelihood of p(x, y) holds p(y) = pi (the moment of the class biases), so the term leaves its optimum where
it is; it keeps the chains' class split at the data's where the centred penalty cancels the likelihood gradient.
Optional weights (summing to 1) replace sample means by weighted means (exact expectations in tests).
A model with a fixed base (models.GaussianBase; its energies -t_base log q passed as base_*) is penalised on the
energies its network adds to the base's, E - E_base: the penalty bounds what training learns, not the base's spread.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import JOINT_ESTIMATORS, OBJECTIVES, PENALTIES, label_marginal_applies, needs
from ..errors import ThermoEBMError
from ..models import joint_energy, marginal_energy


def _mean(e, w):
    return e.mean() if w is None else (e * w).sum()


def _penalty(ed, em, w, form):
    """The energy penalty of data energies ed [N] and model energies em [M] (weights w or None), 0-d."""
    if form == "magnitude":
        return (ed ** 2).mean() + _mean(em ** 2, w)
    md, mm = ed.mean(), _mean(em, w)
    return ((ed - md) ** 2).mean() + _mean((em - mm) ** 2, w) + 0.5 * (md - mm) ** 2


def label_marginal(logits, prior, temperature=1.0, w=None):
    """(surrogate, kl) of the label-marginal term from chain logits [M, K] and data class frequencies prior [K]:
    the surrogate's gradient is -T grad sum_y prior_y log p(y), with p(y|x) = softmax(f / T) and p(y) its mean over
    the chains (weights w [M] or None), the chains standing for p(x) (exact at T = 1); kl = KL(prior || p(y)), nats."""
    p = torch.softmax(logits.detach().double() / temperature, 1)
    wm = torch.full((len(p), 1), 1.0 / len(p), dtype=p.dtype, device=p.device) if w is None else w.double()[:, None]
    q = (wm * p).sum(0)
    prior = prior.to(p)
    coef = wm * p * (prior / q.clamp_min(1e-300) - 1.0)
    kl = (prior * (prior.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum()
    return -(coef.to(logits.dtype) * logits).sum(), kl


def loss_terms(objective, logits_data, y_data, *, logits_joint=None, y_joint=None, logits_marginal=None,
               gamma=1.0, reg=0.0, w_joint=None, w_marginal=None, joint_estimator="chains", penalty="centred",
               class_balance=0.0, class_prior=None, temperature=1.0, base_data=None, base_joint=None,
               base_marginal=None):
    """(loss, terms) of an objective from logits [N, K] of data and of chains; terms are 0-d tensors.
    class_balance > 0 adds the label-marginal term of the marginal chains (needs class_prior [K] and the chains'
    temperature). base_* [N]: a fixed base's part of the energies of data and chains (None: no base), left out of
    the penalty; terms then hold <population>_net_gap, the data-model gap of the network's part, which the penalty
    sets."""
    if objective not in OBJECTIVES:
        raise ThermoEBMError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if joint_estimator not in JOINT_ESTIMATORS:
        raise ThermoEBMError(f"unknown joint estimator {joint_estimator!r}; choose exact or chains")
    if penalty not in PENALTIES:
        raise ThermoEBMError(f"unknown penalty {penalty!r}; choose one of {', '.join(PENALTIES)}")
    terms = {}
    loss = logits_data.new_zeros(())
    penalty_sum = logits_data.new_zeros(())
    pops = needs(objective, joint_estimator)
    if objective in ("dcl", "hybrid") or (objective == "j_ebm" and joint_estimator == "exact"):
        terms["ce"] = F.cross_entropy(logits_data, y_data)
        loss = loss + terms["ce"]
    if "joint" in pops:
        ed, em = joint_energy(logits_data, y_data), joint_energy(logits_joint, y_joint)
        terms["joint_e_data"], terms["joint_e_model"] = ed.mean(), _mean(em, w_joint)
        terms["joint_ml"] = terms["joint_e_data"] - terms["joint_e_model"]
        loss = loss + terms["joint_ml"]
        if base_data is not None:
            ed, em = ed - base_data, em - base_joint
            terms["joint_net_gap"] = _mean(em, w_joint) - ed.mean()
        penalty_sum = penalty_sum + _penalty(ed, em, w_joint, penalty)
    if "marginal" in pops:
        ed, em = marginal_energy(logits_data), marginal_energy(logits_marginal)
        terms["marginal_e_data"], terms["marginal_e_model"] = ed.mean(), _mean(em, w_marginal)
        terms["marginal_ml"] = terms["marginal_e_data"] - terms["marginal_e_model"]
        loss = loss + (-gamma if objective == "gcl" else 1.0) * terms["marginal_ml"]
        if base_data is not None:
            ed, em = ed - base_data, em - base_marginal
            terms["marginal_net_gap"] = _mean(em, w_marginal) - ed.mean()
        penalty_sum = penalty_sum + _penalty(ed, em, w_marginal, penalty)
        if class_balance > 0 and label_marginal_applies(objective, joint_estimator):
            surrogate, terms["class_kl"] = label_marginal(logits_marginal, class_prior, temperature, w_marginal)
            loss = loss + class_balance * surrogate
    terms["reg"] = reg * penalty_sum
    loss = loss + terms["reg"]
    terms["loss"] = loss
    return loss, terms
