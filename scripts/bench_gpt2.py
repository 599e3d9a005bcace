"""GPT-2 training throughput (tokens/s) and MFU: forward, backward and a fused AdamW step on windows of
WikiText-2 (when ``--data-dir`` holds it) or random tokens, under bf16 autocast and optionally
torch.compile. FLOPs per token are the model's 6·N + 12·L·H·Q·T (nanoGPT's estimate_mfu); the peak
comes from ``harness.infra.hardware``. On a machine without CUDA it runs a tiny configuration so the script
itself is exercised.

    python scripts/bench_gpt2.py                                  # GPT-2 small, seq 1024, bf16, compile
    python scripts/bench_gpt2.py --data-dir /work/shared/data --batch-size 16 --steps 50
    python scripts/bench_gpt2.py --no-compile --precision fp32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from harness.infra.hardware import effective_precision, mfu, peak_flops
from harness.models.gpt2 import GPT


def token_batches(args, device: torch.device):
    """(vocabulary size, endless stream of (x, y) windows): WikiText-2 through the harness loader, or random ids."""
    if args.data_dir:
        from omegaconf import OmegaConf

        from harness.data import build_dataset

        cfg = OmegaConf.create(
            {"name": "wikitext2", "tokenizer": args.tokenizer, "context": args.context, "download": False}
        )
        data = build_dataset(cfg, args.data_dir, device, seed=0)

        def windows():
            epoch = 0
            while True:
                for b in data.train.batches(args.batch_size, train=True, epoch=epoch):
                    yield b.x, b.y
                epoch += 1

        return data.num_classes, windows()
    vocab = args.vocab or 50257

    def random_windows():
        while True:
            w = torch.randint(0, vocab, (args.batch_size, args.context + 1), device=device)
            yield w[:, :-1], w[:, 1:]

    return vocab, random_windows()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("small", "tiny"), default=None, help="default: small on CUDA, tiny on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (small), 8 (tiny)")
    ap.add_argument("--context", type=int, default=None, help="default: 1024 (small), 64 (tiny)")
    ap.add_argument("--vocab", type=int, default=None, help="random tokens: vocabulary (default 50257, GPT-2 BPE)")
    ap.add_argument("--data-dir", default=None, help="read WikiText-2 from DATA_DIR/wikitext-2 (word tokenizer)")
    ap.add_argument("--tokenizer", default="word", choices=("word", "byte", "gpt2"))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation; default 10 / 2)")
    ap.add_argument(
        "--precision", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.model or ("small" if cuda else "tiny")
    shape = dict(n_layer=12, n_head=12, n_embd=768) if size == "small" else dict(n_layer=2, n_head=4, n_embd=128)
    args.batch_size = args.batch_size or (16 if size == "small" else 8)
    args.context = args.context or (1024 if size == "small" else 64)
    steps, warmup = args.steps or (30 if cuda else 5), args.warmup if args.warmup is not None else (10 if cuda else 2)
    precision = args.precision or ("bf16" if cuda else "fp32")
    compile_ = cuda and not args.no_compile
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    vocab, batches = token_batches(args, device)
    torch.manual_seed(0)
    model = GPT(vocab_size=vocab, block_size=args.context, train_context=args.context, **shape).to(device)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=cuda)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        x, y = next(batches)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()  # one sync at the end
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    tokens_per_s = steps * args.batch_size * args.context / dt
    name = torch.cuda.get_device_name() if cuda else "cpu"
    prec = effective_precision(precision)
    out = {
        "model": f"gpt2_{size}",
        "params": model.num_params(),
        "vocab": vocab,
        "data": f"wikitext2/{args.tokenizer}" if args.data_dir else "random",
        "device": name,
        "precision": precision,
        "compile": compile_,
        "batch_size": args.batch_size,
        "context": args.context,
        "steps": steps,
        "step_ms": 1000 * dt / steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": model.flops_per_sample(),
        "achieved_tflops": model.flops_per_sample() * tokens_per_s / 1e12,
        "peak_tflops": (peak_flops(name, prec) or 0) / 1e12 or None,
        "mfu": mfu(model.flops_per_sample(), tokens_per_s, name if cuda else None, prec),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": loss,
    }
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k:>16}: {v:,.4g}" if isinstance(v, float) else f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
