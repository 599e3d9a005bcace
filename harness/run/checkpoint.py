"""Checkpoints: a one-line header with the SHA-256 of the payload (and the run key), then the
``torch.save`` payload; written atomically (temp file + rename) with the umask's mode, verified and
read with ``weights_only=True`` (tensors and plain values, never arbitrary pickles).

Before a new checkpoint replaces ``checkpoint.pt``, the old one is kept as ``checkpoint.prev.pt``.
A checkpoint whose checksum does not match (a flipped bit), or that is empty, truncated or garbage,
is never used silently: loading falls back to the previous good checkpoint and says so, or refuses
with a message that names the file and the way forward (``CheckpointError``, bad input: exit 2).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from harness.errors import CheckpointError
from harness.records import RECORD_NAME, atomic_write_bytes

log = logging.getLogger("harness")

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
MAGIC = b"HARNESS-CHECKPOINT"
FORMAT = 1
_HEADER = re.compile(rb"HARNESS-CHECKPOINT (\d+) sha256=([0-9a-f]{64}) run_key=(\S*)\n")
_MAX_HEADER = 256


def previous_of(path: Path) -> Path:
    return path.with_name(PREVIOUS_NAME) if path.name == CHECKPOINT_NAME else path.with_name(f"{path.stem}.prev.pt")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: the old checkpoint becomes ``checkpoint.prev.pt``, the new one is written to a temp
    file in the same directory and renamed over ``checkpoint.pt``. A full disk raises ``InfraFault``
    (``no space left on <path>``) and leaves both earlier files intact."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    key = str(state.get("run_key") or "")
    header = b"%s %d sha256=%s run_key=%s\n" % (
        MAGIC,
        FORMAT,
        hashlib.sha256(payload).hexdigest().encode(),
        key.encode(),
    )
    if path.exists():
        _keep_previous(path)
    atomic_write_bytes(path, header + payload)


def _keep_previous(path: Path) -> None:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt`` without a moment in which neither exists (a hard
    link renamed over the old ``prev``; a copy where the file system has no hard links). Only a
    checkpoint that verifies is kept: a bad one must not push out the last good one."""
    prev = previous_of(path)
    try:
        read_verified(path)
    except CheckpointError:
        return
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    except OSError as e:  # e.g. no room for a copy: the new checkpoint matters more
        log.warning(f"could not keep {path.name} as {prev.name} ({e}); writing the new checkpoint anyway")
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of a checkpoint (``format``, ``sha256``, ``run_key``) without reading the payload;
    None for a file without one (a checkpoint from before checksums, or garbage)."""
    with open(path, "rb") as f:
        m = _HEADER.match(f.read(_MAX_HEADER))
    if not m:
        return None
    return {"format": int(m.group(1)), "sha256": m.group(2).decode(), "run_key": m.group(3).decode(), "size": m.end()}


def read_verified(path: Path) -> dict[str, Any]:
    """Read and verify one checkpoint file; raise ``CheckpointError`` saying what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes: the write that made it was cut short)")
    m = _HEADER.match(data[:_MAX_HEADER])
    if m:
        payload = data[m.end() :]
        got = hashlib.sha256(payload).hexdigest()
        if got != m.group(2).decode():
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the SHA-256 of its {len(payload):,} bytes does not match the checksum "
                "written with it (the file was changed, truncated or damaged after it was written)"
            )
    elif data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} has a damaged header")
    else:
        payload = data  # a checkpoint from before checksums: torch.load is the only check
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (EOFError, UnpicklingError, RuntimeError from the zip reader ...)
        what = "unreadable" if m else "not a harness checkpoint (no header) and unreadable"
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
            reason = "it is not a file of tensors and plain values (garbage, or not a training checkpoint)"
        else:
            reason = f"{type(e).__name__}{': ' + text.split('. ')[0][:200] if text else ' (the file ends too early)'}"
        raise CheckpointError(f"checkpoint {path} is {what}: {reason}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training state")
    if not m:
        log.warning(f"checkpoint {path} has no checksum (written by an older harness); it cannot be verified")
    return state


def way_forward(path: Path) -> str:
    return (
        f"Way forward: run again with resume=false (a fresh run in a new run directory), or delete {path} "
        f"(and {previous_of(path).name} beside it) to start this run directory over."
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The verified state in ``path``; when it is unreadable or fails its checksum, the previous
    good checkpoint beside it (``checkpoint.prev.pt``), with a warning that says so. Raises
    ``CheckpointError`` naming the file(s) and the way forward when neither can be used."""
    path = Path(path)
    try:
        return read_verified(path)
    except CheckpointError as e:
        prev = previous_of(path)
        if not prev.exists():
            raise CheckpointError(f"{e}. {way_forward(path)}") from e
        try:
            state = read_verified(prev)
        except CheckpointError as e2:
            raise CheckpointError(f"{e}; the previous checkpoint is no good either: {e2}. {way_forward(path)}") from e
        where = f"epoch {state.get('epoch')}" if "epoch" in state else "an earlier point"
        log.warning(f"{e}. Resuming from the previous good checkpoint {prev} ({where}) instead")
        return state


def remove_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoints (the current one and the previous good one)."""
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        (Path(run_dir) / name).unlink(missing_ok=True)


def _run_key_of(ck: Path) -> str | None:
    header = read_header(ck)
    if header is not None:
        return header["run_key"]
    return read_verified(ck).get("run_key")  # an older checkpoint without a header


def find_resumable(results_dir: Path, key: str) -> Path | None:
    """The newest run directory of this experiment with a checkpoint and no finished record.
    A checkpoint whose run key cannot be read is reported (never skipped without a word); whether
    the chosen one is sound is checked when it is loaded (``load_checkpoint``)."""
    found = []
    for ck in Path(results_dir).glob(f"**/{CHECKPOINT_NAME}"):
        if (ck.parent / RECORD_NAME).exists():
            continue
        try:
            ck_key = _run_key_of(ck)
        except (OSError, CheckpointError) as e:
            prev = previous_of(ck)
            try:
                ck_key = _run_key_of(prev) if prev.exists() else None
            except (OSError, CheckpointError):
                ck_key = None
            if ck_key is None:
                log.warning(f"resume: cannot tell which run {ck} belongs to, so it is not resumed ({e})")
                continue
        if ck_key == key:
            found.append(ck.parent)
    return max(found, key=lambda p: (p / CHECKPOINT_NAME).stat().st_mtime) if found else None
