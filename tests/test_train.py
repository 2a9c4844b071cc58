"""Training: outputs, history, checkpoint round-trip, exact resume, divergence handling."""
import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from thermo_ebm.files.checkpoint import load_checkpoint, load_model, save_checkpoint
from thermo_ebm.errors import ThermoEBMError, TrainingDiverged
from thermo_ebm.config import needs
from thermo_ebm.training.loop import train

TINY = dict(dataset="digits", batch_size=32, buffer_size=256, mc_steps=5, model_size=32, progress=False)


def test_outputs_history_and_checkpoint(digits_ckpt):
    ck = torch.load(digits_ckpt["checkpoint"], weights_only=True)
    assert ck["config"]["objective"] == "j_ebm" and ck["step"] == 6
    assert {"model", "optimizer", "buffers", "rng", "history"} <= set(ck)
    model = load_model(digits_ckpt["checkpoint"])
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    ds = xr.open_dataset(digits_ckpt["results"], group="training", engine="h5netcdf")
    # j_ebm's default estimator: cross-entropy exactly, log p(x) from marginal chains
    for var in ("loss", "ce", "marginal_e_data", "marginal_e_model", "marginal_W", "marginal_Q",
                "marginal_jarzynski", "marginal_dF"):
        assert var in ds and ds[var].sizes["step"] == 6
    assert np.all(np.isfinite(ds.marginal_W.values))
    # the first step's walkers all start from the uniform reference: dF starts at 0
    assert ds.marginal_dF.values[0] == 0.0
    with h5py.File(digits_ckpt["results"]) as f:
        assert "training" in f
    # the quick T_ML / T_train from held-out-seeded chains, with its side of 0.25-4 T_train
    assert ds.attrs["T_ML_quick_side"] in ("inside", "below", "above", "undetermined")
    assert (ds.attrs["T_ML_quick_side"] == "inside") == np.isfinite(ds.attrs["T_ML_quick"])


@pytest.mark.parametrize("objective,estimator", [("dcl", "exact"), ("m_ebm", "exact"), ("j_ebm", "exact"),
                                                 ("j_ebm", "chains"), ("gcl", "exact"), ("hybrid", "exact")])
def test_every_objective_learns(objective, estimator):
    """A few seconds on digits: the classifier objectives beat chance on held-out data, the generative ones
    give data a lower energy than their chains' samples."""
    out = train(name=objective, objective=objective, epochs=3, checkpoint_dir="c", results_dir="r",
                joint_estimator=estimator, **dict(TINY, lr=3e-3))
    assert out["epochs"] == 3
    ds = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
    assert np.all(np.isfinite(ds.loss.values))
    if objective != "m_ebm":
        assert ds.heldout_acc.values[-1] > 0.3, ds.heldout_acc.values  # chance: 0.1
    for pop in [p for p in needs(objective, estimator) if not (objective == "gcl" and p == "marginal")]:  # gcl: - m_ebm
        gap = ds[f"{pop}_e_model"].values[-20:].mean() - ds[f"{pop}_e_data"].values[-20:].mean()
        assert gap > 0, (pop, gap)
    assert not [k for k in ds.data_vars if k.startswith("marg_")]  # one name per population: marginal_*
    assert "class_kl" not in ds  # the label-marginal term is off by default


@pytest.mark.parametrize("objective", ["j_ebm", "hybrid"])
def test_label_marginal_term_trains_and_records_the_chains_class_kl(objective):
    """--class-balance: the loss holds class_balance x the label-marginal term, and the history KL(data labels ||
    the chains' class split) per step."""
    out = train(name=objective, objective=objective, epochs=1, max_steps=8, class_balance=1.0, **TINY)
    ds = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
    assert ds.class_kl.sizes["step"] == 8 and np.all(np.isfinite(ds.class_kl.values)) and np.all(ds.class_kl >= 0)
    assert '"class_balance": 1.0' in ds.attrs["config"]


def test_class_balance_applies_only_where_marginal_chains_train_classes():
    from thermo_ebm.config import TrainConfig
    assert TrainConfig(objective="j_ebm", dataset="digits").validate().class_balance == 0.0  # off unless PRESETS say
    assert TrainConfig(objective="j_ebm").validate().class_balance == 1.0  # the MNIST j_ebm preset
    assert TrainConfig(objective="j_ebm", dataset="digits", class_balance=1.0).validate().class_balance == 1.0
    assert TrainConfig(objective="hybrid", class_balance=0.5).validate().class_balance == 0.5
    for objective, estimator in (("j_ebm", "chains"), ("gcl", "exact"), ("m_ebm", "exact"), ("dcl", "exact")):
        with pytest.raises(ThermoEBMError, match="--class-balance"):
            TrainConfig(objective=objective, joint_estimator=estimator, class_balance=1.0).validate()
    with pytest.raises(ThermoEBMError, match="--class-balance"):
        TrainConfig(class_balance=-1.0).validate()


def test_divergence_signals_are_explicit():
    from thermo_ebm.training.loop import Trainer, TrainConfig
    tr = Trainer(TrainConfig(dataset="digits", objective="gcl", device="cpu", model_size=16, buffer_size=64,
                             batch_size=16).validate(), progress=False)
    ok = {"loss": 1.0, "marginal_e_data": 0.0, "marginal_e_model": 1.0, "marginal_W": float("nan"),
          "joint_jarzynski": float("inf")}
    assert tr.guard.check(ok, tr.model) is None  # bookkeeping may be non-finite
    assert "marginal_e_model" in tr.guard.check(dict(ok, marginal_e_model=float("nan")), tr.model)
    assert "runaway marginal energy gap" in tr.guard.check(dict(ok, marginal_e_model=1e6), tr.model)


def test_rollback_reseeds_each_rank_differently():
    """After a rollback the chain noise still differs between ranks (it is seeded from (seed, rank,
    rollbacks)); the data order stays shared."""
    from thermo_ebm.training import state as train_state
    from thermo_ebm.training.loop import Trainer, TrainConfig, training_seeds
    for rollbacks in range(4):
        (d0, m0), (d1, m1) = training_seeds(0, 0, rollbacks), training_seeds(0, 1, rollbacks)
        assert d0 == d1 and m0 != m1
    assert len({training_seeds(0, 0, r)[1] for r in range(4)}) == 4
    draws = []
    for rank in (0, 1):
        tr = Trainer(TrainConfig(dataset="digits", device="cpu", model_size=16, buffer_size=64, batch_size=16,
                                 on_divergence="rollback").validate(), progress=False)
        tr.rank = rank  # as under torchrun
        tr.snapshot = train_state.capture(tr)
        tr._on_divergence("test")
        draws.append(torch.randn(4, generator=tr.chains.generator))
    assert not torch.equal(draws[0], draws[1])


def _params(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_is_bit_identical():
    kw = dict(TINY, objective="gcl", max_steps=None, lr_schedule="constant")  # cosine's length is --epochs
    a = train(name="straight", epochs=2, checkpoint_dir="a", results_dir="a", **kw)
    train(name="split", epochs=1, checkpoint_dir="b", results_dir="b", **kw)
    b = train(name="split", epochs=2, checkpoint_dir="b", results_dir="b", resume=True, progress=False)
    pa, pb = _params(a["checkpoint"]), _params(b["checkpoint"])
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ha = xr.open_dataset(a["results"], group="training", engine="h5netcdf")
    hb = xr.open_dataset(b["results"], group="training", engine="h5netcdf")
    np.testing.assert_array_equal(ha.loss.values, hb.loss.values)


def test_defaults_by_dataset_and_objective_fill_only_what_is_left_open(tmp_path):
    """PRESETS: the first matching row that names a setting gives it; explicit settings win; a resume keeps the
    checkpoint's values even where the table has changed since; `train --help` prints the table."""
    from click.testing import CliRunner
    from thermo_ebm import config
    from thermo_ebm.cli import cli
    from thermo_ebm.config import TrainConfig
    cases = {("mnist", "j_ebm"): (10, "constant", 3.0, 10000), ("mnist", "m_ebm"): (30, "cosine", 0.001, 10000),
             ("mnist", "dcl"): (10, "constant", 0.0, 10000), ("digits", "j_ebm"): (15, "cosine", 0.1, 1000),
             ("digits", "dcl"): (15, "cosine", 0.0, 1000), ("cifar10", "m_ebm"): (10, "constant", 0.1, 10000)}
    for (ds, obj), want in cases.items():
        c = TrainConfig(dataset=ds, objective=obj).validate()
        assert (c.epochs, c.lr_schedule, c.reg, c.buffer_size) == want, (ds, obj)
    for (ds, obj), want in {("mnist", "j_ebm"): 0.0447, ("mnist", "gcl"): 0.1, ("digits", "j_ebm"): 0.1}.items():
        assert TrainConfig(dataset=ds, objective=obj).validate().sgld_noise == want, (ds, obj)
    assert TrainConfig(sgld_noise=0.2).validate().sgld_noise == 0.2
    for (ds, obj), want in {("mnist", "j_ebm"): (40, 1.0), ("mnist", "m_ebm"): (0, 0.0), ("digits", "j_ebm"): (0, 0.0),
                            ("cifar10", "hybrid"): (0, 0.0)}.items():
        c = TrainConfig(dataset=ds, objective=obj).validate()
        assert (c.base_components, c.class_balance) == want, (ds, obj)
    # the preset's label-marginal weight only where the term applies; asked for elsewhere, an error
    assert TrainConfig(dataset="mnist", joint_estimator="chains").validate().class_balance == 0.0
    with pytest.raises(ThermoEBMError, match="--class-balance"):
        TrainConfig(dataset="mnist", joint_estimator="chains", class_balance=1.0).validate()
    for (ds, obj), want in {("mnist", "m_ebm"): "magnitude", ("mnist", "j_ebm"): "centred",
                            ("digits", "j_ebm"): "magnitude", ("fashion-mnist", "gcl"): "centred",
                            ("mnist", "gcl"): "magnitude"}.items():
        assert TrainConfig(dataset=ds, objective=obj).validate().penalty == want, (ds, obj)
    c = TrainConfig(dataset="mnist", objective="m_ebm", reg=0.5, epochs=3, penalty="centred").validate()
    assert (c.epochs, c.lr_schedule, c.reg, c.penalty) == (3, "cosine", 0.5, "centred")
    with pytest.raises(ThermoEBMError, match="--penalty"):
        TrainConfig(penalty="l2").validate()
    kw = dict(TINY, objective="dcl", max_steps=2, checkpoint_dir=str(tmp_path), results_dir=str(tmp_path))
    train(name="p", epochs=1, penalty="centred", **kw)
    saved = load_checkpoint(tmp_path / "p.pt")["config"]
    assert (saved["epochs"], saved["lr_schedule"], saved["reg"], saved["buffer_size"]) == (1, "cosine", 0.0, 256)
    old = config.PRESETS
    try:
        config.PRESETS = (("*", "*", {"epochs": 10, "lr_schedule": "constant", "reg": 0.7, "buffer_size": 10000}),)
        train(name="p", epochs=2, max_steps=4, checkpoint_dir=str(tmp_path), results_dir=str(tmp_path),
              resume=True, progress=False)
        st = load_checkpoint(tmp_path / "p.pt")
        assert st["step"] == 4 and (st["config"]["reg"], st["config"]["buffer_size"]) == (0.0, 256)
        assert st["config"]["penalty"] == "centred"
        # a checkpoint from before --penalty existed trained with the magnitude penalty, and its resume keeps it
        del st["config"]["penalty"]
        save_checkpoint(tmp_path / "p.pt", st)
        train(name="p", epochs=2, max_steps=5, checkpoint_dir=str(tmp_path), results_dir=str(tmp_path),
              resume=True, progress=False)
        assert load_checkpoint(tmp_path / "p.pt")["config"]["penalty"] == "magnitude"
    finally:
        config.PRESETS = old
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--reg" in out and "by dataset and objective" in out
    assert "mnist    m_ebm   --epochs 30, --lr-schedule cosine, --reg 0.001" in out
    assert "mnist    j_ebm   --sgld-noise 0.0447, --reg 3.0, --base-components 40, --class-balance 1.0" in out


def test_resume_refuses_conflicting_options(digits_ckpt):
    from thermo_ebm import ThermoEBMError
    d = str(__import__("pathlib").Path(digits_ckpt["checkpoint"]).parent)
    with pytest.raises(ThermoEBMError, match="conflicts"):
        train(name="tiny", objective="dcl", checkpoint_dir=d, resume=True, progress=False)


def test_divergence_rollback_and_stop():
    kw = dict(TINY, objective="j_ebm", epochs=1, max_steps=12, lr=1e4, reg=0.0)
    out = train(name="roll", checkpoint_dir="c", results_dir="r", on_divergence="rollback", max_rollbacks=30,
                max_energy_gap=50.0, **kw)
    assert out["rollbacks"] >= 1
    ds = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
    assert "event_message" in ds and "rolled back" in str(ds.event_message.values[0])
    assert ds.lr.values[-1] < 1e4
    # stop: non-zero exit through TrainingDiverged, last good checkpoint intact
    train(name="stop", checkpoint_dir="c", results_dir="r", **dict(TINY, epochs=1, max_steps=2))
    before = load_checkpoint("c/stop.pt")["step"]
    with pytest.raises(TrainingDiverged, match="divergence at step"):
        train(name="stop2", checkpoint_dir="c", results_dir="r", on_divergence="stop", max_energy_gap=50.0, **kw)
    assert load_checkpoint("c/stop.pt")["step"] == before


def test_cosine_schedule_and_fresh_run_guard():
    from thermo_ebm import ThermoEBMError
    kw = dict(TINY, objective="dcl", epochs=1, max_steps=5, lr=1e-3, lr_schedule="cosine", checkpoint_dir="c",
              results_dir="r")
    out = train(name="cos", **kw)
    with xr.open_dataset(out["results"], group="training", engine="h5netcdf") as ds:
        lr = ds.lr.values
    k = np.arange(5)
    np.testing.assert_allclose(lr, 1e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi * k / 5))), rtol=1e-12)
    # a measurement of this model lives in the file: a fresh run of the same name must not mix with it
    with h5py.File(out["results"], "a") as f:
        f.create_group("measure_marginal")
    with pytest.raises(ThermoEBMError, match="already exist"):
        train(name="cos", **kw)
    train(name="cos", overwrite=True, **kw)
    with h5py.File(out["results"]) as f:
        assert set(f) == {"training"}


class _Quadratic(torch.nn.Module):
    """f(x)[y] = -c_y |x|^2 / 2: the joint energy per label is a product of 1-D Gaussians on the box, so
    Z_y = (sqrt(2 pi / c_y) erf(sqrt(c_y / 2)))^d exactly."""

    def __init__(self, c0):
        super().__init__()
        self.c = torch.nn.Parameter(torch.as_tensor(c0, dtype=torch.float32).clone())

    def forward(self, x):
        return -0.5 * x.flatten(1).pow(2).sum(1, keepdim=True) * self.c


def _trainer_with(model, **options):
    """A Trainer on digits with `model` as its network."""
    from thermo_ebm.training.loop import Trainer, TrainConfig
    cfg = TrainConfig(dataset="digits", device="cpu", checkpoint_dir="c", results_dir="r", **options).validate()
    return Trainer(cfg, progress=False, model=model)


@pytest.mark.parametrize("labels, c0", [("fixed", np.full(10, 0.2)), ("gibbs", np.linspace(0.1, 0.5, 10))],
                         ids=["fixed", "gibbs"])
def test_training_jarzynski_matches_exact_free_energy(labels, c0):
    """The recorded work W and Jarzynski estimate equal the exact free-energy change of the model since
    the uniform start (uniform x and y), when the sampler is a T = 1 Langevin kernel (noise^2 = 2 step) and
    every walker is visited every step. Fixed labels: each walker is its own ensemble, so
    -log mean_i Z_{y_i}(theta_t) / 2^d. Gibbs labels (y redrawn from p(y|x), booked as heat): the walkers
    sample p(x, y), so -log (sum_y Z_y(theta_t) / (K 2^d)). Equal initial c_y keep the work spread small (the
    fixed-label run detects a kernel at the wrong temperature); label-dependent c_y make the two exact answers
    differ by 11 SE (the Gibbs run detects label moves booked as work or not at all)."""
    from scipy.special import erf

    step = 1e-3
    tr = _trainer_with(_Quadratic(c0), objective="j_ebm", joint_estimator="chains", batch_size=512, buffer_size=512, from_scratch=0.0,
                       mc_steps=5, sgld_step=step, sgld_noise=(2 * step) ** 0.5, lr=2e-3, reg=0.0,
                       joint_labels=labels)
    xb, yb = tr.data.x_train[:64], tr.data.y_train[:64]
    for _ in range(40):
        rec = tr.train_step(xb, yb)
    c = tr.model.c.detach().double().numpy()
    assert np.abs(c - c0).mean() > 0.05  # the protocol really changed the labels' energies
    d = 64
    log_z = d * np.log(np.sqrt(2 * np.pi / c) * erf(np.sqrt(c / 2)))  # per label
    lz = log_z[tr.chains.pops["joint"]["y"].numpy()] if labels == "fixed" else log_z
    exact = -(np.logaddexp.reduce(lz) - np.log(len(lz))) + d * np.log(2.0)
    w = tr.chains.pops["joint"]["W"].numpy()
    est = -(np.logaddexp.reduce(-w) - np.log(len(w)))
    assert rec["joint_jarzynski"] == pytest.approx(est, rel=1e-9)
    rng = np.random.default_rng(0)
    boots = [-(np.logaddexp.reduce(-w[i]) - np.log(len(w))) for i in rng.integers(0, len(w), (400, len(w)))]
    se = float(np.std(boots))
    assert abs(est - exact) < 4 * se, (est, exact, se)


def test_second_process_on_the_same_run_is_refused():
    from thermo_ebm import ThermoEBMError
    from thermo_ebm.files.fileio import file_lock
    with file_lock("c/busy.run", timeout=0.0):  # what a running `train --name busy` holds
        with pytest.raises(ThermoEBMError, match="another process is training run 'busy'"):
            train(name="busy", checkpoint_dir="c", results_dir="r", **dict(TINY, epochs=1, max_steps=1))
    assert train(name="busy", checkpoint_dir="c", results_dir="r", **dict(TINY, epochs=1, max_steps=1))["steps"] == 1


class _FixedLogits(torch.nn.Module):
    """Logits independent of x: p(y|x) = softmax(base) everywhere."""

    def __init__(self, base):
        super().__init__()
        self.register_buffer("base", torch.as_tensor(base, dtype=torch.float32))
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.base + self.w * 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_gibbs_joint_labels_follow_the_model_conditional():
    """--joint-labels gibbs redraws each joint chain's y from p(y|x) (here softmax(base) for every x), and
    the label move's energy change is booked as heat: e_last = E(x, y_new)."""
    from scipy.stats import chisquare

    p = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.02, 0.01, 0.01, 0.005, 0.005])
    tr = _trainer_with(_FixedLogits(np.log(p)), objective="j_ebm", joint_estimator="chains", batch_size=512, buffer_size=512,
                       from_scratch=0.0, mc_steps=2, joint_labels="gibbs", reg=0.0, lr=1e-3)
    xb, yb = tr.data.x_train[:64], tr.data.y_train[:64]
    counts = np.zeros(10)
    for _ in range(8):
        tr.train_step(xb, yb)
        y = tr.chains.pops["joint"]["y"].numpy()
        counts += np.bincount(y, minlength=10)
        assert np.allclose(tr.chains.pops["joint"]["e_last"].numpy(), -np.log(p[y]), atol=1e-5)
    assert chisquare(counts, counts.sum() * p).pvalue > 1e-4


def test_train_reports_the_energy_gap_the_centred_penalty_holds(caplog):
    """With the centred penalty the data-model energy gap goes to 1 / reg, where the penalty cancels the likelihood
    gradient (objectives.py): `train` returns the gap of the last epoch's steps and says so when reg x gap is near
    1 (reg 3, 132 steps); at reg 0.01 the gap stays far below 1 / reg and nothing is said."""
    with caplog.at_level("INFO", logger="thermo_ebm"):
        held = train(name="held", objective="j_ebm", epochs=3, reg=3.0, penalty="centred", **TINY)
    ds = xr.open_dataset(held["results"], group="training", engine="h5netcdf")
    gap = float((ds.marginal_e_model - ds.marginal_e_data).values[-44:].mean())
    assert held["energy_gap"] == pytest.approx(gap) and held["reg_times_gap"] == pytest.approx(3.0 * gap)
    assert 0.9 < held["reg_times_gap"] < 1.2 and "cancels the likelihood gradient" in caplog.text
    # the chains' largest class mass after every epoch; after the last, the one train returns
    assert ds.chains_top_class_mass.sizes["epoch"] == 3 and np.all((ds.chains_top_class_mass >= 0.1 - 1e-9)
                                                                    & (ds.chains_top_class_mass <= 1))
    assert float(ds.chains_top_class_mass[-1]) == pytest.approx(max(held["chains_class_mass"]))
    caplog.clear()
    with caplog.at_level("INFO", logger="thermo_ebm"):
        free = train(name="free", objective="j_ebm", epochs=2, reg=0.01, penalty="centred", **TINY)
    assert free["reg_times_gap"] < 0.5 and "reg x gap" in caplog.text
    assert "cancels the likelihood gradient" not in caplog.text


def test_train_reports_how_its_chains_split_over_the_classes(digits_ckpt, caplog):
    """`train` returns (and the results file keeps) the chains' mean softmax(f / T_train) over the classes, and
    warns when one class holds more than 0.9 of it: the joint ensemble at T_train then holds ~0 bits of I(X;Y)."""
    from types import SimpleNamespace
    from thermo_ebm.config import TrainConfig
    from thermo_ebm.training.loop import chains_class_mass, log_chain_classes
    mass = np.asarray(digits_ckpt["chains_class_mass"])
    assert mass.shape == (10,) and mass.sum() == pytest.approx(1.0)
    ds = xr.open_dataset(digits_ckpt["results"], group="training", engine="h5netcdf")
    assert np.allclose(__import__("json").loads(ds.attrs["chains_class_mass"]), mass, atol=1e-4)
    from thermo_ebm.reporting.report import report
    top = int(mass.argmax())
    assert f"the training chains' largest class: {top}, {mass[top]:.2f} of their" in report(digits_ckpt["results"])
    # exact on a linear model: logits (2 x_0, 0, 0) at T_train 0.5 -> softmax (4 x_0, 0, 0), averaged over the states
    lin = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 2.0
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    e = np.exp([4.0, -4.0, 0.0])
    expected = np.array([np.mean(e / (e + 2)), np.mean(1 / (e + 2)), np.mean(1 / (e + 2))])
    assert np.allclose(chains_class_mass(lin, x, 0.5), expected)
    # at T_train = 0.1 states (0.2, 0, 0, 0) put e^4 / (e^4 + 2) = 0.965 of their mass on class 0 (named 3)
    tr = SimpleNamespace(cfg=TrainConfig(objective="j_ebm", sgld_noise=0.1, sgld_step=0.05), t_train=0.1, model=lin,
                         data=SimpleNamespace(n_classes=3, classes=[3, 5, 7]),
                         chains=SimpleNamespace(pops={"marginal": {"x": 0.1 * (x[:1] + 1).repeat(8, 1)}}))
    with caplog.at_level("INFO", logger="thermo_ebm"):
        assert log_chain_classes(tr)[0] == pytest.approx(np.exp(4) / (np.exp(4) + 2))
    assert "the training chains sit in class 3 (0.96" in caplog.text


def test_history_pads_an_epoch_metric_that_earlier_epochs_lack():
    """A run resumed from a checkpoint written before a metric existed records nan for its earlier epochs."""
    from thermo_ebm.training.chains import History
    h = History()
    h.record_epoch({"heldout_acc": 0.5})
    h.record_epoch({"heldout_acc": 0.6, "chains_top_class_mass": 0.2})
    h.record_epoch({"heldout_acc": 0.7})
    ds = h.to_dataset({})
    assert np.allclose(ds.heldout_acc, [0.5, 0.6, 0.7])
    assert np.array_equal(np.isnan(ds.chains_top_class_mass.values), [True, False, True])


def test_mala_training_chains_sample_p_at_t_train_where_sgld_is_biased():
    """Persistent chains with `--sampler mala` (SGLD's proposal, reflected at the box and MH-corrected) on a fixed
    truncated Gaussian: after 60 steps of 5 moves the buffer's mean energy matches the exact <E> at T_train within
    4 SEs, at a step where the unadjusted, clamped SGLD chains miss it by more than 4 SEs."""
    from types import SimpleNamespace

    from thermo_ebm.testing import TruncatedGaussian
    from thermo_ebm.training.chains import PersistentChains, moves_acceptance
    model = TruncatedGaussian(d=16, seed=3)
    step, noise = 0.02, 0.2  # T_train = noise^2 / (2 step) = 1
    got = {}
    for sampler in ("mala", "sgld"):
        cfg = SimpleNamespace(sampler=sampler, sgld_step=step, sgld_noise=noise, mc_steps=5, from_scratch=0.0,
                              short_run=False, joint_labels="fixed")
        chains = PersistentChains(("marginal",), 2048, (16,), 1, cfg, "cpu", torch.Generator().manual_seed(0))
        for _ in range(60):
            moved = chains.advance(model, 2048)
            with torch.no_grad():
                rec = chains.book(moved, {"marginal": model(moved["marginal"].x)})
        with torch.no_grad():
            e = -model(chains.pops["marginal"]["x"]).squeeze(-1).double()
        got[sampler] = (float(e.mean()), float(e.std()) / np.sqrt(len(e)), rec.get("marginal_accept"))
    u = float(model.exact([1.0])["U"][0])
    assert abs(got["mala"][0] - u) < 4 * got["mala"][1], (got, u)
    assert abs(got["sgld"][0] - u) > 4 * got["sgld"][1], (got, u)
    assert 0.3 < got["mala"][2] < 1.0 and got["sgld"][2] is None  # the history's marginal_accept, with mala only
    # the diagnostic `train` logs, from walkers at the modes of a narrow Gaussian (std 0.05-0.1): SGLD's moves at
    # T_train 1 mostly pass the MH test; with the JEM-like ratio of step to noise (T_train 0.001, nominal) they
    # overshoot the minimum and almost never do
    narrow = TruncatedGaussian(d=16, seed=3, std_range=(0.05, 0.1))
    for step, noise, lo, hi in ((5e-4, 0.0316, 0.8, 1.0), (0.05, 0.01, 0.0, 0.05)):
        cfg = SimpleNamespace(sampler="sgld", sgld_step=step, sgld_noise=noise, mc_steps=5, from_scratch=0.0,
                              short_run=False, joint_labels="fixed")
        x = narrow.mt + 0.01 * torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
        a = moves_acceptance(narrow, {"marginal/x": x, "marginal/y": torch.zeros(256, dtype=torch.long)},
                             {**vars(cfg), "seed": 1})
        assert lo <= a <= hi, (step, noise, a)
    from thermo_ebm import ThermoEBMError
    from thermo_ebm.config import TrainConfig
    assert TrainConfig().validate().sampler == "sgld"
    for bad in ({"sampler": "hmc"}, {"sampler": "mala", "sgld_noise": 0.6}):
        with pytest.raises(ThermoEBMError, match="--sampler"):
            TrainConfig(**bad).validate()


def test_the_scale_line_says_when_t_train_is_nominal():
    """`show` and `measure` name T = 1 as the training chains' target only where their moves passed the
    Metropolis test there (training_moves_accepted, measurement/inputs.py)."""
    from thermo_ebm.reporting.report import scale_line
    base = {"temperature_units": "train", "T_train": 0.02, "ensemble": "marginal", "training_chains": "marginal"}
    assert "the distribution the training chains targeted" in scale_line(xr.Dataset(attrs=base))
    assert "targeted" in scale_line(xr.Dataset(attrs={**base, "training_moves_accepted": 0.99}))
    line = scale_line(xr.Dataset(attrs={**base, "training_moves_accepted": 0.0}))
    assert "T_train, nominal" in line and "0% of the time" in line
