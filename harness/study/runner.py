"""Running a study inside Hydra's multirun: the study sweeper (``hydra/sweeper=harness_study``) hands
the composed config, the command-line arguments, its launcher and the config loader to ``run_study``,
which launches the tuning phase, selects each arm's configuration on the validation split, launches
the seed phase and writes the report. Every run is launched through the configured Hydra launcher
(local, joblib, SLURM), so a study runs wherever a sweep runs.

Runs already done are not launched again: the run key of each planned run is computed here exactly as
the run would compute it, and a record with that key (status ok or diverged) anywhere under
``results_dir`` is reused. Each launched run also carries ``sweep.skip_completed=true``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.records import RECORD_NAME, read_record
from harness.study import analyze, report
from harness.study.plan import Job, as_run_sees_it, scan_jobs, seed_jobs, tuning_jobs
from harness.study.spec import Study, load

log = logging.getLogger("harness")
REUSABLE = ("ok", "diverged")
LAST_RESULT: dict[
    str, Any
] = {}  # the result of the study this process ran (read by the CLI for its exit code)  # a diverged trial is a finished result of its configuration


def study_dir(results_dir: str | Path, study: Study) -> Path:
    return Path(results_dir) / "studies" / study.name


class StudyRunner:
    def __init__(self, study: Study, config: DictConfig, passthrough: list[str], launcher, config_loader):
        self.study, self.config, self.passthrough = study, config, passthrough
        self.launcher, self.loader = launcher, config_loader
        self.results_dir = Path(OmegaConf.select(config, "results_dir") or "results")
        self.next_idx = 0

    # -------------------------------------------------------------- config of a planned run
    def compose_full(self, overrides: list[str]) -> DictConfig:
        return self.loader.load_sweep_config(self.config, list(overrides))

    def compose(self, overrides: list[str]) -> DictConfig:
        return as_run_sees_it(self.compose_full([*overrides, *self.passthrough]))

    def run_key(self, job: Job) -> str:
        from harness.run.experiment import planned_run_key

        overrides = [*job.overrides(self.study), *self.passthrough]
        cfg = self.compose_full(overrides)
        choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
        task_overrides = list(cfg.hydra.overrides.task)
        with open_dict(cfg):
            del cfg["hydra"]
        return planned_run_key(cfg, choices, task_overrides)

    # -------------------------------------------------------------- launching
    def index(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for path in self.results_dir.glob(f"**/{RECORD_NAME}"):
            try:
                rec = read_record(path)
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("run_key"):
                out[rec["run_key"]].append(rec)
        return out

    @staticmethod
    def best_record(recs: list[dict[str, Any]]) -> dict[str, Any] | None:
        for statuses in (REUSABLE, ("failed",)):
            found = [r for r in recs if r.get("status") in statuses]
            if found:
                return max(found, key=lambda r: r.get("finished_at") or "")
        return None

    def execute(self, jobs: list[Job]) -> dict[str, dict[str, Any] | None]:
        """Launch the jobs that have no finished record; return each job's record (None: refused)."""
        keys = {job.label: self.run_key(job) for job in jobs}
        index = self.index()
        todo = [j for j in jobs if not any(r.get("status") in REUSABLE for r in index.get(keys[j.label], []))]
        log.info(
            f"study {self.study.name}: {len(jobs) - len(todo)} of {len(jobs)} runs already done, launching {len(todo)}"
        )
        if todo:
            self.launcher.launch(
                [[*j.overrides(self.study), *self.passthrough] for j in todo], initial_job_idx=self.next_idx
            )
            self.next_idx += len(todo)
            index = self.index()
        return {j.label: self.best_record(index.get(keys[j.label], [])) for j in jobs}

    # -------------------------------------------------------------- the protocol
    def run(self) -> dict[str, Any]:
        study = self.study
        if study.kind == "lr_scan":
            scan = scan_jobs(study, self.compose)
            result = analyze.analyze_scan(study, scan, self.execute(scan))
            return self.finish(result)
        tune = tuning_jobs(study, self.compose)
        tune_recs = self.execute(tune)
        selected = analyze.select(study, tune, tune_recs)
        seeds = seed_jobs(study, selected)
        seed_recs = self.execute(seeds)
        return self.finish(analyze.analyze(study, tune, tune_recs, seeds, seed_recs, selected))

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        study = self.study
        result["command"] = getattr(self, "command", None)
        out = study_dir(self.results_dir, study)
        written = report.write(result, out)
        log.info(
            f"study {study.name}: verdict {result['verdict']['verdict']} -> {out / 'report.md'} ({len(written)} files)"
        )
        print(
            f"verdict: {result['verdict']['verdict']} ({result['verdict']['reason']})\nreport: {out / 'report.md'}",
            flush=True,
        )
        return result


def run_study(config: DictConfig, arguments: list[str], launcher, config_loader) -> dict[str, Any]:
    """Entry point of the study sweeper."""
    name = OmegaConf.select(config, "hydra.runtime.choices.study")
    study_args = [a for a in arguments if a.lstrip("+~").startswith("study.")]
    study = load(name, study_args)  # the same reading as the CLI's check (scale-aware overrides)
    passthrough = [a for a in arguments if not a.lstrip("+~").startswith("study")]
    runner = StudyRunner(study, config, passthrough, launcher, config_loader)
    shown = [
        a.lstrip("+") if a.lstrip("+~").startswith("study.") else a for a in arguments if not a.startswith("study=")
    ]
    runner.command = " ".join(["harness study", str(name), *shown])
    result = runner.run()
    LAST_RESULT.clear()
    LAST_RESULT.update(result)
    return result
