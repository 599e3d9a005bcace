"""Typed schema for the config (registered with Hydra's ConfigStore) and checks that run before
any work: a bad value fails with a message naming it, not halfway through a run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from harness.errors import ConfigError

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
    "experiment",
)


@dataclass
class TrainerConfig:
    epochs: int = 30
    max_steps: Any = None  # int: stop after this many optimizer steps (overrides epochs for the budget)
    batch_size: int = 128
    eval_batch_size: int = 1024
    eval_every: int = 1  # epochs between evaluations on the test split (the last epoch is always evaluated)
    checkpoint_every: int = 1  # epochs between checkpoints; 0 disables checkpoints
    log_every: int = 50  # steps between progress updates (each one reads the loss from the device)
    compile: bool = False
    channels_last: bool = True  # CNNs on CUDA only
    target: Any = None  # test metric whose first crossing is timed (accuracy, or perplexity for LMs)
    progress: str = "auto"  # auto | bar | plain | none
    deterministic: bool = False  # torch.use_deterministic_algorithms on GPU (slower)


@dataclass
class SweepConfig:
    skip_completed: bool = False


@dataclass
class RootConfig:
    model: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    precision: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING
    clip: Any = None
    normalization: Any = None
    regularization: Any = None
    calibration: Any = None
    quantization: Any = None
    baseline: Any = None  # the task's baseline technique, set by experiment presets
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    data_dir: str = "datasets"
    results_dir: str = "results"
    resume: bool = False


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RootConfig)


def validate(cfg: DictConfig) -> None:
    """Range checks the type schema cannot express. Raises ConfigError naming the bad value."""
    t = cfg.trainer
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every"):
        if t[key] is None or int(t[key]) < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be a positive integer")
    if int(t.checkpoint_every) < 0:
        raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0 (0 disables checkpoints)")
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps < 1):
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be a positive integer or null")
    if t.progress not in ("auto", "bar", "plain", "none"):
        raise ConfigError(f"trainer.progress={t.progress!r}; valid choices: auto, bar, plain, none")
    if cfg.precision.name not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision={cfg.precision.name!r}; valid choices: auto, bf16, fp16, fp32")


def list_choices(group: str) -> list[str]:
    d = CONF_DIR / group
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml"))


def default_data_dir() -> str:
    return os.environ.get("HARNESS_DATA_DIR", "datasets")
