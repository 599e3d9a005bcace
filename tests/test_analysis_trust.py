"""Leaderboards a reader can trust (issue 17) and leaderboard input/output failures (issue 14, items 8-12):
each case reproduced on hand-made records, with the fixed behaviour asserted on what a user sees."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_leaderboard import write_record  # tests/ is on sys.path under pytest

from harness.analysis import command
from harness.analysis import leaderboard as L
from harness.analysis import plots as P
from harness.analysis.report import task_markdown
from harness.records import technique_of


def row(board, label):
    t = board.table
    hit = t[t["label"] == label]
    assert len(hit) == 1, f"{label!r} not in {list(t['label'])}"
    return hit.iloc[0]


def cli(res: Path, *extra: str) -> int:
    return command.cli(["--results", str(res), "--out", str(res / "lb"), "--quiet", *extra])


# ----------------------------------------------------------------------------- comparability


def test_task_variants_with_different_val_size_are_never_pooled(tmp_path):
    """An Adam row read -0.51 (p = 0.03) until val_size=300 runs of the same task name were pooled in."""
    for s, (a, b) in enumerate([(0.90, 0.85), (0.91, 0.86), (0.92, 0.86)]):
        write_record(tmp_path, task="quickstart", opt="sgd", seed=s, metrics={"test_acc": a}, new=True)
        write_record(tmp_path, task="quickstart", opt="adam", seed=s, metrics={"test_acc": b}, new=True)
    small = {"name": "quickstart", "val_size": 300}
    for s, (a, b) in enumerate([(0.80, 0.86), (0.81, 0.87), (0.83, 0.88)]):
        write_record(tmp_path, task="quickstart", opt="sgd", seed=s, metrics={"test_acc": a}, dataset=small, new=True)
        write_record(tmp_path, task="quickstart", opt="adam", seed=s, metrics={"test_acc": b}, dataset=small, new=True)
    lb = L.build(tmp_path)
    assert len(lb.boards) == 2 and {b.name for b in lb.boards} == {"quickstart"}
    by_vs = {b.variant: b for b in lb.boards}
    assert set(by_vs) == {"dataset.val_size=0", "dataset.val_size=300"}
    full, held = by_vs["dataset.val_size=0"], by_vs["dataset.val_size=300"]
    assert row(full, "adam+cosine")["n"] == 3 and row(full, "adam+cosine")["delta"] == pytest.approx(-0.16 / 3)
    assert row(full, "adam+cosine")["delta"] < 0 < row(held, "adam+cosine")["delta"]
    assert "differ in dataset.val_size" in full.variant_note and "never compared" in full.variant_note
    assert cli(tmp_path, "--no-plots", "--format", "md") == 0
    readme = (tmp_path / "lb" / "README.md").read_text()
    assert "quickstart · 3ep · dataset.val_size=300" in readme and "quickstart · 3ep · dataset.val_size=0" in readme
    md_files = sorted(p.name for p in (tmp_path / "lb").glob("quickstart*.md"))
    assert len(md_files) == 2  # one file per variant, no overwrite
    assert "differ in dataset.val_size" in (tmp_path / "lb" / md_files[0]).read_text()


def test_legacy_records_are_split_by_their_config_and_join_new_records_of_the_same_task(tmp_path):
    """Records written before task.key: identity from the resolved config (subset, batch size)."""
    for s in range(3):
        write_record(tmp_path, task="resnet", seed=s, metrics={"test_acc": 0.9 + s / 100})
        write_record(tmp_path, task="resnet", seed=s, metrics={"test_acc": 0.5 + s / 100}, batch_size=64,
                     dataset={"name": "resnet", "val_size": 0, "train_subset": 500})  # fmt: skip
        write_record(tmp_path, task="resnet", seed=s + 10, metrics={"test_acc": 0.9 + s / 100}, new=True)
    lb = L.build(tmp_path)
    assert sorted(len(b.runs) for b in lb.boards) == [3, 6]  # legacy + new of one config together
    sub = next(b for b in lb.boards if len(b.runs) == 3)
    assert "train_subset" in sub.variant and "batch_size=64" in sub.variant
    assert any("no task key" in n for b in lb.boards for n in b.notes)


# ----------------------------------------------------------------------------- one experiment, one sample


def test_duplicate_run_keys_count_once_newest_kept_and_listed(tmp_path):
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(tmp_path, seed=s, metrics={"test_acc": a}, run_key=f"k{s}", finished_at="2025-01-01T00:00:00Z")
    dup = write_record(tmp_path, seed=0, metrics={"test_acc": 0.50}, run_key="k0", finished_at="2025-01-02T00:00:00Z")
    lb = L.build(tmp_path)
    (b,) = lb.boards
    r = row(b, "sgd+cosine")
    assert r["n"] == 3  # not 4
    assert r["mean"] == pytest.approx((0.50 + 0.91 + 0.92) / 3)  # the newest record of k0 is the sample
    assert lb.n_records == 4 and len(lb.duplicates) == 1 and lb.duplicates[0].kept.path == str(dup)
    assert cli(tmp_path, "--no-plots", "--format", "md") == 0
    md = (tmp_path / "lb" / "net-data_3ep.md").read_text()
    assert "## Duplicate records" in md and "1 duplicate records not counted" in md
    assert "4 records (0 skipped, 1 duplicates not counted)" in (tmp_path / "lb" / "README.md").read_text()


def test_runs_from_different_numerics_environments_are_noted(tmp_path):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9}, new=True)
    write_record(tmp_path, seed=5, metrics={"test_acc": 0.9}, new=True,
                 environment={"device": "cpu", "threads": 1, "deterministic": False})  # fmt: skip
    (b,) = L.build(tmp_path).boards
    assert any("threads=1" in n and "threads=2" in n for n in b.notes)


# ----------------------------------------------------------------------------- labels


def test_labels_do_not_drift_as_records_accumulate(tmp_path):
    for s in range(3):
        write_record(tmp_path, opt="adamw", seed=s, metrics={"test_acc": 0.9})
    before = {b.name: set(b.table["label"]) for b in L.build(tmp_path).boards}
    # a GPT-2 run on another task with other AdamW hyper-parameters and warmup
    write_record(tmp_path, opt="adamw", task="gpt2", lr=6e-4, seed=0, metrics={"test_ppl": 40.0},
                 model={"name": "gpt2_tiny", "family": "transformer"})  # fmt: skip
    lb = L.build(tmp_path)
    after = {b.name: set(b.table["label"]) for b in lb.boards}
    assert after["net-data"] == before["net-data"] == {"adamw+cosine"}
    assert after["gpt2"] == {"adamw+cosine (lr=0.0006)"}


def test_normalization_none_and_default_equivalents(tmp_path):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9})  # normalization=default
        write_record(tmp_path, seed=s + 3, metrics={"test_acc": 0.9}, extra={"normalization": "batchnorm"})
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.5}, extra={"normalization": "none"})
    (b,) = L.build(tmp_path).boards
    assert set(b.table["label"]) == {"sgd+cosine", "sgd+cosine+normalization=none"}
    assert row(b, "sgd+cosine")["n"] == 6  # batchnorm on a CNN is the CNN's own normalization: one row


def test_technique_of_is_independent_of_other_records_and_names_only_changed_hyperparameters():
    cfg = {"model": {"family": "cnn"}, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}
    cfg["schedule"] = {"name": "cosine", "warmup_epochs": 1, "warmup_steps": None, "min_lr_ratio": 0.0}
    t = technique_of(cfg, {"optimizer": "sgd", "schedule": "cosine"})
    assert t["label"] == "sgd+cosine" and re.fullmatch(r"[0-9a-f]{12}", t["key"])
    cfg["optimizer"]["lr"] = 0.05
    cfg["schedule"]["warmup_steps"] = 100
    assert (
        technique_of(cfg, {"optimizer": "sgd", "schedule": "cosine"})["label"]
        == "sgd+cosine (lr=0.05, warmup_steps=100)"
    )
    cfg["optimizer"]["description"] = "edited prose"  # prose never changes the key
    assert (
        technique_of(cfg, {"optimizer": "sgd", "schedule": "cosine"})["key"]
        == technique_of(
            {**cfg, "optimizer": {**cfg["optimizer"], "description": "other"}},
            {"optimizer": "sgd", "schedule": "cosine"},
        )["key"]
    )


# ----------------------------------------------------------------------------- statistics


def test_zero_variance_group_gets_no_p_value(tmp_path):
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a})
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.97})  # identical: no variance
    (b,) = L.build(tmp_path).boards
    r = row(b, "adam+cosine")
    assert np.isnan(r["p_value"]) and r["mark"] == "" and r["p_note"] == "no variance"
    assert r["delta"] == pytest.approx(0.06)
    assert b.n_comparisons == 0
    line = next(x for x in task_markdown(b, {}).splitlines() if "| adam+cosine |" in x)
    assert "— (no variance)" in line and "▲" not in line


def test_single_seed_rows_are_shown_apart_unranked_and_never_starred(tmp_path):
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a}, total_s=30.0, new=True)
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": a - 0.01}, total_s=40.0, new=True)
    # one seed, best accuracy and fastest: it would dominate everything
    write_record(tmp_path, opt="lion", seed=0, metrics={"test_acc": 0.99}, total_s=5.0, new=True)
    (b,) = L.build(tmp_path).boards
    lion = row(b, "lion+cosine")
    assert not lion["ranked"] and np.isnan(lion["rank"]) and not lion["pareto"] and lion["mark"] == ""
    assert list(b.table["label"])[:2] == ["sgd+cosine", "adam+cosine"] and list(b.table["rank"][:2]) == [1, 2]
    assert row(b, "sgd+cosine")["pareto"]
    md = task_markdown(b, {})
    main, apart = md.split("## Fewer than 3 seeds (not ranked)")
    assert "lion+cosine" not in main.split("## Runs")[0] and "| — | lion+cosine |" in apart
    assert "★" not in next(x for x in apart.splitlines() if "| lion+cosine |" in x)


def test_task_min_seeds_from_the_record(tmp_path):
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a}, new=True, min_seeds=5)
    (b,) = L.build(tmp_path).boards
    assert b.min_seeds == 5 and not row(b, "sgd+cosine")["ranked"] and "fewer than 5 seeds" in b.baseline_note


def test_accuracy_intervals_stay_within_0_and_100_percent(tmp_path):
    """Two ResNet runs were reported with a 95% interval of [-4.92, 35.74] %."""
    for s, a in enumerate([0.001, 0.30, 0.02]):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a})
    for s, a in enumerate([0.999, 0.60, 1.0]):
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": a})
    (b,) = L.build(tmp_path).boards
    for label in ("sgd+cosine", "adam+cosine"):
        r = row(b, label)
        t_lo, t_hi = stats.t.interval(0.95, 2, loc=r["mean"], scale=r["std"] / np.sqrt(3))
        assert t_lo < 0 or t_hi > 1  # what a t interval would have shown
        assert 0 <= r["ci_lo"] <= r["mean"] <= r["ci_hi"] <= 1
    adam = row(b, "adam+cosine")
    assert -row(b, "sgd+cosine")["mean"] <= adam["delta_lo"] and adam["delta_hi"] <= 1 - row(b, "sgd+cosine")["mean"]
    md = task_markdown(b, {})
    found = re.findall(r"\| \[(-?[\d.]+), (-?[\d.]+)\] \|", md)
    assert len(found) == 2
    for lo, hi in found:
        assert 0 <= float(lo) <= float(hi) <= 100


def test_holm_correction_over_the_tables_comparisons(tmp_path, capsys):
    """Five comparisons, each with a raw p-value just under 0.05: none survives Holm."""
    base = [0.900, 0.905, 0.910, 0.915]
    for s, a in enumerate(base):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": a})
    opts = ["adam", "adamw", "lion", "nadam", "radam"]
    for i, o in enumerate(opts):
        for s, a in enumerate(base):
            write_record(tmp_path, opt=o, seed=s, metrics={"test_acc": a + 0.0118 + 0.0001 * i})
    (b,) = L.build(tmp_path).boards
    t = b.table[~b.table["is_baseline"]]
    assert b.n_comparisons == 5 and (t["p_value"] < 0.05).all()
    raw = np.sort(t["p_value"].to_numpy())
    holm = np.minimum(1, np.maximum.accumulate(raw * (5 - np.arange(5))))
    assert np.sort(t["p_adj"].to_numpy()) == pytest.approx(holm)
    assert (t["p_adj"] >= 0.05).all() and (t["mark"] == "").all()
    assert "Holm-Bonferroni-adjusted over the 5 comparisons" in task_markdown(b, {})
    (b,) = L.build(tmp_path, correction="bh").boards
    t = b.table[~b.table["is_baseline"]]
    assert t["p_adj"].to_numpy() == pytest.approx(stats.false_discovery_control(t["p_value"].to_numpy()))
    with pytest.raises(SystemExit) as e:
        cli(tmp_path, "--no-plots", "--correction", "bonferroni")
    assert e.value.code == 2 and "'bonferroni'" in capsys.readouterr().err


def test_ranking_by_a_secondary_metric_keeps_the_primary_beside_it(tmp_path):
    for s in range(3):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": 0.9, "test_ece": 0.05 + s / 100}, new=True)
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.8, "test_ece": 0.02 + s / 100}, new=True)
    (b,) = L.build(tmp_path, metric="test_ece").boards
    assert b.metric == "test_ece" and not b.higher and b.primary == "test_acc"
    assert b.secondary[0] == "test_acc" and list(b.table["label"]) == ["adam+cosine", "sgd+cosine"]
    header = next(x for x in task_markdown(b, {}).splitlines() if x.startswith("| # |"))
    assert "test_ece [%] mean ± std" in header and "test_acc [%] (primary)" in header


def test_directions_are_read_from_the_record_not_guessed(tmp_path, capsys):
    # a metric whose name says nothing: "test_score_gap" with direction min in the record
    for s in range(3):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_score_gap": 3.0 + s}, new=True, task_metric="score_gap",
                     direction="min", directions={"test_score_gap": "min"})  # fmt: skip
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_score_gap": 1.0 + s}, new=True,
                     task_metric="score_gap", direction="min", directions={"test_score_gap": "min"})  # fmt: skip
    lb = L.build(tmp_path)
    (b,) = lb.boards
    assert b.metric == "test_score_gap" and not b.higher and list(b.table["label"])[0] == "adam+cosine"
    assert lb.warnings == []
    legacy = tmp_path / "legacy"
    for s in range(3):
        write_record(legacy, seed=s, metrics={"test_acc": 0.9})
    assert cli(legacy, "--no-plots") == 0
    assert "direction of test_acc is not in the records" in capsys.readouterr().err


def test_calibrators_before_after_and_delta_vs_baseline(tmp_path):
    for s in range(3):
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": 0.9, "test_ece": 0.08 + s / 1000,
                     "test_nll": 0.40 + s / 100}, new=True)  # fmt: skip
        m = {"test_acc": 0.9, "test_ece": 0.08 + s / 1000, "test_nll": 0.40 + s / 100}
        for c, e in (("temperature", 0.02), ("vector", 0.03), ("isotonic", 0.01)):
            m |= {f"test_ece_after_{c}": e + s / 1000, f"test_nll_after_{c}": 0.30 + s / 100}
        write_record(tmp_path, opt="sgd", seed=s, metrics=m, new=True,
                     extra={"calibration": ["temperature", "vector", "isotonic"]})  # fmt: skip
    (b,) = L.build(tmp_path).boards
    t = b.calibration
    assert sorted(t["calibrator"]) == ["isotonic", "temperature", "vector"]
    temp = t[t["calibrator"] == "temperature"].iloc[0]
    assert temp["test_ece_before"] == pytest.approx(0.081) and temp["test_ece_after"] == pytest.approx(0.021)
    assert temp["test_ece_delta"] == pytest.approx(-0.06) and temp["test_ece_mark"] == "▲"
    assert temp["test_nll_delta"] == pytest.approx(-0.10)
    assert cli(tmp_path, "--no-plots", "--format", "md,html") == 0
    md = next((tmp_path / "lb").glob("net-data*.md")).read_text()
    assert "## Post-hoc calibration" in md
    line = next(x for x in md.splitlines() if "| isotonic |" in x)
    assert "8.10 | 1.10 | -7.00" in line
    assert "Post-hoc calibration" in (tmp_path / "lb" / "index.html").read_text()


def test_study_tuning_budget_is_shown(tmp_path):
    for s in range(3):
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.9},
                     study={"name": "opt", "arm": "adam", "phase": "seed", "budget": 16})  # fmt: skip
        write_record(tmp_path, opt="sgd", seed=s, metrics={"test_acc": 0.9})
    (b,) = L.build(tmp_path).boards
    assert "| 16 trials |" in task_markdown(b, {})


# ----------------------------------------------------------------------------- issue 14: input and output


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("timing", "fast", "field timing is a string"),
        ("memory", 12, "field memory is an integer"),
        ("curve", {"epoch": 1}, "field curve is an object"),
        ("technique.config", "adamw", "field technique.config is a string"),
        ("metric_directions", {"test_acc": "up"}, "metric_directions.test_acc is 'up'"),
    ],
)
def test_wrongly_typed_fields_are_reported_and_skipped(tmp_path, capsys, field, value, message):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9})
    bad = write_record(tmp_path, opt="adam", seed=0, metrics={"test_acc": 0.5})
    rec = json.loads(bad.read_text())
    parent, _, child = field.rpartition(".")
    (rec[parent] if parent else rec)[child] = value
    bad.write_text(json.dumps(rec))
    assert cli(tmp_path, "--format", "md,html,csv") == 0
    err = capsys.readouterr().err
    assert f"skipped {bad}: {message}" in err
    assert "adam+cosine" not in (tmp_path / "lb" / "net-data_3ep.md").read_text()
    assert "## Skipped records" in (tmp_path / "lb" / "README.md").read_text()


def test_mathtext_in_a_label_is_plotted_as_text(tmp_path):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9 + s / 100})
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.8 + s / 100}, extra={"regularization": r"cost $\foo$"})
    assert cli(tmp_path, "--format", "html") == 0
    svg = (tmp_path / "lb" / "plots" / "net-data_3ep_delta.svg").read_text()
    assert r"cost $\foo$" in svg  # the literal text, not a parsed formula


def test_markdown_index_escapes_task_titles(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    for s in range(3):
        write_record(tmp_path, seed=s, task=evil, metrics={"test_acc": 0.9})
    assert cli(tmp_path, "--no-plots", "--format", "md") == 0
    readme = (tmp_path / "lb" / "README.md").read_text()
    assert "<img" not in readme and "&lt;img src=x onerror=alert(1)>" in readme


def test_plot_files_and_cache_stamps_are_written_by_rename(tmp_path, monkeypatch):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9 + s / 100})
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.8 + s / 100})
    renamed, real = [], os.replace

    def spy(src, dst):
        renamed.append(Path(dst).name)
        assert Path(src).stat().st_size > 0  # the complete file exists before it takes the name
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    monkeypatch.setattr(command.report.mp, "get_all_start_methods", lambda: [])  # plots in this process
    assert cli(tmp_path, "--format", "md") == 0
    files = [p for p in (tmp_path / "lb" / "plots").rglob("*") if p.is_file()]
    assert files and all(p.name in renamed for p in files), set(p.name for p in files) - set(renamed)
    assert any(p.parent.name == ".cache" for p in files)
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_out_that_is_a_file_or_unwritable_exits_2_before_any_work(tmp_path, capsys):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.9})
    f = tmp_path / "a_file"
    f.write_text("x")
    assert command.cli(["--results", str(tmp_path), "--out", str(f)]) == 2
    assert f"--out '{f}' is a file, not a directory" in capsys.readouterr().err
    assert command.cli(["--results", str(tmp_path), "--out", str(f / "sub")]) == 2
    assert f"--out '{f / 'sub'}' is not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert command.cli(["--results", str(tmp_path), "--out", str(ro)]) == 2
        assert "is not writable" in capsys.readouterr().err
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- plots


def test_plots_use_table_units_outside_legends_steps_and_no_empty_panels(tmp_path):
    # two batch sizes in one task would be two tasks; differing epoch lengths inside one task come from
    # techniques (e.g. a different accumulation): simulate with steps per epoch 10 vs 20
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.90 + s / 100})
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.80 + s / 100},
                     curve=[{"epoch": e, "step": 20 * e, "train_loss": 1 / e, "test_acc": 0.3 * e} for e in (1, 2, 3)])  # fmt: skip
    (b,) = L.build(tmp_path).boards
    assert P._x_axis(b, P._shown(b)) == "step"
    fig_png = P.plot_delta(b, tmp_path / "delta")
    assert fig_png[:4] == b"\x89PNG"
    svg = (tmp_path / "delta.svg").read_text()
    assert "Δ test_acc [pp]" in svg  # percentage points, like the tables (-10.00), not fractions (-0.10)
    ticks = [float(t.replace("−", "-")) for t in re.findall(r"<text[^>]*>(−?[\d.]+)</text>", svg)]
    assert ticks and max(map(abs, ticks)) >= 4
    P.plot_curves(b, tmp_path / "curves")
    assert ">step<" in (tmp_path / "curves.svg").read_text()
    # one-epoch runs: every series is one point, the curves plot is omitted rather than drawn empty
    one = tmp_path / "one"
    for s in range(3):
        write_record(one, seed=s, metrics={"test_acc": 0.9}, budget="1ep",
                     curve=[{"epoch": 1, "step": 10, "train_loss": 0.5, "test_acc": 0.9}])  # fmt: skip
    (b1,) = L.build(one).boards
    assert P.plot_curves(b1, one / "curves") is None


def test_legend_is_outside_the_axes(tmp_path):
    for s in range(3):
        write_record(tmp_path, seed=s, metrics={"test_acc": 0.90 + s / 100})
        write_record(tmp_path, opt="adam", seed=s, metrics={"test_acc": 0.80 + s / 100})
    (b,) = L.build(tmp_path).boards
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn = {}
    real_save = P.save

    def keep(fig, stem):
        drawn[Path(stem).name] = fig
        return real_save(fig, stem)

    P.save, saved = keep, P.save
    try:
        P.plot_metric_vs_time(b, tmp_path / "mvt")
    finally:
        P.save = saved
    fig = drawn["mvt"]
    FigureCanvasAgg(fig)
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    leg = ax.get_legend().get_window_extent(r)
    axbox = ax.get_window_extent(r)
    assert leg.x0 >= axbox.x1 and leg.x1 <= fig.bbox.x1 + 1  # right of the axes, inside the figure
    assert {t.get_text() for t in ax.texts} >= {"sgd+cosine", "adam+cosine"}  # every point labelled


def test_rows_link_to_run_directories_and_hydra_configs(tmp_path):
    paths = [write_record(tmp_path, seed=s, metrics={"test_acc": 0.9}) for s in range(3)]
    (paths[0].parent / ".hydra").mkdir()
    (paths[0].parent / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert cli(tmp_path, "--no-plots", "--format", "md,html") == 0
    md = (tmp_path / "lb" / "net-data_3ep.md").read_text()
    run0 = f"../runs/2025-01-01/{paths[0].parent.name}"
    assert f"[s0](<{run0}>) ([config](<{run0}/.hydra/config.yaml>))" in md
    assert f"[s1](<../runs/2025-01-01/{paths[1].parent.name}>)" in md and "result.json>)" in md
    html = (tmp_path / "lb" / "index.html").read_text()
    assert f'href="{run0}/.hydra/config.yaml"' in html
