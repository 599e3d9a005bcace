"""Tasks as first-class objects: a model x dataset pair runs its own task (never CIFAR's defaults on a
language model), decisions read validation, memory is checked before data loads, and gradient
accumulation trains the same model as the full batch."""

from __future__ import annotations

import pytest

from harness.config import task_for, task_index
from harness.errors import ConfigError
from tests.conftest import harness, records
from tests.test_lm_e2e import grammar_text


@pytest.fixture
def wikitext_tree(tmp_path):
    d = tmp_path / "data" / "wikitext-2"
    d.mkdir(parents=True)
    for split, (n, seed) in {"train": (300, 0), "valid": (30, 1), "test": (30, 2)}.items():
        (d / f"wiki.{split}.tokens").write_text(grammar_text(n, seed), encoding="utf-8")
    return tmp_path / "data"


def test_every_task_names_its_pair_metric_and_direction():
    index = task_index()
    assert {"quickstart", "resnet18_cifar10", "gpt2_tiny_wikitext2", "gpt2_small_wikitext2"} <= set(index)
    assert task_for("gpt2_tiny", "wikitext2") == "gpt2_tiny_wikitext2"
    assert task_for("small_cnn", "digits") == "quickstart"
    with pytest.raises(ConfigError, match=r"(?s)model=resnet34 dataset=cifar10.*task=NAME.*quickstart"):
        task_for("resnet34", "cifar10")


def test_pair_without_a_task_is_refused_before_any_work(tmp_path):
    p = harness("run", "model=resnet34", f"results_dir={tmp_path}")
    assert p.returncode == 2
    assert "no task is registered for model=resnet34 dataset=cifar10" in p.stderr and "resnet18_cifar10" in p.stderr
    assert not any(tmp_path.iterdir())


def test_sweeping_models_without_tasks_is_refused(tmp_path):
    p = harness("run", "-m", "model=small_cnn,vit_tiny", "dataset=digits", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "task=" in p.stderr


def test_language_model_pair_runs_its_task_with_validation_target(tmp_path, wikitext_tree):
    p = harness(
        "run",
        "model=gpt2_tiny",
        "dataset=wikitext2",
        "dataset.context=16",
        "dataset.steps_per_epoch=10",
        "dataset.download=false",
        "trainer.max_steps=20",
        "trainer.progress=none",
        "task.target=100000",
        f"data_dir={wikitext_tree}",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    task = rec["task"]
    assert task["name"] == "gpt2_tiny_wikitext2" and task["batch_size"] == 16  # the LM task's budget, not CIFAR's 512
    assert (task["metric"], task["direction"], task["split"]) == ("ppl", "min", "val")
    assert rec["timing"]["target_metric"] == "val_ppl" and rec["timing"]["target_epoch"] == 1
    assert "test_ppl" in rec["metrics"] and "test_ppl" not in rec["curve"][0]  # test only at the end
    assert rec["metric_directions"]["test_ppl"] == "min"
    est = rec["memory"]
    assert est["estimated_peak_bytes"] > 0 and set(est["estimate_parts"]) >= {
        "parameters",
        "activations",
        "loss_logits",
    }


def test_over_budget_configuration_exits_2_with_the_estimate_before_data_loads(tmp_path):
    empty = tmp_path / "no-data"  # had the data been loaded, the error would be about missing WikiText
    p = harness(
        "run",
        "task=gpt2_small_wikitext2",
        "trainer.batch_size=512",
        "precision=fp32",
        "trainer.compile=false",
        f"data_dir={empty}",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "estimated peak memory" in p.stderr and "trainer.grad_accum_steps" in p.stderr
    assert "loss logits" in p.stderr  # the 512 x 1024 x 33,278 float32 logits are named
    assert not empty.exists() and not (tmp_path / "results").exists()


def test_calibration_needs_no_extra_flag_and_reports_before_and_after(tmp_path):
    p = harness(
        "run",
        "task=quickstart",
        "calibration=temperature",
        "trainer.epochs=3",
        "trainer.progress=none",
        f"results_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path)
    m = rec["metrics"]
    assert {"test_ece", "test_ece_after", "test_nll", "test_nll_after"} <= set(m)
    assert rec["techniques"]["calibration"]["params"]["temperature"] > 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path, wikitext_tree):
    """gpt2_tiny has no batch statistics and no dropout: 4 micro-batches of 4 give the loss curve of one
    batch of 16, to float tolerance."""
    curves = {}
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        p = harness(
            "run",
            "task=gpt2_tiny_wikitext2",
            "dataset.context=16",
            "dataset.steps_per_epoch=5",
            "dataset.download=false",
            "trainer.max_steps=15",
            "trainer.progress=none",
            "trainer.log_every=1",
            f"trainer.grad_accum_steps={accum}",
            f"data_dir={wikitext_tree}",
            f"results_dir={out}",
        )
        assert p.returncode == 0, p.stderr[-3000:]
        (rec,) = records(out)
        assert rec["config"]["trainer"]["grad_accum_steps"] == accum
        curves[accum] = [c["train_loss"] for c in rec["curve"]] + [rec["metrics"]["val_loss"]]
    assert curves[1] == pytest.approx(curves[4], rel=1e-5, abs=1e-6)
    assert curves[1][0] > curves[1][-1]  # it learned


def test_grad_accum_must_divide_the_batch(tmp_path):
    p = harness("run", "task=quickstart", "trainer.grad_accum_steps=5", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "divisible by trainer.grad_accum_steps=5" in p.stderr


def test_deterministic_flag_is_wired_and_part_of_the_run_key(tmp_path):
    keys = {}
    for det in ("false", "true"):
        p = harness(
            "run",
            "task=quickstart",
            "trainer.epochs=1",
            f"trainer.deterministic={det}",
            "trainer.progress=none",
            f"results_dir={tmp_path / det}",
        )
        assert p.returncode == 0, p.stderr[-3000:]
        (rec,) = records(tmp_path / det)
        assert rec["environment"]["deterministic"] is (det == "true")
        keys[det] = rec["run_key"]
    assert keys["false"] != keys["true"]
