"""Overhead of the harness's training loop against a minimal hand-written PyTorch loop.

Same model, data (device-resident, same augmentation), batch size, precision, optimizer and
per-step schedule, in one process; each loop runs ``--repeats`` times, alternating, and the median
samples/s of each is compared. Targets: ratio >= 0.95 on CPU, >= 0.98 on GPU.

    python scripts/bench_loop.py                 # CPU: small CNN on synthetic 32x32 images
    python scripts/bench_loop.py --gpu           # GPU: ResNet-18, CIFAR-sized data, bf16 + channels_last
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from harness.config import CONF_DIR, register_schema
from harness.data import build_dataset
from harness.hooks import soft_cross_entropy
from harness.models import build_model
from harness.run.experiment import execute
from harness.run.precision import autocast_for, resolve_precision
from harness.techniques.optimizers import build_optimizer
from harness.techniques.schedules import build_schedule


def compose_run(overrides: list[str]):
    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def harness_loop(overrides: list[str]) -> float:
    cfg, choices = compose_run(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        with open_dict(cfg):
            cfg.results_dir = tmp
        rec = execute(cfg, Path(tmp) / "run", choices, overrides)
    return rec["throughput"]["samples_per_s"]


def plain_loop(overrides: list[str]) -> float:
    cfg, _ = compose_run(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    data = build_dataset(cfg.dataset, cfg.data_dir, device, 0)
    model = build_model(cfg.model, data).to(device)
    precision = resolve_precision(cfg.precision.name, device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bs, epochs = cfg.trainer.batch_size, cfg.trainer.epochs
    spe = data.train.num_batches(bs, True)
    opt = build_optimizer(cfg.optimizer, model, batch_size=bs, total_steps=epochs * spe)
    sched = build_schedule(cfg.schedule, opt, epochs * spe, spe)
    model.train()
    samples = 0
    elapsed = 0.0
    for epoch in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in data.train.batches(bs, train=True, epoch=epoch, seed=0):
            x = batch.x.contiguous(memory_format=torch.channels_last) if channels_last else batch.x
            with autocast_for(precision, device):
                logits = model(x)
            loss = soft_cross_entropy(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            samples += batch.y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
    return samples / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="ResNet-18 on CIFAR-sized synthetic data, bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    if args.gpu:
        overrides = [
            "task=resnet18_cifar10",
            "model=resnet18",
            "dataset=synthetic",
            "dataset.train_size=25000",
            "dataset.test_size=1000",
            "dataset.val_size=0",
            "trainer.batch_size=512",
            "precision=bf16",
            "trainer.channels_last=true",
        ]
    else:
        overrides = [
            "task=quickstart",
            "model=small_cnn",
            "dataset=synthetic",
            "dataset.train_size=4096",
            "dataset.test_size=256",
            "dataset.val_size=0",
            "trainer.batch_size=128",
            "precision=fp32",
        ]
    overrides += [
        f"trainer.epochs={args.epochs}",
        "trainer.progress=none",
        "trainer.checkpoint_every=0",
        "task.target=null",
        "logger=csv",
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads)")
    print(f"config: {' '.join(overrides)}")
    ours, plain = [], []
    for i in range(args.repeats):
        plain.append(plain_loop(overrides))
        ours.append(harness_loop(overrides))
        print(f"repeat {i + 1}: plain {plain[-1]:.1f} samples/s, harness {ours[-1]:.1f} samples/s")
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"median: harness {a:.1f} samples/s, plain PyTorch {b:.1f} samples/s, ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
