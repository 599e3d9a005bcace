"""Leaderboard statistics and outputs on hand-made records with known answers."""

import csv
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from harness.analysis import command
from harness.analysis import leaderboard as L
from harness.analysis.plots import ece_from_bins, reliability_diagram
from harness.metrics.calibration import reliability_bins
from harness.records import metric_directions, task_identity

NEUTRAL = {"precision": "auto", "clip": "none", "normalization": "default", "regularization": "none"}
NEUTRAL |= {"calibration": "none", "quantization": "none"}
CONF = Path(__file__).resolve().parents[1] / "conf"
_N = itertools.count()


def yaml_config(group, choice):
    """A group's config as Hydra resolves it: the choice's YAML (or just its name for an unknown choice)."""
    path = CONF / group / f"{choice}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {"name": choice}


def write_record(root: Path, *, opt="sgd", sched="cosine", seed=0, metrics=None, status="ok", task="net-data",
                 budget="3ep", lr=None, label=None, baseline=None, ttt=None, total_s=10.0, error=None, extra=None,
                 schema_version=1, dataset=None, model=None, batch_size=32, run_key=None, finished_at=None,
                 environment=None, new=False, min_seeds=None, study=None, curve=None, directions=None,
                 task_metric="acc", direction="max"):  # fmt: skip
    """One schema-1 record under root/runs/... (what harness.records writes). ``new=True`` adds the fields of
    the task/technique contract (task key, identity, metric and direction, metric_directions, environment);
    without it the record is a legacy one."""
    choices = {"optimizer": opt, "schedule": sched, **NEUTRAL, **(extra or {})}
    tconfig = {g: yaml_config(g, v) for g, v in choices.items()}
    if lr is not None:
        tconfig["optimizer"]["lr"] = lr
    key = hashlib.sha1(json.dumps(tconfig, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = root / "runs" / "2025-01-01" / f"{next(_N):04d}_{task}_{budget}_{opt}_{sched}_s{seed}"
    model = model or {"name": "net", "family": "cnn", "width": 8}
    dataset = dataset or {"name": task, "val_size": 0}
    epochs = int(budget[:-2]) if budget.endswith("ep") else None
    config = {"seed": seed, "model": model, "dataset": dataset, **tconfig,
              "trainer": {"epochs": epochs, "max_steps": None, "batch_size": batch_size}}  # fmt: skip
    rec = {
        "schema_version": schema_version,
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "status": status,
        "error": error,
        "config": config,
        "choices": choices,
        "task": {"name": task, "budget": budget, "epochs": epochs, "max_steps": None, "batch_size": batch_size,
                 "target": 0.9,
                 "baseline": {"optimizer": "sgd", "schedule": "cosine"} if baseline is None else baseline},
        "technique": {"key": key, "label": label or f"{opt}+{sched}", "choices": choices, "config": tconfig},
        "run_key": run_key or hashlib.sha1(run_dir.name.encode()).hexdigest()[:16],
        "seed": seed,
        "metrics": metrics or {},
        "curve": curve if curve is not None else
                 [{"epoch": e, "step": 10 * e, "time_s": e, "lr": 0.1, "train_loss": 1.0 / e} for e in (1, 2, 3)],
        "timing": {"total_s": total_s, "train_s": total_s, "eval_s": 0.0, "time_to_target_s": ttt},
        "throughput": {"samples_per_s": 1000.0},
        "memory": {"peak_bytes": 2**20},
    }  # fmt: skip
    if finished_at:
        rec["finished_at"] = finished_at
    if new:
        identity = task_identity(config)
        rec["task"] |= {"metric": task_metric, "direction": direction, "split": "val", "report_split": "test",
                        "min_seeds": min_seeds or 3, "identity": identity,
                        "key": hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}  # fmt: skip
        rec["metric_directions"] = directions or metric_directions(rec["metrics"], rec["task"])
        rec["environment"] = environment or {"device": "cpu", "threads": 2, "deterministic": False}
    elif environment:
        rec["environment"] = environment
    if study:
        rec["study"] = study
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(rec))
    return run_dir / "result.json"


BASE = [0.90, 0.91, 0.92]
ADAMW = [0.93, 0.95, 0.94, 0.96]


@pytest.fixture
def two_configs(tmp_path):
    for s, a in enumerate(BASE):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a, "test_ece": 0.05})
    for s, a in enumerate(ADAMW):
        write_record(tmp_path, opt="adamw", seed=s, metrics={"test_acc": a, "test_ece": 0.03})
    return tmp_path


def row(board, label):
    t = board.table
    return t[t["label"] == label].iloc[0]


def test_aggregation_matches_scipy_and_hand_values(two_configs):
    lb = L.build(two_configs)
    (b,) = lb.boards
    assert b.metric == "test_acc" and b.higher and lb.n_records == 7
    base = row(b, "sgd+cosine")
    assert base["is_baseline"] and base["n"] == 3
    assert base["mean"] == pytest.approx(0.91) and base["std"] == pytest.approx(0.01)
    # accuracy is a proportion: BCa bootstrap interval (scipy), inside the data's range
    ref = stats.bootstrap((np.array(BASE),), np.mean, n_resamples=L.N_BOOT, method="BCa", rng=np.random.default_rng(1))
    assert 0.90 <= base["ci_lo"] < 0.91 < base["ci_hi"] <= 0.92
    assert base["ci_lo"] == pytest.approx(ref.confidence_interval.low, abs=0.003)

    a = row(b, "adamw+cosine")
    ref = stats.ttest_ind(ADAMW, BASE, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert a["delta"] == pytest.approx(np.mean(ADAMW) - np.mean(BASE))
    assert a["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert a["p_adj"] == pytest.approx(ref.pvalue, rel=1e-9)  # one comparison: Holm changes nothing
    assert (a["delta_lo"], a["delta_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert a["std"] == pytest.approx(np.std(ADAMW, ddof=1))
    assert a["test_ece_mean"] == pytest.approx(0.03)
    # best first
    assert list(b.table["label"]) == ["adamw+cosine", "sgd+cosine"]


def test_t_interval_for_unbounded_metrics_matches_hand_value():
    # t_{0.975, 2} = 4.302653, half width = 4.302653 * 1.0 / sqrt(3) = 2.48414
    lo, hi = L.mean_interval([30.0, 31.0, 32.0])
    assert (hi - 31.0) == pytest.approx(2.48414, abs=1e-5) and (lo + hi) / 2 == pytest.approx(31.0)
    assert (lo, hi) == pytest.approx(stats.t.interval(0.95, 2, loc=31.0, scale=1 / math.sqrt(3)))


def test_compare_equals_scipy_welch_on_random_samples():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, c = rng.normal(0, 1, rng.integers(2, 9)), rng.normal(0.5, 2, rng.integers(2, 9))
        w = L.compare(a, c)
        ref = stats.ttest_ind(a, c, equal_var=False)
        assert w["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert w["delta_lo"] == pytest.approx(ref.confidence_interval(0.95).low, rel=1e-9)
    assert not hasattr(L, "welch") and not hasattr(L, "summarize")  # the hand-written versions are gone


def test_significance_mark_and_small_n_warning(tmp_path):
    for s, a in enumerate(BASE):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a})
    for s, a in enumerate([0.96, 0.97, 0.98]):  # clearly better
        write_record(tmp_path, opt="adamw", seed=s, metrics={"test_acc": a})
    for s, a in enumerate([0.905, 0.915, 0.92]):  # indistinguishable
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": a})
    for s, a in enumerate([0.80, 0.81, 0.79]):  # clearly worse
        write_record(tmp_path, opt="lion", seed=s, metrics={"test_acc": a})
    for s, a in enumerate([0.99, 0.99]):  # two seeds only
        write_record(tmp_path, opt="adamp", seed=s, metrics={"test_acc": a})
    (b,) = L.build(tmp_path).boards
    assert row(b, "adamw+cosine")["mark"] == "▲" and row(b, "adamw+cosine")["significant"]
    assert row(b, "adam+cosine")["mark"] == "" and not row(b, "adam+cosine")["significant"]
    assert row(b, "lion+cosine")["mark"] == "▼" and row(b, "lion+cosine")["better"] is False
    assert row(b, "adamp+cosine")["warning"] == "n=2<3" and row(b, "adamw+cosine")["warning"] == ""
    from harness.analysis.report import task_markdown

    md = task_markdown(b, {})
    line = next(x for x in md.splitlines() if x.startswith("| — | adamp+cosine |"))
    assert "⚠ n<3" in line
    assert "▲" in next(x for x in md.splitlines() if "| adamw+cosine |" in x)


def test_lm_lower_is_better_and_baseline_from_record(tmp_path):
    spec = {"optimizer": "adamw", "schedule": "cosine"}
    for s, p in enumerate([30.0, 31.0, 32.0]):
        write_record(tmp_path, opt="adamw", seed=s, metrics={"val_ppl": p + 1, "test_ppl": p}, baseline=spec)
    for s, p in enumerate([25.0, 25.5, 26.0]):  # lower perplexity: better, negative delta
        write_record(tmp_path, opt="lion", seed=s, metrics={"val_ppl": p + 1, "test_ppl": p}, baseline=spec)
    for s, p in enumerate([24.0, 24.5, 25.0]):  # adamw+cosine with clipping: not the baseline
        write_record(tmp_path, opt="adamw", seed=s, metrics={"test_ppl": p}, baseline=spec,
                     extra={"clip": "norm"})  # fmt: skip
    (b,) = L.build(tmp_path).boards
    assert b.metric == "test_ppl" and not b.higher
    assert row(b, "adamw+cosine")["is_baseline"]
    lion = row(b, "lion+cosine")
    assert lion["delta"] == pytest.approx(-5.5) and lion["mark"] == "▲" and lion["better"] is True
    assert list(b.table["label"])[0] == "adamw+cosine+norm"  # lowest perplexity first
    # --baseline overrides the record's baseline; --metric overrides the primary metric
    (b,) = L.build(tmp_path, baseline="lion+cosine", metric="val_ppl").boards
    assert row(b, "lion+cosine")["is_baseline"] and b.metric == "val_ppl"
    assert row(b, "adamw+cosine")["delta"] == pytest.approx(5.5)


def test_baseline_hyperparameters_and_label_disambiguation(tmp_path):
    spec = {"optimizer": "sgd", "schedule": "cosine", "lr": 0.05, "weight_decay": 5e-4}
    for lr, accs in ((0.1, [0.5, 0.6, 0.7]), (0.05, [0.8, 0.81, 0.82])):
        for s, a in enumerate(accs):
            write_record(tmp_path, opt="sgd", lr=lr, seed=s, metrics={"test_acc": a}, baseline=spec)
    (b,) = L.build(tmp_path).boards
    labels = set(b.table["label"])
    # sgd's YAML default lr is 0.1: only the other lr is named
    assert labels == {"sgd+cosine", "sgd+cosine (lr=0.05)"}
    assert row(b, "sgd+cosine (lr=0.05)")["is_baseline"]
    assert row(b, "sgd+cosine")["delta"] < 0


def test_failed_and_diverged_are_counted_and_listed(two_configs):
    write_record(two_configs, opt="adamw", seed=7, status="failed", error="RuntimeError: CUDA out of memory")
    write_record(two_configs, opt="adamw", seed=8, status="diverged", error="loss is nan at step 12",
                 metrics={"test_acc": 0.1})  # fmt: skip
    out = two_configs / "lb"
    assert (
        command.cli(["--results", str(two_configs), "--out", str(out), "--format", "md,csv", "--no-plots", "--quiet"])
        == 0
    )
    (b,) = L.build(two_configs, skip=(str(out),)).boards
    a = row(b, "adamw+cosine")
    assert (a["ok"], a["diverged"], a["failed"], a["n"]) == (4, 1, 1, 4)  # a diverged 0.1 is not averaged in
    assert a["mean"] == pytest.approx(np.mean(ADAMW))
    md = (out / "net-data_3ep.md").read_text()
    assert "## Failed and diverged runs" in md and "CUDA out of memory" in md and "loss is nan at step 12" in md
    assert "4/1/1" in md
    assert "## Fewer than" not in md  # 4 ok seeds: ranked; the failed seeds do not count
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"adamw+cosine", "sgd+cosine"}
    assert next(r for r in rows if r["label"] == "adamw+cosine")["failed"] == "1"


def test_corrupt_and_unknown_schema_records_are_skipped_with_warning(two_configs, capsys):
    bad = two_configs / "runs" / "bad"
    bad.mkdir(parents=True)
    (bad / "result.json").write_text('{"schema_version": 1, "status": "ok", "met')  # truncated
    newer = write_record(two_configs, opt="lamb", seed=0, metrics={"test_acc": 0.99}, schema_version=2)
    old = write_record(two_configs, opt="lars", seed=0, metrics={"test_acc": 0.99})
    rec = json.loads(old.read_text())
    del rec["schema_version"]
    old.write_text(json.dumps(rec))
    out = two_configs / "lb"
    rc = command.cli(["--results", str(two_configs), "--out", str(out), "--format", "md", "--no-plots", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"skipped {bad / 'result.json'}: corrupt or truncated JSON" in err
    assert f"skipped {newer}: schema_version 2 is newer" in err
    assert f"skipped {old}: no schema_version" in err
    readme = (out / "README.md").read_text()
    assert "## Skipped records" in readme and "7 records (3 skipped)" in readme
    assert "lamb" not in (out / "net-data_3ep.md").read_text()


def test_cli_writes_every_format_and_rejects_bad_arguments(two_configs, capsys):
    write_record(two_configs, opt="sgd", task="other", seed=0, metrics={"test_acc": 0.5})
    out = two_configs / "lb"
    assert command.cli(["--results", str(two_configs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## net-data · 3ep" in printed and "| adamw+cosine |" in printed  # markdown when not a terminal
    for f in ("README.md", "net-data_3ep.md", "other_3ep.md", "leaderboard.csv", "index.html"):
        assert (out / f).stat().st_size > 0, f
    for kind in ("curves", "metric_vs_time", "delta"):
        assert (out / "plots" / f"net-data_3ep_{kind}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / "plots" / f"net-data_3ep_{kind}.svg").read_bytes()[:400]
    assert "[net-data · 3ep](<net-data_3ep.md>)" in (out / "README.md").read_text()

    out2 = two_configs / "lb2"
    assert command.cli(["--results", str(two_configs), "--out", str(out2), "--format", "csv", "--task", "other"]) == 0
    assert sorted(p.name for p in out2.iterdir() if p.is_file()) == ["leaderboard.csv"]
    capsys.readouterr()
    assert command.cli(["--results", str(two_configs), "--format", "pdf"]) == 2
    assert "pdf" in capsys.readouterr().err
    assert command.cli(["--results", str(two_configs), "--task", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "net-data" in err and "other" in err
    assert command.cli(["--results", str(two_configs), "--metric", "test_bleu"]) == 2
    assert "test_ece" in capsys.readouterr().err
    assert command.cli(["--results", str(two_configs / "missing")]) == 2


def test_performance_profile_scores_are_exact(tmp_path):
    # task a: sgd 100 s, adamw 200 s; task b: sgd 300 s, adamw 100 s -> ratios sgd (1, 3), adamw (2, 1)
    for task, tt in (("a", {"sgd": 100.0, "adamw": 200.0}), ("b", {"sgd": 300.0, "adamw": 100.0})):
        for opt, t in tt.items():
            for s in range(3):
                write_record(tmp_path, opt=opt, task=task, seed=s, metrics={"test_acc": 0.9}, ttt=t)
    write_record(tmp_path, opt="lion", task="a", seed=0, metrics={"test_acc": 0.5}, ttt=None)  # never reached
    write_record(tmp_path, opt="adam", task="b", seed=0, metrics={"test_acc": 0.9}, ttt=150.0)  # only run on b
    lb = L.build(tmp_path)
    score = dict(zip(lb.profile["label"], lb.profile["score"]))
    tasks = dict(zip(lb.profile["label"], lb.profile["tasks"]))
    assert lb.n_profile_tasks == 2
    assert score["sgd+cosine"] == pytest.approx(((4 - 1) + (4 - 3)) / (3 * 2))
    assert score["adamw+cosine"] == pytest.approx(((4 - 2) + (4 - 1)) / (3 * 2))
    assert score["lion+cosine"] == 0.0 and tasks["lion+cosine"] == 1
    # never run on task a: counted over the one task it was run on (ratio 1.5), not as failing task a
    assert tasks["adam+cosine"] == 1 and score["adam+cosine"] == pytest.approx((4 - 1.5) / 3)
    taus, rho = lb.profile_curves["sgd+cosine"]
    assert rho[np.searchsorted(taus, 2.0)] == 0.5 and rho[-1] == 1.0


def test_pareto_front():
    pts = np.array([[1.0, 1.0], [2.0, 0.5], [2.0, 2.0], [np.nan, 0.1]])
    assert list(L.pareto_front(pts)) == [True, True, False, False]


def test_reliability_bins_and_diagram(tmp_path):
    # two classes: top-label confidence c for class 0; correct when the label is 0
    conf = torch.tensor([0.55, 0.65, 0.95, 0.95, 0.91, 1.0])
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    b = reliability_bins(torch.stack([conf, 1 - conf], 1), labels, n_bins=10)
    assert b["count"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 4]
    assert b["accuracy"][9] == pytest.approx(0.75) and b["confidence"][9] == pytest.approx((0.95 * 2 + 0.91 + 1) / 4)
    # ECE = (1*0.55 + 1*0.65 + 4*|0.75-0.9525|) / 6
    assert ece_from_bins(b) == pytest.approx((0.55 + 0.65 + 4 * 0.2025) / 6)
    fig = reliability_diagram({"before": b, "after": b}, path=tmp_path / "rel")
    assert len(fig.axes[0].lines) == 3  # diagonal + two stages
    assert (tmp_path / "rel.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "rel.svg").exists()


def test_plots_of_unchanged_tasks_are_reused(two_configs):
    out = two_configs / "lb"
    args = ["--results", str(two_configs), "--out", str(out), "--format", "md", "--quiet"]
    assert command.cli(args) == 0
    png = out / "plots" / "net-data_3ep_delta.png"
    first = (png.stat().st_mtime_ns, png.read_bytes())
    assert command.cli(args) == 0
    assert png.stat().st_mtime_ns == first[0]  # nothing changed: not redrawn
    write_record(two_configs, opt="lion", seed=0, metrics={"test_acc": 0.5})
    write_record(two_configs, opt="lion", seed=1, metrics={"test_acc": 0.6})
    assert command.cli(args) == 0
    assert png.read_bytes() != first[1]  # a new configuration: the delta chart has another bar
    assert command.cli([*args, "--redraw"]) == 0 and png.stat().st_mtime_ns > first[0]


def test_task_where_every_run_failed_is_still_listed(two_configs, capsys):
    write_record(two_configs, opt="sgd", task="broken", seed=0, status="failed", error="ImportError: no module x")
    lb = L.build(two_configs)
    broken = next(b for b in lb.boards if b.name == "broken")
    assert broken.table["n"].tolist() == [0] and broken.table["failed"].tolist() == [1]
    assert [r.error for r in broken.bad_runs] == ["ImportError: no module x"]
    assert any("broken@3ep: none of test_acc" in w for w in lb.warnings)
    out = two_configs / "lb"
    assert command.cli(["--results", str(two_configs), "--out", str(out), "--no-plots", "--quiet"]) == 0
    assert "broken@3ep: none of test_acc" in capsys.readouterr().err
