"""Leaderboards: read every run record, compare each technique configuration with its task's baseline.

Identity. A *task* is everything that changes what a baseline would score: ``record["task"]["key"]``, the
hash of the task's resolved model, data (validation size, subsets, label noise, augmentation) and budget
(epochs/steps, batch size, gradient accumulation). Records without a key (written before it existed) get
one computed from their resolved config (``legacy_identity``). Only runs of one task key are compared; task
variants that share a name are shown apart, titled by what differs. A *technique configuration* is the
key of ``harness.records.technique_identity``, recomputed from each record's own technique config and
choices, so labels are stable and ``normalization=batchnorm`` on a CNN is the same row as ``default``.
One experiment is one sample: records with equal ``run_key`` (config, seed and numerics environment) are
deduplicated, the newest kept and the others listed.

Statistics (every one from scipy):
- per configuration: mean and sample std over seeds; the 95% interval of the mean is Student's t
  (``scipy.stats.t.interval``) for unbounded metrics and, for proportions (accuracy, ECE), a BCa bootstrap
  (Efron 1987, "Better bootstrap confidence intervals"; ``scipy.stats.bootstrap``), which never leaves
  the range of the data and so never leaves 0-100 %;
- against the baseline: Welch's unequal-variance t-test and its Welch-Satterthwaite interval (Welch 1947,
  "The generalization of Student's problem when several different population variances are involved";
  ``scipy.stats.ttest_ind(equal_var=False)``); no p-value unless both groups have at least two values
  and non-zero variance;
- across the comparisons of one table: Holm's step-down correction (Holm 1979, "A simple sequentially
  rejective multiple test procedure"), or Benjamini-Hochberg (1995) with ``correction="bh"``
  (``scipy.stats.false_discovery_control``); marks use the adjusted p-values;
- configurations with fewer than the task's ``min_seeds`` seeds are shown apart: no rank, no mark, no Pareto
  star, not part of the corrected family.

The cross-task performance profile follows AlgoPerf (Dahl et al. 2023, "Benchmarking Neural Network Training
Algorithms") and Dolan & More 2002 ("Benchmarking optimization software with performance profiles"), over
the tasks on which each configuration was run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

try:  # 2-3x faster parsing of 10^4 records; optional, json is the fallback
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads
from scipy import stats

from harness.errors import ConfigError
from harness.records import TECHNIQUE_GROUPS, task_identity, technique_identity

SCHEMA_VERSION = 1  # the newest record schema this module reads (harness.records.SCHEMA_VERSION)
RECORD_NAME = "result.json"
STATUSES = ("ok", "diverged", "failed")
FORMATS = ("md", "csv", "html")
CORRECTIONS = {"holm": "Holm-Bonferroni", "bh": "Benjamini-Hochberg"}
ALPHA = 0.05  # significance level of the marks (on corrected p-values)
CONFIDENCE = 0.95
MIN_SEEDS = 3  # default of task.min_seeds
TAU_MAX = 4.0  # performance-profile range tau in [1, TAU_MAX], as in AlgoPerf
N_BOOT = 2000  # bootstrap resamples of a proportion's interval
NEUTRAL = {"none", "default", "auto", "", "null", "None"}  # choices that mean "technique not used"
PRIMARY = ("test_acc", "test_ppl", "val_ppl")  # legacy records (no task.metric): first one present
PROPORTIONS = ("acc", "top1", "top5", "ece", "mce")  # metrics in [0, 1], shown in %
# secondary metrics shown in the tables when present, in this order (csv keeps every metric); the
# post-hoc calibration metrics (*_after*) have their own table
SECONDARY = ("test_top5", "test_ece", "test_nll", "test_brier", "test_aurc", "val_acc", "val_ppl")
_HIGHER = ("acc", "top1", "top5", "per_s", "mfu", "auroc", "f1", "score")
_LOWER = ("loss", "ppl", "ece", "mce", "nll", "brier", "aurc", "error", "err", "time", "_s", "bytes", "memory")
BUDGET_KEYS = ("epochs", "max_steps", "batch_size")


def guess_direction(metric: str) -> str | None:
    """Legacy records (no ``metric_directions``): a metric's direction from its name; None if unknown."""
    m = metric.lower()
    if any(h in m for h in _HIGHER):
        return "max"
    if any(lo in m for lo in _LOWER):
        return "min"
    return None


def is_proportion(metric: str) -> bool:
    base = metric.split("_after")[0]
    return any(base.endswith(p) or f"_{p}_" in base for p in PROPORTIONS)


# ----------------------------------------------------------------------------- reading


@dataclass
class Problem:
    path: str
    reason: str


@dataclass
class Run:
    """The parts of one record the leaderboard uses."""

    path: str
    task_key: str
    task_name: str
    budget: str
    identity: dict
    task: dict  # the record's task (metric, direction, split, min_seeds, ...)
    legacy_task: bool  # no task.key: identity computed from the config
    key: str
    label: str
    choices: dict
    tconfig: dict
    baseline: dict | None
    seed: Any
    status: str
    error: str | None
    run_dir: str
    run_key: str | None
    environment: dict | None
    finished: str
    metrics: dict
    directions: dict
    timing: dict
    throughput: dict
    memory: dict
    curve: list
    reliability: dict | None
    study: dict | None = None

    @property
    def task_id(self) -> str:
        return f"{self.task_name}@{self.budget}" if self.budget else self.task_name


def find_records(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Every ``result.json`` under ``root`` (os.scandir walk: much faster than glob on 10^4 runs)."""
    skip_real = {os.path.realpath(s) for s in skip}
    out, stack = [], [os.fspath(root)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith(".") and e.name != "wandb" and os.path.realpath(e.path) not in skip_real:
                        stack.append(e.path)
                elif e.name == RECORD_NAME:
                    out.append(e.path)
    return sorted(out)


_OBJ, _LIST, _STR, _INT, _NONE = dict, list, str, int, type(None)
# the record schema as far as the leaderboard reads it: field -> allowed types (None = may be absent/null)
SCHEMA: dict[str, tuple[type, ...]] = {
    "task": (_OBJ,),
    "technique": (_OBJ,),
    "metrics": (_OBJ, _NONE),
    "timing": (_OBJ, _NONE),
    "throughput": (_OBJ, _NONE),
    "memory": (_OBJ, _NONE),
    "curve": (_LIST, _NONE),
    "config": (_OBJ, _NONE),
    "choices": (_OBJ, _NONE),
    "techniques": (_OBJ, _NONE),
    "reliability": (_OBJ, _NONE),
    "environment": (_OBJ, _NONE),
    "metric_directions": (_OBJ, _NONE),
    "study": (_OBJ, _NONE),
    "run_key": (_STR, _NONE),
    "run_dir": (_STR, _NONE),
    "error": (_STR, _NONE),
    "finished_at": (_STR, _NONE),
    "seed": (_INT, _STR, _NONE),
    "task.name": (_STR,),
    "task.budget": (_STR, _NONE),
    "task.key": (_STR, _NONE),
    "task.identity": (_OBJ, _NONE),
    "task.baseline": (_OBJ, _NONE),
    "task.metric": (_STR, _NONE),
    "task.direction": (_STR, _NONE),
    "task.report_split": (_STR, _NONE),
    "task.min_seeds": (_INT, _NONE),
    "technique.key": (_STR,),
    "technique.config": (_OBJ, _NONE),
    "technique.choices": (_OBJ, _NONE),
    "timing.time_to_target_s": (int, float, _NONE),
    "timing.total_s": (int, float, _NONE),
    "memory.peak_bytes": (int, float, _NONE),
}
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def validate(rec: Any) -> None:
    """Check a decoded record against ``SCHEMA``; raise ValueError naming the first field that does not fit."""
    if not isinstance(rec, dict):
        raise ValueError(f"top level is {type(rec).__name__}, not an object")
    ver = rec.get("schema_version")
    if ver is None:
        raise ValueError("no schema_version (not a harness record, or written before schema 1)")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver > SCHEMA_VERSION:
        raise ValueError(f"schema_version {ver!r} is newer than this harness reads ({SCHEMA_VERSION}); upgrade harness")
    if ver < 1:
        raise ValueError(f"schema_version {ver!r} is not a known schema (1..{SCHEMA_VERSION})")
    status = rec.get("status")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    for name, types in SCHEMA.items():
        parent, _, child = name.rpartition(".")
        holder = rec.get(parent) if parent else rec
        if not isinstance(holder, dict):
            continue  # the parent's own check reports it
        if child not in holder and _NONE in types:
            continue
        v = holder.get(child)
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join(_TYPE_NAMES.get(t, "null") for t in types)
            if child not in holder or v is None:
                raise ValueError(f"missing {name} ({want})")
            raise ValueError(f"field {name} is {_type_name(v)} ({_short(v)}), expected {want}")
    if not rec["task"]["name"]:
        raise ValueError("missing task.name")
    if not rec["technique"]["key"]:
        raise ValueError("missing technique.key")
    curve = rec.get("curve") or []
    if not all(type(p) is dict for p in curve):
        i, p = next((i, p) for i, p in enumerate(curve) if not isinstance(p, dict))
        raise ValueError(f"field curve[{i}] is {_type_name(p)}, expected an object")
    for m, d in (rec.get("metric_directions") or {}).items():
        if d not in ("max", "min"):
            raise ValueError(f"metric_directions.{m} is {d!r}, expected 'max' or 'min'")
    if rec["task"].get("direction") not in (None, "max", "min"):
        raise ValueError(f"task.direction is {rec['task']['direction']!r}, expected 'max' or 'min'")


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def legacy_identity(rec: dict) -> dict:
    """A task identity for a record without ``task.key``: ``harness.records.task_identity`` of its resolved
    config (the same identity, and so the same key, a new record of that config carries); records with no
    model/dataset config fall back to name, budget and batch size."""
    cfg, task = rec.get("config"), rec["task"]
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("dataset"), dict):
        if not isinstance(cfg.get("trainer"), dict):
            cfg = {**cfg, "trainer": {k: task.get(k) for k in BUDGET_KEYS}}
        return task_identity(cfg)
    return {"task": task["name"], "budget": task.get("budget"), "batch_size": task.get("batch_size")}


def identity_key(identity: dict) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


_TECH_CACHE: dict[tuple, dict] = {}


def _technique(tech: dict, rec: dict) -> dict:
    """Key and label recomputed from the record's own technique config (stable for old records too)."""
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    family = model.get("family")
    choices = tech.get("choices") or rec.get("choices") or {}
    tconfig = tech.get("config") or {g: cfg[g] for g in TECHNIQUE_GROUPS if isinstance(cfg.get(g), dict)}
    memo = (tech["key"], family, json.dumps(choices, sort_keys=True, default=str))
    hit = _TECH_CACHE.get(memo)
    if hit is None:
        if tconfig:
            hit = technique_identity(tconfig, choices, family)
        else:  # nothing to recompute from: the record's own key and label
            hit = {"key": tech["key"], "label": str(tech.get("label") or tech["key"]), "choices": choices}
        hit = {**hit, "tconfig": tconfig}
        _TECH_CACHE[memo] = hit
    return hit


def parse_record(path: str, rec: Any) -> Run:
    """Check one decoded record against the schema and extract a Run; raises ValueError with the reason."""
    validate(rec)
    task, tech = rec["task"], rec["technique"]
    budget = str(task.get("budget") or "")
    legacy = not task.get("key")
    identity = task.get("identity") if isinstance(task.get("identity"), dict) else legacy_identity(rec)
    t = _technique(tech, rec)
    calib = (rec.get("techniques") or {}).get("calibration") or {}
    reliability = rec.get("reliability") or (calib.get("reliability") if isinstance(calib, dict) else None)
    metrics = rec.get("metrics") or {}
    try:
        finished = str(rec.get("finished_at") or "") + f"|{os.stat(path).st_mtime_ns:020d}"
    except OSError:
        finished = str(rec.get("finished_at") or "")
    return Run(
        path=path,
        task_key=str(task.get("key") or identity_key(identity)),
        task_name=str(task["name"]),
        budget=budget,
        identity=identity,
        task=task,
        legacy_task=legacy,
        key=t["key"],
        label=t["label"],
        choices=t["choices"],
        tconfig=t["tconfig"],
        baseline=task.get("baseline"),
        seed=rec.get("seed"),
        status=rec["status"],
        error=rec.get("error"),
        run_dir=str(rec.get("run_dir") or os.path.dirname(path)),
        run_key=rec.get("run_key"),
        environment=rec.get("environment"),
        finished=finished,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        directions=rec.get("metric_directions") or {},
        timing=rec.get("timing") or {},
        throughput=rec.get("throughput") or {},
        memory=rec.get("memory") or {},
        curve=rec.get("curve") or [],
        reliability=reliability if isinstance(reliability, dict) else None,
        study=rec.get("study"),
    )


def load_runs(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> tuple[list[Run], list[Problem]]:
    """Read and check every record under ``root``. Corrupt, truncated, unknown-schema or wrongly typed
    records become Problems (path + reason), never silently dropped and never mis-read."""
    runs, problems = [], []
    for path in find_records(root, skip):
        try:
            with open(path, "rb") as f:
                rec = _loads(f.read())
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(path, f"unreadable: {e}"))
            continue
        except ValueError as e:  # json.JSONDecodeError and orjson.JSONDecodeError are ValueErrors
            problems.append(Problem(path, f"corrupt or truncated JSON: {e}"))
            continue
        try:
            runs.append(parse_record(path, rec))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            problems.append(Problem(path, str(e)))
    _adopt_keys(runs)
    return runs, problems


def _adopt_keys(runs: list[Run]) -> None:
    """A legacy record whose computed identity equals a new record's ``task.identity`` joins that task."""
    if not any(r.legacy_task for r in runs) or all(r.legacy_task for r in runs):
        return
    known = {json.dumps(r.identity, sort_keys=True, default=str): r.task_key for r in runs if not r.legacy_task}
    for r in runs:
        if r.legacy_task:
            r.task_key = known.get(json.dumps(r.identity, sort_keys=True, default=str), r.task_key)


@dataclass
class Duplicate:
    kept: Run
    dropped: Run


def dedupe(runs: list[Run]) -> tuple[list[Run], list[Duplicate]]:
    """One experiment, one sample: of the records with the same ``run_key`` keep the newest (``finished_at``,
    then file time) and list the rest."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    out: list[Run] = []
    for r in runs:
        (by_key[r.run_key].append(r) if r.run_key else out.append(r))
    dups = []
    for rs in by_key.values():
        rs.sort(key=lambda r: (r.finished, r.path))
        out.append(rs[-1])
        dups += [Duplicate(rs[-1], d) for d in rs[:-1]]
    out.sort(key=lambda r: r.path)
    return out, dups


# ----------------------------------------------------------------------------- baseline


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def match_baseline(spec: dict, cands: dict[str, Run], n_runs: Counter) -> tuple[str | None, str]:
    """The technique key that the task's ``baseline`` spec names, and a note on how it was chosen.

    Group keys (optimizer, schedule, ...) must equal the technique's choices; other keys (lr,
    weight_decay, ...) are hyper-parameters looked up in the technique groups' configs. Among the
    matches, the one with the fewest other techniques switched on (everything else none/default) wins,
    then the one with the most runs."""
    groups = set(TECHNIQUE_GROUPS)
    gspec = {k: v for k, v in spec.items() if k in groups}
    hspec = {k: v for k, v in spec.items() if k not in groups}
    found = [r for r in cands.values() if all(str(r.choices.get(g)) == str(v) for g, v in gspec.items())]
    if not found:
        return None, f"no run matches the baseline {_spec_str(spec)}"

    def hp_ok(r: Run) -> bool:
        for k, v in hspec.items():
            vals = [cfg.get(k) for g, cfg in r.tconfig.items() if isinstance(cfg, dict) and k in cfg]
            if not vals or not any(_same(x, v) for x in vals):
                return False
        return True

    exact = [r for r in found if hp_ok(r)]
    note = ""
    if hspec and not exact:
        note = f"; no run has {_spec_str(hspec)}, matched on {_spec_str(gspec)} only"
    pool = exact or found

    def others(r: Run) -> int:
        return sum(str(v) not in NEUTRAL for g, v in r.choices.items() if g not in gspec)

    pool.sort(key=lambda r: (others(r), -n_runs[r.key], r.key))
    if len(pool) > 1:
        note += f"; {len(pool)} configurations match, chose the one with fewest other techniques and most runs"
    return pool[0].key, f"baseline {_spec_str(spec)}{note}"


def _spec_str(spec: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in spec.items()) + "}"


# ----------------------------------------------------------------------------- statistics


def mean_interval(values, proportion: bool = False, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``values``: BCa bootstrap (Efron 1987, ``scipy.stats.bootstrap``) for a
    proportion, which stays within the data's range and so within [0, 1]; Student's t
    (``scipy.stats.t.interval``) otherwise. NaN with fewer than two values; a point when all are equal."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    if np.ptp(v) == 0:
        return float(v[0]), float(v[0])
    if not proportion:
        lo, hi = stats.t.interval(CONFIDENCE, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
        return float(lo), float(hi)
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on 2-3 values can be degenerate: fall back to percentile
        for method in ("BCa", "percentile"):
            ci = stats.bootstrap(
                (v,), np.mean, confidence_level=CONFIDENCE, n_resamples=N_BOOT, method=method, rng=rng, vectorized=True
            ).confidence_interval
            if np.isfinite(ci.low) and np.isfinite(ci.high):
                return float(max(ci.low, v.min())), float(min(ci.high, v.max()))
    return math.nan, math.nan


def compare(a, b, proportion: bool = False) -> dict[str, Any]:
    """mean(a) - mean(b) with Welch's t-test (Welch 1947, ``scipy.stats.ttest_ind(equal_var=False)``): the
    difference, its 95% Welch-Satterthwaite interval, the two-sided p-value, and ``why`` when there is no
    p-value (a side with fewer than two values, or without variance: a t statistic would be undefined or
    infinite). For proportions the interval is clipped to the feasible range [-mean(b), 1 - mean(b)]."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"delta": math.nan, "delta_lo": math.nan, "delta_hi": math.nan, "p_value": math.nan, "why": ""}
    if not len(a) or not len(b):
        out["why"] = "no values"
        return out
    out["delta"] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        out["why"] = "fewer than 2 seeds"
        return out
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        out["why"] = "no variance" + (" in the baseline" if np.ptp(b) == 0 else "")
        return out
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    lo, hi = float(ci.low), float(ci.high)
    if proportion:
        lo, hi = max(lo, -float(b.mean())), min(hi, 1.0 - float(b.mean()))
    out.update(delta_lo=lo, delta_hi=hi, p_value=float(res.pvalue))
    return out


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): sort ascending, multiply the i-th smallest by (m - i),
    enforce monotonicity, cap at 1. NaN entries are not part of the family and stay NaN."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adj
    return out


def adjust(p, correction: str = "holm") -> np.ndarray:
    """Adjusted p-values over one table's comparisons: Holm (default) or Benjamini-Hochberg
    (``scipy.stats.false_discovery_control``)."""
    p = np.asarray(p, float)
    if correction == "holm":
        return holm(p)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of non-dominated rows of ``points`` (every column: lower is better)."""
    ok = np.isfinite(points).all(1)
    front = np.zeros(len(points), bool)
    for i in np.flatnonzero(ok):
        p = points[i]
        dominated = ((points[ok] <= p).all(1) & (points[ok] < p).any(1)).any()
        front[i] = not dominated
    return front


# ----------------------------------------------------------------------------- the leaderboard


@dataclass
class TaskBoard:
    task_key: str
    name: str
    budget: str
    metric: str
    higher: bool
    baseline_key: str | None
    baseline_note: str
    table: pd.DataFrame  # one row per technique configuration: ranked rows best first, then unranked ones
    runs: list[Run]
    bad_runs: list[Run]  # failed and diverged runs, listed in every output
    secondary: list[str]
    objectives: list[str]  # the columns the Pareto front was computed on
    labels: dict[str, str] = field(default_factory=dict)  # key -> display label
    primary: str = ""  # the task's primary metric (kept beside when ranking by another)
    min_seeds: int = MIN_SEEDS
    correction: str = "holm"
    n_comparisons: int = 0
    calibration: pd.DataFrame | None = None  # post-hoc calibrators: before/after and Δ vs the baseline
    duplicates: list[Duplicate] = field(default_factory=list)
    variant: str = ""  # what sets this task apart from others of the same name ("" when it is the only one)
    variant_note: str = ""
    notes: list[str] = field(default_factory=list)  # legacy fallbacks, mixed environments, ...
    slug_suffix: str = ""

    @property
    def task_id(self) -> str:
        return f"{self.name}@{self.budget}" if self.budget else self.name

    @property
    def slug(self) -> str:
        s = f"{self.name}_{self.budget}" if self.budget else self.name
        s += f"_{self.slug_suffix}" if self.slug_suffix else ""
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)

    @property
    def title(self) -> str:
        t = f"{self.name} · {self.budget}" if self.budget else self.name
        return f"{t} · {self.variant}" if self.variant else t

    @property
    def ranked(self) -> pd.DataFrame:
        return self.table[self.table["ranked"]]

    @property
    def unranked(self) -> pd.DataFrame:
        return self.table[~self.table["ranked"]]


@dataclass
class Leaderboard:
    boards: list[TaskBoard]
    problems: list[Problem]
    n_records: int
    profile: pd.DataFrame | None  # technique x {score, tasks run, reached}
    profile_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    duplicates: list[Duplicate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    correction: str = "holm"
    n_profile_tasks: int = 0


def _most_common(values: list[Any], default: Any = None) -> Any:
    vals = [v for v in values if v is not None]
    if not vals:
        return default
    if all(isinstance(v, (str, int, float)) for v in vals):
        return Counter(vals).most_common(1)[0][0]
    enc = [json.dumps(v, sort_keys=True, default=str) for v in vals]
    return json.loads(Counter(enc).most_common(1)[0][0])


def primary_metric(runs: list[Run]) -> tuple[str | None, str | None]:
    """(metric, direction) of a task: ``f"{report_split}_{metric}"`` and ``direction`` from the records'
    task; legacy records: the first of PRIMARY present, direction None (guessed later, with a warning)."""
    m = _most_common([r.task.get("metric") for r in runs])
    if m:
        split = _most_common([r.task.get("report_split") for r in runs], "test")
        return f"{split}_{m}", _most_common([r.task.get("direction") for r in runs])
    present = set().union(*(r.metrics for r in runs)) if runs else set()
    return next((m for m in PRIMARY if m in present), None), None


class Directions:
    """Direction of each metric: from the records' ``metric_directions`` (or ``task.direction`` for the
    primary); legacy records fall back to the metric's name, with one warning per metric."""

    def __init__(self, warn: list[str]):
        self.warn = warn
        self.warned: set[str] = set()

    def higher(self, metric: str, runs: list[Run], primary: tuple[str | None, str | None] = (None, None)) -> bool:
        d = _most_common([r.directions.get(metric) for r in runs])
        if d is None and metric == primary[0]:
            d = primary[1]
        if d is None:
            d = guess_direction(metric)
            if metric not in self.warned:
                self.warned.add(metric)
                self.warn.append(
                    f"direction of {metric} is not in the records (metric_directions; written before it existed): "
                    + (
                        f"guessed {'higher' if d == 'max' else 'lower'} is better from its name"
                        if d
                        else "unknown, assuming higher is better"
                    )
                )
        return d != "min"


def _metric_frame(ok: list[Run], metrics: list[str]) -> pd.DataFrame:
    df = pd.DataFrame([r.metrics for r in ok], columns=metrics, dtype=float)
    df["key"] = [r.key for r in ok]
    df["total_s"] = [_num(r.timing.get("total_s")) for r in ok]
    df["time_to_target_s"] = [_num(r.timing.get("time_to_target_s")) for r in ok]
    df["samples_per_s"] = [_num(r.throughput.get("samples_per_s")) for r in ok]
    df["tokens_per_s"] = [_num(r.throughput.get("tokens_per_s")) for r in ok]
    df["peak_bytes"] = [_num(r.memory.get("peak_bytes")) for r in ok]
    return df.replace([np.inf, -np.inf], np.nan)


CALIBRATED = ("test_ece", "test_nll")  # metrics with *_after[_<calibrator>] variants


def calibrators(present: set[str]) -> list[str]:
    """Post-hoc calibrators in the metrics: ``test_ece_after`` -> "" (single), ``test_ece_after_vector`` ->
    "vector"."""
    out = set()
    for m in present:
        for base in CALIBRATED:
            if m == f"{base}_after":
                out.add("")
            elif m.startswith(f"{base}_after_"):
                out.add(m[len(base) + 7 :])
    return sorted(out)


def build_task(
    task_runs: list[Run],
    metric: str | None,
    baseline: str | None,
    dirs: Directions,
    correction: str = "holm",
    duplicates: list[Duplicate] | None = None,
) -> TaskBoard:
    r0 = task_runs[0]
    name = _most_common([r.task_name for r in task_runs])
    present = set().union(*(r.metrics for r in task_runs))
    primary = primary_metric(task_runs)
    metric = metric or primary[0]
    notes: list[str] = []
    if metric is None:  # e.g. every run failed: still list the task, its status counts and its failures
        dirs.warn.append(
            f"task {r0.task_id}: none of {', '.join(PRIMARY)} is in its records (metrics: "
            f"{', '.join(sorted(present)) or 'none'}); showing status only, --metric picks another"
        )
        metric = PRIMARY[0]
    higher = dirs.higher(metric, task_runs, primary)
    min_seeds = int(_most_common([r.task.get("min_seeds") for r in task_runs], MIN_SEEDS))
    if any(r.legacy_task for r in task_runs):
        notes.append(
            "some records carry no task key (written before it existed): their task identity was computed "
            "from their resolved model, dataset and budget"
        )
    envs = Counter(_env_str(r.environment) for r in task_runs if r.status == "ok")
    if len(envs) > 1:
        notes.append(
            "runs come from different numerics environments ("
            + "; ".join(f"{e}: {n}" for e, n in sorted(envs.items()))
            + "): results may differ in the last digits"
        )
    by_key: dict[str, list[Run]] = defaultdict(list)
    for r in task_runs:
        by_key[r.key].append(r)
    n_runs = Counter({k: len(v) for k, v in by_key.items()})
    first = {k: v[0] for k, v in by_key.items()}
    labels = _unique_labels(first)

    # baseline: --baseline (a label, display label or key) wins over the task's own spec
    if baseline:
        hits = [k for k in by_key if baseline in (labels[k], first[k].label, k, k[:8])]
        hits.sort(key=lambda k: -n_runs[k])
        base_key = hits[0] if hits else None
        note = f"--baseline {baseline}" if hits else f"--baseline {baseline} was not run on this task"
    else:
        spec = _most_common([r.baseline for r in task_runs if r.baseline])
        if spec:
            base_key, note = match_baseline(spec, first, n_runs)
        else:
            base_key, note = None, "the records name no baseline (task.baseline is null); pass --baseline"

    cal = calibrators(present)
    after = {m for m in present if any(m.startswith(f"{b}_after") for b in CALIBRATED)}
    secondary = [m for m in SECONDARY if m in present and m != metric]
    if primary[0] and primary[0] != metric and primary[0] in present:  # ranking by another metric: keep it
        secondary = [primary[0]] + [m for m in secondary if m != primary[0]]
    extra = sorted(m for m in present if m not in secondary and m != metric)
    keys = list(by_key)
    ok = [r for r in task_runs if r.status == "ok"]
    runs_df = _metric_frame(ok, [metric, *secondary, *extra])
    g = runs_df.drop(columns="key").groupby(runs_df["key"])
    mean, std, cnt = (x.reindex(keys) for x in (g.mean(), g.std(ddof=1), g.count()))
    values = {k: v[metric].to_numpy(float) for k, v in runs_df.groupby("key")}
    prop = is_proportion(metric) and bool(runs_df[metric].dropna().between(0, 1).all())

    table = pd.DataFrame({"task": name, "budget": r0.budget, "key": keys, "label": [labels[k] for k in keys]})
    table["task_key"] = r0.task_key
    table["metric"] = metric
    table["mean"] = mean[metric].to_numpy()
    table["std"] = std[metric].to_numpy()
    table["n"] = cnt[metric].fillna(0).astype(int).to_numpy()
    cis = [mean_interval(values.get(k, []), prop, seed=i) for i, k in enumerate(keys)]
    table["ci_lo"], table["ci_hi"] = [c[0] for c in cis], [c[1] for c in cis]
    table["ranked"] = table["n"] >= min_seeds
    table["is_baseline"] = [k == base_key for k in keys]
    base_vals = values.get(base_key, np.array([])) if base_key else np.array([])
    comps = [
        compare(values.get(k, []), base_vals, prop) if base_key and k != base_key else compare([], []) for k in keys
    ]
    for c in ("delta", "delta_lo", "delta_hi", "p_value"):
        table[c] = [x[c] for x in comps]
    table["p_note"] = ["" if k == base_key else x["why"] for k, x in zip(keys, comps)]
    base_ranked = bool(base_key) and len(base_vals) >= min_seeds
    if base_key and not base_ranked:
        note += f"; the baseline has fewer than {min_seeds} seeds: no significance claims"
    family = table["ranked"] & ~table["is_baseline"] & np.isfinite(table["p_value"]) & base_ranked
    table["p_adj"] = adjust(np.where(family, table["p_value"], np.nan), correction)
    sig = np.isfinite(table["p_adj"]) & (table["p_adj"] < ALPHA)
    better = (table["delta"] > 0) == higher
    table["significant"] = sig
    table["better"] = [bool(bt) if sg else None for bt, sg in zip(better, sig)]
    table["mark"] = [("▲" if bt else "▼") if sg else "" for bt, sg in zip(better, sig)]
    table["warning"] = ["" if rk else f"n={n}<{min_seeds}" for n, rk in zip(table["n"], table["ranked"])]
    for m in secondary + extra:
        table[f"{m}_mean"] = mean[m].to_numpy()
        table[f"{m}_std"] = std[m].to_numpy()
        table[f"{m}_n"] = cnt[m].fillna(0).astype(int).to_numpy()
    for c in ("time_to_target_s", "total_s", "samples_per_s", "tokens_per_s", "peak_bytes"):
        table[c] = mean[c].to_numpy()
    table["target_reached"] = cnt["time_to_target_s"].fillna(0).astype(int).to_numpy()
    # median over seeds with "never reached" = infinity: the per-task time of the performance profile
    ttt = defaultdict(list)
    for r in ok:
        t = _num(r.timing.get("time_to_target_s"))
        ttt[r.key].append(t if math.isfinite(t) else math.inf)
    table["ttt_median_s"] = [float(np.median(ttt[k])) if ttt[k] else math.inf for k in keys]
    status = Counter((r.key, r.status) for r in task_runs)
    for st in STATUSES:
        table[st] = [status[(k, st)] for k in keys]
    table["runs"] = [len(by_key[k]) for k in keys]
    for grp in first[keys[0]].choices:
        table[f"choice_{grp}"] = [str(first[k].choices.get(grp)) for k in keys]
    budgets = [_study_budget(by_key[k]) for k in keys]
    if any(b is not None for b in budgets):
        table["tuning_budget"] = budgets

    # joint view over ranked rows: Pareto front over the objectives (lower is better after sign flip)
    objectives, cols = [], []
    calcol = next((f"{m}_mean" for m in sorted(after) if m.startswith("test_ece_after")), "test_ece_mean")
    for col, hi in (("mean", higher), ("total_s", False), (calcol, False), ("peak_bytes", False)):
        if col in table and table.loc[table["ranked"], col].notna().sum() >= 1:
            objectives.append(col)
            cols.append(-table[col].to_numpy(float) if hi else table[col].to_numpy(float))
    pts = np.stack(cols, 1) if cols else np.zeros((len(table), 0))
    pts[~table["ranked"].to_numpy()] = np.nan
    table["pareto"] = pareto_front(pts) if len(objectives) > 1 else False
    if cols:
        table["joint_rank"] = pd.DataFrame(pts).rank(method="average", na_option="keep").mean(axis=1).to_numpy()
    else:
        table["joint_rank"] = math.nan

    table["_order"] = np.where(table["ranked"], 0, 1)
    table = table.sort_values(["_order", "mean"], ascending=[True, not higher], na_position="last", kind="stable")
    table = table.drop(columns="_order").reset_index(drop=True)
    nr = int(table["ranked"].sum())
    table.insert(0, "rank", [float(i + 1) if i < nr else math.nan for i in range(len(table))])
    bad = sorted((r for r in task_runs if r.status != "ok"), key=lambda r: (r.status, labels[r.key], str(r.seed)))
    board = TaskBoard(
        task_key=r0.task_key,
        name=name,
        budget=r0.budget,
        metric=metric,
        higher=higher,
        baseline_key=base_key,
        baseline_note=note,
        table=table,
        runs=task_runs,
        bad_runs=bad,
        secondary=secondary,
        objectives=objectives,
        labels={k: labels[k] for k in keys},
        primary=primary[0] or metric,
        min_seeds=min_seeds,
        correction=correction,
        n_comparisons=int(family.sum()),
        duplicates=duplicates or [],
        notes=notes,
    )
    if cal:
        board.calibration = calibration_table(board, ok, cal, base_key, dirs, correction)
    return board


def _unique_labels(first: dict[str, Run]) -> dict[str, str]:
    """Labels come from each configuration alone; two different configurations with one label (a
    hyper-parameter the harness has no default for) get their own key's first characters appended."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for k, r in first.items():
        by_label[r.label].append(k)
    return {k: (r.label if len(by_label[r.label]) == 1 else f"{r.label} #{k[:6]}") for k, r in first.items()}


def _study_budget(runs: list[Run]) -> int | None:
    b = [r.study.get("budget") for r in runs if isinstance(r.study, dict) and isinstance(r.study.get("budget"), int)]
    return max(b) if b else None


def _env_str(env: dict | None) -> str:
    if not env:
        return "not recorded"
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items()))


def calibration_table(
    board: TaskBoard, ok: list[Run], cals: list[str], base_key: str | None, dirs: Directions, correction: str
) -> pd.DataFrame:
    """One row per (configuration, post-hoc calibrator): ECE and NLL before and after calibration (mean over
    seeds), and the after-calibration value's Δ against the baseline's uncalibrated value (Welch interval;
    p-values corrected over this table like the main one)."""
    vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ok:
        for m, v in r.metrics.items():
            vals[(r.key, m)].append(float(v))
    rows = []
    for k in board.table["key"]:
        for c in cals:
            suffix = f"_after_{c}" if c else "_after"
            if not any((k, f"{b}{suffix}") in vals for b in CALIBRATED):
                continue
            row: dict[str, Any] = {"key": k, "label": board.labels[k], "calibrator": c or "(single)"}
            for b in CALIBRATED:
                before, aft = vals.get((k, b), []), vals.get((k, f"{b}{suffix}"), [])
                base = vals.get((base_key, b), []) if base_key else []
                prop = is_proportion(b)
                cmp = compare(aft, base, prop) if base_key else compare([], [])
                row |= {
                    f"{b}_n": len(aft),
                    f"{b}_before": float(np.mean(before)) if before else math.nan,
                    f"{b}_after": float(np.mean(aft)) if aft else math.nan,
                    f"{b}_delta": cmp["delta"],
                    f"{b}_delta_lo": cmp["delta_lo"],
                    f"{b}_delta_hi": cmp["delta_hi"],
                    f"{b}_p_value": cmp["p_value"],
                }
            rows.append(row)
    if not rows:
        return None
    t = pd.DataFrame(rows)
    for b in CALIBRATED:
        hi = dirs.higher(b, board.runs)
        p = np.where(t[f"{b}_n"] >= board.min_seeds, t[f"{b}_p_value"], np.nan)
        t[f"{b}_p_adj"] = adjust(p, correction)
        sig = np.isfinite(t[f"{b}_p_adj"]) & (t[f"{b}_p_adj"] < ALPHA)
        t[f"{b}_mark"] = [("▲" if (d > 0) == hi else "▼") if s else "" for d, s in zip(t[f"{b}_delta"], sig)]
    return t


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def name_variants(boards: list[TaskBoard]) -> None:
    """Task variants sharing a name (e.g. two ``quickstart`` with different ``dataset.val_size``): title each
    by what differs, and note that they are never compared."""
    by_name: dict[str, list[TaskBoard]] = defaultdict(list)
    for b in boards:
        by_name[b.name].append(b)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        flats = [_flat(_most_common([r.identity for r in b.runs], {})) for b in group]
        keys = sorted(set().union(*flats))
        differ = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        for b, f in zip(group, flats):
            shown = [f"{k}={_fmt(f.get(k))}" for k in differ if not k.endswith(("epochs", "max_steps"))]
            b.variant = ", ".join(shown[:3]) + (" …" if len(shown) > 3 else "")
            b.slug_suffix = b.task_key[:6] if sum(x.budget == b.budget for x in group) > 1 else ""
            b.variant_note = (
                f"{len(group)} variants of task {name} differ in {', '.join(differ) or 'their task key'}; "
                "runs of different variants are never compared"
            )


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def performance_profile(boards: list[TaskBoard], taus: np.ndarray | None = None):
    """AlgoPerf performance profile on time to target (Dahl et al. 2023; Dolan & More 2002): for technique
    s, rho_s(tau) = fraction of the tasks s was run on whose time is within tau x that task's best; score =
    (1/3) * integral over tau in [1, 4] (exact, the profile is a step function). A run that did not reach
    the target counts as infinitely slow; a task a technique was never run on is not counted for it (its
    ``tasks`` column says on how many it was run). Tasks where no technique reached the target are left out.
    Techniques are matched across tasks by their technique key."""
    taus = np.linspace(1.0, TAU_MAX, 301) if taus is None else taus
    ratios: dict[str, list[float]] = defaultdict(list)
    names: dict[str, str] = {}
    n_tasks = 0
    for b in boards:
        t = b.table.set_index("key")["ttt_median_s"].astype(float)
        best = t[np.isfinite(t)].min() if np.isfinite(t).any() else math.inf
        if not math.isfinite(best) or best <= 0:
            continue
        n_tasks += 1
        for key, v in t.items():
            ratios[key].append(v / best)
            names.setdefault(key, b.labels[key])
    if not n_tasks:
        return None, {}, 0
    rows, curves = [], {}
    for key in sorted(ratios, key=lambda k: names[k]):
        r = np.array(ratios[key])
        rho = (r[None, :] <= taus[:, None]).mean(1)
        score = float(np.clip(TAU_MAX - np.maximum(r, 1.0), 0, None).sum() / ((TAU_MAX - 1) * len(r)))
        label = names[key]
        rows.append({"label": label, "key": key, "score": score, "tasks": len(r), "reached": int(np.isfinite(r).sum())})
        curves[label] = (taus, rho)
    prof = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    return prof, curves, n_tasks


def build(
    results: str | os.PathLike,
    task: str | None = None,
    metric: str | None = None,
    baseline: str | None = None,
    skip: tuple[str, ...] = (),
    correction: str = "holm",
) -> Leaderboard:
    if correction not in CORRECTIONS:
        raise ConfigError(f"--correction {correction!r} is not one of {', '.join(CORRECTIONS)}")
    all_runs, problems = load_runs(results, skip)
    n_records = len(all_runs)
    runs, dups = dedupe(all_runs)
    by_task: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_task[r.task_key].append(r)
    if task:
        chosen = {t: rs for t, rs in by_task.items() if any(task in (t, t[:6], r.task_id, r.task_name) for r in rs)}
        if not chosen:
            names = sorted({r.task_id for rs in by_task.values() for r in rs})
            raise ConfigError(f"--task {task!r} has no records; tasks found: {', '.join(names) or '(none)'}")
        by_task = chosen
    if metric:
        have = set().union(*(r.metrics for rs in by_task.values() for r in rs)) if by_task else set()
        if metric not in have:
            raise ConfigError(f"--metric {metric!r} is in no record; metrics found: {', '.join(sorted(have))}")
    warn: list[str] = []
    dirs = Directions(warn)
    dup_by_task: dict[str, list[Duplicate]] = defaultdict(list)
    for d in dups:
        dup_by_task[d.kept.task_key].append(d)
    order = sorted(by_task, key=lambda t: (by_task[t][0].task_id, t))
    boards = [build_task(by_task[t], metric, baseline, dirs, correction, dup_by_task.get(t)) for t in order]
    if baseline and boards and not any(b.baseline_key for b in boards):
        have = sorted({lab for b in boards for lab in b.table["label"]})
        raise ConfigError(f"--baseline {baseline!r} matches no technique; labels found: {', '.join(have)}")
    name_variants(boards)
    prof, curves, n_tasks = performance_profile(boards)
    labels = {k: v for b in boards for k, v in b.labels.items()}
    lb = Leaderboard(boards, problems, n_records, prof, curves, labels, dups, warn, correction, n_tasks)
    return lb


def print_warnings(lb: Leaderboard, file=None) -> None:
    file = file or sys.stderr
    for w in lb.warnings:
        print(f"warning: {w}", file=file)
