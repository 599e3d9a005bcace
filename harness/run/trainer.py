"""The training loop: autocast (bf16 / fp16 with a gradient scaler / fp32), optional
torch.compile and channels_last, technique hooks, per-step schedule, periodic evaluation,
atomic epoch checkpoints with exact resume, and divergence detection.

The hot loop never synchronises with the device except at log points (every
``trainer.log_every`` steps) and at epoch ends: losses and the non-finite flag are accumulated
as device tensors.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.hooks import Batch, RunContext, Technique, overrides, soft_cross_entropy
from harness.infra import distributed, preemption
from harness.metrics.calibration import calibration_metrics
from harness.metrics.classification import classification_metrics, perplexity
from harness.run.checkpoint import CHECKPOINT_NAME, save_checkpoint
from harness.run.precision import autocast_for, resolve_precision
from harness.run.progress import Progress

log = logging.getLogger("harness")


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Trainer:
    def __init__(
        self,
        cfg,
        ctx: RunContext,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        techniques: list[Technique],
        logger=None,
    ):
        self.cfg, self.ctx, self.model, self.optimizer, self.scheduler = cfg, ctx, model, optimizer, scheduler
        self.techniques = techniques
        self.logger = logger
        self.device = ctx.device
        self.data = ctx.data
        t = cfg.trainer
        self.precision = resolve_precision(cfg.precision.name, self.device)
        self.scaler = None
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                self.device.type,
                init_scale=float(cfg.precision.get("init_scale", 2.0**16)),
                growth_interval=int(cfg.precision.get("growth_interval", 2000)),
            )
            ctx.scaler = self.scaler
        self.channels_last = bool(t.channels_last) and self.device.type == "cuda" and cfg.model.get("family") == "cnn"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.second_order = bool(getattr(optimizer, "second_order", False))
        if self.second_order and t.compile:
            raise ConfigError(
                "trainer.compile=true cannot be combined with a second-order optimizer (double backward through a compiled graph); use trainer.compile=false"
            )
        self.forward = torch.compile(self.model) if t.compile else self.model
        # under torchrun only the training forward goes through DDP; eval and checkpoints use the plain module
        self.train_forward = self.forward
        if distributed.is_initialized():
            self.train_forward = distributed.wrap_model(self.model, self.device, t.compile)
        self.world = distributed.world_size()
        self.run_dir = Path(ctx.run_dir)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        self.is_lm = self.data.task == "lm"
        self.hooks = {
            h: [tq for tq in techniques if overrides(tq, h)]
            for h in ("prepare_batch", "loss", "after_backward", "after_epoch")
        }
        ctx.extras["predict"] = self.predict
        # progress state (restored on resume)
        self.epoch = 0
        self.step = 0
        self.curve: list[dict[str, Any]] = []
        self.train_s = 0.0
        self.eval_s = 0.0
        self.samples = 0
        self.time_to_target: float | None = None
        self.target_epoch: int | None = None
        self.skipped_steps = torch.zeros((), device=self.device)
        self.requeues = 0
        self.partial: dict[str, Any] | None = None  # position in an epoch interrupted by preemption

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "techniques": {f"{i}:{tq.name}": tq.state_dict() for i, tq in enumerate(self.techniques)},
            "epoch": self.epoch,
            "step": self.step,
            "curve": self.curve,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "samples": self.samples,
            "time_to_target": self.time_to_target,
            "target_epoch": self.target_epoch,
            "skipped_steps": float(self.skipped_steps.item()),
            "requeues": self.requeues,
            "partial": None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "run_key": self.ctx.extras.get("run_key"),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        for i, tq in enumerate(self.techniques):
            tq.load_state_dict(s["techniques"].get(f"{i}:{tq.name}", {}))
        for k in (
            "epoch",
            "step",
            "curve",
            "train_s",
            "eval_s",
            "samples",
            "time_to_target",
            "target_epoch",
            "requeues",
        ):
            setattr(self, k, s[k])
        self.skipped_steps.fill_(s.get("skipped_steps", 0.0))
        self.partial = s.get("partial")
        torch.set_rng_state(s["rng_cpu"])
        if self.device.type == "cuda" and s["rng_cuda"]:
            torch.cuda.set_rng_state_all(s["rng_cuda"])

    def checkpoint(self, partial: dict[str, Any] | None = None) -> None:
        if distributed.is_main():  # one checkpoint per run, from rank 0
            save_checkpoint(self.ckpt_path, {**self.state_dict(), "partial": partial})

    # ---------------------------------------------------------------- evaluation
    def _set_optimizer_mode(self, mode: str) -> None:
        # schedule-free optimizers evaluate at a different point than they train (Defazio et al. 2024)
        fn = getattr(self.optimizer, mode, None)
        if callable(fn):
            fn()

    @torch.no_grad()
    def predict(self, split) -> tuple[Tensor, Tensor]:
        """Logits (float32) and labels of a whole classification split, kept on the device."""
        was_training = self.model.training
        self.model.eval()
        self._set_optimizer_mode("eval")
        logits, labels = [], []
        with autocast_for(self.precision, self.device):
            for batch in split.batches(self.cfg.trainer.eval_batch_size, train=False):
                x = batch.x.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.x
                logits.append(self.forward(x).float())
                labels.append(batch.y)
        self._set_optimizer_mode("train")
        self.model.train(was_training)
        return torch.cat(logits), torch.cat(labels)

    @torch.no_grad()
    def lm_loss(self, split) -> float:
        """Mean next-token cross-entropy over a whole token split."""
        self.model.eval()
        self._set_optimizer_mode("eval")
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        with autocast_for(self.precision, self.device):
            for batch in split.batches(self.cfg.trainer.eval_batch_size, train=False):
                # chunks of ~64k tokens bound the float32 logits (tokens x vocabulary) held at once
                rows = max(1, 65536 // batch.x.shape[1])
                for x, y in zip(batch.x.split(rows), batch.y.split(rows)):
                    logits = self.forward(x).float()
                    total += torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                    )
                    count += y.numel()
        self._set_optimizer_mode("train")
        self.model.train()
        return total.item() / max(count, 1)

    def evaluate(self, final: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if self.is_lm:
            for name, split in (("val", self.data.val), ("test", self.data.test)):
                if split is not None and (name == "val" or final or self.data.val is None):
                    loss = self.lm_loss(split)
                    out[f"{name}_loss"], out[f"{name}_ppl"] = loss, perplexity(loss)
        else:
            logits, labels = self.predict(self.data.test)
            out.update(classification_metrics(logits, labels, "test_"))
            if final:
                out.update(self.final_classification_metrics(logits, labels))
        self.eval_s += time.perf_counter() - t0
        return out

    def final_classification_metrics(self, logits: Tensor, labels: Tensor) -> dict[str, float]:
        return calibration_metrics(logits, labels, prefix="test_")

    # ---------------------------------------------------------------- training
    def _loss(self, logits: Tensor, batch: Batch) -> Tensor:
        for tq in self.hooks["loss"]:
            loss = tq.loss(logits, batch, self.ctx)
            if loss is not None:
                return loss
        return soft_cross_entropy(logits, batch)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _target_reached(self, metrics: dict[str, float]) -> bool:
        target = self.cfg.trainer.target
        if target is None:
            return False
        if self.is_lm:
            ppl = metrics.get("val_ppl", metrics.get("test_ppl"))
            return ppl is not None and ppl <= float(target)
        return metrics.get("test_acc", -1.0) >= float(target)

    def fit(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        t = cfg.trainer
        epochs, bs = ctx.epochs, int(t.batch_size)
        spe = ctx.steps_per_epoch
        progress = Progress(t.progress, epochs, spe)
        log_every = int(t.log_every)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        final_metrics: dict[str, float] = {}
        self.model.train()
        try:
            while self.epoch < epochs and self.step < ctx.total_steps:
                epoch = self.epoch
                ctx.epoch = epoch
                progress.start_epoch(epoch)
                loss_sum = torch.zeros((), device=self.device)
                n_steps = 0
                partial, self.partial = self.partial or {}, None
                skip = int(partial.get("batch", 0))
                if skip:  # resumed mid-epoch after a preemption: continue this epoch where it stopped
                    loss_sum += float(partial["loss_sum"])
                    n_steps = skip
                self._sync()
                t0 = time.perf_counter()
                for i, batch in enumerate(self.data.train.batches(bs, train=True, epoch=epoch, seed=int(cfg.seed))):
                    if self.step >= ctx.total_steps:
                        break
                    if i < skip:  # trained on before the interruption (same order: it depends on seed and epoch only)
                        continue
                    for tq in self.hooks["prepare_batch"]:
                        batch = tq.prepare_batch(batch, ctx)
                    x = batch.x.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.x
                    with autocast_for(self.precision, self.device):
                        logits = self.train_forward(x)
                    loss = self._loss(logits, batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward(create_graph=self.second_order)
                        self.scaler.unscale_(self.optimizer)
                    else:
                        loss.backward(create_graph=self.second_order)
                    for tq in self.hooks["after_backward"]:
                        tq.after_backward(self.model, ctx)
                    if self.scaler is not None:
                        scale = self.scaler._scale.clone()  # a step with inf/nan grads is skipped and lowers the scale
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        self.skipped_steps += (self.scaler._scale < scale).float()
                    else:
                        self.optimizer.step()
                    self.scheduler.step()
                    detached = loss.detach()
                    loss_sum += detached
                    if self.scaler is None:
                        nonfinite |= ~torch.isfinite(detached)
                    n_steps += 1
                    self.step += 1
                    ctx.step = self.step
                    self.samples += batch.y.shape[0] * self.world
                    if self.step % log_every == 0:  # log point: the only host syncs inside an epoch
                        if distributed.any_true(nonfinite):
                            raise Diverged(f"non-finite training loss at step {self.step} (epoch {epoch + 1})")
                        rate = (n_steps * bs) / max(time.perf_counter() - t0, 1e-9)
                        progress.update(epoch, i + 1, detached.item(), rate)
                    if preemption.requested():  # SIGUSR2/SIGTERM: checkpoint at this step boundary, then requeue
                        self._sync()
                        self.train_s += time.perf_counter() - t0
                        self.checkpoint({"batch": i + 1, "loss_sum": loss_sum.item()})
                        preemption.handoff()
                self._sync()
                self.train_s += time.perf_counter() - t0
                train_loss = distributed.mean(loss_sum / max(n_steps, 1))
                if distributed.any_true(nonfinite) or not math.isfinite(train_loss) and self.scaler is None:
                    raise Diverged(f"non-finite training loss in epoch {epoch + 1} (step {self.step})")
                for tq in self.hooks["after_epoch"]:
                    tq.after_epoch(ctx)
                self.epoch += 1
                last = self.epoch >= epochs or self.step >= ctx.total_steps
                point: dict[str, Any] = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "time_s": round(self.train_s + self.eval_s, 4),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_loss": train_loss,
                }
                if last or self.epoch % int(t.eval_every) == 0:
                    metrics = self.evaluate(final=last)
                    point.update({k: v for k, v in metrics.items() if not k.startswith("test_ece_bins")})
                    if self.time_to_target is None and self._target_reached(metrics):
                        self.time_to_target, self.target_epoch = self.train_s, self.epoch
                    if last:
                        final_metrics = metrics
                self.curve.append(point)
                evaluated = ", ".join(
                    f"{k} {v:.4f}" for k, v in point.items() if k.startswith(("test_", "val_")) and isinstance(v, float)
                )
                log.info(f"epoch {self.epoch}/{epochs} train_loss {train_loss:.4f} {evaluated}")
                if self.logger is not None:
                    self.logger.log_epoch(self.epoch, point)
                if int(t.checkpoint_every) and (self.epoch % int(t.checkpoint_every) == 0) and not last:
                    self.checkpoint()
                if ctx.extras.get("stop_after_epoch") == self.epoch and not last:
                    raise KeyboardInterrupt(f"stopped after epoch {self.epoch} (test hook)")
        finally:
            progress.close()
        if not final_metrics:  # resumed after the last epoch had already run: evaluate once more
            final_metrics = self.evaluate(final=True)
        final_metrics["train_loss"] = self.curve[-1]["train_loss"] if self.curve else float("nan")
        return final_metrics

    def summary(self) -> dict[str, Any]:
        tokens = self.samples * (self.data.input_shape[0] if self.is_lm else 1)
        out = {
            "timing": {
                "total_s": round(self.train_s + self.eval_s, 4),
                "train_s": round(self.train_s, 4),
                "eval_s": round(self.eval_s, 4),
                "time_to_target_s": self.time_to_target,
                "target_epoch": self.target_epoch,
            },
            "throughput": {"samples_per_s": self.samples / self.train_s if self.train_s else None},
            "steps": self.step,
            "epochs_completed": self.epoch,
            "precision": self.precision,
        }
        if self.is_lm:
            out["throughput"]["tokens_per_s"] = tokens / self.train_s if self.train_s else None
        if self.scaler is not None:
            out["grad_scaler"] = {
                "final_scale": float(self.scaler.get_scale()),
                "skipped_steps": int(self.skipped_steps.item()),
            }
        return out
