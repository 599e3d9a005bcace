"""Small things a newcomer trips on: run --help, harness list descriptions, sweep directory names,
the SIGTERM message outside SLURM, README links that a clone can follow."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from harness.infra import preemption
from tests.conftest import ROOT, harness, records


def test_run_help_is_the_harness_help():
    p = harness("run", "--help")
    assert p.returncode == 0, p.stderr
    assert "powered by Hydra" not in p.stdout
    assert p.stdout.startswith("harness run") and "calibration=[temperature,vector,isotonic]" in p.stdout
    assert "optimizer:" in p.stdout and "task:" in p.stdout  # the groups and their choices


def test_list_has_a_whole_description_for_every_choice():
    p = harness("list")
    assert p.returncode == 0, p.stderr
    for line in p.stdout.splitlines():
        if line.startswith("  "):
            choice, _, desc = line.strip().partition(" ")
            assert desc.strip(), f"{choice} has no description"
            assert not desc.split("  [")[0].rstrip().endswith((":", ",", "(")), f"cut mid-sentence: {line}"


def test_sweep_directories_are_named_by_every_swept_key(tmp_path):
    p = harness(
        "run", "-m", "task=quickstart", "trainer.epochs=1", "trainer.progress=none",
        "normalization=default,groupnorm", "seed=3", f"results_dir={tmp_path}",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(Path(r["run_dir"]).name for r in records(tmp_path))
    assert names == ["0_small_cnn_digits_normalization=default", "1_small_cnn_digits_normalization=groupnorm"]


def test_sigterm_outside_slurm_does_not_promise_a_requeue(caplog):
    with caplog.at_level(logging.WARNING, logger="harness"), preemption.PreemptionGuard():
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
    assert "SIGTERM" in caplog.text and "requeue" not in caplog.text and "resume=true" in caplog.text


def test_readme_links_resolve_in_a_clone():
    text = (ROOT / "README.md").read_text()
    assert "../shared/" not in text and "2×3" not in text
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (ROOT / target).exists(), target
    assert "docs/techniques.md" in text and (ROOT / "docs" / "techniques.md").is_file()
