"""Reference conformance: every optimizer whose YAML names a ``checked_against`` reference trains a
seeded conv+BN net for 50 steps (fp32, CPU) exactly as that reference does, to 1e-6 in every
parameter. The harness side goes through ``build_optimizer`` with the YAML (parameter groups from
timm, the YAML's hyper-parameters, the run-time keys); the reference side is the authors' package
(PyPI: ``adamp``, ``lion-pytorch``, ``adabelief-pytorch``, ``madgrad``, ``dadaptation``, ``prodigyopt``,
``schedulefree``, ``adabound``, ``came-pytorch``) or torch.optim, built on the same parameter groups
with the hyper-parameters spelled out here, not copied from the harness's optimizer.

A few optimizers scale their whole step by a data-dependent global quantity (D-Adaptation's and Prodigy's
distance estimate d, schedule-free's averaging weights, AdaBound's clamp of lr / (sqrt(v) + eps) on
near-zero second moments), so one-ulp differences in float32 summation order grow over 50 steps to more
than 1e-6 although the algorithms are the same. ``FLOAT64`` lists them with the float32 difference
measured on this problem; they are compared in float64, where the same 1e-6 bound is met with orders of
magnitude to spare (measured: 1e-8 or less), which an algorithmic difference would not meet.

Every case runs twice: with the YAML's weight decay and with a non-zero one (when the YAML's is 0), so
coupled vs decoupled decay is checked too. ``harness list optimizer`` shows each choice's reference
(or "unchecked"); ``test_every_claimed_reference_is_tested`` keeps the YAMLs honest.

Losses and metrics with a reference: label smoothing against ``F.cross_entropy(label_smoothing=)``,
the harness's ECE against torchmetrics. ``test_quickstart_adamp_matches_the_authors_package`` checks a
whole ``harness run task=quickstart optimizer=adamp`` against the same run with ``adamp.AdamP``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math

import pytest
import torch
from conftest import harness, records
from omegaconf import OmegaConf
from torch import nn

from harness.config import CONF_DIR, list_choices
from harness.techniques.optimizers import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50
TOL = 1e-6
META = ("name", "description", "paper", "source", "checked_against", "_target_", "lr_scaling", "base_batch_size")


def yaml_of(choice: str):
    return OmegaConf.load(CONF_DIR / "optimizer" / f"{choice}.yaml")


def hp(cfg, *keys):
    """The YAML's values of ``keys`` as plain Python (lists -> tuples)."""
    out = {}
    for k in keys:
        v = OmegaConf.to_container(cfg)[k] if k in cfg else None
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def torch_ref(cls_name: str, *keys: str):
    def make(groups, cfg, total_steps):
        return getattr(torch.optim, cls_name)(groups, **hp(cfg, *keys))

    return f"torch.optim.{cls_name}", make


def _adamp(groups, cfg, total_steps):
    from adamp import AdamP

    return AdamP(groups, **hp(cfg, "lr", "betas", "eps", "delta", "wd_ratio", "nesterov"))


def _sgdp(groups, cfg, total_steps):
    from adamp import SGDP

    return SGDP(groups, **hp(cfg, "lr", "momentum", "nesterov", "delta", "wd_ratio"))


def _lion(groups, cfg, total_steps):
    from lion_pytorch import Lion

    return Lion(groups, **hp(cfg, "lr", "betas"))  # decay lr * wd, as in the paper (decoupled_weight_decay=False)


def _adabelief(groups, cfg, total_steps):
    from adabelief_pytorch import AdaBelief

    return AdaBelief(groups, **hp(cfg, "lr", "betas", "eps", "rectify"), weight_decouple=True, print_change_log=False)


def _madgrad(groups, cfg, total_steps):
    from madgrad import MADGRAD

    return MADGRAD(groups, **hp(cfg, "lr", "momentum", "eps"))


def _dadapt_adam(groups, cfg, total_steps):
    from dadaptation import DAdaptAdam

    return DAdaptAdam(groups, **hp(cfg, "lr", "betas", "eps", "d0"))


def _prodigy(groups, cfg, total_steps):
    from prodigyopt import Prodigy

    return Prodigy(groups, **hp(cfg, "lr", "betas", "eps", "d0", "d_coef"))


def _sf_warmup(cfg, total_steps):
    return int(round(float(cfg.warmup_fraction) * total_steps))


def _sf_adamw(groups, cfg, total_steps):
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(
        groups, **hp(cfg, "lr", "betas", "eps", "weight_lr_power"), warmup_steps=_sf_warmup(cfg, total_steps)
    )


def _sf_sgd(groups, cfg, total_steps):
    from schedulefree import SGDScheduleFree

    return SGDScheduleFree(
        groups, **hp(cfg, "lr", "momentum", "weight_lr_power"), warmup_steps=_sf_warmup(cfg, total_steps)
    )


def _adabound(groups, cfg, total_steps):
    from adabound import AdaBound

    return AdaBound(groups, **hp(cfg, "lr", "betas", "final_lr", "gamma", "eps"), amsbound=bool(cfg.ams_bound))


def _came(groups, cfg, total_steps):
    from came_pytorch import CAME

    return CAME(groups, **hp(cfg, "lr", "betas", "clip_threshold"), eps=(cfg.eps1, cfg.eps2))


# choice -> (the reference its YAML must name in checked_against, the reference's constructor)
REFERENCES = {
    "sgd": torch_ref("SGD", "lr", "momentum", "nesterov"),
    "sgd_nesterov": torch_ref("SGD", "lr", "momentum", "nesterov"),
    "adam": torch_ref("Adam", "lr", "betas", "eps"),
    "amsgrad": torch_ref("Adam", "lr", "betas", "eps", "amsgrad"),
    "adamw": torch_ref("AdamW", "lr", "betas", "eps"),
    "adamw_gpt": torch_ref("AdamW", "lr", "betas", "eps"),
    "adamax": torch_ref("Adamax", "lr", "betas", "eps"),
    "nadam": torch_ref("NAdam", "lr", "betas", "eps", "momentum_decay"),
    "radam": torch_ref("RAdam", "lr", "betas", "eps"),
    "adagrad": torch_ref("Adagrad", "lr", "lr_decay", "eps"),
    "rmsprop": torch_ref("RMSprop", "lr", "alpha", "eps", "momentum"),
    "adafactor": torch_ref("Adafactor", "lr", "beta2_decay", "eps", "d"),
    "adamp": ("adamp.AdamP", _adamp),
    "sgdp": ("adamp.SGDP", _sgdp),
    "lion": ("lion_pytorch.Lion", _lion),
    "adabelief": ("adabelief_pytorch.AdaBelief", _adabelief),
    "madgrad": ("madgrad.MADGRAD", _madgrad),
    "dadapt_adam": ("dadaptation.DAdaptAdam", _dadapt_adam),
    "prodigy": ("prodigyopt.Prodigy", _prodigy),
    "schedulefree_adamw": ("schedulefree.AdamWScheduleFree", _sf_adamw),
    "schedulefree_sgd": ("schedulefree.SGDScheduleFree", _sf_sgd),
    "adabound": ("adabound.AdaBound", _adabound),
    "amsbound": ("adabound.AdaBound", _adabound),
    "came": ("came_pytorch.CAME", _came),
}


# compared in float64 (see the module docstring); float32 max |diff| measured on this problem, YAML / wd=1e-2
FLOAT64 = {
    "dadapt_adam": "5e-6 / 6e-3: d is a ratio of global sums",
    "prodigy": "4e-5 / 3.3: d is a ratio of global sums",
    "schedulefree_adamw": "2.8e-6: averaging weight over a 2-step warmup",
    "adabound": "3.3e-2: clamp of lr / (sqrt(v) + eps) on near-zero second moments",
    "amsbound": "3.3e-2: clamp of lr / (sqrt(v) + eps) on near-zero second moments",
    "came": "3.9e-3: confidence-guided factored second moments",
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def net() -> nn.Module:
    """Small conv+BN net: scale-invariant conv kernels (AdamP/SGDP project them), BN gains and biases
    (undecayed group), a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def mirror_groups(opt: torch.optim.Optimizer, src: nn.Module, dst: nn.Module) -> list[dict]:
    """The harness optimizer's parameter groups (which parameters, which weight decay) on ``dst``'s parameters."""
    index = {id(p): i for i, p in enumerate(src.parameters())}
    params = list(dst.parameters())
    inner = getattr(opt, "optimizer", opt)
    return [
        {"params": [params[index[id(p)]] for p in g["params"]], "weight_decay": g.get("weight_decay", 0.0)}
        for g in inner.param_groups
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    if callable(getattr(opt, "train", None)):
        opt.train()  # schedule-free: train-mode iterate
    for _ in range(steps):
        idx = torch.randint(0, 64, (32,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def max_param_diff(choice: str, weight_decay: float | None = None) -> tuple[float, float]:
    """(max |harness - reference| over parameters, max movement of the harness's parameters)."""
    with default_dtype(torch.float64 if choice in FLOAT64 else torch.float32):
        return _max_param_diff(choice, weight_decay)


def _max_param_diff(choice: str, weight_decay: float | None) -> tuple[float, float]:
    cfg = yaml_of(choice)
    if weight_decay is not None:
        cfg.weight_decay = weight_decay
    model, ref_model = net(), net()
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(cfg, model, batch_size=128, total_steps=STEPS)
    ref = REFERENCES[choice][1](mirror_groups(opt, model, ref_model), cfg, STEPS)
    train(model, opt)
    train(ref_model, ref)
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start))
    return diff, moved


def _cases():
    for choice in REFERENCES:
        yield pytest.param(choice, None, id=f"{choice}-yaml")
        if not float(yaml_of(choice).get("weight_decay") or 0.0):
            yield pytest.param(choice, 1e-2, id=f"{choice}-wd")


@pytest.mark.parametrize("choice,weight_decay", list(_cases()))
def test_optimizer_matches_its_reference(choice, weight_decay):
    label, make = REFERENCES[choice]
    importlib.import_module(label.rsplit(".", 1)[0])  # the reference is installed (test extra)
    diff, moved = max_param_diff(choice, weight_decay)
    assert moved > 1e-3, f"{choice}: parameters barely moved ({moved:.2e}); the check would be vacuous"
    assert diff <= TOL, f"{choice} differs from {label} by {diff:.3e} after {STEPS} steps (movement {moved:.3e})"


def test_every_claimed_reference_is_tested():
    """A YAML names a reference only if this file checks it, and every checked choice names it."""
    for choice in list_choices("optimizer"):
        claimed = yaml_of(choice).get("checked_against") or ""
        expected = REFERENCES[choice][0] if choice in REFERENCES else ""
        assert claimed == expected, f"conf/optimizer/{choice}.yaml: checked_against={claimed!r}, tested: {expected!r}"


def test_harness_list_optimizer_shows_the_reference_or_unchecked():
    proc = harness("list", "optimizer")
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines()[1:] if ln.strip()}
    assert "checked against adamp.AdamP" in lines["adamp"]
    assert "checked against torch.optim.SGD" in lines["sgd"]
    assert "unchecked" in lines["lamb"] and "unchecked" in lines["sophiah"]


# ----------------------------------------------------------------------------------------- losses, metrics
def test_label_smoothing_matches_torch_cross_entropy():
    from harness.hooks import Batch
    from harness.techniques.regularization import LabelSmoothing

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)
    for eps in (0.0, 0.1, 0.3):
        tq = LabelSmoothing(epsilon=eps)
        got = tq.loss(logits, Batch(x=logits, y=y), ctx=None)
        torch.testing.assert_close(got, nn.functional.cross_entropy(logits, y, label_smoothing=eps))
        # soft-target path (mixup targets): one-hot soft targets must give the same loss
        soft = nn.functional.one_hot(y, 10).float()
        got_soft = tq.loss(logits, Batch(x=logits, y=y, soft_targets=soft), ctx=None)
        torch.testing.assert_close(got_soft, nn.functional.cross_entropy(logits, y, label_smoothing=eps))
    lm = torch.randn(2, 5, 7, generator=g)  # (B, T, V) logits of a language model
    ty = torch.randint(0, 7, (2, 5), generator=g)
    got = LabelSmoothing(epsilon=0.1).loss(lm, Batch(x=lm, y=ty), ctx=None)
    torch.testing.assert_close(got, nn.functional.cross_entropy(lm.reshape(-1, 7), ty.reshape(-1), label_smoothing=0.1))


def test_soft_cross_entropy_of_lm_logits_matches_torch(monkeypatch):
    """The default loss of bf16 (B, T, V) logits, in checkpointed float32 chunks, equals torch's
    cross_entropy of the whole float32 copy: value and gradient."""
    from harness import hooks
    from harness.hooks import Batch, soft_cross_entropy

    monkeypatch.setattr(hooks, "CE_CHUNK_TOKENS", 16)  # 111 tokens: 7 chunks
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, 50, generator=g)
    y = torch.randint(0, 50, (3, 37), generator=g)
    ref = nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1))
    torch.testing.assert_close(soft_cross_entropy(logits, Batch(x=logits, y=y)), ref)  # float32: unchanged path
    bf = logits.bfloat16().requires_grad_()
    loss = soft_cross_entropy(bf, Batch(x=bf, y=y))
    loss.backward()
    got_grad, bf.grad = bf.grad, None
    ref = nn.functional.cross_entropy(bf.float().reshape(-1, 50), y.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_grad, bf.grad, atol=0, rtol=0)


def test_expected_calibration_error_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    from harness.metrics.calibration import calibration_metrics

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(500, 10, generator=g) * 2, torch.randint(0, 10, (500,), generator=g)
    ours = calibration_metrics(logits, y, prefix="")["ece"]
    ref = multiclass_calibration_error(logits.softmax(-1), y, num_classes=10, n_bins=15, norm="l1").item()
    assert math.isclose(ours, ref, abs_tol=1e-6), (ours, ref)


# ----------------------------------------------------------------------------------------- a whole run
def test_quickstart_adamp_matches_the_authors_package(tmp_path):
    """``harness run task=quickstart optimizer=adamp`` and the same run with the official ``adamp.AdamP``
    (the authors' package, swapped in through ``_target_``) end with the same metrics."""
    common = ["run", "task=quickstart", "trainer.epochs=2", "trainer.progress=none", "trainer.checkpoint_every=0"]
    ours = harness(*common, "optimizer=adamp", f"results_dir={tmp_path / 'ours'}", env={"OMP_NUM_THREADS": "1"})
    theirs = harness(
        *common,
        "optimizer=adamp",
        "optimizer._target_=adamp.AdamP",
        f"results_dir={tmp_path / 'theirs'}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert ours.returncode == 0 and theirs.returncode == 0, (ours.stderr[-2000:], theirs.stderr[-2000:])
    a, b = records(tmp_path / "ours")[0], records(tmp_path / "theirs")[0]
    for key in ("test_acc", "test_loss", "train_loss"):
        assert math.isclose(a["metrics"][key], b["metrics"][key], rel_tol=1e-5, abs_tol=1e-6), (
            key,
            a["metrics"][key],
            b["metrics"][key],
        )
    assert [p["train_loss"] for p in a["curve"]] == pytest.approx([p["train_loss"] for p in b["curve"]], rel=1e-6)


def test_reference_groups_mirror_the_harness_groups():
    """The helper itself: decayed conv/linear weights and undecayed BN gains and biases, on the reference model."""
    model, other = net(), net()
    opt = build_optimizer(yaml_of("adamw"), model, batch_size=128, total_steps=1)
    groups = mirror_groups(opt, model, other)
    decayed = [g for g in groups if g["weight_decay"]]
    assert len(decayed) == 1 and all(p.ndim > 1 for p in decayed[0]["params"])
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in other.parameters()}
    assert copy.deepcopy(groups)  # plain data
