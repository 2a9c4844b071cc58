"""Progress: a tqdm bar on a terminal; elsewhere (logs, CI, pipes) an INFO line at most every
`LOG_EVERY` seconds; nothing when disabled, with -q/--quiet, or with TQDM_DISABLE set."""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("thermo_ebm")
LOG_EVERY = 30.0  # seconds between progress lines without a terminal


def _env_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


class LogProgress:
    """The part of tqdm's interface the loops use, writing a log line at most every LOG_EVERY s."""

    def __init__(self, iterable=None, *, total=None, desc="", initial=0):
        self.iterable, self.desc, self.n = iterable, desc, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix, self.last = "", time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        if time.monotonic() - self.last >= LOG_EVERY:
            self.last = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s%s", self.desc, self.n, of, f" ({self.postfix})" if self.postfix else "")

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self):
        pass

    def __enter__(self):  # `with progress_bar(...) as bar:` closes it as tqdm does
        return self

    def __exit__(self, *exc):
        self.close()


class _Off(LogProgress):
    def update(self, n=1):
        self.n += n


def progress_bar(iterable=None, *, enabled=True, total=None, desc="", initial=0, leave=False):
    """A tqdm bar on a terminal, LogProgress elsewhere, a silent stand-in when disabled; iterate it or
    call update/set_postfix/close (or use it in a `with` block)."""
    quiet = not enabled or _env_disabled() or log.getEffectiveLevel() > logging.INFO
    if quiet:
        return _Off(iterable, total=total, desc=desc, initial=initial)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, initial=initial)
