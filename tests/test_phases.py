"""Phases that annealing from uniform cannot reach: the data-informed base, the two origins compared, the
training-temperature units, against systems with exact answers."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm

from thermo_ebm import ThermoEBMError, measure
from thermo_ebm.samplers.base import KernelBase
from thermo_ebm.samplers.bridge import run_bridge
from thermo_ebm.samplers.paths import Bridge, resample
from thermo_ebm.samplers.gaussians import GaussMixture
from thermo_ebm.samplers.kernels import Sampler
from thermo_ebm.files.checkpoint import training_temperature
from thermo_ebm.ensembles import Ensemble
from thermo_ebm.testing import ModeSwitch, RotatedGaussian, TruncatedGaussian

TEMPS = [0.5, 0.75, 1.0, 1.5, 2.0]
FLAGS = ("flag_nonfinite", "flag_low_acceptance", "flag_low_ess", "flag_heavy_tails", "flag_poor_mixing",
         "flag_inconsistent", "flag_rare_phase", "flag_hysteresis")


def _z(ds, key, exact):
    """z-score; an SE below float precision (e.g. H(Y|X) ~ 1e-21 bits deep inside separated modes, exact
    7.5e-8) counts as 1e-6, so only a difference beyond float-level precision can fail."""
    est, se = ds[key].values, ds[key + "_err"].values
    return (est - exact) / np.maximum(se, 1e-6)


@pytest.fixture(scope="module", params=[("joint", 16), ("marginal", 16), ("joint", 64)],
                ids=["modeswitch16-joint", "modeswitch16-marginal", "modeswitch64-joint"])
def switched(request):
    ens, d = request.param
    system = ModeSwitch(d)
    x, _ = system.sample(min(TEMPS), 2000, seed=1)  # "data": exact draws of the lowest temperature
    ds = measure(system, TEMPS, ensemble=ens, data=x, device="cpu", seed=1)
    return d, system.exact(TEMPS, ens), ds


def test_mode_switch_with_data_is_right_or_flagged(switched):
    """Every quantity within 4 SE of exact at every temperature, or that temperature flagged. At d = 16 no
    flag may excuse a miss; the joint d = 16 system is also checked for the joint information quantities."""
    d, exact, ds = switched
    flagged = np.any([ds[f].values for f in FLAGS if f in ds], axis=0)
    for key, value in exact.items():
        z = _z(ds, key, value)
        ok = np.abs(z) < 4 if d == 16 else (np.abs(z) < 4) | flagged.reshape(-1, *[1] * (z.ndim - 1))  # p_y: [T, K]
        assert np.all(ok), f"d={d} {key}: z = {np.round(z, 2)}, flagged {flagged}"
    others = [ds[f].values[0] for f in FLAGS if f != "flag_hysteresis"]
    assert not any(others), "the lowest temperature (where the data live) must be measured, not flagged"


def test_mode_switch_forward_miss_is_seen_and_not_flagged(switched):
    """Annealing from uniform misses the narrow deep modes below the transition (log_Z_forward far below the
    exact value). The data-seeded anneal finds them, and its numbers there are right (the test above), so the
    miss shows in origin_gap (the data-seeded log Z beyond 4 SE higher) and raises no hysteresis flag."""
    d, exact, ds = switched
    z_fwd = (ds.log_Z_forward.values - exact["log_Z"]) / ds.log_Z_forward_err.values
    assert np.all(z_fwd[:2] < -10), z_fwd  # T = 0.5, 0.75: the forward anneal never enters the narrow modes
    assert np.all(ds.origin_gap.values[:2] > 4 * ds.origin_gap_err.values[:2])
    assert not ds.flag_hysteresis.values[:2].any()
    assert ds.flag_hysteresis.values[-1] == 0  # T = 2: the wide modes hold the mass, both origins agree
    assert ds.attrs["log_Z_source"] == "data-seeded anneal"


def _lower_reported_weights(monkeypatch, nats):
    """Fault injection: the reported data-seeded anneal's log-weights lowered by `nats` at T = 1 (a check base's,
    which passes its chain count, left as they are). Returns a single-phase system, TruncatedGaussian(16), and
    500 exact draws of it at T = 1 as data."""
    import thermo_ebm.measurement.anneal as anneal
    inner = anneal._anneal_from_data

    def lossy(p, fwd, step0, s, total=None):
        states, rec = inner(p, fwd, step0, s, total)
        if total is None:
            rec.logw[1] -= nats  # [T, N], ascending beta: T = 1
        return states, rec
    monkeypatch.setattr(anneal, "_anneal_from_data", lossy)
    system = TruncatedGaussian(16, seed=2)
    a, b = (-1 - system.m) / system.s, (1 - system.m) / system.s
    x = truncnorm.rvs(a, b, loc=system.m, scale=system.s, size=(500, 16), random_state=0)
    return system, torch.tensor(x, dtype=torch.float32)


def test_a_data_seeded_anneal_that_lost_mass_is_flagged(monkeypatch):
    """Fault injection: the data-seeded weights of a single-phase system lowered by 3 nats at the middle
    temperature, as if that anneal had missed a phase holding 95% of Z. The anneal from uniform then finds more
    mass there: flag_hysteresis at that temperature alone, and the reported log Z is the lowered one."""
    system, x = _lower_reported_weights(monkeypatch, 3.0)
    temps = [0.5, 1.0, 2.0]
    ds = measure(system, temps, data=x, device="cpu", seed=3)
    exact = system.exact(temps)["log_Z"]
    assert ds.flag_hysteresis.values.tolist() == [0, 1, 0]
    assert abs((ds.log_Z.values[1] - exact[1]) + 3.0) < 4 * ds.log_Z_err.values[1]


def test_a_check_base_flags_a_reported_anneal_that_lost_mass(monkeypatch):
    """Fault injection: the reported data-seeded weights of a single-phase system lowered by 30 nats at the middle
    temperature, as if its base had missed a phase holding all but e^-30 of Z; the check base (check_chains, its
    own reference states, pilot and random stream) is left as it is. Its replicas then exceed the reported log Z
    far beyond chance: base_gap above 9 nats and flag_hysteresis at that temperature alone."""
    system, x = _lower_reported_weights(monkeypatch, 30.0)
    ds = measure(system, [0.5, 1.0, 2.0], data=x, device="cpu", seed=3, check_chains=128, chains=16, burn_in=100,
                 samples=200, reverse_steps=50, mbar=False)
    gap = ds.base_gap.values
    assert gap[1] > 9.0 and np.all(gap[[0, 2]] < 0.0), gap
    assert ds.flag_hysteresis.values.tolist() == [0, 1, 0]


def test_a_check_base_changes_no_estimate_and_raises_no_false_alarm():
    """The check base runs on its own random stream: with it every reported number is the same to the bit. On the
    two-phase ModeSwitch(16) with exact data at the lowest temperature, the reported log Z is right, so the check
    never contradicts it (base_gap far below 9 nats at every temperature)."""
    system = ModeSwitch(16)
    x, _ = system.sample(0.5, 1000, seed=1)
    budget = dict(ais_chains=128, replicas=8, chains=16, burn_in=50, samples=150, reverse_steps=50, mbar=False,
                  reference_steps=100, gauss_refs=64, crosscheck_steps=2000, bridge_chains=128)
    temps = [0.5, 2.0]
    plain = measure(system, temps, ensemble="joint", data=x, device="cpu", seed=4, **budget)
    checked = measure(system, temps, ensemble="joint", data=x, device="cpu", seed=4, check_chains=128, **budget)
    for key in ("log_Z", "log_Z_err", "U", "C", "I_XY_bits"):
        assert np.array_equal(plain[key].values, checked[key].values), key
    assert "base_gap" not in plain and np.all(checked.base_gap.values < 0.0), checked.base_gap.values
    assert np.array_equal(plain.flag_hysteresis.values, checked.flag_hysteresis.values)


def test_data_does_not_raise_false_alarms_on_a_single_phase():
    """A 64-d box Gaussian with exact data at the lowest temperature: within 4 SE, and the two origins agree."""
    system = TruncatedGaussian(64, seed=2)
    sd = system.s * math.sqrt(0.5)
    a, b = (-1 - system.m) / sd, (1 - system.m) / sd
    x = truncnorm.rvs(a, b, loc=system.m, scale=sd, size=(500, 64), random_state=0)
    ds = measure(system, [0.5, 1.0, 2.0], data=torch.tensor(x, dtype=torch.float32), device="cpu", seed=3)
    exact = system.exact([0.5, 1.0, 2.0])
    for key, value in exact.items():
        assert np.all(np.abs(_z(ds, key, value)) < 4), key
    assert not ds.flag_hysteresis.values.any() and not ds.flag_inconsistent.values.any()
    assert np.all(np.abs(ds.origin_gap.values / ds.origin_gap_err.values) < 4)


@pytest.mark.heavy
def test_ill_conditioned_rotated_gaussian_pays_for_information_once():
    """d = 64, variance condition number 400, ~350 bits at T = 1 (380 at T = 0.5): with exact data at T = 0.5
    the base's fitted Gaussian makes the path short, the anneal from uniform is capped (a one-sided cross-check;
    capped at 5,000 betas, where it lies ~60 nats low, not at the default 20,000 with ~6: the same rule, a harder
    case for false alarms, in 60% of the time), and every quantity lands within 4 SE at each temperature or is
    flagged there."""
    system = RotatedGaussian(64, cond=400.0)
    temps = [0.5, 1.0, 2.0]
    exact = system.exact(temps)
    assert 340 < exact["info_bits"][1] < 360
    ds = measure(system, temps, data=system.sample(0.5, 2000, seed=2), device="cpu", seed=4, crosscheck_steps=5000)
    assert ds.attrs["ais_schedule_capped"] == 1 and ds.attrs["ais_schedule_length"] <= 5003
    assert ds.attrs["bridge_schedule_length"] < 5000
    flagged = np.any([ds[f].values for f in FLAGS], axis=0)
    for key, value in exact.items():
        z = _z(ds, key, value)
        assert np.all((np.abs(z) < 4) | flagged), (key, z, flagged)
    assert flagged.sum() <= 1
    assert np.all(ds.log_Z_forward.values < exact["log_Z"])  # capped from uniform: low, and not a false alarm


def test_rotated_gaussian_exact_values_and_sampler():
    """The closed form against a direct computation: log Z by importance sampling from its own exact draws
    would be circular, so check U = <E> and Var E from draws, and log Z against the Gaussian integral."""
    system = RotatedGaussian(8, cond=100.0, sd_max=0.05)
    x = system.sample(1.5, 200_000, seed=0)
    e = -system(x)[:, 0].double()
    exact = system.exact([1.5])
    assert abs(float(e.mean()) - exact["U"][0]) < 4 * float(e.std()) / math.sqrt(len(e))
    assert abs(float(e.var()) / 1.5 ** 2 - exact["C"][0]) < 0.05 * exact["C"][0]
    prec = system.prec.double().numpy()
    direct = 0.5 * 8 * math.log(2 * math.pi * 1.5) - 0.5 * np.linalg.slogdet(prec)[1]
    assert exact["log_Z"][0] == pytest.approx(direct, abs=1e-6)


def _base_with_mixture():
    """A 2-d base: one kernel (0.3), a two-component low-rank-plus-diagonal Gaussian mixture (0.5; components 0.7
    and 0.3), uniform (0.2). Returns the base and the mixture."""
    centres = torch.tensor([[[0.5, -0.2]]], dtype=torch.float64)
    sigma = torch.tensor([[[0.3, 0.2]]], dtype=torch.float64)
    mean = torch.tensor([[[0.1, 0.2], [-0.4, -0.3]]], dtype=torch.float64)
    diag = torch.tensor([[[0.05, 0.02], [0.01, 0.04]]], dtype=torch.float64)
    factor = torch.tensor([[[[0.2], [0.25]], [[-0.15], [0.1]]]], dtype=torch.float64)
    mix = GaussMixture(torch.tensor([[0.7, 0.3]], dtype=torch.float64), mean, diag, factor)
    return KernelBase(centres, sigma, torch.tensor([[0.3, 0.5, 0.2]]), (mix,)), mix


def test_kernel_base_with_a_fitted_mixture_is_normalised(monkeypatch):
    """Kernels + a two-component low-rank-plus-diagonal Gaussian mixture (normalised on R^2) + uniform: q
    integrates to w_kernels + w_u + w_g sum_c pi_c P_c(box) on the box, its gradient matches finite differences,
    and draws of each component have its moments."""
    from scipy.stats import multivariate_normal
    g = torch.Generator().manual_seed(0)
    base, mix = _base_with_mixture()
    mean, diag, factor = mix.mean, mix.diag, mix.factor
    n = 801
    h = 2.0 / n
    c = torch.linspace(-1 + h / 2, 1 - h / 2, n, dtype=torch.float64)
    grid = torch.cartesian_prod(c, c)
    lq, grad = base.log_prob(grid)
    covs = [torch.diag(diag[0, k]) + factor[0, k] @ factor[0, k].T for k in range(2)]
    p_box = 0.0
    for k, pi in enumerate((0.7, 0.3)):
        mvn = multivariate_normal(mean[0, k].numpy(), covs[k].numpy())
        p_box += pi * (mvn.cdf([1, 1]) - mvn.cdf([-1, 1]) - mvn.cdf([1, -1]) + mvn.cdf([-1, -1]))
    assert abs(float(lq.exp().sum() * h * h) - (0.5 + 0.5 * p_box)) < 2e-4
    x0 = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    eps = 1e-6  # against the float64 products (finite differences of float32 ones would be rounding)
    monkeypatch.setattr("thermo_ebm.samplers.gaussians.ROUNDING_TOL", -1.0)
    fd = [(base.log_prob(x0 + eps * e)[0] - base.log_prob(x0 - eps * e)[0]) / (2 * eps) for e in torch.eye(2, dtype=torch.float64)]
    np.testing.assert_allclose(base.log_prob(x0)[1][0].numpy(), torch.cat(fd).numpy(), rtol=1e-6)
    which = torch.tensor([[0] * 50_000 + [1] * 50_000])
    xs = mix.sample(which, g)[0]
    for k in range(2):
        xk = xs[which[0] == k]
        se = xk.std(0) / math.sqrt(len(xk))
        assert torch.all((xk.mean(0) - mean[0, k]).abs() < 4 * se)
        assert torch.allclose(torch.cov(xk.T), covs[k], atol=0.004)


def test_stratified_draws_keep_the_law_of_the_base_and_fix_each_populations_mix():
    """Components allotted by systematic sampling within runs of 32 chains: each draw's component still has the
    base's law (per-slot frequencies over 4,000 repeats: z-scores within 4.5, SD about 1), each run holds every
    component within 1 of its expected count, and draws of a base with kernels, a fitted mixture and uniform
    have q's mass and mean on the box (grid integrals) as independent draws do."""
    from thermo_ebm.samplers.base import stratified
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([[0.1, 0.25, 0.05, 0.6], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    reps, n, block = 4000, 80, 32  # runs of 32, 32 and 16 draws
    picks = torch.stack([stratified(w, n, block, g) for _ in range(reps)])           # [reps, G, n]
    freq = torch.nn.functional.one_hot(picks, 4).double().mean(0)                       # [G, n, K]
    live = (w > 0)[:, None, :].expand_as(freq)
    z = ((freq - w[:, None]) / torch.sqrt(w * (1 - w) / reps)[:, None])[live & (w < 1)[:, None, :]]
    assert z.abs().max() < 4.5 and 0.85 < z.std() < 1.15, (z.abs().max(), z.std())
    for start, size in ((0, 32), (32, 32), (64, 16)):
        counts = torch.nn.functional.one_hot(picks[..., start:start + size], 4).sum(-2).double()
        assert torch.all((counts - size * w).abs() < 1 + 1e-9)
    base, _ = _base_with_mixture()
    k = 401
    h = 2.0 / k
    c = torch.linspace(-1 + h / 2, 1 - h / 2, k, dtype=torch.float64)
    grid = torch.cartesian_prod(c, c)
    q = base.log_prob(grid)[0].exp() * h * h
    exact = torch.cat([q.sum()[None], (q[:, None] * grid).sum(0)])                     # P(box), E[x 1_box]
    for blk in (None, 40):
        x, comp = base.sample(200_000, g, blk)
        inside = (x.abs() <= 1).all(-1, keepdim=True).double()
        vals = torch.cat([inside, x * inside], -1)
        se = vals.std(0) / math.sqrt(len(x))
        assert torch.all((vals.mean(0) - exact).abs() < 4 * se + 2e-4), (blk, vals.mean(0), exact)
        if blk is not None:  # the kernel, the mixture and uniform: 12, 20 and 8 of every 40
            counts = torch.stack([(comp[0, i:i + 40, None] == torch.arange(3)).sum(0) for i in range(0, 400, 40)])
            assert torch.equal(counts, torch.tensor([[12, 20, 8]] * 10))


def test_fitted_mixture_recovers_low_rank_classes_and_its_density_is_exact():
    """`gaussians.fit` on exact draws of two 40-d classes with covariance s^2 (I + rank-3 stretch): weights,
    means and covariances come back within sampling error, and log_components equals scipy's log density."""
    from scipy.stats import multivariate_normal
    from thermo_ebm.samplers.gaussians import fit
    rng = np.random.default_rng(1)
    d, n = 40, 3000
    truth = []
    xs, ys = [], []
    for k, (frac, s) in enumerate(((0.6, 0.1), (0.4, 0.2))):
        q = np.linalg.qr(rng.normal(size=(d, 3)))[0]
        cov = s * s * (np.eye(d) + q @ np.diag([9.0, 4.0, 2.0]) @ q.T)
        mu = rng.normal(size=d) * 0.3
        m = int(frac * n)
        xs.append(rng.multivariate_normal(mu, cov, size=m))
        ys.append(np.full(m, k))
        truth.append((frac, mu, cov))
    x = torch.tensor(np.concatenate(xs))[None]
    mix = fit(x, torch.tensor(np.concatenate(ys))[None], 3, rank=8)
    np.testing.assert_allclose(mix.weights[0].numpy(), [0.6, 0.4, 0.0])
    for k, (frac, mu, cov) in enumerate(truth):
        sd = np.sqrt(np.diag(cov) / (frac * n))
        assert np.all(np.abs(mix.mean[0, k].numpy() - mu) < 4.5 * sd)
        fitted = torch.diag(mix.diag[0, k]) + mix.factor[0, k] @ mix.factor[0, k].T
        assert np.linalg.norm(fitted.numpy() - cov) / np.linalg.norm(cov) < 0.15
        probe = torch.tensor(rng.multivariate_normal(mu, cov, size=5))[None]
        logs, _ = mix.log_components(probe)
        ref = np.log(mix.weights[0, k].item()) + multivariate_normal(mix.mean[0, k].numpy(), fitted.numpy()).logpdf(probe[0].numpy())
        np.testing.assert_allclose(logs[0, :, k].numpy(), ref, rtol=0, atol=1e-4)  # float32 products


def test_fit_resolves_every_direction_when_the_states_do():
    """Where the states resolve all D directions (D below `rank`, many states), no variance is left for the rest:
    `fit` returns a finite mixture whose covariance is the states' (within sampling error, plus the diagonal's
    floor), whatever the sign of the rounding in var.sum() - lam.sum()."""
    from thermo_ebm.samplers.gaussians import VAR_FLOOR, fit
    rng = np.random.default_rng(4)
    d, n = 16, 4000
    a = rng.normal(size=(d, d)) * 0.1
    cov = a @ a.T + 0.01 * np.diag(np.linspace(0.1, 1, d))
    x = torch.tensor(rng.multivariate_normal(np.zeros(d), cov, size=n))
    for scale in (1.0, 1.0 + 1e-15, 1.0 - 1e-15):  # nudges the rounding either way
        mix = fit((x * scale)[None], torch.zeros(1, n, dtype=torch.long), 1, rank=20)
        assert mix.factor.shape[-1] == d and bool(torch.isfinite(mix.factor).all())
        fitted = (torch.diag(mix.diag[0, 0]) + mix.factor[0, 0] @ mix.factor[0, 0].T).numpy()
        sample = np.cov(x.numpy().T)
        np.testing.assert_allclose(fitted - np.diag(VAR_FLOOR * np.diag(sample)), sample, rtol=0,
                                   atol=1e-9)


def test_fit_takes_the_variance_along_directions_the_data_resolve():
    """A few correlated states (60, counted as 6 chains) cannot resolve a 200-d mode's stretched directions, so
    `fit` alone leaves the base isotropic there (a base narrower than the target: heavy-tailed weights); with the
    directions of 2,000 independent draws (`directions`), the variance along each true stretched direction comes
    back within the states' sampling error."""
    from thermo_ebm.samplers.gaussians import directions, fit
    rng = np.random.default_rng(3)
    d, s = 200, 0.1
    q = np.linalg.qr(rng.normal(size=(d, 3)))[0]
    stretch = np.array([30.0, 20.0, 10.0])
    cov = s * s * (np.eye(d) + q @ np.diag(stretch) @ q.T)
    data = torch.tensor(rng.multivariate_normal(np.zeros(d), cov, size=2000))
    states = torch.tensor(rng.multivariate_normal(np.zeros(d), cov, size=60))[None]
    labels = torch.zeros(1, 60, dtype=torch.long)
    known = directions(data, torch.zeros(2000, dtype=torch.long), 1)
    assert known.shape == (1, d, 32) and int((known.abs().sum(1) > 0).sum()) >= 3
    exact = s * s * (1 + stretch)

    def along(mix):
        fitted = (torch.diag(mix.diag[0, 0]) + mix.factor[0, 0] @ mix.factor[0, 0].T).numpy()
        return np.einsum("dj,de,ej->j", q, fitted, q) / exact
    alone, informed = along(fit(states, labels, 1, per_chain=10)), along(fit(states, labels, 1, per_chain=10, known=known))
    assert np.all(alone < 0.2), alone
    # 60 states: a variance's relative SE is sqrt(2 / 59) = 0.18; the data's directions are ~99% aligned
    assert np.all(np.abs(informed - 1) < 4 * np.sqrt(2 / 59)), informed
    assert fit(states, labels, 1, per_chain=10, rank=2, known=known).factor.shape[-1] == 2  # at most `rank` directions


def test_kernel_base_is_an_exact_normalised_density(monkeypatch):
    """q on [-1,1]^2 integrates to 1 on a fine grid, its gradient matches finite differences, and its draws
    have the grid's moments."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[[0.9, -0.2], [-0.5, 0.99], [0.0, 0.0]]], dtype=torch.float64)
    sigma = torch.tensor([[[0.3, 0.1], [0.2, 0.5], [1.5, 0.05]]], dtype=torch.float64)
    base = KernelBase(centres, sigma, torch.tensor([[0.3, 0.3, 0.2, 0.2]]))
    n = 801
    h = 2.0 / n
    c = torch.linspace(-1 + h / 2, 1 - h / 2, n, dtype=torch.float64)
    grid = torch.cartesian_prod(c, c)
    lq, grad = base.log_prob(grid)
    q = lq.exp()
    assert abs(float(q.sum() * h * h) - 1.0) < 2e-4
    x0 = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    eps = 1e-6  # against the float64 products (finite differences of float32 ones would be rounding)
    monkeypatch.setattr("thermo_ebm.samplers.gaussians.ROUNDING_TOL", -1.0)
    fd = [(base.log_prob(x0 + eps * e)[0] - base.log_prob(x0 - eps * e)[0]) / (2 * eps) for e in torch.eye(2, dtype=torch.float64)]
    np.testing.assert_allclose(base.log_prob(x0)[1][0].numpy(), torch.cat(fd).numpy(), rtol=1e-6)
    xs, comp = base.sample(200_000, g)
    assert xs.abs().max() <= 1.0 and comp.max() == 3
    mean_grid = (q[:, None] * grid).sum(0) * h * h
    se = xs.std(0) / math.sqrt(len(xs))
    assert torch.all((xs.mean(0) - mean_grid).abs() < 4 * se)


def _kernel_log_q(centres, sigma, weights, x):
    """log q of kernels + uniform (no fitted mixture) formed directly in float64: the reference."""
    r2 = math.sqrt(2.0)
    mass = 0.5 * (torch.erf((1 - centres) / (sigma * r2)) - torch.erf((-1 - centres) / (sigma * r2)))
    log_k = (-torch.log(sigma) - 0.5 * math.log(2 * math.pi) - torch.log(mass)).sum(-1)             # [1, M]
    w = weights / weights.sum()
    d = x.shape[-1]
    quad = (((x[:, None, :] - centres[0][None]) / sigma[0][None]) ** 2).sum(-1)                    # [n, M]
    comps = torch.cat([torch.log(w[0, :-1]) + log_k[0] - 0.5 * quad,
                       (torch.log(w[0, -1]) - d * math.log(2.0)).expand(len(x), 1)], 1)
    return torch.logsumexp(comps, 1)


def test_kernel_base_float32_products_and_their_float64_fallback(monkeypatch):
    """At d = 784 the quadratic forms are float32 products on centred coordinates: log q within 0.01 nats of the
    float64 formula, mean error below 1e-3. Narrow kernels far from the centre would make them wrong by nats (shown
    with the fallback switched off); their rounding bound sends the group to float64 (within 1e-5 nats)."""
    rng = torch.Generator().manual_seed(0)
    d, m = 784, 32

    def case(spread, sig, n=256):
        centres = (torch.rand((1, m, d), generator=rng, dtype=torch.float64) * 2 - 1) * spread
        sigma, weights = torch.full_like(centres, sig), torch.ones(1, m + 1, dtype=torch.float64)
        k = torch.randint(m, (n,), generator=rng)
        x = (centres[0, k] + sig * torch.randn((n, d), generator=rng, dtype=torch.float64)).clamp(-1, 1).float()
        return KernelBase(centres, sigma, weights), x, _kernel_log_q(centres, sigma, weights, x.double())

    base, x, ref = case(0.5, 0.1)
    lq = base.log_prob(x)[0]
    err = (lq - ref).abs()
    assert err.max() < 1e-2 and err.mean() < 1e-3, err.max()
    with monkeypatch.context() as mp:  # these were float32 products: float64 ones differ (by rounding)
        mp.setattr("thermo_ebm.samplers.gaussians.ROUNDING_TOL", -1.0)
        assert (base.log_prob(x)[0] - lq).abs().max() > 0
    base, x, ref = case(0.8, 1e-3)
    assert (base.log_prob(x)[0] - ref).abs().max() < 1e-5
    monkeypatch.setattr("thermo_ebm.samplers.gaussians.ROUNDING_TOL", math.inf)
    assert (base.log_prob(x)[0] - ref).abs().max() > 1.0


def test_bridge_from_the_exact_target_has_zero_variance_weights():
    """With q_t equal to p_beta (one kernel, the box Gaussian at beta; negligible uniform weight) every chain's
    weight is exactly Z(beta): the path, the MALA kernel and the normalisation are consistent."""
    system = TruncatedGaussian(8, seed=0)
    betas = np.array([1.0, 2.0])
    mu = torch.tensor(system.m)[None, None].repeat(2, 1, 1)
    sig = torch.stack([torch.tensor(system.s / math.sqrt(b)) for b in betas])[:, None]
    base = KernelBase(mu, sig, torch.tensor([[1 - 1e-12, 1e-12]] * 2))
    lam = np.repeat(np.linspace(0, 1, 21)[:, None], 2, 1)
    s = Sampler(system, Ensemble("marginal", 1), (8,), torch.Generator().manual_seed(0), "cpu")
    res = run_bridge(s, base, betas, lam, np.full_like(lam, 0.2), np.ones_like(lam), n_chains=64, n_keep=4, pop=8)
    exact = system.exact(1 / betas)
    np.testing.assert_allclose(res.logw.numpy(), exact["log_Z"][:, None].repeat(64, 1), atol=2e-4)


def test_bridge_paths_of_their_own_lengths_leave_the_batch_when_done(monkeypatch):
    """Each temperature anneals over its own number of lambdas (its own 8 L^2): the short path's chains leave the
    batch at lambda = 1, so the anneal evaluates n (G + m sum_t K_t) states with m move pairs per lambda, and every
    group's results (log-weights, energies, states) come back in its own place: with q_t = p_beta_t each weight is
    exactly that group's Z."""
    system = TruncatedGaussian(8, seed=0)
    betas = np.array([1.0, 2.0, 4.0])
    mu = torch.tensor(system.m)[None, None].repeat(3, 1, 1)
    sig = torch.stack([torch.tensor(system.s / math.sqrt(b)) for b in betas])[:, None]
    base = KernelBase(mu, sig, torch.tensor([[1 - 1e-12, 1e-12]] * 3))
    n_steps = np.array([7, 20, 3])
    lam = np.ones((21, 3))
    for t, k in enumerate(n_steps):
        lam[:k + 1, t] = np.linspace(0, 1, k + 1)
    s = Sampler(system, Ensemble("marginal", 1), (8,), torch.Generator().manual_seed(0), "cpu")
    seen = []
    evaluate = Bridge.evaluate
    monkeypatch.setattr(Bridge, "evaluate", lambda self, x: (seen.append(len(x)), evaluate(self, x))[1])
    res = run_bridge(s, base, betas, lam, np.full_like(lam, 0.2), np.ones_like(lam), n_steps, n_chains=32, n_keep=4,
                     pop=8)
    assert sum(seen) == 32 * (3 + n_steps.sum())
    exact = system.exact(1 / betas)
    np.testing.assert_allclose(res.logw.numpy(), exact["log_Z"][:, None].repeat(32, 1), atol=2e-4)
    u = res.energy.numpy().mean(1)  # chains drawn from p_beta_t: the right group's mean energy
    se = res.energy.numpy().std(1) / math.sqrt(32)
    assert np.all(np.abs(u - exact["U"]) < 5 * se), (u, exact["U"], se)
    assert res.states.x.shape[0] == 3 * 4 and np.all(res.accept.numpy() > 0.5)
    seen.clear()  # n_moves move pairs per lambda (here MALA only: the base has no fitted directions)
    res = run_bridge(s, base, betas, lam, np.full_like(lam, 0.2), np.ones_like(lam), n_steps, n_chains=32, n_keep=4,
                     pop=8, n_moves=3)
    assert sum(seen) == 32 * (3 + 3 * n_steps.sum())
    np.testing.assert_allclose(res.logw.numpy(), exact["log_Z"][:, None].repeat(32, 1), atol=2e-4)
    assert np.all(res.accept.numpy() > 0.5) and np.all(res.accept.numpy() <= 1.0)


def test_smc_resampling_keeps_each_population_estimate():
    """Resampling a degenerate population leaves its log mean weight (its running Z estimate) unchanged, gives
    every chain that value, and copies chains in proportion to their weights (systematic: counts floor or ceil
    of N w); a population with even weights is left alone."""
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    logw = torch.cat([torch.log(w).double() + 3.0, torch.zeros(8, dtype=torch.float64)])
    idx, lw, n = resample(logw, 8, g)
    assert n == 1
    np.testing.assert_allclose(torch.logsumexp(lw.reshape(2, 8), 1).numpy(), torch.logsumexp(logw.reshape(2, 8), 1).numpy())
    assert torch.all(lw[:8] == lw[0]) and torch.equal(idx[8:], torch.arange(8, 16))
    counts = torch.bincount(idx[:8], minlength=8).numpy()
    assert np.all(np.abs(counts - 8 * w.numpy()) < 1) and counts[3:].sum() == 0
    _, lw, n = resample(torch.tensor([0.0, -math.inf, 0.0, 0.0], dtype=torch.float64), 4, g)  # ESS 3: kept
    assert n == 0 and torch.isneginf(lw[1])  # a chain outside the box keeps weight exactly 0


def test_label_mix_check_compares_sweep_and_weights_on_arrays():
    """_label_mix_z: sweep chains and data-seeded weights that split the mass between classes alike give
    |z| < 4; weights that put it on another class give z >> 4."""
    from thermo_ebm.measurement.thermo import _label_mix_z
    rng = np.random.default_rng(0)
    k, n = 4, 64
    p = np.array([0.5, 0.3, 0.2, 0.0])

    def noisy(m):
        q = np.clip(p + 0.05 * rng.standard_normal((m, k)), 0, None)
        return q / q.sum(-1, keepdims=True)
    blocks = np.concatenate([rng.standard_normal((1, n, 3)), noisy(n)[None]], -1)  # u, m2, h_y|x, p_0..p_3
    ip = slice(3, 3 + k)
    from thermo_ebm.estimators import weighted_mean

    def shares(p_y):  # the weights' per-class shares with SEs, as thermodynamics computes them for p_y
        return [weighted_mean(np.zeros((1, 128)), p_y[..., y], 16) for y in range(k)]
    same = noisy(128)[None]
    assert _label_mix_z(blocks, ip, shares(same))[0] < 4
    other = same[..., [3, 1, 2, 0]]  # class 0's mass moved to class 3
    assert _label_mix_z(blocks, ip, shares(other))[0] > 20


def test_scale_hint_when_every_temperature_is_flagged():
    from types import SimpleNamespace
    from thermo_ebm.measurement.flags import scale_hint
    p = SimpleNamespace(units="train", t_train=5e-5)
    every = {"flag_low_ess": np.array([1, 1, 0], bool), "flag_poor_mixing": np.array([0, 1, 1], bool)}
    some = {"flag_low_ess": np.array([1, 0, 0], bool), "flag_poor_mixing": np.array([0, 1, 0], bool)}
    assert "--units raw" in scale_hint(p, every)
    assert scale_hint(p, some) is None and scale_hint(SimpleNamespace(units="raw", t_train=5e-5), every) is None
    one = {"flag_low_ess": np.array([1], bool)}  # one flagged temperature: the budget, not the scale
    assert scale_hint(p, one) is None


def test_training_temperature_units_against_exact_values():
    """units='train' with T_train = 0.5: temperature T is T_raw = 0.5 T; log Z, S, C, info are the raw-scale
    values at T_raw and U, F come in units of T_train."""
    system = TruncatedGaussian(16, seed=1)
    temps = [1.0, 2.0]
    ds = measure(system, temps, t_train=0.5, data=None, device="cpu", seed=0)
    raw = system.exact([0.5, 1.0])
    np.testing.assert_allclose(ds.temperature_raw.values, [0.5, 1.0])
    assert ds.attrs["T_train"] == 0.5 and ds.attrs["temperature_units"] == "train"
    for key, scale in (("log_Z", 1.0), ("S", 1.0), ("C", 1.0), ("info_bits", 1.0), ("U", 0.5), ("F", 0.5)):
        z = (ds[key].values - raw[key] / scale) / ds[key + "_err"].values
        assert np.all(np.abs(z) < 4), (key, z)


def test_training_temperature_of_a_config():
    assert training_temperature({"objective": "j_ebm", "sgld_step": 0.05, "sgld_noise": 0.1}) == pytest.approx(0.1)
    assert training_temperature({"objective": "j_ebm", "sgld_step": 1.0, "sgld_noise": 0.01}) == pytest.approx(5e-5)
    assert training_temperature({"objective": "dcl", "sgld_step": 0.05, "sgld_noise": 0.1}) == 1.0
    assert training_temperature({"objective": "m_ebm", "sgld_step": 0.0, "sgld_noise": 0.1}) == 1.0


def test_measure_input_errors():
    system = TruncatedGaussian(4)
    with pytest.raises(ThermoEBMError, match="duplicate temperature"):
        measure(system, [1.0, 0.5, 1.0], device="cpu")
    with pytest.raises(ThermoEBMError, match="box"):
        measure(system, [1.0], data=torch.full((8, 4), 2.0), device="cpu")
    with pytest.raises(ThermoEBMError, match="shape"):
        measure(system, [1.0], data=torch.zeros(8, 5), device="cpu")
    with pytest.raises(ThermoEBMError, match="units"):
        measure(system, [1.0], units="kelvin", device="cpu")
    with pytest.raises(ThermoEBMError, match="not found"):
        measure(system, [1.0], data="missing.pt", device="cpu")


def test_label_entropy_from_weights():
    """H(Y) of p(y) = E_w[p(y|x)]: two equally weighted chains certain of different labels give 1 bit; a chain
    with weight e^-50 does not count."""
    from thermo_ebm.estimators import label_entropy
    p_y = np.tile(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), (1, 1, 1))
    h, se = label_entropy(np.zeros((1, 4)), p_y, 2)
    assert h[0] == pytest.approx(1.0) and se[0] == pytest.approx(0.0)
    h, _ = label_entropy(np.array([[0.0, -50.0, -50.0, 0.0]]), p_y, 2)
    assert h[0] < 1e-19


def test_max_time_lengthens_a_flagged_run_and_reports_what_it_spent(caplog):
    """A budget far too short flags log Z; with max_time, measure doubles its schedule until the flags clear
    (or the time would run out), records the attempts, and a flag that survives says what the next doubling
    would take."""
    import json
    import logging
    system = TruncatedGaussian(16, seed=4)
    tiny = dict(ais_chains=256, ais_steps=4, ais_steps_per_l2=0.02, replicas=16, chains=8, burn_in=100, samples=300,
                reverse_steps=20, mbar=False, data=None, device="cpu", seed=0)
    one = measure(system, [0.5, 1.0], **tiny)
    assert one.attrs["attempts"] == 1
    assert (one.flag_low_ess.values | one.flag_heavy_tails.values).any()
    more = measure(system, [0.5, 1.0], max_time=300.0, **tiny)
    settings = json.loads(more.attrs["settings"])
    assert more.attrs["attempts"] >= 3 and settings["ais_steps_per_l2"] > 0.02
    assert len(json.loads(more.attrs["attempt_seconds"])) == more.attrs["attempts"]
    stages = json.loads(more.attrs["stage_seconds"])
    assert set(stages) == {"pilot", "forward", "data_seeded", "sweep", "reverse"} and stages["sweep"] > 0
    raised = {f: more[f].values for f in FLAGS + ("flag_unconverged",) if f in more and more[f].values.any()}
    assert not raised, raised
    exact = system.exact([0.5, 1.0])
    assert np.all(np.abs(_z(more, "log_Z", exact["log_Z"])) < 4), _z(more, "log_Z", exact["log_Z"])
    with caplog.at_level(logging.WARNING, logger="thermo_ebm"):
        short = measure(system, [0.5, 1.0], max_time=1e-3, **tiny)
    assert short.attrs["attempts"] == 1
    assert any("beyond --max-time" in r.getMessage() for r in caplog.records)


def test_lengthen_doubles_the_data_seeded_moves_and_the_retry_time_follows_the_stages():
    """A flag of the anneals doubles the schedules and the data-seeded anneal's move pairs per lambda (so that
    stage costs about 4x), a mixing flag only the sweep; the retry's expected time weighs each stage's seconds by
    its growth, so a run spent in the data-seeded anneal is not expected to take only twice as long."""
    from thermo_ebm.config import MeasureConfig
    from thermo_ebm.measurement.flags import growth, lengthen
    cfg = MeasureConfig()
    assert lengthen(cfg, {"flag_heavy_tails": np.array([0, 0])}) is None
    new = lengthen(cfg, {"flag_heavy_tails": np.array([0, 1])})
    assert (new.bridge_moves, new.ais_steps_per_l2, new.samples) == (2 * cfg.bridge_moves, 2 * cfg.ais_steps_per_l2,
                                                                     cfg.samples)
    mix = lengthen(cfg, {"flag_poor_mixing": np.array([1, 0])})
    assert (mix.bridge_moves, mix.ais_steps, mix.samples) == (cfg.bridge_moves, cfg.ais_steps, 2 * cfg.samples)
    # forward, data-seeded, sweep, reverse seconds and a 2 s pilot: (2 + 2 * 10 + 4 * 100 + 5 + 2 * 1) / 118
    assert growth(cfg, new, [10.0, 100.0, 5.0, 1.0], 2.0) == pytest.approx(429.0 / 118.0)
    assert growth(cfg, mix, [10.0, 100.0, 5.0, 1.0], 2.0) == pytest.approx(123.0 / 118.0)
    smc = MeasureConfig(engine="smc")  # its data-seeded anneal grows with its chains, not with bridge_moves
    longer = lengthen(smc, {"flag_low_ess": np.array([1])})
    assert (longer.bridge_moves, longer.smc_data_chains) == (smc.bridge_moves, 2 * smc.smc_data_chains)
    assert growth(smc, longer, [10.0, 100.0, 5.0, 1.0], 2.0) == pytest.approx(229.0 / 118.0)


def _rotated_784_within_errors(temps, data_temp, seed, replicas):
    """`measure` on the rotated (non-separable) 784-d Gaussian with 2,000 exact draws at data_temp as data and
    `replicas` populations of 32 chains: every quantity within 4 SE or its temperature flagged, and log Z within
    1 nat (of ~2,000) at every temperature."""
    system = RotatedGaussian(784, cond=4.0, sd_max=0.05, seed=1)
    exact = system.exact(temps)
    ds = measure(system, temps, data=system.sample(data_temp, 2000, seed=3), device="cpu", seed=seed, ais_chains=64,
                 replicas=replicas, crosscheck_steps=2000, chains=32, burn_in=200, samples=500, reverse_steps=100,
                 bridge_chains=32 * replicas)
    flagged = np.any([ds[f].values for f in FLAGS], axis=0)
    for key, value in exact.items():
        z = _z(ds, key, value)
        assert np.all((np.abs(z) < 4) | flagged), (key, z, flagged)
    assert np.all(np.abs(ds.log_Z.values - exact["log_Z"]) < 1.0), ds.log_Z.values - exact["log_Z"]


@pytest.mark.slow
def test_non_separable_784_dimensional_system_with_data():
    """A rotated (non-separable) 784-d Gaussian on the box with an exact log Z (~4,000 to 4,700 bits of
    information): with exact data at T = 0.5, every quantity within 4 SE or its temperature flagged, and log Z
    within 1 nat of ~2,000 at every temperature. Populations of 32 chains, the size the engine is calibrated at
    (docs/estimators.md): with 16 the SE of log Z at T = 0.5 is about half the error's spread (7 seeds: z from
    -4.7 to 3.3). About 10 minutes on one core, longer than the rest of the suite on the other:
    `benchmarks/measure_accuracy.py --systems rotated_data` runs the same measurement and records it."""
    _rotated_784_within_errors([0.5, 1.0, 2.0], data_temp=0.5, seed=5, replicas=8)


@pytest.mark.heavy
def test_non_separable_784_dimensional_system_at_one_temperature():
    """The default run's d = 784 measurement: the rotated Gaussian of the slow test above at T = 1 alone, with 2,000
    exact draws there as data and 4 populations of 32 chains (same assertions). About 2.5 minutes on one core."""
    _rotated_784_within_errors([1.0], data_temp=1.0, seed=3, replicas=4)


def test_a_schedule_that_cannot_run_is_refused_with_its_length():
    """T = 1e-12 would need ~1e15 annealing betas: refused after the pilot (seconds), naming the length."""
    with pytest.raises(ThermoEBMError, match="needs .* betas .*at most 2,000,000"):
        measure(TruncatedGaussian(4), [1e-12], device="cpu", chains=8, samples=50, burn_in=10)
