"""The design card's commands as a new user types them, with every default, on MNIST: `train --objective j_ebm`,
`measure --ckpt checkpoints/run.pt --temps 0.5:2:0.1`, `plot results/run.h5` (and `eval`, for calibration and
the buffer's Fréchet distance), each timed alone. Prints the summary and writes
benchmarks/results/design_card.json: the wall time of each command, the classifier's figures, and per
temperature (units of T_train) log Z, U, C, I(X;Y), the held-out log-likelihood and the flags.

    python benchmarks/design_card.py --data-dir ../shared/data        # in a fresh --workdir: about 20 min on 2 CPU cores
    python benchmarks/design_card.py --collect WORKDIR                  # tabulate a run this script made there

Run it alone: two heavy jobs on 2 cores distort the times.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from thermo_ebm.files.results import read_group
from thermo_ebm.measurement.flags import AFFECTS

COMMANDS = {
    "train": ["train", "--objective", "j_ebm", "--data-dir", "{data}"],
    "measure": ["measure", "--ckpt", "checkpoints/run.pt", "--temps", "0.5:2:0.1"],
    "plot": ["plot", "results/run.h5"],
    "eval": ["eval", "--ckpt", "checkpoints/run.pt", "--data-dir", "{data}"],
}
TIMES = "design_card_seconds.json"


def run(workdir: Path, data_dir: str):
    """Run the commands in `workdir` (which must not hold a run yet); their wall seconds go to workdir/TIMES."""
    if (workdir / "checkpoints" / "run.pt").exists():
        sys.exit(f"{workdir} already holds checkpoints/run.pt; give a fresh --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, args in COMMANDS.items():
        cmd = [sys.executable, "-m", "thermo_ebm"] + [a.format(data=data_dir) for a in args]
        t0 = time.perf_counter()
        with open(workdir / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        (workdir / TIMES).write_text(json.dumps(seconds))


def finite(v):
    v = float(v)
    return v if np.isfinite(v) else None


def collect(workdir: Path) -> dict:
    """The JSON record of a run made by `run` in `workdir`."""
    res = workdir / "results" / "run.h5"
    seconds = json.loads((workdir / TIMES).read_text())
    tr, ev, ms = (read_group(res, g) for g in ("training", "evaluation", "measure_joint"))
    acc = tr["heldout_acc"].values if "heldout_acc" in tr else None
    rows = []
    for i, t in enumerate(ms.temperature.values):
        row = {"T": float(t)}
        for v in ("log_Z", "U", "C", "I_XY_bits", "H_Y_bits", "info_bits", "log_lik_heldout"):
            row[v], row[v + "_err"] = finite(ms[v].values[i]), finite(ms[v + "_err"].values[i])
        row["flags"] = [v[len("flag_"):] for v in AFFECTS if v in ms and bool(ms[v].values[i])]
        rows.append(row)
    frechet = {str(k): finite(f) for k, f in zip(ev["chain_kind"].values, ev["mnist_feature_frechet"].values)}
    return dict(
        date=str(date.today()), machine=f"{platform.machine()}, {torch.get_num_threads()} threads, run alone",
        commands={k: g.attrs["command_line"] for k, g in (("train", tr), ("measure", ms), ("eval", ev))}, seconds=seconds,
        T_train=float(ms.attrs["T_train"]),
        heldout_acc=finite(acc[-1]) if acc is not None else None,
        ece=finite(ev["ece"]), ece_err=finite(ev["ece_err"]),
        T_ML_quick=finite(tr.attrs["T_ML_quick"]), T_ML_quick_err=finite(tr.attrs["T_ML_quick_err"]),
        mnist_feature_frechet=frechet,
        T_ML=finite(ms["T_ML"]), T_ML_err=finite(ms["T_ML_err"]), T_ML_side=ms.attrs.get("T_ML_side"),
        unflagged=sum(not r["flags"] for r in rows), rows=rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="as the user passes it, relative to --workdir")
    p.add_argument("--workdir", default=None, help="fresh folder for the run [default: a new temporary one]")
    p.add_argument("--collect", default=None, help="tabulate the run already made in this folder")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "design_card.json"))
    args = p.parse_args()
    if args.collect:
        workdir = Path(args.collect)
    else:
        import tempfile
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="design_card_"))
        run(workdir, os.path.relpath(Path(args.data_dir).resolve(), workdir) if args.workdir is None else args.data_dir)
    out = collect(workdir)
    for r in out["rows"]:
        print(f"T {r['T']:.1f}  C {r['C']:.2f} ± {r['C_err']:.2f}  I(X;Y) {r['I_XY_bits']:.2f} ± {r['I_XY_bits_err']:.2f} bits"
              f"  held-out log-lik {r['log_lik_heldout']:.1f}  {','.join(r['flags']) or 'ok'}")
    print(f"held-out accuracy {out['heldout_acc']}, ECE {out['ece']:.3f}, unflagged {out['unflagged']} of "
          f"{len(out['rows'])}, seconds {out['seconds']}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("->", args.out)


if __name__ == "__main__":
    main()
