"""`harness study`: equal tuning budget for every arm, selection on validation, fresh seeds, a verdict;
a re-invoked study trains nothing new; bad studies are refused before any run."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.study import analyze
from harness.study.plan import Param, unit_points
from harness.study.spec import parse
from tests.conftest import harness, records

FAST = ['study.overrides=["trainer.epochs=1","trainer.progress=none"]']


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    first = harness("study", "smoke", *FAST, f"results_dir={out}", timeout=900)
    return out, first


def test_smoke_study_runs_end_to_end_with_equal_budget_and_a_verdict(smoke):
    out, p = smoke
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    recs = records(out / "studies" / "smoke" / "runs")
    assert len(recs) == 2 * (3 + 2)  # arms x (budget + seeds)
    assert all(r["status"] == "ok" for r in recs)
    study = json.loads((out / "studies" / "smoke" / "study.json").read_text())
    assert study["selection_metric"] == "val_acc" and study["metric"] == "test_acc"
    for arm in study["arms"]:
        assert arm["budget_trials"] == 3 and len(arm["runs"]) == 2  # every arm, the baseline too
        assert {r["seed"] for r in arm["runs"]} == {1, 2} and {t["seed"] for t in arm["trials"]} == {0}  # fresh seeds
        # trial values are validation accuracies; ties go to the lower validation loss
        best = max(arm["trials"], key=lambda t: (t["value"], -t["metrics"]["val_loss"]))
        assert arm["selected"] == best["params"]
        assert all(r["params"] == best["params"] for r in arm["runs"])
    by_key = {r["run_key"]: r for r in recs}
    trial = study["arms"][0]["trials"][0]
    assert by_key[trial["run_key"]]["metrics"]["val_acc"] == trial["value"]  # selection read validation, not test
    assert by_key[trial["run_key"]]["study"] == {
        "name": "smoke",
        "arm": "sgd",
        "phase": "tune",
        "index": 0,
        "budget": 3,
    }
    assert study["verdict"]["verdict"] in ("reproduced", "contradicted", "inconclusive")
    report = (out / "studies" / "smoke" / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Protocol") < report.index("## Arms")
    assert "3 trials per arm" in report and "Holm" in report and "commit" in report
    assert (out / "studies" / "smoke" / "summary.csv").read_text().count("\n") == 3
    assert (out / "studies" / "smoke" / "report.html").read_text().startswith("<!doctype html>")
    assert "verdict:" in p.stdout


def test_a_second_invocation_trains_nothing(smoke):
    out, first = smoke
    assert first.returncode == 0
    before = sorted(r["run_id"] for r in records(out))
    p = harness("study", "smoke", *FAST, f"results_dir={out}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(r["run_id"] for r in records(out)) == before
    text = p.stdout + p.stderr
    assert "6 of 6 runs already done, launching 0" in text and "4 of 4 runs already done, launching 0" in text


def test_report_numbers_match_the_leaderboard(smoke):
    from harness.analysis.leaderboard import build

    out, first = smoke
    assert first.returncode == 0
    study = json.loads((out / "studies" / "smoke" / "study.json").read_text())
    # the same records: the seed phase (the selected trial itself has the same technique and would be a third seed)
    lb = build(out / "studies" / "smoke" / "runs" / "seed", None, None, None)
    (board,) = lb.boards  # one task: every run of the study has the same task identity
    technique = {r.run_key: r.key for r in board.runs}
    for arm in study["arms"]:
        (key,) = {technique[r["run_key"]] for r in arm["runs"]}  # the seed runs of an arm are one technique row
        row = board.table.set_index("key").loc[key]
        assert row["n"] == len(arm["values"]) == 2
        assert row["mean"] == pytest.approx(arm["mean"], abs=1e-12)
        if arm["ci"]:  # the same interval (the leaderboard's mean_interval)
            assert [row["ci_lo"], row["ci_hi"]] == pytest.approx(arm["ci"], abs=1e-12)


def base_study(**kw):
    spec = {
        "name": "t",
        "task": "quickstart",
        "arms": {"a": {"overrides": ["optimizer=sgd"], "baseline": True}, "b": {"overrides": ["optimizer=adamw"]}},
        "budget": 2,
        "seeds": 2,
    }
    spec.update(kw)
    return OmegaConf.create(spec)


def test_unequal_budgets_are_refused():
    node = base_study()
    node.arms.b.budget = 5
    with pytest.raises(ConfigError, match="same tuning budget"):
        parse(node, "t")
    p = harness("study", "smoke", "study.arms.adamw.budget=5")
    assert p.returncode == 2 and "same tuning budget" in p.stderr


def test_bad_studies_are_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="exactly one arm must be the baseline"):
        parse(base_study(arms={"a": {"overrides": []}}), "t")
    with pytest.raises(ConfigError, match=r"criterion arm.*'c'.*Valid choices: a, b"):
        parse(base_study(claim={"criterion": {"kind": "better", "arm": "c"}}), "t")
    with pytest.raises(ConfigError, match=r"criterion metric.*'test_bleu'"):
        parse(base_study(claim={"criterion": {"kind": "better", "arm": "b", "metric": "test_bleu"}}), "t")
    for args, message in (
        (['study.arms.adamw.overrides=["optimizer=adamz"]'], "unknown optimizer 'adamz'"),
        (["study.search={optimizer.lr: {low: -1, high: 1, log: false}}"], "outside its valid range"),
        (["study.sampler=lhs"], "Valid choices: grid, halton, random, sobol"),
        (["study.budgett=3"], "unknown study key 'budgett'"),
    ):
        p = harness("study", "smoke", *args, f"results_dir={tmp_path}")
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr[-1500:])
        assert not (tmp_path / "studies").exists()
    p = harness("study", "nope")
    assert p.returncode == 2 and "smoke" in p.stderr


def test_list_study_names_the_studies():
    p = harness("list", "study")
    assert p.returncode == 0 and "smoke" in p.stdout and "optimizers_cifar10" in p.stdout


def test_samplers_are_seeded_quasi_random_and_cover_the_space():
    a, b = unit_points("sobol", 8, 2, 0), unit_points("sobol", 8, 2, 0)
    assert (a == b).all() and a.shape == (8, 2) and ((a >= 0) & (a < 1)).all()
    assert not (unit_points("sobol", 8, 2, 1) == a).all()
    g = unit_points("grid", 4, 1, 0)[:, 0]
    assert list(g) == [0.125, 0.375, 0.625, 0.875]
    p = Param("optimizer.lr", 1e-3, 1e-1, log=True)
    assert p.value(0.5) == pytest.approx(1e-2) and p.on_edge(1.1e-3) and not p.on_edge(1e-2)


def test_holm_and_verdicts():
    adj = analyze.holm({"a": 0.01, "b": 0.04, "c": None, "d": 0.03})
    assert adj == {"a": 0.03, "b": 0.06, "c": None, "d": 0.06}
    cmp = analyze.compare([0.9, 0.91, 0.92], [0.8, 0.81, 0.8], "max", 0.05)
    assert cmp["delta"] == pytest.approx(0.1067, abs=1e-3) and cmp["prob_improvement"] == 1.0 and cmp["p"] < 0.01
    assert cmp["delta_ci"][0] > 0
    assert analyze.compare([0.9, 0.9], [0.8, 0.8], "max", 0.05)["p"] is None  # no variance: no p-value
    assert analyze.seeds_needed([0.9, 0.92, 0.91], [0.9, 0.91, 0.89], 0.005, 0.05) > 3
