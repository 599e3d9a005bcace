"""Quantization and low-precision training: QAT and PTQ convert and keep accuracy, FP8 is refused without an
FP8 GPU before any data is loaded, 8-bit optimizer states are small, and the fp16 loop skips and counts an
overflow step. Models are the quickstart CNN at width 8 on scikit-learn's digits and gpt2_tiny on a small
synthetic token stream, so everything runs on CPU in seconds."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from harness.data import build_dataset
from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.models.resnet import SmallCNN
from harness.techniques.quantization import (
    PTQ,
    QAT,
    FakeQuantConv2d,
    QuantizedConv2d,
    fp8_support,
    optimizer_state_bytes,
)
from harness.techniques.registry import build_techniques

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def make_ctx(data, batch_size=64):
    cfg = OmegaConf.create({"trainer": {"batch_size": batch_size, "eval_batch_size": 512}})
    return RunContext(cfg=cfg, device=CPU, data=data)


def train(model, data, steps, lr, batch_size=64, seed=0, adam=False):
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for b in data.train.batches(batch_size, train=True, epoch=epoch, seed=seed):
            loss = nn.functional.cross_entropy(model(b.x).reshape(-1, data.num_classes), b.y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    return model


@pytest.fixture(scope="module")
def digits():
    return build_dataset(OmegaConf.create({"name": "digits", "val_size": 0, "crop_padding": 0}), "unused", CPU, 0)


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """The quickstart CNN (width 8) trained in float for 2 epochs (about 91% test accuracy)."""
    torch.manual_seed(0)
    return train(SmallCNN(1, 10, width=8), digits, 44, 0.05)


# ---- QAT -------------------------------------------------------------------------------------------------


def test_qat_int8_trains_converts_and_keeps_the_fake_quant_accuracy(digits, trained_cnn):
    # QAT fine-tuning of the trained float model (Jacob et al. 2018 fine-tune; training from scratch works the same)
    qat = QAT(weight_bits=8, activation_bits=8)
    ctx = make_ctx(digits)
    model = qat.prepare_model(copy.deepcopy(trained_cnn), ctx)
    assert type(model.fc).__name__ == "FakeQuantizedLinear"  # torchao QAT
    assert (
        all(isinstance(model.get_submodule(n), FakeQuantConv2d) for n in qat.conv_layers) and len(qat.conv_layers) == 3
    )
    train(model, digits, 22, 0.02)
    m = qat.finalize(model, ctx)["metrics"]
    assert m["test_acc_before_quant"] >= 0.85  # it trains under fake quantisation
    # stated tolerance: the converted model is within 1 point of the fake-quantised one (same numerics)
    assert abs(m["test_acc_after_quant"] - m["test_acc_before_quant"]) <= 0.01
    assert m["quantized_layers_compression"] >= 3.5  # fp32 -> int8 plus per-channel scales
    assert m["model_bytes_after_quant"] < m["model_bytes_before_quant"]
    assert isinstance(model.features[0][0], FakeQuantConv2d)  # the trained model itself is left as it was


def test_qat_int4_converted_weights_have_16_levels(digits, trained_cnn):
    qat = QAT(weight_bits=4, activation_bits=None, group_size=32)
    ctx = make_ctx(digits)
    model = train(qat.prepare_model(copy.deepcopy(trained_cnn), ctx), digits, 5, 0.02)
    model.eval()
    q = copy.deepcopy(model)
    qat.convert(q)
    conv = q.features[1][0]
    assert isinstance(conv, QuantizedConv2d)
    assert conv.weight_int8.min() >= -8 and conv.weight_int8.max() <= 7
    assert len(conv.weight_int8.unique()) <= 16
    fc = q.fc.weight.qdata  # torchao IntxUnpackedToInt8Tensor: int4 values in an int8 container
    assert fc.dtype == torch.int8 and fc.min() >= -8 and fc.max() <= 7
    x = next(digits.test.batches(64, train=False)).x
    torch.testing.assert_close(q(x), model(x), rtol=1e-4, atol=1e-4)  # convert == fake quant


def test_qat_rejects_bad_bits():
    with pytest.raises(ConfigError, match="weight_bits=3; valid choices: 4, 8"):
        QAT(weight_bits=3)


# ---- PTQ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_ptq_int8_on_the_trained_quickstart_model(digits, trained_cnn, mode):
    ptq = PTQ(mode=mode, calibration_batches=4)
    m = ptq.finalize(trained_cnn, make_ctx(digits))["metrics"]
    assert ptq.linears == ["fc"] and len(ptq.conv_layers) == 3
    assert m["test_acc_before_quant"] >= 0.85
    assert m["test_acc_before_quant"] - m["test_acc_after_quant"] <= 0.02  # drop of at most 2 points
    # size of the quantised layers (3 convs + fc: weights and biases) is at least 3x smaller
    assert m["quantized_layers_bytes_before"] >= 3 * m["quantized_layers_bytes_after"]
    assert (
        isinstance(trained_cnn.fc, nn.Linear) and type(trained_cnn.fc.weight) is nn.Parameter
    )  # float model untouched


def test_ptq_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="mode='weird'; valid choices: dynamic, static"):
        PTQ(mode="weird")


# ---- GPT-2 (Linear-heavy, language modelling) -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokens():
    from harness.data.base import DataBundle
    from harness.data.tokens import TokenSplit

    g = torch.Generator().manual_seed(0)
    # a learnable stream: each token is the previous one plus 1 or 2 (mod 64)
    ids = torch.cumsum(1 + torch.randint(0, 2, (20_000,), generator=g), 0) % 64
    train, test = TokenSplit(ids[:16_000], 32), TokenSplit(ids[16_000:], 32)
    return DataBundle("toy", "lm", train, test, None, 64, (32,))


@pytest.fixture(scope="module")
def trained_gpt2(tokens):
    gpt2 = pytest.importorskip("harness.models.gpt2")
    torch.manual_seed(0)
    return train(
        gpt2.GPT(64, block_size=32, n_layer=2, n_head=4, n_embd=128), tokens, 25, 3e-3, batch_size=8, adam=True
    )


@pytest.mark.parametrize("technique", ["qat_int8", "ptq_static"])
def test_gpt2_tiny_quantized_perplexity(tokens, trained_gpt2, technique):
    ctx = make_ctx(tokens, batch_size=8)
    model = copy.deepcopy(trained_gpt2)
    if technique == "qat_int8":
        tq = QAT(8, 8)
        model = train(tq.prepare_model(model, ctx), tokens, 5, 1e-3, batch_size=8, adam=True)
    else:
        tq = PTQ("static", calibration_batches=2)
    m = tq.finalize(model, ctx)["metrics"]
    assert "lm_head" not in tq.linears and len(tq.linears) == 8  # 4 Linear per block; the tied output is kept
    assert m["test_ppl_before_quant"] < 10  # learned (a uniform guess is 64, the stream's entropy gives 2)
    assert m["test_ppl_after_quant"] <= 1.05 * m["test_ppl_before_quant"]
    assert m["quantized_layers_compression"] >= 3.5


# ---- FP8 -------------------------------------------------------------------------------------------------


def test_fp8_bad_recipe_names_the_choices():
    cfg = OmegaConf.create({"quantization": {"name": "fp8", "recipe": "blockwise"}})
    with pytest.raises(ConfigError, match="recipe='blockwise'; valid choices: tensorwise, rowwise"):
        build_techniques(cfg)


def _ctx(compile: bool = True):
    from types import SimpleNamespace

    return SimpleNamespace(cfg=OmegaConf.create({"trainer": {"compile": compile}}))


def test_fp8_uses_torchaos_filter_requires_compile_and_refuses_when_nothing_qualifies(monkeypatch):
    """torchao's recommended per-layer filter on GPT-2-small's widths (n_embd 768), checked on CPU by
    pretending the GPU check passed (Float8Linear's matmuls need CUDA, so no forward pass here):
    tensorwise converts c_attn (2304 x 768) and mlp.c_fc (3072 x 768) and keeps attn.c_proj (768 x 768),
    mlp.c_proj (768 x 3072) and lm_head (24 of GPT-2-small's 49 Linears); rowwise converts none and is
    refused rather than training bf16 under the fp8 label; trainer.compile=false is refused."""
    gpt2 = pytest.importorskip("harness.models.gpt2")
    from torchao.float8.float8_linear import Float8Linear

    import harness.techniques.quantization as q

    monkeypatch.setattr(q, "fp8_support", lambda: (True, "test"))
    model = gpt2.GPT(64, block_size=16, n_layer=2, n_head=12, n_embd=768)
    fp8 = q.FP8Training(recipe="tensorwise")
    model = fp8.prepare_model(model, _ctx())
    s = fp8.summary()
    assert s["converted"] == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc")]
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in s["converted"])
    kept = s["kept_high_precision"]
    assert kept["lm_head"] == "skipped by name" and type(model.lm_head) is nn.Linear
    assert "below torchao's tensorwise size thresholds" in kept["transformer.h.0.mlp.c_proj"]
    assert set(kept) == {"lm_head"} | {
        f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_proj", "mlp.c_proj")
    }
    assert "_auto_filter_for_recipe('tensorwise')" in s["rule"]
    with pytest.raises(ConfigError, match="no Linear layer of this model qualifies under torchao's rowwise filter"):
        q.FP8Training(recipe="rowwise").prepare_model(
            gpt2.GPT(64, block_size=16, n_layer=1, n_head=12, n_embd=768), _ctx()
        )
    with pytest.raises(ConfigError, match="needs trainer.compile=true"):
        q.FP8Training().prepare_model(gpt2.GPT(64, block_size=16, n_layer=1, n_head=12, n_embd=768), _ctx(False))


def test_quantized_lm_evaluation_is_chunked_and_exact(monkeypatch):
    """``evaluate`` of a language model holds at most LM_EVAL_CHUNK_TOKENS tokens of logits at once and
    gives the loss of the whole split."""
    import harness.techniques.quantization as q

    class Split:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def batches(self, bs, train=False):
            for i in range(0, len(self.x), bs):
                yield SimpleBatch(self.x[i : i + bs], self.y[i : i + bs])

    class SimpleBatch:
        def __init__(self, x, y):
            self.x, self.y = x, y

    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
    seen = []
    emb.register_forward_hook(lambda m, a, out: seen.append(out.shape[0] * out.shape[1]))
    x, y = torch.randint(0, 20, (10, 6)), torch.randint(0, 20, (10, 6))
    import harness.metrics.classification as mc

    monkeypatch.setattr(mc, "LM_EVAL_CHUNK_TOKENS", 12)  # 2 sequences of 6 tokens per chunk
    got = q.evaluate(emb, Split(x, y), "lm", batch_size=5)
    ref = nn.functional.cross_entropy(emb(x).reshape(-1, 20), y.reshape(-1)).item()
    assert max(seen[:-1]) <= 12 and got["test_loss"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.skipif(fp8_support()[0], reason="this machine has an FP8 GPU; the refusal path needs one without")
def test_fp8_without_fp8_gpu_is_refused_before_data_and_writes_nothing(tmp_path):
    # cifar10 in an empty data_dir: had the data been loaded first, the error would be about missing CIFAR files
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness", "run", "task=quickstart", "dataset=cifar10", "quantization=fp8"]
    cmd += [f"data_dir={tmp_path / 'nodata'}", f"results_dir={results}"]
    env = {**os.environ, "HARNESS_DATA_DIR": str(tmp_path / "nodata")}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode != 0
    assert "compute capability >= 8.9" in p.stderr and "FP8" in p.stderr, p.stderr[-2000:]
    assert not list(results.glob("**/result.json"))
    assert not list(results.glob("**/checkpoint.pt"))


# ---- 8-bit optimizer states -------------------------------------------------------------------------------


def test_adamw8bit_state_is_under_30_percent_of_adamw(monkeypatch):
    from harness.techniques.optimizers import build_optimizer

    # torchao compiles its step; eager gives the same state tensors and saves a minute of CPU compile time
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    x = torch.randn(8, 256)
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        cfg = OmegaConf.load(REPO / "conf" / "optimizer" / f"{name}.yaml")
        opt = build_optimizer(cfg, model, batch_size=8, total_steps=10)
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        sizes[name] = optimizer_state_bytes(opt)
    assert type(opt).__name__ == "AdamW8bit"
    assert sizes["adamw"] == 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * 4  # two fp32 moments + steps
    assert sizes["adamw8bit"] <= 0.30 * sizes["adamw"]


# ---- fp16 with a gradient scaler, through the real loop -------------------------------------------------


class InjectOverflow(Technique):
    """Multiplies a gradient by inf during the backward pass of step ``at_step`` (before the loop unscales)."""

    name = "_test_overflow"

    def __init__(self, at_step: int = 2):
        self.at_step = at_step

    def prepare_model(self, model, ctx):
        p = next(model.parameters())
        p.register_hook(lambda g: g * float("inf") if ctx.step == self.at_step else g)
        return model


def test_fp16_overflow_step_is_skipped_and_counted(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.config import register_schema
    from harness.run.experiment import execute

    register_schema()
    overrides = [
        "task=quickstart",
        "precision=fp16",
        "precision.init_scale=1024",  # small enough that no step overflows by itself
        "quantization=ptq_int8",
        "model.width=8",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=0",
        "trainer.progress=none",
        f"results_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.clip = {"_target_": f"{__name__}.InjectOverflow", "name": "_test_overflow", "at_step": 2}
    choices = {
        "model": "small_cnn",
        "dataset": "digits",
        "optimizer": "sgd",
        "precision": "fp16",
        "quantization": "ptq_int8",
    }
    execute(cfg, tmp_path / "run", choices, overrides)
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "ok"
    assert rec["grad_scaler"]["skipped_steps"] == 1
    assert rec["grad_scaler"]["final_scale"] == 512.0  # halved once by the overflow
    # the quantized run's record carries before/after metrics, sizes and optimizer-state bytes
    assert {"test_acc_before_quant", "test_acc_after_quant", "model_bytes_after_quant"} <= rec["metrics"].keys()
    assert rec["memory"]["optimizer_state_bytes"] > 0 and rec["memory"]["peak_bytes"] > 0
    assert rec["throughput"]["samples_per_s"] > 0
