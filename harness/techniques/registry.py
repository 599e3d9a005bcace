"""Techniques from the run config: ``build_techniques`` instantiates the ``_target_`` of each
technique group's choice (``conf/<group>/<choice>.yaml``) with the YAML's hyper-parameters, in the
order their hooks must run (normalization is swapped before QAT wraps layers; clipping follows the
loss). A choice without ``_target_`` (``none``, ``default``) builds nothing.

Adding a technique is one class (a ``harness.hooks.Technique`` with the hooks it needs) plus one YAML
naming it in ``_target_``. The keys of ``harness.schemas.TechniqueConfig`` (``name``, ``description``,
``paper``, ``source``, ``applies_to``) document the choice and are not passed to the class.
Optimizers and schedules are built in ``harness.techniques.optimizers`` / ``harness.techniques.schedules``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from harness import build
from harness.config import list_choices
from harness.hooks import Technique
from harness.schemas import TECHNIQUE_GROUPS, harness_keys

__all__ = ["TECHNIQUE_GROUPS", "build_techniques", "meta_keys", "names_in_group"]


def meta_keys() -> tuple[str, ...]:
    """Keys of a technique YAML that document it and are not constructor arguments."""
    return harness_keys("clip")


def names_in_group(group: str) -> list[str]:
    """The choices of a technique group (the catalogue is ``conf/<group>/``)."""
    return list_choices(group)


def build_techniques(cfg: DictConfig) -> list[Technique]:
    out: list[Technique] = []
    for group in TECHNIQUE_GROUPS:
        spec = build.spec_of(group, cfg.get(group))
        if not spec.get("_target_"):  # none / default: the model and loop as they are
            continue
        meta, params = build.split(group, spec)
        technique = build.instantiate(group, params, meta.name or str(spec["_target_"]))
        if not isinstance(technique, Technique):
            raise build.ConfigError(f"{group}._target_={spec['_target_']!r} is not a harness.hooks.Technique")
        technique.group = group  # the record keys technique statistics by group
        out.append(technique)
    return out
