"""Results files: HDF5, one group per training history, measurement or evaluation, readable with h5py, with
xarray.open_dataset(path, group=..., engine="h5netcdf") and, all groups at once, with `open_results`.

A write appends one group in place: under an exclusive lock the file is copied beside itself, the group is
added to the copy (everything else in the file, including groups and attributes other tools wrote, is left
as it is), and the copy is fsynced and os.replace()d over the original. Readers see the old or the new file,
never a half-written one; concurrent writers queue, and a group name chosen automatically is chosen under
the lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import xarray as xr

from ..errors import ThermoEBMError
from .fileio import atomic_path, check_writable_folder, file_lock


def write_group(path, group: str | None, ds: xr.Dataset, *, replace: bool = False, base: str | None = None,
                lock_timeout: float = 600.0) -> str:
    """Add `ds` to results file `path` as `group`, or (group None) as the first free name of `base`,
    `base_2`, ...; an existing `group` is an error unless replace. Returns the group name."""
    path = Path(path)
    if group is None and not base:
        raise ValueError("write_group needs a group or a base name")
    check_group_name(group)
    with file_lock(path, lock_timeout):
        names = set(list_groups(path)) if path.exists() else set()
        if group is None:
            group = free_name(names, base)
        elif group in names and not replace:
            raise _group_taken(path, group)
        with atomic_path(path, copy_existing=True) as tmp:
            if group in names:
                with h5py.File(tmp, "a") as f:
                    del f[group]
            ds.to_netcdf(tmp, mode="a" if tmp.exists() else "w", group=group, engine="h5netcdf")
    return group


def _group_taken(path, group):
    return ThermoEBMError(f"{path} already has a group {group!r}; choose another --group or pass --replace-group")


GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_group_name(group: str | None) -> None:
    """A group name is one HDF5 path component: letters, digits, '_', '.', '-', not starting with '.' or '-'
    (so not the root '', a nested 'a/b', '.' or '..')."""
    if group is not None and not GROUP_NAME.fullmatch(group):
        raise ThermoEBMError(f"invalid --group {group!r}: use letters, digits, '_', '.' or '-' (at most 128, "
                             "starting with a letter, digit or '_')")


def check_group(path, group: str | None, replace: bool = False) -> None:
    """Before any work starts: `path` is a usable results-file name (check_output_path), the group name is valid,
    and an explicit group that exists in the file is an error unless replace."""
    check_group_name(group)
    check_output_path(path)
    if group and not replace and Path(path).exists() and group in list_groups(path):
        raise _group_taken(path, group)


@contextlib.contextmanager
def reserve_group(path, group: str | None):
    """Hold the name `group` of results file `path` for the length of a run, so that a second writer of the same
    group is refused before its work starts (an automatic name, None, is chosen at write time instead)."""
    if not group:
        yield
        return
    key = Path(f"{Path(path).resolve()}::group::{group}")
    with file_lock(key, timeout=0.0, busy=f"another process is writing group {group!r} of {path}; wait for it or "
                   "choose another --group"):
        yield


def free_name(names, base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first name not in `names`."""
    if base not in names:
        return base
    i = 2
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def _open_h5(path):
    if Path(path).is_dir():
        raise ThermoEBMError(f"{path} is a directory, not a results file")
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise ThermoEBMError(f"results file not found: {path}") from None
    except OSError as e:
        raise ThermoEBMError(f"{path} is not a readable HDF5 results file ({str(e).splitlines()[0][:120]})") from None


SUFFIXES = (".h5", ".hdf5", ".nc")


def check_output_path(path) -> None:
    """Before any long work: `path` names a results file (.h5, .hdf5, .nc) whose folder can be written, and an
    existing `path` is a readable HDF5 file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ThermoEBMError(f"results file {path} must end in {', '.join(SUFFIXES)} (it is HDF5)")
    if path.exists():
        _open_h5(path).close()
        if not os.access(path, os.W_OK):
            raise ThermoEBMError(f"results file {path} is not writable")
    check_writable_folder(path, "results file")


def list_groups(path) -> dict:
    """{group name: kind} for every top-level group ('training', 'measurement', 'evaluation' or 'other')."""
    with _open_h5(path) as f:
        out = {}
        for name in f:
            if not isinstance(f[name], h5py.Group):
                continue
            kind = f[name].attrs.get("kind", "other")
            out[name] = kind.decode() if isinstance(kind, bytes) else str(kind)
        return out


def read_group(path, group: str) -> xr.Dataset:
    """One group as an in-memory xarray.Dataset."""
    groups = list_groups(path)
    if group not in groups:
        raise ThermoEBMError(f"{path} has no group {group!r} (groups: {', '.join(groups) or 'none'})")
    with xr.open_dataset(path, group=group, engine="h5netcdf", phony_dims="sort") as ds:
        return ds.load()


def groups_of_kind(path, kind: str) -> list:
    """Names of the groups of a results file whose kind is `kind`."""
    return [g for g, k in list_groups(path).items() if k == kind]


def open_results(path) -> xr.DataTree:
    """Every group of a results file as an in-memory xarray.DataTree (tree["measure_joint"].ds, ...)."""
    groups = list_groups(path)
    return xr.DataTree.from_dict({f"/{name}": read_group(path, name) for name in groups})


# ---- self-describing files: provenance and CF-style variable metadata

def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_COMMAND_LINE: list = []  # set by the CLI for the command it runs; else sys.argv


@contextlib.contextmanager
def invoked_as(argv):
    """Record `argv` (e.g. ["thermo-ebm", "measure", ...]) as the command line of groups written meanwhile."""
    _COMMAND_LINE.append(list(argv))
    try:
        yield
    finally:
        _COMMAND_LINE.pop()


def provenance() -> dict:
    """Attributes saying how a group was made: command line, UTC time, package versions."""
    versions = {"python": platform.python_version()}
    for pkg in ("thermo-ebm", "torch", "numpy", "scipy", "pymbar", "h5netcdf", "h5py", "xarray"):
        try:
            versions[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = "not installed"
    out = {"Conventions": "CF-1.10", "command_line": shlex.join(_COMMAND_LINE[-1] if _COMMAND_LINE else sys.argv),
           "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "working_directory": os.getcwd(),
           "platform": platform.platform(), "versions": json.dumps(versions)}
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    return out


def git_commit() -> str | None:
    """The commit of the thermo-ebm checkout this package runs from ("+dirty" with uncommitted changes), or
    None when it is not a git checkout (an installed wheel) or git is absent."""
    import subprocess
    here = Path(__file__).resolve().parent
    if not (here.parent / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(here.parent), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# name -> (long_name, units); units "E" means the energy units of the measurement, "T" the temperature units
VARIABLES = {
    "log_Z": ("log partition function, Lebesgue measure on the box", "nats"),
    "F": ("free energy -T log Z", "E"), "U": ("mean energy <E>_T", "E"),
    "S": ("entropy (U - F) / T", "nats"), "C": ("heat capacity Var_T(E) / T^2", "nats"),
    "info_bits": ("information log Omega - S", "bits"),
    "H_Y_bits": ("label entropy H(Y) under p_T", "bits"),
    "p_y": ("class share p_T(y) of the joint ensemble (the label marginal)", "1"),
    "H_Y_given_X_bits": ("conditional label entropy H(Y|X) under p_T", "bits"),
    "I_XY_bits": ("mutual information I(X;Y) under p_T", "bits"),
    "log_Z_reverse": ("log Z from reverse annealing of the sweep chains (cross-check, not a bound)", "nats"),
    "log_Z_gap": ("log_Z_reverse - log_Z (systematic-error estimate)", "nats"),
    "log_Z_forward": ("log Z from forward AIS started from uniform", "nats"),
    "log_Z_mbar": ("log Z from MBAR on the sweep samples (cross-check)", "nats"),
    "U_resid": ("U of the sweep chains - U of the annealing weights", "E"),
    "C_resid": ("C - dU/dT (consistency residual)", "nats"),
    "C_anneal_resid": ("C of the sweep chains - C from the annealing weights", "nats"),
    "C_missed": ("share of C at energies the sweep chains never visited, from the annealing weights (in C)", "nats"),
    "U_missed": ("share of U at energies the sweep chains never visited, from the annealing weights (in U)", "E"),
    "origin_gap": ("log Z from data-seeded annealing - log Z from uniform", "nats"),
    "origin_U_gap": ("U from data-seeded annealing - U from uniform", "E"),
    "base_gap": ("largest replica log Z of the check base (check_chains) - log replicas - (log_Z + 4 SE); "
                 "flag_hysteresis above 9", "nats"),
    "log_Z_shift": ("change of log Z when the schedules were last doubled (max_time)", "nats"),
    "missed_phase_replicas": ("replica ESS / replicas of the annealing weights' mass at energies the sweep chains "
                              "never visited (flag_rare_phase below one half)", "1"),
    "label_mix_z": ("largest |p_T(y) of the sweep chains - p_T(y) of the data-seeded weights| / SE over y", "1"),
    "ess": ("effective sample size of the reported log Z weights", "1"),
    "ess_forward": ("effective sample size of the forward AIS weights", "1"),
    "pareto_k": ("Pareto k-hat of the reported log Z weights (SMC: relative to each population's mean)", "1"),
    "population_ess": ("SMC: ESS of the populations' Z estimates (flagged below half the populations)", "1"),
    "ais_accept": ("annealing acceptance rate", "1"), "accept": ("sweep acceptance rate", "1"),
    "swap_accept": ("replica-exchange acceptance with the next temperature (the lowest on the helper ladder "
                    "between them)", "1"),
    "sweep_helpers": ("helper temperatures the sweep inserted between this temperature and the next (mean over "
                      "shards)", "1"),
    "tau_E": ("integrated autocorrelation time of E in the sweep", "sweeps"),
    "step_size": ("sweep MALA step size", "1"),
    "C_peak_T": ("temperature of the heat-capacity maximum", "T"),
    "C_peak_flag": ("1: a flag that affects C is raised at or next to the heat-capacity maximum", "1"),
    "log_Z_cov": ("covariance of log_Z between temperatures", "nats^2"),
    "C_cov": ("covariance of C between temperatures", "nats^2"),
    "samples": ("states of the sweep chains in the box [-1, 1]", "1"),
    "sample_labels": ("labels of the sweep chains", "1"),
    "accuracy": ("held-out accuracy", "1"), "nll": ("held-out negative log-likelihood of y", "nats"),
    "brier": ("held-out Brier score", "1"), "ece": ("expected calibration error, 15 equal-mass bins", "1"),
    "t_cal": ("temperature minimising held-out NLL of softmax(f / T)", "logits' units"),
    "T_ML_quick": ("screening T_ML: where held-out-seeded chains' mean energy equals the images' "
                   "(nan outside 0.25-4 T_train: T_ML_quick_side)", "T"),
    "reliability_confidence": ("mean confidence per equal-mass bin", "1"),
    "reliability_accuracy": ("accuracy per equal-mass bin", "1"),
    "auroc": ("AUROC, held-out (positive) vs shifted inputs", "1"),
    "aupr": ("average precision, held-out (positive) vs shifted inputs", "1"),
    "saturated_fraction": ("fraction of sample pixels with |x| > 0.99", "1"),
    "confidence": ("mean max-softmax of the model on the samples", "1"),
    "pca_frechet": ("Frechet distance to held-out images in 32 principal components", "1"),
    "mnist_feature_frechet": ("Frechet distance to held-out images in a small MNIST CNN's 64 features", "1"),
    "chain_samples": ("replay-buffer and long-run chain states in the box", "1"),
    "scores": ("OOD scores (larger: more in-distribution) of held-out and shifted inputs", "1"),
    "log_lik_heldout": ("mean held-out log p_T(x) per image (dequantised; docs/estimators.md)", "nats"),
    "log_lik_xy_heldout": ("mean held-out log p_T(x, y) per image", "nats"),
    "log_lik_y_given_x_heldout": ("mean held-out log p_T(y | x)", "nats"),
    "log_lik_heldout_cov": ("covariance of log_lik_heldout between temperatures", "nats^2"),
    "info_heldout_bits": ("bits saved over uniform coding per held-out image: (log p_T(x) + d log 2) / log 2", "bits"),
    "bits_per_dim_heldout": ("held-out code length of the quantised images per dimension", "bits"),
    "log_lik_train": ("mean log p_T(x) of as many training-split images", "nats"),
    "generalisation_gap": ("log_lik_train - log_lik_heldout (log Z cancels)", "nats"),
    "E_heldout": ("mean energy of the held-out images (T_ML: where U equals it)", "E"),
    "T_ML": ("maximum-likelihood temperature: U(T_ML) = E_heldout (nan outside the range: T_ML_side)", "T"),
    "temperature": ("temperature", "T"), "temperature_b": ("temperature (second axis of covariances)", "T"),
    "temperature_raw": ("temperature on the logits' scale (T x T_train)", "logits' units"),
}


# units that UDUNITS (CF) does not know: stored as units "1" with the scale in `units_metadata`
NON_UDUNITS = {"nats": "nats (natural-log information units, k_B = 1)", "bits": "bits",
               "nats^2": "nats^2", "T_train": "units of the training temperature T_train",
               "logits' units": "the logits' scale", "sweeps": "sweeps of the sampler"}

# the training group: population-free names, then <population>_<name> for the joint and marginal chains
TRAINING = {
    "loss": ("training loss", "nats"), "ce": ("cross-entropy of the batch's labels", "nats"),
    "reg": ("energy-magnitude penalty", "nats"), "train_acc": ("batch accuracy", "1"),
    "lr": ("learning rate", "1"), "heldout_acc": ("held-out accuracy at the end of the epoch", "1"),
    "heldout_ce": ("held-out cross-entropy at the end of the epoch", "nats"),
    "epoch_end_step": ("optimizer step at the end of the epoch", "1"), "seconds": ("wall time since the start", "s"),
    "step": ("optimizer step (1-based)", "1"), "epoch": ("epoch (1-based)", "1"),
    "event_step": ("optimizer step of a training event (rollback, stop)", "1"),
    "event_message": ("what happened at event_step", None),
}
TRAINING_POPULATION = {
    "e_data": ("mean energy of the batch's data", "logits' units"),
    "e_model": ("mean energy of the sampler chains", "logits' units"),
    "ml": ("maximum-likelihood term e_data - e_model", "logits' units"),
    "W": ("mean cumulative work per walker (energy change from parameter updates)", "logits' units"),
    "Q": ("mean cumulative heat per walker (energy change from the moves)", "logits' units"),
    "dW": ("work of this step per walker", "logits' units"), "dQ": ("heat of this step per walker", "logits' units"),
    "jarzynski": ("Jarzynski estimate -log <exp(-W)> of the free-energy change since the start", "logits' units"),
    "dF": ("free-energy change since the start (Jarzynski)", "logits' units"),
}


def _set_units(var, units):
    if units is None:
        return
    if units in NON_UDUNITS:
        var.attrs.update(units="1", units_metadata=NON_UDUNITS[units])
    else:
        var.attrs["units"] = units


def annotate_training(ds: xr.Dataset) -> xr.Dataset:
    """long_name and units (CF) on every variable of a training group."""
    def describe(name):
        pop, _, rest = name.partition("_")
        if name in TRAINING:
            return TRAINING[name]
        if pop in ("joint", "marginal") and rest in TRAINING_POPULATION:
            long_name, units = TRAINING_POPULATION[rest]
            return f"{pop} chains: {long_name}", units
        return None
    for name in list(ds.variables):
        if (found := describe(name)) is not None:
            ds[name].attrs["long_name"] = found[0]
            _set_units(ds[name], found[1])
    return ds


def annotate(ds: xr.Dataset, temperature_units: str, energy_units: str) -> xr.Dataset:
    """CF-style metadata: long_name and units on every variable (UDUNITS strings; a scale UDUNITS lacks, such as
    nats or T_train, is units "1" with `units_metadata` naming it), ancillary_variables from a value to its
    `_err`, flag_values/flag_meanings on the flags."""
    t_units = "T_train" if temperature_units == "train" else "logits' units"
    e_units = "T_train" if energy_units.startswith("T_train") else "logits' units"
    for name in list(ds.variables):
        var = ds[name]
        base = name[:-4] if name.endswith("_err") else name
        if name.startswith("flag_"):
            var.attrs.update(long_name=name[5:].replace("_", " ") + " flag", flag_values=np.array([0, 1], np.int8),
                             flag_meanings="ok flagged", units="1")
            continue
        if base not in VARIABLES:
            continue
        long_name, units = VARIABLES[base]
        units = {"E": e_units, "T": t_units}.get(units, units)
        if name.endswith("_err"):
            var.attrs["long_name"] = f"standard error of {base}"
        else:
            var.attrs["long_name"] = long_name
            if name + "_err" in ds:
                var.attrs["ancillary_variables"] = name + "_err"
        _set_units(var, units)
    return ds
