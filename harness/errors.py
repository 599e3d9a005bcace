"""Errors the CLI turns into a clear message and exit code 2 (bad input, nothing was run), and the
test that tells an infrastructure fault (full disk, I/O error) from a fault of the technique."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A bad value in the configuration or on the command line. The message names the value
    and the valid choices."""


class DataMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded. The message says where to put it."""


class DataCorruptError(DataMissingError):
    """A dataset file is on disk but cannot be read (truncated, garbage, not the official format).
    Bad input like a missing file: the message names the file and how to replace it."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted (unreadable, truncated, checksum mismatch). Bad input
    (exit 2, no record): the message names the file and the way forward (``resume=false``, or the
    previous good checkpoint)."""


# errno values that say the machine, not the run's configuration, failed: a full disk or quota,
# an I/O error, a read-only or vanished file system, a stale NFS handle
INFRA_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EIO", "EROFS", "ESTALE", "ENXIO", "ENODEV", "EREMOTEIO", "ENOLINK")
    if hasattr(errno, name)
)


def infra_fault(exc: BaseException | None) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its ``__cause__``/``__context__`` chain) when it is an
    infrastructure fault (``INFRA_ERRNOS``), else None. torch wraps write errors in RuntimeError
    ("unexpected pos ..."), so the chain and the message are both searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in INFRA_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(e: OSError, path: object = None) -> str:
    """``no space left on /path (ENOSPC)``-style text for an infrastructure OSError."""
    if isinstance(e, InfraFault):  # already says which path
        return str(e)
    where = path or e.filename or "the file system"
    name = errno.errorcode.get(e.errno or 0, "")
    reason = {errno.ENOSPC: "no space left on", errno.EIO: "I/O error on", errno.EROFS: "read-only file system at"}.get(
        e.errno or 0, f"{e.strerror or 'error'} on"
    )
    if getattr(errno, "EDQUOT", None) == e.errno:
        reason = "disk quota exceeded on"
    return f"{reason} {where} ({name})" if name else f"{reason} {where}"


class InfraFault(OSError):
    """Writing or reading a run's files failed because of the machine (full disk, I/O error), not
    because of the run's configuration. Its record (when one can be written) says
    ``status: failed`` with ``infra_fault: true``, and leaderboards do not count it against the
    technique."""

    def __str__(self) -> str:
        return str(self.strerror)
