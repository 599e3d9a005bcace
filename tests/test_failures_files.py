"""Checkpoints that cannot be trusted are refused or replaced by the previous good one, never used
silently; a full disk is named and is not the technique's fault; files get the umask's mode
(issue 14 items 3, 13, 14, 16)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from harness.errors import CheckpointError, ConfigError, InfraFault, infra_fault
from harness.records import atomic_write_text, write_record
from harness.run import checkpoint as ck
from tests.conftest import harness, records

TASK = "task=quickstart"
QUICK = (TASK, "trainer.progress=none")


def state(epoch: int) -> dict:
    g = torch.Generator().manual_seed(epoch)
    return {"run_key": "k1", "epoch": epoch, "w": torch.randn(256, generator=g)}


def flip16(path: Path, at: int = 400) -> None:
    b = bytearray(path.read_bytes())
    b[at : at + 16] = bytes(x ^ 0xFF for x in b[at : at + 16])
    path.write_bytes(bytes(b))  # same size, 16 bytes flipped


def test_bit_flipped_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    path = tmp_path / ck.CHECKPOINT_NAME
    ck.save_checkpoint(path, state(1))
    ck.save_checkpoint(path, state(2))
    assert (tmp_path / ck.PREVIOUS_NAME).exists()
    size = path.stat().st_size
    flip16(path)
    assert path.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="harness"):
        got = ck.load_checkpoint(path)
    assert got["epoch"] == 1 and torch.equal(got["w"], state(1)["w"])
    assert "does not match the checksum" in caplog.text and "previous good checkpoint" in caplog.text
    assert str(tmp_path / ck.PREVIOUS_NAME) in caplog.text


def test_a_bad_checkpoint_never_replaces_the_previous_good_one(tmp_path):
    path = tmp_path / ck.CHECKPOINT_NAME
    ck.save_checkpoint(path, state(1))
    ck.save_checkpoint(path, state(2))
    flip16(path)
    ck.save_checkpoint(path, state(3))  # the flipped epoch-2 file is not kept as "previous"
    flip16(path)
    assert ck.load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b"", "is empty"),
        (lambda b: b[: len(b) // 2], "does not match the checksum"),
        (lambda b: os.urandom(3000), "unreadable"),
        (lambda b: b"HARNESS-CHECKPOINT 1 sha256=zz\n" + b, "damaged header"),
    ],
)
def test_unreadable_checkpoint_is_refused_with_the_way_forward(tmp_path, damage, words):
    path = tmp_path / ck.CHECKPOINT_NAME
    ck.save_checkpoint(path, state(1))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)  # bad input: exit 2, no record
    assert str(path) in msg and words in msg and "resume=false" in msg
    assert "weights_only" not in msg and msg.strip()


def test_resume_reports_checkpoints_it_cannot_read(tmp_path, caplog):
    good = tmp_path / "runs" / "a" / ck.CHECKPOINT_NAME
    good.parent.mkdir(parents=True)
    ck.save_checkpoint(good, state(1))
    bad = tmp_path / "runs" / "b" / ck.CHECKPOINT_NAME
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00" * 64)
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert ck.find_resumable(tmp_path, "k1") == good.parent
    assert str(bad) in caplog.text and "not resumed" in caplog.text


def test_run_with_a_garbage_checkpoint_exits_2_naming_it(tmp_path):
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / ck.CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 not really a zip" * 10)
    p = harness("run", *QUICK, "trainer.epochs=1", f"results_dir={tmp_path / 'results'}", f"hydra.run.dir={run_dir}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert str(run_dir / ck.CHECKPOINT_NAME) in p.stderr and "resume=false" in p.stderr
    assert "Traceback" not in p.stderr and not (run_dir / "result.json").exists()


def test_checkpoint_and_record_writes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ck.save_checkpoint(tmp_path / ck.CHECKPOINT_NAME, state(1))
        write_record(tmp_path, {"status": "ok"})
    finally:
        os.umask(old)
    assert (tmp_path / ck.CHECKPOINT_NAME).stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o640


def test_a_run_writes_group_readable_files(tmp_path):
    p = subprocess.run(
        ["bash", "-c", f"umask 022 && {harness_cmd()} run {' '.join(QUICK)} trainer.epochs=1 results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HARNESS_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path)
    for name in ("result.json", "metrics.csv"):
        assert (Path(rec["run_dir"]) / name).stat().st_mode & 0o777 == 0o644, name


def harness_cmd() -> str:
    import sys

    return f"{sys.executable} -m harness"


def test_full_disk_is_named_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write_text(path, '{"old": true}\n')

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(InfraFault) as e:
        write_record(tmp_path, {"new": True})
    assert f"no space left on {path}" in str(e.value) and infra_fault(e.value) is e.value
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left
    with pytest.raises(InfraFault, match="no space left on"):
        ck.save_checkpoint(tmp_path / ck.CHECKPOINT_NAME, state(1))
    assert infra_fault(RuntimeError("a bug")) is None


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_run_on_a_full_disk_names_it_and_blames_no_technique(tmp_path, tiny_disk):
    earlier = tiny_disk / "runs" / "earlier"
    earlier.mkdir(parents=True)
    write_record(earlier, {"status": "ok", "marker": 1})
    before = (earlier / "result.json").read_bytes()
    p = harness("run", *QUICK, "trainer.epochs=3", f"results_dir={tiny_disk}")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "no space left on" in p.stderr + p.stdout
    assert (earlier / "result.json").read_bytes() == before
    for rec in records(tiny_disk):
        if rec.get("marker") != 1:
            assert rec["status"] == "failed" and rec["infra_fault"] is True
            assert rec["error"].startswith(f"no space left on {tiny_disk}")
