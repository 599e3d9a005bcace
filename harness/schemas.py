"""Typed schemas of the config groups whose choices are built with ``hydra.utils.instantiate``:
``model``, ``dataset``, ``optimizer``, ``schedule`` and the technique groups (``clip``,
``normalization``, ``regularization``, ``calibration``, ``quantization``).

A choice's YAML (``conf/<group>/<choice>.yaml``) holds its ``_target_`` (the class or function that
builds it), its own hyper-parameters and its documentation (``name``, ``description``, ``paper``).
The dataclasses below hold the *harness's* keys of each group (the batch-size learning-rate rule,
Lookahead, warmup, ...) with their defaults, in one place.

How per-choice hyper-parameters coexist with the typed keys: a closed dataclass schema would reject
``momentum`` or ``max_norm``, and OmegaConf's open ``Dict`` subclasses are deprecated. So each group
node of the composed config starts from the dataclass's defaults (``RootConfig`` in
``harness.config`` takes them with :func:`group_defaults`) and is an ordinary open node into which
the choice's YAML merges its hyper-parameters: ``optimizer.lookahead=true`` and
``optimizer.momentum=0.8`` both work from the command line without ``+``. The typed keys are checked
when the choice is built (:func:`harness.build.split`): they are merged into the structured dataclass,
so ``optimizer.base_batch_size=abc`` is refused with a ``ConfigError`` naming the key. Every key that
is not a field of the group's dataclass (other than Hydra's ``_target_``/``_partial_``) is passed to
the ``_target_``; the constructor is the one place of its own defaults and of its validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any  # noqa: UP035  (OmegaConf reads these annotations)

from omegaconf import OmegaConf


@dataclass
class ChoiceConfig:
    """Keys every choice has: its name and documentation (shown by ``harness list``)."""

    name: str = ""
    description: str = ""
    paper: str = ""
    source: str = ""  # the library that implements it, when not the harness
    # the reference implementation a conformance test (tests/test_conformance.py) checks it against, or ""
    checked_against: str = ""


@dataclass
class OptimizerConfig(ChoiceConfig):
    lr_scaling: str = "none"  # none | linear | sqrt: scale lr by batch_size / base_batch_size (Goyal et al. 2017)
    base_batch_size: int = 128
    decay_all: bool = False  # true: also decay biases, normalization gains and no_weight_decay() parameters
    lookahead: Any = None  # null, true, or {k: 5, alpha: 0.5}: wrap in Lookahead (Zhang et al. 2019)
    total_steps_key: str | None = None  # constructor argument that gets the run's total optimizer steps
    warmup_fraction: float | None = None  # passed as warmup_steps = fraction * total steps (schedule-free)
    second_order: bool = False  # the optimizer needs loss.backward(create_graph=True)
    takes_model: bool = False  # the _target_ takes the model instead of parameter groups (Muon + AdamW)


@dataclass
class ScheduleConfig(ChoiceConfig):
    warmup_epochs: float = 0.0  # linear warmup (Goyal et al. 2017) applied to every schedule
    warmup_steps: int | None = None  # overrides warmup_epochs when set


@dataclass
class ModelConfig(ChoiceConfig):
    family: str | None = None  # cnn | vit | transformer: which normalization choices apply, channels_last


@dataclass
class DatasetConfig(ChoiceConfig):
    pass


@dataclass
class TechniqueConfig(ChoiceConfig):
    applies_to: list[str] | None = None  # model families the technique is meant for (documentation)


TECHNIQUE_GROUPS = ("normalization", "quantization", "regularization", "clip", "calibration")
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    **{g: TechniqueConfig for g in TECHNIQUE_GROUPS},
}


def harness_keys(group: str) -> tuple[str, ...]:
    """The keys of ``group`` that configure the harness and are not passed to the ``_target_``."""
    return tuple(f.name for f in fields(SCHEMAS[group]))


def group_defaults(schema: type) -> Callable[[], dict[str, Any]]:
    """``default_factory`` for a ``RootConfig`` field: the schema's defaults as an open node."""
    return lambda: OmegaConf.to_container(OmegaConf.structured(schema))
