"""Typed records of a measurement's anneals (numpy, ascending beta), one per stage, each able to concatenate the
shards' records (`cat`): per-chain arrays along their chain axis, per-shard summaries along a leading shard
axis [S, ...]."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .. import distributed as dist


class Record:
    """A dataclass of arrays, each concatenated across shards along AXES[name] (None stays None)."""
    AXES: ClassVar[dict] = {}

    @classmethod
    def cat(cls, parts: list):
        """The record of every shard: this process's parts in order, then (under torchrun) every rank's."""
        out = {}
        for f in fields(cls):
            vs = [getattr(q, f.name) for q in parts]
            if vs[0] is None:
                out[f.name] = None
                continue
            v = np.concatenate(vs, axis=cls.AXES[f.name])
            out[f.name] = dist.gather_cat(v, cls.AXES[f.name]) if v.size else v
        return cls(**out)


@dataclass
class ForwardRecord(Record):
    """The counted anneal from uniform (AIS or SMC)."""
    logw: np.ndarray        # [T, N] log-weights at each temperature
    energy: np.ndarray      # [T, N] <E | x> of each chain
    energy2: np.ndarray     # [T, N] <E^2 | x>
    accept: np.ndarray      # [S, T] mean acceptance of the moves ending at each temperature
    nonfinite: np.ndarray   # [S, T] non-finite proposal densities
    AXES = dict(logw=1, energy=1, energy2=1, accept=0, nonfinite=0)


@dataclass
class SeededRecord(Record):
    """The counted anneal from the data-informed base, at every temperature."""
    logw: np.ndarray        # [T, N] log-weights relative to the normalised base
    energy: np.ndarray      # [T, N]
    energy2: np.ndarray     # [T, N]
    p_y: np.ndarray         # [T, N, K] p_T(y | x) of each chain
    accept: np.ndarray      # [S, T]
    nonfinite: np.ndarray   # [S, T]
    steps: np.ndarray       # [S, T] schedule length of each temperature's path (lambdas or SMC stages)
    length: np.ndarray      # [S, T] thermodynamic length of each temperature's path (nan for SMC)
    shares: np.ndarray      # [S, T, P] the base populations' weights
    resampled: np.ndarray   # [S] resampling events per population
    AXES = dict(logw=1, energy=1, energy2=1, p_y=1, accept=0, nonfinite=0, steps=0, length=0, shares=0, resampled=0)


@dataclass
class SweepRecord(Record):
    """The replica-exchange sweep chains (`sweep.SweepResult` without its states) and the kept samples."""
    chain_means: np.ndarray  # [T, C, stats] per-chain production means (`sweep.stat_names`)
    u_trace: np.ndarray      # [n_prod, T, C] per-sample <E | x>
    logits: np.ndarray       # [n_thin, T, C, K] thinned logits (MBAR)
    accept: np.ndarray       # [S, T]
    swap_accept: np.ndarray  # [S, T - 1]
    nonfinite: np.ndarray    # [S, T]
    step: np.ndarray         # [S, T] frozen step sizes
    samples: np.ndarray      # [T, keep, *shape] final states kept for the results file
    labels: np.ndarray | None  # [T, keep] labels drawn from p_T(y | x) (joint ensemble)
    length: np.ndarray       # [S, 2] burn-in and kept production steps per chain (`sweep.SweepLength`)
    helpers: np.ndarray      # [S, T - 1] helper temperatures inserted between neighbours (`sweep.ladder`)
    AXES = dict(chain_means=1, u_trace=2, logits=2, accept=0, swap_accept=0, nonfinite=0, step=0, samples=1,
                labels=1, length=0, helpers=0)


@dataclass
class ReverseRecord(Record):
    """Reverse AIS from the sweep's final states."""
    logw: np.ndarray        # [T, N] log-weights of each segment between neighbouring temperatures
    AXES = dict(logw=1)


@dataclass
class Pooled:
    """Every stage's record of a measurement (`seeded` None without data) and the stages' wall time."""
    forward: ForwardRecord
    seeded: SeededRecord | None
    sweep: SweepRecord
    reverse: ReverseRecord
    seconds: np.ndarray     # [S, 4] seconds of each stage (anneal.STAGES) per shard
    check: SeededRecord | None = None  # the check base's anneal (check_chains), never part of the estimates

    @classmethod
    def cat(cls, parts: list) -> Pooled:
        """All shards' records (see `Record.cat`)."""
        seeded = SeededRecord.cat([q.seeded for q in parts]) if parts[0].seeded is not None else None
        check = SeededRecord.cat([q.check for q in parts]) if parts[0].check is not None else None
        return cls(ForwardRecord.cat([q.forward for q in parts]), seeded, SweepRecord.cat([q.sweep for q in parts]),
                   ReverseRecord.cat([q.reverse for q in parts]),
                   dist.gather_cat(np.concatenate([q.seconds for q in parts]), 0), check)
