"""The peer: BlackJAX's adaptive tempered SMC beside `measure` on the d = 784 exact system
(`testing.DigitMixture`, joint ensemble), log Z against the exact value at each temperature.

The peer, as a careful BlackJAX user would set it up: one population of --particles from the uniform prior on
the box, next lambda where the ESS falls to half, systematic resampling, --moves HMC moves of --leapfrog steps
per stage with a box-reflecting velocity-Verlet integrator (a coordinate leaving [-1, 1] is reflected and its
momentum flipped: volume-preserving and reversible, so HMC stays exact on the box), a diagonal inverse mass
matrix from the particles' variance at every stage and the step size adapted from the last stage's acceptance
(towards 0.65). It reports no error bar. `measure` runs with its defaults (--engine: ais, its default, or smc)
and exact draws at T = 1 as data, in a separate process (benchmarks/smc_d784.py). Optional dependencies:
pip install -e ".[peer]" (jax, blackjax); never needed by the tests. Run it alone; writes --out
(benchmarks/results/peer_blackjax.json).

    python benchmarks/peer_blackjax.py [--temps 1,0.5,2] [--seeds 0,1] [--particles 2048] [--engine ais|smc] [--skip-ours]
"""
import argparse
import json
import math
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc import hmc, integrators
from blackjax.smc import resampling

from thermo_ebm.testing import DigitMixture

p = argparse.ArgumentParser()
p.add_argument("--temps", default="1,0.5,2")
p.add_argument("--seeds", default="0,1")
p.add_argument("--particles", type=int, default=2048)
p.add_argument("--moves", type=int, default=10)
p.add_argument("--leapfrog", type=int, default=5)
p.add_argument("--skip-ours", action="store_true")
p.add_argument("--engine", default="ais", choices=["ais", "smc"], help="measure's engine (ais: the default)")
p.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_blackjax.json"))
args = p.parse_args()
torch.set_num_threads(2)
temps = sorted(float(t) for t in args.temps.split(","))  # as measure reports them
seeds = [int(s) for s in args.seeds.split(",")]
system = DigitMixture()
exact = system.exact(temps, "joint")["log_Z"]
D = system.d
# the same matmul form as testing.DigitMixture.forward (there with |x - mu_y|^2 in float64)
MU = jnp.asarray(system.mu, jnp.float32)
MU_SQ = jnp.asarray((system.mu ** 2).sum(-1), jnp.float32)
Q_FLAT = jnp.asarray(system.q.transpose(1, 0, 2).reshape(D, -1), jnp.float32)
MU_Q = jnp.asarray(np.einsum("kd,kdr->kr", system.mu, system.q), jnp.float32)
SHRINK = jnp.asarray(system.lam / (1 + system.lam), jnp.float32)
INV_S2, C = jnp.asarray(1.0 / system.s ** 2, jnp.float32), jnp.asarray(system.c, jnp.float32)


def logits(x):
    """f_y(x) [K] of one image x [D]."""
    sq = x @ x - 2.0 * MU @ x + MU_SQ
    proj = (x @ Q_FLAT).reshape(MU_Q.shape) - MU_Q
    return C - 0.5 * (sq - (SHRINK * proj * proj).sum(-1)) * INV_S2


def reflecting_verlet(logdensity_fn, kinetic_energy_fn):
    """Velocity Verlet whose position update is folded into the box, flipping the momentum of each reflected
    coordinate."""
    value_and_grad = jax.value_and_grad(logdensity_fn)
    velocity = jax.grad(kinetic_energy_fn)

    def one_step(state, step_size):
        mom = state.momentum + 0.5 * step_size * state.logdensity_grad
        z = state.position + step_size * velocity(mom)
        a = z + 1.0
        w = a - 4.0 * jnp.floor(a * 0.25)
        x = 1.0 - jnp.abs(w - 2.0)
        mom = jnp.where(w > 2.0, -mom, mom)
        lp, g = value_and_grad(x)
        return integrators.IntegratorState(x, mom + 0.5 * step_size * g, lp, g)
    return one_step


def peer(temp, seed):
    """One BlackJAX run at temperature temp: (log Z estimate, stages, seconds)."""
    hmc_kernel = hmc.build_kernel(integrator=reflecting_verlet)

    def update(key, state, info):  # mass matrix from the particles (the step size is set after the stage)
        return dict(step_size=jnp.array([0.0]), inverse_mass_matrix=jnp.var(state.particles, 0)[None],
                    num_integration_steps=jnp.array([args.leapfrog]))

    algo = blackjax.inner_kernel_tuning(
        smc_algorithm=blackjax.adaptive_tempered_smc, logprior_fn=lambda x: 0.0,
        loglikelihood_fn=lambda x: jax.nn.logsumexp(logits(x) / temp), mcmc_step_fn=hmc_kernel,
        mcmc_init_fn=hmc.init, resampling_fn=resampling.systematic, mcmc_parameter_update_fn=update,
        initial_parameter_value=dict(step_size=jnp.array([0.05]), inverse_mass_matrix=jnp.full((1, D), 1.0 / 3.0),
                                     num_integration_steps=jnp.array([args.leapfrog])),
        num_mcmc_steps=args.moves, target_ess=0.5)
    step = jax.jit(algo.step)
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(seed)
    key, k0 = jax.random.split(key)
    state = algo.init(jax.random.uniform(k0, (args.particles, D), minval=-1.0, maxval=1.0))
    log_z, stages, step_size = D * math.log(2.0), 0, 0.05
    while float(state.sampler_state.tempering_param) < 1.0:
        key, k = jax.random.split(key)
        state, info = step(k, state)
        log_z += float(info.log_likelihood_increment)
        stages += 1
        step_size *= math.exp(float(info.update_info.acceptance_rate.mean()) - 0.65)
        state = state._replace(parameter_override={**state.parameter_override, "step_size": jnp.array([step_size])})
    return log_z, stages, time.perf_counter() - t0


rows = []
for seed in seeds:
    for temp, ref in zip(temps, exact):
        est, stages, sec = peer(temp, seed)
        rows.append(dict(method="blackjax", seed=seed, temp=temp, error=est - float(ref), se=None, seconds=sec,
                         stages=stages))
        print(f"blackjax  T={temp:<4} seed {seed}: log Z error {est - ref:+8.2f} (no SE), {stages} stages, {sec:.0f} s",
              flush=True)
    if args.skip_ours:
        continue
    # ours in a process of its own: once jax is loaded, scipy takes its slower array-API path (minutes of MBAR)
    tmp = Path(args.out).with_suffix(f".ours{seed}.json")
    subprocess.run([sys.executable, str(Path(__file__).parent / "smc_d784.py"), "--engines", args.engine, "--temps",
                    ",".join(map(str, temps)), "--seed", str(seed), "--out", str(tmp)], check=True)
    ours = json.loads(tmp.read_text())["runs"][0]
    tmp.unlink()
    for i, temp in enumerate(temps):
        err, se = ours["log_Z"]["error"][i], ours["log_Z"]["se"][i]
        raised = [k for k, v in ours["flags"].items() if v[i]]
        rows.append(dict(method="thermo-ebm", seed=seed, temp=temp, error=err, se=se,
                         seconds=ours["seconds"] / len(temps), flags=raised))
        print(f"thermo-ebm T={temp:<4} seed {seed}: log Z error {err:+8.2f} ± {se:.2f} (z {err / se:+.1f}), "
              f"{ours['seconds'] / len(temps):.0f} s per temperature, flags: {', '.join(raised) or 'none'}", flush=True)
out = Path(args.out)
out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()}, 2 threads",
                               versions=dict(jax=jax.__version__, blackjax=blackjax.__version__,
                                             torch=torch.__version__),
                               settings=vars(args), rows=rows), indent=1))
print("->", out)
