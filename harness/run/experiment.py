"""Assemble one run from its config (data, model, techniques, optimizer, schedule), train it and
write its record. Every failure after the run has started becomes a record with status
``failed`` or ``diverged``; bad input (``ConfigError``, missing data) fails before any work and
leaves no files behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from harness import config as hconfig
from harness.data import build_dataset
from harness.data.sharding import shard_data
from harness.errors import ConfigError, DataMissingError
from harness.hooks import RunContext
from harness.infra import distributed, preemption
from harness.infra.hardware import add_mfu
from harness.infra.loggers import make_logger
from harness.models import build_model
from harness.models.flops import count_params, training_flops_per_sample
from harness.records import (
    RECORD_NAME,
    SCHEMA_VERSION,
    read_record,
    run_key,
    task_of,
    technique_of,
    versions,
    write_record,
)
from harness.run.checkpoint import CHECKPOINT_NAME, load_checkpoint
from harness.run.trainer import Diverged, Trainer
from harness.techniques.optimizers import build_optimizer, check_optimizer
from harness.techniques.quantization import optimizer_state_bytes
from harness.techniques.registry import build_techniques
from harness.techniques.schedules import build_schedule

log = logging.getLogger("harness")


class RunFailed(RuntimeError):
    """Raised at the end of a run whose status is not ``ok`` (its record is already written), so
    the process exits non-zero and a cluster scheduler reports the job as failed."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_baseline_recipe(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> None:
    """A task preset names its baseline and that baseline's learning rate and weight decay. They
    apply when the run uses the baseline optimizer and the command line does not set them, so
    ``experiment=X optimizer=lion`` keeps Lion's own defaults."""
    base = cfg.get("baseline") or {}
    if not base or choices.get("optimizer") != base.get("optimizer"):
        return
    with open_dict(cfg):
        for key in ("lr", "weight_decay"):
            if base.get(key) is not None and not any(
                o.split("=")[0].lstrip("+~") == f"optimizer.{key}" for o in overrides
            ):
                cfg.optimizer[key] = base[key]


def find_records(results_dir: Path, key: str, status: str | None = "ok") -> list[Path]:
    out = []
    for path in results_dir.glob(f"**/{RECORD_NAME}"):
        try:
            rec = read_record(path)
        except (OSError, ValueError):
            continue
        if rec.get("run_key") == key and (status is None or rec.get("status") == status):
            out.append(path)
    return out


def find_resumable(results_dir: Path, key: str) -> Path | None:
    """The newest run directory of this experiment with a checkpoint and no finished record."""
    found = []
    for ck in results_dir.glob(f"**/{CHECKPOINT_NAME}"):
        try:
            state = load_checkpoint(ck)
        except Exception:
            continue
        if state.get("run_key") == key and not (ck.parent / RECORD_NAME).exists():
            found.append(ck.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds only Hydra's own files (bad input: nothing was run)."""
    if not run_dir.exists():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in list(run_dir.parents)[:2]:  # the date folder and runs/ (or the sweep folder), when empty
            try:
                parent.rmdir()
            except OSError:
                break


def execute(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str], extras: dict | None = None
) -> dict[str, Any]:
    """Run one experiment in ``run_dir`` and return its record. Raises ConfigError / DataMissingError
    for bad input (no record) and RunFailed after writing the record of a failed run."""
    try:
        hconfig.validate(cfg)
    except ConfigError:
        remove_if_unused(run_dir)
        raise
    apply_baseline_recipe(cfg, choices, overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    key = run_key(config)
    results_dir = Path(cfg.results_dir)
    if cfg.sweep.skip_completed:
        done = find_records(results_dir, key)
        if done:
            log.info(f"skipping: an ok record of this configuration exists at {done[0]}")
            remove_if_unused(run_dir)
            return read_record(done[0])
    if cfg.resume and not (run_dir / CHECKPOINT_NAME).exists():
        previous = find_resumable(results_dir, key)
        if previous is None:
            raise ConfigError(f"resume=true but no checkpoint of this configuration was found under {results_dir}")
        log.info(f"resuming in {previous}")
        if previous.resolve() != run_dir.resolve():
            remove_if_unused(run_dir)
            run_dir = previous
    if (run_dir / RECORD_NAME).exists():
        rec = read_record(run_dir / RECORD_NAME)
        if rec.get("status") == "ok" and rec.get("run_key") == key:
            log.info(f"already complete: {run_dir / RECORD_NAME}")
            return rec

    seed_everything(int(cfg.seed))
    device = pick_device()
    started = dt.datetime.now(dt.timezone.utc)
    try:
        # techniques check their requirements (e.g. FP8 needs a GPU) before any data is loaded
        techniques = build_techniques(cfg)
        check_optimizer(cfg.optimizer)
        data = build_dataset(cfg.dataset, cfg.data_dir, device, int(cfg.seed))
        data = shard_data(data)  # torchrun: this rank's shard of the training split
    except (ConfigError, DataMissingError):
        remove_if_unused(run_dir)
        raise
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": f"{started:%Y%m%d-%H%M%S}-{choices.get('model')}-{choices.get('dataset')}-{choices.get('optimizer')}-s{cfg.seed}-{key[:6]}",
        "run_dir": str(run_dir),
        "status": "running",
        "error": None,
        "config": config,
        "choices": choices,
        "overrides": overrides,
        "task": task_of(config, choices),
        "technique": technique_of(config, choices),
        "run_key": key,
        "seed": int(cfg.seed),
        "started_at": started.isoformat(timespec="seconds"),
        "dataset_info": {
            "name": data.name,
            "task": data.task,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            **data.meta,
        },
    }
    trainer = None
    logger = None
    try:
        t = cfg.trainer
        spe = data.train.num_batches(int(t.batch_size), True)
        epochs = int(t.epochs)
        total = epochs * spe
        if t.max_steps is not None:  # a step budget replaces the epoch budget
            total = int(t.max_steps)
            epochs = -(-total // spe)
        ctx = RunContext(
            cfg=cfg,
            device=device,
            data=data,
            total_steps=total,
            steps_per_epoch=spe,
            epochs=epochs,
            run_dir=str(run_dir),
        )
        ctx.extras["run_key"] = key
        ctx.extras.update(extras or {})
        model = build_model(cfg.model, data).to(device)
        for tq in techniques:
            model = tq.prepare_model(model, ctx)
        model = model.to(device)
        ctx.model = model
        params = count_params(model)
        log.info(
            f"model {choices.get('model')}: {params:,} parameters; {len(data.train):,} training samples, {spe} steps/epoch, {epochs} epochs on {device}"
        )
        record["model_info"] = {
            "params": params,
            "flops_per_sample": training_flops_per_sample(model, data.input_shape),
        }
        optimizer = build_optimizer(cfg.optimizer, model, batch_size=int(t.batch_size), total_steps=total)
        ctx.optimizer = optimizer
        scheduler = build_schedule(cfg.schedule, optimizer, total, spe)
        logger = make_logger(cfg, run_dir) if distributed.is_main() else None  # only rank 0 logs
        if logger is not None:
            logger.log_config(config)
        trainer = Trainer(cfg, ctx, model, optimizer, scheduler, techniques, logger)
        ckpt = run_dir / CHECKPOINT_NAME
        if ckpt.exists():
            state = load_checkpoint(ckpt)
            if state.get("run_key") != key:
                raise ConfigError(f"{ckpt} belongs to a different configuration; use a new run directory")
            trainer.load_state_dict(state)
            trainer.requeues += 1
            log.info(f"resumed from {ckpt} at epoch {trainer.epoch} (step {trainer.step})")
        with preemption.PreemptionGuard(main_rank=distributed.is_main()):  # SIGUSR2/SIGTERM: checkpoint + requeue
            metrics = trainer.fit()
        finals: dict[str, Any] = {}
        for tq in techniques:
            out = tq.finalize(model, ctx) or {}
            metrics.update(out.get("metrics", {}))
            if out.get("reliability"):
                record["reliability"] = out["reliability"]
            if out.get("params") is not None:
                finals[tq.name] = out["params"]
        record["metrics"] = metrics
        record["status"] = "ok"
        record["techniques"] = {
            getattr(tq, "group", tq.name): {
                "name": tq.name,
                **tq.summary(),
                **({"params": finals[tq.name]} if tq.name in finals else {}),
            }
            for tq in techniques
        }
    except (ConfigError, DataMissingError):
        remove_if_unused(run_dir)
        raise
    except Diverged as e:
        record["status"], record["error"] = "diverged", str(e)
        log.error(f"run diverged: {e}")
    except Exception as e:  # noqa: BLE001  (every failure is a record)
        record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        log.error(f"run failed: {record['error']}")
    finally:
        if trainer is not None:
            record.update(trainer.summary())
            record["curve"] = trainer.curve
            record["requeues"] = trainer.requeues
        record["memory"] = peak_memory(device)
        if trainer is not None:
            record["memory"]["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizer)
        record["hardware"] = hardware(device)
        add_mfu(record)  # hardware.peak_flops and throughput.mfu (None on CPU / unknown GPUs)
        record["distributed"] = distributed.describe(int(cfg.trainer.batch_size))
        record["versions"] = versions()
        record["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if record["status"] == "running":  # interrupted (KeyboardInterrupt, SystemExit): keep the checkpoint, no record
            pass
        elif distributed.is_main():  # one record per run, from rank 0
            path = write_record(run_dir, record)
            if record["status"] == "ok":
                (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
            if logger is not None:
                logger.log_final(record)
                logger.close()
            log.info(f"record: {path}")
    if record["status"] != "ok":
        raise RunFailed(f"run {record['status']}: {record['error']} (record: {run_dir / RECORD_NAME})")
    m = record["metrics"]
    summary = ", ".join(
        f"{k} {m[k]:.4f}" for k in ("test_acc", "test_top5", "test_loss", "val_ppl", "test_ppl") if k in m
    )
    log.info(f"done in {record['timing']['total_s']:.1f}s: {summary}")
    if distributed.is_main():
        print(f"test: {summary}" if summary else "done", file=sys.stdout, flush=True)
    return record


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
