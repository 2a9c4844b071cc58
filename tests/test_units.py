"""Unit tests: samplers, estimators, objectives, temperature parsing."""
import math

import numpy as np
import pytest
import torch

from thermo_ebm import ThermoEBMError
from thermo_ebm.ensembles import Ensemble
from thermo_ebm.estimators import (integrated_autocorr_time, jackknife, log_mean_weight, parabola_peak,
                                   pareto_k, peak_position)
from thermo_ebm.cli import parse_temps
from thermo_ebm.training.objectives import loss_terms
from thermo_ebm.samplers.rng import normals_like
from thermo_ebm.samplers.kernels import (fold, langevin_init, langevin_step, log_folded_normal, log_q_ratio, mala_init,
                                 mala_kernel, mala_step)


def test_fold_maps_into_box_and_is_identity_inside():
    z = torch.linspace(-9, 9, 1001)
    y = fold(z)
    assert y.min() >= -1 and y.max() <= 1
    inside = z.abs() <= 1
    assert torch.allclose(y[inside], z[inside], atol=1e-6)
    assert torch.allclose(fold(torch.tensor([1.2, -1.3, 3.5])), torch.tensor([0.8, -0.7, -0.5]))
    # float32 values at and next to the fold points 4k - 1 (where rounding could leave the box), and far out
    k = torch.arange(-50, 51, dtype=torch.float32) * 4 - 1
    far = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 1e4
    edge = torch.cat([k, torch.nextafter(k, k + 1), torch.nextafter(k, k - 1), far])
    y = fold(edge)
    assert y.min() >= -1 and y.max() <= 1
    # and it is the reflection: equal to the remainder-based definition (float64 reference), up to the float32
    # rounding of z + 1 (half an ulp of z; every later step of fold is exact)
    e64 = edge.double()
    w = torch.remainder(e64 + 1, 4)
    err = (y.double() - torch.where(w <= 2, w - 1, 3 - w)).abs()
    assert (err <= 1e-7 + 0.5 * torch.finfo(torch.float32).eps * e64.abs()).all()


def test_folded_normal_density_normalises():
    # integrate exp(log q) over the box: must be 1 after adding the normalising constant
    s = torch.tensor([[0.3]], dtype=torch.float64)
    for mu in (-1.4, 0.2, 0.95, 2.7):
        ys = torch.linspace(-1, 1, 20001, dtype=torch.float64)[:, None]
        lq = log_folded_normal(ys, torch.full_like(ys, mu), s.expand(len(ys), 1)) - math.log(0.3 * math.sqrt(2 * math.pi))
        assert abs(torch.trapezoid(lq.exp(), ys[:, 0]).item() - 1) < 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("step", [0.2, 0.5])
def test_reflected_mala_is_stationary_on_boundary_heavy_target(step, compiled):
    a = 6.0  # p(x) ∝ exp(a (x_1 + x_2)) on [-1, 1]^2: most mass against the walls
    model = lambda x: a * x.sum(-1, keepdim=True)  # noqa: E731  (K = 1 logits)
    g = torch.Generator().manual_seed(0)
    n = 20000
    # start exactly in equilibrium (inverse CDF); a correct kernel keeps the distribution
    u = torch.rand(n, 2, generator=g)
    x = torch.log(u * (math.exp(a) - math.exp(-a)) + math.exp(-a)) / a
    st = mala_init(model, Ensemble("marginal", 1), x)
    kernel = mala_kernel(compiled)
    for _ in range(50):
        st, _ = mala_step(st, model, Ensemble("marginal", 1), torch.ones(n), torch.full((n,), step), g, kernel)
    exact = (math.exp(a) + math.exp(-a)) / (math.exp(a) - math.exp(-a)) - 1 / a
    se = st.x.std().item() / math.sqrt(2 * n)
    assert abs(st.x.mean().item() - exact) < 4 * se


def test_langevin_stationary_behaviour_on_gaussian():
    # small-step SGLD on E = x^2 / (2 s^2) with step eta and noise sqrt(2 eta) samples N(0, s^2) (in the box)
    s2, eta = 0.04, 1e-3
    energy = lambda x: (x ** 2).sum(-1) / (2 * s2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    st = langevin_init(energy, torch.zeros(4000, 1))
    for _ in range(600):
        st = langevin_step(st, energy, eta, math.sqrt(2 * eta), g)
    var = st.x.var().item()
    assert abs(var - s2) < 0.1 * s2  # discretisation bias of SGLD is O(eta / s2) = 2.5%


def test_log_mean_weight_and_ess():
    rng = np.random.default_rng(0)
    logw = rng.normal(0, 1, (3, 4096))
    est, se, reps, ess = log_mean_weight(logw, 16)
    assert np.all(np.abs(est - 0.5) < 4 * se)  # log E[e^w] = 1/2 for w ~ N(0, 1)
    assert np.all((ess > 0.3 * 4096) & (ess < 0.45 * 4096))  # e^-1 of N for lognormal(0, 1)


@pytest.mark.parametrize("shape", [0.3, 0.7, 1.0])
def test_pareto_k_recovers_the_tail_shape(shape):
    # weights with a generalised Pareto tail of known shape (scipy's genpareto: c = shape), 200 runs of 5000
    from scipy import stats
    rng = np.random.default_rng(2)
    k = pareto_k(np.log(stats.genpareto.rvs(shape, size=(200, 5000), random_state=rng)))
    assert k.shape == (200,)
    # 4 SE of the mean of 200 runs, plus the estimator's known small-sample bias (~0.03 at 212 tail weights,
    # the weak prior pulling towards 1/2 included)
    assert abs(k.mean() - shape) < 4 * k.std(ddof=1) / np.sqrt(200) + 0.03


def test_pareto_k_separates_light_from_heavy_weights():
    rng = np.random.default_rng(3)
    light = pareto_k(rng.normal(0, 0.5, (50, 512)))  # lognormal(0, 1/2): every moment finite, ESS ~ 0.8 N
    heavy = pareto_k(np.log(rng.pareto(1 / 1.5, (50, 512))))  # Lomax, tail shape 1.5: infinite mean
    assert np.mean(light < 0.5) > 0.9 and np.mean(heavy > 0.7) > 0.9
    assert np.isnan(pareto_k(np.zeros(10)))  # too few weights to fit a tail
    assert pareto_k(np.zeros(512)) == 0  # equal weights: no tail
    assert pareto_k(np.r_[np.zeros(510), [800.0, 800.0]]) == np.inf  # two weights dominate
    ties = np.r_[np.zeros(450), rng.normal(0, 0.5, 62)]  # ties at the tail's threshold are dropped
    assert 0 <= pareto_k(ties) < 0.5


def test_jackknife_and_iat():
    rng = np.random.default_rng(1)
    blocks = rng.normal(2.0, 1.0, (1, 400, 1))
    est, se = jackknife(blocks, lambda m: m[..., 0] ** 2)
    assert abs(est[0] - 4.0) < 4 * se[0]
    assert abs(se[0] - 4.0 / 20) < 0.05  # delta method: 2 mu sigma / sqrt(n)
    # AR(1) with rho = 0.9 has tau = (1 + rho) / (1 - rho) = 19
    x = np.zeros((20000, 8))
    for t in range(1, len(x)):
        x[t] = 0.9 * x[t - 1] + rng.normal(size=8)
    assert 15 < integrated_autocorr_time(x) < 23


def test_parse_temps():
    assert len(parse_temps("0.5:2:0.1")) == 16
    assert np.allclose(parse_temps("0.5,1,2"), [0.5, 1, 2])
    assert np.allclose(parse_temps("1:1.25:0.1"), [1.0, 1.1, 1.2])
    for bad in ["2:0.5:0.1", "0:1:0.1", "-1,2", "", "a:b:c", "1:2:0", "0.001:100:0.0001", "1,x"]:
        with pytest.raises(ThermoEBMError):
            parse_temps(bad)


class Tiny(torch.nn.Module):
    """Logits f_y(x) = w_y * x + b_y on x in [-1, 1] (1-D), so every expectation is exact by quadrature."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([0.1, 0.4, -0.2], dtype=torch.float64))

    def forward(self, x):
        return x * self.w + self.b


def _grad(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_gcl_gradient_equals_cross_entropy_gradient_in_expectation():
    m = Tiny()
    x_data = torch.tensor([[-0.5], [0.2], [0.9]], dtype=torch.float64)
    y_data = torch.tensor([0, 2, 1])
    # exact model expectations: quadrature grid with weights p(x, y) and p(x)
    xs = torch.linspace(-1, 1, 4001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        lg = m(xs)
        pj = torch.softmax(lg.reshape(-1), 0).reshape(lg.shape)  # p(x, y) on the grid
        pm = pj.sum(1)
    k = lg.shape[1]
    x_joint = xs.repeat_interleave(k, 0)
    y_joint = torch.arange(k).repeat(len(xs))
    lg_d, lg_j, lg_m = m(x_data), m(x_joint), m(xs)
    gcl, _ = loss_terms("gcl", lg_d, y_data, logits_joint=lg_j, y_joint=y_joint, logits_marginal=lg_m, gamma=1.0,
                        reg=0.0, w_joint=pj.reshape(-1), w_marginal=pm)
    ce, _ = loss_terms("dcl", m(x_data), y_data)
    for a, b in zip(_grad(m, gcl), _grad(m, ce)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("T", [1.0, 0.3])
def test_j_ebm_estimators_and_the_models_they_train(T):
    """With chains at temperature T (T_train) and exact model expectations (quadrature weights): the chains
    estimator is the gradient of -T log p_T(x, y), p_T proportional to exp(f(x)[y] / T); the exact estimator is the
    gradient of CE(f) - T log q_T(x), q_T proportional to exp(logsumexp f(x) / T). At T = 1 these are one model
    (log p(x, y) = log p(y|x) + log p(x)) and the two gradients agree; at any other T they are different models
    (the exact estimator's is hybrid's) and the gradients differ (docs/training.md)."""
    m = Tiny()
    x_data = torch.tensor([[-0.5], [0.2], [0.9]], dtype=torch.float64)
    y_data = torch.tensor([0, 2, 1])
    xs = torch.linspace(-1, 1, 4001, dtype=torch.float64)[:, None]
    dx = 2.0 / 4000
    with torch.no_grad():
        lg = m(xs)
        pj = torch.softmax((lg / T).reshape(-1), 0).reshape(lg.shape)  # what joint chains at T sample
        pm = torch.softmax(torch.logsumexp(lg, 1) / T, 0)                # what marginal chains at T sample
    k = lg.shape[1]
    chains, _ = loss_terms("j_ebm", m(x_data), y_data, logits_joint=m(xs.repeat_interleave(k, 0)),
                           y_joint=torch.arange(k).repeat(len(xs)), reg=0.0, w_joint=pj.reshape(-1),
                           joint_estimator="chains")
    exact, terms = loss_terms("j_ebm", m(x_data), y_data, logits_marginal=m(xs), reg=0.0, w_marginal=pm,
                              joint_estimator="exact")
    hybrid, _ = loss_terms("hybrid", m(x_data), y_data, logits_marginal=m(xs), reg=0.0, w_marginal=pm)
    assert "ce" in terms and "marginal_ml" in terms and "joint_ml" not in terms
    def log_p():  # log p_T(x, y) of the data, normalised by quadrature
        f_d, f_g = m(x_data), m(xs)
        return f_d.gather(1, y_data[:, None])[:, 0] / T - torch.logsumexp((f_g / T).reshape(-1), 0) - math.log(dx)

    def log_q():  # log q_T(x) of the data
        f_d, f_g = m(x_data), m(xs)
        return torch.logsumexp(f_d, 1) / T - torch.logsumexp(torch.logsumexp(f_g, 1) / T, 0) - math.log(dx)

    ce = torch.nn.functional.cross_entropy(m(x_data), y_data)
    g_chains, g_exact, g_hybrid = _grad(m, chains), _grad(m, exact), _grad(m, hybrid)
    for a, b in zip(g_chains, _grad(m, -T * log_p().mean())):
        assert torch.allclose(a, b, atol=1e-10)
    for a, b, c in zip(g_exact, _grad(m, ce - T * log_q().mean()), g_hybrid):
        assert torch.allclose(a, b, atol=1e-10) and torch.allclose(a, c, atol=1e-12)
    gap = max(float((a - b).abs().max()) for a, b in zip(g_chains, g_exact))
    assert gap < 1e-10 if T == 1.0 else gap > 1e-2


@pytest.mark.parametrize("objective", ["j_ebm", "hybrid"])
def test_label_marginal_term_is_the_likelihood_gradient_of_the_labels_marginal(objective):
    """With exact expectations over p(x) (quadrature weights, T = 1), class_balance x the label-marginal term adds
    class_balance x the gradient of -sum_y pi_y log p(y), p(y) = Z_y / Z the model's label marginal, and its kl term
    is KL(pi || p(y)); at pi = p(y) it adds nothing."""
    m = Tiny()
    x_data = torch.tensor([[-0.5], [0.2], [0.9]], dtype=torch.float64)
    y_data = torch.tensor([0, 2, 1])
    xs = torch.linspace(-1, 1, 4001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        pm = torch.softmax(torch.logsumexp(m(xs), 1), 0)
    prior = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)

    def loss(balance, pi=prior):
        return loss_terms(objective, m(x_data), y_data, logits_marginal=m(xs), reg=0.2, w_marginal=pm,
                          joint_estimator="exact", class_balance=balance, class_prior=pi)

    def log_p_y():  # the model's label marginal log Z_y - log Z, by quadrature
        lz_y = torch.logsumexp(m(xs), 0)
        return lz_y - torch.logsumexp(lz_y, 0)

    (l0, _), (l1, terms) = loss(0.0), loss(2.5)
    for a, b, c in zip(_grad(m, l1), _grad(m, l0), _grad(m, -(prior * log_p_y()).sum())):
        torch.testing.assert_close(a - b, 2.5 * c, atol=1e-10, rtol=1e-8)
    assert float(c.abs().max()) > 1e-2  # the test has something to see
    with torch.no_grad():
        q = log_p_y().exp()
    torch.testing.assert_close(terms["class_kl"], (prior * (prior / q).log()).sum())
    for a, b in zip(_grad(m, loss(2.5, q)[0]), _grad(m, loss(0.0, q)[0])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("penalty", ["centred", "magnitude"])
@pytest.mark.parametrize("objective", ["dcl", "m_ebm", "j_ebm", "gcl", "hybrid"])
def test_every_objective_loss(objective, penalty):
    m = Tiny()
    xd = torch.tensor([[-0.5], [0.3]], dtype=torch.float64)
    yd = torch.tensor([0, 1])
    xj, yj = torch.tensor([[0.1], [0.7]], dtype=torch.float64), torch.tensor([2, 0])
    xm = torch.tensor([[-0.9], [0.4]], dtype=torch.float64)
    loss, t = loss_terms(objective, m(xd), yd, logits_joint=m(xj), y_joint=yj, logits_marginal=m(xm), gamma=0.5, reg=0.1,
                         joint_estimator="chains", penalty=penalty)
    with torch.no_grad():
        lse = lambda z: torch.logsumexp(m(z), 1)  # noqa: E731
        ce = torch.nn.functional.cross_entropy(m(xd), yd)
        jml = -m(xd)[[0, 1], yd].mean() + m(xj)[[0, 1], yj].mean()
        mml = -lse(xd).mean() + lse(xm).mean()
        if penalty == "magnitude":
            pen = lambda a, b: (a ** 2).mean() + (b ** 2).mean()  # noqa: E731
        else:  # variances plus half the gap^2, written out
            pen = lambda a, b: ((a - a.mean()) ** 2).mean() + ((b - b.mean()) ** 2).mean() + (a.mean() - b.mean()) ** 2 / 2  # noqa: E731,E501
        jreg = pen(m(xd)[[0, 1], yd], m(xj)[[0, 1], yj])
        mreg = pen(lse(xd), lse(xm))
    expect = {"dcl": ce, "m_ebm": mml + 0.1 * mreg, "j_ebm": jml + 0.1 * jreg,
              "gcl": jml - 0.5 * mml + 0.1 * (jreg + mreg), "hybrid": ce + mml + 0.1 * mreg}[objective]
    assert torch.allclose(loss, expect)
    assert torch.allclose(t["loss"], loss)


@pytest.mark.parametrize("objective", ["m_ebm", "j_ebm", "gcl", "hybrid"])
def test_centred_penalty_ignores_the_energies_additive_constant(objective):
    """Adding c to every logit shifts every energy by -c and changes no probability: no term of the loss sees it under
    the centred penalty; the magnitude penalty does (it pushes the class that holds the chains upward)."""
    m = Tiny()
    xd, yd = torch.tensor([[-0.5], [0.3], [0.9]], dtype=torch.float64), torch.tensor([0, 1, 2])
    xj, yj = torch.tensor([[0.1], [0.7], [-0.2]], dtype=torch.float64), torch.tensor([2, 0, 0])
    xm = torch.tensor([[-0.9], [0.4], [0.0]], dtype=torch.float64)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    def terms(c, penalty):
        with torch.no_grad():
            return loss_terms(objective, m(xd) + c, yd, logits_joint=m(xj) + c, y_joint=yj, logits_marginal=m(xm) + c,
                              reg=0.3, w_joint=w, w_marginal=w.flip(0), joint_estimator="chains", penalty=penalty)[1]
    runs = [terms(c, "centred") for c in (0.0, 7.5)]
    assert runs[0]["reg"] > 0 and runs[0]["marginal_e_data" if objective != "j_ebm" else "joint_e_data"] != 0
    for k in [k for k in runs[0] if not k.endswith(("_e_data", "_e_model"))]:
        assert torch.allclose(runs[0][k], runs[1][k]), k
    assert not torch.allclose(terms(0.0, "magnitude")["reg"], terms(7.5, "magnitude")["reg"])


@pytest.mark.parametrize("reg", [0.1, 1.0])
def test_centred_penalty_scales_the_likelihood_gradient_by_one_minus_reg_times_the_gap(reg):
    """The centred penalty's gap term and the likelihood term are functions of the same two means, so the
    gradient of m_ebm's loss is (1 - reg g)(grad <E_data> - grad <E_model>) + reg grad(Var E_data + Var E_model),
    g = <E_model> - <E_data>: at g = 1 / reg (where training's gap settles, docs/training.md) the likelihood
    gradient is cancelled."""
    m = Tiny()
    xd = torch.tensor([[-0.5], [0.3], [0.9], [0.1]], dtype=torch.float64)
    xm = torch.tensor([[-0.9], [0.4], [0.0]], dtype=torch.float64)
    loss = loss_terms("m_ebm", m(xd), None, logits_marginal=m(xm), reg=reg, penalty="centred")[0]
    def energies():
        return -torch.logsumexp(m(xd), -1), -torch.logsumexp(m(xm), -1)
    ed, em = energies()
    g = float((em.mean() - ed.mean()).detach())
    contrast = _grad(m, ed.mean() - em.mean())
    ed, em = energies()
    spread = _grad(m, ed.var(unbiased=False) + em.var(unbiased=False))
    for a, c, v in zip(_grad(m, loss), contrast, spread):
        torch.testing.assert_close(a, (1 - reg * g) * c + reg * v)
    assert abs(1 - reg * g) > 0.1  # the identity is tested away from the cancellation


def test_compiled_mala_kernel_matches_eager():
    from thermo_ebm.samplers.kernels import EAGER
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 50, generator=g) * 2 - 1
    grad, xi = torch.randn(32, 50, generator=g), torch.randn(32, 50, generator=g)
    s = torch.rand(32, 1, generator=g) * 0.45 + 0.05
    b = torch.rand(32, 1, generator=g) * 2
    fused = mala_kernel(True)
    y, y0 = fused.propose(x, grad, s, b, xi), EAGER.propose(x, grad, s, b, xi)
    torch.testing.assert_close(y, y0)
    g_y = torch.randn(32, 50, generator=g)
    finite = torch.rand(32, generator=g) < 0.9
    log_u = torch.rand(32, generator=g).log()
    # dlp chosen so that log u - dlp sits 0.05 from the log q ratio: accept/reject on both sides, none marginal
    dlp = log_u - log_q_ratio(x, y0, grad, g_y, s, b) + torch.where(torch.rand(32, generator=g) < 0.5, 0.05, -0.05)
    out = fused.accept(x, y, grad, g_y, s, b, dlp, log_u, finite)
    want = EAGER.accept(x, y0, grad, g_y, s, b, dlp, log_u, finite)
    assert want[2].any() and not want[2].all()
    for a, w in zip(out, want):
        torch.testing.assert_close(a, w)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    from thermo_ebm.samplers import kernels as sampling

    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no compiler")
        return call
    monkeypatch.setattr(sampling.torch, "compile", broken)
    kernel = sampling.mala_kernel(True)
    x = torch.zeros(2, 3)
    s, b = torch.full((2, 1), 0.1), torch.ones(2, 1)
    with caplog.at_level("WARNING"):
        key = kernel.noise(x, torch.Generator().manual_seed(0))  # drawn before the first compile attempt
        out = kernel.propose(x, x, s, b, key)
        noise = kernel.noise(x, torch.Generator().manual_seed(0))
    # the step that hit the failure draws its normals eagerly from its key; later steps use torch.randn
    torch.testing.assert_close(out, sampling.EAGER.propose(x, x, s, b, normals_like(x, key)))
    torch.testing.assert_close(noise, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    assert "eager" in caplog.text


def test_folded_density_equals_the_explicit_image_sum():
    """The closed form equals log sum_k N(image_k; fold(mu), s^2) over nine mirror images, in float64."""
    g = torch.Generator().manual_seed(3)
    for s_val in (0.02, 0.2, 0.5):
        mu = (torch.rand(200, 7, generator=g, dtype=torch.float64) * 3 - 1.5)
        y = torch.rand(200, 7, generator=g, dtype=torch.float64) * 2 - 1
        s = torch.full((200, 1), s_val, dtype=torch.float64)
        m = fold(mu)
        imgs = torch.stack([y + 4 * k for k in range(-2, 3)] + [4 * k + 2 - y for k in range(-2, 2)], -1)
        want = torch.logsumexp(-((imgs - m[..., None]) ** 2) / (2 * s_val ** 2), -1).sum(-1)
        torch.testing.assert_close(log_folded_normal(y, mu, s), want, rtol=1e-10, atol=1e-10)


def test_parabola_peak_is_exact_on_parabolas_and_batched():
    t = np.linspace(0.0, 3.0, 7)
    centres = np.array([0.7, 1.3, 2.45])
    y = -(t[None] - centres[:, None]) ** 2 * np.array([[1.0], [3.0], [0.5]]) + 2.0
    np.testing.assert_allclose(parabola_peak(t, y), centres, atol=1e-12)
    assert parabola_peak(t, y[1]) == pytest.approx(1.3, abs=1e-12)


def test_peak_se_is_calibrated_under_correlated_errors():
    """C(T) with errors correlated between neighbouring temperatures (as replica exchange makes them): the
    SE from the full covariance matches the spread of T* over repeated data sets; assuming independent
    errors overstates it about twofold."""
    from thermo_ebm.testing import DoubleWells
    t = np.round(np.arange(0.2, 0.451, 0.05), 3)
    truth = np.asarray(DoubleWells(8).exact(t)["C"])
    i = np.arange(len(t))
    cov = 0.15 ** 2 * 0.8 ** np.abs(i[:, None] - i[None])
    ys = np.random.default_rng(1).multivariate_normal(truth, cov, size=400)
    full = np.array([peak_position(t, y, cov, n_draws=1000, seed=k) for k, y in enumerate(ys)])
    indep = np.array([peak_position(t, y, np.diag(np.diag(cov)), n_draws=1000, seed=k)[1] for k, y in enumerate(ys)])
    spread = full[:, 0].std()
    assert 0.8 < spread / full[:, 1].mean() < 1.25
    assert indep.mean() > 1.6 * spread
    assert np.mean(np.abs(full[:, 0] - parabola_peak(t, truth)) < 2 * full[:, 1]) > 0.9
    assert np.isnan(peak_position(t, np.arange(6.0), cov)).all()  # maximum at the edge: no interior peak
    assert np.isnan(peak_position(t, np.full(6, np.nan), cov)).all()  # all-NaN C (a diverged model): no peak


def test_heat_capacity_peak_is_flagged_where_c_is():
    from thermo_ebm.measurement.flags import peak_flagged
    c = np.array([1.0, 2.0, 5.0, 2.0, 1.0, 0.5])
    none = {"flag_poor_mixing": np.zeros(6, bool), "flag_unconverged": np.ones(6, bool)}  # log Z only, not C
    assert not peak_flagged(c, none, 2.0)
    # the sweep chains start from the weights' states: a low ESS there touches C too
    assert peak_flagged(c, dict(none, flag_low_ess=np.array([0, 0, 1, 0, 0, 0], bool)), 2.0)
    near = dict(none, flag_poor_mixing=np.array([0, 0, 0, 1, 0, 0], bool))
    far = dict(none, flag_poor_mixing=np.array([0, 0, 0, 0, 1, 1], bool))
    assert peak_flagged(c, near, 2.0) and not peak_flagged(c, far, 2.0) and not peak_flagged(c, near, float("nan"))


def test_plot_reads_the_stored_peak_and_handles_older_files():
    import xarray as xr
    from thermo_ebm.reporting.plot import heat_capacity_peak
    t = np.array([0.2, 0.25, 0.3, 0.35])
    ds = xr.Dataset({"C": ("temperature", -(t - 0.27) ** 2)}, coords={"temperature": t})
    t_star, se = heat_capacity_peak(ds)  # written before C_peak_T existed: the vertex, no SE
    assert t_star == pytest.approx(0.27) and math.isnan(se)
    stored = ds.assign(C_peak_T=((), 0.271), C_peak_T_err=((), 0.004))
    assert heat_capacity_peak(stored) == (0.271, 0.004)
    assert heat_capacity_peak(ds.assign(C_peak_T=((), np.nan), C_peak_T_err=((), np.nan))) is None


def test_sweep_loop_takes_device_tensors_and_matches_run_sweep():
    """perf.py's GPU sync check runs `sweep_loop` on betas and steps already on the device (a host copy would
    synchronise); with the same generator state it must do exactly what `run_sweep` does with numpy inputs."""
    from thermo_ebm.samplers.kernels import Sampler, uniform
    from thermo_ebm.samplers.sweep import run_sweep, sweep_loop
    from thermo_ebm.testing import DoubleWells
    model, ens = DoubleWells(3), Ensemble("marginal", 1)
    betas, step0 = np.array([0.5, 1.0, 2.0]), np.full(3, 0.2)
    init = mala_init(model, ens, uniform(3 * 8, (3,), torch.Generator().manual_seed(0), "cpu"))
    kw = dict(n_burn=4, n_prod=6, exchange=True, thin=2)
    ref = run_sweep(Sampler(model, ens, (3,), torch.Generator().manual_seed(1), "cpu"), init, betas, step0, **kw)
    out = sweep_loop(Sampler(model, ens, (3,), torch.Generator().manual_seed(1), "cpu"), init,
                     torch.tensor(betas, dtype=torch.float32), torch.tensor(step0), **kw)
    np.testing.assert_array_equal((sum(out["chunks"]) / 6).reshape(3, 8, -1).numpy(), ref.chain_means)
    np.testing.assert_array_equal(out["state"].x.numpy(), ref.final.x.numpy())
    np.testing.assert_array_equal(out["step"].numpy(), ref.step)


class _HostSyncTrap(torch.overrides.TorchFunctionMode):
    """Raises on the tensor calls that make the host wait for a CUDA device: reading a value into Python
    (item, bool, float, int, tolist, numpy), copies to the CPU, and ops whose output shape depends on values
    (nonzero, boolean-mask indexing, unique, masked_select, tensor-valued repeat counts)."""
    VALUE = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
             "argwhere", "unique", "unique_consecutive", "masked_select", "nonzero_static"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if (name in self.VALUE
                or name in ("__getitem__", "__setitem__", "index_put_") and any(
                    t.dtype == torch.bool for t in _index_tensors(args[1:2]))
                or name == "where" and len(args) == 1
                or name == "repeat_interleave" and len(tensors) > 1
                or name in ("to", "copy_") and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))):
            raise AssertionError(f"host-synchronising call inside the step loop: {name}")
        return func(*args, **kwargs)


def _index_tensors(idx):
    for i in idx:
        if isinstance(i, torch.Tensor):
            yield i
        elif isinstance(i, (tuple, list)):
            yield from _index_tensors(i)


@pytest.mark.parametrize("kind", ["marginal", "joint"])
def test_sweep_loop_makes_no_host_synchronising_call(kind):
    """CI has no GPU, so `perf.py gpu`'s check under CUDA's sync debug mode never runs there; the same property,
    checked at the level of the calls the step loop makes (EAGER kernel: the compiled one fuses the same calls)."""
    from thermo_ebm.samplers.kernels import Sampler, uniform
    from thermo_ebm.samplers.sweep import sweep_loop
    from thermo_ebm.testing import DoubleWells
    with pytest.raises(AssertionError, match="item"), _HostSyncTrap():  # the trap fires on a value read ...
        torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="__getitem__"), _HostSyncTrap():  # ... and on a boolean mask
        x = torch.ones(3)
        x[x > 0]
    model, ens = DoubleWells(3), Ensemble(kind, 1)
    init = mala_init(model, ens, uniform(4 * 8, (3,), torch.Generator().manual_seed(0), "cpu"))
    betas, step0 = torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.full((4,), 0.2)
    with _HostSyncTrap():
        out = sweep_loop(Sampler(model, ens, (3,), torch.Generator().manual_seed(1), "cpu"), init, betas, step0,
                         n_burn=4, n_prod=6, exchange=True, thin=2)
    assert out["u_trace"].shape == (6, 32)


def test_mbar_is_skipped_only_without_overlap():
    """Neighbouring temperatures whose samples carry < 2 effective samples of each other (d = 784 at T = 0.5, 1)
    are named; a 1-d Gaussian at the same temperatures overlaps and is not."""
    from thermo_ebm.measurement.thermo import _no_overlap
    rng = np.random.default_rng(0)
    betas = np.array([0.5, 1.0, 2.0])
    for d, expect in ((1, None), (784, (2.0, 1.0))):
        e = np.concatenate([0.5 * (rng.normal(size=(400, d)) ** 2).sum(1) / b for b in betas])  # E ~ chi2_d T / 2
        u_kn = betas[:, None] * e[None, :]
        assert _no_overlap(u_kn, 400, betas) == expect, d


def test_mbar_cross_check_at_d_784_matches_the_exact_log_z():
    """A 784-d Gaussian, E = |x|^2 / 2, 1,000 exact draws at each of the design card's 16 temperatures (0.5-2):
    log Z spans 543 nats. MBAR, anchored at the lowest beta and started from the AIS values (here the exact ones off
    by up to 20 nats), lands within 4 SE of the exact log Z, and its z-scores over 8 seeds have mean ~0 and SD ~1
    (SD 1.13 over 30 seeds; a t with 15 degrees of freedom, from 16 groups, has 1.07). Started from zeros, pymbar's
    solver stops short here after minutes ("Should have sum_n W_nk = 1"), and the cross-check was lost."""
    from thermo_ebm.ensembles import Ensemble
    from thermo_ebm.measurement.thermo import _mbar_log_z
    d, steps, chains = 784, 8, 125
    temps = np.round(np.arange(2.0, 0.45, -0.1), 10)  # 2.0 ... 0.5: betas ascending, state 0 = lowest beta
    exact = 0.5 * d * np.log(2 * np.pi * temps)
    zs = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        e = 0.5 * temps[None, :, None] * rng.chisquare(d, size=(steps, len(temps), chains))  # E ~ T chi2_d / 2
        start = exact + np.concatenate([[0.0], rng.uniform(-20, 20, len(temps) - 1)])
        value, se = _mbar_log_z(-e[..., None], 1.0 / temps, Ensemble("marginal", 1), start, 0.0, 1.0)
        zs.append((value - exact)[1:] / se[1:])
    zs = np.array(zs)
    assert np.all(np.abs(zs) < 4), zs
    assert abs(zs.mean()) < 0.5 and 0.6 < zs.std() < 1.6, (zs.mean(), zs.std())


def test_peak_position_survives_a_temperature_without_an_se():
    """A frozen temperature's C can come with a non-finite SE: the peak is still placed, its SE is nan, and a
    non-finite C gives no peak (instead of numpy's 'Eigenvalues did not converge')."""
    from thermo_ebm.estimators import peak_position
    t, y = np.array([0.5, 1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0, 1.0])
    cov = np.eye(4) * 0.01
    cov[0, 0] = np.nan
    t_star, se = peak_position(t, y, cov)
    assert 0.5 < t_star < 2.0 and np.isnan(se)
    assert all(np.isnan(peak_position(t, np.array([1.0, np.inf, 2.0, 1.0]), np.eye(4))))


def test_class_mix_se_covers_the_mix_sweep_chains_inherit_from_the_weights():
    """Chains drawn by weight from importance-weighted draws of two classes (energies N(0, 1) and N(10, 1), true
    share 0.3: U = 3, C = 1 + 0.21 x 100 = 22 at beta 1) keep their class, as at d = 784: the chains' own jackknife
    SEs miss the weights' error in the class mix (z SD ~1.5 for U, ~3 for C), and with `class_mix_se` added the
    z-scores over 1,000 runs have SD close to 1."""
    from thermo_ebm.estimators import class_mix_se, jackknife
    rng = np.random.default_rng(0)

    def run(n=128, c=64, p=0.3, sig=1.0, steps=50):
        cls = rng.random(n) < 0.5
        lw = np.log(np.where(cls, p, 1 - p) / 0.5) + sig * rng.standard_normal(n) - sig ** 2 / 2
        p_y = np.stack([~cls, cls], -1).astype(float)
        w = np.exp(lw - lw.max())
        pick = rng.choice(n, size=c, p=w / w.sum())
        e = np.where(cls[pick], 10.0, 0.0)[:, None] + rng.standard_normal((c, steps))
        blocks = np.stack([e.mean(1), (e * e).mean(1), *p_y[pick].T], -1)[None]
        u, u_se = jackknife(blocks, lambda m: m[..., 0])
        cv, c_se = jackknife(blocks, lambda m: m[..., 1] - m[..., 0] ** 2)
        mix_u, mix_c = class_mix_se(blocks[..., 0], blocks[..., 1], blocks[..., 2:], lw[None], p_y[None], [1.0], 16)
        return ((u[0] - 10 * p) / u_se[0], (u[0] - 10 * p) / np.hypot(u_se[0], mix_u[0]),
                (cv[0] - 22) / c_se[0], (cv[0] - 22) / np.hypot(c_se[0], mix_c[0]))
    z = np.array([run() for _ in range(1000)])
    assert z[:, 0].std() > 1.3 and z[:, 2].std() > 2.5, z.std(0)
    assert 0.9 < z[:, 1].std() < 1.12 and abs(z[:, 1].mean()) < 0.1, (z[:, 1].std(), z[:, 1].mean())
    # C is quadratic in the mix and its 16 replicas' SE is itself noisy: SD 1.15 here (1.13-1.16 over seeds)
    assert 0.9 < z[:, 3].std() < 1.25 and abs(z[:, 3].mean()) < 0.15, (z[:, 3].std(), z[:, 3].mean())


def test_sweep_length_runs_a_short_sweep_on_and_drops_its_start():
    """An AR(1) trace (a = 0.95; Sokal's tau from 200 steps ~14): 200 samples and 50 burn-in are short (10 tau,
    5 tau), so the sweep runs on to 1.5 x both, its first production steps dropped in whole chunks; capped by `most`
    it keeps at least what it had; a white-noise trace leaves the sweep as it was."""
    from thermo_ebm.samplers.sweep import CHUNK, SweepLength, sweep_length
    rng = np.random.default_rng(0)
    a, n = 0.95, 200
    x = np.zeros((n, 2, 64))
    for i in range(1, n):
        x[i] = a * x[i - 1] + rng.standard_normal((2, 64))
    tau = max(integrated_autocorr_time(x[:, t]) for t in range(2))
    got = sweep_length(x, 50, n, most=10_000)
    drop = got.burn_in - 50
    assert drop % CHUNK == 0 and drop >= 7.5 * tau - 50 > drop - CHUNK
    assert got.samples >= 15 * tau and got.burn_in >= 7.5 * tau
    capped = sweep_length(x, 50, n, most=250)  # 250 production steps in all: 50 dropped, 200 kept
    assert capped == SweepLength(100, n)
    assert sweep_length(rng.standard_normal((n, 2, 64)), 50, n, most=10_000) == SweepLength(50, n)


def test_a_sweep_short_against_tau_runs_on_until_its_chains_mix():
    """DoubleWells(64) with 10 burn-in and 60 production steps (tau_E ~ 5-9): flag_poor_mixing at the defaults'
    factor 1 (the sweep as asked); with sweep_max_factor 4 the sweep runs on, drops its start, says how long it
    ran, clears the flag, and U and C agree with the exact values within 4 SE."""
    from thermo_ebm import measure
    from thermo_ebm.samplers.sweep import CHUNK
    from thermo_ebm.testing import DoubleWells
    system, temps = DoubleWells(64), [0.5, 1.0, 2.0]
    exact = system.exact(temps, "marginal")
    kw = dict(ensemble="marginal", seed=1, chains=16, burn_in=10, samples=60, ais_chains=128)
    short = measure(system, temps, sweep_max_factor=1.0, **kw)
    assert short.flag_poor_mixing.values.any() and (short.attrs["sweep_burn_in"], short.attrs["sweep_samples"]) == (10, 60)
    ds = measure(system, temps, **kw)
    burn, kept = ds.attrs["sweep_burn_in"], ds.attrs["sweep_samples"]
    assert (burn - 10) % CHUNK == 0 and burn > 10 and kept > 60 and burn + kept <= 4 * 70
    assert not ds.flag_poor_mixing.values.any() and np.all(kept >= 10 * ds.tau_E.values)
    for q in ("U", "C"):
        z = (ds[q].values - exact[q]) / ds[f"{q}_err"].values
        assert np.all(np.abs(z) < 4), (q, z)


def test_swap_acceptance_matches_monte_carlo_for_gaussian_energies():
    """The ladder's predictor E[min(1, exp((b_a - b_b)(E_a - E_b)))] for Gaussian energies against 400,000 draws
    (within 4 Monte Carlo SEs), over gaps from easy to hopeless."""
    from thermo_ebm.samplers.sweep import swap_acceptance
    rng = np.random.default_rng(0)
    for b_a, b_b, u_a, u_b, v_a, v_b in [(1.0, 0.9, -3.0, -2.0, 4.0, 6.0), (2.0, 1.0, -10.0, -4.0, 9.0, 25.0),
                                         (1.1, 1.0, 0.0, 0.5, 1.0, 1.0), (4.0, 1.0, -30.0, 0.0, 10.0, 40.0)]:
        ea = rng.normal(u_a, np.sqrt(v_a), 400_000)
        eb = rng.normal(u_b, np.sqrt(v_b), 400_000)
        a = np.minimum(1.0, np.exp((b_a - b_b) * (ea - eb)))
        pred = swap_acceptance(b_a, b_b, u_a, u_b, v_a, v_b)
        assert abs(pred - a.mean()) < 4 * a.std() / np.sqrt(a.size) + 1e-12, (pred, a.mean())


def test_ladder_fills_only_the_gaps_swaps_cannot_cross():
    """Helpers go into the wide, high-variance gap only, keep the given betas exactly, bring every predicted step
    up to the target, and stop at `most`."""
    from thermo_ebm.samplers.sweep import ladder, swap_acceptance
    betas = np.array([0.5, 0.55, 0.6, 2.0])
    u = np.array([10.0, 9.0, 8.0, -20.0])
    var = np.array([20.0, 20.0, 20.0, 60.0])
    full, idx, h = ladder(betas, u, var, 0.3, 100)
    assert h[0] == h[1] == 0 and h[2] > 0 and len(full) == len(betas) + h.sum()
    np.testing.assert_array_equal(full[idx], betas)
    assert np.all(np.diff(full) > 0)
    lb = np.log(full)
    uu = np.interp(lb, np.log(betas), u)
    vv = np.interp(lb, np.log(betas), var)
    assert swap_acceptance(full[1:], full[:-1], uu[1:], uu[:-1], vv[1:], vv[:-1]).min() >= 0.3
    assert ladder(betas, u, var, 0.3, 3)[2].sum() == 3
    assert ladder(betas, u, var, 0.0, 100)[2].sum() == 0


def test_ladder_puts_no_helpers_across_a_latent_heat():
    """U consistent with dU = -Var dbeta within each phase; a jump of U between 0.8 and 1.25 (as at a first-order
    switch) that the ends' variances cannot account for: that gap gets no helpers, the smooth one does."""
    from thermo_ebm.samplers.sweep import ladder, transitions
    betas = 1.0 / np.array([1.25, 0.8, 0.6])
    var = np.array([4.0, 30.0, 30.0])
    u = np.array([10.0, 10.0 - 30.0 * (betas[1] - betas[0]), 0.0])
    u[2] = u[1] - 30.0 * (betas[2] - betas[1])
    assert not transitions(betas, u, var).any()
    full, idx, h = ladder(betas, u, var, 0.3, 100)
    assert h[0] > 0 and h[1] > 0
    u_jump = u - np.array([0.0, 40.0, 40.0])  # a latent heat of 40 between T = 1.25 and 0.8
    np.testing.assert_array_equal(transitions(betas, u_jump, var), [True, False])
    h = ladder(betas, u_jump, var, 0.3, 100)[2]
    assert h[0] == 0 and h[1] > 0


def test_sweep_helpers_carry_swaps_across_a_wide_gap_and_stay_exact():
    """16-d double wells at T = 2, 1, 0.25 from equilibrated states: without helpers swaps across the cold gap are
    almost never accepted; with them every gap's acceptance reaches near the target, only the given temperatures
    are returned, and U at each stays within 4 SE of its exact value."""
    from thermo_ebm.estimators import jackknife
    from thermo_ebm.samplers.kernels import Sampler, uniform
    from thermo_ebm.samplers.sweep import run_sweep
    from thermo_ebm.testing import DoubleWells
    model, ens, d, c = DoubleWells(16), Ensemble("marginal", 1), 16, 64
    temps = np.array([2.0, 1.0, 0.25])
    betas = 1.0 / temps
    exact = model.exact(temps)["U"]
    init = mala_init(model, ens, uniform(3 * c, (d,), torch.Generator().manual_seed(0), "cpu"))
    init = run_sweep(Sampler(model, ens, (d,), torch.Generator().manual_seed(2), "cpu"), init, betas, np.full(3, 0.1),
                     n_burn=300, n_prod=300, exchange=True, thin=5).final
    kw = dict(n_burn=300, n_prod=1000, exchange=True, thin=5, max_helpers=32)
    bare = run_sweep(Sampler(model, ens, (d,), torch.Generator().manual_seed(1), "cpu"), init, betas, np.full(3, 0.1),
                     swap_target=0.0, **kw)
    r = run_sweep(Sampler(model, ens, (d,), torch.Generator().manual_seed(1), "cpu"), init, betas, np.full(3, 0.1),
                  swap_target=0.4, **kw)
    assert bare.helpers.sum() == 0 and bare.swap_accept[1] < 0.05
    assert r.helpers[1] > 0 and r.swap_accept.min() > 0.25
    assert r.chain_means.shape[:2] == (3, c) and r.u_trace.shape[1:] == (3, c) and r.final.x.shape == (3 * c, d)
    u, se = jackknife(r.chain_means, lambda m: m[..., 0])
    assert np.all(np.abs(u - exact) < 4 * se), (u, se, exact)


def _write_idx(path, a):
    """An unsigned-byte idx file of array `a` (gzip-compressed when the name ends in .gz)."""
    import gzip
    raw = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.astype(np.uint8).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(raw)


def test_mnist_idx_files_give_the_official_splits_or_split_the_test_set(tmp_path):
    """Both forms torchvision leaves (uncompressed and .gz) are read into the box [-1, 1] without warnings; with
    the test split alone, it is split 80 / 20 with a fixed permutation and the note says so."""
    import warnings
    from thermo_ebm.data import load_data
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    xt, yt = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10  # every class in either part of a split
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", xt)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", yt)
    d = load_data("mnist", tmp_path)
    assert (len(d.y_train), len(d.y_test)) == (16, 4) and "only the official mnist test split" in d.note
    x, y = rng.integers(0, 256, (30, 28, 28)), rng.permutation(30) % 10
    _write_idx(raw / "train-images-idx3-ubyte", x)
    _write_idx(raw / "train-labels-idx1-ubyte", y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load_data("mnist", tmp_path)
    assert d.note == "mnist: official train/test splits" and d.x_train.shape == (30, 1, 28, 28)
    assert torch.allclose(d.x_train[:, 0], torch.from_numpy(x / 255.0 * 2 - 1).float(), atol=1e-6)
    assert torch.equal(d.y_train, torch.from_numpy(y)) and torch.equal(d.y_test, torch.from_numpy(yt))
    _write_idx(raw / "train-labels-idx1-ubyte", y[:29])
    with pytest.raises(ThermoEBMError, match="different numbers of items"):
        load_data("mnist", tmp_path)
