"""The fixed base under a network (models.GaussianBase): an exactly normalised density on the box, exact draws,
the classifier left to the network, the penalty left to what training learns, checkpoints and chains."""
import numpy as np
import pytest
import torch
from scipy import stats

from thermo_ebm.files.checkpoint import load_model
from thermo_ebm.models import GaussianBase, build_model
from thermo_ebm.training.loop import train
from thermo_ebm.training.objectives import loss_terms


def _fitted(d=3, k=2, m=2, t=0.5, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    # two clusters per class, one of them near a face of the box (its truncation matters)
    x = (torch.rand(n, d, generator=g) - 0.5) * 0.6 + torch.where(torch.rand(n, 1, generator=g) < 0.5, -0.8, 0.3)
    return GaussianBase(k, d, m, t).fit(x.clamp(-1, 1), y)


def test_base_density_is_normalised_on_the_box():
    """int_box q = 1: a uniform Monte Carlo estimate within 4 SE (and log q the same for every class)."""
    b, t, d = _fitted(), 0.5, 3
    u = torch.rand(400_000, d, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = b(u).double()
    assert torch.equal(out[:, 0], out[:, 1])
    w = (out[:, 0] / t).exp() * 2 ** d
    assert abs(float(w.mean()) - 1) < 4 * float(w.std()) / len(w) ** 0.5, float(w.mean())


def test_base_draws_follow_its_density():
    """In one dimension the draws' empirical CDF matches the density's integral (Kolmogorov-Smirnov), and their
    log q has the mean that q-weighted quadrature gives."""
    b, t = _fitted(d=1), 0.5
    x = b.sample(20_000, torch.Generator().manual_seed(2))[:, 0].double().numpy()
    grid = torch.linspace(-1, 1, 200_001)
    q = (b(grid[:, None])[:, 0].double() / t).exp().numpy()
    cdf = np.concatenate([[0], np.cumsum((q[1:] + q[:-1]) / 2 * np.diff(grid.double().numpy()))])
    assert cdf[-1] == pytest.approx(1, abs=1e-4)
    p = stats.kstest(x, lambda v: np.interp(v, grid.double().numpy(), cdf)).pvalue
    assert p > 1e-3, p


def test_base_leaves_the_classifier_to_the_network_and_the_penalty_to_what_it_learns():
    torch.manual_seed(0)
    model = build_model("shallow", (3,), 2, size=8, base_components=2, t_base=0.5)
    model.base.load_state_dict(_fitted().state_dict())
    x = torch.rand(16, 3) * 2 - 1
    full, net = model(x), model.net(x)
    torch.testing.assert_close(full.softmax(1), net.softmax(1))
    y, xm = torch.randint(0, 2, (16,)), torch.rand(16, 3) * 2 - 1
    base_d, base_m = model.base_energy(x), model.base_energy(xm)
    for penalty in ("centred", "magnitude"):
        kw = dict(reg=0.7, joint_estimator="exact", penalty=penalty)
        _, with_base = loss_terms("j_ebm", full, y, logits_marginal=model(xm), base_data=base_d, base_marginal=base_m,
                                  **kw)
        _, net_only = loss_terms("j_ebm", net, y, logits_marginal=model.net(xm), **kw)
        _, ignoring = loss_terms("j_ebm", full, y, logits_marginal=model(xm), **kw)
        torch.testing.assert_close(with_base["reg"], net_only["reg"])  # the penalty sees the network's part
        assert not torch.allclose(ignoring["reg"], net_only["reg"])
        torch.testing.assert_close(with_base["marginal_ml"], ignoring["marginal_ml"])  # the likelihood, the whole


def test_training_with_a_base_starts_its_chains_there_and_keeps_it_in_the_checkpoint(tmp_path):
    out = train(name="b", dataset="digits", objective="j_ebm", epochs=1, max_steps=3, batch_size=32, buffer_size=256,
                mc_steps=3, model_size=16, base_components=2, checkpoint_dir=str(tmp_path), results_dir=str(tmp_path),
                progress=False)
    model = load_model(out["checkpoint"])
    assert model.base is not None and model.spec["base_components"] == 2
    import xarray as xr
    hist = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
    # the gap the penalty sets is the network's: the full energies' gap less the base's
    assert out["energy_gap"] == pytest.approx(float(np.nanmean(hist.marginal_net_gap.values)), rel=1e-6)
    assert model.base.t_base == pytest.approx(0.1 ** 2 / (2 * 0.05))  # T_train of the digits defaults
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(model(x) - model.net(x), model.base(x))
    ck = torch.load(out["checkpoint"], weights_only=True)
    buf = ck["buffers"]["marginal/x"]
    # walkers start from q (the digits' shapes), not from uniform noise: their log q is far above uniform draws'
    u = torch.rand_like(buf) * 2 - 1
    with torch.no_grad():
        assert model.base(buf).mean() > model.base(u).mean() + 10 * model.base.t_base
    # `sample` starts there too (of the label's own mixture with a label)
    from thermo_ebm.evaluation.sample import draw
    x3 = draw(model, model.base.t_base, label=3, n=16, steps=4, device="cpu")
    with torch.no_grad():
        assert model.base(x3).mean() > model.base(u).mean() + 10 * model.base.t_base
    comp = model.base.sample(200, torch.Generator().manual_seed(0), label=3)
    u3 = comp.reshape(200, -1) - model.base.centre
    nearest = (model.base.const - 0.5 * (u3 ** 2) @ model.base.prec + u3 @ model.base.lin).argmax(1)
    assert ((nearest // model.base.components) == 3).float().mean() > 0.9


def test_base_needs_enough_images_of_every_class():
    from thermo_ebm.errors import ThermoEBMError
    with pytest.raises(ThermoEBMError, match="images of every class"):
        GaussianBase(2, 3, 5, 1.0).fit(torch.rand(12, 3), torch.tensor([0] * 11 + [1]))


class _Zero(torch.nn.Module):
    """A network that adds nothing: the model is its base alone."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.new_zeros(len(x), self.k)


@pytest.mark.parametrize("ensemble", ["joint", "marginal"])
def test_measure_of_a_model_that_is_its_base_against_exact_values(ensemble):
    """A model whose network is zero is its base: p_T(x, y) proportional to q(x)^(1/T) on the train scale
    (t_base = T_train), K classes of equal logits. With one component per class and classes 40 widths apart, the
    tempered base's integral is the sum of its components' (box-truncated Gaussians, exact by erf) to far below
    float precision: log Z = log K + log int q^(1/T) (joint), or that integral plus log K / T (marginal: the
    logsumexp of K equal logits adds log K to each, on the train scale).
    `measure`'s log Z within 4 SE of it at 0.7, 1 and 1.6 T_train, unflagged. The engine anneals from kernels of
    the model's own base tempered to each temperature (measurement/anneal.model_base_kernels)."""
    from scipy.special import logsumexp
    from scipy.stats import norm
    from thermo_ebm import measure
    d, k, t = 16, 2, 0.05
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % k
    centre = torch.where(y[:, None] == 0, -0.55, 0.5) + 0.1 * torch.randn(400, d, generator=g)
    x = (centre + 0.1 * torch.randn(400, d, generator=g)).clamp(-1, 1)
    model = build_model("shallow", (d,), k, size=4, base_components=1, t_base=t)
    model.net = _Zero(k)
    model.base.fit(x, y)
    prec = model.base.prec.double().T.numpy()
    mu = model.base.centre.double().numpy() + model.base.lin.double().T.numpy() / prec
    sd, logw = prec ** -0.5, model.base.logw.double().numpy()

    def log_mass(width):
        return np.log(norm.cdf((1 - mu) / width) - norm.cdf((-1 - mu) / width))

    temps = np.array([0.7, 1.0, 1.6])
    exact = []
    for temp in temps:
        a = 1 / temp
        per = a * logw + (-a * log_mass(sd) + 0.5 * (1 - a) * np.log(2 * np.pi * sd ** 2) - 0.5 * np.log(a)
                          + log_mass(sd / np.sqrt(a))).sum(1)
        exact.append(logsumexp(per) + (np.log(k) if ensemble == "joint" else np.log(k) / temp))
    assert abs(exact[1] - np.log(k)) < 1e-6  # q is normalised
    ds = measure(model, temps, ensemble=ensemble, t_train=t, data=x, device="cpu", seed=2, heldout=None,
                 chains=32, samples=300, burn_in=100, reverse_steps=100, mbar=False, replicas=8, ais_chains=128)
    z = (ds.log_Z.values - np.array(exact)) / ds.log_Z_err.values
    assert np.all(np.abs(z) < 4), (z, ds.log_Z.values - np.array(exact))
