"""Progress of a run: a rich bar on a terminal, plain log lines otherwise (CI, SLURM logs).

Training progress is shown at *progress points*: every ``trainer.log_every`` steps, after the first step
of the run (so a log shows a line within seconds, not after the first ``log_every`` steps) and whenever
``interval_s`` has passed since the last point (30 s for plain lines, 2 s for the bar), so a slow run
still talks. Each point reads the loss from the device (the only host synchronisation inside an epoch),
at most once per step. Language models report tokens/s, classifiers samples/s.

Evaluation shows the split it reads and its batches (``eval val 3/8 batches``): a second bar on a
terminal; plain lines only for an evaluation that lasts more than ``EVAL_QUIET_S`` seconds (then every
``interval_s`` and at its end), so short evaluations do not fill a log.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("harness")

PLAIN_INTERVAL_S = 30.0  # plain lines: at least this often while training
BAR_INTERVAL_S = 2.0  # the bar: refreshed at least this often
EVAL_QUIET_S = 5.0  # plain lines for an evaluation only once it has lasted this long


def format_duration(seconds: float) -> str:
    """``8 h 40 min``, ``12 min``, ``45 s``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min {r} s" if m < 10 and r else f"{round(s / 60)} min"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m} min" if m else f"{h} h"


class Progress:
    """A rich progress bar on a terminal, plain log lines otherwise (CI, SLURM logs)."""

    def __init__(
        self,
        mode: str,
        epochs: int,
        steps_per_epoch: int,
        *,
        log_every: int = 50,
        unit: str = "samples",
        per_sample: int = 1,
        interval_s: float | None = None,
    ):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "plain"
        self.mode, self.epochs, self.spe = mode, epochs, steps_per_epoch
        self.log_every, self.unit, self.per_sample = max(1, int(log_every)), unit, max(1, int(per_sample))
        self.interval_s = (
            interval_s if interval_s is not None else (BAR_INTERVAL_S if mode == "bar" else PLAIN_INTERVAL_S)
        )
        self.last_point: float | None = None  # monotonic time of the last training progress point
        self.bar = self.task = self.eval_task = None
        self.eval_name, self.eval_total, self.eval_t0, self.eval_last, self.eval_told = "", 0, 0.0, 0.0, False
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.fields[label]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()

    # ------------------------------------------------------------------ training
    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, counted over the run) is a progress point."""
        if self.mode == "none":
            return step % self.log_every == 0  # the loop still checks for divergence there
        now = time.monotonic()
        if self.last_point is None or step % self.log_every == 0 or now - self.last_point >= self.interval_s:
            self.last_point = now
            return True
        return False

    def start_epoch(self, epoch: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("", total=self.spe, label=f"epoch {epoch + 1}/{self.epochs}", info="")

    def update(self, epoch: int, step_in_epoch: int, loss: float, rate: float) -> None:
        """``rate``: training samples per second (shown as tokens/s for language models)."""
        shown = f"loss {loss:.4f}  {rate * self.per_sample:,.0f} {self.unit}/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step_in_epoch, info=shown)
        elif self.mode == "plain":
            log.info(f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.spe} {shown}")

    # ------------------------------------------------------------------ evaluation
    def start_eval(self, name: str, batches: int) -> None:
        self.eval_name, self.eval_total, self.eval_told = name, int(batches), False
        self.eval_t0 = self.eval_last = time.monotonic()
        if self.bar is not None:
            self.eval_task = self.bar.add_task("", total=self.eval_total, label=f"eval {name}", info="batches")

    def eval_step(self, done: int) -> None:
        if self.bar is not None and self.eval_task is not None:
            self.bar.update(self.eval_task, completed=done)
        elif self.mode == "plain":
            now = time.monotonic()
            quiet = EVAL_QUIET_S if not self.eval_told else self.interval_s
            if now - self.eval_last >= quiet and done < self.eval_total:
                self.eval_last, self.eval_told = now, True
                log.info(f"eval {self.eval_name} {done}/{self.eval_total} batches ({now - self.eval_t0:.0f} s)")

    def end_eval(self) -> None:
        if self.bar is not None and self.eval_task is not None:
            self.bar.remove_task(self.eval_task)
            self.eval_task = None
        elif self.mode == "plain" and self.eval_told:
            took = time.monotonic() - self.eval_t0
            log.info(f"eval {self.eval_name} {self.eval_total}/{self.eval_total} batches in {took:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
