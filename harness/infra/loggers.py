"""Per-run metric loggers, chosen by ``logger=csv`` (default) or ``logger=wandb``.

The record (result.json) is always written by the loop; a logger adds a per-epoch trace next to it
(``metrics.csv``) or streams the run to Weights & Biases (offline unless told otherwise, so nothing needs an
account or the network).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.records import atomic_write_text

LOGGERS = ("csv", "wandb")


class RunLogger:
    """Interface of a run logger; every method is optional to override."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def log_final(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CsvLogger(RunLogger):
    """``metrics.csv`` in the run directory: one row per epoch, header = union of all keys seen.

    Rows are appended (and flushed) while the header is unchanged; a new key or a re-logged epoch (a
    resumed run repeating epochs after its last checkpoint) rewrites the file atomically, so a crash never
    leaves a half-written or inconsistent file."""

    def __init__(self, run_dir: str | os.PathLike, filename: str = "metrics.csv"):
        self.path = Path(run_dir) / filename
        self.rows: list[dict[str, Any]] = []
        self.fields: list[str] = ["epoch"]
        if self.path.exists():  # resumed run: keep what the previous attempt logged
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or ["epoch"])
                self.rows = [dict(r) for r in reader]

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        row = {"epoch": int(epoch), **{k: _scalar(v) for k, v in metrics.items() if k != "epoch"}}
        new = [k for k in row if k not in self.fields]
        stale = any(_int(r.get("epoch")) >= epoch for r in self.rows)
        self.fields += new
        if stale:
            self.rows = [r for r in self.rows if _int(r.get("epoch")) < epoch]
        self.rows.append(row)
        if new or stale or not self.path.exists():
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields, restval="").writerow(row)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.fields, restval="")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class WandbLogger(RunLogger):
    """Weights & Biases: config at init, per-epoch metrics as history, final metrics in the run summary.

    Runs of one multirun share a group (the sweep directory), single runs are their own group. Mode is
    ``WANDB_MODE`` if set, else ``logger.mode`` (default ``offline``: files under ``<run_dir>/wandb``,
    upload later with ``wandb sync``)."""

    def __init__(self, cfg: Any, run_dir: str | os.PathLike):
        import wandb

        lc = _get(cfg, "logger") or {}
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = _container(cfg)
        self.run = wandb.init(
            project=_get(lc, "project") or "harness",
            entity=_get(lc, "entity"),
            group=_get(lc, "group") or default_group(run_dir),
            name=run_dir.name,
            tags=list(_get(lc, "tags") or []),
            mode=os.environ.get("WANDB_MODE") or _get(lc, "mode") or "offline",
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",  # a new run per training run, even in one process
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.run.log({"epoch": epoch, **{k: _scalar(v) for k, v in metrics.items()}})

    def log_final(self, record: dict[str, Any]) -> None:
        summary = dict(record.get("metrics") or {})
        summary["status"] = record.get("status")
        if record.get("error"):
            summary["error"] = str(record["error"])[:1000]
        for section in ("timing", "throughput", "memory"):
            for k, v in (record.get(section) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    summary[f"{section}/{k}"] = v
        self.run.summary.update(summary)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def default_group(run_dir: Path) -> str:
    """``results/sweeps/<date>/<time>/<job>`` -> ``<date>_<time>`` (one group per multirun); a single run
    is its own group."""
    parts = run_dir.resolve().parts
    if "sweeps" in parts:
        i = len(parts) - 1 - parts[::-1].index("sweeps")
        if len(parts) > i + 3:
            return "_".join(parts[i + 1 : i + 3])
    return run_dir.name


def make_logger(cfg: Any, run_dir: str | os.PathLike) -> RunLogger:
    """The logger ``cfg.logger.name`` names, writing into ``run_dir``."""
    name = _get(_get(cfg, "logger") or {}, "name") or "csv"
    if name == "csv":
        return CsvLogger(run_dir)
    if name == "wandb":
        return WandbLogger(cfg, run_dir)
    raise ConfigError(f"logger.name={name!r} is not a logger; valid choices: {', '.join(LOGGERS)}")


def _get(obj: Any, key: str) -> Any:
    try:
        return obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)
    except Exception:  # omegaconf raises on missing keys of struct configs
        return None


def _container(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v  # tensors / numpy scalars


def _int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1
