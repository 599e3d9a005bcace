"""Name -> factory registries (timm style) with errors that list the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.errors import ConfigError


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str = ""
    paper: str = ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str = "", paper: str = ""):
        """Decorator: ``@MODELS.register("resnet18", "ResNet-18", "He et al. 2016")``."""

        def wrap(factory):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, factory, description or (doc[0] if doc else ""), paper)
            return factory

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(unknown_choice_message(self.kind, name, self.names()))
        return self._entries[name]

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).factory


def unknown_choice_message(kind: str, value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown {kind} {value!r}.{hint} Valid choices: {', '.join(sorted(choices))}"
