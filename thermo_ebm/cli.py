"""Command-line interface: a thin click layer over the Python API. User mistakes exit 2, runtime
failures exit 1, both with one line on stderr (tracebacks only with --debug, accepted anywhere on the line).
Defaults come from the configuration dataclasses (thermo_ebm.config)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource

from . import __version__
from .config import DATASETS, OBJECTIVES, PENALTIES, SAMPLERS, MeasureConfig, TrainConfig, presets_help
from .errors import ThermoEBMError, TrainingDiverged
from .files.results import invoked_as

log = logging.getLogger("thermo_ebm")


class _Stderr(logging.Handler):
    """Log lines on the current stderr: INFO as is, warnings and errors with their level."""

    def emit(self, record):
        msg = record.getMessage()
        click.echo(msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}", err=True)


def _setup_logging(level: int) -> None:
    log.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.propagate = False
        logging.captureWarnings(True)  # Python warnings (e.g. from torch) through the same handler
        pw = logging.getLogger("py.warnings")
        pw.addHandler(_Stderr())
        pw.propagate = False


@contextlib.contextmanager
def _log_file(path):
    """Copy the run's log lines (timestamped, with level) into `path` while the command runs."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


class Device(click.ParamType):
    """Click type for --device: auto, cpu, cuda or cuda:N."""
    name = "device"

    def get_metavar(self, param, ctx=None):
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value, param, ctx):
        if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value)):
            return value
        self.fail(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N", param, ctx)


DEVICE = Device()


def default(cls, name):
    """The default of field `name` of config dataclass `cls` (the one place defaults are written)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


def train_option(*decls, **kw):
    """A `train` option whose default is TrainConfig's."""
    name = decls[0].lstrip("-").split("/")[0].replace("-", "_")
    kw.setdefault("default", default(TrainConfig, name))
    kw.setdefault("show_default", kw["default"] is not None)
    return click.option(*decls, **kw)


def budget_option(decl, help, **kw):
    """A `measure` budget option whose default is MeasureConfig's."""
    name = decl.lstrip("-").split("/")[0].replace("-", "_")
    return click.option(decl, default=default(MeasureConfig, name), show_default=True, help=help, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="thermo-ebm")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress.")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level log lines.")
@click.pass_context
def cli(ctx, debug, quiet, verbose):
    """Thermodynamics of energy-based models: train, measure, eval, show, plot, sample.

    The options --debug, -q and -v may also follow the subcommand."""
    ctx.obj = {"debug": debug}
    _setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _explicit(ctx, names):
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}


BY_PRESET = " [default: by dataset and objective, below]"


@cli.command(epilog=presets_help())
@train_option("--name", help="Run name: CHECKPOINT_DIR/NAME.pt, RESULTS_DIR/NAME.h5.")
@train_option("--objective", type=click.Choice(OBJECTIVES), help="Training objective (docs/training.md).")
@train_option("--dataset", type=click.Choice(DATASETS), help="Training data (digits: sklearn's 8x8, offline).")
@train_option("--data-dir", type=click.Path(file_okay=False), help="Where datasets are read or downloaded.")
@train_option("--labels", help="Subset of classes, e.g. 0,1,2 [default: all].")
@train_option("--noise", type=float, help="Std of Gaussian noise added to the data.")
@train_option("--arch", type=click.Choice(["shallow", "cnn"]), help="Network: MLP (shallow) or CNN.")
@train_option("--model-size", type=int, help="MLP width / CNN base channels [default: 256 for the MLP, 32 for the CNN].")
@train_option("--depth", type=int, help="Hidden layers of the MLP.")
@train_option("--spectral-norm/--no-spectral-norm", help="Spectral normalisation of the weights.")
@train_option("--base-components", type=int, help="A fixed base under the network: per class a mixture of this many "
              "box-truncated diagonal Gaussians fitted to the training images, at T_train; 0: none." + BY_PRESET)
@train_option("--fit-class-weights/--no-fit-class-weights",
              help="With a base: after training, estimate every class's mass under the network (SMC) and fit the "
                   "base's class weights by maximum likelihood, the network fixed (docs/training.md).")
@train_option("--epochs", type=int, help="Total epochs (also when resuming)." + BY_PRESET)
@train_option("--max-steps", type=int, help="Stop after this many optimizer steps in total.")
@train_option("--batch-size", type=int, help="Data examples per optimizer step.")
@train_option("--lr", type=float, help="Adam learning rate.")
@train_option("--lr-schedule", type=click.Choice(["constant", "cosine"]),
              help="cosine: decay to 0.1 x lr over the run (--epochs / --max-steps)." + BY_PRESET)
@train_option("--reg", type=float, help="Weight of the energy penalty (--penalty)." + BY_PRESET)
@train_option("--penalty", type=click.Choice(list(PENALTIES)),
              help="Energy penalty: magnitude (mean squared energy of data and model samples, IGEBM/JEM) or centred "
                   "(the same less its part that sees the energies' additive constant: their variances plus half "
                   "the squared gap of their means; it leaves the class balance to the likelihood)." + BY_PRESET)
@train_option("--class-balance", type=float,
              help="Weight of the label-marginal term: the likelihood gradient of the labels' marginal p(y), the "
                   "chains' class split, towards the data's; j_ebm with --joint-estimator exact, and hybrid "
                   "(docs/training.md)." + BY_PRESET)
@train_option("--gamma", type=float, help="gcl: weight of the marginal term (loss = j_ebm - gamma x m_ebm; 1: cross-entropy gradient).")
@train_option("--sgld-step", type=float, help="Langevin step s (x <- x - s dE/dx + n xi); T_train = n^2 / (2 s).")
@train_option("--sgld-noise", type=float, help="Langevin noise n." + BY_PRESET)
@train_option("--mc-steps", type=int, help="Langevin steps per optimizer step.")
@train_option("--sampler", type=click.Choice(list(SAMPLERS)),
              help="Training chains' moves: sgld (the Langevin step, clamped to the box) or mala (the same proposal "
                   "reflected at the box and Metropolis-corrected, so the chains target p at T_train exactly).")
@train_option("--joint-labels", type=click.Choice(["fixed", "gibbs"]),
              help="Joint chains keep their label, or redraw it from p(y|x) after each x update (Gibbs).")
@train_option("--joint-estimator", type=click.Choice(["exact", "chains"]),
              help="j_ebm's estimator of the gradient of log p(x, y): exact (cross-entropy exactly plus marginal "
                   "chains for log p(x)) or chains (class-conditional chains, JEM-style); the same model only at "
                   "T_train = 1 (docs/training.md).")
@train_option("--buffer-size", type=int, help="Persistent chains in the replay buffer." + BY_PRESET)
@train_option("--from-scratch", type=float, help="Fraction of chains restarted from uniform noise each step.")
@train_option("--short-run", is_flag=True, help="Non-persistent chains from noise.")
@train_option("--seed", type=int, help="Seed of every random stream of the run.")
@train_option("--device", type=DEVICE, help="Compute device.")
@train_option("--checkpoint-dir", type=click.Path(file_okay=False), help="Folder of NAME.pt.")
@train_option("--results-dir", type=click.Path(file_okay=False), help="Folder of NAME.h5.")
@train_option("--log-file", type=click.Path(dir_okay=False), help="Also write the log lines to this file.")
@train_option("--on-divergence", type=click.Choice(["rollback", "stop"]),
              help="On divergence: roll back to the last good state with a lower lr, or stop (exit 1).")
@train_option("--max-rollbacks", type=int, help="Rollbacks before giving up.")
@click.option("--resume", is_flag=True, help="Continue CHECKPOINT_DIR/NAME.pt.")
@click.option("--overwrite", is_flag=True, help="Start over: remove this run's earlier checkpoint and results file.")
@click.pass_context
def train(ctx, resume, overwrite, **opts):
    """Train a GEBM / JEBM; writes checkpoints/NAME.pt and results/NAME.h5 (group 'training')."""
    from . import distributed as dist
    from .training.loop import train as run
    names = [f.name for f in fields(TrainConfig) if f.name in opts]
    options = _explicit(ctx, names) if resume else {n: opts[n] for n in names}
    options.setdefault("name", opts["name"])
    dist.setup(opts["device"])  # under torchrun: join the process group (DDP training)
    done = False
    try:
        out = run(resume=resume, overwrite=overwrite, progress=dist.is_main(), **options)
        dist.synchronize()
        done = True
    finally:
        dist.teardown(orderly=done)
    dist.leave_worker()
    click.echo(json.dumps(out))


def parse_temps(spec: str) -> np.ndarray:
    """'start:stop:step' (stop included when on the grid) or a comma list; one-line errors otherwise."""
    spec = (spec or "").strip()
    if spec == "auto":
        return "auto"
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
            items = [p.strip() for p in spec.split(",")]
            if "" in items:
                raise ThermoEBMError(f"--temps {spec!r} has an empty item; list temperatures as 0.5,1,2")
            temps = np.array([float(p) for p in items])
    except ValueError:
        raise ThermoEBMError(f"--temps {spec!r} is not start:stop:step or a comma list of numbers") from None
    if temps.size > 1000:
        raise ThermoEBMError(f"--temps asks for {temps.size} temperatures; at most 1000")
    if temps.size == 0 or not np.all(np.isfinite(temps)) or np.any(temps <= 0):
        raise ThermoEBMError(f"--temps {spec!r}: temperatures must be finite and > 0")
    return temps


@cli.command()
@click.option("--ckpt", required=True, type=click.Path(),
              help="Checkpoint (.pt) written by `thermo-ebm train`.")
@click.option("--temps", default="auto", show_default=True,
              help="start:stop:step (stop included on the grid), a list 0.5,1,2, or auto (a quick scan finds the "
                   "freezing point, heat-capacity peak, T_ML and melting, then places --auto-temps temperatures "
                   "between them); in units of the training temperature unless --units raw.")
@click.option("--units", type=click.Choice(["train", "raw"]), default="train", show_default=True,
              help="train: T in units of T_train = sgld_noise^2 / (2 sgld_step) (T = 1 is what the training chains "
                   "sampled); raw: T on the logits' scale.")
@click.option("--data", "data", default="auto", show_default=True,
              help="Reference states of the low-temperature phase: auto (the checkpoint's training split and stored "
                   "chains), none (anneal from uniform only), or a .pt file of states [M, *shape].")
@click.option("--ensemble", type=click.Choice(["auto", "marginal", "joint"]), default="auto", show_default=True,
              help="marginal: p(x) from logsumexp f(x); joint: p(x, y) from f(x)[y] (adds H(Y), I(X;Y)); auto: joint "
                   "for a classifier's objective (j_ebm, gcl, hybrid, dcl), marginal for m_ebm.")
@click.option("--heldout", default="auto", show_default=True,
              help="Images for the held-out likelihood and T_ML: auto (the checkpoint's held-out split, when "
                   "readable), none, or a .pt file of states [M, *shape] (or a dict with 'x' and 'y').")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Results file (.h5) [default: results/<checkpoint name>.h5].")
@click.option("--group", default=None, help="Group name [default: measure_<ensemble>, numbered if taken]; an "
              "existing group is refused unless --replace-group.")
@click.option("--replace-group", is_flag=True, help="Replace the --group of that name if the file has one.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Compute device.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every chain.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Also write the log lines to this file.")
@budget_option("--engine", type=click.Choice(["ais", "smc"]),
               help="The anneal from uniform: frozen-schedule AIS, or adaptive tempered SMC with HMC moves "
                    "(docs/estimators.md).")
@budget_option("--smc-chains", type=int, help="SMC chains from uniform (engine smc), split into --smc-populations.")
@budget_option("--smc-data-chains", type=int, help="With data: SMC chains per temperature from the data-informed "
               "base (engine smc; the reported log Z).")
@budget_option("--smc-populations", type=int, help="Independent SMC populations (the SE's replicas).")
@budget_option("--ais-chains", type=int, help="Forward AIS chains.")
@budget_option("--ais-steps", type=int, help="Least number of annealing betas; raised to --ais-steps-per-l2 x L^2.")
@budget_option("--ais-steps-per-l2", type=float,
               help="Annealing betas per squared thermodynamic length L^2 of the model; raise it where "
                    "flag_heavy_tails or flag_low_ess is set (32 at d = 784, T <= 0.5: docs/estimators.md).")
@budget_option("--chains", type=int, help="Sweep chains per temperature.")
@budget_option("--burn-in", type=int, help="Sweep burn-in steps.")
@budget_option("--samples", type=int, help="Sweep production steps.")
@budget_option("--sweep-max-factor", type=float, help="A sweep short against tau_E (flag_poor_mixing) runs on at "
               "its frozen steps, dropping its first steps as more burn-in, up to this x (burn-in + samples) steps "
               "(1: never).")
@budget_option("--replicas", type=int, help="Independent replica groups of chains for the SEs.")
@budget_option("--reverse-steps", type=int, help="Reverse-AIS betas.")
@budget_option("--data-refs", type=int, help="Data-seeded kernel centres per temperature.")
@budget_option("--bridge-chains", type=int, help="Chains per temperature annealed from the data-informed base "
               "(engine ais).")
@budget_option("--bridge-moves", type=int, help="Move pairs (a MALA step, a subspace move) per lambda of the anneal "
               "from the data-informed base (engine ais).")
@budget_option("--check-chains", type=int, help="With data (engine ais): chains per temperature annealed from a "
               "second, independent data-informed base that only checks the reported log Z; where one of its replicas "
               "exceeds it beyond chance (base_gap > 9 nats), flag_hysteresis: the reported anneal missed a phase "
               "(0: no check; docs/estimators.md, Flags).")
@budget_option("--auto-temps", type=int, help="Temperatures placed by --temps auto.")
@budget_option("--max-time", type=float, help="Seconds: while low-ESS, heavy-tail, hysteresis or mixing flags fire and "
               "a run with doubled schedules fits in the time left, measure again with them [default: one run].")
@budget_option("--exchange/--no-exchange", help="Replica-exchange swaps between neighbouring temperatures.")
@budget_option("--swap-target", type=float, help="Helper temperatures are inserted into the sweep where the "
               "predicted swap acceptance between neighbours is below this, e.g. 0.2 (0: none; not for models whose "
               "modes the chains cannot cross, docs/estimators.md).")
@budget_option("--sweep-helpers", type=int, help="Most helper temperatures in the sweep (each costs one "
               "temperature's chains).")
@budget_option("--mbar/--no-mbar", help="MBAR cross-check of log Z on the sweep samples.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Fuse the MALA proposal (drawing its own noise, on CPU) and density with torch.compile "
                   "[default: when the input has >= 256 dimensions].")
def measure(ckpt, temps, units, data, ensemble, heldout, out, group, replace_group, device, seed, log_file, compile_,
            **budget):
    """Measure log Z, F, U, S, C, information vs temperature; writes a group of the results file."""
    from . import distributed as dist
    from .files.checkpoint import check_checkpoint_file
    from .files.results import check_group, reserve_group
    from .measurement.dataset import save_measurement
    from .measurement.run import measure as run
    from .reporting.report import summary_lines
    t = parse_temps(temps)
    check_checkpoint_file(ckpt)
    path = Path(out) if out else Path("results") / (Path(ckpt).stem + ".h5")
    check_group(path, group, replace_group)  # before any work
    dist.setup(device)  # under torchrun: each process runs one shard of the chains
    with reserve_group(path, group) if dist.is_main() else contextlib.nullcontext():
        done = False
        try:
            with _log_file(log_file if dist.is_main() else None):
                ds = run(ckpt, t, ensemble=ensemble, units=units, data=data, seed=seed, heldout=heldout,
                         device=device, progress=dist.is_main(), compile=compile_, **budget)
            dist.synchronize()
            done = True
        finally:
            dist.teardown(orderly=done)
        dist.leave_worker()  # rank 0 alone writes the results file
        g = save_measurement(ds, path, group, replace_group)
    scale = f"T / T_train, T_train = {ds.attrs['T_train']:.3g}" if units == "train" else "raw T"
    click.echo(f"wrote group '{g}' of {path} ({ds.sizes['temperature']} temperatures in {scale}, "
               f"{ds.attrs['seconds']:.0f} s)")
    click.echo("\n".join(summary_lines(ds)))


@cli.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.pt) written by `thermo-ebm train`.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Results file (.h5) [default: results/<checkpoint name>.h5].")
@click.option("--group", default="evaluation", show_default=True, help="Group name; an existing one is refused "
              "unless --replace-group.")
@click.option("--replace-group", is_flag=True, help="Replace the group if the file has one.")
@click.option("--n-ood", type=int, default=1000, show_default=True,
              help="Held-out images scored, and as many of each shifted set.")
@click.option("--chains", type=int, default=64, show_default=True, help="Long-run chains per length.")
@click.option("--chain-steps", default="1000,10000", show_default=True,
              help="MALA steps of the long-run chains at T = 1 (units of T_train), comma-separated.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the checkpoint's dataset is read, and MNIST / Fashion-MNIST for OOD sets when present "
                   "[default: the checkpoint's --data-dir].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the chains and bootstraps.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Compute device.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Also write the log lines to this file.")
def eval_(ckpt, out, group, replace_group, n_ood, chains, chain_steps, data_dir, seed, device, log_file):
    """Calibration, OOD detection and long-run samples of a checkpoint; writes group 'evaluation', prints a table."""
    from .evaluation.evaluate import evaluate, table
    from .files.checkpoint import check_checkpoint_file
    from .files.results import check_group, reserve_group, write_group
    try:
        steps = tuple(int(v) for v in chain_steps.split(",") if v.strip())
    except ValueError:
        raise ThermoEBMError(f"--chain-steps {chain_steps!r} is not a comma list of integers") from None
    check_checkpoint_file(ckpt)
    path = Path(out) if out else Path("results") / (Path(ckpt).stem + ".h5")
    check_group(path, group, replace_group)
    with reserve_group(path, group):
        with _log_file(log_file):
            ds = evaluate(ckpt, seed=seed, device=device, data_dir=data_dir, n_ood=n_ood, chains=chains,
                          chain_steps=steps)
        g = write_group(path, group, ds, replace=replace_group)
    click.echo(table(ds))
    click.echo(f"wrote group '{g}' of {path}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--out", default=None, help="The thermodynamics figure's file (e.g. fig.png); the other figures go "
              "beside it as fig_samples.png, fig_training.png, ... [default: beside the first results file].")
@click.option("--format", "fmt", type=click.Choice(["png", "pdf"]), default="png", show_default=True,
              help="Figure format.")
@click.option("--group", "groups", multiple=True, help="Measurement group(s) to draw (repeatable) [default: every "
              "measurement group of each file, overlaid].")
def plot(files, out, fmt, groups):
    """Figures (thermodynamics, information, samples, training) from one or more results files."""
    from .reporting.plot import plot_files
    for p in plot_files(files, out=out, fmt=fmt, groups=groups or None):
        click.echo(str(p))


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--diff", nargs=2, type=float, default=None, metavar="T1 T2",
              help="Also print F(T2) - F(T1) and log Z(T2) - log Z(T1) with SEs from the stored covariances.")
@click.option("--group", "groups", multiple=True, help="Group(s) to print (repeatable) [default: every group].")
def show(file, as_json, diff, groups):
    """Print the groups of a results file and a table per measurement."""
    from .reporting.report import report
    click.echo(report(file, as_json=as_json, diff=diff, groups=groups or None))


@cli.command()
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.pt).")
@click.option("--temp", "--temps", "temp", type=float, required=True,
              help="Temperature T > 0, one (units of T_train unless --units raw).")
@click.option("--units", type=click.Choice(["train", "raw"]), default="train", show_default=True,
              help="train: --temp in units of the checkpoint's training temperature; raw: the logits' scale.")
@click.option("--label", type=int, default=None, help="Class for conditional sampling (joint models).")
@click.option("-n", "--n-samples", "n", type=int, default=64, show_default=True, help="Number of samples.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="Image grid (.png, .jpg, .pdf, ...).")
@click.option("--steps", type=int, default=500, show_default=True, help="MALA steps (step size adapted, then frozen).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the chains.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Compute device.")
def sample(ckpt, temp, units, label, n, out, steps, seed, device):
    """Draw samples at temperature T with the engine's reflected-MALA sampler; saves an image grid."""
    from .evaluation.sample import sample_to_png
    click.echo(str(sample_to_png(ckpt, temp, units=units, label=label, n=n, out=out, steps=steps, seed=seed, device=device)))


GLOBAL_FLAGS = ("--debug", "-q", "--quiet", "-v", "--verbose")


def main(argv=None):
    """Entry point: run the CLI on argv; user mistakes exit 2, runtime failures 1, one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # the global flags are accepted after the subcommand too (up to a "--")
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    argv = flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]
    try:
        with invoked_as(["thermo-ebm", *argv]):
            cli.main(args=argv, prog_name="thermo-ebm", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as e:  # one line, like every other error
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        sys.exit(e.exit_code)
    except ThermoEBMError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingDiverged as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except PermissionError as e:  # a folder or file the user cannot write: their setup, one line
        if debug:
            raise
        click.echo(f"error: permission denied: {e.filename or e} (choose a writable --out / --checkpoint-dir / "
                   "--results-dir, or change the folder's permissions)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # runtime failure: one line unless --debug
        if debug:
            raise
        click.echo(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
