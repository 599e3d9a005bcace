"""Schedules: values at chosen steps equal the closed-form formulas; warmup; the LambdaLR drives the lr."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from harness.config import CONF_DIR, list_choices
from harness.errors import ConfigError
from harness.techniques.schedules import build_schedule, lr_multiplier


def mult(total=100, spe=10, **cfg):
    return lr_multiplier(OmegaConf.create(cfg), total, spe)


def test_every_schedule_config_builds_and_drives_the_lr():
    for choice in list_choices("schedule"):
        cfg = OmegaConf.load(CONF_DIR / "schedule" / f"{choice}.yaml")
        assert cfg.get("description") and "paper" in cfg, choice
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.5)
        sched = build_schedule(cfg, opt, total_steps=200, steps_per_epoch=10)
        lrs = []
        for _ in range(200):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert all(0 <= lr <= 0.5 + 1e-12 and math.isfinite(lr) for lr in lrs), choice
        assert max(lrs) > 0.05, choice


def test_linear_warmup_then_cosine():
    f = mult(total=110, warmup_steps=10, name="cosine", min_lr_ratio=0.1)
    for s in range(10):
        assert f(s) == pytest.approx((s + 1) / 10)
    for s in (10, 35, 60, 109):
        t = (s - 10) / 100
        assert f(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def test_warmup_epochs_apply_to_every_schedule():
    for name in ("constant", "linear", "polynomial", "wsd", "sgdr", "step", "multistep"):
        f = mult(total=100, spe=10, name=name, warmup_epochs=2)
        assert f(0) == pytest.approx(1 / 20) and f(9) == pytest.approx(10 / 20), name


def test_sgdr_restarts_at_t0_then_t0_times_t_mult():
    f = mult(total=1000, spe=10, name="sgdr", t0_epochs=1, t_mult=2)  # cycles of 10, 20, 40 steps
    for start, length in ((0, 10), (10, 20), (30, 40)):
        assert f(start) == pytest.approx(1.0)  # restart
        mid = start + length // 2
        assert f(mid) == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - start) / length)))
        assert f(start + length - 1) < 0.05
    g = mult(total=100, name="sgdr", t0_steps=25, t_mult=1, min_lr_ratio=0.2)
    assert g(25) == pytest.approx(1.0) and g(50) == pytest.approx(1.0)
    assert g(12) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 12 / 25)))


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_phases(shape):
    f = mult(total=110, name="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    assert f(4) == pytest.approx(0.5)  # warmup
    assert all(f(s) == 1.0 for s in range(10, 90))  # stable: 100 post-warmup steps, last 20 decay
    for s in (90, 95, 100, 109):
        p = (s - 90) / 20
        expect = 1 - (math.sqrt(p) if shape == "sqrt" else p)
        assert f(s) == pytest.approx(expect)


def test_onecycle_matches_torch_onecyclelr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=100, cycle_momentum=False)
    f = mult(total=100, name="onecycle", pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    for s in range(100):
        assert 0.4 * f(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), s
        opt.step()
        ref.step()


def test_inverse_sqrt_linear_polynomial_step_multistep_closed_forms():
    f = mult(total=1000, name="inverse_sqrt", warmup_steps=16)
    assert f(15) == pytest.approx(1.0) and f(63) == pytest.approx(0.5) and f(7) == pytest.approx(0.5)
    f = mult(total=100, name="linear", min_lr_ratio=0.0, warmup_epochs=0)  # linear.yaml warms up 1 epoch
    assert f(0) == 1.0 and f(25) == pytest.approx(0.75) and f(99) == pytest.approx(0.01)
    f = mult(total=100, name="polynomial", power=2.0, min_lr_ratio=0.0)
    assert f(50) == pytest.approx(0.25)
    f = mult(total=100, spe=10, name="step", step_epochs=3, gamma=0.5)
    assert (f(29), f(30), f(60)) == (1.0, 0.5, 0.25)
    f = mult(total=100, name="multistep", milestone_fractions=[0.5, 0.75], gamma=0.1)
    assert (f(49), f(50), f(75)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    f = mult(total=100, spe=10, name="multistep", milestone_epochs=[2], gamma=0.1)
    assert (f(19), f(20)) == (1.0, pytest.approx(0.1))


def test_bad_schedule_config_errors():
    with pytest.raises(ConfigError, match="cosin"):
        mult(name="cosin")
    with pytest.raises(ConfigError, match="decay_shape"):
        mult(name="wsd", decay_shape="cubic")
    with pytest.raises(ConfigError, match="t_mult"):
        mult(name="sgdr", t0_steps=5, t_mult=0.5)
