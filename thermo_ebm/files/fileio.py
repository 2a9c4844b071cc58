"""Atomic file replacement and inter-process locks for checkpoints and results files (POSIX and Windows:
the locks come from the portable `filelock` package)."""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import filelock

from ..errors import ThermoEBMError


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename in it is durable (a no-op on Windows)."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; os.replace is durable there
        return
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, copy_existing: bool = False):
    """Yield a temporary path in the same folder; on success fsync it and os.replace onto `path`.

    With copy_existing=True the temporary file starts as a copy of `path` (for appending a group to an
    HDF5 file without ever exposing a half-written file). On error the temporary file is removed and
    `path` is untouched. A symlink is followed (its target is replaced, the link kept), and the file keeps its
    permission bits (a new file gets 0o666 less the umask, as open() would give it).
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        if copy_existing and path.exists():
            shutil.copyfile(path, tmp)
        else:
            tmp.unlink()
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_folder(path, what: str) -> None:
    """Before any long work: the folder `path` will be written in (its nearest existing ancestor, created on
    write) is a writable folder; `what` names the file in the error."""
    path = Path(path)
    folder = next((q for q in [path.parent, *path.parent.parents] if q.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK) or path.is_dir():
        raise ThermoEBMError(f"cannot write {what} {path}: {folder} is not a writable folder")


def remove_stale_tmp(path) -> list:
    """Remove the temporary files `atomic_path(path)` leaves when its process is killed mid-write; call only
    while holding the lock that guards writes to `path`. Returns the removed paths."""
    path = Path(path)
    gone = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def lock_path(path) -> Path:
    """The lock file guarding `path`: an empty file named by a hash of path's resolved location (a symlink's
    target) in a private folder of the system's temporary directory, so nothing appears beside the user's files.
    It is inert between runs: the lock is the operating system's, held only while the process that took it is
    alive."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    folder = Path(tempfile.gettempdir()) / f"thermo-ebm-locks-{getpass.getuser()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{key}.lock"


@contextlib.contextmanager
def file_lock(path, timeout: float = 600.0, busy: str | None = None):
    """Exclusive lock guarding `path`; waits up to `timeout` s, then refuses clearly (with the message `busy`
    when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path(path)), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ThermoEBMError(busy or f"{path} is being written by another process; try again later") from None
    try:
        yield
    finally:
        lock.release()
