"""One run, from its composed config to its record: resolve -> assemble -> train -> record.

* ``resolve``: range checks, the task's baseline recipe, the run key, reuse of a completed run
  (``sweep.skip_completed``) or resumption of an interrupted one, and the pre-flight checks that need
  no data (techniques' requirements, optimizer hyper-parameters, the memory estimate).
* ``assemble``: data, model, techniques, optimizer, schedule, trainer.
* ``train_and_record``: the loop, the techniques' ``finalize``, and one record whatever happens.

Bad input (``ConfigError``, missing or corrupt data) fails before any work and leaves no files behind.
Every failure after the run has started is a record with status ``failed`` or ``diverged``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from harness import config as hconfig
from harness.data import build_dataset
from harness.data.base import label_noise_info
from harness.data.sharding import shard_data
from harness.data.spec import data_spec
from harness.errors import ConfigError, DataMissingError, describe_os_error, infra_fault
from harness.hooks import RunContext
from harness.infra import distributed, preemption
from harness.infra.hardware import add_mfu
from harness.infra.loggers import make_logger
from harness.models import build_model
from harness.models.flops import count_params, training_flops_per_sample
from harness.records import (
    RECORD_NAME,
    SCHEMA_VERSION,
    find_records,
    metric_directions,
    read_record,
    run_key,
    task_of,
    technique_of,
    versions,
    write_record,
)
from harness.run.checkpoint import CHECKPOINT_NAME, find_resumable, load_checkpoint, remove_checkpoints
from harness.run.preflight import preflight_duration, preflight_memory
from harness.run.trainer import Diverged, Trainer
from harness.techniques.optimizers import build_optimizer, check_optimizer
from harness.techniques.quantization import optimizer_state_bytes
from harness.techniques.registry import build_techniques
from harness.techniques.schedules import build_schedule, check_schedule

log = logging.getLogger("harness")
BAD_INPUT = (ConfigError, DataMissingError)


class RunFailed(RuntimeError):
    """Raised at the end of a run whose status is not ``ok`` (its record is already written), so
    the process exits non-zero and a cluster scheduler reports the job as failed."""


@dataclass
class Plan:
    """A resolved run: what to train, where, under which key."""

    cfg: DictConfig
    run_dir: Path
    choices: dict[str, str]
    overrides: list[str]
    config: dict[str, Any]
    key: str
    device: torch.device
    environment: dict[str, Any]
    done: dict[str, Any] | None = None  # the record of a completed identical run, when it is reused
    memory: dict[str, Any] = field(default_factory=dict)
    duration: dict[str, Any] = field(default_factory=dict)  # the pre-flight duration estimate (timing.estimated_s)


def execute(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str], extras: dict | None = None
) -> dict[str, Any]:
    """Run one experiment in ``run_dir`` and return its record. Raises ConfigError / DataMissingError
    for bad input (no record) and RunFailed after writing the record of a failed run."""
    try:
        plan = resolve(cfg, run_dir, choices, overrides)
        if plan.done is not None:
            return plan.done
        started = dt.datetime.now(dt.timezone.utc)
        parts = assemble(plan, extras or {})
    except BAD_INPUT:
        remove_if_unused(run_dir)
        raise
    return train_and_record(plan, parts, started)


# ------------------------------------------------------------------------------------------ resolve
def resolve(cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str]) -> Plan:
    if cfg.task.get("name") in (None, "???") or OmegaConf.is_missing(cfg.task, "name"):
        raise ConfigError("no task: choose one with task=NAME (harness list task)")
    hconfig.validate(cfg)
    hconfig.load_plugins(cfg.get("plugins"))  # the user's technique modules (plugins: [...], entry points)
    apply_baseline_recipe(cfg, choices, overrides)
    device = pick_device()
    environment = configure_numerics(cfg, device)
    config = resolved_config(cfg)
    key = run_key(config, environment)
    plan = Plan(cfg, run_dir, choices, overrides, config, key, device, environment)
    results_dir = Path(cfg.results_dir)
    if cfg.sweep.skip_completed:
        done = find_records(results_dir, key)
        if done:
            log.info(f"skipping: an ok record of this configuration exists at {done[0]}")
            remove_if_unused(run_dir)
            plan.done = read_record(done[0])
            return plan
    if cfg.resume and not (run_dir / CHECKPOINT_NAME).exists():
        previous = find_resumable(results_dir, key)
        if previous is None:
            raise ConfigError(f"resume=true but no checkpoint of this configuration was found under {results_dir}")
        log.info(f"resuming in {previous}")
        if previous.resolve() != run_dir.resolve():
            remove_if_unused(run_dir)
            plan.run_dir = previous
    if (plan.run_dir / RECORD_NAME).exists():
        rec = read_record(plan.run_dir / RECORD_NAME)
        if rec.get("status") == "ok" and rec.get("run_key") == key:
            log.info(f"already complete: {plan.run_dir / RECORD_NAME}")
            plan.done = rec
            return plan
    # pre-flight: everything that can fail without data
    check_optimizer(
        cfg.optimizer,
        precision=cfg.precision.name,
        world_size=distributed.env_world_size(),
        compile=bool(cfg.trainer.compile),
    )
    check_schedule(cfg.schedule)
    spec = data_spec(cfg.dataset, cfg.data_dir)
    if spec.train_size is not None and int(cfg.trainer.batch_size) > spec.train_size:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training split "
            f"({spec.train_size:,} samples after dataset.val_size={cfg.dataset.get('val_size', 0)}); lower it"
        )
    est = preflight_memory(cfg, spec, device, build_model)
    plan.memory = est.as_record() if est is not None else {}
    return plan


def apply_baseline_recipe(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> None:
    """The task names its baseline and that baseline's learning rate and weight decay. They apply when
    the run uses the baseline optimizer and the command line does not set them, so
    ``task=X optimizer=lion`` keeps Lion's own defaults."""
    base = cfg.task.baseline
    if choices.get("optimizer", cfg.optimizer.get("name")) != base.optimizer:
        return
    with open_dict(cfg):
        for key in ("lr", "weight_decay"):
            if base.get(key) is not None and not any(
                o.split("=")[0].lstrip("+~") == f"optimizer.{key}" for o in overrides
            ):
                cfg.optimizer[key] = base[key]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure_numerics(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Seed everything and fix what changes a run's numbers besides its config: deterministic
    algorithms (``trainer.deterministic``), cuDNN autotuning, the thread count. The result is part of
    the run key, so one key means one set of numbers on one kind of machine."""
    seed = int(cfg.seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    deterministic = bool(cfg.trainer.deterministic)
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if device.type == "cuda":  # explicit TF32 policy for float32 math (recorded in hardware.numerics; CPU untouched)
        tf32 = bool(cfg.precision.get("tf32", True))  # +precision.tf32=false: true FP32 matmuls and convolutions
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    return numerics_environment(cfg, device)


def numerics_environment(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What changes a run's numbers besides its config (part of the run key)."""
    return {"device": device.type, "threads": torch.get_num_threads(), "deterministic": bool(cfg.trainer.deterministic)}


def planned_run_key(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> str:
    """The run key ``execute`` will compute for this composed config (without the ``hydra`` node), on
    this machine: lets a study find the runs it already has without launching them."""
    cfg = cfg.copy()
    apply_baseline_recipe(cfg, choices, overrides)
    return run_key(resolved_config(cfg), numerics_environment(cfg, pick_device()))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as the record keeps it (and its run key hashes)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not config.get("plugins"):  # no plugins: the config (and its run key) as before the key existed
        config.pop("plugins", None)
    return config


# ------------------------------------------------------------------------------------------ assemble
@dataclass
class Parts:
    data: Any
    techniques: list
    ctx: RunContext


def assemble(plan: Plan, extras: dict[str, Any]) -> Parts:
    """Techniques (which may refuse the run, e.g. FP8 without a suitable GPU) and data; the model and
    optimizer are built inside the recorded part of the run (``train_and_record``)."""
    cfg = plan.cfg
    techniques = build_techniques(cfg)
    data = shard_data(build_dataset(cfg.dataset, cfg.data_dir, plan.device, int(cfg.seed)))
    t = cfg.trainer
    if int(t.batch_size) > len(data.train) and data.task != "lm":
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is larger than the training split ({len(data.train):,} samples); lower it"
        )
    spe = data.train.num_batches(int(t.batch_size), True)
    total = int(t.max_steps) if t.max_steps is not None else int(t.epochs) * spe  # a step budget replaces epochs
    ctx = RunContext(
        cfg=cfg,
        device=plan.device,
        data=data,
        total_steps=total,
        steps_per_epoch=spe,
        epochs=-(-total // spe),
        run_dir=str(plan.run_dir),
    )
    ctx.extras.update({"run_key": plan.key, **extras})
    est = preflight_duration(
        cfg, data, plan.device, build_model, build_optimizer, total, spe
    )  # printed before training
    plan.duration = est.as_record() if est is not None else {}
    return Parts(data, techniques, ctx)


def build_trainer(plan: Plan, parts: Parts, record: dict[str, Any]) -> Trainer:
    cfg, ctx = plan.cfg, parts.ctx
    model = build_model(cfg.model, parts.data).to(plan.device)
    for tq in parts.techniques:
        model = tq.prepare_model(model, ctx)
    ctx.model = model = model.to(plan.device)
    params = count_params(model)
    log.info(
        f"task {cfg.task.name}, model {plan.choices.get('model')}: {params:,} parameters; {len(parts.data.train):,} training "
        f"samples, {ctx.steps_per_epoch} steps/epoch, {ctx.epochs} epochs on {plan.device}"
    )
    record["model_info"] = {
        "params": params,
        "flops_per_sample": training_flops_per_sample(model, parts.data.input_shape),
    }
    ctx.optimizer = build_optimizer(
        cfg.optimizer, model, batch_size=int(cfg.trainer.batch_size), total_steps=ctx.total_steps
    )
    scheduler = build_schedule(cfg.schedule, ctx.optimizer, ctx.total_steps, ctx.steps_per_epoch)
    logger = make_logger(cfg, plan.run_dir) if distributed.is_main() else None  # only rank 0 logs
    if logger is not None:
        logger.log_config(plan.config)
    trainer = Trainer(cfg, ctx, model, ctx.optimizer, scheduler, parts.techniques, logger)
    ckpt = plan.run_dir / CHECKPOINT_NAME
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        if state.get("run_key") != plan.key:
            raise ConfigError(f"{ckpt} belongs to a different configuration; use a new run directory")
        trainer.load_state_dict(state)
        trainer.requeues += 1
        log.info(f"resumed from {ckpt} at epoch {trainer.epoch} (step {trainer.step})")
    distributed.seed_ranks(int(cfg.seed), trainer.step)  # torchrun: each rank its own dropout stream
    return trainer


# ------------------------------------------------------------------------------------------ train + record
def start_record(plan: Plan, data, started: dt.datetime) -> dict[str, Any]:
    c = plan.choices
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": f"{started:%Y%m%d-%H%M%S}-{c.get('model')}-{c.get('dataset')}-{c.get('optimizer')}-s{plan.cfg.seed}-{plan.key[:6]}",
        "run_dir": str(plan.run_dir),
        "status": "running",
        "error": None,
        "config": plan.config,
        "choices": plan.choices,
        "overrides": plan.overrides,
        "task": task_of(plan.config, plan.choices),
        "technique": technique_of(plan.config, plan.choices),
        "run_key": plan.key,
        "seed": int(plan.cfg.seed),
        "environment": plan.environment,
        "study": plan.config.get("study_run") or None,
        "started_at": started.isoformat(timespec="seconds"),
        "dataset_info": {
            "name": data.name,
            "task": data.task,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "sizes": {
                s: len(getattr(data, s))
                for s in ("train", "val", "test")
                if getattr(data, s) is not None and data.task != "lm"
            },
            **data.meta,
            **({"label_noise": noise} if (noise := label_noise_info(data.train)) else {}),
        },
    }


def train_and_record(plan: Plan, parts: Parts, started: dt.datetime) -> dict[str, Any]:
    record = start_record(plan, parts.data, started)
    trainer = None
    try:
        trainer = build_trainer(plan, parts, record)
        with preemption.PreemptionGuard(main_rank=distributed.is_main()):  # SIGUSR2/SIGTERM: checkpoint + requeue
            metrics = trainer.fit()
        record["techniques"] = finalize_techniques(parts, metrics, record)
        record["metrics"] = metrics
        record["status"] = "ok"
    except BAD_INPUT:
        remove_if_unused(plan.run_dir)
        raise
    except Diverged as e:
        record["status"], record["error"] = "diverged", str(e)
        log.error(f"run diverged: {e}")
    except Exception as e:  # noqa: BLE001  (every failure is a record)
        fault = infra_fault(e)
        record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
        if fault is not None:  # the machine failed, not the technique: leaderboards do not count it
            record["infra_fault"], record["error"] = True, describe_os_error(fault)
        record["traceback"] = traceback.format_exc()
        log.error(f"run failed: {record['error']}")
    finally:
        close_record(plan, record, trainer)
    if record["status"] != "ok":
        raise RunFailed(f"run {record['status']}: {record['error']} (record: {plan.run_dir / RECORD_NAME})")
    report(record)
    return record


def finalize_techniques(parts: Parts, metrics: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Each technique's ``finalize`` (post-hoc calibration, post-training quantization) adds metrics;
    its statistics go into the record by group."""
    out = {}
    for tq in parts.techniques:
        result = tq.finalize(parts.ctx.model, parts.ctx) or {}
        metrics.update(result.get("metrics", {}))
        if result.get("reliability"):
            record["reliability"] = result["reliability"]
        entry = {"name": tq.name, **tq.summary()}
        if result.get("params") is not None:
            entry["params"] = result["params"]
        out[getattr(tq, "group", tq.name)] = entry
    return out


def close_record(plan: Plan, record: dict[str, Any], trainer: Trainer | None) -> None:
    """Fill the run's measurements and write the record (rank 0), unless the run was interrupted."""
    if trainer is not None:
        record.update(trainer.summary())
        record["curve"] = trainer.curve
        record["requeues"] = trainer.requeues
        record["memory"] = {**peak_memory(plan.device), **plan.memory}
        record["memory"]["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizer)
        record.setdefault("timing", {}).update(plan.duration)  # estimated_s next to the measured total_s
    else:
        record["memory"] = {**peak_memory(plan.device), **plan.memory}
    record["metric_directions"] = metric_directions(record.get("metrics") or {}, plan.cfg.task)
    record["hardware"] = hardware(plan.device)
    add_mfu(record)  # hardware.peak_flops and throughput.mfu (None on CPU / unknown GPUs)
    record["distributed"] = distributed.describe(int(plan.cfg.trainer.batch_size), int(plan.cfg.seed))
    record["versions"] = versions()
    record["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if record["status"] == "running" or not distributed.is_main():  # interrupted: keep the checkpoint, no record
        return
    path = write_record(plan.run_dir, record)
    if record["status"] == "ok":
        remove_checkpoints(plan.run_dir)  # checkpoint.pt and the previous good one
    if trainer is not None and trainer.logger is not None:
        trainer.logger.log_final(record)
        trainer.logger.close()
    log.info(f"record: {path}")


def report(record: dict[str, Any]) -> None:
    """The console summary: the task's reported metric first, then the rest of the final metrics."""
    m, task = record["metrics"], record["task"]
    keys = [
        f"{task['report_split']}_{task['metric']}",
        "test_acc",
        "test_top5",
        "test_loss",
        "test_ppl",
        "val_ppl",
        "test_ece",
        "test_nll",
        "test_ece_after",  # post-hoc calibration: after-values (each calibrator's when several were fitted)
        "test_nll_after",
        *sorted(k for k in m if k.startswith(("test_ece_after_", "test_nll_after_"))),
    ]
    shown = list(dict.fromkeys(k for k in keys if k in m))
    summary = ", ".join(f"{k} {m[k]:.4f}" for k in shown)
    log.info(f"done in {record['timing']['total_s']:.1f}s: {summary}")
    if distributed.is_main():
        print(f"test: {summary}" if summary else "done", file=sys.stdout, flush=True)


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds only Hydra's own files (bad input: nothing was run)."""
    if not run_dir.exists():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in list(run_dir.parents)[
            :3
        ]:  # the date folder, runs/ (or the sweep folders) and results_dir, when empty
            try:
                parent.rmdir()
            except OSError:
                break


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_allocated"}
    import resource

    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "host_maxrss"}


def hardware(device: torch.device) -> dict[str, Any]:
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    world = (
        torch.distributed.get_world_size()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 1
    )
    return {"device": device.type, "device_name": name, "world_size": world, "cpu_threads": torch.get_num_threads()}
