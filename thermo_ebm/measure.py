"""`measure`: thermodynamics of a model over a temperature sweep, with standard errors.

Pipeline: tune (pilot anneal) -> frozen schedule -> counted forward AIS (log Z at every sweep T, replica
SEs, ESS) -> temperature-sweep chains started from weight-resampled AIS states (U, C, joint information
quantities; per-chain jackknife SEs) -> cross-checks (reverse AIS upper bound, MBAR, consistency residuals).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import ais
from . import distributed as dist
from .checkpoint import load_checkpoint, model_from_checkpoint
from .ensembles import Ensemble
from .errors import ThermoEBMError
from .estimators import (delta_log_mean_se, derivative, heavy_tail_limit, integrated_autocorr_time, jackknife,
                         jackknife_cov, log_mean_weight, logmeanexp, pareto_k, peak_position, weighted_mean)
from .models import EBM
from .sampling import mala_kernel
from .sweep import run_sweep, stat_names

log = logging.getLogger("thermo_ebm")
LN2 = math.log(2.0)
MBAR_MAX = 1000
logging.getLogger("pymbar").setLevel(logging.ERROR)


@dataclass
class MeasureConfig:
    """Budget of a measurement (defaults: 16 temperatures of a 784-d MLP in minutes on 2 CPU cores)."""
    ais_chains: int = 512       # forward AIS chains (split into `replicas` groups for the SE)
    ais_steps: int = 2000       # minimum number of annealing betas (plus the sweep betas)
    ais_steps_per_l2: float = 8.0  # ... raised to this times L^2 (L: thermodynamic length from the pilot)
    ais_mcmc: int = 1           # MALA steps per annealing beta
    replicas: int = 16
    tune_chains: int = 64
    tune_stages: int = 100
    tune_adapt: int = 5
    chains: int = 64            # sweep chains per temperature
    burn_in: int = 300
    samples: int = 1000         # production steps per sweep chain
    exchange: bool = True       # replica-exchange swaps between neighbouring temperatures
    thin: int = 5               # keep logits every `thin` production steps for MBAR
    reverse_steps: int = 500    # total reverse-AIS betas across all segments
    mbar: bool = True
    keep_samples: int = 16      # samples per temperature stored for plotting (at most `chains`)
    shards: int = 1             # independent chain groups with their own seeds (= processes under torchrun)
    compile: bool | None = None  # fuse the reflected-MALA density with torch.compile; None: when d >= 256

    def validate(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or v < 1):
                raise ThermoEBMError(f"budget option {f.name} must be a positive integer, got {v!r}")
        if not (isinstance(self.ais_steps_per_l2, (int, float)) and 0 <= self.ais_steps_per_l2 < math.inf):
            raise ThermoEBMError(f"ais_steps_per_l2 must be a finite number >= 0, got {self.ais_steps_per_l2!r}")
        if self.chains < 2 or self.ais_chains < 2 * self.replicas or self.replicas < 2:
            raise ThermoEBMError("need chains >= 2, replicas >= 2 and ais_chains >= 2 * replicas")
        if self.ais_chains % self.shards or self.chains % self.shards:
            raise ThermoEBMError(f"ais_chains ({self.ais_chains}) and chains ({self.chains}) must be divisible "
                                 f"by the number of shards/processes ({self.shards})")
        if self.chains // self.shards < 2:
            raise ThermoEBMError(f"need at least 2 sweep chains per shard; raise chains above {self.chains}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ThermoEBMError("--device cuda requested but no CUDA device is available (use --device cpu)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ThermoEBMError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_model(model, shape):
    """(module, shape, n_classes, description) from a checkpoint path, an EBM or any logits callable."""
    if isinstance(model, (str, Path)):
        ckpt = load_checkpoint(model)
        m = model_from_checkpoint(ckpt, model)
        return m.eval(), m.shape, m.n_classes, {"checkpoint": str(model), "model_spec": json.dumps(m.spec)}
    if isinstance(model, EBM):
        return model.eval(), model.shape, model.n_classes, {"model_spec": json.dumps(model.spec)}
    if not callable(model):
        raise ThermoEBMError("model must be a checkpoint path, a thermo-ebm model or a callable")
    if shape is None:
        shape = getattr(model, "shape", None)
    if shape is None:
        raise ThermoEBMError("shape is required when model is a plain callable")
    shape = tuple(int(s) for s in shape)
    with torch.no_grad():
        out = model(torch.zeros((2, *shape)))
    if out.ndim != 2 or out.shape[0] != 2:
        raise ThermoEBMError(f"model must map [N, *shape] to logits [N, K]; got output shape {list(out.shape)}")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, shape, int(out.shape[1]), {"model_spec": type(model).__name__}


def check_temps(temps) -> np.ndarray:
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ThermoEBMError("no temperatures given")
    if t.size > 1000:
        raise ThermoEBMError(f"{t.size} temperatures requested; at most 1000")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ThermoEBMError("temperatures must be finite and > 0")
    t = np.unique(t)
    return t


def _versions():
    import h5py
    import scipy

    from . import __version__
    return {"thermo_ebm": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "xarray": xr.__version__, "h5py": h5py.__version__}


def _mbar_log_z(logits, betas, ensemble, log_z_anchor, anchor_se, tau):
    """log Z at every sweep beta from MBAR on the sweep samples, anchored at the lowest beta's AIS value."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import pymbar
    n_t, k = logits.shape[1], logits.shape[3]
    stride = max(1, int(math.ceil(tau)))
    lg = logits[::stride]  # roughly independent samples, at most MBAR_MAX per state
    lg = lg[:, :, : max(1, MBAR_MAX // lg.shape[0])][: MBAR_MAX]
    c = lg.shape[2]
    n_per = lg.shape[0] * c
    flat = lg.transpose(1, 0, 2, 3).reshape(-1, k)  # [T * n_per, K] grouped by state
    lt = torch.as_tensor(flat)
    u_kn = np.stack([-ensemble.logp(lt, torch.full((lt.shape[0],), float(b), dtype=lt.dtype)).numpy()
                     for b in betas])
    with contextlib.redirect_stdout(io.StringIO()):
        mbar = pymbar.MBAR(u_kn, np.full(n_t, n_per))
        res = mbar.compute_free_energy_differences()
    f, df = res["Delta_f"][0], res["dDelta_f"][0]  # f_k - f_0, with f = -log Z; state 0 = lowest beta
    return log_z_anchor - f, np.sqrt(df ** 2 + anchor_se ** 2)


# axis along which each per-shard array is concatenated (per-temperature summaries get a leading shard axis)
SHARD_AXES = dict(logw=1, energy=1, ais_accept=0, ais_nonfinite=0, chain_means=1, u_trace=2, logits=2,
                  accept=0, swap_accept=0, nonfinite=0, step=0, rev_lw=1, samples=1, labels=1)


def shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _run_shard(net, ens, shape, betas, tuning, schedule, steps, cfg, seed, dev, progress, kernel, shard):
    """Forward AIS, sweep and reverse AIS for one shard of the chains (its own generator). Returns numpy
    arrays keyed as SHARD_AXES: per-chain arrays [T, N_shard, ...] and [1, T] summaries."""
    n_shards = cfg.shards
    gen = torch.Generator(device=dev)
    gen.manual_seed(shard_seed(seed, shard))
    c = cfg.chains // n_shards
    fwd = ais.run_forward(net, ens, shape, schedule, steps, betas, n_chains=cfg.ais_chains // n_shards,
                          n_keep=c, mcmc_steps=cfg.ais_mcmc, generator=gen, device=dev, progress=progress,
                          kernel=kernel)
    sw = run_sweep(net, ens, fwd.states, betas, tuning.step_at(betas), n_burn=cfg.burn_in,
                   n_prod=cfg.samples, exchange=cfg.exchange, thin=cfg.thin, generator=gen, device=dev,
                   progress=progress, kernel=kernel)
    rev_lw = ais.run_reverse(net, ens, sw.final, betas, tuning, n_steps=cfg.reverse_steps,
                             generator=gen, device=dev, progress=progress, kernel=kernel)
    n_t, keep = len(betas), min(cfg.keep_samples, c)
    out = dict(logw=fwd.logw.cpu().numpy(), energy=fwd.energy.cpu().numpy(),
               ais_accept=fwd.accept.cpu().numpy()[None], ais_nonfinite=fwd.nonfinite.cpu().numpy()[None],
               chain_means=sw.chain_means, u_trace=sw.u_trace, logits=sw.logits, accept=sw.accept[None],
               swap_accept=sw.swap_accept[None], nonfinite=sw.nonfinite[None], step=sw.step[None], rev_lw=rev_lw,
               samples=sw.final.x.reshape(n_t, c, *shape)[:, :keep].cpu().numpy())
    if ens.kind == "joint":
        lg = sw.final.logits.reshape(n_t, c, -1)[:, :keep]
        p = torch.softmax(torch.as_tensor(betas, dtype=lg.dtype, device=lg.device)[:, None, None] * lg, -1)
        out["labels"] = torch.multinomial(p.reshape(n_t * keep, -1), 1, generator=gen).reshape(n_t, keep).cpu().numpy()
    return out


def measure(model, temps, *, shape=None, ensemble="marginal", seed: int = 0, device: str = "auto",
            progress: bool = False, config: MeasureConfig | None = None, **budget) -> xr.Dataset:
    """Estimate log Z, F, U, S, C, info (and joint information quantities) at temperatures `temps`.

    model: checkpoint path, thermo-ebm EBM, or callable/nn.Module mapping float [N, *shape] to logits
    [N, K]. Returns an xarray.Dataset on ascending `temperature` with `<name>_err` standard errors,
    cross-checks, diagnostics and per-temperature flags. Units: nats, except names ending in _bits.
    """
    cfg = config or MeasureConfig()
    unknown = set(budget) - {f.name for f in fields(MeasureConfig)}
    if unknown:
        raise ThermoEBMError(f"unknown budget option(s): {', '.join(sorted(unknown))}")
    cfg = MeasureConfig(**{**asdict(cfg), **budget})
    if dist.active():  # under torchrun every process runs one shard
        if cfg.shards not in (1, dist.world()):
            raise ThermoEBMError(f"shards={cfg.shards} conflicts with the {dist.world()} processes")
        cfg.shards = dist.world()
    cfg.validate()
    temps = check_temps(temps)
    dev = dist.local_device(resolve_device(device))
    net, shape, k, desc = resolve_model(model, shape)
    if ensemble not in ("marginal", "joint"):
        raise ThermoEBMError(f"unknown ensemble {ensemble!r}; choose marginal or joint")
    ens = Ensemble(ensemble, k)
    if isinstance(net, torch.nn.Module):
        net = net.to(dev)
    d = int(np.prod(shape))
    t0 = time.perf_counter()

    betas = np.sort(1.0 / temps)  # ascending beta = descending T
    n_t = len(betas)
    kernel = mala_kernel(cfg.compile if cfg.compile is not None else d >= 256)
    tuning = None
    if dist.is_main():  # one pilot, shared by every shard
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
        tuning = ais.tune(net, ens, shape, betas, n_chains=cfg.tune_chains, n_stages=cfg.tune_stages,
                          n_adapt=cfg.tune_adapt, generator=gen, device=dev, progress=progress, kernel=kernel)
    tuning = dist.broadcast(tuning)
    # AIS needs O(L^2) betas: with K equal-length steps Var(log w) ~ L^2 / K, and fewer steps bias log Z low
    # while the replica SE stays small (measured at d = 784: 2000 steps for L^2 ~ 1000 gave z = -11)
    length = float(ais.thermodynamic_length(tuning)[-1])
    n_ais = max(cfg.ais_steps, int(math.ceil(cfg.ais_steps_per_l2 * length ** 2)))
    if n_ais > cfg.ais_steps:
        log.info("AIS: thermodynamic length %.1f -> %d annealing steps (ais_steps %d)", length, n_ais, cfg.ais_steps)
    schedule, steps = ais.make_schedule(tuning, betas, n_ais)
    args = (net, ens, shape, betas, tuning, schedule, steps, cfg, int(seed), dev, progress, kernel)
    if dist.active():  # this rank runs its shard; per-chain arrays are concatenated in rank order
        part = _run_shard(*args, dist.rank())
        pooled = {k: dist.gather_cat(v, SHARD_AXES[k]) if v.size else v for k, v in part.items()}
    else:
        parts = [_run_shard(*args, s) for s in range(cfg.shards)]
        pooled = {k: np.concatenate([p[k] for p in parts], axis=SHARD_AXES[k]) for k in parts[0]}
    fwd_acc, fwd_bad = pooled["ais_accept"].mean(0), pooled["ais_nonfinite"].sum(0)
    sw_acc, sw_bad, sw_step = pooled["accept"].mean(0), pooled["nonfinite"].sum(0), pooled["step"].mean(0)
    swap_acc = pooled["swap_accept"].mean(0)

    # ---- log Z from AIS (ascending beta order here; flipped to ascending T at the end)
    log_omega = ens.log_omega(d)
    lw = pooled["logw"]
    lmw, lmw_se, _, ess = log_mean_weight(lw, cfg.replicas)
    log_z, log_z_se = log_omega + lmw, lmw_se
    rev_ratio, rev_se = -logmeanexp(pooled["rev_lw"], axis=-1), delta_log_mean_se(pooled["rev_lw"])
    log_z_upper = log_omega + np.cumsum(rev_ratio)
    log_z_upper_se = np.sqrt(np.cumsum(rev_se ** 2))

    # ---- sweep estimators: jackknife over chains (independent blocks)
    names = stat_names(ens)
    blocks = pooled["chain_means"]
    iu, im2 = names.index("u"), names.index("m2")
    U, U_se = jackknife(blocks, lambda m: m[..., iu])

    def heat(m):
        b = betas.reshape((-1,) + (1,) * (m.ndim - 2))
        return b ** 2 * (m[..., im2] - m[..., iu] ** 2)
    # C's jackknife covariance between temperatures: its diagonal is C's SE; the peak temperature of C(T) needs
    # all of it, since C at neighbouring T is positively correlated through the swaps (nan without an
    # interior maximum)
    C_cov = jackknife_cov(blocks, heat)
    C, C_se = heat(blocks.mean(axis=1)), np.sqrt(np.diag(C_cov))
    t_asc = 1.0 / betas[::-1]
    peak = peak_position(t_asc, C[::-1], C_cov[::-1, ::-1], seed=int(seed))
    S = betas * U + log_z
    S_se = np.sqrt((betas * U_se) ** 2 + log_z_se ** 2)
    out = {
        "log_Z": (log_z, log_z_se), "F": (-log_z / betas, log_z_se / betas), "U": (U, U_se),
        "S": (S, S_se), "C": (C, C_se), "info_bits": ((log_omega - S) / LN2, S_se / LN2),
    }
    if ens.kind == "joint":
        ih = names.index("h_y_given_x")
        ip = slice(ih + 1, ih + 1 + k)

        def h_y(m):
            p = np.clip(m[..., ip], 1e-300, None)
            return -(p * np.log(p)).sum(-1) / LN2
        hy = jackknife(blocks, h_y)
        hyx = jackknife(blocks, lambda m: m[..., ih] / LN2)
        ixy = jackknife(blocks, lambda m: h_y(m) - m[..., ih] / LN2)
        out.update(H_Y_bits=hy, H_Y_given_X_bits=hyx, I_XY_bits=ixy)

    # ---- diagnostics and cross-checks
    tau = np.array([integrated_autocorr_time(pooled["u_trace"][:, t, :]) for t in range(n_t)])
    # -d log Z / d beta of the AIS estimator is its weighted mean energy (no finite differences)
    u_ais, u_ais_se = weighted_mean(lw, pooled["energy"], cfg.replicas)
    if n_t > 1:  # dU/dT on the ascending-T grid; SEs propagated through the linear stencil
        D = np.stack([derivative(t_asc, col) for col in np.eye(n_t)], axis=1)
        dU = (D @ U[::-1])[::-1]
        dU_se = np.sqrt((D ** 2) @ (U_se[::-1] ** 2))[::-1]
    else:
        dU, dU_se = np.full(n_t, np.nan), np.full(n_t, np.nan)
    diag = {
        "log_Z_upper": (log_z_upper, log_z_upper_se),
        "U_resid": (U - u_ais, np.sqrt(U_se ** 2 + u_ais_se ** 2)),
        "C_resid": (C - dU, np.sqrt(C_se ** 2 + dU_se ** 2)),
    }
    mbar_ok = False
    if cfg.mbar and n_t > 1:
        try:
            diag["log_Z_mbar"] = _mbar_log_z(pooled["logits"], betas, ens, log_z[0], log_z_se[0], np.max(tau) / cfg.thin)
            mbar_ok = True
        except Exception as e:  # MBAR failing (no overlap) is a diagnostic, not a fatal error
            log.warning("MBAR cross-check failed: %s", " ".join(str(e).split())[:200])
    if not mbar_ok:
        diag["log_Z_mbar"] = (np.full(n_t, np.nan), np.full(n_t, np.nan))

    nonfinite = (fwd_bad + sw_bad) > 0
    ais_acc = fwd_acc
    low_acc = (sw_acc < 0.05) | (ais_acc < 0.05)
    low_ess = ess < max(10.0, 0.05 * cfg.ais_chains)  # below this the replica SE of log Z is not trustworthy
    # tail of the weights (Pareto k): a heavy tail makes the SE unreliable even where the ESS looks fine
    k_hat = pareto_k(lw)
    heavy = k_hat > heavy_tail_limit(lw.shape[-1])  # nan (too few finite weights): left to the ESS flag
    poor_mix = (cfg.samples < 10 * tau) | (cfg.burn_in < 5 * tau)
    flags = {"flag_nonfinite": nonfinite, "flag_low_acceptance": low_acc, "flag_low_ess": low_ess,
             "flag_heavy_tails": heavy, "flag_poor_mixing": poor_mix}
    longer = (f"log Z SE unreliable; anneal longer (schedule {len(schedule)} betas = max(ais_steps {cfg.ais_steps}, "
              f"ais_steps_per_l2 {cfg.ais_steps_per_l2:g} x L^2 {length ** 2:.0f}) + sweep betas; 4x the betas "
              f"fixed the 784-d benchmark, docs/estimators.md)")
    remedy = {"flag_nonfinite": "proposals with a non-finite log density (rejected and counted)",
              "flag_low_acceptance": "sampler acceptance below 5%", "flag_low_ess": longer, "flag_heavy_tails": longer,
              "flag_poor_mixing": "raise samples and burn_in (the sweep chains are short against tau_E)"}
    for name, f in flags.items():
        for t in np.nonzero(f)[0]:
            log.warning("T=%g: %s: %s", 1.0 / betas[t], name.replace("flag_", "").replace("_", " "), remedy[name])
    swap = np.concatenate([swap_acc, [np.nan]]) if n_t > 1 else np.array([np.nan])

    # ---- assemble, ascending temperature
    rev = slice(None, None, -1)
    data_vars = {}
    for name, (v, e) in {**out, **diag}.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
        data_vars[name + "_err"] = ("temperature", np.asarray(e, dtype=np.float64)[rev])
    extra = {"ess": ess, "pareto_k": k_hat, "ais_accept": ais_acc, "accept": sw_acc, "swap_accept": swap,
             "tau_E": tau, "step_size": sw_step}
    for name, v in extra.items():
        data_vars[name] = ("temperature", np.asarray(v, dtype=np.float64)[rev])
    for name, f in flags.items():
        data_vars[name] = ("temperature", f[rev].astype(np.int8))
    data_vars["C_peak_T"], data_vars["C_peak_T_err"] = ((), peak[0]), ((), peak[1])
    # samples for plotting: the first keep_samples chains at each temperature
    xs = pooled["samples"][:, : cfg.keep_samples][rev]
    sdims = ["temperature", "sample"] + [f"pixel_dim{i}" for i in range(len(shape))]
    data_vars["samples"] = (sdims, xs.astype(np.float32))
    if ens.kind == "joint":
        data_vars["sample_labels"] = (["temperature", "sample"], pooled["labels"][:, : cfg.keep_samples][rev])
    attrs = {
        "kind": "measurement", "ensemble": ens.kind, "n_classes": k, "dimension": d,
        "shape": json.dumps(list(shape)), "log_Omega": log_omega, "seed": int(seed), "device": str(dev),
        "settings": json.dumps(asdict(cfg)), "versions": json.dumps(_versions()),
        "ais_schedule_length": len(schedule), "thermodynamic_length": length, "mbar_ok": int(mbar_ok),
        "seconds": time.perf_counter() - t0, "units": "nats (k_B = 1) unless the name ends in _bits",
        **desc,
    }
    ds = xr.Dataset(data_vars, coords={"temperature": 1.0 / betas[rev]},
                    attrs=attrs)
    return ds


def parse_temps(spec: str) -> np.ndarray:
    """'start:stop:step' (stop included when on the grid) or a comma list; one-line errors otherwise."""
    spec = (spec or "").strip()
    if not spec:
        raise ThermoEBMError("--temps is empty; use start:stop:step (e.g. 0.5:2:0.1) or a list (0.5,1,2)")
    try:
        if ":" in spec:
            parts = [float(p) for p in spec.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0:
                raise ThermoEBMError(f"--temps step must be > 0, got {step:g}")
            if start > stop:
                raise ThermoEBMError(f"--temps start {start:g} is above stop {stop:g}")
            n_f = (stop - start) / step
            if not math.isfinite(n_f) or n_f > 1000:
                raise ThermoEBMError("--temps asks for more than 1000 temperatures")
            n = int(math.floor(n_f + 1e-9)) + 1
            temps = np.round(start + step * np.arange(n), 12)
        else:
            temps = np.array([float(p) for p in spec.split(",") if p.strip() != ""])
    except ValueError:
        raise ThermoEBMError(f"--temps {spec!r} is not start:stop:step or a comma list of numbers") from None
    if temps.size > 1000:
        raise ThermoEBMError(f"--temps asks for {temps.size} temperatures; at most 1000")
    if temps.size == 0 or not np.all(np.isfinite(temps)) or np.any(temps <= 0):
        raise ThermoEBMError(f"--temps {spec!r}: temperatures must be finite and > 0")
    return temps


def save_measurement(ds: xr.Dataset, path, group: str | None = None) -> str:
    """Write a measurement as a new group of results file `path` (never replacing an existing group)."""
    from .results import new_group_name, write_group
    group = group or new_group_name(path, f"measure_{ds.attrs['ensemble']}")
    return write_group(path, group, ds)
