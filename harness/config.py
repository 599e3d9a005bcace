"""Typed schema for the config (registered with Hydra's ConfigStore) and checks that run before
any work: a bad value fails with a message naming it, not halfway through a run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict  # noqa: UP035  (OmegaConf reads these annotations)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from harness.errors import ConfigError
from harness.schemas import DatasetConfig, ModelConfig, OptimizerConfig, ScheduleConfig, group_defaults

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = (
    "model",
    "dataset",
    "optimizer",
    "schedule",
    "precision",
    "trainer",
    "logger",
    "clip",
    "normalization",
    "regularization",
    "calibration",
    "quantization",
    "task",
    "study",
)


@dataclass
class TrainerConfig:
    """The training loop's settings. The budget (epochs / max_steps, batch sizes) is set by the task
    (conf/task/<name>.yaml); these are the fallbacks of a task that does not set them."""

    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps (replaces epochs as the budget)
    batch_size: int = 128  # global batch per optimizer step (all ranks, all accumulation micro-batches)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: each holds batch_size / grad_accum_steps samples
    eval_batch_size: int = 256
    eval_every: int = 1  # epochs between evaluations on the validation split (the last epoch is always evaluated)
    checkpoint_every: int = 1  # epochs between checkpoints; 0 disables checkpoints
    log_every: int = 50  # steps between progress updates (each one reads the loss from the device)
    compile: bool = False
    channels_last: bool = True  # CNNs on CUDA only
    progress: str = "auto"  # auto | bar | plain | none
    deterministic: bool = False  # torch.use_deterministic_algorithms and no cudnn autotuning (slower on GPU)
    memory_check: bool = True  # refuse a run whose estimated peak memory exceeds the device's before data loads


@dataclass
class BaselineConfig:
    optimizer: str = "sgd"
    schedule: str = "cosine"
    lr: float | None = None  # applied when the run uses the baseline optimizer and does not set optimizer.lr
    weight_decay: float | None = None


@dataclass
class TaskConfig:
    """A task: model x dataset x budget, the metric decisions are read on and the baseline recipe.
    ``conf/task/<name>.yaml`` sets these and the model, dataset and trainer budget of the task."""

    name: str = MISSING
    description: str = ""
    model: str = MISSING  # the model and dataset choices the task was defined with
    dataset: str = MISSING
    metric: str = "acc"  # acc | ppl (any metric the evaluation reports without its split prefix)
    direction: str = "max"  # max | min: whether a larger metric is better
    split: str = "val"  # decisions (time to target, selection, calibration fitting) read this split
    report_split: str = "test"  # the reported number
    target: float | None = None  # time to target: first evaluation whose <split>_<metric> reaches it
    min_seeds: int = 3  # leaderboards and studies rank a configuration only with at least this many seeds
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


@dataclass
class SweepConfig:
    skip_completed: bool = False


@dataclass
class RootConfig:
    # open nodes that start from their group's typed defaults (see harness.schemas); the choice's YAML adds its keys
    model: Any = field(default_factory=group_defaults(ModelConfig))
    dataset: Any = field(default_factory=group_defaults(DatasetConfig))
    optimizer: Any = field(default_factory=group_defaults(OptimizerConfig))
    schedule: Any = field(default_factory=group_defaults(ScheduleConfig))
    precision: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING
    clip: Any = None
    normalization: Any = None
    regularization: Any = None
    calibration: Any = None
    quantization: Any = None
    task: TaskConfig = field(default_factory=TaskConfig)
    study: Any = None  # conf/study/<name>.yaml when launched by `harness study` (the sweeper reads it)
    study_run: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006  name, arm, phase, index of a study's run
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    data_dir: str = "datasets"
    results_dir: str = "results"
    resume: bool = False
    plugins: list[str] = field(default_factory=list)  # modules imported before building (user techniques)


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RootConfig)


def validate(cfg: DictConfig) -> None:
    """Range checks the type schema cannot express. Raises ConfigError naming the bad value."""
    t = cfg.trainer
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every", "grad_accum_steps"):
        if t[key] is None or int(t[key]) < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be a positive integer")
    if int(t.batch_size) % int(t.grad_accum_steps):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} must be divisible by trainer.grad_accum_steps={t.grad_accum_steps}"
        )
    if int(t.checkpoint_every) < 0:
        raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0 (0 disables checkpoints)")
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps < 1):
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be a positive integer or null")
    if t.progress not in ("auto", "bar", "plain", "none"):
        raise ConfigError(f"trainer.progress={t.progress!r}; valid choices: auto, bar, plain, none")
    validate_task(cfg.task)
    validate_dataset_sizes(cfg.dataset)
    if cfg.precision.name not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={cfg.precision.name!r}; valid choices: auto, bf16, fp16, fp32")


def validate_dataset_sizes(dataset: DictConfig) -> None:
    """``+dataset.train_subset=0`` or ``-5`` would train on everything or on all but 5, and
    ``dataset.val_size=-1`` on all but one: refused before any work."""
    sub = dataset.get("train_subset")
    if sub is not None and (isinstance(sub, bool) or not isinstance(sub, int) or sub < 1):
        raise ConfigError(f"dataset.train_subset={sub} must be a positive number of training samples (or absent)")
    val = dataset.get("val_size")
    if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
        raise ConfigError(f"dataset.val_size={val} must be an integer >= 0 (0: no validation split)")


def validate_task(task: DictConfig) -> None:
    if task.direction not in ("max", "min"):
        raise ConfigError(f"task.direction={task.direction!r}; valid choices: max, min")
    if task.split not in ("val", "test"):
        raise ConfigError(f"task.split={task.split!r}; valid choices: val (test is for the report only)")
    if task.split == "test":
        raise ConfigError("task.split=test would take decisions on the test split; use task.split=val")
    if task.target is not None and not math.isfinite(float(task.target)):
        raise ConfigError(f"task.target={task.target} must be a finite number or null")
    if int(task.min_seeds) < 1:
        raise ConfigError(f"task.min_seeds={task.min_seeds} must be a positive integer")


# config directories added with ``hydra.searchpath=[file://my_conf, pkg://my_pkg.conf]`` (searched after the
# package's conf/, as Hydra does); set by the command line before it validates choices
_SEARCHPATH: list[Path] = []
PLUGIN_GROUP = "harness.techniques"  # entry-point group of installed packages that define techniques


def searchpath_dir(entry: str) -> Path:
    """The directory of one ``hydra.searchpath`` entry (``file://DIR`` relative to the working directory,
    ``pkg://package.sub``, or a bare path). Raises ConfigError when it does not exist."""
    if entry.startswith("pkg://"):
        import importlib.resources

        ensure_project_importable()
        module = entry[len("pkg://") :].replace("/", ".").strip(".")
        try:
            d = Path(str(importlib.resources.files(module)))
        except (ModuleNotFoundError, TypeError) as e:
            raise ConfigError(f"hydra.searchpath entry {entry!r}: package {module!r} cannot be imported ({e})") from e
    else:
        d = Path(entry[len("file://") :] if entry.startswith("file://") else entry).expanduser()
    if not d.is_dir():
        raise ConfigError(f"hydra.searchpath entry {entry!r}: {d.resolve()} is not a directory")
    return d.resolve()


def set_searchpath(entries: list[str] | None) -> None:
    """Search these config directories (after conf/) for choices: ``list_choices``, ``choice_path`` and
    the task index then see ``my_conf/optimizer/adopt.yaml`` like a file of the package."""
    _SEARCHPATH[:] = [searchpath_dir(str(e)) for e in entries or []]


def conf_dirs() -> list[Path]:
    """The package's conf/ and the directories of ``hydra.searchpath``, in Hydra's order."""
    return [CONF_DIR, *_SEARCHPATH]


def choice_path(group: str, choice: str) -> Path | None:
    """The YAML of ``group=choice``: the first config directory that has it (Hydra's precedence)."""
    for d in conf_dirs():
        path = d / group / f"{choice}.yaml"
        if path.is_file():
            return path
    return None


def list_choices(group: str) -> list[str]:
    if group == "study":  # studies may live in sub-folders: study=claims/adamp
        return sorted(
            {
                str(p.relative_to(d / group).with_suffix(""))
                for d in conf_dirs()
                if (d / group).is_dir()
                for p in (d / group).rglob("*.yaml")
            }
        )
    return sorted({p.stem for d in conf_dirs() if (d / group).is_dir() for p in (d / group).glob("*.yaml")})


def ensure_project_importable() -> None:
    """Modules of the project directory (the working directory) are importable, as with ``python -m``:
    ``_target_: my_pkg.mod.MyClip`` works for ``my_pkg/`` next to where ``harness run`` is started."""
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load_plugins(modules: list[str] | None = None) -> list[str]:
    """Import the user's technique modules: ``plugins: [my_pkg.techniques]`` of the config and every entry
    point of the group ``harness.techniques`` of installed packages. A technique is a class named by
    ``_target_``, so importing is all a plugin needs (a module may also set up whatever its techniques use).
    Returns the names imported; a module that cannot be imported is a ConfigError naming it."""
    import importlib
    from importlib.metadata import entry_points

    ensure_project_importable()
    loaded = []
    for name in modules or []:
        try:
            importlib.import_module(str(name))
        except Exception as e:  # noqa: BLE001  the user's module: name it and the reason
            raise ConfigError(
                f"plugins: cannot import {name!r} ({type(e).__name__}: {e}); the module must be installed or lie "
                f"in the working directory ({os.getcwd()})"
            ) from e
        loaded.append(str(name))
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"entry point {ep.name} = {ep.value} (group {PLUGIN_GROUP}) cannot be loaded: {type(e).__name__}: {e}"
            ) from e
        loaded.append(ep.value)
    return loaded


def task_index() -> dict[str, dict[str, str]]:
    """Every task of conf/task/ with its model, dataset and description (read without composing)."""
    import yaml

    out = {}
    for name in list_choices("task"):
        spec = (yaml.safe_load(choice_path("task", name).read_text()) or {}).get("task") or {}
        out[name] = {k: str(spec.get(k, "")) for k in ("model", "dataset", "description")}
    return out


def task_for(model: str, dataset: str) -> str:
    """The task registered for a model x dataset pair. Raises ConfigError listing the tasks when there
    is none (a language model never silently gets an image task's budget, nor the reverse)."""
    index = task_index()
    found = [n for n, t in index.items() if t["model"] == model and t["dataset"] == dataset]
    if len(found) == 1:
        return found[0]
    listing = "\n".join(
        f"  {n:<24} model={t['model']} dataset={t['dataset']}  {t['description']}" for n, t in index.items()
    )
    if found:
        raise ConfigError(
            f"several tasks use model={model} dataset={dataset}: {', '.join(found)}; choose one with task=NAME"
        )
    raise ConfigError(
        f"no task is registered for model={model} dataset={dataset}. Choose a task with task=NAME (a task's "
        f"model or dataset may be overridden, e.g. task=resnet18_cifar10 model=resnet34 keeps that task's "
        f"budget and target), or add conf/task/<name>.yaml. Tasks:\n{listing}"
    )


def default_data_dir() -> str:
    return os.environ.get("HARNESS_DATA_DIR", "datasets")
