"""One way from config to object (``harness.build``): typed harness keys with their defaults in the
composed config, hand-written configs completed from the catalogue, invalid optimizer / schedule
hyper-parameters refused before any data loads (exit 2, no record), weight-decay groups from timm,
clipping by torch and timm."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.utils import adaptive_clip_grad
from torch import nn

from harness.config import CONF_DIR, register_schema
from harness.data.base import DataBundle
from harness.errors import ConfigError
from harness.hooks import RunContext
from harness.models import build_model
from harness.techniques.clipping import AGC, NormClip
from harness.techniques.optimizers import build_optimizer, check_optimizer
from harness.techniques.registry import build_techniques
from harness.techniques.schedules import check_schedule
from tests.conftest import harness, records


def composed(*overrides):
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["task=quickstart", *overrides])


def optimizer_cfg(name, **kw):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "optimizer" / f"{name}.yaml"), kw)


def test_harness_keys_have_their_defaults_in_the_composed_config():
    cfg = composed("optimizer=adamw", "optimizer.lookahead=true", "optimizer.betas=[0.8,0.99]")
    assert cfg.optimizer.lr_scaling == "none" and cfg.optimizer.base_batch_size == 128  # not in adamw.yaml
    assert "lr_scaling" not in OmegaConf.load(CONF_DIR / "optimizer" / "adamw.yaml")  # defaults live in the schema
    assert cfg.schedule.warmup_steps is None and cfg.model.family == "cnn"
    opt = build_optimizer(cfg.optimizer, nn.Linear(4, 2), batch_size=64, total_steps=10)
    assert type(opt).__name__ == "Lookahead" and opt.optimizer.param_groups[0]["betas"] == (0.8, 0.99)


def test_typed_harness_key_refused_with_its_name():
    with pytest.raises(ConfigError, match=r"optimizer.base_batch_size='abc' is invalid"):
        check_optimizer(optimizer_cfg("sgd", base_batch_size="abc"))
    with pytest.raises(ConfigError, match=r"schedule.warmup_epochs='x' is invalid"):
        check_schedule({"name": "cosine", "warmup_epochs": "x"})


@pytest.mark.parametrize(
    ("name", "key", "value", "expected"),
    [
        ("sgd", "momentum", -1, r"optimizer.momentum=-1 is invalid: a finite number must be in \[0, 1\)"),
        ("adam", "betas", [2, 3], r"optimizer.betas=\[2, 3\] is invalid: each value must be in \[0, 1\)"),
        ("adam", "lr", math.nan, r"optimizer.lr=nan is invalid: a finite number must be in \[0, inf\)"),
        ("adam", "lr", math.inf, r"optimizer.lr=inf is invalid"),
        (
            "adamw",
            "weight_decay",
            -0.1,
            r"optimizer.weight_decay=-0.1 is invalid: a finite number must be in \[0, inf\)",
        ),
        ("sgd", "dampening", 2.0, r"optimizer.dampening=2.0 is invalid: a finite number must be in \[0, 1\]"),
        # the class's own check (no shared range): its message, and the choice named
        ("adamp", "eps", -1.0, r"optimizer.eps=-1.0 is invalid: a finite number must be in \[0, inf\)"),
        ("sgd", "nesterovv", True, r"optimizer=sgd.*nesterovv"),
    ],
)
def test_check_optimizer_refuses_invalid_hyper_parameters(name, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        check_optimizer(optimizer_cfg(name, **{key: value}))


def test_check_optimizer_accepts_every_catalogue_optimizer():
    for path in sorted((CONF_DIR / "optimizer").glob("*.yaml")):
        check_optimizer(OmegaConf.load(path))  # every YAML builds on the dummy model


def test_bad_optimizer_value_exits_2_before_data_loads(tmp_path):
    # CIFAR-10 in an empty data dir: had the data been loaded first, the error would name the missing files
    results = tmp_path / "results"
    p = harness("run", "task=quickstart", "dataset=cifar10", "optimizer.momentum=-1", f"data_dir={tmp_path / 'none'}",
                f"results_dir={results}", "trainer.progress=none", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "optimizer.momentum=-1" in p.stderr and "[0, 1)" in p.stderr and "cifar" not in p.stderr.lower()
    assert records(results) == [] and not list(results.glob("**/*.json"))


def test_check_schedule_refuses_bad_values():
    with pytest.raises(ConfigError, match="min_lr_ratio=1.5 must be in"):
        check_schedule({"name": "cosine", "min_lr_ratio": 1.5})
    with pytest.raises(ConfigError, match="bad hyper-parameters for schedule=step.*gama"):
        check_schedule({"name": "step", "gama": 0.5})
    check_schedule(OmegaConf.load(CONF_DIR / "schedule" / "wsd.yaml"))


def test_hand_written_config_is_completed_from_the_catalogue():
    data = DataBundle("img", "classification", None, None, None, 10, (3, 32, 32))
    m = build_model({"name": "small_cnn", "width": 4}, data)
    assert m.fc.in_features == 16  # 4 * width: the override applied to small_cnn.yaml
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'.*Did you mean: resnet18"):
        build_model({"name": "resnet19"}, data)
    with pytest.raises(ConfigError, match="is not a harness.hooks.Technique"):
        build_techniques(OmegaConf.create({"clip": {"_target_": "torch.nn.Identity"}}))


def test_weight_decay_groups_exclude_vit_embeddings_norms_and_biases():
    data = DataBundle("img", "classification", None, None, None, 10, (3, 32, 32))
    model = build_model(OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / "vit_tiny.yaml"), {"depth": 1}), data)
    opt = build_optimizer(optimizer_cfg("adamw", weight_decay=0.05), model, batch_size=128, total_steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias"} <= undecayed
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decayed
    assert decayed | undecayed == set(names.values()) and not decayed & undecayed
    # weight_decay: null keeps the class's own default (AdamW: 0.01) on the decayed group
    opt = build_optimizer(optimizer_cfg("adamw", weight_decay=None), model, batch_size=128, total_steps=1)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    # decay_all: one decayed group
    opt = build_optimizer(optimizer_cfg("adamw", decay_all=True), model, batch_size=128, total_steps=1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.05


def _with_grads(seed=0, scale=10.0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


def test_norm_clip_is_torchs_and_agc_is_timms_except_the_head():
    ctx = RunContext(cfg=None, device=torch.device("cpu"), total_steps=10)
    m, ref = _with_grads(), _with_grads()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    clip = NormClip(max_norm=1.0)
    clip.after_backward(m, ctx)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert clip.summary()["mean_grad_norm"] == pytest.approx(expected.item()) and clip.summary()["clip_fraction"] == 1.0
    m, ref = _with_grads(scale=1.0), _with_grads(scale=1.0)
    adaptive_clip_grad(list(ref[0].parameters()), clip_factor=0.01, eps=1e-3)  # bias: one unit, as in NFNets
    agc = AGC(clip_factor=0.01)
    agc.after_backward(m, ctx)
    for a, b in zip(m[0].parameters(), ref[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert agc.summary()["clip_fraction"] == 1.0
