"""Preemption and time limits: checkpoint at the next step boundary, then requeue.

SLURM warns a job before its time limit or a preemption with the ``--signal`` submitit asks for
(SIGUSR2, ``hydra.launcher.signal_delay_s`` seconds ahead); ``scontrol requeue``, ``scancel`` and
the end of a preemption's grace time send SIGTERM. While a run trains, :class:`PreemptionGuard`
turns either signal into a request that the training loop honours after the current optimizer
step: it writes a checkpoint (mid-epoch, with the position in the epoch) and calls
:func:`handoff`:

* SIGUSR2 under submitit (Hydra's ``submitit_slurm`` launcher): submitit's own handler runs, which
  calls the launcher's ``checkpoint()`` (resubmit the same task into the same output directory),
  ``scontrol requeue``s the job and exits. The requeued job finds ``checkpoint.pt`` in its run
  directory and resumes from it; the record's ``requeues`` counts the interruptions.
* SIGTERM (submitit ignores it) or no submitit: exit with status 128+signal after the checkpoint;
  whoever sent it (SLURM requeueing the job, a user) decides whether the run comes back; a later
  ``harness run ... resume=true`` or a requeued job continues from the checkpoint.

Under torchrun only rank 0 acts (it writes the checkpoint and exits); the other ranks ignore the
signals so they are not killed in the middle of a collective while rank 0 saves.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("harness")

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_pending: int | None = None  # the signal waiting for the training loop, if any
_previous: dict[int, Any] = {}  # handlers replaced by the active guard (submitit's, Python's default)


def requested() -> bool:
    """True once a preemption signal arrived; the training loop checks it after every step."""
    return _pending is not None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is None:
        log.warning(
            f"caught {signal.Signals(signum).name}: checkpointing after the current step, then {next_step(signum)}"
        )
    _pending = signum


def next_step(signum: int) -> str:
    """What follows the checkpoint: submitit requeues a SLURM job on SIGUSR2; anything else just stops."""
    previous = _previous.get(signum)
    if signum == signal.SIGUSR2 and callable(previous) and _is_submitit(previous):
        return "requeueing the job (submitit)"
    return "stopping (continue with the same command and resume=true, or in the same hydra.run.dir)"


def _ignore(signum: int, frame: FrameType | None) -> None:
    log.warning(f"rank > 0 ignores {signal.Signals(signum).name}: rank 0 checkpoints and stops the run")


class PreemptionGuard:
    """Install the handlers for the duration of a run (main thread only; elsewhere, e.g. in a
    joblib worker thread, signals cannot be caught and the guard does nothing)."""

    def __init__(self, main_rank: bool = True):
        self.main_rank = main_rank
        self.active = False

    def __enter__(self) -> PreemptionGuard:
        global _pending
        if threading.current_thread() is not threading.main_thread():
            return self
        _pending = None
        for s in SIGNALS:
            _previous[s] = signal.signal(s, _on_signal if self.main_rank else _ignore)
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        global _pending
        if not self.active:
            return
        for s in SIGNALS:
            signal.signal(s, _previous.pop(s, signal.SIG_DFL))
        if _pending is not None and exc[0] is None:  # arrived after the last step: the run is complete anyway
            log.warning(f"{signal.Signals(_pending).name} arrived after training finished; completing the run")
        _pending = None
        self.active = False


def handoff() -> None:
    """Called by the training loop after it saved the checkpoint. Never returns: hands over to
    submitit's requeue on SIGUSR2 (when submitit runs this job), else exits with 128+signal."""
    global _pending
    signum = _pending or signal.SIGTERM
    previous = _previous.get(signum)
    _pending = None
    # submitit's SignalHandler.checkpoint_and_try_requeue: launcher.checkpoint(), `scontrol requeue`, sys.exit
    if signum == signal.SIGUSR2 and callable(previous) and _is_submitit(previous):
        log.info("checkpoint written; handing over to submitit to requeue the job")
        previous(signum, None)
    log.info(f"checkpoint written; exiting on {signal.Signals(signum).name}")
    raise SystemExit(128 + int(signum))


def _is_submitit(handler: Any) -> bool:
    return type(getattr(handler, "__self__", None)).__module__.startswith("submitit")
