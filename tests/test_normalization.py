"""Normalization techniques (normalization=...): every allowed (model, choice) pair builds and trains a
step, layer counts, Fixup / NF-ResNet / SkipInit initialisation properties, layer formulas, refused
pairs, and a trained comparison on digits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from harness.errors import ConfigError
from harness.hooks import Batch, RunContext
from harness.models import build_model
from harness.techniques.norm_layers import BatchRenorm2d, FixupBlock, NFBlock, PostNormBlock, ScaleNorm
from harness.techniques.normalization import (
    CNN_CHOICES,
    RESIDUAL_ONLY,
    TRANSFORMER_CHOICES,
    count_norms,
    pick_groups,
    valid_choices,
)
from harness.techniques.registry import build_techniques

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

IMG = SimpleNamespace(name="fake", task="classification", input_shape=(3, 16, 16), num_classes=10)
LM = SimpleNamespace(name="fake", task="lm", input_shape=(16,), num_classes=100)
# tiny sizes keep the CPU tests fast; resnet50 covers the Bottleneck paths of the structural choices
MODELS = {
    "small_cnn": ({"width": 8}, IMG, tuple(c for c in CNN_CHOICES if c not in RESIDUAL_ONLY)),
    "resnet18": ({}, IMG, CNN_CHOICES),
    "resnet50": ({}, IMG, ("none_fixup", "skipinit", "nf")),
    "vit_tiny": ({"depth": 2, "embed_dim": 48}, IMG, TRANSFORMER_CHOICES),
    "gpt2_tiny": ({}, LM, TRANSFORMER_CHOICES),
}
BN_COUNT = {"small_cnn": 3, "resnet18": 20, "resnet50": 53}
STRUCTURAL = ("none", "none_fixup", "skipinit", "nf", "weightnorm")  # leave no normalization layer


pytestmark = pytest.mark.usefixtures("one_thread")


def make(model_name: str, choice: str, ctx_data=None, **norm_overrides):
    """Build ``model_name`` and apply ``normalization=choice`` as the run would."""
    extra, data, _ = MODELS[model_name]
    mcfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{model_name}.yaml"), extra)
    ncfg = OmegaConf.merge(OmegaConf.load(CONF / "normalization" / f"{choice}.yaml"), norm_overrides)
    cfg = OmegaConf.create({"model": mcfg, "normalization": ncfg, "seed": 0})
    torch.manual_seed(0)
    model = build_model(cfg.model, data)
    techs = build_techniques(cfg)
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), data=ctx_data)
    for t in techs:
        model = t.prepare_model(model, ctx)
    return model, (techs[0] if techs else None), data


def example_input(data, n: int = 2) -> torch.Tensor:
    if data.task == "lm":
        return torch.randint(0, data.num_classes, (n, data.input_shape[0]))
    return torch.randn(n, *data.input_shape)


def test_allowed_choices_per_model_family():
    for name in ("small_cnn", "resnet18", "vit_tiny", "gpt2_tiny"):
        model, _, _ = make(name, "default")
        assert valid_choices(model, "transformer" if name in ("vit_tiny", "gpt2_tiny") else "cnn") == [
            "default",
            *MODELS[name][2],
        ]


PAIRS = [(m, c) for m, (_, _, choices) in MODELS.items() for c in choices]


@pytest.mark.parametrize("model_name,choice", PAIRS, ids=[f"{m}-{c}" for m, c in PAIRS])
def test_every_allowed_pair_trains_a_step(model_name, choice):
    data = MODELS[model_name][1]
    x = example_input(data)
    model, tech, _ = make(model_name, choice)
    model.train()
    out = model(x)
    assert out.shape == ((2, 16, LM.num_classes) if data.task == "lm" else (2, IMG.num_classes))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    s = tech.summary()
    assert s["kind"] and s["family"] in ("cnn", "transformer")
    layers = count_norms(model)
    if model_name in BN_COUNT:
        assert s["replaced"] == BN_COUNT[model_name]
        assert "BatchNorm2d" not in layers or choice == "batchnorm"
        if choice in STRUCTURAL:
            assert not {k: v for k, v in layers.items() if k not in ("WeightNorm", "ScaledStdConv2d")}
        else:
            assert sum(v for k, v in layers.items() if k != "StdConv2d") == BN_COUNT[model_name]
    else:
        n_ln = 2 * 2 + 1  # 2 blocks x (norm1/ln_1, norm2/ln_2) + the final norm
        expected = {
            "layernorm": {"LayerNorm": n_ln},
            "rmsnorm": {"RMSNorm": n_ln},
            "scalenorm": {"ScaleNorm": n_ln},
            "none": {},
            "postln": {"LayerNorm": n_ln - 1},
        }[choice]
        assert layers == expected
        assert s["replaced"] == (n_ln - 1 if choice == "postln" else n_ln)


@pytest.mark.parametrize(
    "model_name,choice,valid_hint",
    [
        ("gpt2_tiny", "batchnorm", "rmsnorm"),
        ("vit_tiny", "none_fixup", "scalenorm"),
        ("small_cnn", "skipinit", "none_fixup"),
        ("resnet18", "rmsnorm", "groupnorm"),
    ],
)
def test_invalid_pair_raises_config_error_listing_valid_choices(model_name, choice, valid_hint):
    with pytest.raises(ConfigError) as e:
        make(model_name, choice)
    msg = str(e.value)
    assert f"normalization={choice}" in msg and "Valid choices for this model" in msg and valid_hint in msg
    assert choice not in msg.split("Valid choices for this model:")[1].split(", ")


def test_unknown_hyper_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="groupnorm"):
        make("small_cnn", "groupnorm", num_groups=4)


def test_groupnorm_groups_divide_channels():
    assert (
        pick_groups(64, 32) == 32 and pick_groups(8, 32) == 8 and pick_groups(48, 32) == 16 and pick_groups(3, 2) == 1
    )
    model, tech, _ = make("small_cnn", "groupnorm")  # widths 8, 16, 32
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [8, 16, 32]
    assert tech.summary()["groups"] == [8, 16, 32]


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_fixup_residual_branches_are_zero_and_blocks_identity_at_init(model_name):
    model, tech, data = make(model_name, "none_fixup")
    blocks = [m for m in model.modules() if isinstance(m, FixupBlock)]
    assert len(blocks) == tech.summary()["residual_branches"] == (8 if model_name == "resnet18" else 16)
    for b in model.layer1:
        if b.downsample is None:
            x = torch.relu(torch.randn(2, b.convs[0].in_channels, 8, 8))  # post-ReLU input
            assert torch.equal(b(x), x)  # relu(0 + x) = x: the identity on the residual path
    h = {}
    hooks = [b.register_forward_hook(lambda m, i, o, b=b: h.__setitem__(b, (i[0], o))) for b in blocks]
    logits = model(example_input(data))
    for hk in hooks:
        hk.remove()
    for b, (inp, _) in h.items():
        assert b.branch(inp).abs().max() == 0  # every branch outputs zero
    assert logits.abs().max() == 0  # zero-initialised classifier
    # inner convs are scaled by L^(-1/(2m-2)) relative to He init
    m = len(blocks[0].convs)
    conv = blocks[0].convs[0]
    he = math.sqrt(2.0 / (conv.weight.shape[0] * conv.weight[0, 0].numel()))
    assert conv.weight.std().item() == pytest.approx(he * len(blocks) ** (-1.0 / (2 * m - 2)), rel=0.1)


def test_skipinit_blocks_start_as_identity():
    model, _, _ = make("resnet18", "skipinit")
    x = torch.relu(torch.randn(2, 64, 8, 8))
    assert torch.equal(model.layer1[0](x), x)


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_nf_resnet_keeps_unit_variance_through_depth(model_name):
    model, tech, data = make(model_name, "nf")
    blocks = [m for m in model.modules() if isinstance(m, NFBlock)]
    assert [round(b.beta, 4) for b in blocks] == tech.summary()["betas"]
    ratios = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: ratios.append(((i[0] / m.beta).var().item(), o.var().item())))
        for b in blocks
    ]
    with torch.no_grad():
        model(torch.randn(16, *data.input_shape))
    for h in hooks:
        h.remove()
    assert len(ratios) == len(blocks)
    for normalized_in, out in ratios:  # h / beta ~ unit variance at every depth
        assert 0.6 < normalized_in < 1.6
        assert 0.6 < out < 2.0
    # without the beta division the residual stream variance would grow with depth; here it stays bounded
    assert max(r[1] for r in ratios) < 2.0


def test_weightnorm_weight_is_g_v_over_norm_v():
    model, tech, _ = make("resnet18", "weightnorm", data_init=False)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs) == tech.summary()["weight_normalized"] == 21
    for m in convs:
        g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        with torch.no_grad():
            g.mul_(torch.rand_like(g) + 0.5)  # g != ||v||
            expected = g * v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
        torch.testing.assert_close(m.weight, expected)


class _FakeSplit:
    def __init__(self, x):
        self.x = x

    def batches(self, batch_size, *, train, epoch=0, seed=0):
        yield Batch(self.x[:batch_size], torch.zeros(len(self.x[:batch_size]), dtype=torch.long))


def test_weightnorm_data_dependent_init_standardizes_pre_activations():
    x = torch.randn(64, 3, 16, 16) * 3 + 1
    data = SimpleNamespace(**vars(IMG), train=_FakeSplit(x))
    model, tech, _ = make("small_cnn", "weightnorm", ctx_data=data)
    assert tech.summary()["data_init"] is True
    pre = model.features[0][1](model.features[0][0](x))  # conv then its per-channel bias
    per_channel = pre.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(8), atol=1e-3, rtol=0)


def test_rmsnorm_and_scalenorm_match_their_formulas():
    x = torch.randn(4, 16, 128) * 2 + 0.5
    model, _, _ = make("gpt2_tiny", "rmsnorm")
    rms = model.transformer.h[0].ln_1
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + rms.eps) * rms.weight
    torch.testing.assert_close(rms(x), expected)

    model, tech, _ = make("gpt2_tiny", "scalenorm")
    sn = model.transformer.h[0].ln_1
    assert isinstance(sn, ScaleNorm) and sn.g.item() == pytest.approx(math.sqrt(128))
    torch.testing.assert_close(sn(x), math.sqrt(128) * x / x.norm(dim=-1, keepdim=True))
    # FixNorm: token embeddings have fixed length; the tied output layer sees the same rows
    assert tech.summary()["fixnorm"] is True
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte.norm(dim=-1), torch.ones(wte.shape[0]))
    torch.testing.assert_close(model.lm_head.weight, wte)


def test_vit_scalenorm_has_no_fixnorm_and_refuses_forcing_it():
    _, tech, _ = make("vit_tiny", "scalenorm")
    assert tech.summary()["fixnorm"] is False
    with pytest.raises(ConfigError, match="word embeddings"):
        make("vit_tiny", "scalenorm", fixnorm=True)


@pytest.mark.parametrize("model_name", ["gpt2_tiny", "vit_tiny"])
def test_postln_blocks_output_normalized_tokens(model_name):
    model, _, data = make(model_name, "postln")
    outs = []
    blocks = [m for m in model.modules() if isinstance(m, PostNormBlock)]
    assert len(blocks) == 2
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in blocks]
    model(example_input(data))
    for h in hooks:
        h.remove()
    for o in outs:  # LayerNorm (gain 1, bias 0 at init) is the last op of a post-LN block
        torch.testing.assert_close(o.mean(-1), torch.zeros(o.shape[:-1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(o.var(-1, unbiased=False), torch.ones(o.shape[:-1]), atol=1e-2, rtol=0)


def test_batchrenorm_starts_as_batchnorm_and_uses_running_stats_in_eval():
    layer = BatchRenorm2d(4, ramp_steps=100)
    x = torch.randn(8, 4, 5, 5) * 2 + 3
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True, eps=layer.eps))
    assert layer.steps.item() == 1 and layer.running_mean.mean().item() == pytest.approx(0.03, abs=0.02)
    layer.eval()
    expected = (x - layer.running_mean.view(1, -1, 1, 1)) / (layer.running_var.view(1, -1, 1, 1) + layer.eps).sqrt()
    torch.testing.assert_close(layer(x), expected)


def test_trained_comparison_on_digits(tmp_path):
    """batchnorm, groupnorm and none_fixup on the quickstart CNN (digits, a few epochs) all reach 0.85;
    the record stores the normalization and the number of layers replaced."""
    cmd = [
        sys.executable, "-m", "harness", "run", "-m", "task=quickstart",
        "normalization=batchnorm,groupnorm,none_fixup", "trainer.epochs=6", "trainer.progress=none",
        "trainer.checkpoint_every=0", f"results_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny CNN: one thread is faster on shared cores
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("sweeps/**/result.json")]
    by_choice = {r["technique"]["choices"]["normalization"]: r for r in records}
    assert sorted(by_choice) == ["batchnorm", "groupnorm", "none_fixup"]
    for choice, r in by_choice.items():
        assert r["status"] == "ok"
        assert r["metrics"]["test_acc"] >= 0.85, (choice, r["metrics"]["test_acc"])
        assert r["techniques"]["normalization"]["replaced"] == 3
    assert by_choice["groupnorm"]["techniques"]["normalization"]["kind"] == "GroupNorm"
