"""Training's persistent sampler chains and the small records around the loop.

`PersistentChains`: one replay buffer per chain population ("joint": x with a label, "marginal": x), the
restarts from uniform noise, the Langevin moves (`--sampler sgld`, or MH-corrected: `mala`), and the work/heat
bookkeeping per walker (W: energy change from parameter updates, Q: from sampler moves at fixed parameters; -log mean exp(-W) is the Jarzynski
estimate of the free-energy change since the uniform start). `History`: per-step and per-epoch records and
events. `DivergenceGuard`: which signals count as divergence. Each has its own state_dict.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import xarray as xr

from ..models import joint_energy, marginal_energy
from ..samplers.kernels import langevin_init, langevin_move, langevin_step, mala_moves

POPULATIONS = ("joint", "marginal")  # sampler chain populations; metric names are "<population>_<name>"
BUFFER_KEYS = ("x", "y", "W", "Q", "e_last")
BOOKKEEPING = ("W", "Q", "dW", "dQ", "jarzynski", "dF")


def energy_fn_of(model, pop: str, y):
    """The energy [N] a population's walkers move on: joint E(x, y) with their labels y, or marginal E(x)."""
    if pop == "joint":
        return lambda x: joint_energy(model(x), y)
    return lambda x: marginal_energy(model(x))


def moves_acceptance(model, buffers: dict, config: dict, n: int = 1000) -> float:
    """How often the training moves pass the Metropolis-Hastings test of p at T_train: the mean acceptance of
    mc_steps reflected-MALA moves with SGLD's proposal (config's sgld_step, sgld_noise, mc_steps; its seed seeds
    them) from the first n walkers of the marginal buffer, else the joint one with its labels (buffers:
    "<population>/x", "<population>/y", a checkpoint's layout), the buffers left as they are. Near 1: the chains
    sample p at T_train; near 0: their moves descend the energy, and T_train is nominal. nan without a buffer or
    without noise."""
    pop = next((p for p in ("marginal", "joint") if f"{p}/x" in buffers and buffers[f"{p}/x"].numel()), None)
    if pop is None or not (config.get("sgld_step", 0) > 0 and config.get("sgld_noise", 0) > 0):
        return float("nan")
    x, y = buffers[f"{pop}/x"][:n].float(), buffers[f"{pop}/y"][:n].long()
    g = torch.Generator(device=x.device).manual_seed(int(config.get("seed", 0)) + 15485863)
    energy_fn = energy_fn_of(model, pop, y)
    return mala_moves(langevin_init(energy_fn, x), energy_fn, config["sgld_step"], config["sgld_noise"],
                      config.get("mc_steps", 40), g)[1]


def _logmeanexp(a):
    return torch.logsumexp(a, 0) - math.log(a.numel())


class ChainBatch(NamedTuple):
    """The walkers one step advanced: buffer indices [b], final x [b, *shape], labels [b], E at the start of
    the moves [b] (float64) and the energy change from the last parameter update dW [b]."""
    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    e_start: torch.Tensor
    dW: torch.Tensor


class PersistentChains:
    """Replay buffers of `n` walkers per population on `device`, moved with generator `generator`."""

    def __init__(self, populations, n: int, shape, n_classes: int, cfg, device, generator: torch.Generator,
                 reference=None):
        self.cfg, self.shape, self.n_classes, self.dev, self.generator = cfg, tuple(shape), n_classes, device, generator
        self.reference = reference  # the model's fixed base (models.GaussianBase) or None: where walkers start
        self.pops, self.acceptance = {}, {}
        for pop in populations:
            x, e_ref = self.fresh(n)
            self.pops[pop] = {
                "x": x,
                "y": torch.randint(n_classes, (n,), generator=generator, device=device),
                "W": torch.zeros(n, dtype=torch.float64, device=device),
                "Q": torch.zeros(n, dtype=torch.float64, device=device),
                "e_last": e_ref,
            }

    def fresh(self, n):
        """n new walkers [n, *shape] and their reference energies [n] (float64): uniform draws on the box (E = 0),
        or, for a model with a base q, exact draws of the base (GaussianBase.sample: q, its classes in the model's
        proportions once estimated) with E = -t_base log(2^D q_draw(x)) (a reference whose normaliser is the
        uniform's, so the W bookkeeping keeps its zero)."""
        if self.reference is None:
            x = torch.rand((n, *self.shape), generator=self.generator, device=self.dev) * 2 - 1
            return x, torch.zeros(n, dtype=torch.float64, device=self.dev)
        x = self.reference.sample(n, self.generator).reshape(n, *self.shape)
        e_ref = -self.reference.t_base * (self.reference.draw_log_density(x) + x[0].numel() * math.log(2.0))
        return x, e_ref

    def advance(self, model, b: int) -> dict:
        """Move b walkers of every population (mc_steps Langevin moves; restarts from uniform with probability
        from_scratch, all of them for short-run chains): {population: ChainBatch}."""
        return {pop: self._advance(model, pop, b) for pop in self.pops}

    def _advance(self, model, pop, b) -> ChainBatch:
        cfg, buf, g = self.cfg, self.pops[pop], self.generator
        n = buf["x"].shape[0]
        idx = torch.randperm(n, generator=g, device=self.dev)[:b]
        if cfg.short_run:
            restart = torch.ones(b, dtype=torch.bool, device=self.dev)
        else:
            restart = torch.rand(b, generator=g, device=self.dev) < cfg.from_scratch
        noise_x, noise_e = self.fresh(b)
        noise_y = torch.randint(self.n_classes, (b,), generator=g, device=self.dev)
        x0 = torch.where(restart.view(-1, *[1] * len(self.shape)), noise_x, buf["x"][idx])
        y0 = torch.where(restart, noise_y, buf["y"][idx])
        for k in ("W", "Q"):  # a restarted walker starts over from the reference
            buf[k][idx] = torch.where(restart, torch.zeros_like(buf[k][idx]), buf[k][idx])
        buf["e_last"][idx] = torch.where(restart, noise_e, buf["e_last"][idx])
        energy_fn = energy_fn_of(model, pop, y0)
        state = langevin_init(energy_fn, x0)
        e_start = state.energy.double()
        dW = e_start - buf["e_last"][idx]  # energy change of these walkers from parameter updates
        buf["W"][idx] += dW
        if cfg.sampler == "mala":
            x, self.acceptance[pop] = mala_moves(state, energy_fn, cfg.sgld_step, cfg.sgld_noise, cfg.mc_steps, g)
            return ChainBatch(idx, x, y0, e_start, dW)
        for _ in range(cfg.mc_steps - 1):
            state = langevin_step(state, energy_fn, cfg.sgld_step, cfg.sgld_noise, g)
        x = langevin_move(state, cfg.sgld_step, cfg.sgld_noise, g)
        return ChainBatch(idx, x, y0, e_start, dW)

    def book(self, moved: dict, logits: dict) -> dict:
        """Store the moved walkers and book their heat, given the logits [b, K] at their final x under the
        parameters they sampled with; with joint_labels "gibbs" the joint labels are redrawn from p(y|x) (an
        exact Gibbs move, booked as heat). Returns this rank's metrics <population>_W, _Q, _dW, _dQ, _jarzynski
        (nan for short-run chains), and with --sampler mala _accept."""
        rec = {}
        for pop, (idx, x, y, e_start, dW) in moved.items():
            lg = logits[pop]
            if pop == "joint" and self.cfg.joint_labels == "gibbs":
                y = torch.multinomial(torch.softmax(lg.float(), 1), 1, generator=self.generator)[:, 0]
            e_end = (joint_energy(lg, y) if pop == "joint" else marginal_energy(lg)).double()
            buf = self.pops[pop]
            buf["Q"][idx] += e_end - e_start  # energy change from MCMC moves at fixed parameters
            buf["e_last"][idx] = e_end
            buf["x"][idx], buf["y"][idx] = x.detach(), y
            if pop in self.acceptance:  # --sampler mala: the mean acceptance of this step's moves
                rec[f"{pop}_accept"] = self.acceptance[pop]
            if self.cfg.short_run:
                rec.update({f"{pop}_{k}": float("nan") for k in BOOKKEEPING})
                continue
            rec.update({f"{pop}_W": float(buf["W"][idx].mean()), f"{pop}_Q": float(buf["Q"][idx].mean()),
                        f"{pop}_dW": float(dW.mean()), f"{pop}_dQ": float((e_end - e_start).mean()),
                        f"{pop}_jarzynski": float(-_logmeanexp(-buf["W"][idx]))})
        return rec

    def state_dict(self) -> dict:
        """{"<population>/<key>": CPU tensor} for keys x, y, W, Q, e_last."""
        return {f"{p}/{k}": v.detach().cpu().clone() for p, d in self.pops.items() for k, v in d.items()}

    def load_state_dict(self, st: dict) -> None:
        for key, v in st.items():
            p, k = key.split("/")
            self.pops[p][k] = v.to(self.dev).clone()

    def grid_images(self):
        """Up to 8 walkers per class (joint) or 64 walkers (marginal) as ([n, *shape] in the box, images per
        row), or None without chains."""
        if not self.pops:
            return None
        if "joint" in self.pops:
            buf, rows = self.pops["joint"], []
            for c in range(self.n_classes):
                sel = buf["x"][buf["y"] == c][:8]
                rows.append(torch.cat([sel, torch.full((8 - len(sel), *self.shape), -1.0, device=self.dev)]))
            return torch.cat(rows), 8
        return self.pops["marginal"]["x"][:64], 8


class History:
    """Per-step records (one value per step, nan where a metric is absent), per-epoch records, events
    (step, message), and the first Jarzynski value of each population (dF is measured from it)."""

    def __init__(self):
        self.steps: dict[str, list] = {}
        self.epochs: dict[str, list] = {}
        self.events: list[tuple[int, str]] = []
        self.j0: dict[str, float] = {}

    def add_free_energy_change(self, rec: dict, populations) -> None:
        """rec[<population>_dF] = Jarzynski estimate minus its first value (not for short-run chains)."""
        for pop in populations:
            j = rec.get(f"{pop}_jarzynski")
            if j is not None and not math.isnan(j):
                self.j0.setdefault(pop, j)
                rec[f"{pop}_dF"] = j - self.j0[pop]

    def record_step(self, step: int, rec: dict) -> None:
        for k in set(self.steps) | set(rec):
            self.steps.setdefault(k, [float("nan")] * (step - 1)).append(rec.get(k, float("nan")))

    def record_epoch(self, values: dict) -> None:
        """One epoch's values; nan for a metric absent this epoch or in earlier ones (a run resumed from an older
        checkpoint)."""
        n = max((len(v) for v in self.epochs.values()), default=0)
        for k in set(self.epochs) | set(values):
            self.epochs.setdefault(k, [float("nan")] * n).append(values.get(k, float("nan")))

    def last(self, key, default=float("nan")):
        return self.epochs.get(key, [default])[-1]

    def energy_gap(self, n: int) -> float:
        """<E_model> - <E_data> (logit units) over the last n steps, of the marginal chains (else the joint
        ones), of the network's part for a model with a base (the gap the penalty sets); nan without chains."""
        for pop in ("marginal", "joint"):
            if self.steps.get(f"{pop}_net_gap"):
                return float(np.nanmean(np.asarray(self.steps[f"{pop}_net_gap"][-n:])))
            em, ed = self.steps.get(f"{pop}_e_model"), self.steps.get(f"{pop}_e_data")
            if em and ed:
                return float(np.nanmean(np.asarray(em[-n:]) - np.asarray(ed[-n:])))
        return float("nan")

    def state_dict(self) -> dict:
        return {"j0": {k: float(v) for k, v in self.j0.items()},
                "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.steps.items()},
                "epoch_history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.epochs.items()},
                "events": [[int(s), str(m)] for s, m in self.events]}

    def load_state_dict(self, st: dict) -> None:
        self.j0 = dict(st["j0"])
        self.steps = {k: v.tolist() for k, v in st["history"].items()}
        self.epochs = {k: v.tolist() for k, v in st["epoch_history"].items()}
        self.events = [(int(s), str(m)) for s, m in st["events"]]

    def to_dataset(self, attrs: dict) -> xr.Dataset:
        """Dims step (1-based), epoch (1-based) and event."""
        steps = np.arange(1, len(next(iter(self.steps.values()), [])) + 1)
        dv = {k: ("step", np.asarray(v, dtype=np.float64)) for k, v in self.steps.items()}
        dv.update({k: ("epoch", np.asarray(v, dtype=np.float64)) for k, v in self.epochs.items()})
        if self.events:
            dv["event_step"] = ("event", np.array([s for s, _ in self.events], dtype=np.int64))
            dv["event_message"] = ("event", np.array([m for _, m in self.events], dtype=object))
        coords = {"step": steps, "epoch": np.arange(1, len(self.epochs.get("heldout_acc", [])) + 1)}
        return xr.Dataset(dv, coords=coords, attrs=attrs)


class DivergenceGuard:
    """Divergence signals: the loss and its terms (SIGNALS), each population's energies and ML term, the
    parameters, and the data-model energy gap beyond `max_energy_gap`; the W/Q/Jarzynski bookkeeping is not."""
    SIGNALS = ("loss", "ce", "reg", "train_acc")
    POPULATION_SIGNALS = ("e_data", "e_model", "ml")

    def __init__(self, max_energy_gap: float):
        self.max_energy_gap = max_energy_gap

    def check(self, rec: dict, model) -> str | None:
        """Why this step counts as diverged, or None."""
        signals = [k for k in self.SIGNALS if k in rec]
        signals += [f"{p}_{t}" for p in POPULATIONS for t in self.POPULATION_SIGNALS if f"{p}_{t}" in rec]
        bad = [k for k in signals if not math.isfinite(rec[k])]
        if bad:
            return f"non-finite {', '.join(bad[:3])} (learning rate too high or too few MCMC steps)"
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return "non-finite parameters (learning rate too high)"
        for pop in POPULATIONS:
            if f"{pop}_e_data" in rec and abs(rec[f"{pop}_e_data"] - rec[f"{pop}_e_model"]) > self.max_energy_gap:
                return (f"runaway {pop} energy gap {rec[f'{pop}_e_data'] - rec[f'{pop}_e_model']:.3g} between data "
                        "and model samples (sampler cannot keep up: lower the learning rate or add MCMC steps)")
        return None
