"""Results files that never lose data and explain themselves; the command line's manners (issue #18)."""
import os
import multiprocessing as mp
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
import torch
import xarray as xr

import thermo_ebm
from thermo_ebm.cli import cli, parse_temps
from thermo_ebm.config import MeasureConfig, TrainConfig
from thermo_ebm.measurement.dataset import save_measurement
from thermo_ebm.files.results import list_groups, open_results, read_group, write_group
from thermo_ebm.testing import TruncatedGaussian

from test_cli_reliability import SMALL, run_cli

TINY_BUDGET = dict(ais_chains=64, ais_steps=200, ais_steps_per_l2=2.0, chains=8, burn_in=40, samples=200,
                   reverse_steps=40, replicas=8, mbar=False)


@pytest.fixture(scope="module")
def small_measurement():
    """A measurement of a 4-d box Gaussian at 0.5, 0.6, ..., 1.0 (temperatures parsed as the CLI does)."""
    system = TruncatedGaussian(d=4, seed=3)
    temps = parse_temps("0.5:1:0.1")
    return system, temps, thermo_ebm.measure(system, temps, shape=(4,), seed=1, **TINY_BUDGET)


def _save_auto(path, i):
    ds = xr.Dataset({"a": ("t", np.full(50, float(i)))}, attrs={"kind": "measurement", "ensemble": "marginal"})
    save_measurement(ds, path)


def test_automatic_group_names_are_chosen_under_the_lock(tmp_path):
    """Four processes writing with automatic names: four groups, none lost."""
    path = tmp_path / "r.h5"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_save_auto, args=(path, i)) for i in range(4)]
    [p.start() for p in procs]
    [p.join() for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    groups = list_groups(path)
    assert set(groups) == {"measure_marginal", "measure_marginal_2", "measure_marginal_3", "measure_marginal_4"}
    assert sorted(float(read_group(path, g).a[0]) for g in groups) == [0.0, 1.0, 2.0, 3.0]


def test_a_write_leaves_everything_else_in_the_file_intact(tmp_path):
    path = tmp_path / "r.h5"
    ds = xr.Dataset({"a": ("t", np.arange(5.0))}, attrs={"kind": "measurement"})
    write_group(path, "first", ds)
    with h5py.File(path, "a") as f:  # what another tool adds
        f.attrs["lab_notebook"] = "page 12"
        g = f.create_group("annotations")
        g.create_dataset("z", data=np.arange(7))
        g.attrs["who"] = "someone else"
    before = read_group(path, "first")
    write_group(path, "second", ds)
    write_group(path, "second", ds.assign(a=ds.a * 2), replace=True)
    with h5py.File(path, "r") as f:
        assert f.attrs["lab_notebook"] == "page 12"
        assert f["annotations"].attrs["who"] == "someone else"
        np.testing.assert_array_equal(f["annotations/z"][:], np.arange(7))
    assert read_group(path, "first").identical(before)
    np.testing.assert_array_equal(read_group(path, "second").a.values, np.arange(5.0) * 2)
    with pytest.raises(thermo_ebm.ThermoEBMError, match="already has a group 'second'"):
        write_group(path, "second", ds)


def test_temperatures_are_stored_as_given_and_variables_explain_themselves(small_measurement, tmp_path):
    _, temps, ds = small_measurement
    path = tmp_path / "r.h5"
    save_measurement(ds, path)
    back = xr.open_dataset(path, group="measure_marginal", engine="h5netcdf")
    assert float(back.sel(temperature=0.9).temperature) == 0.9  # not 0.8999999999999999
    assert back.attrs["Conventions"].startswith("CF-")
    for name, var in back.data_vars.items():
        assert var.attrs.get("long_name") and var.attrs.get("units"), name
    assert back.F.attrs["ancillary_variables"] == "F_err"
    assert back.F_err.attrs["long_name"] == "standard error of F"
    assert list(back.flag_low_ess.attrs["flag_values"]) == [0, 1]
    assert back.flag_low_ess.attrs["flag_meanings"] == "ok flagged"
    # UDUNITS strings only: scales UDUNITS lacks are "1" with units_metadata naming them
    from thermo_ebm.files.results import NON_UDUNITS
    assert not {v.attrs["units"] for v in back.variables.values() if "units" in v.attrs} & set(NON_UDUNITS)
    assert back.log_Z.attrs["units"] == "1" and back.log_Z.attrs["units_metadata"].startswith("nats")
    assert "T_train" in back.temperature.attrs["units_metadata"]


def test_training_group_variables_explain_themselves(digits_ckpt):
    ds = read_group(digits_ckpt["results"], "training")
    for name, var in ds.variables.items():
        if name != "event_message":
            assert var.attrs.get("long_name") and var.attrs.get("units"), name
    assert ds.marginal_e_data.attrs["units_metadata"] == "the logits' scale"


def test_covariances_give_free_energy_differences_that_hold_against_exact(small_measurement, tmp_path):
    """log_Z_cov and C_cov are stored; F(T2) - F(T1) from them agrees with the exact value within 4 SE."""
    from thermo_ebm.reporting.report import free_energy_difference
    system, temps, ds = small_measurement
    cov = ds.log_Z_cov.values
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), ds.log_Z_err.values, rtol=1e-10)
    np.testing.assert_allclose(np.sqrt(np.diag(ds.C_cov.values)), ds.C_err.values, rtol=1e-10)
    exact = system.exact(temps)
    d = free_energy_difference(ds, 0.5, 1.0)
    exact_df = float(exact["F"][-1] - exact["F"][0])  # temps ascending 0.5 ... 1.0
    assert abs(d["dF"] - exact_df) < 4 * d["dF_err"], (d, exact_df)
    assert d["dF_err"] > 0
    path = tmp_path / "r.h5"
    save_measurement(ds, path)
    code, _ = run_cli(["show", str(path), "--diff", "0.5", "1"])
    assert code == 0
    code, err = run_cli(["show", str(path), "--diff", "0.5", "0.55"])
    assert code == 2 and "not a measured temperature" in err


def test_open_results_returns_every_group(small_measurement, tmp_path):
    _, _, ds = small_measurement
    path = tmp_path / "r.h5"
    save_measurement(ds, path)
    save_measurement(ds, path)
    tree = open_results(path)
    assert set(tree.children) == {"measure_marginal", "measure_marginal_2"}
    assert tree["measure_marginal"].ds.F.identical(read_group(path, "measure_marginal").F)


def test_provenance_and_a_changed_checkpoint_warning(digits_ckpt, tmp_path):
    ck = tmp_path / "m.pt"
    ck.write_bytes(Path(digits_ckpt["checkpoint"]).read_bytes())
    out = tmp_path / "m.h5"
    code, err = run_cli(["measure", "--ckpt", str(ck), "--temps", "1", "--out", str(out), "--data", "none",
                         "--device", "cpu", *SMALL])
    assert code == 0, err
    ds = read_group(out, "measure_joint")  # the default ensemble of a j_ebm
    import hashlib
    assert ds.attrs["checkpoint_sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert ds.attrs["checkpoint_step"] == torch.load(ck, weights_only=True)["step"]
    assert ds.attrs["command_line"].startswith("thermo-ebm measure --ckpt") and ds.attrs["created_utc"].endswith("+00:00")
    versions = __import__("json").loads(ds.attrs["versions"])
    assert {"thermo_ebm", "python", "torch", "numpy", "pymbar", "h5netcdf", "xarray"} <= set(versions)
    from thermo_ebm.reporting.report import report
    assert "has changed" not in report(out)
    assert ds.attrs["checkpoint_abs"] == str(ck.resolve()) and ds.attrs["working_directory"]
    assert ds.attrs.get("git_commit", "x" * 40)[:40].isalnum()  # recorded in a git checkout
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    os.chdir(sub)  # show from another folder: the checkpoint is still found (absolute path recorded)
    assert "no longer on disk" not in report(out) and "has changed" not in report(out)
    os.chdir(tmp_path)
    st = torch.load(ck, weights_only=True)
    torch.save(dict(st, step=st["step"] + 1), ck)
    assert "has changed since it was measured" in report(out)
    ck.unlink()
    assert "no longer on disk" in report(out)


def test_show_on_an_empty_file_and_no_visible_lock_after_a_failed_train(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    from thermo_ebm.reporting.report import report
    assert "no groups yet" in report(tmp_path / "empty.h5")
    code, err = run_cli(["train", "--name", "broken", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere")])
    assert code == 2
    assert not [p for p in Path("checkpoints").glob("*") if not p.name.startswith(".")]
    stale = Path("checkpoints") / ".broken.pt.abc123.tmp"  # as a SIGKILL mid-write leaves it
    stale.write_bytes(b"partial")
    code, err = run_cli(["train", "--name", "broken", "--dataset", "digits", "--epochs", "1", "--max-steps", "2",
                         "--batch-size", "16", "--buffer-size", "64", "--mc-steps", "2", "--model-size", "16"])
    assert code == 0, err  # the earlier failure left nothing that blocks the run
    assert not stale.exists()
    assert sorted(p.name for p in Path("checkpoints").iterdir() if not p.name.startswith(".")) == ["broken.pt"]


def test_progress_in_logs_is_a_few_lines_and_quiet_is_quiet(tmp_path):
    args = ["train", "--name", "p", "--dataset", "digits", "--epochs", "2", "--batch-size", "16",
            "--buffer-size", "64", "--mc-steps", "2", "--model-size", "16"]
    r = subprocess.run([sys.executable, "-m", "thermo_ebm", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and len(r.stderr.splitlines()) < 20, r.stderr
    r = subprocess.run([sys.executable, "-m", "thermo_ebm", "-q", *args, "--overwrite"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_command_line_manners():
    r = subprocess.run([sys.executable, "-m", "thermo_ebm", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and thermo_ebm.__version__ in r.stdout
    defaults = {**{f.name: f.default for f in fields(TrainConfig)}, **{f.name: f.default for f in fields(MeasureConfig)}}
    for name, command in cli.commands.items():
        for p in command.params:
            if not isinstance(p, click.Option):  # arguments are described in the command's help
                continue
            assert getattr(p, "help", None), f"{name} --{p.name} has no help"
            if name in ("train", "measure") and p.name in defaults and p.name not in ("compile",):
                if name == "measure" and p.name in ("device", "seed"):
                    continue
                assert p.default == defaults[p.name], f"{name} --{p.name} default differs from the config"


def test_public_api_names():
    import importlib
    mod = importlib.import_module("thermo_ebm.measurement.run")
    assert callable(thermo_ebm.measure) and mod.measure is thermo_ebm.measure
    assert thermo_ebm.train is importlib.import_module("thermo_ebm.training.loop").train
    doc = thermo_ebm.measure.__doc__
    for word in ("Parameters", "Returns", "flag_hysteresis", "Example", "log_Z_cov"):
        assert word in doc, word
    assert (Path(thermo_ebm.__file__).parent / "py.typed").exists()
    with pytest.raises(thermo_ebm.ThermoEBMError, match="duplicate"):
        thermo_ebm.measure(TruncatedGaussian(d=2), [1.0, 0.5, 1.0], shape=(2,))


def test_import_and_locks_without_fcntl(tmp_path):
    """As on Windows: no fcntl module; the package imports and its locks still exclude."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "import thermo_ebm\nfrom thermo_ebm.files.fileio import file_lock\n"
            "from thermo_ebm import ThermoEBMError\n"
            "with file_lock('x.h5'):\n"
            "    try:\n"
            "        with file_lock('x.h5', timeout=0.0):\n"
            "            raise SystemExit('second lock taken')\n"
            "    except ThermoEBMError:\n"
            "        pass\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_group_names_are_checked_before_any_work(tmp_path, digits_ckpt):
    """The root, nested paths, '.', '..' and names starting with '-' or '.' are refused with exit 2 before
    measuring; the API refuses them too."""
    from thermo_ebm.errors import ThermoEBMError
    for bad in ["", "a/b", ".", "..", "-x", ".hidden"]:
        with pytest.raises(ThermoEBMError, match="invalid --group"):
            write_group(tmp_path / "r.h5", bad, xr.Dataset({"a": ("t", np.zeros(2))}))
        code, err = run_cli(["measure", "--ckpt", str(digits_ckpt["checkpoint"]), "--temps", "1",
                             "--out", str(tmp_path / "r.h5"), "--group", bad])
        assert code == 2 and "invalid --group" in err and "Traceback" not in err, (bad, err)
    assert not (tmp_path / "r.h5").exists()


def test_a_write_keeps_a_symlink_its_target_and_the_mode(tmp_path):
    """Appending through a symlink writes the target and keeps the link; the file's mode survives the atomic
    replace; no lock file appears beside the results."""
    target = tmp_path / "store" / "run.h5"
    write_group(target, "one", xr.Dataset({"a": ("t", np.zeros(3))}))
    target.chmod(0o644)
    link = tmp_path / "run.h5"
    link.symlink_to(target)
    write_group(link, "two", xr.Dataset({"a": ("t", np.ones(3))}))
    assert link.is_symlink() and set(list_groups(target)) == {"one", "two"}
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "store"]


def test_temps_with_an_empty_item_are_refused():
    from thermo_ebm.errors import ThermoEBMError
    with pytest.raises(ThermoEBMError, match="empty item"):
        parse_temps("1,,2")
    assert list(parse_temps("1, 2")) == [1.0, 2.0]


def test_m_ebm_labels_are_flagged_and_auto_measures_its_marginal(tmp_path, caplog):
    """An m_ebm never trained its labels: `auto` measures the marginal ensemble, and joint measurement and
    conditional sampling say so (a j_ebm gets joint and no warning)."""
    from thermo_ebm import train
    from thermo_ebm.files.checkpoint import load_checkpoint
    from thermo_ebm.measurement.inputs import resolve_ensemble
    from thermo_ebm.evaluation.sample import sample_to_png
    out = train(name="m", objective="m_ebm", dataset="digits", epochs=1, max_steps=2, batch_size=32, buffer_size=64,
                mc_steps=2, model_size=16, checkpoint_dir=str(tmp_path / "c"), results_dir=str(tmp_path / "r"),
                progress=False)
    ck = load_checkpoint(out["checkpoint"])
    assert resolve_ensemble("auto", ck, 10) == "marginal"
    assert resolve_ensemble("auto", dict(ck, config=dict(ck["config"], objective="j_ebm")), 10) == "joint"
    assert resolve_ensemble("auto", None, 1) == "marginal" and resolve_ensemble("auto", None, 4) == "joint"
    with caplog.at_level("WARNING", logger="thermo_ebm"):
        assert resolve_ensemble("joint", ck, 10) == "joint"
        sample_to_png(out["checkpoint"], 1.0, label=3, n=4, steps=2, out=str(tmp_path / "g.png"), device="cpu")
    assert caplog.text.count("labels were never trained") == 2


def test_show_explains_a_negative_mutual_information(tmp_path):
    """I(X;Y) = H(Y) - H(Y|X) from two estimators can come out slightly below 0; `show` says how to read it."""
    from thermo_ebm.reporting.report import report
    t = [0.5, 1.0]
    v = {k: ("temperature", np.array([1.0, 2.0])) for k in ("F", "U", "S", "C", "info_bits", "log_Z")}
    v.update({k + "_err": ("temperature", np.array([0.1, 0.1])) for k in list(v)})
    v["I_XY_bits"], v["I_XY_bits_err"] = ("temperature", np.array([-5.8e-5, 0.3])), ("temperature", np.full(2, 2.5e-5))
    write_group(tmp_path / "r.h5", "measure_joint", xr.Dataset(v, coords={"temperature": t},
                                                                attrs={"kind": "measurement", "ensemble": "joint"}))
    text = report(tmp_path / "r.h5")
    assert "I_XY_bits below 0 at T = 0.5:" in text and "1:" not in text.split("below 0")[1].split("\n")[0]


def test_information_at_t_train_is_printed_to_a_thousandth_of_a_bit():
    """A one-class ensemble's I(X;Y) is zero up to rounding (-1e-15 bits with an SE of 1e-16): the summary line
    prints it as 0.000, and a real value to the same precision."""
    from thermo_ebm.reporting.report import information_line
    ds = xr.Dataset({"I_XY_bits": ("temperature", [1.2234, -9.61e-16]), "I_XY_bits_err": ("temperature", [0.0512, 8.3e-17]),
                     "H_Y_bits": ("temperature", [2.5, 1e-15]), "H_Y_bits_err": ("temperature", [0.01, 1e-16])},
                    coords={"temperature": [0.5, 1.0]}, attrs={"temperature_units": "train"})
    assert information_line(ds) == "at T_train: I(X;Y) = 0.000 ±0.000 bits, H(Y) = 0.000 ±0.000 bits"
    ds["I_XY_bits"].values[:] = [0.0, 1.2234]
    assert information_line(ds).startswith("at T_train: I(X;Y) = 1.223 ±0.000 bits")
    assert information_line(ds.assign_attrs(temperature_units="raw")) is None


def test_show_says_where_one_class_holds_the_joint_ensemble(tmp_path):
    """p_T(y) is stored per class; where one class holds >= 99% of the mass, H(Y) ~ 0 and so I(X;Y) ~ 0, and
    `show` names the class and the temperatures (and stays silent where the classes share the mass)."""
    from thermo_ebm.reporting.report import report
    t = [0.5, 1.0, 2.0]
    v = {k: ("temperature", np.array([1.0, 2.0, 3.0])) for k in ("F", "U", "S", "C", "info_bits", "log_Z")}
    v.update({k + "_err": ("temperature", np.full(3, 0.1)) for k in list(v)})
    p_y = np.array([[0.001, 0.999, 0.0], [0.005, 0.995, 0.0], [0.3, 0.4, 0.3]])
    v["p_y"], v["p_y_err"] = (("temperature", "class"), p_y), (("temperature", "class"), np.full((3, 3), 1e-3))
    write_group(tmp_path / "r.h5", "measure_joint", xr.Dataset(v, coords={"temperature": t, "class": [0, 1, 2]},
                                                                attrs={"kind": "measurement", "ensemble": "joint"}))
    text = report(tmp_path / "r.h5")
    line = [x for x in text.splitlines() if x.startswith("one class holds")]
    assert len(line) == 1 and "for class 1) at T = 0.5, 1:" in line[0], text
    import json
    doc = json.loads(report(tmp_path / "r.h5", as_json=True))["groups"]["measure_joint"]
    assert np.allclose(doc["p_y"]["values"], p_y)
    v["p_y"] = (("temperature", "class"), np.full((3, 3), 1 / 3))
    write_group(tmp_path / "r.h5", "measure_joint", xr.Dataset(v, coords={"temperature": t, "class": [0, 1, 2]},
                                                                attrs={"kind": "measurement", "ensemble": "joint"}),
                replace=True)
    assert "one class holds" not in report(tmp_path / "r.h5")


def test_global_flags_groups_interrupts_and_permissions(tmp_path, small_measurement, monkeypatch):
    """-q/-v/--debug after the subcommand; show/plot --group; Ctrl-C exits 130; a folder the user cannot write
    gets exit 2 and one line."""
    _, _, ds = small_measurement
    path = tmp_path / "two.h5"
    save_measurement(ds, path)
    save_measurement(ds, path)  # measure_marginal and measure_marginal_2
    code, err = run_cli(["show", str(path), "-q", "--group", "measure_marginal_2"])
    assert code == 0, err
    from thermo_ebm.reporting.report import report
    text = report(path, groups=["measure_marginal_2"])
    assert "[measure_marginal_2]" in text and "[measure_marginal]" not in text
    code, err = run_cli(["show", str(path), "--group", "nope"])
    assert code == 2 and "no group 'nope'" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(["plot", str(path), "--group", "measure_marginal", "--out", str(tmp_path / "f.png")])
    assert code == 0, err
    from thermo_ebm.reporting.plot import _measurements
    assert [r[0] for r in _measurements([path], ["measure_marginal"])] == ["two"]
    import thermo_ebm.reporting.report as rep

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "report", interrupted)
    code, err = run_cli(["show", str(path)])
    assert code == 130 and "interrupted" in err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/read-only/run.h5")
    monkeypatch.setattr(rep, "report", denied)
    code, err = run_cli(["show", str(path)])
    assert code == 2 and "permission denied: /read-only/run.h5" in err and len(err.strip().splitlines()) == 1


def test_a_second_writer_of_a_group_is_refused_before_any_work(tmp_path, digits_ckpt):
    from thermo_ebm.files.results import reserve_group
    out = tmp_path / "r.h5"
    with reserve_group(out, "mine"):  # what a running `measure --group mine` holds
        code, err = run_cli(["measure", "--ckpt", digits_ckpt["checkpoint"], "--temps", "1", "--out", str(out),
                             "--group", "mine", "--device", "cpu", *SMALL])
    assert code == 2 and "another process is writing group 'mine'" in err
    assert not out.exists()


def test_messages_name_command_line_options():
    from thermo_ebm import measure
    with pytest.raises(thermo_ebm.ThermoEBMError, match=r"--max-time \(max_time\)"):
        measure(TruncatedGaussian(2), [1.0], max_time=-1, data=None)
    with pytest.raises(thermo_ebm.ThermoEBMError, match=r"--ais-chains \(ais_chains\) must be a positive integer"):
        measure(TruncatedGaussian(2), [1.0], ais_chains=0, data=None)
    with pytest.raises(thermo_ebm.ThermoEBMError, match=r"--swap-target \(swap_target\) must lie in \[0, 1\)"):
        measure(TruncatedGaussian(2), [1.0], swap_target=1.5, data=None)


def test_unwritable_folders_are_refused_before_any_work(tmp_path, small_measurement):
    """train and plot check their output folders first (a file where a folder should be: refused even as root)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = run_cli(["train", "--dataset", "digits", "--checkpoint-dir", str(blocker / "ck"), "--epochs", "1"])
    assert code == 2 and "not a writable folder" in err and len(err.strip().splitlines()) == 1
    _, _, ds = small_measurement
    save_measurement(ds, tmp_path / "r.h5")
    code, err = run_cli(["plot", str(tmp_path / "r.h5"), "--out", str(blocker / "fig.png")])
    assert code == 2 and "not a writable folder" in err
