"""Diagnosis of a measurement: cross-checks, the two origins compared, and the flags, each naming what it affects
(`diagnose`); the remedies `max_time` applies (`lengthen`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..config import MeasureConfig
from ..estimators import heavy_tail_limit, log_mean_weight
from .anneal import Plan
from .inputs import Problem
from .records import Pooled
from .thermo import LogZ, Thermo

HYSTERESIS_Z = 4.0  # the two origins disagree when |difference| exceeds this many combined SEs
BASE_NATS = 9.0     # a replica's log Z exceeds the truth by this (+ log replicas) with probability below e^-9


# what each flag makes unreliable (named in the warning and in docs/estimators.md)
AFFECTS = {
    "flag_nonfinite": "all quantities",
    "flag_low_acceptance": "all quantities",
    "flag_low_ess": "all quantities (the sweep chains start from states drawn by these weights)",
    "flag_heavy_tails": "all quantities (the sweep chains start from states drawn by these weights)",
    "flag_poor_mixing": "U, C, S, info_bits, T_ML and the joint information quantities",
    "flag_inconsistent": "U, C, S, info_bits, T_ML and the joint information quantities",
    "flag_hysteresis": "all quantities (a phase one origin did not reach)",
    "flag_rare_phase": "U, C, S, info_bits, T_ML and the joint information quantities",
    "flag_unconverged": "log_Z, F, S, info_bits, log_lik (and with data H_Y_bits, I_XY_bits)",
}
# the flags whose AFFECTS include C (`peak_flagged`)
C_FLAGS = tuple(n for n, text in AFFECTS.items() if text.startswith("all") or "C" in text.split(", "))


def too_few_effective(est: LogZ, n_chains: int, n_populations: int) -> np.ndarray:
    """Whether an anneal's weights [T] fail the ESS test its log Z SE needs: fewer than max(10, 5%) effective
    chains, or (SMC) populations whose Z estimates spread by more than their mean (population ESS below half)."""
    low = est.ess < max(10.0, 0.05 * n_chains)
    return low | (est.pop_ess < 0.5 * n_populations) if est.pop_ess is not None else low


def rare_phase(th: Thermo) -> np.ndarray:
    """[T]: the phase the sweep chains missed (U_missed, C_missed) outweighs their own error, and the replicas'
    parts of its mass spread by more than their mean (replica ESS below half). Each part is then carried by a
    few chains (AIS) or a few populations' resampling survivals (SMC), zero in most replicas and large in a few,
    and their spread understates the error (ModeSwitch(16) at T = 1.25: C low by 2-5 SE under both engines)."""
    du, dc = th.diag["U_missed"][0], th.diag["C_missed"][0]
    beyond = (np.abs(dc) > th.sweep_se["C"]) | (np.abs(du) > th.sweep_se["U"])
    return (th.missed_carried < 0.5) & beyond


def bridge_capped(cfg: MeasureConfig, seeded) -> np.ndarray | bool:
    """[T]: the data-seeded path (engine ais) is shorter than ais_steps_per_l2 x L^2 because max_bridge_steps capped
    it: that temperature is under-annealed and its log Z biased low, whatever its ESS says."""
    if seeded is None or cfg.max_bridge_steps is None or cfg.engine != "ais":
        return False
    return cfg.ais_steps_per_l2 * seeded.length.max(0) ** 2 > seeded.steps.min(0)


def base_gap(check, reported: LogZ, n_replicas: int) -> np.ndarray:
    """[T] nats: how far the check base's anneal (check.logw [T, N], `check_chains`) contradicts the reported log Z.
    Each of its r replicas' Z estimates is unbiased, so its log Z exceeds the truth by t nats with probability at
    most e^-t, and the largest of the r by t + log r at most as often; base_gap = that largest replica log Z -
    log r - (reported log Z + 4 SE). Above BASE_NATS the reported log Z lies below the truth beyond its error
    bar: its base's kernels missed a phase that the check's reached, which populations sharing one base cannot
    show in their spread."""
    logw = np.where(np.isnan(check.logw), -np.inf, np.asarray(check.logw, dtype=np.float64))
    reps = log_mean_weight(logw, n_replicas)[2]
    return reps.max(-1) - math.log(reps.shape[-1]) - (reported.value + HYSTERESIS_Z * reported.se)


@dataclass
class Diagnosis:
    """Per-temperature flags [T] (ascending beta) by name, the diagnostics stored beside them [T], and one
    warning line per raised flag (its temperatures, what it affects, what to do)."""
    flags: dict
    extra: dict
    warnings: dict


def diagnose(p: Problem, pl: Plan, th: Thermo, pooled: Pooled, previous: LogZ | None = None) -> Diagnosis:
    """The flags of one attempt. `previous`: the reported log Z of the attempt before (with `max_time`), whose
    doubled schedule must not have moved it beyond 4 SE (flag_unconverged)."""
    cfg = p.cfg
    rep = th.reported
    fw, b, sw = pooled.forward, pooled.seeded, pooled.sweep
    counted = b if b is not None else fw  # the anneal log Z comes from
    gap_b = base_gap(pooled.check, th.from_data, cfg.replicas) if pooled.check is not None else None
    n_chains, acc = counted.logw.shape[-1], counted.accept.mean(0)
    bad = fw.nonfinite.sum(0) + sw.nonfinite.sum(0)
    if th.from_data is not None:
        bad = bad + b.nonfinite.sum(0)
    sw_acc = sw.accept.mean(0)
    # the SE of log mean w needs enough effective chains and a light tail (Pareto k) of the weights
    low_ess = too_few_effective(rep, n_chains, cfg.smc_populations) | bridge_capped(cfg, b)
    heavy = rep.k_hat > heavy_tail_limit(n_chains)  # nan (too few finite weights): left to the ESS flag
    burn_in, samples = sw.length[0]  # as the sweep ran (run on where it was short against tau_E)
    poor_mix = (samples < 10 * th.tau) | (burn_in < 5 * th.tau)
    flags = {"flag_nonfinite": bad > 0, "flag_low_acceptance": (sw_acc < 0.05) | (acc < 0.05),
             "flag_low_ess": low_ess, "flag_heavy_tails": heavy, "flag_poor_mixing": poor_mix}
    # the sweep chains disagree with the annealing weights on U: the chains hold the wrong mix of phases
    ur, ur_se = th.diag["U_resid"]
    flags["flag_inconsistent"] = np.abs(ur) > HYSTERESIS_Z * ur_se
    if th.label_z is not None:  # ... or split the mass between the classes differently
        flags["flag_inconsistent"] |= th.label_z > HYSTERESIS_Z
    flags["flag_rare_phase"] = rare_phase(th)
    if th.from_data is not None:  # the two origins (uniform, data) disagree: a phase one of them missed
        g, gs = th.diag["origin_gap"]
        ug, ugs = th.diag["origin_U_gap"]
        # Either origin's Z estimate is unbiased, so a log Z that misses mass comes out low, and far too high only
        # with probability e^-k at k nats: only more mass from uniform contradicts the data-seeded log Z. Where
        # the data-seeded anneal finds more, the one from uniform missed a phase, whose U then differs for that
        # reason alone; the phases it did reach are in the data-seeded base (kernels on its states). Where
        # neither finds more, the two U must agree (unless the forward schedule was capped).
        forward_missed = g > HYSTERESIS_Z * gs
        u_gap = (np.abs(ug) > HYSTERESIS_Z * ugs) & ~forward_missed & ~np.asarray(pl.capped)
        flags["flag_hysteresis"] = (-g > HYSTERESIS_Z * gs) | u_gap
        if gap_b is not None:  # ... or a second, independent base found mass the reported anneal missed
            flags["flag_hysteresis"] |= gap_b > BASE_NATS
    if th.from_data is not None:
        n_sched = int(b.steps.max())
        longer = (f"anneal longer (data-seeded paths: each max(bridge_steps {cfg.bridge_steps}, ais_steps_per_l2 "
                  f"{cfg.ais_steps_per_l2:g} x its L^2) lambdas, the longest {n_sched} for L^2 "
                  f"{float(b.length.max()) ** 2:.0f}, {cfg.bridge_moves} move pairs per lambda); "
                  "raise --bridge-moves (at d = 784 more moves per lambda, not more lambdas, shrink this error), "
                  "--ais-steps-per-l2 or --bridge-chains, or set --max-time)")
    else:
        longer = (f"anneal longer (schedule {len(pl.schedule)} betas = max(ais_steps {cfg.ais_steps}, ais_steps_per_l2 "
                  f"{cfg.ais_steps_per_l2:g} x L^2 {pl.length ** 2:.0f}) + sweep betas; 4x the betas fixed the "
                  "784-d benchmark, docs/estimators.md)")
    if cfg.engine == "smc":
        longer = (f"larger SMC populations: raise --smc-data-chains ({cfg.smc_data_chains} per temperature from data) "
                  f"and --smc-chains ({cfg.smc_chains} from uniform without data), each split into "
                  f"{cfg.smc_populations} populations")
    remedy = {"flag_nonfinite": "proposals with a non-finite log density (rejected and counted)",
              "flag_low_acceptance": "sampler acceptance below 5%", "flag_low_ess": longer, "flag_heavy_tails": longer,
              "flag_poor_mixing": "raise --samples and --burn-in, or --sweep-max-factor (the sweep chains are short "
                                  "against tau_E even after running on)",
              "flag_inconsistent": "U (U_resid) or, joint with data, p_T(y) (label_mix_z) of the "
                                   "sweep chains and of the annealing weights differ beyond 4 SE: the chains hold the wrong mix of phases; "
                                   "a longer sweep (--burn-in) or more chains",
              "flag_rare_phase": "the sweep chains never reach a phase that holds part of U or C beyond their "
                                 "error (U_missed, C_missed), and the annealing replicas' parts of its mass spread by more "
                                 "than their mean (missed_phase_replicas < 0.5), too few for its SE; more chains (--smc-data-chains, "
                                 "--bridge-chains) or sweep temperatures between the phases",
              "flag_hysteresis": "the anneal from uniform finds more mass than the data-seeded one (origin_gap < 0), "
                                 "or, with equal mass, another U (origin_U_gap), or the check base more than chance "
                                 "allows (base_gap > 9 nats): a phase the data-seeded anneal missed; more --data-refs "
                                 "and a longer anneal, or measure again with another --seed and keep the higher log Z"}
    if previous is not None:  # the doubled schedule moved log Z beyond its errors: not converged
        shift = th.reported.value - previous.value
        flags["flag_unconverged"] = np.abs(shift) > HYSTERESIS_Z * np.sqrt(th.reported.se ** 2 + previous.se ** 2)
        remedy["flag_unconverged"] = "doubling the schedules moved log Z beyond 4 SE (log_Z_shift); the estimate is still moving"
    warnings = {name: warning_line(p, name, f, AFFECTS[name], remedy[name]) for name, f in flags.items() if np.any(f)}
    extra = {"ess": rep.ess, "pareto_k": rep.k_hat, "ess_forward": th.forward.ess, "ais_accept": acc,
             **({"population_ess": rep.pop_ess} if rep.pop_ess is not None else {}),
             "accept": sw_acc, "tau_E": th.tau, "step_size": sw.step.mean(0), "missed_phase_replicas": th.missed_carried}
    if th.label_z is not None:
        extra["label_mix_z"] = th.label_z
    if gap_b is not None:
        extra["base_gap"] = gap_b
    # [T - 1] values between neighbours -> [T], nan at the last temperature (the only one when T = 1)
    extra["swap_accept"] = np.append(sw.swap_accept.mean(0), np.nan)
    extra["sweep_helpers"] = np.append(sw.helpers.mean(0), np.nan)
    if previous is not None:
        extra["log_Z_shift"] = shift
    return Diagnosis(flags, extra, warnings)


# what `max_time` lengthens when a flag survives: the anneals (both origins) or the sweep
LENGTHEN = {"flag_low_ess": "anneal", "flag_heavy_tails": "anneal", "flag_hysteresis": "anneal",
            "flag_unconverged": "anneal", "flag_poor_mixing": "sweep", "flag_inconsistent": "sweep",
            "flag_rare_phase": "anneal"}


def warning_line(p: Problem, name: str, flag, affects: str, remedy: str) -> str:
    """One warning for a raised flag: its temperatures, what it affects, what to do."""
    at = ", ".join(f"{v:g}" for v in np.sort(1.0 / p.betas[np.asarray(flag, bool)]))
    return f"{name.replace('flag_', '').replace('_', ' ')} at T = {at} (affects {affects}): {remedy}"


SCALE_HINT_MIN = 3


def scale_hint(p: Problem, flags: dict) -> str | None:
    """A warning when every temperature is flagged in units of T_train: a sampler with negligible noise (JEM-style
    SGLD: T_train = 5e-5) trains at a nominal temperature, and the model can be frozen at that scale."""
    raised = np.any([np.asarray(f, bool) for f in flags.values()], axis=0)
    # fewer than SCALE_HINT_MIN temperatures say nothing about the scale (a short budget flags them just as well)
    if p.units != "train" or p.t_train == 1.0 or raised.size < SCALE_HINT_MIN or not np.all(raised):
        return None
    return (f"every temperature is flagged: the model may be frozen at these temperatures (T_train = {p.t_train:g} "
            "from the sampler settings; noise-free SGLD trains at a nominal temperature). Measure on the logits' "
            "scale over decades, e.g. --units raw --temps 0.001,0.003,0.01,0.03,0.1,0.3,1 (docs/estimators.md, "
            "Trained models)")


def lengthen(cfg: MeasureConfig, flags: dict) -> MeasureConfig | None:
    """The next attempt's budget for the flags raised, or None: for the anneals, the schedules doubled and, on the
    data-seeded anneal (engine ais), the move pairs per lambda as well (at d = 784 more moves per lambda, not more
    lambdas, shrink the error there: docs/estimators.md); for mixing flags, the sweep doubled."""
    raised = {LENGTHEN[name] for name, f in flags.items() if name in LENGTHEN and np.any(f)}
    if not raised:
        return None
    new = MeasureConfig(**asdict(cfg))
    if "anneal" in raised:
        new.smc_chains, new.smc_data_chains = 2 * cfg.smc_chains, 2 * cfg.smc_data_chains
        new.smc_cess = 1.0 - (1.0 - cfg.smc_cess) / 2
        new.ais_steps_per_l2 = 2 * cfg.ais_steps_per_l2
        new.ais_steps, new.bridge_steps, new.crosscheck_steps = 2 * cfg.ais_steps, 2 * cfg.bridge_steps, 2 * cfg.crosscheck_steps
        new.bridge_moves = 2 * cfg.bridge_moves if cfg.engine == "ais" else cfg.bridge_moves
    if "sweep" in raised:
        new.samples, new.burn_in = 2 * cfg.samples, 2 * cfg.burn_in
    return new


def growth(cfg: MeasureConfig, new: MeasureConfig, stage_seconds, plan_seconds: float) -> float:
    """The expected ratio of the next attempt's wall time to this one's under the budget `new` (`lengthen`), from
    this attempt's seconds per stage (anneal.STAGES: forward, data-seeded, sweep, reverse) and of its pilot (whose
    budget `lengthen` leaves alone): each anneal grows with its schedule, the data-seeded one of engine ais also
    with its move pairs per lambda, and the sweep with its samples."""
    anneal = new.ais_steps / cfg.ais_steps
    seeded = anneal * new.bridge_moves / cfg.bridge_moves
    factors = np.array([anneal, seeded, new.samples / cfg.samples, anneal])
    sec = np.asarray(stage_seconds, dtype=np.float64)
    return float((plan_seconds + (factors * sec).sum()) / max(plan_seconds + sec.sum(), 1e-12))


def peak_flagged(c, flags: dict, t_star: float) -> bool:
    """Whether a flag that affects C is raised at the largest C [T] or at a neighbour (the points the peak's
    parabola rests on)."""
    if not math.isfinite(t_star):
        return False
    i = int(np.argmax(c))
    near = slice(max(i - 1, 0), i + 2)
    return bool(any(np.any(np.asarray(flags[n])[near]) for n in C_FLAGS if n in flags))
