"""`evaluate`: metrics against exact answers, and the command end to end."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from thermo_ebm.evaluation.evaluate import (auroc, average_precision, calibration_temperature, classifier_metrics,
                                   expected_calibration_error, frechet_distance, pca_frechet)
from thermo_ebm.files.results import read_group

from conftest import needs_mnist
from test_cli_reliability import run_cli


def test_ece_nll_brier_on_constructed_predictions():
    """15 equal-mass bins of 20 predictions; in bin b every confidence is c_b and exactly k_b of 20 are right:
    ECE = mean_b |k_b / 20 - c_b|. Two-class logits log p give NLL = -mean log p_y and Brier = mean sum (p - e_y)^2."""
    rng = np.random.default_rng(0)
    c = np.linspace(0.5, 0.98, 15)
    k = rng.integers(5, 21, 15)
    conf = np.repeat(c, 20)
    correct = np.concatenate([np.r_[np.ones(kb), np.zeros(20 - kb)] for kb in k])
    assert expected_calibration_error(conf, correct) == pytest.approx(np.mean(np.abs(k / 20 - c)), abs=1e-12)
    p1 = rng.uniform(0.05, 0.95, 300)
    y = rng.integers(0, 2, 300)
    logits = np.log(np.stack([1 - p1, p1], 1))
    m = classifier_metrics(logits, y, n_boot=20)
    py = np.where(y == 1, p1, 1 - p1)
    assert m["nll"][0] == pytest.approx(-np.log(py).mean(), rel=1e-10)
    assert m["brier"][0] == pytest.approx((2 * (1 - py) ** 2).mean(), rel=1e-10)
    assert m["accuracy"][0] == pytest.approx(((p1 > 0.5) == (y == 1)).mean())
    assert all(se > 0 for _, se in m.values())


def test_auroc_and_average_precision_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    pos = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounding makes ties
    neg = np.round(rng.normal(0.0, 1.0, 500), 1)
    labels = np.r_[np.ones(300), np.zeros(500)]
    scores = np.r_[pos, neg]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(pos, neg) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_frechet_distance_of_gaussians_in_closed_form():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2; equal Gaussians: 0; a rotation of both: unchanged."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    exact = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(exact, rel=1e-8)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    c1, c2 = q @ np.diag(s1 ** 2) @ q.T, q @ np.diag(s2 ** 2) @ q.T
    assert frechet_distance(q @ mu1, c1, q @ mu2, c2) == pytest.approx(exact, rel=1e-6)
    x = rng.normal(size=(4000, 8))
    f, se = pca_frechet(x, rng.normal(size=(4000, 8)), k=8, n_boot=20)
    assert 0 <= f < 0.05 and se > 0


def test_calibration_temperature_is_recovered():
    """Labels drawn from softmax(z / T0) with T0 = 2.5: T_cal within 4 bootstrap SEs of T0."""
    rng = np.random.default_rng(3)
    z = rng.normal(0, 3, (4000, 10))
    p = np.exp(z / 2.5)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(10, p=row) for row in p])
    m = classifier_metrics(z, y, n_boot=60, seed=1)
    t, se = m["t_cal"]
    assert abs(t - 2.5) < 4 * se, (t, se)
    assert calibration_temperature(z, y) == pytest.approx(t)


def test_eval_command_writes_a_group_and_show_prints_it(digits_ckpt, tmp_path):
    import shutil
    out = tmp_path / "r.h5"
    shutil.copy(digits_ckpt["results"], out)
    args = ["eval", "--ckpt", digits_ckpt["checkpoint"], "--out", str(out), "--n-ood", "200", "--chains", "8",
            "--chain-steps", "20,60", "--device", "cpu"]
    code, err = run_cli(args)
    assert code == 0, err
    ds = read_group(out, "evaluation")
    assert ds.attrs["kind"] == "evaluation" and read_group(out, "training").attrs["kind"] == "training"
    assert set(ds.ood_set.values) == {"uniform", "gaussian", "constant", "inverted", "permuted"}
    assert list(ds.chain_kind.values) == ["buffer_marginal", "mala_20", "mala_60"]
    assert ds.attrs["long_run_start"] == "buffer_marginal"  # the long-run chains continue the buffer's
    assert 0 <= float(ds.ece) <= 1 and float(ds.ece_err) > 0 and float(ds.t_cal) > 0
    assert np.all((ds.auroc.values >= 0) & (ds.auroc.values <= 1)) and np.all(ds.auroc_err.values >= 0)
    assert ds.accuracy.attrs["units"] == "1" and ds.auroc.attrs["ancillary_variables"] == "auroc_err"
    code, err = run_cli(args)
    assert code == 2 and "already has a group 'evaluation'" in err
    from thermo_ebm.reporting.report import report
    text = report(out)
    assert "[evaluation] evaluation" in text and "OOD AUROC" in text and math.isfinite(float(ds.nll))
    assert "on the logits' scale (= " in text  # t_cal named with its scale, and on T_train's
    assert "T_ML (quick" in text and ds.attrs["T_ML_quick_side"] in ("inside", "below", "above", "undetermined")
    assert (ds.attrs["T_ML_quick_side"] == "inside") == math.isfinite(float(ds.T_ML_quick))
    if (ds.auroc.values < 0.5 - 2 * np.maximum(ds.auroc_err.values, 1e-3)).any():
        assert "opposite direction" in text
    import json
    doc = json.loads(report(out, as_json=True))["groups"]["evaluation"]
    assert set(doc["auroc"]) == set(ds.ood_set.values) and "mala_60" in doc["samples"]
    assert doc["T_ML_quick_scale"] == "T_train" and len(doc["T_ML_quick"]) == 2
    assert doc["provenance"]["checkpoint_sha256"] == ds.attrs["checkpoint_sha256"]
    code, err = run_cli(["plot", str(out)])
    assert code == 0, err
    assert (tmp_path / "r_evaluation.png").stat().st_size > 10_000


@needs_mnist
def test_mnist_feature_frechet_and_eval_of_an_mnist_model(tmp_path, monkeypatch):
    """The feature network trains once on the offline MNIST split (cached: the second call loads it), separates
    digits from noise in Fréchet distance, and `evaluate` of a (barely trained) MNIST model reports it."""
    import time

    import torch

    from conftest import SHARED
    from thermo_ebm import evaluate, train
    from thermo_ebm.data import load_data
    from thermo_ebm.evaluation.evaluate import feature_frechet, mnist_feature_net
    monkeypatch.setenv("THERMO_EBM_CACHE", str(tmp_path / "cache"))
    net, acc = mnist_feature_net(SHARED)
    assert acc > 0.9
    t0 = time.perf_counter()
    assert mnist_feature_net(SHARED)[1] == acc and time.perf_counter() - t0 < 5  # loaded, not retrained
    data = load_data("mnist", SHARED)
    same, same_se = feature_frechet(net, data.x_test[:1000], data.x_test[1000:2000])
    noise, _ = feature_frechet(net, data.x_test[:1000], torch.rand(1000, 1, 28, 28) * 2 - 1)
    assert noise > 10 * same and noise > same + 20 * same_se
    out = train(name="m", objective="j_ebm", dataset="mnist", data_dir=str(SHARED), epochs=1, max_steps=3,
                batch_size=32, buffer_size=64, mc_steps=2, model_size=32, checkpoint_dir="c", results_dir="r",
                progress=False)
    # a data folder that also holds Fashion-MNIST files (the MNIST ones stand in: same format)
    import shutil
    local = tmp_path / "data"
    shutil.copytree(SHARED / "MNIST", local / "MNIST")
    shutil.copytree(SHARED / "MNIST", local / "FashionMNIST")
    ds = evaluate(out["checkpoint"], device="cpu", data_dir=str(local), n_ood=100, n_boot=20, chains=8,
                  chain_steps=(10,))
    assert {"digits8x8", "fashion-mnist"} <= set(ds.ood_set.values) and "mnist" not in ds.ood_set.values
    assert np.all(np.isfinite(ds.mnist_feature_frechet.values)) and ds.attrs["feature_net_heldout_acc"] == acc


def test_long_run_chains_continue_their_start_and_sample_p_T():
    """`draw(start=...)`, the long-run check's chains: from states far out in a corner, 300 steps at T (step sizes
    tuned over the first 30, then frozen) reach p_T of a truncated Gaussian (exact <E>_T), within 4 SEs; and they
    continue their start: on double wells at a cold temperature, chains started in the lower wells stay there,
    while chains from noise leave about a third of the coordinates in the upper ones."""
    import torch

    from thermo_ebm.evaluation.sample import draw
    from thermo_ebm.testing import DoubleWells, TruncatedGaussian
    model = TruncatedGaussian(d=16, seed=3)
    model.n_classes = 1
    start = torch.full((512, 16), 0.95)
    for temp in (0.5, 1.0):
        x = draw(model, temp, n=7, steps=300, seed=1, device="cpu", start=start)
        assert x.shape == (512, 16)
        with torch.no_grad():
            e = -model(x).squeeze(-1).double().numpy()
        u = float(model.exact([temp])["U"][0])
        assert abs(e.mean() - u) < 4 * e.std() / math.sqrt(len(e)), (temp, e.mean(), u)
    wells = DoubleWells(d=16)
    wells.n_classes = 1
    upper = [float((draw(wells, 0.05, n=64, steps=200, seed=1, device="cpu", start=start) > 0).float().mean())
             for start in (torch.full((64, 16), -0.7), None)]
    assert upper[0] < 0.02 and upper[1] > 0.2, upper
