"""CLI end to end, bad inputs (exit 2, one line, no traceback), unsafe checkpoints, atomic results."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import xarray as xr

from thermo_ebm.cli import main
from thermo_ebm.files.results import list_groups, write_group


def run_cli(args, stdout=None):
    """Run the CLI in-process; returns (exit code, stderr text); stdout: a StringIO that keeps what it printed."""
    import contextlib
    import io
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout if stdout is not None else io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


SMALL = ["--ais-chains", "64", "--ais-steps", "100", "--ais-steps-per-l2", "4", "--chains", "8", "--burn-in", "20",
         "--samples", "40", "--replicas", "4", "--reverse-steps", "40", "--bridge-chains", "64", "--data-refs", "16"]


@pytest.fixture(scope="module")
def measured(digits_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "run.h5"
    import shutil
    shutil.copy(digits_ckpt["results"], out)  # holds the training group
    import io
    for ens in ("marginal", None):  # None: the default (auto), joint for this j_ebm checkpoint
        printed = io.StringIO()
        code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "0.5:2:0.5",
                             *(["--ensemble", ens] if ens else []), "--out", str(out), "--device", "cpu", *SMALL],
                            stdout=printed)
        assert code == 0, err
    (out.parent / "measure_joint.txt").write_text(printed.getvalue())  # what the joint run printed
    return out


def test_measure_writes_groups_without_touching_others(measured):
    groups = list_groups(measured)
    assert groups == {"training": "training", "measure_marginal": "measurement", "measure_joint": "measurement"}
    ds = xr.open_dataset(measured, group="measure_joint", engine="h5netcdf")
    assert list(ds.temperature.values) == [0.5, 1.0, 1.5, 2.0]
    for v in ("log_Z", "F", "U", "S", "C", "info_bits", "H_Y_bits", "I_XY_bits", "log_Z_reverse", "log_Z_mbar",
              "C_peak_T"):
        assert v in ds and v + "_err" in ds
    assert ds.C_peak_T.shape == ()
    assert ds.p_y.dims == ("temperature", "class") and np.allclose(ds.p_y.values.sum(1), 1.0)
    assert ds.samples.shape[:2] == (4, 8)
    # the checkpoint's held-out split (auto): joint likelihood with labels, 17 grey levels of sklearn's digits
    for v in ("log_lik_heldout", "log_lik_xy_heldout", "log_lik_y_given_x_heldout", "info_heldout_bits",
              "bits_per_dim_heldout", "log_lik_train", "generalisation_gap", "T_ML"):
        assert v in ds and v + "_err" in ds, v
    assert ds.attrs["heldout_levels"] == 17 and ds.attrs["T_ML_side"] in ("inside", "below", "above")
    assert ds.log_lik_heldout_cov.shape == (4, 4)
    assert np.all(ds.log_lik_y_given_x_heldout.values <= 0)
    assert "versions" in ds.attrs and ds.attrs["seed"] == 0
    assert json.loads(ds.attrs["settings"])["ais_steps_per_l2"] == 4
    assert {"ess", "pareto_k", "flag_low_ess", "flag_heavy_tails"} <= set(ds.data_vars)


def test_plot_every_figure_both_formats(measured):
    for fmt in ("png", "pdf"):
        code, err = run_cli(["plot", str(measured), "--format", fmt])
        assert code == 0, err
    stem = measured.with_suffix("")
    for suffix in ("", "_samples", "_training"):
        png = Path(f"{stem}{suffix}.png")
        img = mpimg.imread(png)
        assert img.shape[0] > 300 and img.std() > 0.01  # a real, non-blank figure
        assert Path(f"{stem}{suffix}.pdf").read_bytes()[:4] == b"%PDF"


def test_thermo_figure_axes(measured):
    import matplotlib.pyplot as plt
    from thermo_ebm.reporting.plot import _measurements, thermo_figure
    runs = _measurements([measured])
    captured = {}
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        captured["fig"] = fig
        return orig(fig, *a, **k)
    plt.Figure.savefig = spy
    try:
        thermo_figure(runs, Path("t.png"))
    finally:
        plt.Figure.savefig = orig
    labels = [ax.get_ylabel() for ax in captured["fig"].axes]
    for want in ("free energy", "internal energy", "entropy", "heat capacity", "information", "$I(X;Y)$",
                 "held-out $\\log p_T(x)$"):
        assert any(want in lab for lab in labels), (want, labels)
    first = captured["fig"].axes[0]
    assert len([ln for ln in first.lines if ln.get_gid() not in ("T_train", "flagged")]) == 2  # two groups overlaid
    from thermo_ebm.reporting.plot import flagged  # flagged temperatures carry a red x, the others none
    marked = np.concatenate([ln.get_xdata() for ln in first.lines if ln.get_gid() == "flagged"] or [[]])
    want = np.concatenate([ds.temperature.values[flagged(ds)] for _, ds, _ in runs])
    np.testing.assert_allclose(np.sort(marked), np.sort(want))
    assert [ln for ln in first.lines if ln.get_gid() == "T_train"]  # T = 1 (the training temperature) marked
    res = next(ax for ax in captured["fig"].axes if ax.get_ylabel() == "residual / SE")
    ds = runs[0][1]
    series = [ln for ln in res.lines if ln.get_linestyle() == "None"]
    assert len(series) == 4  # U and C residuals for both groups
    np.testing.assert_allclose(series[0].get_ydata(), ds.U_resid.values / ds.U_resid_err.values)
    gap = next(ax for ax in captured["fig"].axes if "cross-check" in ax.get_ylabel())
    assert any(c.get_label() == "MBAR" for c in gap.containers)
    assert any(c.get_label() == "from uniform" for c in gap.containers)  # log Z came from the data-seeded anneal
    assert all(ax.get_xlabel().startswith("$T / T_{train}$ ($T_{train}$ = 0.1") for ax in captured["fig"].axes)


def test_show_table_and_json(measured):
    from thermo_ebm.reporting.report import report
    text = report(measured)
    assert "measure_joint" in text and "training" in text and "±" in text
    import json
    doc = json.loads(report(measured, as_json=True))
    assert len(doc["groups"]["measure_marginal"]["rows"]) == 4
    assert "C_peak_T" in doc["groups"]["measure_marginal"] and "heat-capacity peak" in text
    assert "held-out likelihood (" in text and "temperatures (in units of T_train): T_train = 1" in text
    # the training chains of this j_ebm (exact estimator, T_train = 0.1) sampled the marginal ensemble only
    assert text.index("[measure_marginal]") < text.index("[measure_joint]")  # the order they were written in
    marginal, joint = text.split("[measure_joint]")
    assert "T = 1: the distribution the training chains targeted" in marginal
    assert "they sampled the marginal ensemble, not this one" in joint
    refs = doc["groups"]["measure_joint"]["reference_temperatures"]
    assert refs["T_train"]["value"] == 1.0 and "T_ML" in refs
    assert "log_lik_heldout" in doc["groups"]["measure_joint"]["rows"][0]
    prov = doc["groups"]["measure_joint"]["provenance"]
    assert prov["command_line"].startswith("thermo-ebm measure") and prov["checkpoint_sha256"]
    assert doc["groups"]["training"]["provenance"]["created_utc"]


def test_sample_command(digits_ckpt):
    code, err = run_cli(["sample", "--ckpt", digits_ckpt["checkpoint"], "--temp", "1", "--label", "3", "-n", "16",
                         "--steps", "20", "-o", "g.png"])
    assert code == 0, err
    assert mpimg.imread("g.png").shape[0] > 20


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("command", ["measure", "sample", "resume"])
def test_malicious_checkpoint_is_refused(command, tmp_path):
    Path("checkpoints").mkdir(exist_ok=True)
    bad = Path("checkpoints/evil.pt")
    torch.save({"model_spec": Evil(), "model": {}}, bad)
    args = {"measure": ["measure", "--ckpt", str(bad), "--temps", "1"],
            "sample": ["sample", "--ckpt", str(bad), "--temp", "1"],
            "resume": ["train", "--name", "evil", "--resume", "--dataset", "digits"]}[command]
    code, err = run_cli(args)
    assert code == 2 and "refusing to load" in err and len(err.strip().splitlines()) == 1
    assert not Path("PWNED").exists()


def _ckpt_variants(good):
    Path("empty.pt").write_bytes(b"")
    data = Path(good).read_bytes()
    Path("trunc.pt").write_bytes(data[: len(data) // 2])
    Path("text.pt").write_text("hello")
    torch.save({"hello": 1}, "notckpt.pt")
    ck = torch.load(good, weights_only=True)
    torch.save(dict(ck, format_version=99), "newer.pt")
    spec = dict(ck["model_spec"], size=64)
    torch.save(dict(ck, model_spec=spec), "otherarch.pt")


BAD = [
    (["measure", "--ckpt", "CK", "--temps", "2:0.5:0.1"], "above stop"),
    (["measure", "--ckpt", "CK", "--temps", "0:1:0.1"], "> 0"),
    (["measure", "--ckpt", "CK", "--temps", "-1,1"], "> 0"),
    (["measure", "--ckpt", "CK", "--temps", ""], "empty"),
    (["measure", "--ckpt", "CK", "--temps", "a:b:c"], "not start:stop:step"),
    (["measure", "--ckpt", "CK", "--temps", "0.001:1000:0.001"], "1000"),
    (["measure", "--ckpt", "CK", "--temps", "1:2:0"], "step must be > 0"),
    (["measure", "--ckpt", "missing.pt", "--temps", "1"], "not found"),
    (["measure", "--ckpt", "empty.pt", "--temps", "1"], "empty"),
    (["measure", "--ckpt", "trunc.pt", "--temps", "1"], "truncated or corrupt"),
    (["measure", "--ckpt", "text.pt", "--temps", "1"], "not a PyTorch checkpoint"),
    (["measure", "--ckpt", ".", "--temps", "1"], "is a directory"),
    (["sample", "--ckpt", "CK", "--temp", "1", "-o", "x.jpg2"], "cannot write images as '.jpg2'"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--out", "r.csv"], "must end in .h5"),
    (["measure", "--ckpt", "notckpt.pt", "--temps", "1"], "not a thermo-ebm checkpoint"),
    (["measure", "--ckpt", "newer.pt", "--temps", "1"], "upgrade"),
    (["measure", "--ckpt", "otherarch.pt", "--temps", "1"], "do not match"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--device", "tpu"], "unknown device"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--device", "cuda:99"], "CUDA device"),
    (["measure", "--ckpt", "CK", "--temps", "1,,2"], "empty item"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--group", "a/b"], "invalid --group"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--data", "text.pt"], "cannot read data file"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--ais-steps-per-l2", "-1"], "ais_steps_per_l2"),
    (["measure", "--ckpt", "CK", "--temps", "1", "--ais-steps-per-l2", "nan"], "ais_steps_per_l2"),
    (["plot", "missing.h5"], "not found"),
    (["plot", "nogroups.h5"], "no measurement or training group"),
    (["show", "text.pt"], "not a readable HDF5"),
    (["train", "--dataset", "imagenet"], "'imagenet' is not one of"),
    (["train", "--dataset", "mnist", "--data-dir", "nowhere"], "--data-dir"),
    (["train", "--dataset", "digits", "--labels", "3,11"], "not in digits"),
    (["train", "--dataset", "digits", "--labels", "3"], "at least two"),
    (["train", "--dataset", "digits", "--buffer-size", "8", "--batch-size", "64"], "buffer-size"),
    (["train", "--name", "nothing-here", "--resume"], "not found"),
    (["train", "--name", "taken", "--dataset", "digits"], "already exist"),
    (["train", "--name", "taken", "--resume", "--overwrite"], "conflict"),
    (["sample", "--ckpt", "CK", "--temp", "-1"], "positive"),
    (["measure", "--temps", "1"], "Missing option"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_inputs_exit_2_with_one_line(args, needle, digits_ckpt):
    _ckpt_variants(digits_ckpt["checkpoint"])
    import h5py
    with h5py.File("nogroups.h5", "w") as f:
        f.create_group("other")
    Path("checkpoints").mkdir(exist_ok=True)
    Path("checkpoints/taken.pt").write_bytes(Path(digits_ckpt["checkpoint"]).read_bytes())
    args = [digits_ckpt["checkpoint"] if a == "CK" else a for a in args]
    code, err = run_cli(args)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_subprocess_exit_code_and_debug(tmp_path):
    r = subprocess.run([sys.executable, "-m", "thermo_ebm", "measure", "--ckpt", "nope.pt", "--temps", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: checkpoint not found: nope.pt"
    for debug_first in (True, False):  # --debug before or after the subcommand
        args = ["--debug", "measure"] if debug_first else ["measure", "--debug"]
        r = subprocess.run([sys.executable, "-m", "thermo_ebm", *args, "--ckpt", "nope.pt", "--temps", "1"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" in r.stderr


def test_concurrent_writers_both_land(tmp_path):
    path = tmp_path / "r.h5"
    ds = xr.Dataset({"a": ("t", np.arange(1000.0))}, attrs={"kind": "measurement"})

    def writer(i):
        write_group(path, f"g{i}", ds)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(list_groups(path)) == {"g0", "g1", "g2", "g3"}
    for i in range(4):
        assert float(xr.open_dataset(path, group=f"g{i}", engine="h5netcdf").a.sum()) == ds.a.sum()


def test_measure_units_and_data_options(digits_ckpt, tmp_path):
    """--units raw keeps the logits' scale; --data none anneals from uniform only; a --data file is read;
    the default (train units, auto data) is recorded in the file."""
    from thermo_ebm.files.results import read_group
    out = tmp_path / "u.h5"
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    torch.save(x, tmp_path / "states.pt")
    for args in (["--units", "raw", "--data", "none"], ["--data", str(tmp_path / "states.pt")]):
        code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1,2", "--out", str(out),
                             "--device", "cpu", *args, *SMALL, "--data-refs", "4", "--bridge-chains", "16"])
        assert code == 0, err
    raw, seeded = read_group(out, "measure_joint"), read_group(out, "measure_joint_2")
    assert raw.attrs["temperature_units"] == "raw" and raw.attrs["log_Z_source"] == "forward AIS from uniform"
    np.testing.assert_allclose(raw.temperature_raw.values, [1.0, 2.0])
    assert "origin_gap" not in raw and "flag_hysteresis" not in raw
    assert seeded.attrs["temperature_units"] == "train" and seeded.attrs["T_train"] == pytest.approx(0.1)
    np.testing.assert_allclose(seeded.temperature_raw.values, [0.1, 0.2])
    assert seeded.attrs["data"].startswith("20 states") and "origin_gap" in seeded
    code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1", "--out", str(out),
                         "--data", str(tmp_path / "missing.pt")])
    assert code == 2 and "data file not found" in err


def test_measure_refuses_an_existing_group_and_a_bad_output_before_work(digits_ckpt, tmp_path):
    """--group naming an existing group (here the training history) exits 2 and leaves it intact unless
    --replace-group; --out on a file that is not a results file exits 2; both before any sampling."""
    import shutil
    import time
    from thermo_ebm.files.results import read_group
    out = tmp_path / "r.h5"
    shutil.copy(digits_ckpt["results"], out)
    before = read_group(out, "training")
    t0 = time.perf_counter()
    code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1", "--out", str(out),
                         "--group", "training", "--device", "cpu", "--samples", "100000"])
    assert code == 2 and "already has a group 'training'" in err and "--replace-group" in err
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1", "--out", str(bad),
                         "--device", "cpu", "--samples", "100000"])
    assert code == 2 and "not a readable HDF5 results file" in err
    assert time.perf_counter() - t0 < 30  # 100,000 sweep steps would take far longer: refused before work
    assert read_group(out, "training").identical(before)
    code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1", "--out", str(out),
                         "--group", "training", "--replace-group", "--device", "cpu", "--data", "none", *SMALL])
    assert code == 0, err
    assert read_group(out, "training").attrs["kind"] == "measurement"


def test_measure_prints_where_the_structure_is(measured):
    """`measure` ends with the flags, I(X;Y) at T_train, the heat-capacity peak and the reference temperatures,
    each read from the group it wrote."""
    text = (measured.parent / "measure_joint.txt").read_text()
    lines = text.splitlines()
    ds = xr.open_dataset(measured, group="measure_joint", engine="h5netcdf")
    n = ds.sizes["temperature"]
    flagged = [t for i, t in enumerate(ds.temperature.values)
               if any(int(ds[v].values[i]) for v in ds.data_vars if v.startswith("flag_"))]
    assert f"unflagged at {n - len(flagged)} of {n} temperatures" in text
    i_xy = float(ds.I_XY_bits.sel(temperature=1.0))
    assert any(line.startswith(f"at T_train: I(X;Y) = {round(i_xy, 3) + 0.0:.3f} ±") for line in lines), lines
    peak = (f"heat-capacity peak T* = {float(ds.C_peak_T):.4g}" if np.isfinite(float(ds.C_peak_T))
            else "heat-capacity peak: ")
    assert any(line.startswith(peak) for line in lines), lines
    assert lines[-1].startswith("temperatures (in units of T_train): T_train = 1")
