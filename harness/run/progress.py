"""Progress of a run: a rich bar on a terminal, plain log lines otherwise (CI, SLURM logs)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("harness")


class Progress:
    """A rich progress bar on a terminal, plain log lines otherwise (CI, SLURM logs)."""

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "plain"
        self.mode, self.epochs, self.spe = mode, epochs, steps_per_epoch
        self.bar = None
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = None

    def start_epoch(self, epoch: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                "", total=self.spe, epoch=f"{epoch + 1}/{self.epochs}", loss=float("nan"), rate=0.0
            )

    def update(self, epoch: int, step_in_epoch: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step_in_epoch, loss=loss, rate=rate)
        elif self.mode == "plain":
            log.info(
                f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.spe} loss {loss:.4f} {rate:.0f} samples/s"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
