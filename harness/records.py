"""One JSON record per run (``result.json`` in the run directory), written atomically.

The schema is documented in README.md ("Record schema"); bump ``SCHEMA_VERSION`` when a field
changes meaning, and teach ``harness.analysis.leaderboard`` to read the old version.
"""

from __future__ import annotations

import functools
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
# documentation keys of a group's node: never part of the run key
PROSE_KEYS_OF_GROUPS = ("description", "paper", "source", "checked_against", "notes")
# keys that never change what a run computes
VOLATILE_KEYS = ("results_dir", "data_dir", "resume", "logger", "sweep", "study", "study_run")
# trainer keys that are bookkeeping, not part of the task or the technique
TRAINER_BOOKKEEPING = ("eval_every", "checkpoint_every", "log_every", "progress", "memory_check")


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


def find_records(results_dir: Path, key: str, status: str | None = "ok") -> list[Path]:
    """Records under ``results_dir`` with this run key (and status, unless None)."""
    out = []
    for path in results_dir.glob(f"**/{RECORD_NAME}"):
        try:
            rec = read_record(path)
        except (OSError, ValueError):
            continue
        if rec.get("run_key") == key and (status is None or rec.get("status") == status):
            out.append(path)
    return out


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_key(config: dict[str, Any], environment: dict[str, Any] | None = None) -> str:
    """Hash of everything that determines a run's result: the config minus volatile keys (seed
    included) and the numerics environment (device type, thread count, deterministic algorithms), so
    two runs with one key give the same numbers on one kind of machine. Resume and
    ``sweep.skip_completed`` match on it; leaderboards count one record per key."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    for k, v in stable.items():  # prose (descriptions, papers) never changes what a run computes
        if isinstance(v, dict):
            stable[k] = {kk: vv for kk, vv in v.items() if kk not in PROSE_KEYS_OF_GROUPS}
    trainer = dict(stable.get("trainer", {}))
    for k in TRAINER_BOOKKEEPING:
        trainer.pop(k, None)
    stable["trainer"] = trainer
    if environment is not None:
        stable["environment"] = environment
    return hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


# prose in a group's YAML: never a difference between two techniques
PROSE_KEYS = frozenset({"paper", "description", "source", "name", "defaults"})
# the model's own normalization per model family: choosing it explicitly (with its YAML defaults) is the
# same model as normalization=default, so both are one technique
NATIVE_NORMALIZATION = {"cnn": "batchnorm", "transformer": "layernorm", "vit": "layernorm"}
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _choice_str(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "" if v is None else str(v)


def _is_neutral(group: str, choice: str) -> bool:
    """``default``/``auto``/``none`` mean "technique not used", except normalization=none (no normalization)."""
    return choice in ("", "default", "auto") or (choice == "none" and group != "normalization")


@functools.lru_cache(maxsize=512)
def choice_defaults(group: str, choice: str) -> dict[str, Any] | None:
    """The hyper-parameters of ``conf/<group>/<choice>.yaml`` (flattened, prose and interpolations left
    out), or None when the harness has no such file (a user's config search path, a list of choices)."""
    path = CONF_DIR / group / f"{choice}.yaml"
    if not choice or "," in choice or not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # an unreadable YAML: no defaults known, the label shows the choice only
        return None
    flat = _flat_params(raw if isinstance(raw, dict) else {})
    return {k: v for k, v in flat.items() if not (isinstance(v, str) and "${" in v)}


def _flat_params(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if not prefix and k in PROSE_KEYS:
            continue
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat_params(v, name))
        else:
            out[name] = v
    return out


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return fa == fb or abs(fa - fb) <= 1e-9 * max(abs(fa), abs(fb))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def technique_identity(
    groups: dict[str, Any], choices: dict[str, Any], model_family: str | None = None
) -> dict[str, Any]:
    """Key, label and canonical choices of a technique configuration, from its own config only.

    The label is the optimizer and schedule, then every other group whose choice is not neutral (``none``,
    ``default``, ``auto``; ``normalization=none`` is shown as such), then in parentheses the hyper-parameters
    that differ from that choice's defaults in ``conf/<group>/<choice>.yaml`` (qualified ``group.key`` only
    where two groups differ in a key of the same name). A choice equal to the model's own layers with its
    defaults (``normalization=batchnorm`` on a CNN) is ``default``. Nothing depends on which other records
    exist, so a label never changes as results accumulate. The key hashes the canonical choices and every
    hyper-parameter (prose left out)."""
    canon: dict[str, str] = {}
    diffs: dict[str, dict[str, Any]] = {}
    ident: dict[str, Any] = {}
    for g in TECHNIQUE_GROUPS:
        cfg = groups.get(g) if isinstance(groups.get(g), dict) else {}
        c = _choice_str(choices.get(g)) or _choice_str(cfg.get("name"))
        params = _flat_params(cfg)
        defaults = choice_defaults(g, c)
        d = {}
        if defaults is not None:
            d = {k: v for k, v in params.items() if k in defaults and not _same_value(v, defaults[k])}
        if g == "normalization" and not d and model_family and NATIVE_NORMALIZATION.get(model_family) == c:
            c, params = "default", {}
        canon[g] = c
        diffs[g] = d
        if c or params:
            ident[g] = {"choice": c, **params}
    parts = []
    for g in TECHNIQUE_GROUPS:
        c = canon.get(g, "")
        if g in ("optimizer", "schedule"):
            if c:
                parts.append(c)
        elif not _is_neutral(g, c) or diffs[g]:
            parts.append(f"{g}={c}" if c in ("none", "default", "auto", "") else c)
    names = [k for d in diffs.values() for k in d]
    hp = [f"{g + '.' + k if names.count(k) > 1 else k}={_fmt_value(v)}" for g, d in diffs.items() for k, v in d.items()]
    label = "+".join(parts) + (f" ({', '.join(hp)})" if hp else "")
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"key": key, "label": label, "choices": canon}


def technique_of(config: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """The technique configuration of a run: the choice of each technique group and its full
    hyper-parameters, with a stable key and label (``technique_identity``). The leaderboard aggregates
    seeds of runs with equal ``key``."""
    groups = {g: config.get(g) for g in TECHNIQUE_GROUPS if g in config}
    names = {g: _choice_str(choices.get(g)) or _choice_str((config.get(g) or {}).get("name")) for g in TECHNIQUE_GROUPS}
    family = (config.get("model") or {}).get("family") if isinstance(config.get("model"), dict) else None
    ident = technique_identity(groups, names, family)
    return {"key": ident["key"], "label": ident["label"], "choices": names, "config": groups}


def task_identity(config: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes what a baseline would score on a task: the resolved model and data
    (validation size, subsets, label noise, augmentation) and the budget. Runs are compared only
    within one identity."""
    trainer = config.get("trainer", {})
    prose = ("description", "paper", "source")
    dataset = {k: v for k, v in (config.get("dataset") or {}).items() if k not in ("download", "num_workers", *prose)}
    return {
        "model": {k: v for k, v in (config.get("model") or {}).items() if k not in prose},
        "dataset": dataset,
        "budget": {k: trainer.get(k) for k in ("epochs", "max_steps", "batch_size")},
    }


def task_of(config: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """The task of a run (conf/task/<name>.yaml, with any model/dataset/budget overrides): what is
    measured, in which direction, on which split, and the identity that decides comparability."""
    task = config.get("task") or {}
    trainer = config.get("trainer", {})
    model = choices.get("model") or config["model"].get("name")
    dataset = choices.get("dataset") or config["dataset"].get("name")
    budget = f"{trainer.get('max_steps')}steps" if trainer.get("max_steps") else f"{trainer.get('epochs')}ep"
    identity = task_identity(config)
    return {
        "name": task.get("name") or f"{model}-{dataset}",
        "model": model,
        "dataset": dataset,
        "budget": budget,
        "epochs": trainer.get("epochs"),
        "max_steps": trainer.get("max_steps"),
        "batch_size": trainer.get("batch_size"),
        "metric": task.get("metric", "acc"),
        "direction": task.get("direction", "max"),
        "split": task.get("split", "val"),
        "report_split": task.get("report_split", "test"),
        "target": task.get("target"),
        "min_seeds": task.get("min_seeds", 3),
        "baseline": task.get("baseline"),
        "identity": identity,
        "key": hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12],
    }


# direction of every metric the harness reports, by its name without the split prefix
METRIC_DIRECTIONS = {
    "acc": "max",
    "top5": "max",
    "loss": "min",
    "ppl": "min",
    "ece": "min",
    "ece_adaptive": "min",
    "mce": "min",
    "ece_classwise": "min",
    "eaurc": "min",
    "nll": "min",
    "brier": "min",
    "aurc": "min",
}


def metric_directions(metrics: dict[str, Any], task: Any) -> dict[str, str]:
    """``{metric: "max" | "min"}`` for each reported metric whose direction is known: the task's own
    metric takes the task's direction; others by their base name (``test_ece_after_temperature`` is an
    ``ece``). Consumers read directions from the record, never from a name."""
    out = {}
    own = f"{task.get('metric', 'acc')}"
    for name in metrics:
        base = name.split("_", 1)[1] if name.startswith(("train_", "val_", "test_")) else name
        base = base.split("_after")[0]
        if base == own:
            out[name] = task.get("direction", "max")
        elif base in METRIC_DIRECTIONS:
            out[name] = METRIC_DIRECTIONS[base]
    return out


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
    """The commit of the harness checkout, with ``-dirty`` when its code or configs have local changes
    (outputs under ``results/`` do not count)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
