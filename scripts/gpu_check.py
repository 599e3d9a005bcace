"""One GPU check of every GPU path of the harness, for a person with one H100/H200 (under 8 minutes).

    python scripts/gpu_check.py                      # writes results/reference/gpu/gpu_check.{json,md}
    python scripts/gpu_check.py --data-dir datasets  # + time to 93% on real CIFAR-10 (when present there)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/x   # the CPU-safe parts, tiny sizes (what CI runs)

Without a CUDA GPU (and without --cpu-smoke) it refuses with exit 2 before doing anything.

Paths covered, each a named check with its status, seconds and measurements:

- ``loop_overhead``: ``scripts/bench_loop.py --gpu`` (ResNet-18, bf16, channels_last): harness samples/s over a
  plain PyTorch loop's (target >= 0.98);
- ``resnet18_throughput``: ``harness run`` ResNet-18 on CIFAR-shaped *synthetic* data (random images: a speed
  figure only), bf16 autocast, channels_last, torch.compile; images/s after warm-up, warm-up seconds, MFU;
- ``resnet18_time_to_93``: ``task=resnet18_cifar10`` on real CIFAR-10 (``--data-dir``; skipped, and said so,
  when absent): seconds of training until validation accuracy first reached 0.93;
- ``gpt2_small_bf16``: ``scripts/bench_gpt2.py`` (GPT-2 small, 16 x 1024 tokens, bf16, compile): tokens/s, MFU;
- ``gpt2_small_fp8_tensorwise`` / ``gpt2_small_fp8_rowwise``: the fp8 technique's layer rule on GPT-2 small
  (torchao's filter), then tokens/s and MFU of the converted, compiled model. Rowwise: torchao's filter converts
  no GPT-2-small layer (the technique refuses the run; recorded as such) and the kernels are then timed with
  every Linear but lm_head converted, labelled so;
- ``fp16_autocast``: ``harness run task=quickstart precision=fp16`` on the GPU (GradScaler path);
- ``grad_accumulation``: quickstart with ``trainer.grad_accum_steps=4`` against 1 (same loss curve, to bf16/fp32
  GPU tolerance);
- ``ddp_nccl``: a single-process NCCL process group, the harness's DDP wrapper (compiled), 5 steps whose
  parameters must equal a plain model's;
- ``gpu_augmentation``: images/s of the device-resident random-crop + flip pipeline (CIFAR-shaped synthetic data).

Writes ``gpu_check.json`` (every figure, the device, torch/CUDA versions, git commit, the command) and
``gpu_check.md`` (a table) under ``--out`` (default ``results/reference/gpu/``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "results" / "reference" / "gpu"
BUDGET_S = 8 * 60


# ----------------------------------------------------------------------------------------------- helpers
def sh(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def harness_run(overrides: list[str], timeout: float, env: dict | None = None) -> dict:
    """``harness run OVERRIDES`` in a fresh results dir; returns its record (raises with stderr on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "harness", "run", *overrides, f"results_dir={tmp}", "trainer.progress=none"]
        cmd += ["trainer.checkpoint_every=0"]
        proc = sh(cmd, timeout, env)
        recs = sorted(Path(tmp).glob("**/result.json"))
        if not recs:
            raise RuntimeError(f"exit {proc.returncode}, no record: {proc.stderr[-1500:]}")
        rec = json.loads(recs[-1].read_text())
    if rec["status"] != "ok":
        raise RuntimeError(f"run {rec['status']}: {rec.get('error')}")
    return rec


def speed(rec: dict) -> dict:
    t, thr = rec["timing"], rec["throughput"]
    return {
        "samples_per_s": thr.get("samples_per_s"),
        "tokens_per_s": thr.get("tokens_per_s"),
        "mfu": thr.get("mfu"),
        "peak_flops_precision": rec["hardware"].get("peak_flops_precision"),
        "warmup_s": t.get("warmup_s"),
        "train_s": t.get("train_s"),
        "steps": rec.get("steps"),
    }


class Checks:
    def __init__(self, budget_s: float, only: list[str] | None = None):
        self.results: list[dict] = []
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.only = only

    def run(self, name: str, fn, *args) -> None:
        if self.only is not None and name not in self.only:
            return
        left = self.budget_s - (time.perf_counter() - self.t0)
        if left <= 5:
            self.results.append({"name": name, "status": "skipped", "note": "time budget spent", "seconds": 0.0})
            print(f"[{name}] skipped: time budget spent", flush=True)
            return
        t = time.perf_counter()
        try:
            out = fn(*args) or {}
            status = out.pop("_status", "ok")
            note = out.pop("_note", "")
            entry = {"name": name, "status": status, "note": note, "metrics": out}
        except Exception as e:  # noqa: BLE001  (every check reports; one failure does not stop the others)
            entry = {"name": name, "status": "failed", "note": f"{type(e).__name__}: {e}"[:2000]}
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.perf_counter() - t, 2)
        self.results.append(entry)
        shown = {k: v for k, v in entry.get("metrics", {}).items() if not isinstance(v, (dict, list))}
        print(f"[{name}] {entry['status']} in {entry['seconds']}s {entry.get('note', '')} {shown}", flush=True)


# ----------------------------------------------------------------------------------------------- checks
def check_loop_overhead(gpu: bool) -> dict:
    cmd = [sys.executable, "scripts/bench_loop.py", "--repeats", "2" if gpu else "1", "--epochs", "2" if gpu else "1"]
    proc = sh(cmd + (["--gpu"] if gpu else []), timeout=240 if gpu else 180)
    m = re.search(r"median: harness ([\d.]+) samples/s, plain PyTorch ([\d.]+) samples/s, ratio ([\d.]+)", proc.stdout)
    if not m:
        raise RuntimeError(f"bench_loop.py gave no ratio (exit {proc.returncode}): {proc.stderr[-1500:]}")
    target = 0.98 if gpu else 0.95
    ratio = float(m.group(3))
    return {
        "harness_samples_per_s": float(m.group(1)),
        "plain_samples_per_s": float(m.group(2)),
        "ratio": ratio,
        "target": target,
        "_note": "meets target" if ratio >= target else f"below target {target}",
    }


def check_resnet_throughput(gpu: bool) -> dict:
    if gpu:
        over = ["task=resnet18_cifar10", "dataset=synthetic", "dataset.train_size=50000", "dataset.test_size=1000",
                "dataset.val_size=0", "trainer.max_steps=300", "trainer.compile=true", "trainer.channels_last=true",
                "precision=bf16", "task.target=null", "trainer.eval_every=100"]  # fmt: skip
    else:
        over = ["task=quickstart", "dataset=synthetic", "model=small_cnn", "dataset.train_size=2048",
                "dataset.test_size=256", "dataset.val_size=0", "trainer.max_steps=20", "task.target=null"]  # fmt: skip
    rec = harness_run(over, timeout=300)
    return {**speed(rec), "data": "synthetic CIFAR-shaped images (speed only)", "overrides": over}


def check_time_to_93(data_dir: str | None) -> dict:
    root = Path(data_dir) if data_dir else None
    if root is None or not (root / "cifar-10-batches-py").is_dir():
        return {"_status": "skipped", "_note": f"real CIFAR-10 not found under --data-dir ({data_dir})"}
    over = ["task=resnet18_cifar10", f"data_dir={root}", "trainer.compile=true", "trainer.channels_last=true",
            "precision=bf16"]  # fmt: skip
    rec = harness_run(over, timeout=420)
    t = rec["timing"]
    out = {
        "time_to_target_s": t.get("time_to_target_s"),
        "time_to_target_with_warmup_s": t.get("time_to_target_with_warmup_s"),
        "target_epoch": t.get("target_epoch"),
        "val_acc_final": rec["metrics"].get("val_acc"),
        "test_acc": rec["metrics"].get("test_acc"),
        **speed(rec),
    }
    if t.get("time_to_target_s") is None:
        out["_note"] = "0.93 validation accuracy not reached within the task's 30 epochs"
    return out


def check_gpt2_bf16(gpu: bool) -> dict:
    cmd = [sys.executable, "scripts/bench_gpt2.py", "--json"] + ([] if gpu else ["--steps", "3", "--warmup", "1"])
    proc = sh(cmd, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: out[k] for k in ("model", "precision", "compile", "tokens_per_s", "mfu", "step_ms", "peak_memory_gib")}


def _gpt2_tokens_per_s(model, batch: int, context: int, steps: int, warmup: int, compile_: bool) -> float:
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=device.type == "cuda")
    x = torch.randint(0, model.lm_head.out_features, (batch, context + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = fwd(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * context / (time.perf_counter() - t)


def check_fp8(recipe: str, gpu: bool) -> dict:
    """The fp8 technique's layer rule on GPT-2 small, then the converted model's speed (GPU only)."""
    import torch
    from omegaconf import OmegaConf
    from torch import nn

    import harness.techniques.quantization as q
    from harness.errors import ConfigError
    from harness.infra.hardware import mfu
    from harness.models.gpt2 import GPT

    class Ctx:
        cfg = OmegaConf.create({"trainer": {"compile": True}})

    device = torch.device("cuda" if gpu else "cpu")
    n_layer, context, batch = (12, 1024, 16) if gpu else (2, 64, 2)
    if not gpu:  # the rule only: Float8Linear's matmuls need CUDA
        q_support = q.fp8_support
        q.fp8_support = lambda: (True, "cpu smoke: rule only")
    try:
        tech = q.FP8Training(recipe=recipe)
    finally:
        if not gpu:
            q.fp8_support = q_support
    model = GPT(vocab_size=50304, block_size=context, n_layer=n_layer, n_head=12, n_embd=768).to(device)
    flops = model.flops_per_sample()
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    out: dict = {"linear_layers": linears}
    try:
        converted_model = tech.prepare_model(model, Ctx())
        out.update(converted=len(tech.converted), rule=tech.summary()["rule"])
        label = f"torchao filter ({len(tech.converted)} of {linears} Linears)"
    except ConfigError as e:
        out.update(converted=0, refusal=str(e)[:300])
        if not gpu:
            return {**out, "_note": "refused as designed (no layer qualifies)"}
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        model = GPT(vocab_size=50304, block_size=context, n_layer=n_layer, n_head=12, n_embd=768).to(device)
        converted_model = convert_to_float8_training(
            model,
            module_filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn,
            config=Float8LinearConfig.from_recipe_name(recipe),
        )
        label = f"forced: every Linear but lm_head ({linears - 1}); the technique refuses {recipe} on GPT-2 small"
    if not gpu:
        return {**out, "_note": "layer rule checked on CPU; no FP8 kernels"}
    tps = _gpt2_tokens_per_s(converted_model, batch, context, steps=20, warmup=5, compile_=True)
    name = torch.cuda.get_device_name()
    return {**out, "layers": label, "tokens_per_s": tps, "mfu_vs_fp8_peak": mfu(flops, tps, name, "fp8"),
            "mfu_vs_bf16_peak": mfu(flops, tps, name, "bf16")}  # fmt: skip


def check_fp16(gpu: bool) -> dict:
    rec = harness_run(["task=quickstart", "precision=fp16", "trainer.epochs=3"], timeout=240)
    return {"test_acc": rec["metrics"]["test_acc"], **rec.get("grad_scaler", {}), "device": rec["hardware"]["device"]}


def check_grad_accum(gpu: bool) -> dict:
    # GroupNorm: no batch statistics, so 4 micro-batches of 16 must give the batch of 64's gradients
    base = ["task=quickstart", "normalization=groupnorm", "trainer.epochs=2", "precision=fp32"]
    one = harness_run(base, timeout=240)
    four = harness_run([*base, "trainer.grad_accum_steps=4"], timeout=240)
    a = [p["train_loss"] for p in one["curve"]]
    b = [p["train_loss"] for p in four["curve"]]
    diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    # float32 summation order differs (and TF32 on a GPU): equal to 1e-3 relative
    return {"train_loss_accum1": a, "train_loss_accum4": b, "max_rel_diff": diff,
            "_status": "ok" if diff < 1e-3 else "failed"}  # fmt: skip


def check_ddp(gpu: bool) -> dict:
    import copy

    import torch
    import torch.distributed as dist
    from torch import nn

    from harness.infra import distributed

    backend = "nccl" if gpu else "gloo"
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
        model = model.to(device)
        plain = copy.deepcopy(model)
        ddp = distributed.wrap_model(model, device, compile=gpu)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
        x, y = torch.randn(32, 3, 8, 8, device=device), torch.randint(0, 10, (32,), device=device)
        for _ in range(5):
            for fwd, opt in ((ddp, opts[0]), (plain, opts[1])):
                opt.zero_grad()
                nn.functional.cross_entropy(fwd(x), y).backward()
                opt.step()
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "max_param_diff": diff,
                "compiled": gpu, "_status": "ok" if diff < 1e-4 else "failed"}  # fmt: skip
    finally:
        dist.destroy_process_group()


def check_augmentation(gpu: bool) -> dict:
    import torch
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR
    from harness.data import build_dataset

    device = torch.device("cuda" if gpu else "cpu")
    cfg = OmegaConf.load(CONF_DIR / "dataset" / "synthetic.yaml")
    cfg.train_size, cfg.test_size, cfg.crop_padding, cfg.flip = (50000 if gpu else 4096), 256, 4, True
    data = build_dataset(cfg, "datasets", device, 0)
    bs, n = 512, 0
    for _ in data.train.batches(bs, train=True, epoch=0, seed=0):  # warm-up epoch (kernels, allocator)
        pass
    if gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for epoch in (1, 2):
        for b in data.train.batches(bs, train=True, epoch=epoch, seed=0):
            n += b.x.shape[0]
    if gpu:
        torch.cuda.synchronize()
    return {"images_per_s": n / (time.perf_counter() - t), "batch_size": bs, "augmentation": "random crop (pad 4) + flip",
            "data": "synthetic CIFAR-shaped, device-resident"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- output
def environment(gpu: bool) -> dict:
    import torch

    commit = sh(["git", "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
    dirty = sh(["git", "status", "--porcelain"], timeout=10).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "capability": list(torch.cuda.get_device_capability()) if gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit + ("-dirty" if dirty else ""),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write(out_dir: Path, env: dict, results: list[dict], mode: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps({"mode": mode, **env, "checks": results}, indent=2) + "\n")
    lines = [f"# GPU check ({mode})", "", f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}; "
             f"commit {env['commit']}; {env['date']}", "", f"Command: `{env['command']}`", "",
             "| check | status | seconds | key figures | note |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        figs = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in (r.get("metrics") or {}).items()
            if isinstance(v, (int, float, str)) and k not in ("rule", "refusal", "overrides") and len(str(v)) < 60
        )
        note = (r.get("note") or "").strip().splitlines()[-1:] or [""]
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {figs} | {note[0].replace('|', '/')} |")
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="run the CPU-safe parts at tiny sizes (no GPU needed)")
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR"), help="holds cifar-10-batches-py/")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting checks after this many seconds")
    ap.add_argument("--only", default=None, help="comma-separated check names (default: all); see the docstring")
    args = ap.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    if not args.cpu_smoke and not gpu:
        print(
            "gpu_check: no CUDA GPU is available; the GPU checks (bf16/fp16 autocast, compile, channels_last, fp8, "
            "NCCL DDP, throughput and MFU) need one H100/H200-class GPU. Run `python scripts/gpu_check.py "
            "--cpu-smoke --out DIR` for the CPU-safe parts.",
            file=sys.stderr,
        )
        return 2
    use_gpu = gpu and not args.cpu_smoke
    out = Path(args.out) if args.out else DEFAULT_OUT
    checks = Checks(args.budget_s, args.only.split(",") if args.only else None)
    checks.run("loop_overhead", check_loop_overhead, use_gpu)
    checks.run("resnet18_throughput", check_resnet_throughput, use_gpu)
    if use_gpu:
        checks.run("resnet18_time_to_93", check_time_to_93, args.data_dir)
    checks.run("gpt2_small_bf16" if use_gpu else "gpt2_tiny_fp32", check_gpt2_bf16, use_gpu)
    checks.run("gpt2_small_fp8_tensorwise", check_fp8, "tensorwise", use_gpu)
    checks.run("gpt2_small_fp8_rowwise", check_fp8, "rowwise", use_gpu)
    checks.run("fp16_autocast", check_fp16, use_gpu)
    checks.run("grad_accumulation", check_grad_accum, use_gpu)
    checks.run("ddp_nccl" if use_gpu else "ddp_gloo", check_ddp, use_gpu)
    checks.run("gpu_augmentation" if use_gpu else "augmentation_cpu", check_augmentation, use_gpu)
    env = environment(use_gpu)
    write(out, env, checks.results, "gpu" if use_gpu else "cpu-smoke")
    failed = [r["name"] for r in checks.results if r["status"] == "failed"]
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
