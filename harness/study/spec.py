"""A study file (``conf/study/<name>.yaml``) read, merged with command-line ``study.*`` overrides and
checked before any run: arms, the tuning protocol (search space, sampler, equal budget), fresh seeds,
the selection rule and an optional claim with a decidable criterion.

```yaml
name: smoke
description: ...
task: quickstart                 # from conf/task/
overrides: [trainer.epochs=4]    # applied to every run of the study
arms:                            # each a set of overrides; exactly one is the baseline
  sgd: {overrides: [optimizer=sgd], baseline: true}
  adamw: {overrides: [optimizer=adamw]}
budget: 3                        # tuning trials per arm, the same for every arm (0: published defaults)
seeds: 2                         # fresh seeds the selected configuration of each arm is re-run with
sampler: sobol                   # sobol | halton | grid | random (scipy.stats.qmc, seeded by sampler_seed)
search: {}                       # per hyper-parameter space, overriding the default (lr: two decades)
claim: {text: ..., paper: ..., criterion: {kind: not_worse, arm: adamw, margin: 0.01}}
scales: {cpu: {...}, gpu: {...}} # optional: keys of the chosen scale (study.scale=cpu) override the top level
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, list_choices
from harness.errors import ConfigError
from harness.registry import unknown_choice_message

SAMPLERS = ("sobol", "halton", "grid", "random")
CRITERIA = ("better", "not_worse", "lower", "lower_std", "reaches_fraction", "ratio_below", "slope_in")
KEYS = {
    "name", "description", "task", "overrides", "arms", "budget", "seeds", "sampler", "sampler_seed", "search",
    "claim", "scales", "scale", "alpha", "tune_seed", "kind", "paper", "notes", "lr_scan", "requires", "changes",
}  # fmt: skip


@dataclass
class Param:
    """One tuned hyper-parameter: a config key and its range (log-uniform when ``log``) or choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = True
    choices: list[Any] | None = None
    integer: bool = False

    def value(self, u: float) -> Any:
        """The value at quantile ``u`` in [0, 1)."""
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.log:
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            v = self.low + u * (self.high - self.low)
        return int(round(v)) if self.integer else v

    def on_edge(self, v: Any, frac: float = 0.1) -> bool:
        """Within ``frac`` of the range (in the sampled scale) of either end."""
        if self.choices is not None:
            return len(self.choices) > 2 and v in (self.choices[0], self.choices[-1])
        f = (lambda x: math.log(x)) if self.log else (lambda x: x)
        span = f(self.high) - f(self.low)
        return span > 0 and min(f(v) - f(self.low), f(self.high) - f(v)) < frac * span


@dataclass
class Arm:
    name: str
    overrides: list[str]
    baseline: bool = False
    search: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)  # filled by the plan (defaults from the technique)


@dataclass
class Study:
    name: str
    description: str
    task: str
    overrides: list[str]
    arms: list[Arm]
    budget: int
    seeds: int
    sampler: str = "sobol"
    sampler_seed: int = 0
    tune_seed: int = 0
    alpha: float = 0.05
    search: dict[str, Any] = field(default_factory=dict)
    claim: dict[str, Any] | None = None
    scale: str | None = None
    kind: str = "compare"  # compare | lr_scan
    lr_scan: dict[str, Any] | None = None
    requires: dict[str, Any] | None = None  # e.g. {cuda_capability: 8.9}: not run (no verdict) elsewhere
    changes: str = ""  # what a reduced scale changes with respect to the paper's setting
    source: str = ""

    def unmet_requirement(self) -> str | None:
        """Why this machine cannot run the study, or None."""
        need = (self.requires or {}).get("cuda_capability")
        if need is None:
            return None
        import torch

        if not torch.cuda.is_available():
            return f"needs a CUDA GPU with compute capability >= {need} (this machine has no GPU)"
        cc = torch.cuda.get_device_capability()
        if cc[0] + cc[1] / 10 < float(need):
            return f"needs compute capability >= {need}; {torch.cuda.get_device_name()} has {cc[0]}.{cc[1]}"
        return None

    @property
    def baseline(self) -> Arm:
        return next(a for a in self.arms if a.baseline)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def seed_list(self) -> list[int]:
        """Fresh seeds, none equal to the tuning seed."""
        return [self.tune_seed + 1 + i for i in range(self.seeds)]


def study_names() -> list[str]:
    """Every study under conf/study/ (and a search path's study/), nested folders included (``claims/adamp``)."""
    return list_choices("study")


def study_path(name: str) -> Path:
    from harness.config import conf_dirs

    for d in conf_dirs():
        if (d / "study" / f"{name}.yaml").is_file():
            return d / "study" / f"{name}.yaml"
    return CONF_DIR / "study" / f"{name}.yaml"


def load(name: str, overrides: list[str] | None = None) -> Study:
    """Read and check ``conf/study/<name>.yaml`` with ``study.key=value`` overrides. Raises ConfigError."""
    names = study_names()
    if name not in names:
        raise ConfigError(unknown_choice_message("study", name, names))
    path = study_path(name)
    node = OmegaConf.load(path)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = []
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+")
        if not key.startswith("study.") or "=" not in o:
            raise ConfigError(
                f"{o!r}: study options are written study.KEY=VALUE (e.g. study.budget=16, study.seeds=10)"
            )
        sub = key[len("study.") :]
        if sub.split(".")[0] not in KEYS:
            raise ConfigError(unknown_choice_message("study key", sub.split(".")[0], sorted(KEYS)))
        try:  # Hydra's grammar: study.seeds=10, 'study.arms.a.overrides=["optimizer=sgd"]', study.search={...}
            (one,) = OverridesParser.create().parse_overrides([o.lstrip("+")])
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{o!r} is invalid: {str(e).splitlines()[0]}") from e
        parsed.append((sub, one.value()))
    # study.scale first; then each key where the chosen scale sets it (so a command line beats the scale)
    for sub, value in sorted(parsed, key=lambda kv: kv[0] != "scale"):
        scales = node.get("scales") or {}
        scale = node.get("scale") or next(iter(scales), None)
        target = f"scales.{scale}.{sub}" if scale in scales and sub.split(".")[0] in (scales[scale] or {}) else sub
        try:
            OmegaConf.update(node, target, value, merge=False, force_add=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"study.{sub} is invalid: {str(e).splitlines()[0]}") from e
    return parse(node, name, path)


def parse(node: DictConfig, name: str, path: Path | None = None) -> Study:
    unknown = sorted(set(node.keys()) - KEYS)
    if unknown:
        raise ConfigError(unknown_choice_message(f"key in study {name}", unknown[0], sorted(KEYS)))
    scale = node.get("scale")
    scales = node.get("scales") or {}
    if scales:
        scale = scale or next(iter(scales))
        if scale not in scales:
            raise ConfigError(unknown_choice_message(f"study.scale of {name}", scale, list(scales)))
        node = OmegaConf.merge({k: v for k, v in node.items() if k != "scales"}, scales[scale])
    spec = OmegaConf.to_container(node, resolve=True)
    task = spec.get("task")
    if task not in list_choices("task"):
        raise ConfigError(unknown_choice_message(f"task of study {name}", task, list_choices("task")))
    arms_spec = spec.get("arms") or {}
    if spec.get("kind", "compare") not in ("compare", "lr_scan"):
        raise ConfigError(unknown_choice_message(f"kind of study {name}", spec.get("kind"), ["compare", "lr_scan"]))
    if len(arms_spec) < 1:
        raise ConfigError(f"study {name} has no arms")
    budgets = {a: (v or {}).get("budget") for a, v in arms_spec.items() if (v or {}).get("budget") is not None}
    budget = spec.get("budget", 0)
    if budgets and (len(set(budgets.values())) > 1 or set(budgets.values()) != {budget}):
        raise ConfigError(
            f"study {name}: every arm gets the same tuning budget (study.budget={budget}); arms ask for "
            + ", ".join(f"{a}={b}" for a, b in budgets.items())
        )
    arms = []
    for arm_name, a in arms_spec.items():
        a = a or {}
        bad = sorted(set(a) - {"overrides", "baseline", "search", "budget", "description"})
        if bad:
            raise ConfigError(
                unknown_choice_message(
                    f"key of arm {arm_name}", bad[0], ["overrides", "baseline", "search", "budget", "description"]
                )
            )
        arms.append(
            Arm(
                str(arm_name),
                [str(o) for o in a.get("overrides") or []],
                bool(a.get("baseline")),
                dict(a.get("search") or {}),
            )
        )
    baselines = [a.name for a in arms if a.baseline]
    if len(baselines) != 1:
        raise ConfigError(
            f"study {name}: exactly one arm must be the baseline (baseline: true); found {baselines or 'none'}"
        )
    for key, lo in (("budget", 0), ("seeds", 1)):
        v = spec.get(key, 0)
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"study.{key}={v!r} must be an integer >= {lo}")
    sampler = spec.get("sampler", "sobol")
    if sampler not in SAMPLERS:
        raise ConfigError(unknown_choice_message("study.sampler", sampler, list(SAMPLERS)))
    alpha = float(spec.get("alpha", 0.05))
    if not 0 < alpha < 0.5:
        raise ConfigError(f"study.alpha={alpha} must be in (0, 0.5)")
    study = Study(
        name=str(spec.get("name", name)),
        description=str(spec.get("description", "")),
        task=task,
        overrides=[str(o) for o in spec.get("overrides") or []],
        arms=arms,
        budget=int(budget),
        seeds=int(spec.get("seeds", 1)),
        sampler=sampler,
        sampler_seed=int(spec.get("sampler_seed", 0)),
        tune_seed=int(spec.get("tune_seed", 0)),
        alpha=alpha,
        search=dict(spec.get("search") or {}),
        claim=spec.get("claim"),
        scale=scale,
        kind=str(spec.get("kind", "compare")),
        lr_scan=spec.get("lr_scan"),
        requires=spec.get("requires"),
        changes=str(spec.get("changes", "")),
        source=str(path or ""),
    )
    check_claim(study)
    return study


def check_claim(study: Study) -> None:
    claim = study.claim
    if not claim:
        return
    check_criterion(study, claim.get("criterion") or {})


def check_criterion(study: Study, crit: dict[str, Any]) -> None:
    if "all_of" in crit:
        for part in crit["all_of"]:
            check_criterion(study, dict(part))
        return
    kind = crit.get("kind")
    if kind not in CRITERIA:
        raise ConfigError(unknown_choice_message(f"criterion kind of study {study.name}", kind, list(CRITERIA)))
    if kind == "slope_in" and study.kind != "lr_scan":
        raise ConfigError(f"study {study.name}: criterion slope_in needs kind: lr_scan")
    if kind == "ratio_below" and crit.get("threshold") is None:
        raise ConfigError(f"study {study.name}: criterion ratio_below needs a threshold")
    arms = [a.name for a in study.arms]
    for key in ("arm", "versus"):
        if crit.get(key) is not None and crit[key] not in arms:
            raise ConfigError(unknown_choice_message(f"criterion {key} of study {study.name}", crit[key], arms))
    from harness.records import METRIC_DIRECTIONS

    for key in ("metric", "versus_metric"):
        metric = crit.get(key)
        if metric is None or metric in ("effective_epochs", "sample_passes"):
            continue
        split, _, base = str(metric).partition("_")
        if split not in ("val", "test", "train") or base.split("_after")[0] not in METRIC_DIRECTIONS:
            known = [f"{s}_{m}" for s in ("val", "test") for m in METRIC_DIRECTIONS]
            raise ConfigError(unknown_choice_message(f"criterion {key} of study {study.name}", metric, known))
    if crit.get("arm") is None:
        raise ConfigError(f"the criterion of study {study.name} names no arm (criterion.arm); arms: {', '.join(arms)}")
