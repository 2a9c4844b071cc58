import os
from pathlib import Path

import pytest
import torch

# one thread per pytest-xdist worker (make test runs one worker per core), two when run alone
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HAVE_MNIST = (SHARED / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
# MNIST lives beside the clone only in this workspace; elsewhere these tests skip (never download, never write there)
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST test split not found under {SHARED}")


def pytest_collection_modifyitems(items):
    """Tests marked `heavy` (minutes each) run first, so that pytest-xdist's workers finish together instead of one
    starting a four-minute test near the end (the order of the others is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory):
    """A tiny j_ebm trained on the bundled digits (shared by CLI / plot / reliability tests)."""
    from thermo_ebm.training.loop import train
    d = tmp_path_factory.mktemp("run")
    out = train(name="tiny", objective="j_ebm", dataset="digits", epochs=1, max_steps=6, batch_size=32,
                buffer_size=256, mc_steps=5, model_size=32, checkpoint_dir=str(d / "ckpt"),
                results_dir=str(d / "res"), progress=False)
    return out


@pytest.fixture(autouse=True)
def _cwd_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder, with the feature-network cache inside it (nothing is written
    outside the clone or the temporary folders)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THERMO_EBM_CACHE", str(tmp_path / "cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")
