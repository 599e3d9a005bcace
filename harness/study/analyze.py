"""Selection, statistics and the verdict of a study.

* Selection: each arm's best tuning trial on the task's metric **on the validation split** (a diverged
  or failed trial is never selected); ties go to the earlier trial.
* Statistics over the fresh seeds of each arm: mean, sample standard deviation, 95% t interval; the
  difference to the baseline with a percentile bootstrap 95% interval (Efron & Tibshirani 1993) and
  Welch's unequal-variance t-test (Welch 1947), Holm–Bonferroni-corrected over the arms (Holm 1979,
  "A simple sequentially rejective multiple test procedure"); no p-value without variance in both groups;
  the probability of improvement P(X_arm better than X_baseline) over all seed pairs (the Mann–Whitney
  statistic; Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice").
* Verdict: ``reproduced`` when the criterion holds at the study's level, ``contradicted`` when its
  opposite does, ``inconclusive`` otherwise, with the seeds per arm a two-sided test at the observed
  variance would need for 80% power.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from harness.analysis import leaderboard as L
from harness.records import METRIC_DIRECTIONS
from harness.study.plan import Job
from harness.study.spec import Study

POWER = 0.8
RUN_QUANTITIES = ("effective_epochs", "sample_passes")  # top-level record fields, lower is cheaper


def task_info(records: list[dict[str, Any] | None]) -> dict[str, Any]:
    for r in records:
        if r and r.get("task"):
            return r["task"]
    return {"metric": "acc", "direction": "max", "split": "val", "report_split": "test"}


def direction_of(metric: str, task: dict[str, Any]) -> str:
    base = metric.split("_", 1)[1] if metric.startswith(("val_", "test_", "train_")) else metric
    base = base.split("_after")[0]
    if base == task.get("metric"):
        return task.get("direction", "max")
    return METRIC_DIRECTIONS.get(base, "max")


def better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def select(study: Study, jobs: list[Job], recs: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Each arm's selected hyper-parameters (``{}``: its published defaults when the budget is 0): the best
    trial on the task's validation metric; ties (a small validation split saturates) go to the lower
    validation loss, then to the earlier trial."""
    if study.budget == 0:
        return {a.name: {} for a in study.arms}
    task = task_info(list(recs.values()))
    metric = f"{task['split']}_{task['metric']}"
    sign = 1.0 if task["direction"] == "max" else -1.0
    out: dict[str, dict[str, Any]] = {}
    for arm in study.arms:
        best = None
        for job in (j for j in jobs if j.arm == arm.name):
            rec = recs.get(job.label)
            m = (rec or {}).get("metrics") or {}
            value = m.get(metric) if rec and rec.get("status") == "ok" else None
            if value is None or not math.isfinite(value):
                continue
            loss = m.get(f"{task['split']}_loss")
            key = (sign * value, -loss if isinstance(loss, (int, float)) and math.isfinite(loss) else -math.inf)
            if best is None or key > best[0]:
                best = (key, job)
        if best is not None:
            out[arm.name] = dict(best[1].params)
    return out


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm–Bonferroni adjusted p-values by arm (None stays None and is not counted): the leaderboard's
    ``holm``, so a study and a leaderboard over the same records agree."""
    names = list(pvalues)
    adj = L.holm([math.nan if pvalues[k] is None else pvalues[k] for k in names])
    return {k: (None if not math.isfinite(v) else float(v)) for k, v in zip(names, adj)}


def summary(values: list[float], proportion: bool = False) -> dict[str, Any]:
    """Mean, sample std and the leaderboard's 95% interval of the mean (BCa bootstrap for proportions,
    Student's t otherwise)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    out: dict[str, Any] = {
        "n": n,
        "mean": float(x.mean()) if n else None,
        "std": float(x.std(ddof=1)) if n > 1 else None,
    }
    lo, hi = L.mean_interval(x, proportion=proportion)
    out["ci"] = [lo, hi] if n > 1 and math.isfinite(lo) and lo != hi else None
    return out


def compare(a: list[float], b: list[float], direction: str, alpha: float) -> dict[str, Any]:
    """Arm ``a`` against ``b``: difference of means (raw units) and Welch's p-value as the leaderboard
    computes them, a percentile bootstrap interval of the difference, and P(improvement) over seed pairs."""
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    welch = L.compare(xa, xb)
    out: dict[str, Any] = {"delta": welch["delta"] if math.isfinite(welch["delta"]) else None}
    out["p"] = welch["p_value"] if math.isfinite(welch["p_value"]) else None
    out["delta_ci"] = None
    if len(xa) > 1 and len(xb) > 1 and (xa.std() > 0 or xb.std() > 0):
        res = stats.bootstrap(
            (xa, xb), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            n_resamples=4000, method="percentile", random_state=0, vectorized=True,
        )  # fmt: skip
        out["delta_ci"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    if len(xa) and len(xb):
        wins = sum(1.0 if better(x, y, direction) else 0.5 if x == y else 0.0 for x in xa for y in xb)
        out["prob_improvement"] = wins / (len(xa) * len(xb))
    else:
        out["prob_improvement"] = None
    return out


def welch_interval(a: list[float], b: list[float], level: float) -> list[float] | None:
    """Welch–Satterthwaite interval of mean(a) - mean(b)."""
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    if len(xa) < 2 or len(xb) < 2:
        return None
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    d = float(xa.mean() - xb.mean())
    if se == 0:
        return [d, d]
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    lo, hi = stats.t.interval(level, df, loc=d, scale=se)
    return [float(lo), float(hi)]


def seeds_needed(a: list[float], b: list[float], effect: float, alpha: float) -> int | None:
    """Seeds per arm for a two-sided test at level ``alpha`` with 80% power to detect ``effect`` at the
    observed pooled standard deviation (normal approximation)."""
    if len(a) < 2 or len(b) < 2 or not effect:
        return None
    sd = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    if sd == 0:
        return None
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)
    return max(2, int(math.ceil(2 * (z * sd / abs(effect)) ** 2)))


def _u(metric: str, v: float, signed: bool = True) -> str:
    """A value of ``metric`` as the report shows it (accuracies in percentage points)."""
    if metric.endswith(("_acc", "_top5")):
        return f"{100 * v:+.2f} pp" if signed else f"{100 * v:.2f} pp"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def _values(runs: list[dict[str, Any]], metric: str) -> list[float]:
    return [
        r["metrics"][metric] for r in runs if r["status"] == "ok" and isinstance(r["metrics"].get(metric), (int, float))
    ]


def analyze(
    study: Study,
    tune: list[Job],
    tune_recs: dict[str, dict[str, Any] | None],
    seeds: list[Job],
    seed_recs: dict[str, dict[str, Any] | None],
    selected: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    task = task_info([*seed_recs.values(), *tune_recs.values()])
    metric = f"{task['report_split']}_{task['metric']}"
    sel_metric = f"{task['split']}_{task['metric']}"
    direction = task["direction"]
    arms: list[dict[str, Any]] = []
    for arm in study.arms:
        trials = [_run_row(j, tune_recs.get(j.label), sel_metric) for j in tune if j.arm == arm.name]
        runs = [_run_row(j, seed_recs.get(j.label), metric) for j in seeds if j.arm == arm.name]
        chosen = selected.get(arm.name)
        every = [r for r in (*trials, *runs) if r["status"] in ("ok", "diverged", "failed")]
        arms.append(
            {
                "name": arm.name,
                "baseline": arm.baseline,
                "overrides": arm.overrides,
                "space": [p.__dict__ for p in arm.params],
                "selected": chosen,
                "on_edge": sorted(p.key for p in arm.params if chosen and p.key in chosen and p.on_edge(chosen[p.key])),
                "trials": trials,
                "runs": runs,
                "values": _values(runs, metric),
                "budget_trials": len(trials),
                "cost_hours": sum(r["seconds"] or 0 for r in every) / 3600,
                "device": next((r["device"] for r in every if r["device"]), None),
                **_means(runs),
            }
        )
    base = next(a for a in arms if a["baseline"])
    for a in arms:
        a.update(summary(a["values"], proportion=L.is_proportion(metric)))
        a["comparison"] = None if a["baseline"] else compare(a["values"], base["values"], direction, study.alpha)
    adjusted = holm({a["name"]: a["comparison"]["p"] for a in arms if a["comparison"]})
    for a in arms:
        if a["comparison"]:
            a["comparison"]["p_holm"] = adjusted[a["name"]]
    return {
        "study": {
            "name": study.name,
            "description": study.description,
            "task": study.task,
            "scale": study.scale,
            "budget": study.budget,
            "seeds": study.seed_list(),
            "sampler": study.sampler,
            "sampler_seed": study.sampler_seed,
            "tune_seed": study.tune_seed,
            "alpha": study.alpha,
            "overrides": study.overrides,
            "source": study.source,
            "claim": study.claim,
        },
        "task": task,
        "metric": metric,
        "selection_metric": sel_metric,
        "direction": direction,
        "arms": arms,
        "verdict": verdict(study, arms, task, metric),
    }


def _run_row(job: Job, rec: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    rec = rec or {}
    m = dict(rec.get("metrics") or {})
    for key in RUN_QUANTITIES:  # record-level quantities a criterion may read like metrics
        if isinstance(rec.get(key), (int, float)):
            m[key] = rec[key]
    return {
        "label": job.label,
        "index": job.index,
        "seed": job.seed,
        "params": job.params,
        "status": rec.get("status", "refused" if not rec else "unknown"),
        "value": m.get(metric),
        "metrics": m,
        "run_key": rec.get("run_key"),
        "run_dir": rec.get("run_dir"),
        "seconds": (rec.get("timing") or {}).get("total_s"),
        "time_to_target_s": (rec.get("timing") or {}).get("time_to_target_s"),
        "samples_per_s": (rec.get("throughput") or {}).get("samples_per_s"),
        "tokens_per_s": (rec.get("throughput") or {}).get("tokens_per_s"),
        "peak_bytes": (rec.get("memory") or {}).get("peak_bytes"),
        "steps": rec.get("steps"),
        "curve": rec.get("curve") or [],
        "device": (rec.get("hardware") or {}).get("device_name") or (rec.get("hardware") or {}).get("device"),
        "error": rec.get("error"),
    }


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def _means(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    out = {
        "time_to_target_s": _mean([r["time_to_target_s"] for r in ok]),
        "reached_target": sum(r["time_to_target_s"] is not None for r in ok),
        "samples_per_s": _mean([r["samples_per_s"] for r in ok]),
        "tokens_per_s": _mean([r["tokens_per_s"] for r in ok]),
        "peak_bytes": max((r["peak_bytes"] for r in ok if r["peak_bytes"]), default=None),
        "failed_runs": sum(r["status"] != "ok" for r in runs),
    }
    for key in ("test_ece", "test_nll", "test_ece_after", "test_nll_after"):
        out[key] = _mean([r["metrics"].get(key) for r in ok])
    return out


# ---------------------------------------------------------------------------------------------- verdicts
def verdict(study: Study, arms: list[dict[str, Any]], task: dict[str, Any], metric: str) -> dict[str, Any]:
    claim = study.claim or {}
    crit = dict(claim.get("criterion") or {})
    if not crit:
        return {
            "verdict": "none",
            "reason": "the study states no claim; see the per-arm comparisons",
            "criterion": None,
        }
    return decide(crit, study, arms, task, metric)


def combine(crit: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``all_of``: reproduced when every part is, contradicted when any part is, inconclusive otherwise."""
    verdicts = [p["verdict"] for p in parts]
    if "contradicted" in verdicts:
        v = "contradicted"
    else:
        v = "reproduced" if all(x == "reproduced" for x in verdicts) else "inconclusive"
    needed = [p["seeds_needed"] for p in parts if p.get("seeds_needed")]
    return {
        "verdict": v,
        "reason": "; ".join(f"[{p['verdict']}] {p['reason']}" for p in parts),
        "criterion": crit,
        "parts": parts,
        "seeds_needed": max(needed) if needed and v == "inconclusive" else None,
    }


def decide(
    crit: dict[str, Any], study: Study, arms: list[dict[str, Any]], task: dict[str, Any], metric: str
) -> dict[str, Any]:
    """One criterion, or ``all_of`` several: reproduced when every part is, contradicted when any part
    is, inconclusive otherwise."""
    if "all_of" in crit:
        return combine(crit, [decide(dict(c), study, arms, task, metric) for c in crit["all_of"]])
    by_name = {a["name"]: a for a in arms}
    arm = by_name[crit["arm"]]
    versus = by_name[crit.get("versus") or next(a["name"] for a in arms if a["baseline"])]
    kind = crit["kind"]
    m = crit.get("metric") or metric
    vm = crit.get("versus_metric") or m
    direction = "min" if kind == "lower" else direction_of(m, task)
    if kind == "reaches_fraction":
        return _reaches_fraction(crit, arm, versus, study)
    if kind == "ratio_below":
        return _ratio_below(crit, arm, m, vm, versus if crit.get("versus") else None)
    a = _values(arm["runs"], m)
    b = _values(versus["runs"], vm)
    what = f"{m}, {arm['name']} vs {versus['name']}" if vm == m else f"{arm['name']} {m} vs {versus['name']} {vm}"
    base = {
        "criterion": crit,
        "metric": m,
        "direction": direction,
        "arm": arm["name"],
        "versus": versus["name"],
        "n": [len(a), len(b)],
    }
    if len(a) < 2 or len(b) < 2:
        return {
            **base,
            "verdict": "inconclusive",
            "reason": f"{what}: fewer than 2 successful seeds ({len(a)} vs {len(b)})",
            "seeds_needed": None,
        }
    sign = 1 if direction == "max" else -1
    d = float(np.mean(a) - np.mean(b))
    good = sign * d
    base.update({"delta": d, "mean": [float(np.mean(a)), float(np.mean(b))]})
    if kind in ("better", "lower"):
        cmp = arm.get("comparison") if m == metric == vm and versus["baseline"] and kind == "better" else None
        p = (cmp or {}).get("p_holm") if cmp else compare(a, b, direction, study.alpha)["p"]
        base["p"] = p
        if p is None:
            return {
                **base,
                "verdict": "inconclusive",
                "reason": f"{what}: no variance in one of the groups, no test",
                "seeds_needed": None,
            }
        if p < study.alpha:
            v = "reproduced" if good > 0 else "contradicted"
            return {
                **base,
                "verdict": v,
                "reason": f"{what}: {'better' if good > 0 else 'worse'} by {_u(m, abs(d), False)} (p = {p:.3g} < {study.alpha})",
            }
        return {
            **base,
            "verdict": "inconclusive",
            "reason": f"{what}: difference {_u(m, d)} not significant (p = {p:.3g})",
            "seeds_needed": seeds_needed(a, b, d, study.alpha),
        }
    if kind == "not_worse":
        margin = float(crit.get("margin", 0.0))
        ci = welch_interval(a, b, 1 - study.alpha)
        lo, hi = sorted(sign * x for x in ci)
        base.update({"margin": margin, "ci_good_direction": [lo, hi]})
        span = f"{1 - study.alpha:.0%} interval [{_u(m, lo)}, {_u(m, hi)}]"
        if lo > -margin:
            return {
                **base,
                "verdict": "reproduced",
                "reason": f"{what}: difference {_u(m, good)} in the good direction, {span} above the margin {_u(m, -margin or 0.0)}",
            }
        if hi < -margin:
            return {
                **base,
                "verdict": "contradicted",
                "reason": f"{what}: worse by more than the margin {_u(m, margin, False)}: {span}",
            }
        return {
            **base,
            "verdict": "inconclusive",
            "reason": f"{what}: difference {_u(m, good)}, {span} straddles the margin {_u(m, -margin or 0.0)}",
            "seeds_needed": seeds_needed(a, b, good + margin, study.alpha),
        }
    if kind == "lower_std":
        sa, sb = float(np.std(a, ddof=1)), float(np.std(b, ddof=1))
        p = float(stats.levene(a, b, center="median").pvalue) if (sa > 0 or sb > 0) else None
        base.update({"std": [sa, sb], "p": p})
        if p is not None and p < study.alpha:
            v = "reproduced" if sa < sb else "contradicted"
            return {
                **base,
                "verdict": v,
                "reason": f"{what}: across-seed std {sa:.4g} vs {sb:.4g} (Brown–Forsythe p = {p:.3g})",
            }
        return {
            **base,
            "verdict": "inconclusive",
            "reason": f"{what}: across-seed std {sa:.4g} vs {sb:.4g}, not significantly different"
            + (f" (Brown–Forsythe p = {p:.3g})" if p is not None else ""),
        }
    raise ValueError(f"unknown criterion {kind}")


def _ratio_below(
    crit: dict[str, Any], arm: dict[str, Any], m: str, vm: str, versus: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``metric / versus_metric`` at most ``threshold``. Within one arm (no ``versus`` in the criterion):
    the per-seed ratios (e.g. ECE after / before temperature scaling), judged on their 95% t interval.
    Against another arm: the ratio of the two arms' means (e.g. sample-passes of PDD / the baseline's)."""
    thr = float(crit["threshold"])
    if versus is not None:
        a = [
            r["metrics"][m]
            for r in arm["runs"]
            if r["status"] == "ok" and isinstance(r["metrics"].get(m), (int, float))
        ]
        b = [
            r["metrics"][vm]
            for r in versus["runs"]
            if r["status"] == "ok" and isinstance(r["metrics"].get(vm), (int, float))
        ]
        base = {
            "criterion": crit,
            "metric": m,
            "versus_metric": vm,
            "arm": arm["name"],
            "versus": versus["name"],
            "threshold": thr,
        }
        if not a or not b or not np.mean(b):
            return {**base, "verdict": "inconclusive", "reason": f"{m}: no successful runs to compare"}
        ratio = float(np.mean(a) / np.mean(b))
        text = f"{arm['name']} {m} / {versus['name']} {vm} = {np.mean(a):.4g} / {np.mean(b):.4g} = {ratio:.3f} against {thr:.3f}"
        return {**base, "ratio": ratio, "verdict": "reproduced" if ratio <= thr else "contradicted", "reason": text}
    ratios = [
        r["metrics"][m] / r["metrics"][vm]
        for r in arm["runs"]
        if r["status"] == "ok" and r["metrics"].get(vm) and m in r["metrics"]
    ]
    base = {"criterion": crit, "metric": m, "versus_metric": vm, "arm": arm["name"], "ratios": ratios, "threshold": thr}
    s = summary(ratios)
    if s["n"] < 2:
        return {**base, "verdict": "inconclusive", "reason": f"{m}/{vm}: fewer than 2 successful seeds"}
    lo, hi = s["ci"] or [s["mean"], s["mean"]]
    base.update({"mean": s["mean"], "ci": [lo, hi]})
    text = f"{m}/{vm} = {s['mean']:.3f} (95% interval [{lo:.3f}, {hi:.3f}], {s['n']} seeds) against {thr:.3f}"
    if hi <= thr:
        return {**base, "verdict": "reproduced", "reason": text}
    if lo > thr:
        return {**base, "verdict": "contradicted", "reason": text}
    return {**base, "verdict": "inconclusive", "reason": text}


def _reaches_fraction(
    crit: dict[str, Any], arm: dict[str, Any], versus: dict[str, Any], study: Study
) -> dict[str, Any]:
    """Arm reaches the baseline's final value of ``metric`` (default val_loss) in at most ``fraction`` of
    the baseline's steps."""
    m = crit.get("metric") or "val_loss"
    frac = float(crit.get("fraction", 1.0))
    direction = "min" if m.endswith(("loss", "ppl")) else "max"
    ref = [r["metrics"][m] for r in versus["runs"] if r["status"] == "ok" and m in r["metrics"]]
    steps = [r["steps"] for r in versus["runs"] if r["status"] == "ok" and r["steps"]]
    base = {"criterion": crit, "metric": m, "arm": arm["name"], "versus": versus["name"]}
    if not ref or not steps:
        return {**base, "verdict": "inconclusive", "reason": "the baseline has no successful seed run"}
    target, total = float(np.mean(ref)), float(np.mean(steps))
    ratios = []
    for r in (r for r in arm["runs"] if r["status"] == "ok"):
        hit = next(
            (
                p["step"]
                for p in r["curve"]
                if isinstance(p.get(m), (int, float)) and not better(target, p[m], direction)
            ),
            None,
        )
        ratios.append(None if hit is None else hit / total)
    base.update({"target": target, "baseline_steps": total, "ratios": ratios, "fraction": frac})
    reached = [x for x in ratios if x is not None]
    if ratios and len(reached) == len(ratios) and max(reached) <= frac:
        return {
            **base,
            "verdict": "reproduced",
            "reason": f"every seed reached {m} {target:.4g} within {max(reached):.0%} of the baseline's steps (≤ {frac:.0%})",
        }
    if ratios and all(x is None or x > frac for x in ratios):
        return {
            **base,
            "verdict": "contradicted",
            "reason": f"no seed reached {m} {target:.4g} within {frac:.0%} of the baseline's steps",
        }
    return {
        **base,
        "verdict": "inconclusive",
        "reason": f"ratios {['never' if x is None else f'{x:.0%}' for x in ratios]} around {frac:.0%}",
    }


# ---------------------------------------------------------------------------------------------- lr scans
def stable(rec: dict[str, Any] | None, ratio: float) -> bool:
    """A run is stable when it finished ok with a final training loss below ``ratio`` times the loss of
    the uniform prediction (ln of the number of classes): it neither diverged nor stalled at chance."""
    if not rec or rec.get("status") != "ok":
        return False
    loss = (rec.get("metrics") or {}).get("train_loss")
    classes = (rec.get("dataset_info") or {}).get("num_classes") or 2
    return isinstance(loss, (int, float)) and math.isfinite(loss) and loss < ratio * math.log(classes)


def analyze_scan(study: Study, jobs: list[Job], recs: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Largest stable learning rate per arm and batch size, and the log-log slope of it against the batch
    size with its 95% t interval (least squares, ``scipy.stats.linregress``)."""
    ratio = float((study.lr_scan or {}).get("loss_ratio", 1.0))
    task = task_info(list(recs.values()))
    arms = []
    for arm in study.arms:
        grid: dict[int, list[tuple[float, bool, str]]] = {}
        for j in (j for j in jobs if j.arm == arm.name):
            rec = recs.get(j.label)
            grid.setdefault(j.params["trainer.batch_size"], []).append(
                (j.params["optimizer.lr"], stable(rec, ratio), (rec or {}).get("status", "refused"))
            )
        rows, seconds = [], 0.0
        for j in (j for j in jobs if j.arm == arm.name):
            seconds += ((recs.get(j.label) or {}).get("timing") or {}).get("total_s") or 0.0
        for b, cells in sorted(grid.items()):
            cells.sort()
            ok = [lr for lr, s, _ in cells if s]
            lr_max = max(ok) if ok else None
            rows.append(
                {"batch_size": b, "lr_max": lr_max, "censored": bool(ok) and lr_max == cells[-1][0], "cells": cells}
            )
        fit = [(r["batch_size"], r["lr_max"]) for r in rows if r["lr_max"] is not None and not r["censored"]]
        slope = None
        if len(fit) >= 3:
            res = stats.linregress(np.log([b for b, _ in fit]), np.log([lr for _, lr in fit]))
            half = stats.t.ppf(0.975, len(fit) - 2) * res.stderr
            slope = {
                "slope": float(res.slope),
                "ci": [float(res.slope - half), float(res.slope + half)],
                "points": len(fit),
                "r": float(res.rvalue),
            }
        arms.append(
            {
                "name": arm.name,
                "baseline": arm.baseline,
                "overrides": arm.overrides,
                "rows": rows,
                "slope": slope,
                "cost_hours": seconds / 3600,
            }
        )
    claim = study.claim or {}
    crit = dict(claim.get("criterion") or {})
    return {
        "kind": "lr_scan",
        "study": {"name": study.name, "description": study.description, "task": study.task, "scale": study.scale, "lr_scan": study.lr_scan,
                  "overrides": study.overrides, "source": study.source, "claim": study.claim, "alpha": study.alpha, "tune_seed": study.tune_seed},
        "task": task,
        "arms": arms,
        "runs": [{"label": j.label, "params": j.params, "status": (recs.get(j.label) or {}).get("status", "refused"),
                  "run_key": (recs.get(j.label) or {}).get("run_key"), "run_dir": (recs.get(j.label) or {}).get("run_dir")} for j in jobs],
        "verdict": _slope_verdict(crit, arms) if crit else {"verdict": "none", "reason": "the study states no claim", "criterion": None},
    }  # fmt: skip


def _slope_verdict(crit: dict[str, Any], arms: list[dict[str, Any]]) -> dict[str, Any]:
    if "all_of" in crit:
        return combine(crit, [_slope_verdict(dict(c), arms) for c in crit["all_of"]])
    arm = next(a for a in arms if a["name"] == crit["arm"])
    low, high = float(crit["low"]), float(crit["high"])
    base = {"criterion": crit, "arm": arm["name"], "interval": [low, high]}
    s = arm["slope"]
    if s is None:
        return {
            **base,
            "verdict": "inconclusive",
            "reason": f"{arm['name']}: fewer than 3 batch sizes with an uncensored largest stable learning rate",
        }
    lo, hi = s["ci"]
    text = f"{arm['name']}: log-log slope {s['slope']:.2f} (95% interval [{lo:.2f}, {hi:.2f}], {s['points']} batch sizes) against [{low:g}, {high:g}]"
    if low <= lo and hi <= high:
        return {**base, "verdict": "reproduced", "reason": text, **s}
    if hi < low or lo > high:
        return {**base, "verdict": "contradicted", "reason": text, **s}
    return {**base, "verdict": "inconclusive", "reason": text, **s}
