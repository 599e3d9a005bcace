"""Calibration metrics on hand-made logits with known answers, and the post-hoc calibrators."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.hooks import RunContext
from harness.metrics.calibration import calibration_metrics, reliability_bins
from harness.techniques.calibration import (
    LOGITS_FILE,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
)
from harness.techniques.registry import build_techniques

CONF = Path(__file__).resolve().parents[1] / "conf"


pytestmark = pytest.mark.usefixtures("one_thread")


def logits_for(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


# ---- metrics -------------------------------------------------------------------------------------


def test_perfectly_calibrated_has_zero_ece():
    # 10 samples at confidence 0.8 with 8 right, 10 at 0.6 with 6 right: every bin's accuracy = confidence
    logits = torch.cat([logits_for([[0.8, 0.2]] * 10), logits_for([[0.4, 0.6]] * 10)])
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    m = calibration_metrics(logits, labels)
    assert m["test_acc"] == pytest.approx(0.7)
    for key in ("test_ece", "test_mce", "test_ece_adaptive", "test_ece_classwise"):
        assert m[key] < 1e-6, key


def test_confident_and_wrong_has_known_values():
    logits = torch.tensor([[10.0, 0.0]] * 50)
    labels = torch.ones(50, dtype=torch.long)
    p = 1 / (1 + math.exp(-10))
    m = calibration_metrics(logits, labels, prefix="val_")
    assert m["val_acc"] == 0
    assert m["val_ece"] == pytest.approx(p, abs=1e-6)
    assert m["val_mce"] == pytest.approx(p, abs=1e-6)
    assert m["val_nll"] == pytest.approx(math.log1p(math.exp(10)), rel=1e-5)
    assert m["val_brier"] == pytest.approx(2 * p * p, rel=1e-5)  # (p - 0)^2 + ((1 - p) - 1)^2
    assert m["val_aurc"] == pytest.approx(1.0)


def test_aurc_of_perfect_ranking_is_the_minimum():
    n, errors = 1000, 100
    conf = torch.linspace(0.99, 0.51, n)  # class 0 predicted, decreasing confidence; last 100 wrong
    labels = torch.zeros(n, dtype=torch.long)
    labels[-errors:] = 1
    logits = torch.stack([conf.log(), (1 - conf).log()], 1)
    m = calibration_metrics(logits, labels)
    minimum = sum((i - (n - errors)) / i for i in range(n - errors + 1, n + 1)) / n
    assert m["test_aurc"] == pytest.approx(minimum, rel=1e-9)
    r = errors / n
    assert m["test_eaurc"] == pytest.approx(m["test_aurc"] - (r + (1 - r) * math.log(1 - r)), abs=1e-9)
    assert abs(m["test_eaurc"]) < 2e-3  # the discrete minimum is the continuous optimum up to O(1/n)
    # the worst ranking (errors most confident) has a much larger area
    worst = calibration_metrics(logits, labels.flip(0))
    assert worst["test_aurc"] > 5 * m["test_aurc"]


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_ece_and_mce_match_torchmetrics(classes):
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(4000, classes, generator=g) * 3
    logits[:200] *= 50  # saturated softmax: confidence exactly 1.0 in float32
    labels = torch.randint(0, classes, (4000,), generator=g)
    m = calibration_metrics(logits, labels)
    for norm, key in (("l1", "test_ece"), ("max", "test_mce")):
        ref = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm=norm)(logits, labels).item()
        assert m[key] == pytest.approx(ref, abs=1e-6)


def test_adaptive_and_classwise_ece_against_direct_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1500, 4, generator=g) * 2
    labels = torch.randint(0, 4, (1500,), generator=g)
    m = calibration_metrics(logits, labels)
    probs = logits.softmax(-1).double()
    conf, pred = probs.max(-1)
    hit = (pred == labels).double()
    order = conf.argsort()
    ace = sum(abs(conf[b].mean() - hit[b].mean()) * len(b) for b in order.chunk(15)) / 1500
    assert m["test_ece_adaptive"] == pytest.approx(float(ace), abs=1e-6)
    cw = []
    for k in range(4):
        pk, yk = probs[:, k], (labels == k).double()
        bins = (pk * 15).floor().clamp(max=15)
        cw.append(
            sum(abs(pk[bins == b].mean() - yk[bins == b].mean()) * (bins == b).sum() for b in bins.unique()) / 1500
        )
    assert m["test_ece_classwise"] == pytest.approx(float(sum(cw) / 4), abs=1e-6)


def test_reliability_bins_count_every_sample():
    logits = torch.tensor([[100.0, 0.0], [0.1, 0.0], [2.0, 0.0]])  # conf 1.0 (float32), ~0.52, ~0.88
    out = reliability_bins(logits.softmax(-1), torch.tensor([0, 1, 0]), n_bins=10)
    assert sum(out["count"]) == 3 and len(out["count"]) == 10 and len(out["edges"]) == 11
    assert out["count"][9] == 1 and out["count"][5] == 1 and out["count"][8] == 1
    assert out["accuracy"][9] == 1.0 and out["accuracy"][5] == 0.0


# ---- post-hoc calibrators ------------------------------------------------------------------------


def synthetic(n, classes, seed, temperature=1.0, scale=None, bias=None):
    """Labels drawn from softmax(z); the model reports a distorted z (too confident by ``temperature``)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2.0
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    shown = z * temperature
    if scale is not None:
        shown = shown * scale + bias
    return shown, labels


def test_temperature_scaling_recovers_the_temperature_and_keeps_argmax():
    logits, labels = synthetic(20000, 10, 0, temperature=2.5)
    ts = TemperatureScaling()
    ts.fit(logits, labels)
    assert ts.temperature == pytest.approx(2.5, rel=0.05)
    test_logits, test_labels = synthetic(5000, 10, 1, temperature=2.5)
    after = ts.transform(test_logits)
    assert torch.equal(after.argmax(-1), test_logits.argmax(-1))
    before, fixed = calibration_metrics(test_logits, test_labels), calibration_metrics(after, test_labels)
    assert fixed["test_acc"] == before["test_acc"]
    assert fixed["test_ece"] < before["test_ece"] / 3 and fixed["test_nll"] < before["test_nll"]


def test_temperature_is_positive_even_for_underconfident_logits():
    logits, labels = synthetic(5000, 5, 2, temperature=0.3)
    ts = TemperatureScaling()
    ts.fit(logits, labels)
    assert ts.temperature == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize(
    "make", [VectorScaling, lambda: MatrixScaling(off_diagonal=0.1, bias=0.1, max_iter=200)], ids=["vector", "matrix"]
)
def test_vector_and_matrix_scaling_reduce_nll(make):
    g = torch.Generator().manual_seed(3)
    scale, bias = torch.rand(8, generator=g) * 3 + 0.5, torch.randn(8, generator=g)
    val, val_y = synthetic(8000, 8, 4, scale=scale, bias=bias)
    test, test_y = synthetic(4000, 8, 5, scale=scale, bias=bias)
    cal = make()
    cal.fit(val, val_y)
    before, after = calibration_metrics(test, test_y), calibration_metrics(cal.transform(test), test_y)
    assert after["test_nll"] < 0.9 * before["test_nll"]
    # vector scaling removes per-class distortion that a single temperature cannot
    ts = TemperatureScaling()
    ts.fit(val, val_y)
    assert after["test_nll"] < calibration_metrics(ts.transform(test), test_y)["test_nll"]


def test_matrix_regularisation_shrinks_off_diagonal_and_cross_validation_picks_it():
    val, val_y = synthetic(200, 10, 6, temperature=2.0)  # 110 parameters for 200 samples: overfitting regime
    loose, tight = MatrixScaling(off_diagonal=0, bias=0, max_iter=100), MatrixScaling(off_diagonal=1e3, bias=1e3)
    cv = MatrixScaling(grid=[0.1, 10.0, 1e3], max_iter=100)
    for cal in (loose, tight, cv):
        cal.fit(val, val_y)
    assert tight.params()["offdiag_abs_mean"] < 0.5 * loose.params()["offdiag_abs_mean"]
    assert cv.off_diagonal == cv.bias == min(cv.cv_nll, key=cv.cv_nll.get) and len(cv.cv_nll) >= 2
    test, test_y = synthetic(4000, 10, 7, temperature=2.0)
    nll = {k: calibration_metrics(c.transform(test), test_y)["test_nll"] for k, c in (("loose", loose), ("cv", cv))}
    assert nll["cv"] < nll["loose"]


@pytest.mark.parametrize("cls", [IsotonicCalibration, HistogramBinning])
def test_binning_calibrators_reduce_ece(cls):
    val, val_y = synthetic(10000, 5, 8, temperature=3.0)
    test, test_y = synthetic(5000, 5, 9, temperature=3.0)
    cal = cls()
    cal.fit(val, val_y)
    after = cal.transform(test)
    assert torch.isfinite(after).all()
    assert torch.allclose(after.exp().sum(-1), torch.ones(5000), atol=1e-5)
    before, fixed = calibration_metrics(test, test_y), calibration_metrics(after, test_y)
    assert fixed["test_ece"] < before["test_ece"] / 2 and fixed["test_nll"] < before["test_nll"]


def fake_run(tmp_path, val_size=2000):
    val, val_y = synthetic(val_size, 10, 10, temperature=2.0)
    test, test_y = synthetic(3000, 10, 11, temperature=2.0)
    splits = {"val": (val, val_y), "test": (test, test_y)}
    data = SimpleNamespace(task="classification", val="val" if val_size else None, test="test", num_classes=10)
    ctx = RunContext(cfg=None, device=torch.device("cpu"), data=data, run_dir=str(tmp_path))
    ctx.extras["predict"] = lambda split: splits[split]
    return ctx, test, test_y


def calibration_cfg(choice):
    return OmegaConf.create({"calibration": OmegaConf.load(CONF / "calibration" / f"{choice}.yaml")})


@pytest.mark.parametrize("choice", ["temperature", "vector", "matrix", "isotonic", "histogram"])
def test_finalize_from_config_reports_after_metrics_params_and_saves_logits(tmp_path, choice):
    (tech,) = build_techniques(calibration_cfg(choice))
    ctx, test, test_y = fake_run(tmp_path)
    tech.prepare_model(torch.nn.Identity(), ctx)
    out = tech.finalize(torch.nn.Identity(), ctx)
    before = calibration_metrics(test, test_y)
    assert out["metrics"]["test_ece_after"] < before["test_ece"]
    assert set(out["metrics"]) >= {f"{k}_after" for k in before}
    assert out["params"] and tech.summary() == {"fit_split": "val", "fit_samples": 2000}
    saved = torch.load(tmp_path / LOGITS_FILE)
    assert torch.equal(saved["logits"], test) and torch.equal(saved["labels"], test_y)
    assert calibration_metrics(saved["calibrated"], test_y)["test_ece"] == pytest.approx(
        out["metrics"]["test_ece_after"]
    )
    if choice == "temperature":
        assert out["params"]["temperature"] == pytest.approx(2.0, rel=0.1)
        assert out["metrics"]["test_acc_after"] == before["test_acc"]


def test_calibration_without_validation_split_fails_before_training(tmp_path):
    (tech,) = build_techniques(calibration_cfg("temperature"))
    ctx, *_ = fake_run(tmp_path, val_size=0)
    with pytest.raises(ConfigError, match="dataset.val_size > 0"):
        tech.prepare_model(torch.nn.Identity(), ctx)


def test_unknown_calibration_hyperparameter_names_the_valid_ones():
    cfg = calibration_cfg("matrix")
    cfg.calibration.lambda_ = 1.0
    with pytest.raises(ConfigError, match=r"lambda_.*valid: off_diagonal, bias, grid"):
        build_techniques(cfg)
    cfg = OmegaConf.create({"calibration": {"name": "platt"}})
    with pytest.raises(ConfigError, match="temperature"):
        build_techniques(cfg)


def test_reliability_plot_command_draws_before_and_after(tmp_path):
    from harness.cli import main

    (tech,) = build_techniques(calibration_cfg("temperature"))
    ctx, *_ = fake_run(tmp_path)
    out = tech.finalize(torch.nn.Identity(), ctx)
    assert sum(out["reliability"]["before"]["count"]) == sum(out["reliability"]["after"]["count"]) == 3000
    (tmp_path / "result.json").write_text('{"task": {"name": "synthetic"}, "seed": 0}')
    assert main(["plot", "reliability", str(tmp_path)]) == 0
    png = tmp_path / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # a run without a logits file or bins is refused with a message naming the file
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="calibration_logits.pt"):
        from harness.analysis.reliability import cli

        cli(["reliability", str(empty)])


def test_several_calibrators_fit_on_validation_once_each_with_their_metrics(tmp_path):
    cfg = OmegaConf.create({"calibration": {"name": "compare", "methods": ["temperature", "vector", "isotonic"]}})
    (tech,) = build_techniques(cfg)
    ctx, test, test_y = fake_run(tmp_path)
    seen = []
    predict = ctx.extras["predict"]
    ctx.extras["predict"] = lambda split: (seen.append(split), predict(split))[1]
    tech.prepare_model(torch.nn.Identity(), ctx)
    out = tech.finalize(torch.nn.Identity(), ctx)
    assert seen == ["val", "test"]  # the model's logits are computed once, for every calibrator
    before = calibration_metrics(test, test_y)
    m = out["metrics"]
    for name in ("temperature", "vector", "isotonic"):
        assert m[f"test_ece_after_{name}"] < before["test_ece"], name
        assert m[f"test_nll_after_{name}"] > 0 and f"val_nll_after_{name}" in m
        # each equals what the calibrator gives on its own
        (alone,) = build_techniques(calibration_cfg(name))
        (tmp_path / name).mkdir()
        single = alone.finalize(torch.nn.Identity(), fake_run(tmp_path / name)[0])["metrics"]
        assert m[f"test_ece_after_{name}"] == pytest.approx(single["test_ece_after"])
    summary = tech.summary()
    assert summary["methods"] == ["temperature", "vector", "isotonic"] and summary["fit_split"] == "val"
    chosen = summary["selected"]  # the plain *_after values are the calibrator with the lowest validation NLL
    assert chosen == min(("temperature", "vector", "isotonic"), key=lambda n: m[f"val_nll_after_{n}"])
    assert m["test_ece_after"] == m[f"test_ece_after_{chosen}"]
    assert out["params"]["temperature"]["temperature"] == pytest.approx(2.0, rel=0.1)
    saved = torch.load(tmp_path / LOGITS_FILE)
    assert saved["method"] == chosen and set(saved["by_method"]) == {"temperature", "vector", "isotonic"}


def test_several_calibrators_refuse_unknown_or_repeated_methods():
    for methods, match in (
        (["temperature", "platt"], r"unknown calibrator in calibration.methods 'platt'.*isotonic"),
        (["vector", "vector"], "distinct"),
        ([], "one or more"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_techniques(OmegaConf.create({"calibration": {"name": "compare", "methods": methods}}))
