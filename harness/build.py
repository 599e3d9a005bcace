"""From a config node to an object, the same way for every group: ``hydra.utils.instantiate`` on the
choice's ``_target_``, with ``_partial_`` where an argument is known only at run time (the model's
parameters, the total steps, the data bundle), after the harness's own keys (``harness.schemas``)
have been split off and type-checked.

A hand-written config that names a choice but has no ``_target_`` (``{"name": "digits", "val_size": 0}``)
is completed from the catalogue, ``conf/<group>/<name>.yaml``, so the catalogue YAML stays the one
place of a choice's settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import choice_path, list_choices
from harness.errors import ConfigError
from harness.registry import unknown_choice_message
from harness.schemas import SCHEMAS, harness_keys

NO_CHOICE = (None, "", "none", "null", "default")  # technique choices that build nothing


def spec_of(group: str, cfg: Any) -> dict[str, Any]:
    """The choice's config as a plain dict (interpolations resolved), completed from
    ``conf/<group>/<name>.yaml`` when it names a choice and has no ``_target_``."""
    if cfg is None:
        return {}
    spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    spec.pop("defaults", None)
    name = spec.get("name")
    if "_target_" not in spec and name not in NO_CHOICE:
        path = choice_path(group, str(name))
        if path is None:
            raise ConfigError(unknown_choice_message(group, name, list_choices(group)))
        base = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        base.pop("defaults", None)
        spec = {**base, **spec}
    return spec


def split(group: str, spec: dict[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """(the harness's keys, type-checked against the group's schema with its defaults filled in;
    everything else: ``_target_`` and the hyper-parameters passed to it)."""
    keys = harness_keys(group)
    typed = OmegaConf.structured(SCHEMAS[group])
    for k in keys:
        if k in spec:
            try:
                typed[k] = spec[k]
            except OmegaConfBaseException as e:
                field = SCHEMAS[group].__dataclass_fields__[k]
                raise ConfigError(f"{group}.{k}={spec[k]!r} is invalid: expected {field.type}") from e
    return typed, {k: v for k, v in spec.items() if k not in keys}


def instantiate(group: str, params: dict[str, Any], label: str, *, partial: bool = False) -> Any:
    """``hydra.utils.instantiate(params)``; a target that cannot be imported, or that refuses its
    hyper-parameters (TypeError, ValueError), is a ConfigError naming ``group=label``."""
    if not params.get("_target_"):
        raise ConfigError(f"{group}={label} has no _target_ (the class or function that builds it)")
    try:
        return hydra.utils.instantiate(params, _partial_=partial, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if cause is None or isinstance(cause, ImportError | AttributeError) or "locating target" in str(e):
            raise ConfigError(f"{group}._target_={params['_target_']!r} cannot be imported: {e}") from e
        if isinstance(cause, TypeError | ValueError):
            raise ConfigError(f"bad hyper-parameters for {group}={label}: {cause}") from e
        raise cause from e


def call(group: str, label: str, factory: Callable[..., Any], *args: Any, refuse: tuple = (), **kwargs: Any) -> Any:
    """Call a partial from :func:`instantiate` with the run-time arguments. Unknown or missing
    keyword arguments are a ConfigError; so are the exception types in ``refuse`` (``ValueError``
    for constructors that validate their hyper-parameters)."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad hyper-parameters for {group}={label}: {e}") from e
    except ValueError:  # no signature (a builtin): let the call itself tell
        pass
    try:
        return factory(*args, **kwargs)
    except ConfigError:
        raise
    except refuse as e:
        raise ConfigError(f"bad hyper-parameters for {group}={label}: {e}") from e
