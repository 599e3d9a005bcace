"""End to end on CPU: the real CLI trains the quickstart model with train-time targets and post-hoc
temperature scaling, and the record holds calibration metrics before and after."""

from pathlib import Path

from conftest import harness, records


def test_quickstart_with_temperature_scaling_pskd_and_label_smoothing(tmp_path):
    p = harness(
        "run",
        "-m",
        "task=quickstart",
        "trainer.progress=none",
        "trainer.epochs=2",
        "dataset.val_size=300",
        "calibration=temperature",
        "regularization=none,pskd,label_smoothing",
        f"results_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    recs = {r["choices"]["regularization"]: r for r in records(tmp_path)}
    assert set(recs) == {"none", "pskd", "label_smoothing"}
    for name, rec in recs.items():
        assert rec["status"] == "ok", (name, rec["error"])
        m = rec["metrics"]
        for key in ("test_ece", "test_nll", "test_brier", "test_aurc", "test_ece_after", "test_nll_after"):
            assert 0 <= m[key] < 10, (name, key, m.get(key))
        assert m["test_acc_after"] == m["test_acc"]  # temperature scaling never changes the argmax
        assert rec["techniques"]["calibration"]["params"]["temperature"] > 0
        assert (Path(rec["run_dir"]) / "calibration_logits.pt").exists()
    plain = recs["none"]["metrics"]
    assert plain["test_ece_after"] <= plain["test_ece"]
    assert recs["pskd"]["techniques"]["regularization"]["final_alpha"] == 0.8  # alpha_T reached at the last epoch
    assert recs["label_smoothing"]["techniques"]["regularization"]["epsilon"] == 0.1


def test_three_calibrators_from_one_training_run(tmp_path):
    p = harness(
        "run",
        "task=quickstart",
        "trainer.progress=none",
        "trainer.epochs=2",
        "calibration=[temperature,vector,isotonic]",
        f"results_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path)  # one trained model
    m = rec["metrics"]
    for name in ("temperature", "vector", "isotonic"):
        for key in ("test_ece", "test_nll"):
            assert 0 <= m[f"{key}_after_{name}"] < 10, (name, key)
    calib = rec["techniques"]["calibration"]
    assert calib["methods"] == ["temperature", "vector", "isotonic"] and calib["fit_split"] == "val"
    assert m["test_ece_after"] == m[f"test_ece_after_{calib['selected']}"]
    assert set(calib["params"]) == {"temperature", "vector", "isotonic"}
    assert m["test_acc_after_temperature"] == m["test_acc"]
    # the console summary shows the calibrated metrics next to the uncalibrated ones
    summary = next(ln for ln in p.stdout.splitlines() if ln.startswith("test:"))
    for key in ("test_ece ", "test_ece_after ", "test_ece_after_vector ", "test_nll_after_isotonic "):
        assert key in summary, summary
