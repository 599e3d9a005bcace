"""Honest job status for sweeps launched through Hydra's submitit launcher (SLURM or local).

Hydra's ``run_job`` catches a task's exception and returns it inside a ``JobReturn``; submitit
then pickles that as a *successful* result and the job process exits 0, so SLURM would report a
failed or diverged run as COMPLETED. :func:`fail_job_at_exit` keeps everything submitit and
Hydra do (the result pickle is written, the sweep collects every job and reports the failed ones
at the end) and only makes the job process exit with status 1 once submitit is done, so
``sacct`` shows FAILED. It works with the plugin's own ``hydra/launcher=submitit_slurm`` and with
the harness profiles in conf/hydra/launcher/ (``slurm``, ``local``, ``parallel``).
"""

from __future__ import annotations

import sys

from harness.infra.outcomes import fail_job_at_exit, in_submitit_job  # noqa: F401  (re-exported)

# -- the harness profiles' launchers (conf/hydra/launcher/local.yaml, slurm.yaml) ------------------------------
#
# Hydra's submitit launcher returns the first failed job's exception only after waiting for it, and
# a job whose result never arrives (killed with SIGKILL, lost node) raises in the sweep's process
# while the other jobs still run. These subclasses wait for every job, note each missing result as
# a ``killed`` outcome (harness.infra.outcomes) and let the sweep end with its summary. Inside the
# job, a run that did not end ok raises after Hydra's ``run_job`` has returned, so submitit logs
# "triggered an exception" (never "Job completed successfully") and the job exits non-zero.


class JobDidNotSucceed(RuntimeError):
    """Raised in a submitit job whose outcome is not ok (the message is the outcome's)."""


def _harness_launcher(base):
    class HarnessSubmititLauncher(base):
        def __call__(self, *args, **kwargs):
            ret = super().__call__(*args, **kwargs)
            out = getattr(ret, "_return_value", None)
            if isinstance(out, dict) and out.get("status") not in (None, "ok", "skipped"):
                global _registered
                _registered = True  # the exception below gives the exit status; no atexit exit needed
                raise JobDidNotSucceed(f"job {out.get('job')} {out['status']}: {out.get('message')}")
            return ret

        def launch(self, job_overrides, initial_job_idx):
            import time

            import submitit
            from hydra.core.utils import JobReturn, JobStatus

            from harness.infra import outcomes

            started = outcomes.CURRENT.get("started", time.time())
            sweep_dir = str(self.config.hydra.sweep.dir)
            executor_map = submitit.AutoExecutor.map_array
            jobs_seen: list = []

            def capture(executor, fn, *iterables):
                jobs = executor_map(executor, fn, *iterables)
                jobs_seen.extend(jobs)
                return jobs

            submitit.AutoExecutor.map_array = capture
            try:
                # super().launch waits on the jobs in order and raises at the first without a result
                try:
                    return super().launch(job_overrides, initial_job_idx)
                except Exception:  # noqa: BLE001
                    pass
            finally:
                submitit.AutoExecutor.map_array = executor_map
            returns = []
            for i, (job, overrides) in enumerate(zip(jobs_seen, job_overrides)):
                ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
                try:
                    ret.return_value = job.results()[0].return_value
                except Exception as e:  # noqa: BLE001  (FailedJobError, UncompletedJobError)
                    text = str(e).strip().splitlines()
                    reason = next((ln for ln in reversed(text) if "JobDidNotSucceed" in ln), text[0] if text else "")
                    outcomes.add_lost(
                        sweep_dir,
                        initial_job_idx + i,
                        list(overrides),
                        f"submitit job {job.job_id}: {type(e).__name__}: {reason[:300]} (log: {job.paths.stderr})",
                        started,
                    )
                    ret.return_value = None
                returns.append(ret)
            return returns

    return HarnessSubmititLauncher


PLUGIN_MODULE = "hydra_plugins.harness_launchers"  # Hydra instantiates launchers from hydra_plugins.* only


def register_plugins() -> None:
    """Make ``hydra_plugins.harness_launchers.{Local,Slurm}Launcher`` (the ``_target_`` of the harness
    profiles) known to Hydra. The classes live here; no module of that name exists on disk, so
    cloudpickle sends them to submitit jobs by value (the plugin's base classes by reference)."""
    try:
        from hydra.core.plugins import Plugins
        from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
    except ImportError:  # the cluster extra is not installed: the profiles fail as the plugin's own would
        return
    import types

    import cloudpickle

    if PLUGIN_MODULE in sys.modules:
        return
    module = types.ModuleType(PLUGIN_MODULE, "harness launchers (harness/infra/launchers.py)")
    registry = Plugins.instance().class_name_to_class
    for name in ("LocalLauncher", "SlurmLauncher"):
        cls = _harness_launcher(getattr(plugin, name))
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = PLUGIN_MODULE
        setattr(module, name, cls)
        registry[f"{PLUGIN_MODULE}.{name}"] = cls
    sys.modules[PLUGIN_MODULE] = module
    cloudpickle.register_pickle_by_value(module)  # the job process has no such module: send the classes
