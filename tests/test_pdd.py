"""Progressive Data Dropout (``regularization=pdd``): the keep rule, the device-side selection of an
epoch's samples, the schedule's length in epochs, the record's effective epochs, refusals, and an exact
resume from a mid-epoch checkpoint."""

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import harness, records
from omegaconf import OmegaConf

from harness.data.base import DeviceImageSplit
from harness.errors import ConfigError
from harness.run.checkpoint import load_checkpoint
from harness.techniques.registry import build_techniques
from harness.techniques.selection import ProgressiveDataDropout, keep_mask


def test_keep_rule_threshold_and_misclassified():
    logits = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]))
    labels = torch.tensor([0, 1, 2])
    assert keep_mask(logits, labels, 0.7).tolist() == [False, True, True]  # p_true 0.8, 0.4, 0.6
    assert keep_mask(logits, labels, 0.5).tolist() == [False, True, False]
    assert keep_mask(logits, labels, 0.0).tolist() == [False, True, False]  # 0: misclassified only


def _split(n=50):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return DeviceImageSplit(images, torch.arange(n) % 5, (0.5,), (0.25,))


def test_batches_iterate_only_the_kept_positions():
    split, kept = _split(), torch.tensor([3, 7, 8, 20, 21, 22, 40, 49])
    seen = [b.index for b in split.batches(3, train=True, epoch=2, seed=1, index=kept)]
    assert split.num_batches(3, True, len(kept)) == len(seen) == 2  # drop_last: 8 // 3
    got = torch.cat(seen)
    assert set(got.tolist()) <= set(kept.tolist()) and len(set(got.tolist())) == 6
    again = torch.cat([b.index for b in split.batches(3, train=True, epoch=2, seed=1, index=kept)])
    assert torch.equal(got, again)  # a pure function of (seed, epoch, kept)
    assert split.num_batches(3, True, 0) == 0 and not list(split.batches(3, train=True, index=kept[:0]))


def _ctx(split, epoch, epochs, calls):
    def predict(s):
        calls.append(epoch)
        logits = torch.zeros(len(s), 5)
        logits[torch.arange(len(s)), s.labels] = torch.linspace(-3, 3, len(s))  # p_true rises with position
        return logits, s.labels

    data = SimpleNamespace(task="classification", train=split, name="t")
    return SimpleNamespace(data=data, epoch=epoch, epochs=epochs, extras={"predict": predict})


def test_selection_revision_and_resume_state():
    split, calls = _split(), []
    pdd = ProgressiveDataDropout(threshold=0.3, revision_epochs=2)
    kept = pdd.select_samples(_ctx(split, 0, 5, calls))
    assert 0 < len(kept) < len(split) and calls == [0]
    assert torch.equal(pdd.select_samples(_ctx(split, 0, 5, calls)), kept) and calls == [0]  # no second scoring

    restored = ProgressiveDataDropout(threshold=0.3, revision_epochs=2)
    restored.load_state_dict(pdd.state_dict())  # a checkpoint taken inside epoch 0
    assert torch.equal(restored.select_samples(_ctx(split, 0, 5, calls)), kept) and calls == [0]

    assert pdd.select_samples(_ctx(split, 3, 5, calls)) is None  # epochs 3 and 4 revise the whole set
    assert pdd.summary()["kept_per_epoch"] == [len(kept), len(split)]
    assert pdd.summary()["scoring_sample_passes"] == len(split)


@pytest.mark.parametrize(
    "params, message",
    [({"threshold": 1.5}, r"threshold=1.5 must be in \[0, 1\]"), ({"revision_epochs": -1}, "revision_epochs=-1")],
)
def test_bad_hyper_parameters_refused(params, message):
    cfg = OmegaConf.create({"regularization": {"name": "pdd", **params}})
    with pytest.raises(ConfigError, match=message):
        build_techniques(cfg)


def test_pdd_on_quickstart_fewer_sample_passes_same_schedule(tmp_path):
    for extra in (["regularization=none"], ["regularization=pdd", "regularization.threshold=0.9"]):
        p = harness("run", "task=quickstart", "trainer.progress=none", *extra, f"results_dir={tmp_path}")
        assert p.returncode == 0, p.stderr[-3000:]
    recs = {r["choices"]["regularization"]: r for r in records(tmp_path)}
    base, pdd = recs["none"], recs["pdd"]
    assert base["effective_epochs"] == pytest.approx(base["sample_passes"] / 1137, abs=1e-4)  # 17 x 64 a epoch
    assert pdd["sample_passes"] < 0.6 * base["sample_passes"] and pdd["effective_epochs"] < 0.6 * 15
    assert pdd["steps"] < base["steps"] and pdd["epochs_completed"] == base["epochs_completed"] == 15
    kept = pdd["techniques"]["regularization"]["kept_per_epoch"]
    assert len(kept) == 15 and kept[-1] == 1137 and min(kept) < 1137  # shrunk epochs, full revision epoch
    # the schedule keeps its length in epochs: the learning rate at each epoch's end equals the baseline's
    assert [c["lr"] for c in pdd["curve"]] == pytest.approx([c["lr"] for c in base["curve"]], abs=1e-9)
    assert pdd["metrics"]["test_acc"] >= base["metrics"]["test_acc"] - 0.03


def test_refused_on_language_models_and_loader_splits():
    pdd, calls = ProgressiveDataDropout(), []
    lm = _ctx(_split(), 0, 3, calls)
    lm.data.task = "lm"
    with pytest.raises(ConfigError, match="regularization=pdd applies to classification only"):
        pdd.select_samples(lm)
    folder = _ctx(object(), 0, 3, calls)
    with pytest.raises(ConfigError, match="needs a device-resident training split"):
        pdd.select_samples(folder)
    assert calls == []  # refused before any scoring


def test_mid_epoch_resume_is_exact(tmp_path):
    args = [
        "task=quickstart",
        "trainer.epochs=4",
        "trainer.log_every=1",
        "trainer.progress=plain",
        "regularization=pdd",
        "regularization.threshold=0.9",
    ]
    threads = {"OMP_NUM_THREADS": "1"}  # part of the run key: the resumed run must find the same one
    env = {**os.environ, **threads, "HARNESS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "harness", "run", *args, f"results_dir={tmp_path / 'cut'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 2/4 step 3/" in line:  # inside the first shortened epoch
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (ckpt,) = (tmp_path / "cut").rglob("checkpoint.pt")
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and state["partial"]["batch"] >= 3

    resumed = harness("run", *args, f"results_dir={tmp_path / 'cut'}", "resume=true", cwd=tmp_path, env=threads)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = harness("run", *args, f"results_dir={tmp_path / 'whole'}", cwd=tmp_path, env=threads)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (rec,), (ref,) = records(tmp_path / "cut"), records(tmp_path / "whole")
    assert rec["requeues"] == 1 and rec["steps"] == ref["steps"] and rec["sample_passes"] == ref["sample_passes"]
    assert (
        rec["techniques"]["regularization"]["kept_per_epoch"] == ref["techniques"]["regularization"]["kept_per_epoch"]
    )
    assert rec["metrics"]["test_loss"] == pytest.approx(ref["metrics"]["test_loss"], rel=1e-5)
    assert [c["train_loss"] for c in rec["curve"]] == pytest.approx([c["train_loss"] for c in ref["curve"]], rel=1e-5)
