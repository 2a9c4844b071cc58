"""Performance benchmarks of issue 5. Prints tables and writes benchmarks/results/perf_<section>.json.

    python benchmarks/perf.py [--sections overhead,sweep,train,efficiency,scaling,gpu] [--quick]

Every ratio is measured within one run of this script, on the same machine and thread count.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from thermo_ebm.samplers.ais import make_schedule, run_forward, tune
from thermo_ebm.ensembles import Ensemble
from thermo_ebm.models import build_model
from thermo_ebm.samplers.kernels import (MalaKernel, Sampler, _drift_mean, energy_and_grad, fold, gaussian, langevin_init,
                                         langevin_step, mala_init, mala_kernel, mala_step, uniform)
from thermo_ebm.estimators import logmeanexp
from thermo_ebm.samplers.rng import draw_key, normals_like
from thermo_ebm.samplers.sweep import run_sweep, sweep_loop
from thermo_ebm.testing import DoubleWells, TruncatedGaussian

OUT = Path(__file__).parent / "results"
MNIST = (1, 28, 28)


def mnist_mlp(device="cpu"):
    torch.manual_seed(0)
    return build_model("shallow", MNIST, 10, 512, depth=3).to(device).eval()  # 784-512-512-512-10


def interleaved(fns, reps, warmup=3, sync=lambda: None):
    """Median wall time (s) of each fn, timed round-robin (a, b, c, a, b, ...) so that drift in the
    machine's speed hits every variant alike; timing them one after the other biased ratios by up to 30%."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write(name, payload):
    OUT.mkdir(exist_ok=True)
    payload = dict(payload, machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    path = OUT / f"perf_{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print("->", path)


# ----------------------------------------------------------------------------- 1. sampler overhead
# Lower bounds for the two targets (session 8), timed beside the real samplers. Neither is a sampler of the box:
# - the unconstrained MALA step: `mala_step` with a kernel that drops the box (Gaussian proposal on R^d, so the
#   proposal density ratio is a quadratic form: no fold, no transcendentals), noise drawn inside the compiled
#   proposal. Any MH-corrected Langevin step needs at least this: noise, proposal, density ratio, MH test, selection.
# - the compiled Langevin move: the SGLD update and clamp in one compiled loop with in-loop Threefry noise.
def _propose_unconstrained(x, ugrad, s, b, key):
    return _drift_mean(x, ugrad, s, b) + s * normals_like(x, key)


def _accept_unconstrained(x, y, ugrad, g_y, s, b, dlp, log_u, finite):
    mu_x, mu_y = _drift_mean(x, ugrad, s, b), _drift_mean(y, g_y, s, b)
    log_q = ((y - mu_x) ** 2 - (x - mu_y) ** 2).sum(-1) / (2.0 * s[:, 0] * s[:, 0])
    acc = (log_u < dlp + log_q) & finite
    return torch.where(acc[:, None], y, x), torch.where(acc[:, None], g_y, ugrad), acc


def _langevin_move(x, grad, key, step: float, std: float):
    return (x - step * grad + std * normals_like(x, key)).clamp(-1.0, 1.0)


def overhead(quick):
    model, ens = mnist_mlp(), Ensemble("marginal", 10)
    energy_fn = lambda x: -torch.logsumexp(model(x), -1)  # noqa: E731
    rows = []
    for n in (128, 1024):
        g = torch.Generator().manual_seed(0)
        x = uniform(n, MNIST, g, "cpu")
        reps = 20 if quick else 60

        def floor():
            xx = x.detach().requires_grad_(True)
            e = -torch.logsumexp(model(xx), -1)
            torch.autograd.grad(e.sum(), xx)
        st_l = langevin_init(energy_fn, x)
        st_m = mala_init(model, ens, x)
        beta = torch.ones(n)
        step = torch.full((n,), 0.05)
        fused = mala_kernel(True)
        # before session 6 the compiled kernel drew its noise with torch.randn; kept for the before/after ratio
        fused_randn = MalaKernel(gaussian, fused.propose, fused.accept)
        unconstrained = MalaKernel(lambda like, gen: draw_key(gen, like.device),
                                   torch.compile(_propose_unconstrained, dynamic=True),
                                   torch.compile(_accept_unconstrained, dynamic=True))
        move = torch.compile(_langevin_move, dynamic=True)
        # parts of the step above the floor: the N x 784 normal draws (torch.randn), and the compiled acceptance
        # (the exact folded-Gaussian proposal-density ratio, the MH test and the selection of x and its gradient)
        flat, ugrad = x.reshape(n, -1), st_m.ugrad.reshape(n, -1)
        s, b = step[:, None], beta[:, None]
        y = fused.propose(flat, ugrad, s, b, torch.randn(flat.shape, generator=g))
        zero, ok = torch.zeros(n), torch.ones(n, dtype=torch.bool)
        t = interleaved({
            "floor": floor, "langevin": lambda: langevin_step(st_l, energy_fn, 0.01, 0.01, g),
            "mala_eager": lambda: mala_step(st_m, model, ens, beta, step, g),
            "mala_compiled": lambda: mala_step(st_m, model, ens, beta, step, g, fused),
            "mala_compiled_randn": lambda: mala_step(st_m, model, ens, beta, step, g, fused_randn),
            "langevin_compiled_bound": lambda: langevin_init(energy_fn, move(st_l.x, st_l.grad, draw_key(g, "cpu"),
                                                                             0.01, 0.01)),
            "mala_unconstrained_bound": lambda: mala_step(st_m, model, ens, beta, step, g, unconstrained),
            "randn": lambda: torch.randn(flat.shape, generator=g),
            "accept": lambda: fused.accept(flat, y, ugrad, ugrad, s, b, zero, zero, ok)}, reps)
        f = t["floor"]
        rows.append(dict(n=n, floor_s=f, **{f"{k}_s": v for k, v in t.items() if k != "floor"},
                         **{f"{k}_ratio": v / f for k, v in t.items() if k != "floor"}))
        print(f"N={n:<5} floor {f * 1e3:7.2f} ms  Langevin x{t['langevin'] / f:.3f} (target <= 1.10)  "
              f"reflected MALA eager x{t['mala_eager'] / f:.3f}, compiled x{t['mala_compiled'] / f:.3f} (its noise "
              f"from torch.randn instead: x{t['mala_compiled_randn'] / f:.3f}) "
              f"(target <= 1.15); parts: randn {t['randn'] / f:.3f}, accept {t['accept'] / f:.3f}; lower bounds: "
              f"compiled Langevin move x{t['langevin_compiled_bound'] / f:.3f}, unconstrained MALA "
              f"x{t['mala_unconstrained_bound'] / f:.3f}")
    write("overhead", dict(model="784-512-512-512-10 MLP", rows=rows, targets=dict(langevin=1.10, mala=1.15)))


# ----------------------------------------------------------------------------- 2. batched sweep
def sweep(quick, device="cpu"):
    model, ens = mnist_mlp(device), Ensemble("marginal", 10)
    n_t, c = 16, 64
    betas = np.linspace(0.5, 2.0, n_t)
    n_burn, n_prod = (5, 15) if quick else (10, 40)
    g = torch.Generator(device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    init = mala_init(model, ens, uniform(n_t * c, MNIST, g.manual_seed(0), device))
    step0 = np.full(n_t, 0.05)
    kernel = mala_kernel(True)  # what measure uses at d = 784

    def batched():
        run_sweep(Sampler(model, ens, MNIST, g.manual_seed(1), device, kernel), init, betas, step0, n_burn=n_burn,
                  n_prod=n_prod, exchange=True, thin=5)

    def sequential():
        for t in range(n_t):
            part = type(init)(*(f[t * c:(t + 1) * c] for f in init))
            run_sweep(Sampler(model, ens, MNIST, g.manual_seed(1), device, kernel), part, betas[t:t + 1],
                      step0[t:t + 1], n_burn=n_burn, n_prod=n_prod, exchange=False, thin=5)
    t_b, t_s = interleaved({"batched": batched, "sequential": sequential}, 3, warmup=1, sync=sync).values()
    print(f"16 temperatures x 64 chains, {n_burn + n_prod} steps on {device}: batched {t_b:.2f} s, "
          f"sequential {t_s:.2f} s, speed-up x{t_s / t_b:.2f} (target >= {1.5 if device == 'cpu' else 5})")
    write(f"sweep_{device}", dict(device=device, temperatures=n_t, chains_per_temperature=c, steps=n_burn + n_prod,
                                  batched_s=t_b, sequential_s=t_s, speedup=t_s / t_b))


# ----------------------------------------------------------------------------- 3. training step
def train_step(quick):
    from thermo_ebm.training.loop import TrainConfig, Trainer
    cfg = TrainConfig(objective="j_ebm", dataset="digits", model_size=512, depth=3, batch_size=64,
                      mc_steps=20, buffer_size=1000, reg=0.1, device="cpu").validate()
    tr = Trainer(cfg, progress=False)
    xb, yb = tr.data.x_train[:64], tr.data.y_train[:64]
    ref_model = build_model("shallow", tr.data.shape, 10, 512, depth=3)
    ref_model.load_state_dict(tr.model.state_dict())
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=cfg.lr)
    floor_opt = torch.optim.Adam(ref_model.parameters(), lr=cfg.lr, fused=True)  # the cheapest Adam step torch has
    buf_x = tr.chains.pops["joint"]["x"].clone()
    buf_y = tr.chains.pops["joint"]["y"].clone()
    g = torch.Generator().manual_seed(0)

    def reference():
        """A straightforward JEM-style step: toggle requires_grad, .backward() for dE/dx, clamp."""
        idx = torch.randperm(len(buf_x), generator=g)[:64]
        x, y = buf_x[idx].clone(), buf_y[idx]
        for p in ref_model.parameters():
            p.requires_grad_(False)
        for _ in range(cfg.mc_steps):
            x.requires_grad_(True)
            e = -ref_model(x).gather(1, y[:, None]).squeeze(1)
            e.sum().backward()
            x = (x - cfg.sgld_step * x.grad + cfg.sgld_noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
            x = x.detach()
        for p in ref_model.parameters():
            p.requires_grad_(True)
        buf_x[idx] = x
        e_data = -ref_model(xb).gather(1, yb[:, None]).squeeze(1)
        e_model = -ref_model(x).gather(1, y[:, None]).squeeze(1)
        loss = e_data.mean() - e_model.mean() + 0.1 * (e_data.pow(2).mean() + e_model.pow(2).mean())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return float(loss.detach())

    def ours():
        tr.train_step(xb, yb)

    def floor():
        """The work every such step must do: mc_steps input gradients at batch 64, then the loss
        forward/backward on data + samples (128 inputs) and the optimizer step."""
        x = buf_x[:64]
        for _ in range(cfg.mc_steps):
            energy_and_grad(lambda z: -ref_model(z).gather(1, buf_y[:64, None]).squeeze(1), x)
        floor_opt.zero_grad()
        (-ref_model(torch.cat([xb, x])).gather(1, torch.cat([yb, buf_y[:64]])[:, None]).mean()).backward()
        floor_opt.step()

    t_ours, t_ref, t_floor = interleaved({"ours": ours, "reference": reference, "floor": floor},
                                         5 if quick else 15).values()
    # same losses: both start from identical weights and chains; compare the first-step loss exactly
    tr2 = Trainer(cfg, progress=False)
    m2 = build_model("shallow", tr2.data.shape, 10, 512, depth=3)
    m2.load_state_dict(tr2.model.state_dict())
    x0, y0 = tr2.chains.pops["joint"]["x"][:64], tr2.chains.pops["joint"]["y"][:64]
    with torch.no_grad():
        ed = -m2(xb).gather(1, yb[:, None]).squeeze(1)
        em = -m2(x0).gather(1, y0[:, None]).squeeze(1)
        lg = tr2.model(torch.cat([xb, x0]))
    from thermo_ebm.training.objectives import loss_terms
    ref_loss = float(ed.mean() - em.mean() + 0.1 * (ed.pow(2).mean() + em.pow(2).mean()))
    our_loss = float(loss_terms("j_ebm", lg[:64], yb, logits_joint=lg[64:], y_joint=y0, logits_marginal=None,
                                gamma=1.0, reg=0.1)[0])
    print(f"train step (j_ebm, digits 64-d MLP 512x3, batch 64, {cfg.mc_steps} MC steps): ours "
          f"{t_ours * 1e3:.1f} ms, reference {t_ref * 1e3:.1f} ms, floor {t_floor * 1e3:.1f} ms; speed-up "
          f"x{t_ref / t_ours:.2f} (target >= 1.2); reference / floor {t_ref / t_floor:.2f}; "
          f"loss on identical inputs: ours {our_loss:.6f}, reference {ref_loss:.6f}")
    write("train", dict(ours_s=t_ours, reference_s=t_ref, floor_s=t_floor, speedup=t_ref / t_ours,
                        reference_over_floor=t_ref / t_floor, ours_over_floor=t_ours / t_floor, loss_ours=our_loss,
                        loss_reference=ref_loss, mc_steps=cfg.mc_steps, batch=64, model="64-512-512-512-10"))


# ----------------------------------------------------------------------------- 4. statistical efficiency
def ula_ais(system, beta_max, n_chains, n_steps, step, seed):
    """Baseline: AIS with unadjusted Langevin (reflected into the box) and a linear beta schedule."""
    g = torch.Generator().manual_seed(seed)
    d = system.d
    x = uniform(n_chains, (d,), g, "cpu")
    betas = np.linspace(0, beta_max, n_steps + 1)
    logw = torch.zeros(n_chains, dtype=torch.float64)
    e = -system(x)[:, 0]
    for k in range(1, n_steps + 1):
        logw += (-(betas[k] - betas[k - 1]) * e).double()
        e, grad = energy_and_grad(lambda z: -system(z)[:, 0], x)
        x = fold(x - step * betas[k] * grad + (2 * step) ** 0.5 * torch.randn(x.shape, generator=g))
        e = -system(x)[:, 0]
    return float(logmeanexp(logw.numpy())) + d * np.log(2.0)  # + log volume of the uniform start


def ours_ais(system, beta_max, n_chains, n_steps, seed):
    ens = Ensemble("marginal", 1)
    g = torch.Generator().manual_seed(seed)
    s = Sampler(system, ens, (system.d,), g, "cpu")
    tuning = tune(s, np.array([beta_max]), n_chains=64, n_stages=100, n_adapt=5)
    sched, steps = make_schedule(tuning, np.array([beta_max]), n_steps)
    fw = run_forward(s, sched, steps, np.array([beta_max]), n_chains=n_chains, n_keep=1, mcmc_steps=1)
    pilot_evals = 64 * len(tuning.betas) * 5
    return float(logmeanexp(fw.logw[-1].numpy())) + system.d * np.log(2.0), pilot_evals


def efficiency(quick):
    rows = []
    repeats = 5 if quick else 10
    for d in (64, 784):
        for name, system in (("gaussian", TruncatedGaussian(d)), ("wells", DoubleWells(d))):
            exact = float(system.exact([1.0])["log_Z"][0])
            n_chains, n_steps = 256, 1000
            ours, ula = [], []
            for r in range(repeats):
                est, pilot = ours_ais(system, 1.0, n_chains, n_steps, seed=r)
                ours.append(est)
                # equal budget of network evaluations: the baseline also gets our pilot's evaluations
                ula_steps = n_steps + pilot // n_chains
                ula.append(ula_ais(system, 1.0, n_chains, ula_steps, step=0.5 * 0.2 ** 2, seed=r))
            rm_o = float(np.sqrt(np.mean((np.array(ours) - exact) ** 2)))
            rm_u = float(np.sqrt(np.mean((np.array(ula) - exact) ** 2)))
            rows.append(dict(system=name, d=d, exact=exact, ours_mean=float(np.mean(ours)), ula_mean=float(np.mean(ula)),
                             rmse_ours=rm_o, rmse_ula=rm_u, ratio=rm_u / rm_o, repeats=repeats,
                             evals_per_run=n_chains * (n_steps + pilot // n_chains)))
            print(f"{name:<9}d={d:<4} exact {exact:10.3f}  reflected-MALA AIS {np.mean(ours):10.3f} (RMSE {rm_o:.3f})"
                  f"  ULA+linear {np.mean(ula):10.3f} (RMSE {rm_u:.3f})  ratio x{rm_u / rm_o:.1f} (target >= 3)")
    write("efficiency", dict(rows=rows, temperature=1.0))


# ----------------------------------------------------------------------------- 5. scaling
SCALING_CHILD = """
import json, resource, sys, time, torch
from thermo_ebm import measure
from thermo_ebm.testing import TruncatedGaussian
d, chains = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
t0 = time.perf_counter()
measure(TruncatedGaussian(d), [0.5, 1.0, 2.0], device="cpu", ais_chains=chains, chains=chains // 8,
        ais_steps=500, samples=200, burn_in=100, reverse_steps=100)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def scaling(quick):
    rows = []
    configs = [(64, 256), (64, 1024), (64, 4096), (784, 256), (784, 1024)] + ([] if quick else [(784, 4096)])
    for d, chains in configs:
        out = subprocess.run([sys.executable, "-c", SCALING_CHILD, str(d), str(chains), str(torch.get_num_threads())],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(d=d, ais_chains=chains, **r))
        print(f"d={d:<4} AIS chains {chains:<5} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    write("scaling", dict(rows=rows, note="3 temperatures, ais_steps 500, sweep chains = AIS chains / 8 per T"))


# ----------------------------------------------------------------------------- 6. GPU
def gpu(quick):
    if not torch.cuda.is_available():
        print("gpu: no CUDA device here; skipped")
        return
    dev = "cuda"
    model, ens = mnist_mlp(dev), Ensemble("marginal", 10)
    n_t, c = 16, 625  # 10,000 chains
    betas = np.linspace(0.5, 2.0, n_t)
    g = torch.Generator(device=dev).manual_seed(0)
    init = mala_init(model, ens, uniform(n_t * c, MNIST, g, dev))
    steps = 200
    kernel = mala_kernel(True)

    def run(k):
        return lambda: run_sweep(Sampler(model, ens, MNIST, g, dev, k), init, betas, np.full(n_t, 0.05),
                                 n_burn=steps // 2, n_prod=steps // 2, exchange=True, thin=10)
    # with and without torch.compile of the elementwise kernel (the network itself runs eager in both)
    t = interleaved({"compiled": run(kernel), "eager": run(mala_kernel(False))}, 3, warmup=1,
                    sync=torch.cuda.synchronize)
    rate, rate_eager = (n_t * c * steps / t[k] for k in ("compiled", "eager"))
    # host synchronisation inside the whole step loop (MALA steps, step-size adaptation, replica exchange,
    # statistics): under sync debug mode "error" any synchronising call raises
    # (betas and step sizes go in as device tensors: copying them from the host would itself synchronise)
    betas_d, step_d = torch.as_tensor(betas, dtype=torch.float32, device=dev), torch.full((n_t,), 0.05, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    sync_free = True
    try:
        sweep_loop(Sampler(model, ens, MNIST, g, dev, kernel), init, betas_d, step_d, n_burn=5, n_prod=5,
                   exchange=True, thin=2)
    except RuntimeError as e:
        sync_free = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"GPU sweep, 10,000 chains: {rate:.3g} chain-steps/s compiled kernel, {rate_eager:.3g} eager "
          f"(target >= 1e6); step loop sync-free: {sync_free}")
    write("gpu", dict(device=torch.cuda.get_device_name(), chains=n_t * c, chain_steps_per_s=rate,
                      chain_steps_per_s_eager=rate_eager, step_loop_sync_free=sync_free))
    sweep(quick, device=dev)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="overhead,sweep,train,efficiency,scaling,gpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    a = p.parse_args()
    for s in a.sections.split(","):
        print(f"== {s}")
        {"overhead": overhead, "sweep": sweep, "train": train_step, "efficiency": efficiency,
         "scaling": scaling, "gpu": gpu}[s](a.quick)
