"""Data-parallel training with ``torchrun``: ``torchrun --nproc_per_node=4 -m harness run ...``.

* The process group is set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT) before Hydra starts: NCCL on GPUs (one per local rank), gloo on CPU.
* All ranks agree on one Hydra run directory: rank 0's clock is broadcast and substituted for
  ``${now:...}`` in ``hydra.run.dir``, so there is one output folder, not one per rank.
* ``trainer.batch_size`` is the *global* batch: each rank trains on ``batch_size / world_size``
  samples per step of its own shard of the training split, and DistributedDataParallel averages
  the gradients, so a run on N processes follows the same recipe (and learning rate) as a run on one.
  Device-resident splits are sharded by index (each rank keeps only its shard on its device);
  loader-based splits (image folders) use a ``DistributedSampler``; token streams draw different
  random windows per rank. Evaluation runs on the full test split on every rank (no collectives).
* Only rank 0 logs, checkpoints and writes the record (which states world size and global batch).

Single-process runs never touch ``torch.distributed``: every helper here is a no-op for them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from harness.errors import ConfigError

log = logging.getLogger("harness")


def env_world_size() -> int:
    """World size announced by torchrun (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> str | None:
    """Join the process group torchrun describes; returns the backend, or None outside torchrun
    (WORLD_SIZE unset or 1). On GPUs each process uses cuda:LOCAL_RANK."""
    if env_world_size() <= 1 or is_initialized():
        return torch.distributed.get_backend() if is_initialized() else None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} unset: start distributed runs with torchrun"
        )
    backend = os.environ.get("HARNESS_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"HARNESS_DIST_BACKEND={backend!r}; valid choices: nccl, gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    if not is_main():  # only rank 0 talks; the others report warnings and errors
        logging.getLogger("harness").setLevel(logging.WARNING)
    return backend


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


NOW = re.compile(r"\$\{now:([^}]*)\}")


def hydra_overrides(args: list[str], run_dir_pattern: str) -> list[str]:
    """Extra Hydra overrides for a torchrun rank: the same run directory on every rank (rank 0's
    clock replaces ``${now:...}``), and on ranks > 0 no ``.hydra/`` files and no log file of
    their own. ``[]`` outside torchrun, for ``-m`` sweeps, or when the user set the run dir."""
    if not is_initialized() or any(a in ("-m", "--multirun") for a in args):
        return []
    stamp = broadcast_object(dt.datetime.now() if is_main() else None)
    out = []
    if not any(a.split("=")[0].lstrip("+") == "hydra.run.dir" for a in args):
        out.append("hydra.run.dir=" + NOW.sub(lambda m: stamp.strftime(m.group(1)), run_dir_pattern))
    if not is_main():
        out += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return out


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


def any_true(flag: Tensor) -> bool:
    """``flag.item()``, OR-ed over ranks, so every rank takes the same branch (e.g. divergence)."""
    if not is_initialized():
        return bool(flag.item())
    t = flag.to(torch.float32).reshape(1)
    if torch.distributed.get_backend() == "gloo":
        t = t.cpu()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean(value: Tensor) -> float:
    """The mean of a scalar over ranks (e.g. an epoch's training loss), as a float."""
    if not is_initialized():
        return value.item()
    t = value.detach().to(torch.float64).reshape(1)
    if torch.distributed.get_backend() == "gloo":
        t = t.cpu()
    torch.distributed.all_reduce(t)
    return t.item() / world_size()


def wrap_model(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (its parameters are broadcast from rank 0; then
    ``torch.compile``d if asked), or ``model`` itself in a single process."""
    if not is_initialized():
        return torch.compile(model) if compile else model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if compile else ddp


def run_dir_pattern() -> str:
    """``hydra.run.dir`` of conf/config.yaml, uninterpolated."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").hydra.run, resolve=False)["dir"]


RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout etc. from seed + r * stride (+ a resume's step)


def seed_ranks(seed: int, step: int = 0) -> int | None:
    """Give every rank its own torch random stream for the training loop (dropout masks, stochastic
    depth): ``seed + rank * RANK_SEED_STRIDE + step`` on CPU and CUDA generators. Called once the model is
    built (its initialisation stays the same on every rank, and DDP broadcasts rank 0's anyway) and
    after a resume (rank 0's checkpointed generator state would otherwise give every rank the same
    stream again). A no-op in a single process (returns None), so single-process runs are unchanged."""
    if not is_initialized() or world_size() == 1:
        return None
    s = int(seed) + rank() * RANK_SEED_STRIDE + int(step)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def describe(batch_size: int, seed: int | None = None) -> dict[str, Any]:
    w = world_size()
    out = {
        "world_size": w,
        "backend": torch.distributed.get_backend() if is_initialized() else None,
        "global_batch_size": batch_size,
        "per_rank_batch_size": batch_size // w,
    }
    if w > 1:
        out["rank_seeds"] = (
            f"rank r trains with torch seed {seed} + r * {RANK_SEED_STRIDE} (+ the step of a resume)"
            if seed is not None
            else f"seed + rank * {RANK_SEED_STRIDE}"
        )
    return out


# ------------------------------------------------------------------------------------------ data sharding
