"""The technique catalogue: one module per family, each technique small, named and registered.

A technique YAML in ``conf/<group>/<choice>.yaml`` names its class with ``name:`` and lists its
hyper-parameters; ``build_techniques`` turns the run config into ``Technique`` objects, in the order
their hooks must run (normalization is swapped before QAT wraps layers; clipping follows the loss).
Optimizers and schedules are plain torch.optim objects built in ``harness.techniques.optimizers`` /
``harness.techniques.schedules``.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.hooks import Technique
from harness.registry import Registry, unknown_choice_message

TECHNIQUES = Registry("technique")  # keys "<group>/<name>", e.g. "clip/autoclip"

# hook order across groups; within a group there is one choice
TECHNIQUE_GROUPS = ("normalization", "quantization", "regularization", "clip", "calibration")
# keys of a technique YAML that document it and are not constructor arguments
META_KEYS = ("name", "paper", "description", "source", "applies_to")
NO_TECHNIQUE = (None, "none", "null", "default")

# modules that register techniques; a module missing here (not written yet) is skipped
_FAMILIES = ("clipping", "normalization", "regularization", "calibration", "quantization")


def register(group: str, name: str, description: str = "", paper: str = ""):
    """Class decorator: ``@register("clip", "autoclip", "...", "Seetharaman et al. 2020")``."""
    return TECHNIQUES.register(f"{group}/{name}", description, paper)


def load_families() -> None:
    for family in _FAMILIES:
        try:
            importlib.import_module(f"harness.techniques.{family}")
        except ModuleNotFoundError as e:
            if e.name != f"harness.techniques.{family}":
                raise


def names_in_group(group: str) -> list[str]:
    load_families()
    return [k.split("/", 1)[1] for k in TECHNIQUES.names() if k.startswith(group + "/")]


def build_techniques(cfg: DictConfig) -> list[Technique]:
    load_families()
    out: list[Technique] = []
    for group in TECHNIQUE_GROUPS:
        node = cfg.get(group)
        if node is None or node.get("name") in NO_TECHNIQUE:
            continue
        key = f"{group}/{node.name}"
        if key not in TECHNIQUES:
            raise ConfigError(unknown_choice_message(f"{group} technique", node.name, names_in_group(group)))
        params: dict[str, Any] = {
            k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in META_KEYS
        }
        try:
            technique = TECHNIQUES.get(key)(**params)
            technique.group = group  # the record keys technique statistics by group
            out.append(technique)
        except TypeError as e:
            raise ConfigError(f"bad hyper-parameters for {group}={node.name}: {e}") from e
    return out
