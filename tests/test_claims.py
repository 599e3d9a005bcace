"""The ten claims of docs/techniques.md as studies: every one loads and composes at both scales, a claim
that needs a GPU writes a 'not run' report, one claim runs end to end at a tiny size, and the lr-scan
analysis recovers a known slope."""

from __future__ import annotations

import json
import math

import pytest

from harness.study import analyze
from harness.study.plan import Job, check_study
from harness.study.spec import load, study_names
from tests.conftest import harness, records

CLAIMS = [n for n in study_names() if n.startswith("claims/")]


def test_the_ten_claims_are_listed():
    assert len(CLAIMS) == 10, CLAIMS
    p = harness("list", "study")
    assert p.returncode == 0 and all(c in p.stdout for c in CLAIMS)


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
@pytest.mark.parametrize("name", CLAIMS)
def test_every_claim_loads_and_composes_at_both_scales(name, scale):
    study = load(name, [f"study.scale={scale}"])
    assert study.scale == scale and study.claim and study.claim.get("paper") and study.changes
    check_study(study)  # every arm composes with the task; every search space is valid


def test_a_claim_that_needs_a_gpu_reports_not_run(tmp_path):
    p = harness("study", "claims/fp8_training", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "compute capability >= 8.9" in p.stderr
    report = (tmp_path / "studies" / "fp8_training" / "report.md").read_text()
    assert "**not run**" in report and "No verdict" in report
    assert not records(tmp_path)


def test_one_claim_runs_end_to_end_at_a_tiny_size(tmp_path):
    p = harness(
        "study",
        "claims/squentropy",
        "study.seeds=2",
        'study.overrides=["trainer.epochs=1","trainer.progress=none"]',
        f"results_dir={tmp_path}",
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    study = json.loads((tmp_path / "studies" / "squentropy" / "study.json").read_text())
    assert [a["name"] for a in study["arms"]] == ["ce", "squentropy"] and all(
        len(a["runs"]) == 2 for a in study["arms"]
    )
    assert study["verdict"]["verdict"] in ("reproduced", "contradicted", "inconclusive")
    assert len(study["verdict"]["parts"]) == 3  # accuracy not worse, lower ECE, lower std
    assert len(records(tmp_path)) == 4


def test_lr_scan_recovers_a_known_slope():
    """Fake records whose largest stable learning rate doubles with the batch size: slope 1."""
    study = load(
        "claims/lr_batch_scaling",
        ["study.lr_scan={batch_sizes: [16, 32, 64, 128], lr: {low: 0.001, high: 1.0, n: 11}, steps: 10}"],
    )
    lrs = [10 ** (-3 + 3 * i / 10) for i in range(11)]
    jobs, recs = [], {}
    for arm, exponent in (("sgd", 1.0), ("adam", 0.5)):
        for b in (16, 32, 64, 128):
            limit = 0.004 * (b / 16) ** exponent
            for i, lr in enumerate(lrs):
                job = Job(
                    "scan",
                    arm,
                    i,
                    0,
                    {"trainer.batch_size": b, "optimizer.lr": lr, "trainer.max_steps": 10},
                    tag=f"b{b}_lr{i}",
                )
                jobs.append(job)
                ok = lr <= limit
                recs[job.label] = {
                    "status": "ok" if ok else "diverged",
                    "metrics": {"train_loss": 0.5 if ok else math.nan},
                    "dataset_info": {"num_classes": 10},
                    "run_key": job.label,
                }
    result = analyze.analyze_scan(study, jobs, recs)
    slopes = {a["name"]: a["slope"]["slope"] for a in result["arms"]}
    assert slopes["sgd"] == pytest.approx(1.0, abs=0.2) and slopes["adam"] == pytest.approx(0.5, abs=0.2)
    assert result["verdict"]["verdict"] in ("reproduced", "inconclusive")
    assert "slope" in result["verdict"]["reason"]
