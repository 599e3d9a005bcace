"""A researcher's own techniques, outside the package: an optimizer, a clip technique (a class in the
researcher's own module) and a task, all in a temporary project directory, reached through
``hydra.searchpath=[file://my_conf]`` and ``plugins: [...]``; nothing of the package is touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, harness, records

MY_CLIP = '''
import torch
from harness.hooks import Technique

IMPORTED = []


class HalfClip(Technique):
    """Multiply every gradient by ``factor`` (a toy technique of the researcher's own package)."""

    name = "half_clip"

    def __init__(self, factor: float):
        if not 0 < factor <= 1:
            raise ValueError(f"factor={factor} must be in (0, 1]")
        self.factor = float(factor)
        self.steps = 0

    @torch.no_grad()
    def after_backward(self, model, ctx):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(self.factor)
        self.steps += 1

    def summary(self):
        return {"steps": self.steps, "factor": self.factor, "plugin_imported": bool(IMPORTED)}
'''

FILES = {
    "my_conf/optimizer/my_adopt.yaml": """
        # ADOPT from pytorch-optimizer, kept in the researcher's repository
        name: my_adopt
        description: "ADOPT: Adam variant that converges with any beta2"
        _target_: pytorch_optimizer.ADOPT
        lr: 1e-3
        betas: [0.9, 0.9999]
        weight_decay: 0.0
        paper: "Taniguchi et al. 2024, ADOPT"
    """,
    "my_conf/clip/half.yaml": """
        name: half
        _target_: my_pkg.clip.HalfClip
        description: "scale every gradient by a constant factor"
        factor: 0.5
    """,
    "my_conf/task/my_task.yaml": """
        # @package _global_
        defaults:
          - override /model: small_cnn
          - override /dataset: synthetic
        trainer:
          epochs: 2
          batch_size: 64
          eval_batch_size: 256
        dataset:
          train_size: 256
          test_size: 128
          image_size: 8
        task:
          name: my_task
          description: "small CNN on tiny synthetic images (the researcher's own task)"
          model: small_cnn
          dataset: synthetic
          metric: acc
          direction: max
          baseline:
            optimizer: sgd
            schedule: cosine
    """,
    "my_pkg/__init__.py": "",
    "my_pkg/clip.py": MY_CLIP,
    "my_pkg/register.py": "from my_pkg import clip\n\nclip.IMPORTED.append(True)\n",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for rel, text in FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return tmp_path


def console_harness(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``harness`` script (its sys.path does not start with the working directory)."""
    script = shutil.which("harness") or str(Path(sys.executable).parent / "harness")
    if not Path(script).is_file():
        pytest.skip("the harness console script is not installed")
    import os

    env = {**os.environ, "HARNESS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_own_optimizer_clip_and_task_from_a_project_directory(project):
    before = {p: p.stat().st_mtime for p in (ROOT / "conf").rglob("*.yaml")}
    p = console_harness(
        "run",
        "hydra.searchpath=[file://my_conf]",
        "model=small_cnn",  # the pair small_cnn x synthetic is registered by my_conf/task/my_task.yaml only
        "dataset=synthetic",
        "optimizer=my_adopt",
        "clip=half",
        "plugins=[my_pkg.register]",
        "trainer.progress=none",
        f"results_dir={project / 'results'}",
        cwd=project,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (rec,) = records(project / "results")
    assert rec["status"] == "ok"
    assert rec["task"]["name"] == "my_task" and rec["steps"] == 2 * 4
    assert rec["choices"]["optimizer"] == "my_adopt" and rec["choices"]["clip"] == "half"
    assert rec["config"]["optimizer"]["_target_"] == "pytorch_optimizer.ADOPT"
    clip = rec["techniques"]["clip"]
    assert clip["steps"] == 8 and clip["factor"] == 0.5 and clip["plugin_imported"] is True
    assert rec["config"]["plugins"] == ["my_pkg.register"]
    assert before == {p: p.stat().st_mtime for p in (ROOT / "conf").rglob("*.yaml")}  # the package untouched
    assert not (ROOT / "conf" / "optimizer" / "my_adopt.yaml").exists()


def test_list_and_validation_see_the_search_path(project):
    p = harness("list", "optimizer", "hydra.searchpath=[file://my_conf]", cwd=project)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("my_adopt"))
    assert "converges with any beta2" in line and "Taniguchi" in line
    assert "adamw" in p.stdout  # the package's own choices are still there
    p = harness("list", "task", "hydra.searchpath=[file://my_conf]", cwd=project)
    assert "my_task" in p.stdout
    # a typo in a user choice still gets the list of valid ones, the user's included
    p = harness("run", "hydra.searchpath=[file://my_conf]", "task=my_task", "optimizer=my_adpot", cwd=project)
    assert p.returncode == 2 and "my_adopt" in p.stderr and "Did you mean" in p.stderr
    # without the search path the choice is unknown, named as such
    p = harness("run", "task=quickstart", "optimizer=my_adopt", cwd=project)
    assert p.returncode == 2 and "unknown optimizer 'my_adopt'" in p.stderr
    # a search path that does not exist is named
    p = harness("run", "hydra.searchpath=[file://no_such_dir]", "task=quickstart", cwd=project)
    assert p.returncode == 2 and "no_such_dir" in p.stderr and "not a directory" in p.stderr


def test_a_plugin_that_cannot_be_imported_is_bad_input(project):
    p = harness("run", "task=quickstart", "plugins=[my_pkg.nope]", f"results_dir={project / 'results'}", cwd=project)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "plugins: cannot import 'my_pkg.nope'" in p.stderr
    assert not (project / "results").exists() or not list((project / "results").rglob("result.json"))
