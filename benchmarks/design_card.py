"""The design card's commands as a new user types them, with every default, on MNIST: `train --objective j_ebm`,
`measure --ckpt checkpoints/run.pt --temps 0.5:2:0.1`, `plot results/run.h5` (and `eval`, for calibration and
the buffer's Fréchet distance), each timed alone. Prints the summary and writes
benchmarks/results/design_card.json: the wall time of each command and the results file as `thermo-ebm show
--json` reports it (training, evaluation, and per temperature in units of T_train log Z, U, C, I(X;Y), the held-out
log-likelihood and the flags, with T_ML).

    python benchmarks/design_card.py --data-dir ../shared/data        # in a fresh --workdir: about 20 min on 2 CPU cores
    python benchmarks/design_card.py --collect WORKDIR                  # tabulate a run this script made there
    python benchmarks/design_card.py --train-args "--class-balance 1"    # the same commands, train given more options

Run it alone: two heavy jobs on 2 cores distort the times.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from thermo_ebm.reporting.report import report

COMMANDS = {
    "train": ["train", "--objective", "j_ebm", "--data-dir", "{data}"],
    "measure": ["measure", "--ckpt", "checkpoints/run.pt", "--temps", "0.5:2:0.1"],
    "plot": ["plot", "results/run.h5"],
    "eval": ["eval", "--ckpt", "checkpoints/run.pt", "--data-dir", "{data}"],
}
TIMES = "design_card_seconds.json"


def run(workdir: Path, data_dir: str, train_args: list):
    """Run the commands in `workdir` (which must not hold a run yet), `train` with train_args after the defaults;
    their wall seconds go to workdir/TIMES."""
    if (workdir / "checkpoints" / "run.pt").exists():
        sys.exit(f"{workdir} already holds checkpoints/run.pt; give a fresh --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, args in COMMANDS.items():
        cmd = [sys.executable, "-m", "thermo_ebm"] + [a.format(data=data_dir) for a in args]
        cmd += train_args if name == "train" else []
        t0 = time.perf_counter()
        with open(workdir / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        (workdir / TIMES).write_text(json.dumps({**seconds, "train_args": train_args}))


def collect(workdir: Path) -> dict:
    """The JSON record of a run made by `run` in `workdir`."""
    seconds = json.loads((workdir / TIMES).read_text())
    train_args, note = seconds.pop("train_args", []), seconds.pop("note", "run alone")
    results = json.loads(report(workdir / "results" / "run.h5", as_json=True))
    return dict(date=str(date.today()), machine=f"{platform.machine()}, {torch.get_num_threads()} threads, {note}",
                train_args=train_args, seconds=seconds, results=results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="MNIST's folder (MNIST/raw inside), from here")
    p.add_argument("--workdir", default=None, help="fresh folder for the run [default: a new temporary one]")
    p.add_argument("--collect", default=None, help="tabulate the run already made in this folder")
    p.add_argument("--train-args", default="", help="options `train` takes after the defaults' (one string)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "design_card.json"))
    args = p.parse_args()
    if args.collect:
        workdir = Path(args.collect)
    else:
        import tempfile
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="design_card_"))
        run(workdir, os.path.relpath(Path(args.data_dir).resolve(), workdir.resolve()), shlex.split(args.train_args))
    out = collect(workdir)
    groups = out["results"]["groups"]
    rows = groups["measure_joint"]["rows"]
    for r in rows:
        print(f"T {r['T']:.1f}  C {r['C']:.2f} ± {r['C_err']:.2f}  I(X;Y) {r['I_XY_bits']:.2f} ± {r['I_XY_bits_err']:.2f} bits"
              f"  held-out log-lik {r['log_lik_heldout']:.1f}  {r['flags']}")
    t_ml = groups["measure_joint"]["reference_temperatures"]["T_ML"]
    print(f"held-out accuracy {groups['training']['heldout_acc']}, ECE {groups['evaluation']['ece'][0]:.3f}, "
          f"unflagged {sum(r['flags'] == 'ok' for r in rows)} of {len(rows)}, T_ML {t_ml['value']:.3g} ± {t_ml['se']:.2g} "
          f"{t_ml['note']}, seconds {out['seconds']}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("->", args.out)


if __name__ == "__main__":
    main()
