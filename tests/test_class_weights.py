"""The base's class weights fitted by maximum likelihood after training (training/class_weights.py): every class's
mass E_{q_y}[exp h] against exact values on a multi-modal, non-separable tilt, the z-scores over seeds, the
maximum-likelihood moment condition, and the fit inside `train`."""
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, ndtr

from thermo_ebm.models import EBM, GaussianBase
from thermo_ebm.training.class_weights import SMCSettings, class_masses, ml_class_weights

D, K, M = 12, 3, 2
SMALL = SMCSettings(chains=32, population=4, pilot=16)


def _linear_model(seed=0):
    """A base of K classes x M components on D pixels under a linear network f(x)[k] = v_k . x + c_k (T_train 1:
    exp h = sum_k exp(v_k . x + c_k), a sum of K tilts, so h is multi-modal and couples every pixel)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(400) % K
    x = (torch.rand(400, D, generator=g) - 0.5) * 0.8 + (y[:, None] - 1) * 0.5 * torch.randn(1, D, generator=g).sign()
    base = GaussianBase(K, D, M, 1.0).fit(x.clamp(-1, 1), y)
    net = torch.nn.Linear(D, K)
    with torch.no_grad():
        net.weight.copy_(torch.randn(K, D, generator=g) * 0.6)
        net.bias.copy_(torch.randn(K, generator=g))
    return EBM(net, (D,), K, {}, base)


def _exact_log_masses(model):
    """log E_{q_y}[exp h] [K]: per component and tilt k the box-truncated normal's moment generating function."""
    mu, sd = (t.numpy() for t in model.base.components_moments())             # [K M, D]
    v, c = model.net.weight.detach().double().numpy(), model.net.bias.detach().double().numpy()
    mass = np.log(ndtr((1 - mu) / sd) - ndtr((-1 - mu) / sd))                 # [KM, D]
    s = v[:, None, :]                                                         # [K tilts, 1, D]
    shifted = np.log(ndtr((1 - mu - sd ** 2 * s) / sd) - ndtr((-1 - mu - sd ** 2 * s) / sd))
    log_mgf = (mu * s + 0.5 * sd ** 2 * s ** 2 + shifted - mass).sum(-1)      # [K tilts, KM]
    per_comp = logsumexp(c[:, None] + log_mgf, 0)                             # [KM]
    within = torch.log_softmax(model.base.logw.double().reshape(K, M), -1).numpy()
    return logsumexp(within + per_comp.reshape(K, M), 1)


def test_class_masses_match_exact_values():
    model = _linear_model()
    exact = _exact_log_masses(model)
    assert np.ptp(exact) > 1.0  # the classes' masses differ: the fit has something to do
    est, se, stages = class_masses(model, 1.0, torch.Generator().manual_seed(3), SMALL)
    assert stages > 1 and np.all(se > 0)
    assert np.all(np.abs(est - exact) < 4 * se), ((est - exact) / se, se)


def test_class_mass_z_scores_are_standard_normal():
    """Over 8 seeds and 3 classes: no |z| beyond 4, mean z^2 near 1 (chi-square with 24 degrees of freedom, 99.9%
    range), mean z near 0."""
    model = _linear_model(1)
    exact = _exact_log_masses(model)
    z = np.concatenate([(lambda e: (e[0] - exact) / e[1])(class_masses(model, 1.0, torch.Generator().manual_seed(s),
                                                                         SMALL)) for s in range(8)])
    assert np.all(np.abs(z) < 4), z
    assert 0.3 < np.mean(z ** 2) < 2.1, z
    assert abs(z.mean()) < 4 / math.sqrt(len(z)), z


def test_ml_class_weights_meet_the_moment_condition():
    rng = np.random.default_rng(0)
    log_qy = rng.normal(size=(500, K)) * 3
    log_z = np.array([0.0, 7.0, -4.0])
    before = np.log(np.full(K, 1.0 / K))
    after = ml_class_weights(log_qy, log_z, before)
    resp = np.exp(after + log_qy - logsumexp(after + log_qy, 1, keepdims=True)).mean(0)
    mass = np.exp(after + log_z - logsumexp(after + log_z))
    np.testing.assert_allclose(resp, mass, atol=1e-6)
    assert logsumexp(after) == pytest.approx(0.0, abs=1e-12)

    def ll(a):
        return logsumexp(a + log_qy, 1).mean() - logsumexp(a + log_z)
    assert ll(after) > ll(before)
    for _ in range(5):  # a maximum: no nearby weights do better
        assert ll(after + rng.normal(size=K) * 0.05) <= ll(after) + 1e-12


def test_set_class_weights_keeps_each_class_mixture():
    model = _linear_model()
    x = torch.rand(50, D) * 2 - 1
    before = model.base.class_log_densities(x)
    model.base.set_class_log_weights(torch.tensor([0.1, 0.3, 0.6]).log())
    torch.testing.assert_close(model.base.class_log_densities(x), before, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.base.class_log_weights().exp(), torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    # q is sum_y w_y q_y with each q_y normalised on the box, so q stays normalised
    logq = torch.logsumexp(model.base.class_log_weights() + model.base.class_log_densities(x), -1)
    torch.testing.assert_close(logq, model.base(x)[:, 0].double(), atol=1e-4, rtol=0)


def test_draws_follow_the_draw_density_with_class_masses():
    """Once the classes' masses are set, draws pick a class by w_y exp(class_log_mass_y): in one dimension their
    empirical CDF matches the integral of draw_log_density (Kolmogorov-Smirnov), and the class shares match."""
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 2
    x = ((torch.rand(300, 1, generator=g) - 0.5) * 0.3 + torch.where(y[:, None] == 0, -0.5, 0.4)).clamp(-1, 1)
    base = GaussianBase(2, 1, 2, 1.0).fit(x, y)
    base.set_class_log_weights(torch.tensor([0.8, 0.2]).log(), torch.tensor([0.0, 2.0]))
    draws = base.sample(20_000, torch.Generator().manual_seed(1))[:, 0].double().numpy()
    grid = torch.linspace(-1, 1, 200_001)
    dens = base.draw_log_density(grid[:, None]).exp().numpy()
    gx = grid.double().numpy()
    cdf = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(gx))])
    assert cdf[-1] == pytest.approx(1, abs=1e-4)
    assert stats.kstest(draws, lambda v: np.interp(v, gx, cdf)).pvalue > 1e-3
    share = 0.2 * math.exp(2.0) / (0.8 + 0.2 * math.exp(2.0))  # class 1's share of the draws
    assert abs((draws > 0).mean() - share) < 4 * math.sqrt(share * (1 - share) / len(draws))


def test_train_fits_the_class_weights_and_records_them(tmp_path):
    import json

    import xarray as xr

    from thermo_ebm.files.checkpoint import load_model
    from thermo_ebm.training.loop import train
    out = train(name="c", dataset="digits", objective="j_ebm", epochs=1, max_steps=20, batch_size=32, buffer_size=256,
                mc_steps=5, model_size=16, base_components=2, checkpoint_dir=str(tmp_path),
                results_dir=str(tmp_path), progress=False)
    model = load_model(out["checkpoint"])
    hist = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
    weights = np.array(json.loads(hist.attrs["base_class_weights"]))
    np.testing.assert_allclose(weights, out["base_class_weights"])
    np.testing.assert_allclose(model.base.class_log_weights().exp().numpy(), weights, rtol=1e-5)
    log_z = np.array(json.loads(hist.attrs["base_class_log_mass"]))
    np.testing.assert_allclose(model.base.class_log_mass.double().numpy(), log_z, rtol=1e-5)
    assert np.all(np.array(json.loads(hist.attrs["base_class_log_mass_se"])) > 0)
    assert hist.attrs["base_class_fit_gain"] >= -1e-9  # maximum likelihood from the weights it started at
    # the moment condition: each class's mass at T_train equals its responsibility for the training images
    from thermo_ebm.data import load_data
    data = load_data("digits", "data", None, 0.0)
    dens = model.base.class_log_densities(data.x_train).numpy()
    la = np.log(weights)
    resp = np.exp(la + dens - logsumexp(la + dens, 1, keepdims=True)).mean(0)
    np.testing.assert_allclose(json.loads(hist.attrs["base_class_model_mass"]), resp, atol=1e-5)
    # and without the fit the base keeps the data's weights
    out = train(name="d", dataset="digits", objective="j_ebm", epochs=1, max_steps=5, batch_size=32, buffer_size=256,
                mc_steps=5, model_size=16, base_components=2, fit_class_weights=False, checkpoint_dir=str(tmp_path),
                results_dir=str(tmp_path), progress=False)
    assert out["base_class_weights"] is None and not load_model(out["checkpoint"]).base.class_log_mass.any()


def test_a_base_saved_before_the_masses_loads_as_not_estimated():
    model = _linear_model()
    model.base.class_log_mass.fill_(3.0)
    state = {k: v for k, v in model.state_dict().items() if k != "base.class_log_mass"}
    fresh = _linear_model()
    fresh.base.class_log_mass.fill_(5.0)
    fresh.load_state_dict(state)
    assert not fresh.base.class_log_mass.any()
    torch.testing.assert_close(fresh.base.draw_log_weights(), fresh.base.logw.double())


def test_a_resumed_run_keeps_its_base_and_may_switch_the_fit(tmp_path):
    """A run resumed from a checkpoint keeps its base's components and may turn the class-weight fit on."""
    from thermo_ebm.files.checkpoint import load_model
    from thermo_ebm.training.loop import train
    kw = dict(name="r", dataset="digits", objective="j_ebm", epochs=1, batch_size=32, buffer_size=256, mc_steps=3,
              model_size=16, base_components=2, checkpoint_dir=str(tmp_path), results_dir=str(tmp_path),
              progress=False)
    first = train(max_steps=3, fit_class_weights=False, **kw)
    before = load_model(first["checkpoint"]).base.state_dict()
    second = train(max_steps=6, resume=True, fit_class_weights=True, **kw)
    after = load_model(second["checkpoint"]).base
    assert second["steps"] == 6 and second["base_class_weights"] is not None
    for key in ("centre", "prec", "lin"):  # the components are the first run's
        torch.testing.assert_close(after.state_dict()[key], before[key])
    assert after.class_log_mass.any()
