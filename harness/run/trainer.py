"""The training loop: autocast (bf16 / fp16 with a gradient scaler / fp32), optional torch.compile and
channels_last, gradient accumulation, technique hooks, per-step schedule, evaluation on the validation
split (test at the end), atomic epoch checkpoints with exact resume, and divergence detection.

Read it top to bottom: ``fit`` runs epochs until the budget is spent; ``train_epoch`` runs the steps of
one epoch; ``train_step`` is one optimizer step; ``end_epoch`` evaluates, logs and checkpoints.

The hot loop never synchronises with the device except at progress points (every ``trainer.log_every``
steps, the first step, and at most every few seconds: ``harness.run.progress``)
steps) and at epoch ends: losses and the non-finite flag are accumulated as device tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.hooks import Batch, RunContext, Technique, overrides, soft_cross_entropy
from harness.infra import distributed, preemption
from harness.metrics.calibration import calibration_metrics
from harness.metrics.classification import classification_metrics, lm_nll_sum, perplexity
from harness.run.checkpoint import CHECKPOINT_NAME, save_checkpoint
from harness.run.precision import autocast_for, resolve_precision
from harness.run.progress import Progress

log = logging.getLogger("harness")

# values restored on resume, besides model / optimizer / schedule / scaler / technique states
PROGRESS_STATE = (
    "epoch",
    "step",
    "curve",
    "train_s",
    "eval_s",
    "samples",
    "time_to_target",
    "target_epoch",
    "requeues",
)


# warm-up: the first optimizer steps of each process (torch.compile's compilation, cuDNN autotuning, allocator
# growth), timed apart from training and excluded from throughput, MFU and time to target (both recorded)
WARMUP_STEPS = {False: 1, True: 2}  # by trainer.compile
MAX_CONSECUTIVE_SKIPS = 20  # fp16: this many skipped steps in a row (scale / 2**20) ends the run as diverged


class Diverged(RuntimeError):
    """The training loss became NaN or infinite, or the fp16 loss scale collapsed."""


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``parts`` equal micro-batches of one batch (gradient accumulation)."""
    if parts == 1:
        return [batch]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    chunks = {k: (v.chunk(parts) if isinstance(v, Tensor) else [v] * parts) for k, v in fields.items()}
    return [Batch(**{k: c[i] for k, c in chunks.items()}) for i in range(parts)]


class Trainer:
    def __init__(
        self, cfg, ctx: RunContext, model: nn.Module, optimizer, scheduler, techniques: list[Technique], logger=None
    ):
        self.cfg, self.ctx, self.model, self.optimizer, self.scheduler = cfg, ctx, model, optimizer, scheduler
        self.techniques, self.logger = techniques, logger
        self.device, self.data = ctx.device, ctx.data
        t = cfg.trainer
        self.accum = int(t.grad_accum_steps)
        self.precision = resolve_precision(cfg.precision.name, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            enabled=self.precision == "fp16",
            init_scale=float(cfg.precision.get("init_scale", 2.0**16)),
            growth_interval=int(cfg.precision.get("growth_interval", 2000)),
        )
        ctx.scaler = self.scaler if self.scaler.is_enabled() else None
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
        self.train_forward = (
            distributed.wrap_model(self.model, self.device, t.compile) if distributed.is_initialized() else self.forward
        )
        self.world = distributed.world_size()
        self.ckpt_path = Path(ctx.run_dir) / CHECKPOINT_NAME
        self.is_lm = self.data.task == "lm"
        task = cfg.task
        self.target_metric = f"{task.split}_{task.metric}" if self.data.val is not None else None
        self.higher_is_better = task.direction == "max"
        self.hooks = {
            h: [tq for tq in techniques if overrides(tq, h)]
            for h in ("select_samples", "prepare_batch", "loss", "after_backward", "after_epoch")
        }
        self.selecting = bool(self.hooks["select_samples"])  # epochs may be shortened (regularization=pdd)
        ctx.extras["predict"] = self.predict
        # progress (restored on resume)
        self.epoch = self.step = self.samples = self.requeues = 0
        self.curve: list[dict[str, Any]] = []
        self.train_s = self.eval_s = 0.0
        self.warmup = {"warmup_s": 0.0, "warmup_steps": 0, "warmup_samples": 0, "time_to_target_with_warmup_s": None}
        self._warm_left = WARMUP_STEPS[bool(t.compile)]
        self.time_to_target: float | None = None
        self.target_epoch: int | None = None
        self.skipped_steps = torch.zeros((), device=self.device)
        # fp16: a run of consecutive skipped steps (the scale halves on each) means the scale collapsed
        self.skip_streak = torch.zeros((), device=self.device)
        self.max_skip_streak = torch.zeros((), device=self.device)
        self.max_consecutive_skips = int(cfg.precision.get("max_consecutive_skips", MAX_CONSECUTIVE_SKIPS))
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.partial: dict[str, Any] | None = None  # position in an epoch interrupted by preemption
        self.final_metrics: dict[str, float] = {}
        self.progress: Progress | None = None  # set while fit runs (evaluation reports to it)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        progress = self.progress = Progress(
            t.progress,
            self.ctx.epochs,
            self.ctx.steps_per_epoch,
            log_every=int(t.log_every),
            unit="tokens" if self.is_lm else "samples",
            per_sample=self.data.input_shape[0] if self.is_lm else 1,  # tokens per sequence
        )
        self.model.train()
        try:
            while not self.budget_spent():
                self.ctx.epoch = self.epoch
                progress.start_epoch(self.epoch)
                train_loss = self.train_epoch(progress)
                for tq in self.hooks["after_epoch"]:
                    tq.after_epoch(self.ctx)
                self.epoch += 1
                self.end_epoch(train_loss)
        finally:
            progress.close()
            self.progress = None
        if not self.final_metrics:  # resumed after the last epoch had already run: evaluate once more
            self.final_metrics = self.evaluate(final=True)
        self.final_metrics["train_loss"] = self.curve[-1]["train_loss"] if self.curve else float("nan")
        return self.final_metrics

    def budget_spent(self) -> bool:
        return self.epoch >= self.ctx.epochs or self.step >= self.ctx.total_steps

    def train_epoch(self, progress: Progress) -> float:
        """Train one epoch (or its remainder after a preemption) and return its mean training loss."""
        bs, seed, epoch = int(self.cfg.trainer.batch_size), int(self.cfg.seed), self.epoch
        partial, self.partial = self.partial or {}, None
        skip = int(
            partial.get("batch", 0)
        )  # batches trained on before a preemption (the order depends on seed and epoch only)
        loss_sum = torch.full((), float(partial.get("loss_sum", 0.0)), device=self.device)
        n_steps = skip
        index, n_kept = self.select_samples(bs)  # None: the whole training split
        kept = {} if index is None else {"index": index}
        self._sync()
        t0, timed = time.perf_counter(), 0
        for i, batch in enumerate(self.data.train.batches(bs, train=True, epoch=epoch, seed=seed, **kept)):
            if self.step >= self.ctx.total_steps or self.schedule_position() >= self.ctx.total_steps:
                break
            if i < skip:
                continue
            loss = self.train_step(batch)
            if index is not None:  # a shortened epoch spans a whole epoch of the schedule
                self._advance_schedule(epoch * self.ctx.steps_per_epoch + (i + 1) * self.ctx.steps_per_epoch // n_kept)
            timed += 1
            if self._warm_left:  # a warm-up step: timed apart (one host sync)
                t0 = self._end_warmup_step(t0, batch.y.shape[0] * self.world)
                timed = 0  # the rate counts the steps after the clock restarted
            loss_sum += loss
            n_steps += 1
            if progress.due(self.step):  # progress point: the only host syncs inside an epoch
                self.check_finite(f"at step {self.step} (epoch {epoch + 1})")
                rate = (timed * bs) / (time.perf_counter() - t0) if timed else 0.0
                progress.update(epoch, i + 1, loss.item(), rate)
            if preemption.requested():  # SIGUSR2/SIGTERM: checkpoint at this step boundary, then requeue
                self._sync()
                self.train_s += time.perf_counter() - t0
                self.checkpoint({"batch": i + 1, "loss_sum": loss_sum.item()})
                preemption.handoff()
        self._sync()
        self.train_s += time.perf_counter() - t0
        self.check_finite(f"in epoch {epoch + 1} (step {self.step})")
        return distributed.mean(loss_sum / max(n_steps, 1))

    def select_samples(self, batch_size: int) -> tuple[Tensor | None, int]:
        """The training positions this epoch iterates (``select_samples`` hook: the first technique that
        returns an index decides; None: the whole split) and its number of steps. The selection pass is
        training time (``timing.train_s``)."""
        t0 = time.perf_counter()
        for tq in self.hooks["select_samples"]:
            index = tq.select_samples(self.ctx)
            if index is not None:
                self._sync()
                self.train_s += time.perf_counter() - t0
                return index, self.data.train.num_batches(batch_size, True, len(index))
        return None, self.ctx.steps_per_epoch

    def schedule_position(self) -> int:
        """Steps of the schedule taken: the optimizer steps, or more when sample selection shortens epochs."""
        return int(self.scheduler.last_epoch) if self.selecting else self.step

    def _advance_schedule(self, position: int) -> None:
        """Sample selection (``regularization=pdd``) shortens epochs; the schedule keeps the baseline's
        length in epochs, so a shortened epoch of n steps advances it by ``steps_per_epoch`` steps,
        evenly over its n steps (the learning rate at the end of epoch t equals the baseline's)."""
        while int(self.scheduler.last_epoch) < min(position, self.ctx.total_steps):
            self.scheduler.step()

    def _end_warmup_step(self, t0: float, samples: int) -> float:
        self._sync()
        now = time.perf_counter()
        w = self.warmup
        w["warmup_s"] += now - t0
        w["warmup_steps"] += 1
        w["warmup_samples"] += samples
        self._warm_left -= 1
        return now

    def train_step(self, batch: Batch) -> Tensor:
        """One optimizer step over ``batch`` (in ``trainer.grad_accum_steps`` micro-batches); returns the loss."""
        for tq in self.hooks["prepare_batch"]:
            batch = tq.prepare_batch(batch, self.ctx)
        self.optimizer.zero_grad(set_to_none=True)
        micro = split_batch(batch, self.accum)
        total = torch.zeros((), device=self.device)
        for k, mb in enumerate(micro):
            with self._no_sync() if k < len(micro) - 1 else contextlib.nullcontext():
                with autocast_for(self.precision, self.device):
                    logits = self.train_forward(self._layout(mb.x))
                loss = self._loss(logits, mb) / len(micro)
                self.scaler.scale(loss).backward(create_graph=self.second_order)
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        for tq in self.hooks["after_backward"]:
            tq.after_backward(self.model, self.ctx)
        self._optimizer_step()
        self.scheduler.step()
        self.nonfinite |= ~torch.isfinite(total)
        self.step += 1
        self.ctx.step = self.step
        self.samples += batch.y.shape[0] * self.world
        return total

    def end_epoch(self, train_loss: float) -> None:
        """Evaluate (every ``trainer.eval_every`` epochs and at the end), time the target, log, checkpoint."""
        t = self.cfg.trainer
        last = self.budget_spent()
        point: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "time_s": round(self.train_s + self.warmup["warmup_s"] + self.eval_s, 4),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
        }
        if self.is_lm:  # curves of runs with different batch or context compare on tokens seen
            point["tokens"] = self.samples * self.data.input_shape[0]
        if last or self.epoch % int(t.eval_every) == 0:
            metrics = self.evaluate(final=last)
            point.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if self.time_to_target is None and self.target_reached(metrics):
                self.time_to_target, self.target_epoch = self.train_s, self.epoch
                self.warmup["time_to_target_with_warmup_s"] = self.train_s + self.warmup["warmup_s"]
            if last:
                self.final_metrics = metrics
        self.curve.append(point)
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in point.items() if k.startswith(("test_", "val_")) and isinstance(v, float)
        )
        log.info(f"epoch {self.epoch}/{self.ctx.epochs} train_loss {train_loss:.4f} {shown}")
        if self.logger is not None:
            self.logger.log_epoch(self.epoch, point)
        if int(t.checkpoint_every) and self.epoch % int(t.checkpoint_every) == 0 and not last:
            self.checkpoint()

    # ---------------------------------------------------------------- step parts
    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _no_sync(self):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        no_sync = getattr(self.train_forward, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    def _loss(self, logits: Tensor, batch: Batch) -> Tensor:
        for tq in self.hooks["loss"]:
            loss = tq.loss(logits, batch, self.ctx)
            if loss is not None:
                return loss
        return soft_cross_entropy(logits, batch)

    def _optimizer_step(self) -> None:
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return
        before = self.scaler._scale.clone()  # a step with inf/nan gradients is skipped and lowers the scale
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = (self.scaler._scale < before).float()
        self.skipped_steps += skipped
        self.skip_streak = (self.skip_streak + 1) * skipped  # on the device: no host sync
        self.max_skip_streak = torch.maximum(self.max_skip_streak, self.skip_streak)

    def check_finite(self, where: str) -> None:
        """Raise Diverged on a non-finite loss, or (fp16) when the gradient scaler skipped
        ``precision.max_consecutive_skips`` steps in a row: the gradients overflow at every scale, the
        weights no longer change, and the loss the loop sees stays finite."""
        if distributed.any_true(self.nonfinite):
            raise Diverged(f"non-finite training loss {where}")
        if self.scaler.is_enabled() and distributed.any_true(self.max_skip_streak >= self.max_consecutive_skips):
            raise Diverged(
                f"fp16 loss scale collapsed {where}: {int(self.max_skip_streak.item())} consecutive steps skipped "
                f"for inf/nan gradients (limit precision.max_consecutive_skips={self.max_consecutive_skips}), "
                f"scale {self.scaler.get_scale():.3g}"
            )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- evaluation
    def target_reached(self, metrics: dict[str, float]) -> bool:
        target, value = self.cfg.task.target, metrics.get(self.target_metric or "")
        if target is None or value is None:
            return False
        return value >= float(target) if self.higher_is_better else value <= float(target)

    def eval_splits(self, final: bool) -> list[str]:
        """Validation at every evaluation, test only at the end (no decision ever reads test). Without a
        validation split the intermediate evaluations read test, for the curve only."""
        if self.data.val is None:
            return ["test"]
        return ["val", "test"] if final else ["val"]

    def evaluate(self, final: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for name in self.eval_splits(final):
            split = getattr(self.data, name)
            if self.is_lm:
                loss = self.lm_loss(split)
                out[f"{name}_loss"], out[f"{name}_ppl"] = loss, perplexity(loss)
                continue
            logits, labels = self.predict(split)
            out.update(classification_metrics(logits, labels, f"{name}_"))
            if final and name == "test":
                out.update(calibration_metrics(logits, labels, prefix="test_"))
        self.eval_s += time.perf_counter() - t0
        return out

    def _set_optimizer_mode(self, mode: str) -> None:
        # schedule-free optimizers evaluate at a different point than they train (Defazio et al. 2024)
        fn = getattr(self.optimizer, mode, None)
        if callable(fn):
            fn()

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        self._set_optimizer_mode("eval")
        try:
            with torch.no_grad(), autocast_for(self.precision, self.device):
                yield
        finally:
            self._set_optimizer_mode("train")
            self.model.train(was_training)

    def predict(self, split) -> tuple[Tensor, Tensor]:
        """Logits (float32) and labels of a whole classification split, kept on the device."""
        logits, labels = [], []
        with self._eval_mode(), self._eval_progress(split) as step:
            for batch in split.batches(self.cfg.trainer.eval_batch_size, train=False):
                logits.append(self.forward(self._layout(batch.x)).float())
                labels.append(batch.y)
                step()
        return torch.cat(logits), torch.cat(labels)

    @contextlib.contextmanager
    def _eval_progress(self, split):
        """Report the batches of an evaluation of ``split`` to the progress display (``eval val 3/8 batches``)."""
        progress = self.progress
        if progress is None:
            yield lambda: None
            return
        name = next((n for n in ("val", "test", "train") if getattr(self.data, n, None) is split), "split")
        progress.start_eval(name, split.num_batches(int(self.cfg.trainer.eval_batch_size), False))
        done = [0]

        def step() -> None:
            done[0] += 1
            progress.eval_step(done[0])

        try:
            yield step
        finally:
            progress.end_eval()

    def lm_loss(self, split) -> float:
        """Mean next-token cross-entropy over a whole token split, in chunks that bound the float32 logits."""
        total, count = torch.zeros((), device=self.device, dtype=torch.float64), 0
        with self._eval_mode(), self._eval_progress(split) as step:
            for batch in split.batches(self.cfg.trainer.eval_batch_size, train=False):
                total, n = lm_nll_sum(self.forward, batch, total)
                count += n
                step()
        return total.item() / max(count, 1)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "techniques": {f"{i}:{tq.name}": tq.state_dict() for i, tq in enumerate(self.techniques)},
            **{k: getattr(self, k) for k in PROGRESS_STATE},
            "skipped_steps": float(self.skipped_steps.item()),
            "warmup": dict(self.warmup),
            "partial": None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "run_key": self.ctx.extras.get("run_key"),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler.is_enabled() and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        for i, tq in enumerate(self.techniques):
            tq.load_state_dict(s["techniques"].get(f"{i}:{tq.name}", {}))
        for k in PROGRESS_STATE:
            setattr(self, k, s[k])
        self.skipped_steps.fill_(s.get("skipped_steps", 0.0))
        self.warmup.update(s.get("warmup", {}))  # this process warms up again; its warm-up adds to the total
        self.partial = s.get("partial")
        torch.set_rng_state(s["rng_cpu"])
        if self.device.type == "cuda" and s["rng_cuda"]:
            torch.cuda.set_rng_state_all(s["rng_cuda"])

    def checkpoint(self, partial: dict[str, Any] | None = None) -> None:
        if distributed.is_main():  # one checkpoint per run, from rank 0
            save_checkpoint(self.ckpt_path, {**self.state_dict(), "partial": partial})

    def summary(self) -> dict[str, Any]:
        w = self.warmup
        samples = self.samples - w["warmup_samples"]  # throughput after warm-up
        tokens = samples * (self.data.input_shape[0] if self.is_lm else 1)
        n_train = max(len(self.data.train) * self.world, 1)
        out = {
            "timing": {
                "total_s": round(self.train_s + w["warmup_s"] + self.eval_s, 4),
                "train_s": round(self.train_s, 4),  # excludes warm-up
                "warmup_s": round(w["warmup_s"], 4),
                "warmup_steps": w["warmup_steps"],
                "eval_s": round(self.eval_s, 4),
                "time_to_target_s": self.time_to_target,  # training seconds, warm-up excluded
                "time_to_target_with_warmup_s": w["time_to_target_with_warmup_s"],
                "target_epoch": self.target_epoch,
                "target_metric": self.target_metric,
            },
            "throughput": {"samples_per_s": samples / self.train_s if self.train_s else None},
            "steps": self.step,
            "epochs_completed": self.epoch,
            # sample-passes (samples trained on, warm-up included) and the same in passes over the training
            # split: below the epochs when sample selection (regularization=pdd) shortens epochs
            "sample_passes": self.samples,
            "effective_epochs": None if self.is_lm else round(self.samples / n_train, 4),
            "precision": self.precision,
        }
        if self.is_lm:
            out["throughput"]["tokens_per_s"] = tokens / self.train_s if self.train_s else None
        if self.scaler.is_enabled():
            out["grad_scaler"] = {
                "final_scale": float(self.scaler.get_scale()),
                "skipped_steps": int(self.skipped_steps.item()),
                "max_consecutive_skipped": int(self.max_skip_streak.item()),
            }
        return out
