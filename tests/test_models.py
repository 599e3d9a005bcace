"""Model builders: GPT-2 sizes, causality and FLOPs; ViT shapes and norm names; FLOPs for every
family; the peak-FLOP/s table and MFU."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from harness.data.base import DataBundle
from harness.errors import ConfigError
from harness.infra.hardware import add_mfu, mfu, peak_flops
from harness.models import build_model
from harness.models.flops import count_params, training_flops_per_sample
from harness.models.gpt2 import GPT
from tests.conftest import ROOT


def model_cfg(name, **kw):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, kw)


def lm_data(vocab=50257, context=1024):
    return DataBundle("lm", "lm", None, None, None, vocab, (context,))


def image_data(shape, classes=10):
    return DataBundle("img", "classification", None, None, None, classes, shape)


def test_gpt2_small_has_124m_parameters_counted_once():
    with torch.device("meta"):  # no memory, no init time: only shapes matter for the count
        model = build_model(model_cfg("gpt2_small"), lm_data())
    n = count_params(model)
    assert abs(n - 124_000_000) < 1_000_000, n
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: the embedding counted once
    # vocabulary padded 50257 -> 50304 (a multiple of 64): GPT-2's 124,439,808 plus 47 rows of 768
    assert model.padded_vocab == 50304 and n == 124_439_808 + 47 * 768
    # 6*N + 12*L*H*Q*T per token, N without the position table (nanoGPT's estimate_mfu)
    n_nonpos = n - 1024 * 768
    assert model.flops_per_sample() == 6 * n_nonpos + 12 * 12 * 12 * 64 * 1024
    assert len(model.norm_layers()) == 2 * 12 + 1 and "transformer.ln_f" in model.norm_layers()


def test_gpt2_causal_mask_and_exact_vocab():
    torch.manual_seed(0)
    model = build_model(model_cfg("gpt2_tiny"), lm_data(vocab=1000, context=16)).eval()
    x = torch.randint(0, 1000, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 1000)  # padded columns (1000 -> 1024) are sliced off
    for t in (0, 7, 15):
        y = x.clone()
        y[:, t:] = (
            y[:, t:] + 1 + torch.randint(0, 998, y[:, t:].shape)
        ) % 1000  # change tokens t.. (every one differs)
        changed = model(y)
        assert torch.equal(logits[:, :t], changed[:, :t]), f"a change at position {t} leaked into earlier logits"
        assert not torch.allclose(logits[:, t], changed[:, t])
    # gradient through the loss the loop uses reaches the first block
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 1000), torch.randint(0, 1000, (32,)))
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert math.isclose(loss.item(), math.log(1000), rel_tol=0.05)  # GPT-2 init: near-uniform predictions


def test_gpt2_init_and_overrides():
    torch.manual_seed(0)
    model = GPT(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)  # residual projections scaled
    # block_size defaults to the dataset context; width/depth/heads from the config
    m = build_model(model_cfg("gpt2_tiny", n_layer=3, n_head=2, n_embd=32), lm_data(vocab=300, context=24))
    assert m.block_size == 24 and len(m.transformer.h) == 3 and m.transformer.h[0].attn.n_head == 2
    with pytest.raises(ConfigError, match="block_size=16 is shorter than dataset.context=24"):
        build_model(model_cfg("gpt2_tiny", block_size=16), lm_data(vocab=300, context=24))
    with pytest.raises(ConfigError, match="n_embd=30 must be divisible by model.n_head=4"):
        build_model(model_cfg("gpt2_tiny", n_embd=30), lm_data(vocab=300, context=24))
    with pytest.raises(ConfigError, match="language model"):
        build_model(model_cfg("gpt2_tiny"), image_data((3, 32, 32)))


@pytest.mark.parametrize(("shape", "tokens"), [((3, 32, 32), 64), ((1, 8, 8), 16), ((3, 64, 64), 64)])
def test_vit_shapes_patches_and_norm_names(shape, tokens):
    model = build_model(model_cfg("vit_tiny", depth=2), image_data(shape, classes=7))
    assert model.patch_embed.num_patches == tokens
    assert model(torch.randn(3, *shape)).shape == (3, 7)
    norms = model.norm_layers()
    assert {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm2", "norm"} <= set(norms)
    assert all(isinstance(m, torch.nn.LayerNorm) for m in norms.values())


def test_vit_pool_patch_and_errors():
    avg = build_model(model_cfg("vit_tiny", pool="avg", depth=1), image_data((3, 32, 32)))
    assert avg.cls_token is None and avg.global_pool == "avg"
    assert avg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):
        big = build_model(model_cfg("vit_small"), image_data((3, 160, 160)))
    assert big.patch_embed.patch_size == (16, 16) and big.embed_dim == 384
    with pytest.raises(ConfigError, match="pool='max'; valid choices: token, avg"):
        build_model(model_cfg("vit_tiny", pool="max"), image_data((3, 32, 32)))
    with pytest.raises(ConfigError, match="patch_size=5 does not divide the 32x32"):
        build_model(model_cfg("vit_tiny", patch_size=5), image_data((3, 32, 32)))


def test_flops_counted_for_resnet_vit_gpt2():
    resnet = build_model(model_cfg("resnet18"), image_data((3, 32, 32)))
    r = training_flops_per_sample(resnet, (3, 32, 32))
    assert 3 * 2 * 0.55e9 < r < 3 * 2 * 0.57e9  # ResNet-18 CIFAR stem: 0.56 G multiply-adds forward

    with torch.device("meta"):  # the analytic figure needs shapes only
        vit = build_model(model_cfg("vit_small"), image_data((3, 224, 224), classes=1000))
    # ViT-S/16 at 224 px: 4.6 G multiply-adds forward (DeiT, Touvron et al. 2021)
    assert training_flops_per_sample(vit, (3, 224, 224)) == pytest.approx(3 * 2 * 4.6e9, rel=0.02)
    # analytic figure agrees with torch's FLOP counter on the matmuls (the CPU counter misses attention)
    small = build_model(model_cfg("vit_tiny", depth=2), image_data((3, 32, 32)))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        small.eval()(torch.zeros(1, 3, 32, 32))
    n, d = 65, 192
    attention = 2 * 4 * n * n * d
    assert small.flops_per_sample() == 3 * (counter.get_total_flops() + attention)

    gpt = build_model(model_cfg("gpt2_tiny"), lm_data(vocab=1000, context=64))
    assert training_flops_per_sample(gpt, (64,)) == gpt.flops_per_sample() > 6 * count_params(gpt) - 6 * 64 * 128


def test_peak_flops_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.5e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert peak_flops("NVIDIA H200", "fp8") == pytest.approx(1979e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA A10", "bf16") == pytest.approx(125e12)  # not the A100
    assert peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)  # not the L40S
    assert peak_flops("NVIDIA L40S", "bf16") == pytest.approx(362e12)
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert peak_flops("NVIDIA GeForce RTX 4090", "fp32") == pytest.approx(82.6e12)
    assert peak_flops("x86_64", "bf16") is None and peak_flops(None, "fp32") is None
    with pytest.raises(ValueError, match="valid choices: fp8, bf16, fp16, tf32, fp32"):
        peak_flops("NVIDIA H100 80GB HBM3", "int4")
    assert mfu(1e9, 100_000, "NVIDIA A100-SXM4-40GB", "bf16") == pytest.approx(1e14 / 312e12)
    assert mfu(None, 100_000, "NVIDIA A100-SXM4-40GB", "bf16") is None

    lm = {
        "precision": "bf16",
        "dataset_info": {"task": "lm"},
        "model_info": {"flops_per_sample": 1e9},
        "throughput": {"samples_per_s": 100.0, "tokens_per_s": 102_400.0},
        "hardware": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
    }
    add_mfu(lm)  # LMs: FLOPs per token times tokens/s
    assert lm["hardware"]["peak_flops"] == pytest.approx(989.5e12)
    assert lm["throughput"]["mfu"] == pytest.approx(1e9 * 102_400 / 989.5e12)
    cpu = {**lm, "hardware": {"device": "cpu", "device_name": "x86_64"}, "throughput": {"samples_per_s": 1.0}}
    add_mfu(cpu)
    assert cpu["hardware"]["peak_flops"] is None and cpu["throughput"]["mfu"] is None
