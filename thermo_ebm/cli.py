"""Command-line interface: a thin click layer over the Python API. User mistakes exit 2, runtime
failures exit 1, both with one line on stderr (tracebacks only with --debug)."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from .errors import ThermoEBMError, TrainingDiverged

log = logging.getLogger("thermo_ebm")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """Thermodynamics of energy-based models: train, measure, plot."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _explicit(ctx, names):
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}


@cli.command()
@click.option("--name", default="run", show_default=True, help="Run name: checkpoints/NAME.pt, results/NAME.h5.")
@click.option("--objective", type=click.Choice(["dcl", "m_ebm", "j_ebm", "gcl", "hybrid"]), default="j_ebm", show_default=True)
@click.option("--dataset", default="mnist", show_default=True, help="mnist, fashion-mnist, cifar10 or digits.")
@click.option("--data-dir", default="data", show_default=True)
@click.option("--labels", default=None, help="Subset of classes, e.g. 0,1,2.")
@click.option("--noise", type=float, default=0.0, show_default=True, help="Std of Gaussian noise added to data.")
@click.option("--arch", type=click.Choice(["shallow", "cnn"]), default="shallow", show_default=True)
@click.option("--model-size", type=int, default=None, help="MLP width / CNN base channels.")
@click.option("--depth", type=int, default=2, show_default=True, help="Hidden layers of the MLP.")
@click.option("--spectral-norm/--no-spectral-norm", default=False, show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True, help="Total epochs (also when resuming).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps in total.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="cosine: decay to 0.1 x lr over the run (--epochs / --max-steps).")
@click.option("--reg", type=float, default=None, help="L2 energy penalty [default: 0.1, 0 for dcl].")
@click.option("--gamma", type=float, default=1.0, show_default=True)
@click.option("--sgld-step", type=float, default=0.05, show_default=True)
@click.option("--sgld-noise", type=float, default=0.1, show_default=True)
@click.option("--mc-steps", type=int, default=40, show_default=True)
@click.option("--joint-labels", type=click.Choice(["fixed", "gibbs"]), default="fixed", show_default=True,
              help="Joint chains keep their label, or redraw it from p(y|x) after each x update (Gibbs).")
@click.option("--buffer-size", type=int, default=10000, show_default=True)
@click.option("--from-scratch", type=float, default=0.05, show_default=True)
@click.option("--short-run", is_flag=True, help="Non-persistent chains from noise.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint-dir", default="checkpoints", show_default=True)
@click.option("--results-dir", default="results", show_default=True)
@click.option("--log-file", default=None)
@click.option("--on-divergence", type=click.Choice(["rollback", "stop"]), default="rollback", show_default=True)
@click.option("--max-rollbacks", type=int, default=3, show_default=True)
@click.option("--resume", is_flag=True, help="Continue checkpoints/NAME.pt.")
@click.option("--overwrite", is_flag=True, help="Start over: remove this run's earlier checkpoint and results file.")
@click.pass_context
def train(ctx, resume, overwrite, **opts):
    """Train a GEBM / JEBM; writes checkpoints/NAME.pt and results/NAME.h5 (group 'training')."""
    from . import distributed as dist
    from .train import TrainConfig, train as run
    names = [f.name for f in fields(TrainConfig) if f.name in opts]
    options = _explicit(ctx, names) if resume else {n: opts[n] for n in names}
    options.setdefault("name", opts["name"])
    dist.setup(opts["device"])  # under torchrun: join the process group (DDP training)
    try:
        out = run(resume=resume, overwrite=overwrite, progress=dist.is_main(), **options)
        dist.synchronize()
    finally:
        main_rank = dist.is_main()
        dist.teardown()
    if main_rank:
        click.echo(json.dumps(out))


@cli.command()
@click.option("--ckpt", required=True, help="Checkpoint (.pt) written by `thermo-ebm train`.")
@click.option("--temps", required=True, help="start:stop:step (stop included on the grid) or a list 0.5,1,2; "
              "in units of the training temperature unless --units raw.")
@click.option("--units", type=click.Choice(["train", "raw"]), default="train", show_default=True,
              help="train: T in units of T_train = sgld_noise^2 / (2 sgld_step) (T = 1 is what the training chains "
                   "sampled); raw: T on the logits' scale.")
@click.option("--data", "data", default="auto", show_default=True,
              help="Reference states of the low-temperature phase: auto (the checkpoint's training split and stored "
                   "chains), none (anneal from uniform only), or a .pt file of states [M, *shape].")
@click.option("--ensemble", type=click.Choice(["marginal", "joint"]), default="marginal", show_default=True)
@click.option("--out", default=None, help="Results file [default: results/<checkpoint name>.h5].")
@click.option("--group", default=None, help="Group name [default: measure_<ensemble>, numbered if taken]; an "
              "existing group is refused unless --replace-group.")
@click.option("--replace-group", is_flag=True, help="Replace the --group of that name if the file has one.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ais-chains", type=int, default=None, help="Forward AIS chains [512].")
@click.option("--ais-steps", type=int, default=None,
              help="Least number of annealing betas [2000]; raised to --ais-steps-per-l2 x L^2.")
@click.option("--ais-steps-per-l2", type=float, default=None,
              help="Annealing betas per squared thermodynamic length L^2 of the model [8]; raise it where "
                   "flag_heavy_tails or flag_low_ess is set (32 at d = 784, T <= 0.5: docs/estimators.md).")
@click.option("--chains", type=int, default=None, help="Sweep chains per temperature [64].")
@click.option("--burn-in", type=int, default=None, help="Sweep burn-in steps [300].")
@click.option("--samples", type=int, default=None, help="Sweep production steps [1000].")
@click.option("--replicas", type=int, default=None, help="AIS replicas for the SE [16].")
@click.option("--reverse-steps", type=int, default=None, help="Reverse-AIS betas [500].")
@click.option("--data-refs", type=int, default=None, help="Data-seeded kernel centres per temperature [64].")
@click.option("--bridge-chains", type=int, default=None, help="Chains per temperature annealed from the "
              "data-informed base [128].")
@click.option("--exchange/--no-exchange", default=True, show_default=True)
@click.option("--mbar/--no-mbar", default=True, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Fuse the MALA proposal (drawing its own noise, on CPU) and density with torch.compile "
                   "[default: when the input has >= 256 dimensions].")
def measure(ckpt, temps, units, data, ensemble, out, group, replace_group, device, seed, exchange, mbar, compile_,
            **budget):
    """Measure log Z, F, U, S, C, information vs temperature; writes a group of the results file."""
    from . import distributed as dist
    from .measure import check_group, measure as run, parse_temps, save_measurement
    t = parse_temps(temps)
    path = Path(out) if out else Path("results") / (Path(ckpt).stem + ".h5")
    check_group(path, group, replace_group)  # before any work
    opts = {k: v for k, v in budget.items() if v is not None}
    dist.setup(device)  # under torchrun: each process runs one shard of the chains
    try:
        ds = run(ckpt, t, ensemble=ensemble, units=units, data=None if data == "none" else data, seed=seed,
                 device=device, progress=dist.is_main(), exchange=exchange, mbar=mbar, compile=compile_, **opts)
        dist.synchronize()
    finally:
        main_rank = dist.is_main()
        dist.teardown()
    if main_rank:  # rank 0 alone writes the results file
        g = save_measurement(ds, path, group, replace_group)
        scale = f"T / T_train, T_train = {ds.attrs['T_train']:.3g}" if units == "train" else "raw T"
        click.echo(f"wrote group '{g}' of {path} ({len(t)} temperatures in {scale}, {ds.attrs['seconds']:.0f} s)")


@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--out", default=None, help="Output file stem or path [default: beside the first file].")
@click.option("--format", "fmt", type=click.Choice(["png", "pdf"]), default="png", show_default=True)
def plot(files, out, fmt):
    """Figures (thermodynamics, information, samples, training) from one or more results files."""
    from .plot import plot_files
    for p in plot_files(files, out=out, fmt=fmt):
        click.echo(str(p))


@cli.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(file, as_json):
    """Print the groups of a results file and a table per measurement."""
    from .report import report
    click.echo(report(file, as_json=as_json))


@cli.command()
@click.option("--ckpt", required=True)
@click.option("--temp", type=float, required=True, help="Temperature T > 0 (units of T_train unless --units raw).")
@click.option("--units", type=click.Choice(["train", "raw"]), default="train", show_default=True,
              help="train: --temp in units of the checkpoint's training temperature; raw: the logits' scale.")
@click.option("--label", type=int, default=None, help="Class for conditional sampling (joint models).")
@click.option("-n", "n", type=int, default=64, show_default=True)
@click.option("-o", "--out", default="samples.png", show_default=True)
@click.option("--steps", type=int, default=500, show_default=True, help="MALA steps (step size adapted, then frozen).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def sample(ckpt, temp, units, label, n, out, steps, seed, device):
    """Draw samples at temperature T with the engine's reflected-MALA sampler; saves an image grid."""
    from .sample import sample_to_png
    click.echo(str(sample_to_png(ckpt, temp, units=units, label=label, n=n, out=out, steps=steps, seed=seed, device=device)))


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="thermo-ebm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.ClickException as e:
        e.show()
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
