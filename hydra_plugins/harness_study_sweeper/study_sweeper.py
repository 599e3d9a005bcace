"""The study sweeper: Hydra gives it the composed config (with the ``study`` node), the command-line
arguments and a launcher; ``harness.study.runner.run_study`` plans the tuning and seed phases and
launches each through that launcher (local, joblib, SLURM)."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class StudySweeper(Sweeper):
    def __init__(self, **_: Any) -> None:
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from harness.study.runner import run_study

        assert self.config is not None and self.hydra_context is not None
        return run_study(self.config, list(arguments), self.launcher, self.hydra_context.config_loader)
