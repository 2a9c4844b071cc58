"""`train`: one readable training loop for GEBM/JEBM objectives. The loop (Trainer.run: epochs of
Trainer.run_epoch, each "done", "stopped" or "rolled_back") composes small parts: the persistent Langevin
chains with their work/heat bookkeeping (chains.PersistentChains), the history (chains.History), divergence
detection (chains.DivergenceGuard) and rollback to the last snapshot, atomic checkpoints of the resumable state
(train_state.py; layout: checkpoint.py) with exact resume.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import distributed as dist
from ..config import NOMINAL, TrainConfig, needs, parse_labels
from ..data import load_data
from ..ensembles import Ensemble
from ..errors import ThermoEBMError, TrainingDiverged
from ..files.checkpoint import (load_checkpoint, model_from_checkpoint, save_checkpoint, training_config,
                                training_temperature)
from ..files.fileio import check_writable_folder, file_lock, lock_path, remove_stale_tmp
from ..files.results import annotate_training, provenance, write_group
from ..measurement.likelihood import quick_t_ml
from ..models import base_of, build_model
from ..progress import progress_bar
from ..samplers.rng import stream_seed
from . import state as train_state
from .chains import DivergenceGuard, History, PersistentChains, moves_acceptance
from .class_weights import ClassWeightFit, fit_class_weights
from .objectives import loss_terms

log = logging.getLogger("thermo_ebm")

# options that may differ when resuming (everything else must match the checkpoint)
RESUMABLE = {"epochs", "max_steps", "device", "log_file", "on_divergence", "max_rollbacks", "resume",
             "checkpoint_dir", "results_dir", "progress", "fit_class_weights"}


def _adam(params, lr):
    """Adam with torch's fused kernel where it has one for the parameters' device (CPU from torch 2.4, CUDA):
    one pass over the parameters instead of one per elementwise op (docs/performance.md), the same arithmetic to
    float rounding. Older torch refuses fused CPU parameters: then the default Adam."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


class Trainer:
    """Holds everything that a checkpoint must restore, and runs the loop."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, model: torch.nn.Module | None = None,
                 fit_base: bool = True):
        """fit_base=False leaves a new model's base unfitted (a resumed run's checkpoint fills it)."""
        self.cfg, self.progress = cfg, progress
        self.rank, self.world = dist.rank(), dist.world()
        if cfg.batch_size % self.world or cfg.buffer_size % self.world:
            raise ThermoEBMError(f"--batch-size ({cfg.batch_size}) and --buffer-size ({cfg.buffer_size}) must be "
                                 f"divisible by the {self.world} processes")
        self.batch = cfg.batch_size // self.world  # this rank's share of the global batch
        self.dev = dist.resolve_device(cfg.device)
        self.data = load_data(cfg.dataset, cfg.data_dir, cfg.labels, cfg.noise)
        torch.manual_seed(cfg.seed)
        if model is None:
            model = build_model(cfg.arch, self.data.shape, self.data.n_classes, cfg.model_size, cfg.depth,
                                cfg.spectral_norm, cfg.base_components, training_temperature(asdict(cfg)))
            if model.base is not None and fit_base:
                model.base.fit(self.data.x_train, self.data.y_train)
        self.model = model.to(self.dev)
        # the loss goes through DDP (gradients averaged over ranks); the samplers use the bare model
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if dist.active() else self.model
        self.opt = _adam(list(self.model.parameters()), cfg.lr)
        self.rollbacks = 0
        data_seed, mc_seed = training_seeds(cfg.seed, self.rank, self.rollbacks)
        self.g_data = torch.Generator().manual_seed(data_seed)
        g_mc = torch.Generator(device=self.dev).manual_seed(mc_seed)
        n = self.batch if cfg.short_run else cfg.buffer_size // self.world  # this rank's buffer shard
        self.chains = PersistentChains(needs(cfg.objective, cfg.joint_estimator), n, self.data.shape,
                                       self.data.n_classes, cfg, self.dev, g_mc,
                                       reference=base_of(self.model))
        # the data's class frequencies [K] (the label-marginal term's target) and the chains' temperature
        self.class_prior = torch.bincount(self.data.y_train, minlength=self.data.n_classes).double().to(self.dev)
        self.class_prior /= self.class_prior.sum()
        self.t_train = training_temperature(asdict(cfg))
        self.history = History()
        self.guard = DivergenceGuard(cfg.max_energy_gap)
        self.epoch, self.step, self.batch_in_epoch, self.perm = 0, 0, 0, None
        self.lr = cfg.lr
        self.t_ml = (math.nan, math.nan, "not estimated")  # quick T_ML / T_train after the last epoch
        self.acceptance = math.nan  # how often the training moves pass the MH test at T_train, after the last epoch
        self.class_mass = None  # [K] the training chains' mean softmax(f / T_train) at the last epoch's end
        self.class_fit: ClassWeightFit | None = None  # the base's class weights fitted after training
        self.snapshot = None  # the last good state (train_state.capture), which a divergence restores

    # ---------------------------------------------------------------- pieces of a step
    def _set_lr(self, total_steps):
        """Learning rate of the coming step: self.lr (halved by each rollback) times the schedule factor,
        a function of the step alone so that resume stays exact."""
        f = 1.0
        if self.cfg.lr_schedule == "cosine":
            f = 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(self.step / max(total_steps, 1), 1.0)))
        for g in self.opt.param_groups:
            g["lr"] = self.lr * f
        return self.lr * f

    def train_step(self, xb, yb):
        """One optimizer step on a data batch (x [b, *shape], y [b]) and the chains it needs; returns the
        step's metrics, pooled over ranks."""
        cfg, pops = self.cfg, list(self.chains.pops)
        moved = self.chains.advance(self.model, self.batch)
        parts = [xb] + [moved[p].x for p in pops]
        logits = self.ddp(torch.cat(parts))
        sizes = [len(p) for p in parts]
        split = dict(zip(["data", *pops], torch.split(logits, sizes)))
        base = {}
        if base_of(self.model) is not None:  # the fixed base's energies, which the penalty leaves out
            with torch.no_grad():
                base = dict(zip(["data", *pops], torch.split(self.model.base_energy(torch.cat(parts)), sizes)))
        loss, terms = loss_terms(
            cfg.objective, split["data"], yb,
            logits_joint=split.get("joint"), y_joint=moved["joint"].y if "joint" in moved else None,
            logits_marginal=split.get("marginal"), gamma=cfg.gamma, reg=cfg.reg, joint_estimator=cfg.joint_estimator,
            penalty=cfg.penalty, class_balance=cfg.class_balance, class_prior=self.class_prior,
            temperature=self.t_train, base_data=base.get("data"), base_joint=base.get("joint"),
            base_marginal=base.get("marginal"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        rec = {k: float(v.detach()) for k, v in terms.items()}
        rec["train_acc"] = float((split["data"].argmax(1) == yb).float().mean())
        # logits at the chains' final x under the parameters they sampled with
        rec.update(self.chains.book(moved, {p: split[p].detach() for p in pops}))
        rec = pooled_over_ranks(rec, self.world)
        self.history.add_free_energy_change(rec, pops)
        return rec

    # ---------------------------------------------------------------- outputs
    def save(self):
        """History first, then checkpoint: the results file always holds every step of the checkpoint.
        Every rank takes part (its buffers go into the checkpoint); rank 0 alone writes."""
        st = train_state.gather(self, train_state.capture(self))
        if dist.is_main():
            ckpt, res = self.cfg.paths()
            write_group(res, "training", history_dataset(self), replace=True)
            save_checkpoint(ckpt, st)

    def _epoch_order(self, n):
        """This rank's example order for the next epoch: DistributedSampler's shard of a shuffle drawn
        from the data generator (the whole shuffle with one process)."""
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=self.world, rank=self.rank,
                                                      shuffle=True, drop_last=True,
                                                      seed=int(torch.randint(2 ** 31, (1,), generator=self.g_data)))
        return torch.tensor(list(sampler), dtype=torch.long)

    # ---------------------------------------------------------------- the loop
    def run(self):
        cfg = self.cfg
        n_batches = len(self.data.y_train) // cfg.batch_size  # global batches per epoch; each rank takes self.batch
        if n_batches == 0:
            raise ThermoEBMError(f"--batch-size {cfg.batch_size} exceeds the {len(self.data.y_train)} training examples")
        total = cfg.epochs * n_batches if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * n_batches)
        self.snapshot, t0 = train_state.capture(self), time.perf_counter()
        while self.epoch < cfg.epochs and not self._at_max_steps():
            if self.run_epoch(n_batches, total) == "done":
                self._end_epoch(time.perf_counter() - t0)
        gap = self.history.energy_gap(n_batches)
        if base_of(self.model) is not None and cfg.fit_class_weights and self.step > 0:
            self.class_fit = fit_base_class_weights(self)
        if dist.is_main() and self.cfg.objective != "dcl":
            self.t_ml = quick_t_ml_of(self)
            self.acceptance = log_sampler_acceptance(self)
            log_energy_gap(cfg, gap, min(n_batches, self.step))
            at_epoch_end = self.class_mass is not None and self.history.last("epoch_end_step") == self.step
            self.class_mass = log_chain_classes(self, self.class_mass if at_epoch_end else None)
        self.save()
        ckpt, res = self.cfg.paths()
        log.info("wrote %s and %s (group 'training')", ckpt, res)
        if dist.is_main():
            log.info("calibration, OOD scores and the long-run check (chains of 10,000 steps at T_train from the "
                     "buffer, their Fréchet distance against the buffer's): thermo-ebm eval --ckpt %s", ckpt)
        return {"checkpoint": str(ckpt), "results": str(res), "steps": self.step, "epochs": self.epoch,
                "heldout_acc": self.history.last("heldout_acc"),
                "rollbacks": self.rollbacks, "T_ML_over_T_train": self.t_ml[0], "sampler_acceptance": self.acceptance,
                "energy_gap": gap, "reg_times_gap": cfg.reg * gap,
                "chains_class_mass": None if self.class_mass is None else self.class_mass.tolist(),
                "base_class_weights": None if self.class_fit is None else self.class_fit.after.tolist()}

    def _at_max_steps(self):
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def run_epoch(self, n_batches, total) -> str:
        """The rest of the current epoch: "done" (every batch), "stopped" (at --max-steps) or "rolled_back" (a
        divergence restored the last snapshot)."""
        cfg = self.cfg
        if self.perm is None:
            self.perm, self.batch_in_epoch = self._epoch_order(len(self.data.y_train)), 0
        with progress_bar(total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                          enabled=self.progress) as bar:
            while self.batch_in_epoch < n_batches:
                if self._at_max_steps():
                    return "stopped"
                sel = self.perm[self.batch_in_epoch * self.batch:(self.batch_in_epoch + 1) * self.batch]
                xb = self.data.x_train[sel]
                if cfg.noise > 0:
                    xb = (xb + cfg.noise * torch.randn(xb.shape, generator=self.g_data)).clamp(-1, 1)
                lr = self._set_lr(total)
                rec = self.train_step(xb.to(self.dev), self.data.y_train[sel].to(self.dev))
                self.step += 1
                self.batch_in_epoch += 1
                why = self.guard.check(rec, self.model)
                if why:
                    self._on_divergence(why)
                    return "rolled_back"
                rec["lr"] = lr
                self.history.record_step(self.step, rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3g}", acc=f"{rec['train_acc']:.2f}")
                if self.step % cfg.snapshot_every == 0:
                    self.snapshot = train_state.capture(self)
        return "done"

    def _end_epoch(self, seconds):
        """Held-out accuracy, the history's epoch row, the sample grid, a checkpoint and a new snapshot."""
        acc, ce = heldout_accuracy(self.model, self.data, self.dev)
        self.epoch += 1
        self.perm = None
        mass = self.class_mass = chains_class_mass_of(self)
        self.history.record_epoch({"heldout_acc": acc, "heldout_ce": ce, "epoch_end_step": self.step,
                                   "seconds": seconds,
                                   "chains_top_class_mass": float("nan") if mass is None else float(mass.max())})
        grid = save_grid(self.chains, self.cfg, self.epoch) if dist.is_main() else None
        if dist.is_main():
            untrained = " (m_ebm trains no labels)" if self.cfg.objective == "m_ebm" else ""
            split = "" if mass is None else f", chains' largest class {mass.max():.2f}"
            log.info("epoch %d step %d: held-out accuracy %.4f, cross-entropy %.4f%s%s%s", self.epoch,
                     self.step, acc, ce, untrained, split, f", samples {grid}" if grid else "")
        self.save()
        self.snapshot = train_state.capture(self)

    def _reseed(self):
        """Data order (shared by all ranks) and chain noise (one stream per rank), both fresh after a
        rollback: seeds from the sequence (seed, stream, [rank,] rollbacks)."""
        data_seed, mc_seed = training_seeds(self.cfg.seed, self.rank, self.rollbacks)
        self.g_data.manual_seed(data_seed)
        self.chains.generator.manual_seed(mc_seed)

    def _on_divergence(self, why):
        cfg = self.cfg
        msg = f"divergence at step {self.step}: {why}"
        if cfg.on_divergence == "stop" or self.rollbacks >= cfg.max_rollbacks:
            extra = "" if cfg.on_divergence == "stop" else f" after {self.rollbacks} rollbacks"
            ckpt = self.cfg.paths()[0]
            raise TrainingDiverged(f"{msg}{extra}; last good checkpoint: {ckpt if ckpt.exists() else 'none yet'}")
        lr, rollbacks, events = self.lr, self.rollbacks, list(self.history.events)
        train_state.restore(self, self.snapshot)  # parameters, optimizer, chains, RNG, history: the last good state
        self.history.events, self.rollbacks, self.lr = events, rollbacks + 1, lr * 0.5  # applied by _set_lr
        self._reseed()
        self.perm = None if self.perm is None else self._epoch_order(len(self.data.y_train))
        self.history.events.append((self.step, f"{msg}; rolled back to step {self.step}, reseeded, lr -> {self.lr:g}"))
        log.warning("%s; rolled back to step %d, reseeded, learning rate halved to %g", msg, self.step, self.lr)


def pooled_over_ranks(rec: dict, world: int) -> dict:
    """Global-batch values across ranks (equal shards): means, and for the Jarzynski estimate
    -log mean_r exp(-J_r), which equals -log mean exp(-W) over all ranks' walkers."""
    if not dist.active():
        return rec
    keys = sorted(rec)
    per_rank = dist.gather_cat(np.array([[rec[k] for k in keys]], dtype=np.float64), axis=0)
    out = dict(zip(keys, per_rank.mean(0).tolist()))
    for i, k in enumerate(keys):
        if k.endswith("_jarzynski"):
            out[k] = float(-torch.logsumexp(torch.as_tensor(-per_rank[:, i]), 0) + math.log(world))
    return out


@torch.no_grad()
def heldout_accuracy(model, data, dev):
    """(accuracy, mean cross-entropy in nats) of the model on the held-out split."""
    x, y = data.x_test, data.y_test
    correct, ce = 0, 0.0
    for i in range(0, len(x), 1000):
        lg = model(x[i:i + 1000].to(dev))
        yy = y[i:i + 1000].to(dev)
        correct += int((lg.argmax(1) == yy).sum())
        ce += float(torch.nn.functional.cross_entropy(lg, yy, reduction="sum"))
    return correct / len(x), ce / len(x)


def save_grid(chains, cfg: TrainConfig, epoch: int):
    """An image grid of the chains after an epoch (results/NAME_samples/epoch_NNN.png), or None."""
    import torchvision.utils as vu
    grid = chains.grid_images()
    if grid is None:
        return None
    out = Path(cfg.results_dir) / f"{cfg.name}_samples" / f"epoch_{epoch:03d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    vu.save_image(grid[0].cpu(), out, nrow=grid[1], normalize=True, value_range=(-1, 1), pad_value=1.0)
    return out


def history_dataset(tr) -> xr.Dataset:
    """The results file's `training` group of a Trainer."""
    return annotate_training(tr.history.to_dataset({
        "kind": "training", "config": json.dumps(asdict(tr.cfg)), "split_note": tr.data.note,
        "classes": json.dumps(tr.data.classes), "rollbacks": tr.rollbacks,
        "units": "energies E = -f on the logits' scale (T = 1 of the logits; T_train = training_temperature)",
        "training_temperature": tr.t_train,
        "T_ML_quick": tr.t_ml[0], "T_ML_quick_err": tr.t_ml[1], "T_ML_quick_side": tr.t_ml[2],
        "sampler_acceptance": tr.acceptance,
        **({} if tr.class_mass is None else {"chains_class_mass": json.dumps(np.round(tr.class_mass, 4).tolist())}),
        **({} if tr.class_fit is None else class_fit_attrs(tr.class_fit)),
        **provenance()}))


def fit_base_class_weights(tr) -> ClassWeightFit:
    """class_weights.fit_class_weights of a Trainer's model (rank 0 fits, every rank takes its weights), logged."""
    fit = None
    if dist.is_main():
        g = torch.Generator(device=tr.dev).manual_seed(stream_seed(tr.cfg.seed, 2))
        fit = fit_class_weights(tr.model.eval(), tr.data.x_train, tr.data.x_test, tr.t_train, g,
                                progress=tr.progress)
        tr.model.train()
    fit = dist.broadcast(fit)
    if not dist.is_main():
        base_of(tr.model).set_class_log_weights(torch.from_numpy(np.log(fit.after)), torch.from_numpy(fit.log_z))
        return fit
    names = tr.data.classes
    log.info("the base's class weights, fitted by maximum likelihood with the network fixed (%.0f s, %d SMC stages): "
             "the classes' masses under the network span %.1f nats (SE %.2f-%.2f), so the weights go from %.2f-%.2f "
             "to %.3g-%.3g (class %s the largest); the data's log-likelihood rises by %.2f nats per training image, "
             "%.2f per held-out image; at T_train each class then holds %.3f-%.3f of the model", fit.seconds,
             fit.stages, np.ptp(fit.log_z), fit.log_z_se.min(), fit.log_z_se.max(), fit.before.min(),
             fit.before.max(), fit.after.min(), fit.after.max(), names[int(fit.after.argmax())], fit.gain,
             fit.gain_heldout, fit.mass.min(), fit.mass.max())
    return fit


def class_fit_attrs(fit: ClassWeightFit) -> dict:
    """The results file's record of the class-weight fit (JSON lists over classes)."""
    def js(a):
        return json.dumps(np.asarray(a, dtype=np.float64).tolist())
    return {"base_class_log_mass": js(fit.log_z), "base_class_log_mass_se": js(fit.log_z_se),
            "base_class_weights_before": js(fit.before), "base_class_weights": js(fit.after),
            "base_class_model_mass": js(fit.mass), "base_class_fit_gain": fit.gain,
            "base_class_fit_gain_heldout": fit.gain_heldout, "base_class_fit_seconds": fit.seconds}


def quick_t_ml_of(tr):
    """T_ML / T_train of a Trainer's model from held-out-seeded chains (likelihood.quick_t_ml), logged;
    (value, SE, side)."""
    ens = Ensemble("marginal" if tr.cfg.objective == "m_ebm" else "joint", tr.data.n_classes)
    g = torch.Generator(device=tr.dev).manual_seed(tr.cfg.seed + 104729)
    t = quick_t_ml(tr.model.eval(), ens, tr.data.x_test, tr.t_train, g, tr.dev)
    tr.model.train()
    where = {"inside": f"T_ML = {t[0]:.3g} ± {t[1]:.2g} T_train", "below": "T_ML below 0.25 T_train",
             "above": "T_ML above 4 T_train"}.get(t[2], "T_ML undetermined")
    log.info("%s (quick: held-out-seeded chains at 0.25-4 T_train; `measure` gives it with its error bar)", where)
    return t


def log_sampler_acceptance(tr) -> float:
    """chains.moves_acceptance of a Trainer's buffers after training (its own generator: the chains' stream is
    left as a resumed run needs it), logged with what it says about T_train."""
    buffers = {f"{p}/{k}": v for p, d in tr.chains.pops.items() for k, v in d.items()}
    a = moves_acceptance(tr.model.eval(), buffers, asdict(tr.cfg))
    tr.model.train()
    if math.isnan(a):
        return a
    says = ("the chains sample p at T_train" if a >= NOMINAL else
            "the chains descend the energy rather than sample p there, so T_train is nominal"
            + (" (--sampler mala corrects the moves)" if tr.cfg.sampler == "sgld" else ""))
    log.info("the training moves pass the Metropolis test at T_train %.1f%% of the time (from the buffer): %s",
             100 * a, says)
    return a


@torch.no_grad()
def chains_class_mass(model, x: torch.Tensor, t_train: float, batch: int = 1000) -> np.ndarray:
    """The mean softmax(f(x) / T_train) of chain states x [N, *shape]: how the chains split over the K classes ([K],
    sums to 1); for chains that sample the joint ensemble's x-marginal at T_train (the exact estimator's marginal
    chains at T_train = 1), its p(y) there."""
    return torch.cat([(model(b.float()) / t_train).softmax(-1).double() for b in x.split(batch)]).mean(0).cpu().numpy()


ONE_CLASS_CHAINS = 0.9  # the chains' largest class mass beyond which train warns


def chains_class_mass_of(tr) -> np.ndarray | None:
    """chains_class_mass of a Trainer's chains (the marginal population where there is one, else the joint one);
    None for m_ebm and dcl, whose labels mean nothing or which have no chains."""
    pops = tr.chains.pops
    if tr.cfg.objective in ("m_ebm", "dcl") or tr.data.n_classes < 2 or not pops:
        return None
    x = pops["marginal"]["x"] if "marginal" in pops else pops["joint"]["x"]
    mass = chains_class_mass(tr.model.eval(), x, tr.t_train)
    tr.model.train()
    return mass


def log_chain_classes(tr, mass: np.ndarray | None = None) -> np.ndarray | None:
    """chains_class_mass_of a Trainer (or `mass`, where it was taken at the current step), logged with a warning when
    one class holds more than ONE_CLASS_CHAINS of it."""
    mass = chains_class_mass_of(tr) if mass is None else mass
    if mass is None:
        return None
    top = int(mass.argmax())
    if mass[top] > ONE_CLASS_CHAINS:
        log.warning("the training chains sit in class %s (%.2f of their softmax(f / T_train) mass): the joint ensemble "
                    "at T_train holds next to no class information (I(X;Y) near 0; docs/training.md)",
                    tr.data.classes[top], mass[top])
    else:
        log.info("the training chains' class mass: %.2f to %.2f (class %s the largest)", mass.min(), mass[top],
                 tr.data.classes[top])
    return mass


def log_energy_gap(cfg, gap: float, n: int) -> None:
    """Log the data-model energy gap of the last n steps and reg times it: near 1 the penalty cancels the
    likelihood gradient (objectives.py), and p(x) no longer learns except through the energies' spread."""
    if not math.isfinite(gap):
        return
    stalled = cfg.penalty == "centred" and cfg.reg * gap > 0.9
    base = " of the network (the base's part left out)" if getattr(cfg, "base_components", 0) else ""
    log.info("energy gap <E_model> - <E_data>%s = %.3g (logits' scale, last %d steps), reg x gap = %.2f%s", base, gap,
             n, cfg.reg * gap, ": the centred penalty holds the gap at 1 / reg, where it cancels the likelihood "
             "gradient, so p(x) learns only through the energies' spread (a smaller --reg lets it learn; "
             "docs/training.md)" if stalled else "")


def training_seeds(seed: int, rank: int, rollbacks: int) -> tuple[int, int]:
    """(data-order seed, chain-noise seed) of a rank after `rollbacks` rollbacks: the data order is the same
    on every rank (each takes its shard of it), the chain noise differs between ranks."""
    return stream_seed(seed, 0, rollbacks), stream_seed(seed, 1, rank, rollbacks)


def _remove_stale_files(cfg) -> None:
    """Temporary files an earlier process of this run left when it was killed mid-write (under the run lock;
    the results file's under its own lock, which a concurrent `measure` on it holds while writing)."""
    ckpt, res = cfg.paths()
    remove_stale_tmp(ckpt)
    if res.parent.is_dir():
        with file_lock(res):
            remove_stale_tmp(res)


def _clear_previous(cfg: TrainConfig, overwrite: bool):
    """A fresh run never mixes with an earlier run of the same name (its checkpoint, or measurements of
    its model in the results file): refuse, or with overwrite remove them (rank 0)."""
    old = [p for p in cfg.paths() if p.exists()]
    if old and not overwrite:
        raise ThermoEBMError(f"{' and '.join(map(str, old))} already exist(s); --resume continues that run, "
                             "--overwrite starts over, or choose another --name")
    if old and dist.is_main():
        for p in old:
            p.unlink()
        for png in (Path(cfg.results_dir) / f"{cfg.name}_samples").glob("epoch_*.png"):
            png.unlink()
        log.info("--overwrite: removed %s", ", ".join(map(str, old)))
    dist.barrier()


def train(config: TrainConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, **options) -> dict:
    """Train (or with resume=True continue) a model; returns paths and final held-out accuracy.
    A fresh run whose checkpoint or results file exists raises unless overwrite=True."""
    if resume and overwrite:
        raise ThermoEBMError("--resume and --overwrite conflict: continue the run or start it over, not both")
    cfg = config or TrainConfig()
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ThermoEBMError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**{**asdict(cfg), **options})
    handler = None
    if cfg.log_file:
        Path(cfg.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(cfg.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    cfg.check_name()  # before the lock file is named after it
    for path, what in zip(cfg.paths(), ("checkpoint", "results file")):  # a read-only folder: refused now
        check_writable_folder(path, what)
    # one process at a time per run name: a second `train` of the same run would clobber the first's files
    run = Path(cfg.checkpoint_dir) / f"{cfg.name}.run"
    lock = file_lock(run, timeout=0.0, busy=f"another process is training run {cfg.name!r} "
                     f"(lock {lock_path(run)}); wait for it or choose another --name") if dist.is_main() else nullcontext()
    try:
        with lock:
            if dist.is_main():
                _remove_stale_files(cfg)
            if resume:
                path = cfg.paths()[0]
                st = load_checkpoint(path)
                saved = training_config(st)
                conflicts = [k for k in options if k not in RESUMABLE and k in saved and options[k] != saved[k]
                             and not (k == "labels" and parse_labels(options[k]) == saved[k])]
                if conflicts:
                    raise ThermoEBMError(f"--resume conflicts with the checkpoint's {', '.join(conflicts)}; "
                                         "drop these options or start a new --name")
                cfg = TrainConfig(**{**saved, **{k: v for k, v in options.items() if k in RESUMABLE}})
                cfg.validate()
                trainer = Trainer(cfg, progress, fit_base=False)
                model_from_checkpoint(st, path)  # architecture check with a one-line error
                train_state.restore(trainer, st, from_checkpoint=True)
                log.info("resumed %s at epoch %d, step %d", path, trainer.epoch, trainer.step)
            else:
                cfg.validate()
                _clear_previous(cfg, overwrite)
                trainer = Trainer(cfg, progress)
            log.info("training %s: objective %s on %s (%s), %d parameters, device %s", cfg.name, cfg.objective,
                     cfg.dataset, trainer.data.note, sum(p.numel() for p in trainer.model.parameters()), trainer.dev)
            return trainer.run()
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()
