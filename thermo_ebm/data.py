"""Datasets as float32 tensors in [-1, 1] with shape [N, C, H, W] and int64 labels remapped to 0..K-1.

mnist / fashion-mnist: idx files under <data_dir>/<MNIST|FashionMNIST>/raw (.gz or not), downloaded through
torchvision when missing. If only the official test split is present (machines without internet), its
10,000 images are split 8,000 train / 2,000 held out with a fixed permutation and the run says so.
cifar10: torchvision. digits: scikit-learn's bundled 8x8 digits (fully offline), fixed 80/20 split.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DATASETS, parse_labels
from .errors import ThermoEBMError

log = logging.getLogger("thermo_ebm")
_IDX = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
SPLIT_SEED = 12345  # fixed: the held-out set is the same for every run


@dataclass
class Data:
    """A dataset in the box [-1, 1]: train/held-out images [N, C, H, W] float32, labels [N] int64, notes."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list            # original class ids, index = model label
    note: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self):
        return len(self.classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ThermoEBMError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ThermoEBMError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _find(raw: Path, stem: str):
    for p in (raw / stem, raw / (stem + ".gz")):
        if p.is_file():
            return p
    return None


def _idx_split(raw: Path, prefix: str):
    imgs, labs = _find(raw, f"{prefix}-images-idx3-ubyte"), _find(raw, f"{prefix}-labels-idx1-ubyte")
    if imgs is None or labs is None:
        return None
    x, y = _read_idx(imgs), _read_idx(labs)
    if len(x) != len(y):
        raise ThermoEBMError(f"{imgs} and {labs} hold different numbers of items")
    return x, y


def _to_unit(x_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(x_uint8)).float() / 255.0 * 2.0 - 1.0  # a writable copy of the read-only buffer
    return x[:, None] if x.ndim == 3 else x


def _load_idx(name: str, data_dir: Path):
    raw = data_dir / _IDX[name] / "raw"
    train, test = _idx_split(raw, "train"), _idx_split(raw, "t10k")
    if test is None:
        try:
            import torchvision
            cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
            cls(str(data_dir), train=True, download=True)
            cls(str(data_dir), train=False, download=True)
        except Exception as e:
            raise ThermoEBMError(
                f"{name} not found under {raw} and download failed ({type(e).__name__}); pass --data-dir "
                f"with {_IDX[name]}/raw inside (e.g. --data-dir ../shared/data) or use --dataset digits") from None
        train, test = _idx_split(raw, "train"), _idx_split(raw, "t10k")
    if train is None:
        x, y = test
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
        n_train = int(round(0.8 * len(x)))
        tr, te = perm[:n_train], perm[n_train:]
        note = (f"only the official {name} test split found in {raw}: split its {len(x)} images "
                f"{len(tr)} train / {len(te)} held out (fixed permutation, seed {SPLIT_SEED})")
        return _to_unit(x[tr]), y[tr], _to_unit(x[te]), y[te], note
    return _to_unit(train[0]), train[1], _to_unit(test[0]), test[1], f"{name}: official train/test splits"


def _load_cifar(data_dir: Path):
    try:
        import torchvision
        tr = torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
        te = torchvision.datasets.CIFAR10(str(data_dir), train=False, download=True)
    except Exception as e:
        raise ThermoEBMError(f"cifar10 not available under {data_dir} and download failed ({type(e).__name__}); "
                             "pass --data-dir or use --dataset digits") from None

    def conv(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        return x, np.asarray(ds.targets)
    (xa, ya), (xb, yb) = conv(tr), conv(te)
    return xa, ya, xb, yb, "cifar10: official train/test splits"


def _load_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0 * 2 - 1
    y = d.target
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_train = int(round(0.8 * len(x)))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te], f"digits: scikit-learn 8x8 digits, fixed 80/20 split (seed {SPLIT_SEED})"


def load_data(name: str, data_dir="data", labels=None, noise: float = 0.0) -> Data:
    """Load a dataset; `labels` keeps a subset of classes (remapped to 0..K-1)."""
    if name not in DATASETS:
        raise ThermoEBMError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if noise < 0:
        raise ThermoEBMError("--noise must be >= 0")
    data_dir = Path(data_dir)
    if name in _IDX:
        xa, ya, xb, yb, note = _load_idx(name, data_dir)
    elif name == "cifar10":
        xa, ya, xb, yb, note = _load_cifar(data_dir)
    else:
        xa, ya, xb, yb, note = _load_digits()
    present = sorted(set(np.asarray(ya).tolist()))
    keep = parse_labels(labels)
    if keep is None:
        keep = present
    bad = [c for c in keep if c not in present]
    if bad:
        raise ThermoEBMError(f"--labels {bad} not in {name} (classes {present[0]}..{present[-1]})")
    remap = {c: i for i, c in enumerate(keep)}
    ya, yb = np.asarray(ya), np.asarray(yb)
    ma, mb = np.isin(ya, keep), np.isin(yb, keep)
    to = np.vectorize(remap.get, otypes=[np.int64])
    data = Data(xa[torch.from_numpy(ma)], torch.from_numpy(to(ya[ma])), xb[torch.from_numpy(mb)],
                torch.from_numpy(to(yb[mb])), keep, note,
                {"dataset": name, "split_note": note, "n_train": int(ma.sum()), "n_test": int(mb.sum()),
                 "noise": float(noise)})
    log.info("data: %s; %d train / %d held out, classes %s", note, len(data.y_train), len(data.y_test), keep)
    return data


def is_auto(spec) -> bool:
    """Whether a states option (measure's data= or heldout=) is the word "auto" rather than states or a file."""
    return isinstance(spec, str) and spec == "auto"


def is_none(spec) -> bool:
    """Whether a states option asks for no states: None or the word "none"."""
    return spec is None or (isinstance(spec, str) and spec == "none")


def load_states_file(path, what: str, choices: str):
    """The object a .pt file of states holds (torch.load, weights only); one-line errors naming `what`
    ("data", "held-out") and the accepted `choices`."""
    p = Path(path)
    if not p.is_file():
        raise ThermoEBMError(f"{what} file not found: {p} (use {choices} or a .pt file of states [M, *shape])")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        raise ThermoEBMError(f"cannot read {what} file {p}: not a tensor file written by torch.save") from None


def check_states(states, shape, what: str) -> torch.Tensor:
    """States [M, *shape] or [M, D] (tensor or array) as float32 [M, D], finite and in the box [-1, 1]."""
    x = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states).float()
    d = int(np.prod(shape))
    if x.ndim < 2 or len(x) == 0 or (tuple(x.shape[1:]) != tuple(shape) and tuple(x.shape[1:]) != (d,)):
        raise ThermoEBMError(f"{what} states must have shape [M, {', '.join(map(str, shape))}], got {list(x.shape)}")
    x = x.reshape(-1, d)
    if not torch.isfinite(x).all() or x.abs().max() > 1.0:
        raise ThermoEBMError(f"{what} states must be finite and lie in the box [-1, 1]")
    return x
