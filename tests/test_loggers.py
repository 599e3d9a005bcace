import csv
import json
import time

import pytest
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.infra.loggers import CsvLogger, default_group, make_logger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_header_is_union_and_resume_rewrites(tmp_path):
    cfg = OmegaConf.create({"logger": {"name": "csv"}})
    with make_logger(cfg, tmp_path) as log:
        assert isinstance(log, CsvLogger)
        log.log_config({"seed": 0})
        log.log_epoch(1, {"train_loss": 2.0, "lr": 0.1})
        log.log_epoch(2, {"train_loss": 1.5, "lr": 0.05, "test_acc": 0.5})  # new key -> header grows
        log.log_epoch(3, {"train_loss": 1.0, "lr": 0.01})
    rows = _rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "lr", "test_acc"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["test_acc"] == "" and rows[1]["test_acc"] == "0.5" and float(rows[2]["train_loss"]) == 1.0

    # a resumed run re-logs epoch 3 onwards: the stale row is replaced, the earlier ones kept
    log = make_logger(cfg, tmp_path)
    log.log_epoch(3, {"train_loss": 0.9, "lr": 0.01})
    log.log_epoch(4, {"train_loss": 0.8, "lr": 0.001})
    log.close()
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[2]["train_loss"]) == 0.9
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temp files left behind


def test_unknown_logger_names_choices(tmp_path):
    with pytest.raises(ConfigError, match="csv, wandb"):
        make_logger(OmegaConf.create({"logger": {"name": "tensorboardx"}}), tmp_path)


def test_default_group_is_the_sweep_dir(tmp_path):
    job = tmp_path / "results" / "sweeps" / "2025-01-02" / "10-11-12" / "3_resnet18_cifar10_sgd_s0"
    assert default_group(job) == "2025-01-02_10-11-12"
    run = tmp_path / "results" / "runs" / "2025-01-02" / "10-11-12_resnet18_cifar10_sgd_s0"
    assert default_group(run) == run.name


def _wandb_records(path):
    """Records of an offline run's ``run-*.wandb`` file (W&B header, then a LevelDB-style log of protobuf
    records in 32 KiB blocks). wandb >= 0.19 keeps the summary there; wandb-summary.json appears on sync."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_writes_final_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "results" / "sweeps" / "2025-01-02" / "10-11-12" / "0_small_cnn_digits_sgd_s0"
    cfg = OmegaConf.create(
        {
            "logger": OmegaConf.load("conf/logger/wandb.yaml"),
            "optimizer": {"name": "sgd", "lr": 0.05},
            "seed": 0,
        }
    )
    t0 = time.perf_counter()
    log = make_logger(cfg, run_dir)
    log.log_epoch(1, {"train_loss": 1.2, "test_acc": 0.7})
    log.log_epoch(2, {"train_loss": 0.6, "test_acc": 0.9})
    log.log_final({"status": "ok", "metrics": {"test_acc": 0.9125, "test_loss": 0.31}, "timing": {"total_s": 3.5}})
    log.close()
    elapsed = time.perf_counter() - t0
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    if (runs[0] / "files" / "wandb-summary.json").exists():  # older wandb writes it at finish
        summary = json.loads((runs[0] / "files" / "wandb-summary.json").read_text())
    else:
        # wandb's service process may still be flushing the file when finish() returns: re-read briefly
        for _ in range(40):
            recs = _wandb_records(next(runs[0].glob("run-*.wandb")))
            summary = {i.key: json.loads(i.value_json) for r in recs if r.HasField("summary") for i in r.summary.update}
            history = [r for r in recs if r.HasField("history")]
            if len(history) >= 2 and "test_acc" in summary:
                break
            time.sleep(0.25)
        assert len(history) == 2
        config = [json.loads(i.value_json) for r in recs if r.HasField("run") for i in r.run.config.update]
        assert {"name": "sgd", "lr": 0.05} in config
    assert summary["test_acc"] == 0.9125 and summary["status"] == "ok" and summary["timing/total_s"] == 3.5
    assert elapsed < 60, f"wandb offline run took {elapsed:.1f} s"
