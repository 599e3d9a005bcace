"""Leaderboards: read every run record, compare each technique configuration with its task's baseline.

A *task* is model x dataset x budget (``task.name`` + ``task.budget``); a *technique configuration* is
``technique.key`` (every technique group's full config); seeds are aggregated. Statistics: mean, sample std,
95% t interval; the difference to the baseline uses Welch's unequal-variance t-test (Welch 1947, "The
generalization of Student's problem when several different population variances are involved") with its
Welch-Satterthwaite 95% interval. The performance profile follows AlgoPerf (Dahl et al. 2023, "Benchmarking
Neural Network Training Algorithms"; Dolan & More 2002, "Benchmarking optimization software with performance
profiles").
"""

from __future__ import annotations

import json
import math
import os
import sys
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

SCHEMA_VERSION = 1  # the newest record schema this module reads (harness.records.SCHEMA_VERSION)
RECORD_NAME = "result.json"
STATUSES = ("ok", "diverged", "failed")
FORMATS = ("md", "csv", "html")
ALPHA = 0.05  # significance level of the marks
TAU_MAX = 4.0  # performance-profile range tau in [1, TAU_MAX], as in AlgoPerf
NEUTRAL = {"none", "default", "auto", "", "null", "None"}  # choices that mean "technique not used"
PRIMARY = ("test_acc", "test_ppl", "val_ppl")  # first one present is a task's primary metric
# secondary metrics shown in the tables when present, in this order (csv keeps every metric)
SECONDARY = (
    "test_top5",
    "test_ece",
    "test_ece_after",
    "test_nll",
    "test_nll_after",
    "test_brier",
    "test_aurc",
    "val_acc",
    "val_ppl",
)
_HIGHER = ("acc", "top1", "top5", "per_s", "mfu", "auroc", "f1", "score")
_LOWER = ("loss", "ppl", "ece", "mce", "nll", "brier", "aurc", "error", "err", "time", "_s", "bytes", "memory")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric, from its name: accuracies and throughputs up; losses, perplexities,
    calibration errors, times and memory down."""
    m = metric.lower()
    if any(h in m for h in _HIGHER):
        return True
    if any(lo in m for lo in _LOWER):
        return False
    print(f"warning: direction of metric {metric!r} unknown, assuming higher is better", file=sys.stderr)
    return True


# ----------------------------------------------------------------------------- reading


@dataclass
class Problem:
    path: str
    reason: str


@dataclass
class Run:
    """The parts of one record the leaderboard uses."""

    path: str
    task_id: str
    task_name: str
    budget: str
    key: str
    label: str
    choices: dict
    tconfig: dict
    baseline: dict | None
    seed: Any
    status: str
    error: str | None
    run_dir: str
    metrics: dict
    timing: dict
    throughput: dict
    memory: dict
    curve: list
    reliability: dict | None


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


def parse_record(path: str, rec: Any) -> Run:
    """Check one decoded record and extract a Run; raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"top level is {type(rec).__name__}, not an object")
    ver = rec.get("schema_version")
    if ver is None:
        raise ValueError("no schema_version (not a harness record, or written before schema 1)")
    if not isinstance(ver, int) or ver > SCHEMA_VERSION:
        raise ValueError(f"schema_version {ver!r} is newer than this harness reads ({SCHEMA_VERSION}); upgrade harness")
    if ver < 1:
        raise ValueError(f"schema_version {ver!r} is not a known schema (1..{SCHEMA_VERSION})")
    task, tech = rec.get("task"), rec.get("technique")
    if not isinstance(task, dict) or not task.get("name"):
        raise ValueError("missing task.name")
    if not isinstance(tech, dict) or not tech.get("key"):
        raise ValueError("missing technique.key")
    status = rec.get("status")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    metrics = rec.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError("metrics is not an object")
    budget = str(task.get("budget") or "")
    calib = (rec.get("techniques") or {}).get("calibration") or {}
    reliability = rec.get("reliability") or (calib.get("reliability") if isinstance(calib, dict) else None)
    return Run(
        path=path,
        task_id=f"{task['name']}@{budget}" if budget else str(task["name"]),
        task_name=str(task["name"]),
        budget=budget,
        key=str(tech["key"]),
        label=str(tech.get("label") or tech["key"]),
        choices=tech.get("choices") or {},
        tconfig=tech.get("config") or {},
        baseline=task.get("baseline") if isinstance(task.get("baseline"), dict) else None,
        seed=rec.get("seed"),
        status=status,
        error=rec.get("error"),
        run_dir=str(rec.get("run_dir") or os.path.dirname(path)),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        timing=rec.get("timing") or {},
        throughput=rec.get("throughput") or {},
        memory=rec.get("memory") or {},
        curve=rec.get("curve") or [],
        reliability=reliability if isinstance(reliability, dict) else None,
    )


def load_runs(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> tuple[list[Run], list[Problem]]:
    """Read and check every record under ``root``. Corrupt, truncated or unknown-schema records become
    Problems (path + reason), never silently dropped and never mis-read."""
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
        except (ValueError, TypeError, KeyError) as e:
            problems.append(Problem(path, str(e)))
    return runs, problems


# ----------------------------------------------------------------------------- labels and baseline


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        if k in ("paper", "description", "source"):  # prose, never a difference that matters
            continue
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def display_labels(runs: list[Run]) -> dict[str, str]:
    """key -> label; keys sharing a label get the hyper-parameters in which they differ appended."""
    first: dict[str, Run] = {}
    for r in runs:
        first.setdefault(r.key, r)
    by_label: dict[str, list[Run]] = defaultdict(list)
    for r in first.values():
        by_label[r.label].append(r)
    out = {}
    for label, group in by_label.items():
        if len(group) == 1:
            out[group[0].key] = label
            continue
        flats = [_flat(r.tconfig) for r in group]
        keys = sorted(set().union(*flats))
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for r, f in zip(group, flats):
            extra = ", ".join(f"{k}={f.get(k)}" for k in differ) or r.key[:8]
            out[r.key] = f"{label} ({extra})"
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _tech_groups() -> tuple[str, ...]:
    from harness.records import TECHNIQUE_GROUPS

    return TECHNIQUE_GROUPS


def match_baseline(spec: dict, cands: dict[str, Run], n_runs: Counter) -> tuple[str | None, str]:
    """The technique key that the task's ``baseline`` spec names, and a note on how it was chosen.

    Group keys (optimizer, schedule, ...) must equal the technique's choices; other keys (lr,
    weight_decay, ...) are hyper-parameters looked up in the technique groups' configs. Among the
    matches, the one with the fewest other techniques switched on (everything else none/default) wins,
    then the one with the most runs."""
    groups = set(_tech_groups())
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


def t_interval(mean, std, n):
    """95% t interval of the mean (vectorised); NaN where n < 2."""
    mean, std, n = (np.asarray(x, float) for x in (mean, std, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(1 - ALPHA / 2, np.where(n >= 2, n - 1, np.nan)) * std / np.sqrt(n)
    return mean - half, mean + half


def welch_from_moments(mean_a, var_a, n_a, mean_b, var_b, n_b) -> dict[str, np.ndarray]:
    """Welch's t-test of mean_a - mean_b from sample moments (vectorised over configurations): the
    difference, its 95% Welch-Satterthwaite interval and the two-sided p-value. NaN where a side has
    fewer than two values or both have zero variance. Equals scipy.stats.ttest_ind(equal_var=False)."""
    ma, va, na, mb, vb, nb = (np.asarray(x, float) for x in (mean_a, var_a, n_a, mean_b, var_b, n_b))
    with np.errstate(invalid="ignore", divide="ignore"):
        sa, sb = va / na, vb / nb
        se = np.sqrt(sa + sb)
        df = (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))
        ok = (na >= 2) & (nb >= 2) & (se > 0)
        df = np.where(ok, df, np.nan)
        delta = ma - mb
        t = delta / se
        p = 2 * stats.t.sf(np.abs(t), df)
        half = stats.t.ppf(1 - ALPHA / 2, df) * se
    return {"delta": delta, "delta_lo": delta - half, "delta_hi": delta + half, "p_value": p}


def summarize(values) -> dict[str, float]:
    """mean, sample std (ddof=1), n and the 95% t interval of the mean of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    lo, hi = t_interval(mean, std, n)
    return {"mean": mean, "std": std, "n": n, "ci_lo": float(lo), "ci_hi": float(hi)}


def welch(a, b) -> dict[str, float]:
    """Welch comparison of two samples (finite values only), see welch_from_moments."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    mom = [(x.mean() if len(x) else np.nan, x.var(ddof=1) if len(x) > 1 else np.nan, len(x)) for x in (a, b)]
    return {k: float(v) for k, v in welch_from_moments(*mom[0], *mom[1]).items()}


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
    task_id: str
    name: str
    budget: str
    metric: str
    higher: bool
    baseline_key: str | None
    baseline_note: str
    table: pd.DataFrame  # one row per technique configuration, best first
    runs: list[Run]
    bad_runs: list[Run]  # failed and diverged runs, listed in every output
    secondary: list[str]
    objectives: list[str]  # the columns the Pareto front was computed on
    labels: dict[str, str] = field(default_factory=dict)  # key -> display label

    @property
    def slug(self) -> str:
        s = f"{self.name}_{self.budget}" if self.budget else self.name
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)

    @property
    def title(self) -> str:
        return f"{self.name} · {self.budget}" if self.budget else self.name


@dataclass
class Leaderboard:
    boards: list[TaskBoard]
    problems: list[Problem]
    n_records: int
    profile: pd.DataFrame | None  # technique x {score, tasks_reached, rho at tau grid}
    profile_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def primary_metric(runs: list[Run]) -> str | None:
    present = set().union(*(r.metrics for r in runs)) if runs else set()
    return next((m for m in PRIMARY if m in present), None)


def build_task(task_runs: list[Run], labels: dict[str, str], metric: str | None, baseline: str | None) -> TaskBoard:
    r0 = task_runs[0]
    present = set().union(*(r.metrics for r in task_runs))
    metric = metric or primary_metric(task_runs)
    if metric is None:  # e.g. every run failed: still list the task, its status counts and its failures
        print(
            f"warning: task {r0.task_id}: none of {', '.join(PRIMARY)} is in its records (metrics: "
            f"{', '.join(sorted(present)) or 'none'}); showing status only, --metric picks another",
            file=sys.stderr,
        )
        metric = PRIMARY[0]
    higher = higher_is_better(metric)
    by_key: dict[str, list[Run]] = defaultdict(list)
    for r in task_runs:
        by_key[r.key].append(r)
    n_runs = Counter({k: len(v) for k, v in by_key.items()})
    first = {k: v[0] for k, v in by_key.items()}

    # baseline: --baseline (a label, display label or key) wins over the task's own spec
    if baseline:
        hits = [k for k in by_key if baseline in (labels[k], first[k].label, k, k[:8])]
        hits.sort(key=lambda k: -n_runs[k])
        base_key = hits[0] if hits else None
        note = f"--baseline {baseline}" if hits else f"--baseline {baseline} was not run on this task"
    else:
        specs = Counter(json.dumps(r.baseline, sort_keys=True) for r in task_runs if r.baseline)
        if specs:
            base_key, note = match_baseline(json.loads(specs.most_common(1)[0][0]), first, n_runs)
        else:
            base_key, note = None, "the records name no baseline (task.baseline is null); pass --baseline"

    secondary = [m for m in SECONDARY if m in present and m != metric]
    extra = sorted(m for m in present if m not in secondary and m != metric)
    keys = list(by_key)
    ok = [r for r in task_runs if r.status == "ok"]
    # per-run frame of the ok runs; groupby gives every metric's mean/std/count in one pass
    runs_df = pd.DataFrame([r.metrics for r in ok], columns=[metric, *secondary, *extra], dtype=float)
    runs_df["key"] = [r.key for r in ok]
    runs_df["total_s"] = [_num(r.timing.get("total_s")) for r in ok]
    runs_df["time_to_target_s"] = [_num(r.timing.get("time_to_target_s")) for r in ok]
    runs_df["samples_per_s"] = [_num(r.throughput.get("samples_per_s")) for r in ok]
    runs_df["tokens_per_s"] = [_num(r.throughput.get("tokens_per_s")) for r in ok]
    runs_df["peak_bytes"] = [_num(r.memory.get("peak_bytes")) for r in ok]
    num = runs_df.drop(columns="key").replace([np.inf, -np.inf], np.nan)
    g = num.groupby(runs_df["key"])
    mean, std, cnt = (x.reindex(keys) for x in (g.mean(), g.std(ddof=1), g.count()))

    table = pd.DataFrame({"task": r0.task_name, "budget": r0.budget, "key": keys, "label": [labels[k] for k in keys]})
    table["metric"] = metric
    table["mean"] = mean[metric].to_numpy()
    table["std"] = std[metric].to_numpy()
    table["n"] = cnt[metric].fillna(0).astype(int).to_numpy()
    table["ci_lo"], table["ci_hi"] = t_interval(table["mean"], table["std"], table["n"])
    table["is_baseline"] = [k == base_key for k in keys]
    if base_key is not None:
        b = keys.index(base_key)
        w = welch_from_moments(table["mean"], table["std"] ** 2, table["n"],
                               table["mean"].iloc[b], table["std"].iloc[b] ** 2, table["n"].iloc[b])  # fmt: skip
        for c, v in w.items():
            table[c] = np.where(table["is_baseline"], np.nan, v)
    else:
        for c in ("delta", "delta_lo", "delta_hi", "p_value"):
            table[c] = np.nan
    sig = np.isfinite(table["p_value"]) & (table["p_value"] < ALPHA)
    better = (table["delta"] > 0) == higher
    table["significant"] = sig
    table["better"] = [bool(bt) if sg else None for bt, sg in zip(better, sig)]
    table["mark"] = [("▲" if bt else "▼") if sg else "" for bt, sg in zip(better, sig)]
    table["warning"] = [f"n={n}<3" if n < 3 else "" for n in table["n"]]
    for m in secondary + extra:
        table[f"{m}_mean"] = mean[m].to_numpy()
        table[f"{m}_std"] = std[m].to_numpy()
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

    # joint view: Pareto front over the objectives every configuration has (lower is better after sign flip)
    objectives, cols = [], []
    cal = "test_ece_after_mean" if "test_ece_after_mean" in table else "test_ece_mean"
    for col, hi in (("mean", higher), ("total_s", False), (cal, False), ("peak_bytes", False)):
        if col in table and table[col].notna().sum() >= 1:
            objectives.append(col)
            cols.append(-table[col].to_numpy(float) if hi else table[col].to_numpy(float))
    pts = np.stack(cols, 1) if cols else np.zeros((len(table), 0))
    table["pareto"] = pareto_front(pts) if len(objectives) > 1 else False
    ranks = pd.DataFrame(pts).rank(method="average", na_option="bottom") if cols else pd.DataFrame()
    table["joint_rank"] = ranks.mean(axis=1).to_numpy() if cols else math.nan

    table = table.sort_values(["mean"], ascending=not higher, na_position="last", kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    bad = sorted((r for r in task_runs if r.status != "ok"), key=lambda r: (r.status, labels[r.key], str(r.seed)))
    return TaskBoard(
        task_id=r0.task_id,
        name=r0.task_name,
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
    )


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def performance_profile(boards: list[TaskBoard], taus: np.ndarray | None = None):
    """AlgoPerf performance profile on time to target: rho_s(tau) = fraction of tasks whose time for
    technique s is within tau x the task's best; score = (1/3) * integral over tau in [1, 4] (exact, the
    profile is a step function). A technique not run, or not reaching the target, on a task counts as
    infinitely slow there. Tasks where no technique reached the target are left out."""
    taus = np.linspace(1.0, TAU_MAX, 301) if taus is None else taus
    ratios: dict[str, list[float]] = defaultdict(list)
    tasks = []
    for b in boards:
        t = b.table.set_index("label")["ttt_median_s"].astype(float)
        best = t[np.isfinite(t)].min() if np.isfinite(t).any() else math.inf
        if not math.isfinite(best) or best <= 0:
            continue
        tasks.append(b)
        for label, v in t.items():
            ratios[label].append(v / best)
    if not tasks:
        return None, {}
    rows, curves = [], {}
    for label in sorted(ratios):
        r = np.array(ratios[label] + [math.inf] * (len(tasks) - len(ratios[label])))
        rho = (r[None, :] <= taus[:, None]).mean(1)
        score = float(np.clip(TAU_MAX - np.maximum(r, 1.0), 0, None).sum() / ((TAU_MAX - 1) * len(tasks)))
        rows.append({"label": label, "score": score, "tasks": len(tasks), "reached": int(np.isfinite(r).sum())})
        curves[label] = (taus, rho)
    prof = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    return prof, curves


def build(
    results: str | os.PathLike,
    task: str | None = None,
    metric: str | None = None,
    baseline: str | None = None,
    skip: tuple[str, ...] = (),
) -> Leaderboard:
    runs, problems = load_runs(results, skip)
    n_records = len(runs)
    labels = display_labels(runs)
    by_task: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_task[r.task_id].append(r)
    if task:
        chosen = {t: rs for t, rs in by_task.items() if task in (t, rs[0].task_name)}
        if not chosen:
            names = sorted({rs[0].task_name for rs in by_task.values()} | set(by_task))
            raise ConfigError(f"--task {task!r} has no records; tasks found: {', '.join(names) or '(none)'}")
        by_task = chosen
    if metric:
        have = set().union(*(r.metrics for rs in by_task.values() for r in rs)) if by_task else set()
        if metric not in have:
            raise ConfigError(f"--metric {metric!r} is in no record; metrics found: {', '.join(sorted(have))}")
    boards = [build_task(rs, labels, metric, baseline) for _, rs in sorted(by_task.items())]
    if baseline and boards and not any(b.baseline_key for b in boards):
        have = sorted({lab for b in boards for lab in b.table["label"]})
        raise ConfigError(f"--baseline {baseline!r} matches no technique; labels found: {', '.join(have)}")
    prof, curves = performance_profile(boards)
    return Leaderboard(boards, problems, n_records, prof, curves, labels)
