"""Training: outputs, history, checkpoint round-trip, exact resume, divergence handling."""
import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from thermo_ebm.checkpoint import load_checkpoint, load_model
from thermo_ebm.errors import TrainingDiverged
from thermo_ebm.train import train

TINY = dict(dataset="digits", batch_size=32, buffer_size=256, mc_steps=5, model_size=32, progress=False)


def test_outputs_history_and_checkpoint(digits_ckpt):
    ck = torch.load(digits_ckpt["checkpoint"], weights_only=True)
    assert ck["config"]["objective"] == "j_ebm" and ck["step"] == 6
    assert {"model", "optimizer", "buffers", "rng", "history"} <= set(ck)
    model = load_model(digits_ckpt["checkpoint"])
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    ds = xr.open_dataset(digits_ckpt["results"], group="training", engine="h5netcdf")
    for var in ("loss", "joint_e_data", "joint_e_model", "joint_W", "joint_Q", "joint_jarzynski", "joint_dF"):
        assert var in ds and ds[var].sizes["step"] == 6
    assert np.all(np.isfinite(ds.joint_W.values))
    # the first step's walkers all start from the uniform reference: dF starts at 0
    assert ds.joint_dF.values[0] == 0.0
    with h5py.File(digits_ckpt["results"]) as f:
        assert "training" in f


def test_every_objective_trains(tmp_path):
    for obj in ("dcl", "m_ebm", "gcl", "hybrid"):
        out = train(name=obj, objective=obj, epochs=1, max_steps=3, checkpoint_dir="c", results_dir="r", **TINY)
        assert out["steps"] == 3
        ds = xr.open_dataset(out["results"], group="training", engine="h5netcdf")
        assert np.all(np.isfinite(ds.loss.values))


def _params(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_is_bit_identical():
    kw = dict(TINY, objective="gcl", max_steps=None)
    a = train(name="straight", epochs=2, checkpoint_dir="a", results_dir="a", **kw)
    train(name="split", epochs=1, checkpoint_dir="b", results_dir="b", **kw)
    b = train(name="split", epochs=2, checkpoint_dir="b", results_dir="b", resume=True, progress=False)
    pa, pb = _params(a["checkpoint"]), _params(b["checkpoint"])
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ha = xr.open_dataset(a["results"], group="training", engine="h5netcdf")
    hb = xr.open_dataset(b["results"], group="training", engine="h5netcdf")
    np.testing.assert_array_equal(ha.loss.values, hb.loss.values)


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
