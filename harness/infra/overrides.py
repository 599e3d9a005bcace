"""Command-line overrides checked before Hydra composes anything, so a typo or an impossible value
is refused with exit 2 and a message that names it (and the close match), never a Hydra traceback.

* ``trainer.epoch=2``: no such key; the close matches (``trainer.epochs``), and the same key under
  another node (``trainer.target`` -> ``task.target``).
* ``hydra/launcher=nope``: the valid launchers.
* ``seed=<5,000 digits>``: names ``seed`` and its range.
* ``optimizer=adamé``: non-ASCII characters must be quoted; says how.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import yaml

from harness.config import CONF_DIR, GROUPS, RootConfig, list_choices
from harness.errors import ConfigError

SEED_MAX = 2**63 - 1
PLUGIN_LAUNCHERS = {  # Hydra's and the plugins' own launcher configs
    "basic": None,
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
}


def _fields(cls) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def typed_keys() -> dict[str, set[str]]:
    """Node -> its keys, for the root and the nodes the typed schema closes (``trainer``, ``task``,
    ``task.baseline``, ``sweep``)."""
    out: dict[str, set[str]] = {"": set(_fields(RootConfig))}

    def walk(prefix: str, cls) -> None:
        out[prefix] = set(_fields(cls))
        for name, f in _fields(cls).items():
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                walk(f"{prefix}.{name}", f.default_factory)

    for name, f in _fields(RootConfig).items():
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            walk(name, f.default_factory)
    return out


def group_keys(group: str) -> set[str]:
    """Every top-level key that any choice of ``group`` has (a key in none of them is surely a typo)."""
    keys: set[str] = set()
    for choice in list_choices(group):
        try:
            spec = yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(spec, dict):
            keys.update(str(k) for k in spec if k != "defaults")
    return keys


def check_key(key: str, groups: bool = True) -> None:
    """Refuse ``node.leaf`` when the node has no such key, suggesting the close matches. ``groups``:
    also check the keys of config groups (off when a user search path may add choices with other keys)."""
    if "." not in key or key.startswith(("hydra.", "hydra/", "study.")):  # study keys: harness.study.spec checks them
        return
    node, leaf = key.rsplit(".", 1)
    typed = typed_keys()
    if node in typed:
        known = typed[node]
    elif node in GROUPS and groups:
        known = group_keys(node)
        try:
            from harness import schemas

            for cls in vars(schemas).values():  # the group's typed defaults (ModelConfig, ...)
                if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__name__.lower() == f"{node}config":
                    known |= set(_fields(cls))
        except ImportError:
            pass
    else:
        return
    if not known or leaf in known:
        return
    close = [f"{node}.{m}" for m in difflib.get_close_matches(leaf, sorted(known), n=3, cutoff=0.6)]
    elsewhere = [f"{n}.{leaf}" if n else leaf for n, ks in typed.items() if leaf in ks and n != node]
    hint = close + [e for e in elsewhere if e not in close]
    msg = f"{key}: {node} has no key {leaf!r}"
    if hint:
        msg += f"; did you mean {' or '.join(hint)}?"
    if node in typed:
        msg += f" (keys of {node}: {', '.join(sorted(known))})"
    raise ConfigError(msg)


def launcher_choices() -> list[str]:
    import importlib.util

    local = list_choices("hydra/launcher")
    plugins = [
        n
        for n, mod in PLUGIN_LAUNCHERS.items()
        if mod is None or importlib.util.find_spec(mod.split(".")[0]) is not None
    ]
    return sorted(set(local) | set(plugins))


def check_launcher(value: str) -> None:
    from harness.registry import unknown_choice_message

    choices = launcher_choices()
    if value not in choices:
        raise ConfigError(unknown_choice_message("hydra/launcher", value, choices))


def check_seed(values: list[Any]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX:
            shown = str(v) if len(str(v)) <= 30 else f"{str(v)[:20]}... ({len(str(v)):,} characters)"
            raise ConfigError(f"seed={shown} is invalid: a seed is an integer from 0 to {SEED_MAX} (2**63 - 1)")


def explain_parse_error(overrides: list[str], error: Exception) -> str:
    """A clearer message for what Hydra's override parser refuses (it raises before naming the key)."""
    text = str(error)
    for o in overrides:
        key, _, value = o.partition("=")
        if "Exceeds the limit" in text and re.fullmatch(r"[+-]?\d{1000,}", value.split(",")[0].strip()):
            name = key.lstrip("+~")
            if name == "seed":
                return f"seed={value[:20]}... ({len(value):,} digits) is invalid: a seed is an integer from 0 to {SEED_MAX}"
            return f"{name}={value[:20]}... ({len(value):,} digits) is invalid: the number is too large"
        if not o.isascii() and not re.search(r"""(['"]).*[^\x00-\x7f].*\1""", value):
            quoted = f'{key}="{value}"'
            return (
                f"{o}: a value with non-ASCII characters must be quoted inside the override, e.g. "
                f"harness run '{quoted}' (the shell's single quotes keep the double quotes for Hydra)"
            )
    return text
