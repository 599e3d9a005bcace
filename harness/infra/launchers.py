"""Honest job status for sweeps launched through Hydra's submitit launcher (SLURM or local).

Hydra's ``run_job`` catches a task's exception and returns it inside a ``JobReturn``; submitit
then pickles that as a *successful* result and the job process exits 0, so SLURM would report a
failed or diverged run as COMPLETED. :func:`fail_job_at_exit` keeps everything submitit and
Hydra do (the result pickle is written, the sweep collects every job and reports the failed ones
at the end) and only makes the job process exit with status 1 once submitit is done, so
``sacct`` shows FAILED. It works with the plugin's own ``hydra/launcher=submitit_slurm`` and with
the harness profiles in conf/hydra/launcher/ (``slurm``, ``local``, ``parallel``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

EXIT_FAILED = 1
_registered = False


def in_submitit_job() -> bool:
    """True inside a job started by submitit (``submitit.core._submit`` sets SUBMITIT_FOLDER)."""
    return bool(os.environ.get("SUBMITIT_FOLDER"))


def _exit_failed() -> None:
    print(
        f"harness: the run did not finish ok; exiting with status {EXIT_FAILED} so the scheduler reports the job as failed",
        file=sys.stderr,
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_FAILED)


def fail_job_at_exit() -> None:
    """Make this submitit job exit non-zero after submitit has written its result (no-op outside
    submitit: the basic launcher's exit status already comes from the exception, and joblib
    worker processes are shared between jobs)."""
    global _registered
    if in_submitit_job() and not _registered:
        _registered = True
        atexit.register(_exit_failed)
