"""Bad input refused before any work with exit 2, a message naming the value, nothing left behind
(issue 14 items 5 and 7)."""

from __future__ import annotations

import pytest

from harness.errors import ConfigError
from harness.infra import overrides
from tests.conftest import harness

QUICK = ("task=quickstart", "trainer.epochs=1", "trainer.progress=none")
LONG_SEED = "9" * 5000


@pytest.mark.parametrize(
    "override, words",
    [
        ("+dataset.train_subset=0", ["dataset.train_subset=0", "positive"]),
        ("+dataset.train_subset=-5", ["dataset.train_subset=-5", "positive"]),
        ("dataset.val_size=-1", ["dataset.val_size=-1", ">= 0"]),
        ("trainer.target=abc", ["trainer.target", "did you mean task.target"]),
        ("trainer.epoch=2", ["trainer.epoch", "did you mean trainer.epochs"]),
        ("optimizer.lrr=0.1", ["optimizer.lrr", "did you mean optimizer.lr"]),
        ("hydra/launcher=nope", ["unknown hydra/launcher 'nope'", "local", "slurm", "parallel"]),
        (f"seed={LONG_SEED}", ["seed=", "5,000 digits", "0 to"]),
        ("seed=-3", ["seed=-3", "0 to"]),
        ("optimizer=adamé", ["optimizer=adamé", "quoted", "'optimizer=\"adamé\"'"]),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, override, words):
    results = tmp_path / "results"
    p = harness("run", *QUICK, override, f"results_dir={results}")
    assert p.returncode == 2, p.stderr[-3000:]
    for w in words:
        assert w in p.stderr, (w, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert not results.exists() or not [f for f in results.rglob("*") if f.is_file()]


def test_key_checks_name_the_close_match_and_pass_real_keys():
    for good in ("trainer.epochs", "task.target", "model.width", "optimizer.lr", "hydra.sweep.dir", "seed"):
        overrides.check_key(good)
    with pytest.raises(ConfigError, match=r"task.baseline has no key 'lrr'; did you mean task.baseline.lr"):
        overrides.check_key("task.baseline.lrr")
    overrides.check_key("optimizer.my_own_key", groups=False)  # a user search path may add keys
