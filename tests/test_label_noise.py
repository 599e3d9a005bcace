"""Symmetric label noise (``dataset.label_noise``): a fixed fraction of the training labels replaced by
another class, seeded by ``dataset.noise_seed`` (never the run seed), validation and test untouched,
recorded in ``dataset_info.label_noise``; bad values and unsupported datasets refused before any work."""

import pytest
import torch
from conftest import harness, records

from harness.data.base import symmetric_label_noise
from harness.data.digits import digits
from harness.data.synthetic import synthetic
from harness.errors import ConfigError


def _digits(seed=0, **kw):
    return digits(None, "cpu", seed, train_size=1437, val_size=300, crop_padding=0, **kw)


def test_realised_fraction_and_clean_val_test_on_digits():
    clean, noisy = _digits(), _digits(label_noise=0.2)
    wrong = noisy.train.labels != clean.train.labels
    assert len(noisy.train) == 1137
    assert wrong.sum().item() == round(0.2 * 1137)  # exactly round(fraction * N) labels changed
    assert torch.equal(wrong, noisy.train.flipped)  # every flipped label is a different class
    assert torch.equal(noisy.train.images, clean.train.images)
    assert torch.equal(noisy.val.labels, clean.val.labels)  # validation carved before the noise
    assert torch.equal(noisy.test.labels, clean.test.labels)
    assert clean.train.flipped is None


def test_noise_depends_on_noise_seed_not_run_seed():
    a, b = _digits(seed=0, label_noise=0.3), _digits(seed=7, label_noise=0.3)
    assert torch.equal(a.train.labels, b.train.labels)
    c = _digits(seed=0, label_noise=0.3, noise_seed=1)
    assert not torch.equal(a.train.labels, c.train.labels)


def test_new_labels_are_uniform_over_the_other_classes():
    labels = torch.zeros(20_000, dtype=torch.int64)  # every true label is class 0
    noisy, flipped = symmetric_label_noise(labels, 5, 0.5, seed=3)
    assert flipped.sum().item() == 10_000
    assert (noisy[flipped] != 0).all()  # never flipped to the true class
    counts = torch.bincount(noisy[flipped], minlength=5)[1:].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # about 1/4 each of classes 1..4


def test_subset_keeps_the_flipped_mask():
    data = synthetic(
        None, "cpu", 0, channels=1, image_size=4, num_classes=3, train_size=500, test_size=10,
        data_seed=0, crop_padding=0, flip=False, val_size=0, label_noise=0.4,
    )  # fmt: skip
    part = data.train.subset(torch.arange(100))
    assert torch.equal(part.flipped, data.train.flipped[:100])


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), "abc", True])
def test_bad_values_refused(value):
    with pytest.raises(ConfigError, match=r"dataset.label_noise=.* must be"):
        _digits(label_noise=value)


def test_quickstart_records_label_noise_and_trains(tmp_path):
    p = harness(
        "run",
        "task=quickstart",
        "trainer.epochs=1",
        "trainer.progress=none",
        "dataset.label_noise=0.25",
        f"results_dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path)
    info = rec["dataset_info"]["label_noise"]
    assert info["fraction"] == 0.25 and info["noise_seed"] == 0
    assert info["train_size"] == rec["dataset_info"]["sizes"]["train"]
    assert abs(info["realised_fraction"] - 0.25) < 1 / info["train_size"]
    assert rec["config"]["dataset"]["label_noise"] == 0.25


@pytest.mark.parametrize(
    "args, message",
    [
        (("task=quickstart", "dataset.label_noise=1.0"), "dataset.label_noise=1.0 must be in [0, 1)"),
        (("task=quickstart", "dataset.noise_seed=-3"), "dataset.noise_seed=-3 must be an integer"),
        (("task=gpt2_tiny_wikitext2", "+dataset.label_noise=0.2"), "not supported by dataset=wikitext2"),
    ],
)
def test_refused_before_any_work(tmp_path, args, message):
    results = tmp_path / "results"
    p = harness("run", *args, "trainer.progress=none", f"results_dir={results}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert not records(results)  # no run directory, no record
