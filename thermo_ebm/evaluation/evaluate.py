"""`evaluate`: judge a trained model as JEM users do (calibration, out-of-distribution detection, long-run
samples), every number with a bootstrap standard error, written as group `evaluation` of the results file.

Metric functions work on arrays (no model): `classifier_metrics`, `expected_calibration_error`,
`calibration_temperature`, `auroc`, `average_precision`, `frechet_distance`. Conventions: probabilities from
softmax(f(x)); OOD scores are larger for inputs the model deems in-distribution, and in-distribution inputs
are the positives of AUROC/AUPR.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from scipy import linalg, optimize
from scipy.special import log_softmax, softmax

from .. import distributed as dist
from ..ensembles import Ensemble
from ..errors import ThermoEBMError
from ..files.checkpoint import checkpoint_data_dir, checkpoint_temperature, load_checkpoint, model_from_checkpoint
from ..files.fileio import atomic_path
from ..files.results import annotate, file_sha256, provenance
from ..measurement.likelihood import quick_t_ml

log = logging.getLogger("thermo_ebm")
N_BINS = 15
T_CAL_BOOT = 50   # bootstrap resamples for the SE of T_cal
PCA_DIMS = 32     # principal components of the held-out images for the Fréchet distance of samples


# ---------------------------------------------------------------- metrics on arrays

def expected_calibration_error(confidence, correct, n_bins: int = N_BINS) -> float:
    """ECE with equal-mass bins: sum_b (n_b / n) |accuracy_b - mean confidence_b| (confidence, correct: [n])."""
    order = np.argsort(confidence, kind="stable")
    ece = 0.0
    for idx in np.array_split(order, n_bins):
        if len(idx):
            ece += len(idx) / len(order) * abs(correct[idx].mean() - confidence[idx].mean())
    return float(ece)


def reliability_bins(confidence, correct, n_bins: int = N_BINS):
    """(mean confidence [B], accuracy [B]) of equal-mass bins (the reliability diagram)."""
    order = np.argsort(confidence, kind="stable")
    parts = np.array_split(order, n_bins)
    return (np.array([confidence[i].mean() for i in parts]), np.array([correct[i].mean() for i in parts]))


def calibration_temperature(logits, y) -> float:
    """T_cal minimising the NLL of softmax(logits / T) on (logits [n, K], y [n])."""
    def nll(log_t):
        return -log_softmax(logits / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean()
    res = optimize.minimize_scalar(nll, bounds=(math.log(1e-3), math.log(1e3)), method="bounded",
                                   options={"xatol": 1e-6})
    return float(math.exp(res.x))


def _point_metrics(logits, y):
    p = softmax(logits, axis=1)
    pred = p.argmax(1)
    onehot = np.eye(logits.shape[1])[y]
    conf = p.max(1)
    return {"accuracy": float((pred == y).mean()),
            "nll": float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean()),
            "brier": float(((p - onehot) ** 2).sum(1).mean()),
            "ece": expected_calibration_error(conf, (pred == y).astype(np.float64))}


def classifier_metrics(logits, y, n_boot: int = 200, seed: int = 0) -> dict:
    """accuracy, nll (nats), brier, ece (equal-mass, 15 bins) and t_cal, each as (value, bootstrap SE), from
    held-out logits [n, K] and labels [n]."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    out = {k: [v] for k, v in _point_metrics(logits, y).items()}
    out["t_cal"] = [calibration_temperature(logits, y)]
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in out}
    for b in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        for k, v in _point_metrics(logits[i], y[i]).items():
            boots[k].append(v)
        if b < T_CAL_BOOT:  # each resample is a 1-d optimisation: fewer of them
            boots["t_cal"].append(calibration_temperature(logits[i], y[i]))
    return {k: (v[0], float(np.std(boots[k], ddof=1))) for k, v in out.items()}


def auroc(pos, neg) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative) + P(tie) / 2."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    allv = np.concatenate([pos, neg])
    from scipy.stats import rankdata
    ranks = rankdata(allv)  # average ranks for ties
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def average_precision(pos, neg) -> float:
    """Area under the precision-recall curve as average precision (positives ranked by descending score;
    tied scores enter together), as sklearn.metrics.average_precision_score."""
    scores = np.concatenate([pos, neg]).astype(np.float64)
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(lab)[last]
    fp = (last + 1) - tp
    precision, recall = tp / (tp + fp), tp / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _boot_pair(fn, pos, neg, n_boot, rng):
    vals = [fn(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))])
            for _ in range(n_boot)]
    return fn(pos, neg), float(np.std(vals, ddof=1))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)): the Fréchet (2-Wasserstein) distance of two Gaussians.
    Covariances of fewer samples than dimensions are singular; the square root is still defined (scipy's
    warning about it is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(np.asarray(cov1) @ np.asarray(cov2)).real
    return float(((np.asarray(mu1) - np.asarray(mu2)) ** 2).sum() + np.trace(cov1) + np.trace(cov2)
                 - 2 * np.trace(covmean))


def _frechet_with_se(a, b, n_boot: int, seed: int):
    """Fréchet distance between Gaussians fitted to features a [n, k] and b [m, k], and its bootstrap SE over
    the rows of b."""
    def fd(bb):
        return frechet_distance(a.mean(0), np.cov(a.T), bb.mean(0), np.cov(bb.T))
    rng = np.random.default_rng(seed)
    return fd(b), float(np.std([fd(b[rng.integers(0, len(b), len(b))]) for _ in range(n_boot)], ddof=1))


def pca_frechet(reference, samples, k: int = PCA_DIMS, n_boot: int = 50, seed: int = 0):
    """Fréchet distance between Gaussians fitted to `reference` [n, D] and `samples` [m, D] in the space of the
    reference's first k principal components, and its bootstrap SE over the samples. A pixel-space stand-in
    for FID that needs no trained feature network (not comparable with Inception FID)."""
    ref, smp = np.asarray(reference, dtype=np.float64), np.asarray(samples, dtype=np.float64)
    mu = ref.mean(0)
    _, _, vt = np.linalg.svd(ref - mu, full_matrices=False)
    basis = vt[: min(k, vt.shape[0])].T
    return _frechet_with_se((ref - mu) @ basis, (smp - mu) @ basis, n_boot, seed)


# ---------------------------------------------------------------- MNIST-feature Fréchet distance

FEATURE_VERSION = 1


class FeatureNet(torch.nn.Module):
    """A small CNN for 1x28x28 inputs in the box; `features` are its 64-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, x):
        return self.body(x.reshape(-1, 1, 28, 28))

    def forward(self, x):
        return self.head(self.features(x))


def cache_dir() -> Path:
    """$THERMO_EBM_CACHE, else ~/.cache/thermo-ebm."""
    return Path(os.environ.get("THERMO_EBM_CACHE", Path.home() / ".cache" / "thermo-ebm"))


def mnist_feature_net(data_dir, epochs: int = 2, seed: int = 0):
    """(FeatureNet, its held-out accuracy) trained once on the MNIST training split readable under data_dir
    and cached in cache_dir() (keyed by the split's size); later calls load it."""
    from ..data import load_data
    data = load_data("mnist", data_dir)
    path = cache_dir() / f"mnist_features_v{FEATURE_VERSION}_{len(data.x_train)}.pt"
    net = FeatureNet()
    if path.is_file():
        st = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        return net.eval(), float(st["heldout_acc"])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.x_train), generator=g).split(128):
            loss = torch.nn.functional.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
    log.info("trained the MNIST feature network for the Fréchet distance: held-out accuracy %.4f (cached in %s)",
             acc, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": net.state_dict(), "heldout_acc": acc}, tmp)
    return net.eval(), acc


def feature_frechet(net, reference, samples, n_boot: int = 50, seed: int = 0):
    """Fréchet distance between Gaussians fitted to the feature-net features of `reference` and of `samples`
    ("MNIST-feature FID"; not comparable with Inception FID), and its bootstrap SE over the samples."""
    with torch.no_grad():
        a = net.features(torch.as_tensor(reference, dtype=torch.float32)).double().numpy()
        b = net.features(torch.as_tensor(samples, dtype=torch.float32)).double().numpy()
    return _frechet_with_se(a, b, n_boot, seed)


# ---------------------------------------------------------------- inputs the model did not see

def shifted_inputs(x, seed: int = 0, data_dir=None, dataset: str | None = None) -> dict:
    """Out-of-distribution sets the size of x [n, *shape] (box [-1, 1]): uniform noise, Gaussian noise (sd 0.5,
    clipped), constant images, inverted and pixel-permuted held-out images; for 28x28 inputs the sklearn 8x8
    digits resized, and the other of MNIST / Fashion-MNIST when its files are already under data_dir (no
    download)."""
    g = torch.Generator().manual_seed(seed)
    n, shape = x.shape[0], tuple(x.shape[1:])
    flat = x.reshape(n, -1)
    perm = torch.randperm(flat.shape[1], generator=g)
    out = {
        "uniform": torch.rand((n, *shape), generator=g) * 2 - 1,
        "gaussian": (0.5 * torch.randn((n, *shape), generator=g)).clamp(-1, 1),
        "constant": (torch.rand((n, 1), generator=g) * 2 - 1).expand(n, flat.shape[1]).reshape(n, *shape).clone(),
        "inverted": -x,
        "permuted": flat[:, perm].reshape(n, *shape),
    }
    if shape[-2:] == (28, 28):
        from sklearn.datasets import load_digits
        d = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16.0 * 2 - 1
        out["digits8x8"] = torch.nn.functional.interpolate(d, size=(28, 28), mode="bilinear",
                                                           align_corners=False).reshape(-1, *shape)
        from ..data import _IDX, load_data
        for other in ("mnist", "fashion-mnist"):
            if other != dataset and data_dir is not None and (Path(data_dir) / _IDX[other] / "raw").is_dir():
                out[other] = load_data(other, data_dir).x_test[:n].reshape(-1, *shape)
    return out


def ood_scores(model, x, batch: int = 500) -> dict:
    """Per input: log p(x) + log Z = logsumexp_y f(x)[y], the maximum softmax probability, and minus the norm
    of d log p(x) / dx (smaller input gradients: more in-distribution). Arrays [n]."""
    out = {"log_px": [], "max_softmax": [], "neg_grad_norm": []}
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(dev).requires_grad_(True)
        lg = model(xb)
        lse = torch.logsumexp(lg, 1)
        (g,) = torch.autograd.grad(lse.sum(), xb)
        out["log_px"].append(lse.detach().double().cpu())
        out["max_softmax"].append(torch.softmax(lg.detach(), 1).max(1).values.double().cpu())
        out["neg_grad_norm"].append(-g.reshape(len(xb), -1).norm(dim=1).double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


# ---------------------------------------------------------------- the evaluation

@dataclass
class EvalConfig:
    """Budget of `evaluate`."""
    n_ood: int = 1000            # held-out images scored (and as many of each shifted set)
    n_boot: int = 200            # bootstrap resamples for the SEs
    chains: int = 64             # long-run chains per length
    chain_steps: tuple = (1000, 10000)  # MALA steps at T = 1 in the units of the measurement (T_train)
    temperature: float = 1.0     # the chains' temperature in units of T_train


def _sample_stats(model, x):
    """Fraction of saturated pixels (|x| > 0.99) and the model's own mean max-softmax confidence on x."""
    with torch.no_grad():
        conf = torch.softmax(model(x), 1).max(1).values
    return float((x.abs() > 0.99).float().mean()), float(conf.mean()), float(conf.std() / math.sqrt(len(conf)))


def evaluate(ckpt, *, seed: int = 0, device: str = "auto", data_dir=None, config: EvalConfig | None = None,
             **budget) -> xr.Dataset:
    """Classifier calibration, OOD detection and long-run sample statistics of a checkpoint (see module doc);
    data_dir: where its dataset (and other datasets for OOD) are read [default: the checkpoint's].
    Returns an xarray.Dataset (group kind 'evaluation')."""
    from ..data import load_data
    from .sample import draw
    cfg = config or EvalConfig()
    unknown = set(budget) - set(EvalConfig.__dataclass_fields__)
    if unknown:
        raise ThermoEBMError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    cfg = EvalConfig(**{**cfg.__dict__, **budget})
    if cfg.n_ood < 10 or cfg.n_boot < 10 or cfg.chains < 2 or any(int(s) < 1 for s in cfg.chain_steps):
        raise ThermoEBMError("eval needs --n-ood (n_ood) >= 10, n_boot >= 10, --chains (chains) >= 2 and "
                             "--chain-steps (chain_steps) >= 1")
    st = load_checkpoint(ckpt)
    model = model_from_checkpoint(st, ckpt).eval()
    dev = dist.resolve_device(device)
    model = model.to(dev)
    conf_ = st.get("config", {})
    if conf_.get("objective") == "m_ebm":
        log.warning("evaluating an m_ebm checkpoint: its labels were never trained, so accuracy, calibration and "
                    "max-softmax scores describe an arbitrary split of the logits (log p(x) scores are meaningful)")
    data_dir = data_dir or checkpoint_data_dir(st, ckpt)
    data = load_data(conf_["dataset"], data_dir, conf_.get("labels"))
    n = min(cfg.n_ood, len(data.x_test))
    x, y = data.x_test[:n], data.y_test[:n].numpy()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 1000].to(dev)).double().cpu() for i in range(0, n, 1000)]).numpy()
    cls = classifier_metrics(logits, y, cfg.n_boot, seed)
    conf, acc = reliability_bins(softmax(logits, axis=1).max(1), (logits.argmax(1) == y).astype(np.float64))
    rng = np.random.default_rng(seed)
    ins = ood_scores(model, x)
    shifts = shifted_inputs(x, seed, data_dir, conf_["dataset"])
    names = list(ins)
    au, au_e, ap, ap_e = (np.zeros((len(shifts), len(names))) for _ in range(4))
    all_scores = [np.stack([ins[s] for s in names])]
    for i, (shift, xs) in enumerate(shifts.items()):
        outs = ood_scores(model, xs)
        all_scores.append(np.stack([outs[s] for s in names]))
        for j, s in enumerate(names):
            au[i, j], au_e[i, j] = _boot_pair(auroc, ins[s], outs[s], cfg.n_boot, rng)
            ap[i, j], ap_e[i, j] = _boot_pair(average_precision, ins[s], outs[s], cfg.n_boot, rng)
    # samples: the replay buffer and long-run chains at T (units of T_train)
    t_train = checkpoint_temperature(st)
    ens = Ensemble("marginal" if conf_.get("objective") == "m_ebm" else "joint", data.n_classes)
    t_ml = quick_t_ml(model, ens, data.x_test, t_train, torch.Generator(device=dev).manual_seed(seed + 104729), dev)
    kinds, sat, cconf, cconf_e, fds, fds_e, grids = [], [], [], [], [], [], []
    for key, v in st.get("buffers", {}).items():
        if key.endswith("/x") and v.numel():
            xs = v[: cfg.chains].float().to(dev)
            kinds.append(f"buffer_{key.split('/')[0]}")
            grids.append(xs.cpu())
    start = grids[0] if grids else None  # the long-run chains continue the first buffer's chains (else: noise)
    for steps in cfg.chain_steps:
        xs = draw(model, cfg.temperature * t_train, n=cfg.chains, steps=int(steps), seed=seed, device=str(dev),
                  start=start)
        kinds.append(f"mala_{int(steps)}")
        grids.append(xs.detach().cpu())
    ref = data.x_test.reshape(len(data.x_test), -1).numpy()
    feat = None
    if conf_["dataset"] == "mnist":
        feat, feat_acc = mnist_feature_net(data_dir)
    fid, fid_e = [], []
    for xs in grids:
        a, b, c = _sample_stats(model, xs.to(dev))
        sat.append(a)
        cconf.append(b)
        cconf_e.append(c)
        f, fe = pca_frechet(ref, xs.reshape(len(xs), -1).numpy(), seed=seed)
        fds.append(f)
        fds_e.append(fe)
        if feat is not None:
            f, fe = feature_frechet(feat, data.x_test, xs.cpu(), seed=seed)
            fid.append(f)
            fid_e.append(fe)
    keep = min(16, cfg.chains)
    dv = {name: ((), v) for name, (v, _) in cls.items()}
    dv.update({name + "_err": ((), e) for name, (_, e) in cls.items()})
    dv.update(reliability_confidence=("bin", conf), reliability_accuracy=("bin", acc),
              auroc=(("ood_set", "score"), au), auroc_err=(("ood_set", "score"), au_e),
              aupr=(("ood_set", "score"), ap), aupr_err=(("ood_set", "score"), ap_e),
              saturated_fraction=("chain_kind", np.array(sat)), confidence=("chain_kind", np.array(cconf)),
              confidence_err=("chain_kind", np.array(cconf_e)),
              T_ML_quick=((), t_ml[0]), T_ML_quick_err=((), t_ml[1]),
              pca_frechet=("chain_kind", np.array(fds)), pca_frechet_err=("chain_kind", np.array(fds_e)),
              scores=(("input_set", "score", "item"), np.stack(all_scores).astype(np.float32)),
              chain_samples=(("chain_kind", "sample", *[f"pixel_dim{i}" for i in range(len(data.shape))]),
                             np.stack([g[:keep].numpy() for g in grids]).astype(np.float32)))
    if feat is not None:
        dv.update(mnist_feature_frechet=("chain_kind", np.array(fid)),
                  mnist_feature_frechet_err=("chain_kind", np.array(fid_e)))
    coords = {"bin": np.arange(1, N_BINS + 1), "ood_set": list(shifts), "score": names, "chain_kind": kinds,
              "input_set": ["heldout", *shifts]}
    attrs = {"kind": "evaluation", "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt),
             "checkpoint_step": int(st.get("step", -1)), "n_heldout": n, "T_train": t_train,
             "T_ML_quick_side": t_ml[2],
             "chain_temperature": f"{cfg.temperature:g} x T_train",
             "long_run_start": kinds[0] if start is not None else "uniform noise, annealed over the first half",
             "settings": json.dumps(
                 {**cfg.__dict__, "chain_steps": [int(s) for s in cfg.chain_steps]}),
             "positives": "held-out (in-distribution) inputs; scores larger = more in-distribution",
             **({"feature_net_heldout_acc": feat_acc} if feat is not None else {}),
             **provenance()}
    return annotate(xr.Dataset(dv, coords=coords, attrs=attrs), "train", "T_train")


def summary(ds: xr.Dataset) -> dict:
    """The evaluation as plain numbers (show --json): classifier metrics, AUROC and AUPR per shift and score,
    sample statistics per chain kind; each value as [value, SE]."""
    out = {k: [float(ds[k]), float(ds[k + "_err"])] for k in ("accuracy", "nll", "brier", "ece", "t_cal")}
    out["t_cal_scale"] = "logits' scale"
    if "T_ML_quick" in ds:
        out["T_ML_quick"] = [float(ds.T_ML_quick), float(ds.T_ML_quick_err)]
        out["T_ML_quick_side"] = ds.attrs.get("T_ML_quick_side")
        out["T_ML_quick_scale"] = "T_train"
    for name in ("auroc", "aupr"):
        out[name] = {str(shift): {str(sc): [float(ds[name][i, j]), float(ds[name + "_err"][i, j])]
                                  for j, sc in enumerate(ds.score.values)} for i, shift in enumerate(ds.ood_set.values)}
    out["samples"] = {}
    for i, kind in enumerate(ds.chain_kind.values):
        row = {"saturated_fraction": float(ds.saturated_fraction[i])}
        for k in ("confidence", "pca_frechet", "mnist_feature_frechet"):
            if k in ds:
                row[k] = [float(ds[k][i]), float(ds[k + "_err"][i])]
        out["samples"][str(kind)] = row
    if "long_run_start" in ds.attrs:
        out["long_run_start"] = ds.attrs["long_run_start"]
    return out


def table(ds: xr.Dataset) -> str:
    """The evaluation as text: classifier metrics, AUROC per shift and score, sample statistics."""
    t_train = float(ds.attrs.get("T_train", 1.0))
    lines = ["classifier (held-out, {} images): ".format(ds.attrs.get("n_heldout"))
             + ", ".join(f"{k} {float(ds[k]):.4g} ±{float(ds[k + '_err']):.2g}" for k in ("accuracy", "nll", "brier", "ece"))
             + f", t_cal {float(ds.t_cal):.4g} ±{float(ds.t_cal_err):.2g} on the logits' scale"
             + (f" (= {float(ds.t_cal) / t_train:.4g} T_train)" if t_train != 1.0 else "")]
    if "T_ML_quick" in ds:
        side = ds.attrs.get("T_ML_quick_side")
        lines.append("T_ML (quick: held-out-seeded chains; `measure --heldout auto` gives it with its error bar): "
                     + {"inside": f"{float(ds.T_ML_quick):.4g} ±{float(ds.T_ML_quick_err):.2g} T_train",
                        "below": "below 0.25 T_train", "above": "above 4 T_train"}.get(side, "undetermined"))
    lines.append(f"{'OOD AUROC':<12}" + "".join(f"{s:>22}" for s in ds.score.values))
    reversed_ = False
    for i, shift in enumerate(ds.ood_set.values):
        cells = []
        for j in range(ds.sizes["score"]):
            a, e = float(ds.auroc[i, j]), float(ds.auroc_err[i, j])
            low = a < 0.5 - 2 * max(e, 1e-3)
            reversed_ |= low
            cells.append(f"{a:>13.3f}{'*' if low else ' '}±{e:<6.3f}")
        lines.append(f"{shift:<12}" + "".join(cells))
    if reversed_:
        lines.append("* below 0.5: the score ranks these shifted inputs as more in-distribution than held-out ones "
                     "(it separates them in the opposite direction; 1 - AUROC reads the reversed score)")
    for i, kind in enumerate(ds.chain_kind.values):
        fid = (f", MNIST-feature Fréchet {float(ds.mnist_feature_frechet[i]):.3g} "
               f"±{float(ds.mnist_feature_frechet_err[i]):.2g}" if "mnist_feature_frechet" in ds else "")
        lines.append(f"samples {kind}: saturated pixels {float(ds.saturated_fraction[i]):.3f}, model confidence "
                     f"{float(ds.confidence[i]):.3f} ±{float(ds.confidence_err[i]):.2g}, PCA Fréchet distance "
                     f"{float(ds.pca_frechet[i]):.3g} ±{float(ds.pca_frechet_err[i]):.2g}{fid}")
    if "long_run_start" in ds.attrs:
        lines.append(f"(mala_N: N reflected-MALA steps at {ds.attrs['chain_temperature']} from "
                     f"{ds.attrs['long_run_start']}; Fréchet distances against held-out images)")
    return "\n".join(lines)
