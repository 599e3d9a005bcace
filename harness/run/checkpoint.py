"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True`` (tensors and
plain values, never arbitrary pickles)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: write to a temp file in the same directory, then rename over the old checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is tensors and plain Python values, never arbitrary pickles
    return torch.load(path, map_location="cpu", weights_only=True)
