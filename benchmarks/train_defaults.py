"""The search behind `train`'s MNIST defaults: settings tried, held-out accuracy, ECE, wall time, and the sample
figures of issue #26 (T_ML / T_train from held-out-seeded chains; MNIST-feature Fréchet distance of the replay
buffer and of 10,000-step chains at T_train started from it, whose ratio is the long-run check; `long_run_start`
says where those chains started: rows evaluated before eval continued the buffer started them from noise), and the mean
data-model energy gap <E_model> - <E_data> of the marginal chains over the last epoch (raw units) with reg times it
(1 where the centred penalty cancels the likelihood gradient, docs/training.md), and the class holding most of the
replay buffer's softmax(f / T_train) mass (near 1: the chains, and the joint ensemble at T_train, sit in one class).
Writes benchmarks/results/train_defaults.json.

    python benchmarks/train_defaults.py --data-dir ../shared/data                 # train + eval every trial
    python benchmarks/train_defaults.py --collect results/ --data-dir ../shared/data  # tabulate runs already made

A trial is `thermo-ebm train --objective j_ebm --data-dir DIR --name NAME <settings>` (settings may name another
objective) followed by `thermo-ebm eval --ckpt checkpoints/NAME.pt --chain-steps 10000`; --collect reads
results/NAME.h5 of runs made that way (group 'training' and 'evaluation') and checkpoints/NAME.pt beside that
folder. Run it alone: two heavy jobs on 2 cores distort the times. Each row records its settings, the energy penalty
included (rows without one ran with the magnitude penalty, the only one before `--penalty` existed).
"""
import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from thermo_ebm import evaluate, train
from thermo_ebm.files.checkpoint import (checkpoint_temperature, load_checkpoint, model_from_checkpoint,
                                         training_config)
from thermo_ebm.files.results import list_groups, read_group, write_group
from thermo_ebm.training.chains import moves_acceptance
from thermo_ebm.training.loop import chains_class_mass

# name: settings beyond BASE, PRESETS' "*" rows on MNIST (reg 0.1 with the centred penalty, SGLD noise 0.1 at step
# 0.05: T_train 0.1, lr 1e-3, constant, 10 epochs, no base, no label-marginal term; objective j_ebm unless given),
# which were the j_ebm defaults until the search chose je_T0.02_r3_centred and then je_T0.02_r3_base40_cb (now
# PRESETS' mnist j_ebm row). m_ebm trials name every preset setting, since
# m_ebm on MNIST has a row of its own (the m_ebm_r001_e30 settings). The trials that name the magnitude penalty are
# the search as it ran before `--penalty` existed (train_defaults.json and its _T1, _chains, _m_ebm, _r003_e60 files,
# whose "hyb" row is hyb_magnitude here); train_defaults_penalty.json and train_defaults_penalty_alternatives.json
# (the *_centred j_ebm trials: the settings docs/training.md names as alternatives, under the centred penalty, and
# the je_T0.001, je_s0.5 and r0.01_cos_e30 trials of the energy gap's role) hold the runs with the centred penalty.
BASE = {"objective": "j_ebm", "sgld_noise": 0.1, "reg": 0.1, "base_components": 0, "class_balance": 0.0}
MAG = {"penalty": "magnitude"}
TRIALS = {
    "hyb": {},                                               # BASE (j_ebm, exact estimator, centred penalty)
    "gcl": {"objective": "gcl", "penalty": "centred"},       # gcl under the centred penalty (j_ebm's default)
    "hyb_magnitude": {**MAG},                                # BASE with the magnitude penalty
    "je_reg0.01": {"reg": 0.01, **MAG},
    "je_reg0.003": {"reg": 0.003, **MAG},
    "hyb_reg0": {"reg": 0.001, **MAG},
    "je_r001_lr3": {"reg": 0.001, "lr": 3e-4, "lr_schedule": "cosine", **MAG},
    "je_r003_cos": {"reg": 0.003, "lr_schedule": "cosine", **MAG},
    "je_T0.01": {"sgld_noise": 0.0316, **MAG},               # a colder sampler: T_train = 0.01
    "je_r001_e30": {"reg": 0.001, "lr_schedule": "cosine", "epochs": 30, **MAG},
    "je_r001_e60": {"reg": 0.001, "lr_schedule": "cosine", "epochs": 60, **MAG},
    "je_r003_e60": {"reg": 0.003, "lr_schedule": "cosine", "epochs": 60, **MAG},
    "gcl_magnitude": {"objective": "gcl", **MAG},            # gcl's MNIST default (train_defaults_gcl.json)
    "je_chains": {"joint_estimator": "chains", **MAG},       # JEM's class-conditional chains instead of the exact estimator
    "je_T1": {"sgld_step": 0.005, "reg": 0.001, **MAG},      # T_train = 1, where the exact estimator is joint ML
    "m_ebm": {"objective": "m_ebm", "reg": 0.1, "lr_schedule": "constant", "epochs": 10, **MAG},  # BASE's j_ebm settings
    "m_ebm_r001": {"objective": "m_ebm", "reg": 0.001, **MAG},
    "m_ebm_r001_cos": {"objective": "m_ebm", "reg": 0.001, "lr_schedule": "cosine", **MAG},
    "m_ebm_r001_e30": {"objective": "m_ebm", "reg": 0.001, "lr_schedule": "cosine", "epochs": 30, **MAG},
    "je_T0.01_centred": {"sgld_noise": 0.0316},              # the colder sampler under the default (centred) penalty
    "je_T0.01_r0.01_centred": {"sgld_noise": 0.0316, "reg": 0.01},
    "je_T0.01_r0.03_centred": {"sgld_noise": 0.0316, "reg": 0.03},
    "je_T0.01_r0.3_centred": {"sgld_noise": 0.0316, "reg": 0.3},
    "je_T0.01_r1_centred": {"sgld_noise": 0.0316, "reg": 1.0},
    "je_T0.01_r3_centred": {"sgld_noise": 0.0316, "reg": 3.0},
    "je_T0.01_r1_centred_seed1": {"sgld_noise": 0.0316, "reg": 1.0, "seed": 1},
    "je_T0.01_r3_centred_seed1": {"sgld_noise": 0.0316, "reg": 3.0, "seed": 1},
    "je_r1_centred": {"reg": 1.0},
    "je_r3_centred": {"reg": 3.0},
    "je_reg0.01_centred": {"reg": 0.01},
    "je_r001_e60_centred": {"reg": 0.001, "lr_schedule": "cosine", "epochs": 60},
    "je_s0.5_T0.01_r1": {"sgld_step": 0.5, "sgld_noise": 0.1, "reg": 1.0},  # 10x the Langevin time per step, T_train 0.01
    "je_T0.001_centred": {"sgld_noise": 0.01},                             # T_train 0.001, the default penalty
    "je_T0.03_r0.3_centred": {"sgld_noise": 0.0562, "reg": 0.3},          # T_train 0.0316, between the two above
    "je_T0.03_r1_centred": {"sgld_noise": 0.0562, "reg": 1.0},
    "je_T0.03_r3_centred": {"sgld_noise": 0.0562, "reg": 3.0},
    "je_T0.03_r3_centred_seed1": {"sgld_noise": 0.0562, "reg": 3.0, "seed": 1},
    "je_T0.03_r3_centred_seed2": {"sgld_noise": 0.0562, "reg": 3.0, "seed": 2},
    "je_T0.03_r10_centred": {"sgld_noise": 0.0562, "reg": 10.0},         # a heavier weight at the default T_train
    "je_T0.02_r3_centred": {"sgld_noise": 0.0447, "reg": 3.0},           # T_train 0.02: the j_ebm defaults on MNIST
    "je_T0.02_r3_centred_seed1": {"sgld_noise": 0.0447, "reg": 3.0, "seed": 1},
    "je_T0.02_r3_centred_seed2": {"sgld_noise": 0.0447, "reg": 3.0, "seed": 2},
    # the defaults trained 75 epochs (9,375 steps, full MNIST's 10 epochs) and, on full MNIST
    # (train_defaults_full_mnist.json, benchmarks/full_mnist.py), a lighter weight and the digit-drawing setting
    "je_T0.02_r3_centred_e75": {"sgld_noise": 0.0447, "reg": 3.0, "epochs": 75},
    "je_T0.02_r0.01_centred": {"sgld_noise": 0.0447, "reg": 0.01},
    "je_r001_cos": {"reg": 0.001, "lr_schedule": "cosine", **MAG},
    "je_T0.01_r0.01_cos_e30": {"sgld_noise": 0.0316, "reg": 0.01, "lr_schedule": "cosine", "epochs": 30},
    "m_ebm_r001_e30_centred": {"objective": "m_ebm", "reg": 0.001, "lr_schedule": "cosine", "epochs": 30,
                               "penalty": "centred"},
    # capacity: does a wider network keep the classifier where the energies deepen? (train_defaults_width.json)
    "je_w1024_r0.01": {"model_size": 1024, "reg": 0.01},
    "je_w1024_r0.01_cos": {"model_size": 1024, "reg": 0.01, "lr_schedule": "cosine"},
    # BASE over seeds (train_defaults_seeds.json)
    "hyb_seed1": {"seed": 1},
    "hyb_seed2": {"seed": 2},
    "gcl_magnitude_seed1": {"objective": "gcl", "seed": 1, **MAG},
    # persistent chains that keep up with the model: a buffer of one batch moves all its chains every step
    # (train_defaults_buffer.json)
    "je_buf64": {"buffer_size": 64},
    "je_buf64_r0.01": {"buffer_size": 64, "reg": 0.01},
    "je_buf64_mag_r0.001": {"buffer_size": 64, "reg": 0.001, **MAG},  # the same in the digit-drawing regime
    # a convolutional energy (models.py `cnn`, 8 base channels: 26,058 parameters against the MLP's 270,000)
    "je_cnn8_r0.01": {"arch": "cnn", "model_size": 8, "reg": 0.01},
    "je_cnn8_r0.003": {"arch": "cnn", "model_size": 8, "reg": 0.003},
    "je_cnn8_r0.001": {"arch": "cnn", "model_size": 8, "reg": 0.001},
    "je_cnn8_r0.001_cos": {"arch": "cnn", "model_size": 8, "reg": 0.001, "lr_schedule": "cosine"},
    "je_cnn8_r0.001_e20": {"arch": "cnn", "model_size": 8, "reg": 0.001, "epochs": 20},
    "je_cnn8_T0.01_r0.03": {"arch": "cnn", "model_size": 8, "sgld_noise": 0.0316, "reg": 0.03},
    # the digit-drawing setting with the label-marginal term, which keeps its chains' classes apart, at T_train 0.1 and
    # at the MNIST j_ebm default's 0.02, there also with a buffer of 1,000 (each chain moved every 16 steps)
    # (train_defaults_class_balance.json)
    "je_r001_e30_cb": {"reg": 0.001, "lr_schedule": "cosine", "epochs": 30, "class_balance": 1.0, **MAG},
    **{f"je_T0.02_r001_e30_cb{tail}": {"sgld_noise": 0.0447, "reg": 0.001, "lr_schedule": "cosine", "epochs": 30,
                                        "class_balance": 1.0, **extra, **MAG}
       for tail, extra in (("", {}), ("_buf1000", {"buffer_size": 1000}),
                           ("_buf1000_seed1", {"buffer_size": 1000, "seed": 1}),
                           ("_buf1000_seed2", {"buffer_size": 1000, "seed": 2}))},
    "je_T0.02_r001_e30_cb_buf1000_mala": {"sgld_noise": 0.0447, "reg": 0.001, "lr_schedule": "cosine", "epochs": 30,
                                          "class_balance": 1.0, "buffer_size": 1000, "sampler": "mala", **MAG},
    "je_T0.02_r3_centred_mala": {"sgld_noise": 0.0447, "reg": 3.0, "sampler": "mala"},  # the defaults, MH-corrected
    "je_T0.02_r001_cos_cb_buf1000": {"sgld_noise": 0.0447, "reg": 0.001, "lr_schedule": "cosine", "class_balance": 1.0,
                                     "buffer_size": 1000, **MAG},  # the same in 10 epochs: full MNIST's 9,370 steps
    "je_T1_r001_e30_cb_buf1000": {"sgld_step": 0.001, "sgld_noise": 0.04472, "reg": 0.001, "lr_schedule": "cosine",
                                  "epochs": 30, "class_balance": 1.0, "buffer_size": 1000, **MAG},  # the same at T_train 1
    # a fixed base under the network (--base-components, docs/training.md), at the defaults' T_train 0.02 and reg 3;
    # with the label-marginal term (the MNIST j_ebm defaults since) over three seeds, and without it
    # (train_defaults_base.json)
    **{f"je_T0.02_r3_base40{tail}": {"sgld_noise": 0.0447, "reg": 3.0, "base_components": 40, **extra}
       for tail, extra in (("_cb", {"class_balance": 1.0}), ("_cb_seed1", {"class_balance": 1.0, "seed": 1}),
                           ("_cb_seed2", {"class_balance": 1.0, "seed": 2}), ("", {}))},
}


def row(name, settings, res, ckpt):
    """One trial's figures from its results file (training and evaluation groups)."""
    tr = read_group(res, "training")
    ev = read_group(res, "evaluation")
    kinds = list(ev.chain_kind.values)
    fid = {k: float(ev.mnist_feature_frechet[i]) for i, k in enumerate(kinds)} if "mnist_feature_frechet" in ev else {}
    buf = next((v for k, v in fid.items() if k.startswith("buffer")), float("nan"))
    long = fid.get("mala_10000", float("nan"))
    cfg = training_config({"config": json.loads(tr.attrs["config"])})  # settings added since: as they trained
    last = tr.step > tr.epoch_end_step.values[-2] if tr.sizes["epoch"] > 1 else tr.step > 0
    gap = (float(tr.marginal_net_gap[last].mean()) if "marginal_net_gap" in tr  # a base's part left out
           else float((tr.marginal_e_model - tr.marginal_e_data)[last].mean()) if "marginal_e_model" in tr
           else float("nan"))
    return dict(name=name, settings=settings, data=str(tr.attrs.get("split_note", "")), objective=cfg["objective"],
                joint_estimator=cfg.get("joint_estimator"), penalty=cfg["penalty"], class_balance=cfg["class_balance"],
                epochs=int(tr.sizes["epoch"]), heldout_acc=float(tr.heldout_acc.values[-1]),
                ece=float(ev.ece), ece_err=float(ev.ece_err), t_cal_raw=float(ev.t_cal),
                T_train=float(tr.attrs["training_temperature"]), train_seconds=float(tr.seconds.values[-1]),
                buffer_frechet=buf, long_run_frechet=long, long_run_ratio=long / buf if buf else float("nan"),
                long_run_start=str(ev.attrs.get("long_run_start", "uniform noise, annealed over the first half")),
                T_ML_over_T_train=float(tr.attrs.get("T_ML_quick", float("nan"))),
                T_ML_over_T_train_err=float(tr.attrs.get("T_ML_quick_err", float("nan"))),
                T_ML_side=str(tr.attrs.get("T_ML_quick_side", "not estimated")),
                energy_gap=gap, reg_times_gap=cfg["reg"] * gap,
                sampler_acceptance=sampler_acceptance(ckpt),
                **dict(zip(("buffer_top_class", "buffer_top_class_mass"), buffer_classes(ckpt))))


def sampler_acceptance(ckpt):
    """How often the checkpoint's training moves pass the Metropolis test at T_train from its buffer
    (training.chains.moves_acceptance, as `train` logs it): near 1 the chains sampled p at T_train."""
    st = load_checkpoint(ckpt)
    return moves_acceptance(model_from_checkpoint(st, ckpt).eval(), st["buffers"], training_config(st))


def buffer_classes(ckpt):
    """The class holding most of the replay buffer at T_train: (class, its mean softmax(f / T_train) mass) over the
    marginal buffer (the joint one where there is none). A joint model whose chains sit in one class has mass ~1."""
    st = load_checkpoint(ckpt)
    model, t_train = model_from_checkpoint(st, ckpt).eval(), checkpoint_temperature(st)
    mass = chains_class_mass(model, st["buffers"].get("marginal/x", st["buffers"].get("joint/x")), t_train)
    return int(mass.argmax()), float(mass.max())


def t_ml(r):
    """T_ML / T_train as the quick estimate gives it: a value with its SE, or the side of 0.25-4 it lies on."""
    return {"inside": f"{r['T_ML_over_T_train']:.3g} ± {r['T_ML_over_T_train_err']:.2g}", "below": "< 0.25",
            "above": "> 4"}.get(r["T_ML_side"], r["T_ML_side"])


p = argparse.ArgumentParser()
p.add_argument("--data-dir", default="../shared/data")
p.add_argument("--collect", default=None, help="tabulate results/NAME.h5 of trials already run (folder)")
p.add_argument("--only", default=None, help="comma list of trial names")
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_defaults.json"))
args = p.parse_args()
names = args.only.split(",") if args.only else list(TRIALS)
rows = []
for name in names:
    settings = TRIALS[name]
    if args.collect:
        res = Path(args.collect) / f"{name}.h5"
        ckpt = Path(args.collect).parent / "checkpoints" / f"{name}.pt"
        if not res.is_file() or not ckpt.is_file() or "evaluation" not in list_groups(res):
            print(f"{name}: no trained and evaluated run at {res} with its checkpoint; skipped")
            continue
    else:
        t0 = time.perf_counter()
        out = train(name=name, data_dir=args.data_dir, overwrite=True, **{**BASE, **settings})
        res, ckpt = out["results"], out["checkpoint"]
        ds = evaluate(out["checkpoint"], data_dir=args.data_dir, chain_steps=(10000,))
        write_group(res, "evaluation", ds, replace=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s train + eval")
    r = row(name, settings, res, ckpt)
    rows.append(r)
    print(f"{name:<14} acc {r['heldout_acc']:.4f}  ECE {r['ece']:.3f}  T_train {r['T_train']:.3g}  "
          f"train {r['train_seconds']:.0f} s  Fréchet buffer {r['buffer_frechet']:.0f} long-run {r['long_run_frechet']:.0f} "
          f"(x{r['long_run_ratio']:.2f})  buffer in class {r['buffer_top_class']} ({r['buffer_top_class_mass']:.2f})  "
          f"T_ML/T_train {t_ml(r)}  gap {r['energy_gap']:.3g} (reg x gap {r['reg_times_gap']:.2f})  "
          f"{settings}", flush=True)
Path(args.out).parent.mkdir(exist_ok=True)
Path(args.out).write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, "
                                          f"{torch.get_num_threads()} threads",
                                          rows=rows), indent=1))
print("->", args.out)
