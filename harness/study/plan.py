"""From a study to concrete runs: each arm's search space (defaults live with the technique: the
learning rate log-uniform over two decades around the arm's resolved default; a study may override any
hyper-parameter), quasi-random points from ``scipy.stats.qmc`` seeded by the study (AlgoPerf's
protocol; Dahl et al. 2023), the same number of trials for every arm, then the fresh-seed runs of each
arm's selected configuration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.study.spec import Arm, Param, Study

DEFAULT_LR_DECADES = 2.0  # the default learning-rate space spans this many decades around the default


@dataclass
class Job:
    phase: str  # tune | seed
    arm: str
    index: int  # trial number (tune) or seed (seed)
    seed: int
    params: dict[str, Any] = field(default_factory=dict)  # tuned values of this run
    tag: str = ""  # the run's folder name under its phase and arm (default: t<index> or s<seed>)

    @property
    def label(self) -> str:
        return f"{self.phase}/{self.arm}/{self.tag or ('t' if self.phase == 'tune' else 's') + str(self.index)}"

    def overrides(self, study: Study) -> list[str]:
        arm = study.arm(self.arm)
        return [
            f"task={study.task}",
            *study.overrides,
            *arm.overrides,
            *(f"{k}={fmt(v)}" for k, v in self.params.items()),
            f"seed={self.seed}",
            f"+study_run.name={study.name}",
            f"+study_run.arm={self.arm}",
            f"+study_run.phase={self.phase}",
            f"+study_run.index={self.index}",
            f"+study_run.budget={study.budget}",
            "sweep.skip_completed=true",
            f"hydra.sweep.subdir={self.label}",
        ]


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def param_from(key: str, spec: Any) -> Param:
    if isinstance(spec, list):
        return Param(key, choices=list(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"search space of {key}: give {{low, high, log}} or a list of choices, not {spec!r}")
    if "choices" in spec:
        return Param(key, choices=list(spec["choices"]))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"search space of {key} needs numeric low and high, got {spec!r}") from e
    log = bool(spec.get("log", True))
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high or (log and low <= 0):
        raise ConfigError(
            f"search space of {key}: [{low}, {high}] must satisfy low < high"
            + (" and low > 0 (log scale)" if log else "")
        )
    return Param(key, low, high, log, integer=bool(spec.get("integer", False)))


def search_space(study: Study, arm: Arm, cfg: DictConfig) -> list[Param]:
    """The arm's tuned hyper-parameters: the study's and the arm's ``search`` entries, over the default
    (the optimizer's learning rate, log-uniform over two decades centred on its resolved default)."""
    space: dict[str, Any] = {}
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None and float(lr) > 0:
        half = 10 ** (DEFAULT_LR_DECADES / 2)
        space["optimizer.lr"] = {"low": float(lr) / half, "high": float(lr) * half, "log": True}
    space.update(study.search)
    space.update(arm.search)
    return [param_from(k, v) for k, v in space.items() if v is not None]


def check_space(params: list[Param], cfg: DictConfig, arm: Arm) -> None:
    """Every end of every range must be a valid value of its key (the optimizer's own checks decide)."""
    from harness.techniques.optimizers import check_optimizer

    for p in params:
        if OmegaConf.select(cfg, p.key, default="__missing__") == "__missing__":
            raise ConfigError(f"arm {arm.name}: search space key {p.key!r} is not in the run's config")
        ends = p.choices if p.choices is not None else [p.low, p.high]
        for v in ends:
            trial = cfg.copy()
            OmegaConf.update(trial, p.key, v, merge=True)
            if p.key.startswith("optimizer."):
                try:
                    check_optimizer(trial.optimizer)
                except ConfigError as e:
                    raise ConfigError(
                        f"arm {arm.name}: search space of {p.key} reaches {v}, outside its valid range: {e}"
                    ) from e


def unit_points(sampler: str, n: int, d: int, seed: int) -> np.ndarray:
    """``n`` points in [0, 1)^d."""
    if n == 0:
        return np.zeros((0, d))
    if d == 0:
        return np.zeros((n, 0))
    from scipy.stats import qmc

    if sampler == "sobol":
        m = max(0, math.ceil(math.log2(n)))
        return qmc.Sobol(d, scramble=True, seed=seed).random_base2(m)[:n]
    if sampler == "halton":
        return qmc.Halton(d, scramble=True, seed=seed).random(n)
    if sampler == "grid":
        k = math.ceil(n ** (1 / d))
        axes = np.meshgrid(*[(np.arange(k) + 0.5) / k] * d, indexing="ij")
        return np.stack([a.ravel() for a in axes], 1)[:n]
    return np.random.default_rng(seed).random((n, d))


def tuning_jobs(study: Study, compose: Callable[[list[str]], DictConfig]) -> list[Job]:
    """``study.budget`` trials per arm (none when the budget is 0: published defaults)."""
    jobs: list[Job] = []
    for arm in study.arms:
        cfg = compose([f"task={study.task}", *study.overrides, *arm.overrides])
        arm.params = search_space(study, arm, cfg)
        check_space(arm.params, cfg, arm)
        if study.budget == 0:
            continue
        pts = unit_points(study.sampler, study.budget, len(arm.params), study.sampler_seed)
        for i, u in enumerate(pts):
            jobs.append(
                Job("tune", arm.name, i, study.tune_seed, {p.key: p.value(float(x)) for p, x in zip(arm.params, u)})
            )
    return jobs


def seed_jobs(study: Study, selected: dict[str, dict[str, Any]]) -> list[Job]:
    """The selected configuration of each arm (its published defaults when the budget is 0) with fresh seeds."""
    return [
        Job("seed", arm.name, s, s, dict(selected.get(arm.name) or {}))
        for arm in study.arms
        if arm.name in selected
        for s in study.seed_list()
    ]


def as_run_sees_it(cfg: DictConfig) -> DictConfig:
    """A composed config (with its ``hydra`` node) as the run will resolve it: without the hydra node, with
    the task's baseline recipe applied (so the baseline arm's default learning rate is the task's)."""
    from omegaconf import open_dict

    from harness.run.experiment import apply_baseline_recipe

    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    overrides = list(cfg.hydra.overrides.task)
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    apply_baseline_recipe(cfg, choices, overrides)
    return cfg


def check_study(study: Study, extra: list[str] | None = None) -> None:
    """Before any run: every arm composes with the study's task, and every search space lies inside its
    hyper-parameters' valid ranges. Raises ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import CONF_DIR, register_schema

    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):

        def composed(overrides: list[str]) -> DictConfig:
            try:
                return as_run_sees_it(
                    compose("config", overrides=[*overrides, *(extra or [])], return_hydra_config=True)
                )
            except Exception as e:  # noqa: BLE001  Hydra's composition errors name the override
                raise ConfigError(f"study {study.name}: {str(e).splitlines()[0]}") from e

        for arm in study.arms:
            cfg = composed([f"task={study.task}", *study.overrides, *arm.overrides])
            check_space(search_space(study, arm, cfg), cfg, arm)


def scan_jobs(study: Study, compose: Callable[[list[str]], DictConfig]) -> list[Job]:
    """``kind: lr_scan``: for every arm and batch size, the same log-spaced learning rates over a fixed
    step budget (the largest stable one per batch size is read off afterwards)."""
    scan = study.lr_scan or {}
    try:
        batches = [int(b) for b in scan["batch_sizes"]]
        lr = param_from("optimizer.lr", scan["lr"])
        n, steps = int(scan["lr"]["n"]), int(scan["steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"study {study.name}: lr_scan needs batch_sizes, lr {{low, high, n}} and steps ({e})") from e
    if n < 2 or steps < 1 or len(batches) < 3 or min(batches) < 1:
        raise ConfigError(
            f"study {study.name}: lr_scan needs n >= 2 learning rates, steps >= 1 and at least 3 batch sizes"
        )
    jobs = []
    for arm in study.arms:
        cfg = compose([f"task={study.task}", *study.overrides, *arm.overrides])
        arm.params = [lr]
        check_space([lr], cfg, arm)
        for b in batches:
            for i in range(n):
                value = lr.value(i / (n - 1)) if lr.log else lr.low + i * (lr.high - lr.low) / (n - 1)
                params = {"trainer.batch_size": b, "optimizer.lr": value, "trainer.max_steps": steps}
                jobs.append(Job("scan", arm.name, i, study.tune_seed, params, tag=f"b{b}_lr{i}"))
    return jobs
