"""Results files: HDF5, one group per training history or measurement, readable with h5py and with
xarray.open_dataset(path, group=..., engine="h5netcdf").

Every write rebuilds the file in a temporary file beside it (other groups re-serialised through xarray),
fsyncs it and
os.replace()s it over the original, under an exclusive lock: readers see the old or the new file, never a
half-written one, and concurrent writers queue.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import xarray as xr

from .errors import ThermoEBMError
from .fileio import atomic_path, file_lock


def write_group(path, group: str, ds: xr.Dataset, *, lock_timeout: float = 600.0) -> str:
    """Write `ds` as `group` of `path` (replacing only that group); returns the group name."""
    path = Path(path)
    with file_lock(path, lock_timeout):
        others = {}
        if path.exists():
            for name in list_groups(path):
                if name != group:  # netCDF groups hold object references: rebuild them, never h5py-copy
                    with xr.open_dataset(path, group=name, engine="h5netcdf") as g:
                        others[name] = g.load()
        with atomic_path(path) as tmp:
            mode = "w"
            for name, g in {**others, group: ds}.items():
                g.to_netcdf(tmp, mode=mode, group=name, engine="h5netcdf")
                mode = "a"
    return group


def new_group_name(path, base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... so that an existing group is never replaced."""
    names = set(list_groups(path)) if Path(path).exists() else set()
    if base not in names:
        return base
    i = 2
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def _open_h5(path):
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise ThermoEBMError(f"results file not found: {path}") from None
    except OSError as e:
        raise ThermoEBMError(f"{path} is not a readable HDF5 results file ({str(e).splitlines()[0][:120]})") from None


def list_groups(path) -> dict:
    """{group name: kind} for every top-level group ('training', 'measurement' or 'other')."""
    with _open_h5(path) as f:
        out = {}
        for name in f:
            kind = f[name].attrs.get("kind", "other")
            out[name] = kind.decode() if isinstance(kind, bytes) else str(kind)
        return out


def read_group(path, group: str) -> xr.Dataset:
    groups = list_groups(path)
    if group not in groups:
        raise ThermoEBMError(f"{path} has no group {group!r} (groups: {', '.join(groups) or 'none'})")
    with xr.open_dataset(path, group=group, engine="h5netcdf") as ds:
        return ds.load()


def groups_of_kind(path, kind: str) -> list:
    return [g for g, k in list_groups(path).items() if k == kind]
