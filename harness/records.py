"""One JSON record per run (``result.json`` in the run directory), written atomically.

The schema is documented in README.md ("Record schema"); bump ``SCHEMA_VERSION`` when a field
changes meaning, and teach ``harness.analysis.leaderboard`` to read the old version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import INFRA_ERRNOS, InfraFault, describe_os_error

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"

# config groups whose choice (and hyper-parameters) make up a "technique configuration"
TECHNIQUE_GROUPS = (
    "optimizer",
    "schedule",
    "precision",
    "clip",
    "normalization",
    "regularization",
    "calibration",
    "quantization",
)
# keys that never change what a run computes
VOLATILE_KEYS = ("results_dir", "data_dir", "resume", "logger", "sweep")
# trainer keys that are bookkeeping, not part of the task or the technique
TRAINER_BOOKKEEPING = ("eval_every", "checkpoint_every", "log_every", "progress", "target")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under umask 022);
    ``tempfile.mkstemp`` would give 0600, unreadable for the group on a shared results dir."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename, so a
    reader never sees a half-written file and a crash (or a full disk) never truncates an existing
    one. The file gets the umask's mode. A full disk or an I/O error raises ``InfraFault`` naming
    the path (``no space left on <path> (ENOSPC)``); the previous file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in INFRA_ERRNOS:
            raise InfraFault(e.errno, describe_os_error(e, path.parent)) from e
        raise
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in INFRA_ERRNOS:
            raise InfraFault(e.errno, describe_os_error(e, path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically. Raises ``InfraFault`` on a full disk (the record that was
    there before, if any, is kept)."""
    path = Path(run_dir) / RECORD_NAME
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_key(config: dict[str, Any]) -> str:
    """Hash of everything that determines a run's result (config minus volatile keys, seed
    included). Two runs with the same key are the same experiment: resume and
    ``sweep.skip_completed`` match on it."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    trainer = dict(stable.get("trainer", {}))
    for k in TRAINER_BOOKKEEPING:
        if k != "target":
            trainer.pop(k, None)
    stable["trainer"] = trainer
    return hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def technique_of(config: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """The technique configuration of a run: the choice of each technique group and its full
    hyper-parameters. The leaderboard aggregates seeds of runs with equal ``key``."""
    groups = {g: config.get(g) for g in TECHNIQUE_GROUPS if g in config}
    key = hashlib.sha1(json.dumps(groups, sort_keys=True, default=str).encode()).hexdigest()[:12]
    names = {g: choices.get(g, str((config.get(g) or {}).get("name", ""))) for g in TECHNIQUE_GROUPS}
    # "none" is the baseline of most groups, but normalization=none (no normalization at all) is a technique
    label = "+".join(
        v
        for g, v in names.items()
        if (v and v not in ("none", "default", "auto")) or g == "optimizer" or (g == "normalization" and v == "none")
    )
    return {"key": key, "label": label, "choices": names, "config": groups}


def task_of(config: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """The task of a run: model x dataset x budget. Only runs of one task are compared."""
    trainer = config.get("trainer", {})
    model = choices.get("model") or config["model"].get("name")
    dataset = choices.get("dataset") or config["dataset"].get("name")
    budget = f"{trainer.get('max_steps')}steps" if trainer.get("max_steps") else f"{trainer.get('epochs')}ep"
    return {
        "name": f"{model}-{dataset}",
        "model": model,
        "dataset": dataset,
        "budget": budget,
        "epochs": trainer.get("epochs"),
        "max_steps": trainer.get("max_steps"),
        "batch_size": trainer.get("batch_size"),
        "target": trainer.get("target"),
        "baseline": config.get("baseline"),
    }


def versions() -> dict[str, Any]:
    import torch

    import harness

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "harness": harness.__version__,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The commit of the harness checkout, with ``-dirty`` when it has local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
