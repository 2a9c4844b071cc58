"""Configuration dataclasses of `train` and `measure` (importable without torch, so the command line takes its
defaults from here)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ThermoEBMError

OBJECTIVES = ("dcl", "m_ebm", "j_ebm", "gcl", "hybrid")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "digits")
PENALTIES = ("centred", "magnitude")  # forms of the energy penalty (training/objectives.py)
JOINT_ESTIMATORS = ("exact", "chains")  # j_ebm's two estimators of the p(x, y) likelihood (training/objectives.py)
SAMPLERS = ("sgld", "mala")  # the training chains' moves (training/chains.py)
NOMINAL = 0.5  # training moves that pass the Metropolis test at T_train less often than this did not sample there
# the chain populations each objective samples (metric names: "<population>_e_data", "_e_model", "_ml")
NEEDS = {"dcl": (), "m_ebm": ("marginal",), "j_ebm": ("joint",), "gcl": ("joint", "marginal"),
         "hybrid": ("marginal",)}

# The defaults of `train` that depend on the dataset and the objective (the search behind them:
# benchmarks/train_defaults.py, docs/training.md). A setting left at None takes its value from the first row that
# matches the run's dataset and objective ("*": any) and names that setting.
PRESETS = (
    ("digits", "*", {"epochs": 15, "lr_schedule": "cosine", "penalty": "magnitude", "buffer_size": 1000}),
    ("mnist", "m_ebm", {"epochs": 30, "lr_schedule": "cosine", "reg": 0.001, "penalty": "magnitude"}),
    ("mnist", "j_ebm", {"sgld_noise": 0.0447, "reg": 3.0, "base_components": 40, "class_balance": 1.0}),
    ("mnist", "gcl", {"penalty": "magnitude"}),
    ("*", "dcl", {"reg": 0.0}),
    ("*", "*", {"base_components": 0, "class_balance": 0.0, "epochs": 10, "lr_schedule": "constant", "reg": 0.1,
                "penalty": "centred", "buffer_size": 10000, "sgld_noise": 0.1}),
)


def preset(dataset: str, objective: str) -> dict:
    """The PRESETS values of a dataset and objective: {setting: value} for every setting the table names."""
    out = {}
    for ds, obj, values in PRESETS:
        if ds in ("*", dataset) and obj in ("*", objective):
            out = {**values, **out}
    return out


def presets_help() -> str:
    """PRESETS as the lines `train --help` shows."""
    rows = [f"{ds:<8} {obj:<7} " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
            for ds, obj, values in PRESETS]
    return ("Defaults by dataset and objective (the first matching row that names a setting gives it; *: any):\n\n"
            "\b\n" + "\n".join(rows))


def needs(objective: str, joint_estimator: str = "chains") -> tuple:
    """The chain populations an objective samples under a joint estimator."""
    if objective == "j_ebm" and joint_estimator == "exact":
        return ("marginal",)
    return NEEDS[objective]


def label_marginal_applies(objective: str, joint_estimator: str) -> bool:
    """Whether the label-marginal term (--class-balance) has chains to act on: marginal chains of a model whose
    classes the cross-entropy trains (j_ebm with the exact estimator, hybrid)."""
    return objective in ("j_ebm", "hybrid") and "marginal" in needs(objective, joint_estimator)


def option_name(name: str) -> str:
    """How a message names a setting: its command-line option, then its Python keyword."""
    return f"--{name.replace('_', '-')} ({name})"


def parse_labels(labels) -> list | None:
    """A class subset from '0,1,2', a list or None (all classes); sorted unique ints."""
    if labels is None or labels == "" or labels == []:
        return None
    if isinstance(labels, str):
        try:
            labels = [int(s) for s in labels.split(",") if s.strip() != ""]
        except ValueError:
            raise ThermoEBMError(f"--labels must be comma-separated integers, got {labels!r}") from None
    labels = sorted(set(int(v) for v in labels))
    if len(labels) < 2:
        raise ThermoEBMError("--labels needs at least two classes")
    return labels


@dataclass
class TrainConfig:
    """Settings of `train` (stored in the checkpoint as `config`); the CLI's defaults come from here."""
    name: str = "run"
    objective: str = "j_ebm"
    dataset: str = "mnist"
    data_dir: str = "data"
    labels: list | None = None
    noise: float = 0.0
    arch: str = "shallow"
    model_size: int | None = None
    depth: int = 2
    spectral_norm: bool = False
    base_components: int | None = None  # > 0: a fixed base, this many Gaussians per class (models.GaussianBase)
    fit_class_weights: bool = True    # with a base: its class weights by maximum likelihood after training
    epochs: int | None = None         # None: from PRESETS (dataset, objective)
    max_steps: int | None = None      # stop after this many optimizer steps in total
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str | None = None    # "constant" or "cosine": lr * (0.1 + 0.9 * (1 + cos(pi * step / total)) / 2)
    reg: float | None = None          # weight of the energy penalty
    penalty: str | None = None        # "centred" (variances + data-model gap^2 / 2) or "magnitude" (<E^2>); objectives.py
    class_balance: float | None = None  # weight of the label-marginal term (objectives.py)
    gamma: float = 1.0
    sgld_step: float = 0.05           # x <- x - sgld_step * dE/dx + sgld_noise * N(0, 1)
    sgld_noise: float | None = None   # None: from PRESETS
    mc_steps: int = 40
    sampler: str = "sgld"             # or "mala": the same proposal (reflected at the box), MH-corrected to T_train
    joint_labels: str = "fixed"       # or "gibbs": after the x moves, draw each joint chain's y ~ p(y|x)
    joint_estimator: str = "exact"    # j_ebm: "exact" (CE + marginal chains) or "chains" (class-conditional chains)
    buffer_size: int | None = None
    from_scratch: float = 0.05
    short_run: bool = False
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str = "checkpoints"
    results_dir: str = "results"
    log_file: str | None = None
    on_divergence: str = "rollback"   # or "stop"
    max_rollbacks: int = 3
    max_energy_gap: float = 1e4       # |<E_data> - <E_model>| beyond this counts as divergence
    snapshot_every: int = 50

    def paths(self):
        """checkpoints/NAME.pt and results/NAME.h5 of this run."""
        return (Path(self.checkpoint_dir) / f"{self.name}.pt", Path(self.results_dir) / f"{self.name}.h5")

    def check_name(self):
        if not self.name or "/" in self.name:
            raise ThermoEBMError(f"invalid run name {self.name!r}")

    def validate(self):
        """Check every setting (one-line errors) and fill the ones left at None from PRESETS."""
        if self.objective not in OBJECTIVES:
            raise ThermoEBMError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.dataset not in DATASETS:
            raise ThermoEBMError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        filled = set()
        for name, value in preset(self.dataset, self.objective).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                filled.add(name)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ThermoEBMError("--lr-schedule must be constant or cosine")
        if self.joint_labels not in ("fixed", "gibbs"):
            raise ThermoEBMError("--joint-labels must be fixed or gibbs")
        if self.joint_estimator not in JOINT_ESTIMATORS:
            raise ThermoEBMError(f"--joint-estimator must be one of {', '.join(JOINT_ESTIMATORS)}")
        if self.penalty not in PENALTIES:
            raise ThermoEBMError(f"--penalty must be one of {', '.join(PENALTIES)}")
        balanced = label_marginal_applies(self.objective, self.joint_estimator)
        if "class_balance" in filled and not balanced:  # a preset's weight where the term does not apply
            self.class_balance = 0.0
        if self.class_balance < 0 or (self.class_balance > 0 and not balanced):
            raise ThermoEBMError("--class-balance must be >= 0, and 0 unless marginal chains train classes (j_ebm with "
                                 "--joint-estimator exact, or hybrid)")
        if self.on_divergence not in ("rollback", "stop"):
            raise ThermoEBMError("--on-divergence must be rollback or stop")
        for name in ("epochs", "batch_size", "mc_steps", "buffer_size"):
            if getattr(self, name) < 1:
                raise ThermoEBMError(f"--{name.replace('_', '-')} must be >= 1")
        if self.base_components < 0:
            raise ThermoEBMError("--base-components must be >= 0 (0: no base)")
        if not 0.0 <= self.from_scratch <= 1.0:
            raise ThermoEBMError("--from-scratch must be in [0, 1]")
        if self.lr <= 0 or self.sgld_step < 0 or self.sgld_noise < 0:
            raise ThermoEBMError("--lr must be > 0 and SGLD step/noise >= 0")
        if self.sampler not in SAMPLERS:
            raise ThermoEBMError(f"--sampler must be one of {', '.join(SAMPLERS)}")
        if self.sampler == "mala" and not (0 < self.sgld_noise <= 0.5 and self.sgld_step > 0):
            raise ThermoEBMError("--sampler mala needs --sgld-step > 0 and 0 < --sgld-noise <= 0.5 (its proposal's "
                                 "spread)")
        if self.buffer_size < self.batch_size and not self.short_run:
            raise ThermoEBMError("--buffer-size must be at least --batch-size")
        self.check_name()
        self.labels = parse_labels(self.labels)
        return self



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
    sweep_max_factor: float = 4.0  # a sweep short against tau_E runs on, up to this x (burn_in + samples) steps
    exchange: bool = True       # replica-exchange swaps between neighbouring temperatures
    swap_target: float = 0.0    # ... with helper temperatures inserted where the predicted swap acceptance is below
                                # this (0: none; sweep.ladder; off by default: docs/estimators.md)
    sweep_helpers: int = 32     # most helper temperatures (each costs one temperature's sweep chains)
    thin: int = 5               # keep logits every `thin` production steps for MBAR
    reverse_steps: int = 500    # total reverse-AIS betas across all segments
    mbar: bool = True
    keep_samples: int = 16      # samples per temperature stored for plotting (at most `chains`)
    shards: int = 1             # independent chain groups with their own seeds (= processes under torchrun)
    compile: bool | None = None  # fuse the reflected-MALA density with torch.compile; None: when d >= 256
    # with reference data (the low-temperature phase): the anneal from a data-informed base at every temperature
    data_refs: int = 64         # kernel centres per temperature seeded from data (as many from forward AIS)
    gauss_refs: int = 256       # data-seeded pilot chains per temperature fitting the base's Gaussian
    reference_steps: int = 400  # pilot MALA steps that settle the reference states at each temperature
    bridge_chains: int = 512    # chains per temperature annealed from the base (the reported log Z), in `replicas`
                                # populations (32 each: 8 cannot carry the split between classes at d = 784)
    bridge_steps: int = 300     # minimum number of lambdas of each temperature's path (raised to ais_steps_per_l2 x
                                # its L^2)
    max_bridge_steps: int | None = None  # most lambdas of a path (None: no cap; a capped path raises flag_low_ess)
    bridge_moves: int = 2       # move pairs (reflected MALA, then the subspace move) per lambda of the counted anneal
    bridge_uniform: float = 0.2  # weight of the uniform component of the base
    check_chains: int = 0       # with data (engine ais): chains per temperature of a second, independent base (its own
                                # reference states, pilot, random stream) that only checks the reported log Z (base_gap)
    crosscheck_steps: int = 20000  # with data: most betas of the forward anneal from uniform (then a cross-check)
    crosscheck_chains: int = 256  # with data and that cap reached: its chains (at most ais_chains; a one-sided check)
    # the anneal from uniform: "ais" (one MALA step per frozen beta) or "smc" (adaptive tempered SMC: stages
    # chosen at a conditional ESS, reflective HMC moves in a diagonal metric until decorrelated; smc.py)
    engine: str = "ais"
    smc_chains: int = 1024      # SMC chains from uniform, in smc_populations independent populations (the SE's replicas)
    smc_data_chains: int = 512  # with data: SMC chains per temperature from the data-informed base (the reported log Z)
    smc_crosscheck_chains: int = 256  # with data: SMC chains from uniform (then a cross-check, at CESS 0.5)
    smc_populations: int = 16
    smc_pilot_chains: int = 128
    smc_cess: float = 0.8       # conditional ESS fraction at which the pilot places the next stage of the reported anneal
    smc_leapfrog: int = 8       # leapfrog steps per HMC move
    smc_max_moves: int = 10     # most HMC moves per stage
    smc_corr: float = 0.2       # moves continue until the population's lag correlation falls below this
    auto_temps: int = 16        # temperatures placed by --temps auto (temperatures.py)
    max_time: float | None = None  # seconds: while flags survive and a doubled budget fits, measure again longer

    def validate(self):
        o = option_name
        for f in fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "check_chains" else 1
            if f.type == "int" and (not isinstance(v, int) or v < least):
                raise ThermoEBMError(f"{o(f.name)} must be a {'non-negative' if least == 0 else 'positive'} integer, "
                                     f"got {v!r}")
        if not (isinstance(self.ais_steps_per_l2, (int, float)) and 0 <= self.ais_steps_per_l2 < math.inf):
            raise ThermoEBMError(f"{o('ais_steps_per_l2')} must be a finite number >= 0, got {self.ais_steps_per_l2!r}")
        if not (isinstance(self.swap_target, (int, float)) and 0.0 <= self.swap_target < 1.0):
            raise ThermoEBMError(f"{o('swap_target')} must lie in [0, 1) (0: no helper temperatures), "
                                 f"got {self.swap_target!r}")
        if self.max_time is not None and not (isinstance(self.max_time, (int, float)) and self.max_time > 0):
            raise ThermoEBMError(f"{o('max_time')} must be a number of seconds > 0, got {self.max_time!r}")
        if self.max_bridge_steps is not None and not (isinstance(self.max_bridge_steps, int) and self.max_bridge_steps >= 1):
            raise ThermoEBMError(f"{o('max_bridge_steps')} must be a positive integer, got {self.max_bridge_steps!r}")
        if self.engine not in ("ais", "smc"):
            raise ThermoEBMError(f"{o('engine')} must be ais or smc, got {self.engine!r}")
        if not (0.0 < self.smc_cess < 1.0 and 0.0 < self.smc_corr < 1.0):
            raise ThermoEBMError(f"{o('smc_cess')} and {o('smc_corr')} must lie in (0, 1)")
        for name in ("smc_chains", "smc_data_chains", "smc_crosscheck_chains"):
            if getattr(self, name) % self.smc_populations or self.smc_populations % self.shards or self.smc_populations < 2:
                raise ThermoEBMError(f"{o(name)} ({getattr(self, name)}) must split into {o('smc_populations')} "
                                     f"({self.smc_populations} >= 2) equal populations, a whole number per shard "
                                     f"({self.shards})")
        if not (isinstance(self.sweep_max_factor, (int, float)) and 1.0 <= self.sweep_max_factor < math.inf):
            raise ThermoEBMError(f"{o('sweep_max_factor')} must be a number >= 1 (1: the sweep never runs on), "
                                 f"got {self.sweep_max_factor!r}")
        if not 0.0 < self.bridge_uniform < 1.0:
            raise ThermoEBMError(f"{o('bridge_uniform')} must lie in (0, 1), got {self.bridge_uniform!r}")
        if (self.chains < 2 or self.ais_chains < 2 * self.replicas or self.crosscheck_chains < 2 * self.replicas
                or self.replicas < 2):
            raise ThermoEBMError(f"need {o('chains')} >= 2, {o('replicas')} >= 2, and {o('ais_chains')} and "
                                 f"{o('crosscheck_chains')} >= 2 x replicas")
        if self.ais_chains % self.shards or self.chains % self.shards or self.bridge_chains % self.shards:
            raise ThermoEBMError(f"{o('ais_chains')} ({self.ais_chains}), {o('bridge_chains')} ({self.bridge_chains}) "
                                 f"and {o('chains')} ({self.chains}) must be divisible by the number of "
                                 f"shards/processes ({self.shards})")
        if self.check_chains and (self.engine != "ais" or self.check_chains % self.shards
                                  or self.check_chains < 2 * self.shards):
            raise ThermoEBMError(f"{o('check_chains')} ({self.check_chains}) needs engine ais and at least 2 chains "
                                 f"per shard ({self.shards}), a whole number each")
        if self.chains // self.shards < 2:
            raise ThermoEBMError(f"need at least 2 sweep chains per shard; raise {o('chains')} above {self.chains}")
