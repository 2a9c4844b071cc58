"""Held-out likelihood and T_ML against exact answers (likelihood.py)."""
import math

import numpy as np
import pytest
import torch

from thermo_ebm import measure
from thermo_ebm.errors import ThermoEBMError
from thermo_ebm.measurement.likelihood import dequantise, grid_levels, t_ml_root
from thermo_ebm.testing import ModeSwitch, RotatedGaussian

FAST = dict(ais_chains=128, replicas=8, chains=32, burn_in=100, samples=300,
            reverse_steps=100, mbar=False, reference_steps=200, gauss_refs=128, crosscheck_steps=3000)


def _flagged(ds, what):
    from thermo_ebm.measurement.flags import AFFECTS
    out = np.zeros(ds.sizes["temperature"], bool)
    for f, text in AFFECTS.items():
        if f in ds and (what in text or text.startswith("all")):
            out |= ds[f].values.astype(bool)
    return out


def test_t_ml_root_interpolates_and_names_the_side():
    t = np.array([0.5, 1.0, 2.0])
    u = 10 * t                      # U rises with T; E_heldout = 12 -> root at 1.2
    t_ml, se, side = t_ml_root(t, u, np.full(3, 0.1), np.full(3, 12.0), np.zeros(3))
    assert side == "inside" and t_ml == pytest.approx(1.2) and se == pytest.approx(0.1 / 10, rel=0.3)
    assert t_ml_root(t, u, np.ones(3), np.full(3, 1.0), np.zeros(3))[2] == "below"
    assert t_ml_root(t, u, np.ones(3), np.full(3, 50.0), np.zeros(3))[2] == "above"


def test_dequantisation_keeps_each_grey_level_in_its_bin():
    k = torch.arange(256).float()
    x = k / 255 * 2 - 1
    assert grid_levels(x[None]) == 256 and grid_levels(x[None] + 1e-3) is None
    xd = dequantise(x[None].repeat(50, 1), 256, torch.Generator().manual_seed(0))
    assert xd.abs().max() <= 1.0
    assert torch.equal(torch.floor((xd + 1) * 128).long(), k.long()[None].repeat(50, 1))


def test_heldout_likelihood_and_t_ml_of_a_rotated_gaussian_are_exact_within_their_errors():
    """Marginal, non-separable: log p_T(x) of exact held-out draws at T = 1 against -E(x)/T - log Z_exact(T),
    within 4 SE of log Z (the exact value is for this held-out set, so only log Z's error counts); T_ML within
    4 SE of the exact root 2 <E>_heldout / d."""
    s = RotatedGaussian(16, cond=50.0)
    temps = [0.5, 0.8, 1.0, 1.3, 2.0]
    ho = s.sample(1.0, 400, seed=3)
    ds = measure(s, temps, ensemble="marginal", heldout=ho, data=None, device="cpu", seed=2, **FAST)
    ex = s.exact(temps)
    with torch.no_grad():
        e = -s(ho)[:, 0].double().numpy()
    exact = np.array([(-e / t).mean() for t in temps]) - ex["log_Z"]
    z = (ds.log_lik_heldout.values - exact) / ds.log_Z_err.values
    assert np.all(np.abs(z[~_flagged(ds, "log_lik")]) < 4), z
    assert np.all(ds.log_lik_heldout_err.values >= ds.log_Z_err.values)  # + the held-out sampling SE
    info = (ds.log_lik_heldout.values + 16 * math.log(2)) / math.log(2)
    assert np.allclose(ds.info_heldout_bits.values, info)
    assert "bits_per_dim_heldout" not in ds and ds.attrs["heldout_levels"] == 0  # continuous states
    assert ds.attrs["T_ML_side"] == "inside"
    # the model part of T_ML's SE: SE(U) / (dU/dT), dU/dT = C
    i = int(np.searchsorted(temps, float(ds.T_ML)))
    se_model = max(ds.U_err.values[i - 1:i + 1]) / min(ds.C.values[i - 1:i + 1])
    assert abs(float(ds.T_ML) - 2 * e.mean() / 16) < 4 * se_model
    assert float(ds.T_ML_err) >= se_model * 0.5


def test_joint_heldout_likelihood_with_labels():
    """Joint: log p_T(x, y) against exact, log p_T(y | x) exactly (no log Z in it), and the x-marginal."""
    s = ModeSwitch(16)
    temps = [0.6, 0.8, 1.25]
    x, y = s.sample(0.8, 300, seed=5)
    ds = measure(s, temps, ensemble="joint", heldout=(x, y), data=s.sample(0.6, 500, seed=1)[0], device="cpu",
                 seed=1, **FAST)
    ex = s.exact(temps, "joint")
    f = s.logits64(x.double().numpy())
    b = 1.0 / np.asarray(temps)[:, None]
    fy = f[np.arange(len(y)), y.numpy()]
    from scipy.special import logsumexp
    lxy = (b * fy[None]).mean(-1) - ex["log_Z"]
    lyx = (b * fy[None] - logsumexp(b[..., None] * f[None], -1)).mean(-1)
    lx = logsumexp(b[..., None] * f[None], -1).mean(-1) - ex["log_Z"]
    ok = ~_flagged(ds, "log_lik")
    assert np.all(np.abs((ds.log_lik_xy_heldout.values - lxy) / ds.log_Z_err.values)[ok] < 4)
    assert np.all(np.abs((ds.log_lik_heldout.values - lx) / ds.log_Z_err.values)[ok] < 4)
    assert np.allclose(ds.log_lik_y_given_x_heldout.values, lyx, atol=1e-4)



def test_heldout_inputs_are_checked_before_any_work(tmp_path):
    s = RotatedGaussian(4, cond=4.0)
    with pytest.raises(ThermoEBMError, match="held-out states must have shape"):
        measure(s, [1.0], heldout=torch.zeros(5, 3), data=None, device="cpu")
    with pytest.raises(ThermoEBMError, match="held-out file not found"):
        measure(s, [1.0], heldout=str(tmp_path / "nope.pt"), data=None, device="cpu")
    with pytest.raises(ThermoEBMError, match="held-out labels"):
        measure(s, [1.0], heldout=(torch.zeros(5, 4), torch.tensor([0, 1, 0, 0, 0])), data=None, device="cpu")


def test_quick_t_ml_of_held_out_seeded_chains():
    """Training's screening estimate: on a Gaussian whose held-out draws are exact at T = 1 (T_train = 1 here),
    T_ML / T_train within 4 of its SEs of the exact root 2 <E>_heldout / d (the chains equilibrate quickly)."""
    from thermo_ebm.ensembles import Ensemble
    from thermo_ebm.measurement.likelihood import quick_t_ml
    s = RotatedGaussian(16, cond=4.0)
    x = s.sample(1.0, 64, seed=4)
    with torch.no_grad():
        exact = 2 * float((-s(x)[:, 0]).double().mean()) / 16
    t, se, side = quick_t_ml(s, Ensemble("marginal", 1), x, 1.0, torch.Generator().manual_seed(0), "cpu")
    assert side == "inside" and abs(t - exact) < 4 * se, (t, se, exact)


def test_t_ml_root_standard_error_over_repeated_draws():
    """The held-out images are the same at every temperature, so their energy's error is common to both ends of
    the bracket: over 4,000 draws of U [T] (independent errors) and of one common image energy, the root's
    spread matches the SE `t_ml_root` reports (within 5%, the draws' own error ~1%), with the root mid-bracket."""
    from thermo_ebm.measurement.likelihood import t_ml_root
    temps = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    u_true, u_se, e_true, e_se = 8.0 * temps, 0.05 * temps, 12.0, 0.3
    rng = np.random.default_rng(0)
    roots, ses = [], []
    for _ in range(4000):
        u = u_true + u_se * rng.normal(size=temps.size)
        e = np.full(temps.size, e_true + e_se * rng.normal())
        t, se, side = t_ml_root(temps, u, u_se, e, np.full(temps.size, e_se))
        assert side == "inside"
        roots.append(t)
        ses.append(se)
    assert abs(np.mean(roots) - 1.5) < 0.01
    assert np.std(roots) == pytest.approx(np.mean(ses), rel=0.05)


def test_t_ml_root_paired_standard_error_over_repeated_draws():
    """The quick T_ML's chains start at the images: each chain's energy shares its image's (and its copies' at the
    other temperatures) unit effect. Over 4,000 draws of 64 such units, the SE from the paired per-unit h matches
    the root's spread within 5%; the unpaired formula, which treats the ends and the images as independent,
    overstates it by half."""
    from thermo_ebm.measurement.likelihood import t_ml_root
    temps = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    rng = np.random.default_rng(1)
    n, roots, paired_se, unpaired_se = 64, [], [], []
    for _ in range(4000):
        a = rng.normal(size=n)  # the unit (image) effect, common to its chains and its own energy
        u = 8.0 * temps[:, None] + 0.5 * a + 0.1 * rng.normal(size=(temps.size, n))   # [T, n]
        e = 12.0 + 0.3 * a + 0.3 * rng.normal(size=n)                               # [n]
        um, us = u.mean(1), u.std(1, ddof=1) / np.sqrt(n)
        em, es = np.full(temps.size, e.mean()), np.full(temps.size, e.std(ddof=1) / np.sqrt(n))
        t, se, side = t_ml_root(temps, um, us, em, es, paired=u - e)
        assert side == "inside"
        roots.append(t)
        paired_se.append(se)
        unpaired_se.append(t_ml_root(temps, um, us, em, es)[1])
    assert abs(np.mean(roots) - 1.5) < 0.01
    assert np.std(roots) == pytest.approx(np.mean(paired_se), rel=0.05)
    assert np.mean(unpaired_se) > 1.3 * np.std(roots)


def test_a_checkpoints_relative_data_dir_is_found_from_another_folder(tmp_path, monkeypatch):
    """`measure` and `eval` run elsewhere than `train` still find its dataset: a relative data_dir is looked up from
    the folder train ran in (CHECKPOINT_DIR/NAME.pt below it) when it exists there; otherwise, and for an absolute
    checkpoint_dir or a checkpoint given as a dict, data_dir stays as given."""
    from thermo_ebm.files.checkpoint import checkpoint_data_dir
    run = tmp_path / "run"
    (run / "checkpoints" / "nested").mkdir(parents=True)
    (run / "shared" / "data").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = {"config": {"data_dir": "shared/data", "checkpoint_dir": "checkpoints"}}
    assert checkpoint_data_dir(ckpt, run / "checkpoints" / "r.pt") == str(run / "shared" / "data")
    assert checkpoint_data_dir(ckpt, str(run / "checkpoints" / "r.pt")) == str(run / "shared" / "data")
    nested = {"config": {"data_dir": "shared/data", "checkpoint_dir": "checkpoints/nested"}}
    assert checkpoint_data_dir(nested, run / "checkpoints" / "nested" / "r.pt") == str(run / "shared" / "data")
    assert checkpoint_data_dir(ckpt, "checkpoint") == "shared/data"      # not found there either: unchanged
    assert checkpoint_data_dir(ckpt, {"config": {}}) == "shared/data"    # not a path
    absolute = {"config": {"data_dir": "shared/data", "checkpoint_dir": str(run / "checkpoints")}}
    assert checkpoint_data_dir(absolute, run / "checkpoints" / "r.pt") == "shared/data"
    (elsewhere / "shared" / "data").mkdir(parents=True)                   # a folder of that name here, too
    assert checkpoint_data_dir(ckpt, run / "checkpoints" / "r.pt") == str(run / "shared" / "data")
    assert checkpoint_data_dir(ckpt, elsewhere / "checkpoints" / "r.pt") == str(elsewhere / "shared" / "data")


def test_a_checkpoints_dataset_is_read_once_for_the_reference_states_and_the_heldout_set(digits_ckpt, monkeypatch):
    from thermo_ebm.config import MeasureConfig
    from thermo_ebm.measurement import inputs
    calls, real = [], inputs.load_data

    def counted(*args, **kw):
        calls.append(args)
        return real(*args, **kw)
    monkeypatch.setattr(inputs, "load_data", counted)
    kw = dict(shape=None, ensemble="auto", units="train", t_train=None, device="cpu", seed=0, cfg=MeasureConfig())
    p = inputs.prepare(digits_ckpt["checkpoint"], [1.0], data="auto", heldout="auto", **kw)
    assert len(calls) == 1
    assert p.data_source.startswith("1438 training images (digits)") and len(p.data) == 1438 + 256
    assert len(p.heldout.x) == len(p.train_split.x) == 359 and p.heldout.y is not None
    p = inputs.prepare(digits_ckpt["checkpoint"], [1.0], data="none", heldout="none", **kw)
    assert len(calls) == 1 and p.data is None and p.heldout is None  # neither asks for it: not read
    assert 0.5 < p.desc["training_moves_accepted"] <= 1.0  # the digits model's chains sample at T_train

    def unreadable(*args, **kw):
        raise ThermoEBMError("no such dataset here")
    monkeypatch.setattr(inputs, "load_data", unreadable)
    p = inputs.prepare(digits_ckpt["checkpoint"], [1.0], data="auto", heldout="auto", **kw)
    assert p.data_source == "256 stored marginal chains" and p.heldout is None
