"""Every job of a sweep ends with an outcome, and the sweep ends with a summary of all of them.

Each job writes ``<sweep dir>/outcomes/<job number>.json`` (``status``: ok, skipped, diverged,
failed, refused, interrupted; the message; the run directory; the job's overrides) from the process
that ran it, so the summary works for in-process, joblib and SLURM jobs alike. A job that left no
outcome (killed with SIGKILL, lost by the scheduler) is listed as ``killed`` from its job
directory or from what the launcher knows. The parent process prints one line per job when the sweep
ends (or is interrupted) and exits non-zero when any job did not succeed.

``SweepSummary`` is a Hydra callback (``hydra.callbacks.sweep_summary`` in conf/config.yaml): it
notes the sweep directory when the multirun starts and writes the outcome of a job whose task
raised an exception that the harness did not turn into an outcome itself.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError, DataMissingError, infra_fault
from harness.records import RECORD_NAME, atomic_write_text, read_record

EXIT_FAILED = 1
_registered = False


def in_submitit_job() -> bool:
    """True inside a job started by submitit (``submitit.core._submit`` sets SUBMITIT_FOLDER)."""
    return bool(os.environ.get("SUBMITIT_FOLDER"))


def _exit_failed() -> None:
    print(
        f"harness: the run did not finish ok; exiting with status {EXIT_FAILED} so the scheduler reports the job as failed",
        file=sys.stderr,
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_FAILED)


def fail_job_at_exit() -> None:
    """Make this submitit job exit non-zero after submitit has written its result (no-op outside
    submitit: the basic launcher's exit status already comes from the exception, and joblib
    worker processes are shared between jobs)."""
    global _registered
    if in_submitit_job() and not _registered:
        _registered = True
        atexit.register(_exit_failed)


log = logging.getLogger("harness")

OUTCOMES_DIR = "outcomes"
SUCCESS = ("ok", "skipped")
# what the sweep started with, noted in the parent process by SweepSummary.on_multirun_start
CURRENT: dict[str, Any] = {}


# -- in the job's process -------------------------------------------------------------------------------------


def _job_info() -> dict[str, Any] | None:
    """Sweep dir, job number, overrides and output dir of the running multirun job (None outside one)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return _info_from(hc)


def _info_from(hc: DictConfig) -> dict[str, Any]:
    return {
        "sweep_dir": str(hc.sweep.dir),
        "job": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "job_dir": str(hc.runtime.output_dir),
    }


def outcome_path(sweep_dir: str | Path, job: int) -> Path:
    return Path(sweep_dir) / OUTCOMES_DIR / f"{job}.json"


def write_outcome(info: dict[str, Any], status: str, message: str = "", run_dir: str | None = None, **extra) -> dict:
    out = {
        "job": info["job"],
        "status": status,
        "message": message,
        "run_dir": run_dir,
        "overrides": info["overrides"],
        "finished_at": time.time(),
        **extra,
    }
    try:
        atomic_write_text(outcome_path(info["sweep_dir"], info["job"]), json.dumps(out, indent=1) + "\n")
    except OSError as e:  # a full disk must not hide the job's own error
        log.error(f"could not write the outcome of job {info['job']}: {e}")
    return out


def run_sweep_job(call, run_dir: Path) -> dict[str, Any]:
    """Run one job of a multirun (``call`` runs the experiment and returns its record) and turn
    whatever happens into an outcome: nothing is raised for a refused, failed or diverged run, so
    the other jobs run and the sweep ends with a summary. Interruptions (SIGTERM, Ctrl-C) are
    noted and re-raised. A non-ok outcome also makes a submitit job exit non-zero."""

    info = _job_info() or {"sweep_dir": str(run_dir.parent), "job": 0, "overrides": [], "job_dir": str(run_dir)}
    try:
        rec = call()
    except (ConfigError, DataMissingError) as e:
        log.error(f"refused: {e}")
        out = write_outcome(info, "refused", str(e), None)
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) else 130
        what = {143: "SIGTERM", 130: "Ctrl-C"}.get(code if isinstance(code, int) else 0, f"exit {code}")
        ck = run_dir / "checkpoint.pt"
        kept = f"; its checkpoint {ck} is kept" if ck.exists() else ""
        write_outcome(info, "interrupted", f"stopped by {what}{kept}", str(run_dir))
        raise
    except Exception as e:  # noqa: BLE001  (RunFailed, or an error outside the run's own handling)
        rec = _record(run_dir)
        if type(e).__name__ == "RunFailed" and rec is not None:
            out = write_outcome(
                info, rec.get("status", "failed"), rec.get("error") or str(e), rec.get("run_dir"), **_infra(rec)
            )
        else:
            log.error(f"job failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            fault = infra_fault(e)
            out = write_outcome(
                info, "failed", f"{type(e).__name__}: {e}", str(run_dir), **({"infra_fault": True} if fault else {})
            )
    else:
        rec = rec or {}
        skipped = rec.get("run_dir") and Path(rec["run_dir"]).resolve() != run_dir.resolve()
        status = "skipped" if skipped and not (run_dir / RECORD_NAME).exists() else "ok"
        message = f"an ok record exists: {rec.get('run_dir')}" if status == "skipped" else _metrics(rec)
        out = write_outcome(info, status, message, rec.get("run_dir") or str(run_dir))
    if out["status"] not in SUCCESS:
        fail_job_at_exit()
    return out


def _record(run_dir: Path) -> dict | None:
    try:
        return read_record(run_dir / RECORD_NAME)
    except (OSError, ValueError):
        return None


def _infra(rec: dict) -> dict:
    return {"infra_fault": True} if rec.get("infra_fault") else {}


def _metrics(rec: dict) -> str:
    m = rec.get("metrics") or {}
    keys = ("test_acc", "test_ppl", "val_ppl", "test_loss")
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))


class SweepSummary(Callback):
    """Hydra callback: notes the sweep directory in the parent process, and gives a job whose task
    raised (outside ``run_sweep_job``) an outcome, so no job of a sweep goes unreported."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        CURRENT.clear()
        CURRENT.update(sweep_dir=str(config.hydra.sweep.dir), started=time.time())

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hc = config.hydra
        if hc.mode != RunMode.MULTIRUN or job_return.status != JobStatus.FAILED:
            return
        info = _info_from(hc)
        path = outcome_path(info["sweep_dir"], info["job"])
        if path.exists() and path.stat().st_mtime >= CURRENT.get("started", 0):
            return
        e = job_return._return_value
        write_outcome(info, "failed", f"{type(e).__name__}: {e}", info["job_dir"])


# -- in the parent process ------------------------------------------------------------------------------------


def collect(sweep_dir: str | Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Outcomes of this sweep invocation (written after ``since``), plus a ``killed`` entry for each
    job directory that Hydra set up but whose job never reported (SIGKILL, out of memory, node lost)."""
    sweep_dir = Path(sweep_dir)
    found: dict[int, dict] = {}
    for p in sorted((sweep_dir / OUTCOMES_DIR).glob("*.json")):
        try:
            out = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if float(out.get("finished_at", 0)) >= since - 1:
            found[int(out["job"])] = out
    for hydra_yaml in sweep_dir.glob("*/.hydra/hydra.yaml"):
        try:
            if hydra_yaml.stat().st_mtime < since - 1:
                continue
            hc = OmegaConf.load(hydra_yaml).hydra
            job = int(hc.job.num)
            overrides = list(hc.overrides.task)
        except Exception:  # noqa: BLE001  (a half-written or foreign file)
            continue
        if job not in found:
            job_dir = hydra_yaml.parent.parent
            rec = _record(job_dir)
            if rec is not None and rec.get("status") in ("ok", "diverged", "failed"):
                found[job] = {"job": job, "status": rec["status"], "message": rec.get("error") or _metrics(rec)}
                found[job].update(run_dir=str(job_dir), overrides=overrides, **_infra(rec))
            else:
                ck = job_dir / "checkpoint.pt"
                kept = f"; checkpoint kept at {ck}" if ck.exists() else ""
                found[job] = {
                    "job": job,
                    "status": "killed",
                    "message": f"the job ended without an outcome (killed, e.g. SIGKILL or out of memory){kept}",
                    "run_dir": str(job_dir),
                    "overrides": overrides,
                }
    return [found[k] for k in sorted(found)]


def add_lost(sweep_dir: str | Path, job: int, overrides: list[str], message: str, since: float) -> None:
    """Called by a launcher for a job that returned no result: unless the job wrote its outcome
    during this sweep, note it as ``killed`` with what the launcher knows."""
    path = outcome_path(sweep_dir, job)
    if path.exists() and path.stat().st_mtime >= since - 1:
        return
    info = {"sweep_dir": str(sweep_dir), "job": job, "overrides": overrides}
    write_outcome(info, "killed", message, None)


def exit_code(outs: list[dict[str, Any]]) -> int:
    """0 when every job succeeded; 2 when the only failures are refusals (bad input); else 1."""
    bad = [o for o in outs if o["status"] not in SUCCESS]
    if not bad:
        return 0
    return 2 if all(o["status"] == "refused" for o in bad) else 1


def format_summary(outs: list[dict[str, Any]], sweep_dir: str | Path) -> str:
    counts: dict[str, int] = {}
    for o in outs:
        counts[o["status"]] = counts.get(o["status"], 0) + 1
    order = ["ok", "skipped", "diverged", "failed", "refused", "interrupted", "killed"]
    head = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: order.index(kv[0])))
    lines = [f"sweep summary ({len(outs)} jobs: {head or 'none ran'}) in {sweep_dir}:"]
    common = set.intersection(*(set(o.get("overrides") or []) for o in outs)) if len(outs) > 1 else set()
    for o in outs:
        overrides = " ".join(v for v in o.get("overrides") or [] if v not in common)
        msg = " ".join(str(o.get("message") or "").split())
        if len(msg) > 600:
            msg = msg[:597] + "..."
        infra = " [infrastructure fault, not counted against the technique]" if o.get("infra_fault") else ""
        where = o.get("run_dir") or "(no run directory: nothing was run)"
        lines.append(f"  #{o['job']:<3} {o['status']:<11} {overrides}\n        {msg}{infra}\n        {where}")
    return "\n".join(lines)


def continue_command(args: list[str], sweep_dir: str | Path) -> str:
    keep = [a for a in args if not a.startswith(("hydra.sweep.dir=", "sweep.skip_completed="))]
    return "harness run " + shlex.join([*keep, f"hydra.sweep.dir={sweep_dir}", "sweep.skip_completed=true"])


def report(args: list[str], interrupted: int | None = None) -> int | None:
    """Print the summary of the sweep that just ran (or was interrupted) in this process; the exit
    code it deserves, or None when no multirun started."""
    if not CURRENT:
        return None
    sweep_dir = CURRENT["sweep_dir"]
    outs = collect(sweep_dir, CURRENT["started"])
    print(format_summary(outs, sweep_dir), file=sys.stderr, flush=True)
    code = exit_code(outs)
    if interrupted is not None or any(o["status"] in ("interrupted", "killed") for o in outs):
        print(
            "to continue this sweep (finished jobs are skipped, interrupted runs resume from their checkpoint):\n  "
            + continue_command(args, sweep_dir),
            file=sys.stderr,
            flush=True,
        )
    CURRENT.clear()
    return interrupted if interrupted is not None else code
