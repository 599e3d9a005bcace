"""Shared helpers: run the real CLI in a subprocess and read the records it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def harness(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``harness <args>`` as a user would (``python -m harness`` so the test's interpreter is used)."""
    # one intra-op thread per run: the suite runs two test workers on two cores (pytest -n 2), and the tests'
    # small models gain nothing from a second thread
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("**/result.json"))]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and LBFGS on tiny problems gain nothing from intra-op threads; on 2 shared cores one
    thread is several times faster. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> Path:
    """CIFAR-10 rebuilt once per session in the official pickle layout from the shared JPEG copy."""
    script = SHARED_DATA / "cifar10_to_batches.py"
    if not script.is_file():
        pytest.skip(f"real CIFAR-10 not available: {script} is absent")
    out = tmp_path_factory.mktemp("cifar10_real")
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out
