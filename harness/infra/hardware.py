"""Peak dense FLOP/s of known accelerators and model FLOPs utilisation (MFU; Chowdhery et al. 2022,
"PaLM", appendix B): achieved training FLOP/s (the model's FLOPs per sample or token times the
measured rate) over the device's peak for the run's precision.

Figures are the vendors' dense tensor-core peaks (datasheet numbers "with sparsity" halved), per GPU.
``fp32`` is the plain FP32 (non-tensor-core) peak; when PyTorch lets float32 matmuls use TF32
(``torch.set_float32_matmul_precision("high")``) the ``tf32`` figure applies instead. ``None`` where
the device has no such unit (e.g. bf16 on V100/T4, fp8 before Ada/Hopper).
"""

from __future__ import annotations

import re
from typing import Any

T = 1e12
PRECISIONS = ("fp8", "bf16", "fp16", "tf32", "fp32")

# (pattern matched against torch.cuda.get_device_name, label, {precision: dense FLOP/s}); first match wins,
# so specific variants (PCIe, NVL) come before the family's default (SXM).
GPUS: list[tuple[str, str, dict[str, float | None]]] = [
    (r"B200", "B200", {"fp8": 4500 * T, "bf16": 2250 * T, "fp16": 2250 * T, "tf32": 1100 * T, "fp32": 80 * T}),
    (
        r"H200.*NVL",
        "H200 NVL",
        {"fp8": 1671 * T, "bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T},
    ),
    (
        r"H200|GH200",
        "H200 SXM",
        {"fp8": 1979 * T, "bf16": 989.5 * T, "fp16": 989.5 * T, "tf32": 494.5 * T, "fp32": 67 * T},
    ),
    (
        r"H100.*PCIe",
        "H100 PCIe",
        {"fp8": 1513 * T, "bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378 * T, "fp32": 51 * T},
    ),
    (
        r"H100.*NVL",
        "H100 NVL",
        {"fp8": 1671 * T, "bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T},
    ),
    (
        r"H100|H800",
        "H100 SXM",
        {"fp8": 1979 * T, "bf16": 989.5 * T, "fp16": 989.5 * T, "tf32": 494.5 * T, "fp32": 67 * T},
    ),
    (r"A100|A800", "A100", {"fp8": None, "bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}),
    (r"L40S", "L40S", {"fp8": 733 * T, "bf16": 362 * T, "fp16": 362 * T, "tf32": 183 * T, "fp32": 91.6 * T}),
    (r"L40\b", "L40", {"fp8": 362 * T, "bf16": 181 * T, "fp16": 181 * T, "tf32": 90.5 * T, "fp32": 90.5 * T}),
    (r"\bL4\b", "L4", {"fp8": 242 * T, "bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T}),
    (r"\bA10\b", "A10", {"fp8": None, "bf16": 125 * T, "fp16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T}),
    (
        r"RTX A6000",
        "RTX A6000",
        {"fp8": None, "bf16": 154.8 * T, "fp16": 154.8 * T, "tf32": 77.4 * T, "fp32": 38.7 * T},
    ),
    # GeForce: tensor-core figures with FP32 accumulation (what autocast uses), which is half the FP16-accumulate peak
    (
        r"RTX 4090",
        "RTX 4090",
        {"fp8": 330.3 * T, "bf16": 165.2 * T, "fp16": 165.2 * T, "tf32": 82.6 * T, "fp32": 82.6 * T},
    ),
    (r"RTX 3090", "RTX 3090", {"fp8": None, "bf16": 71 * T, "fp16": 71 * T, "tf32": 35.6 * T, "fp32": 35.6 * T}),
    (r"V100.*PCIE", "V100 PCIe", {"fp8": None, "bf16": None, "fp16": 112 * T, "tf32": None, "fp32": 14 * T}),
    (r"V100", "V100 SXM2", {"fp8": None, "bf16": None, "fp16": 125 * T, "tf32": None, "fp32": 15.7 * T}),
    (r"\bT4\b", "T4", {"fp8": None, "bf16": None, "fp16": 65 * T, "tf32": None, "fp32": 8.1 * T}),
]


def lookup(device_name: str | None) -> tuple[str, dict[str, float | None]] | None:
    """The table entry (label, peaks) of a device name as torch reports it, or None when unknown."""
    if not device_name:
        return None
    for pattern, label, peaks in GPUS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, peaks
    return None


def numerics_settings() -> dict[str, Any]:
    """What decides the math float32 work actually runs in (recorded next to the MFU): PyTorch's float32
    matmul precision (``highest`` = true FP32; ``high``/``medium`` let cuBLAS use TF32), the cuBLAS and
    cuDNN TF32 switches, and cuDNN's autotuning and determinism."""
    import torch

    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
    }


def effective_precision(precision: str, family: str | None = None, settings: dict[str, Any] | None = None) -> str:
    """The tensor-core math an ``fp32`` run really uses on a GPU: convolutions (CNNs) run in TF32 when
    cuDNN allows it (PyTorch's default), matmuls when the float32 matmul precision is not ``highest``.
    Autocast precisions (bf16, fp16) and fp8 are what they say."""
    if precision != "fp32":
        return precision
    s = settings or numerics_settings()
    matmul_tf32 = s["float32_matmul_precision"] != "highest" or s["cuda_matmul_allow_tf32"]
    if family == "cnn":
        return "tf32" if s["cudnn_allow_tf32"] else "fp32"
    return "tf32" if matmul_tf32 else "fp32"


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device_name`` at ``precision`` (one of PRECISIONS), or None when the
    device is not in the table or has no unit for that precision. Raises ValueError on an unknown precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid choices: {', '.join(PRECISIONS)}")
    entry = lookup(device_name)
    return None if entry is None else entry[1].get(precision)


def mfu(
    flops_per_sample: float | None, samples_per_s: float | None, device_name: str | None, precision: str
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: ``flops_per_sample * samples_per_s / peak``. For language
    models pass FLOPs per token and tokens/s. None when any figure is unknown."""
    peak = peak_flops(device_name, precision)
    if not peak or not flops_per_sample or not samples_per_s:
        return None
    return flops_per_sample * samples_per_s / peak


def add_mfu(record: dict[str, Any]) -> None:
    """Fill ``record["hardware"]`` (``peak_flops`` of one GPU, the ``peak_flops_precision`` it is for,
    the ``numerics`` settings) and ``record["throughput"]["mfu"]``: the run's throughput (global, over
    all ranks) divided by the world size, times the FLOPs per sample (per token for LMs), over one GPU's
    peak for the math actually used (TF32 for fp32 convolutions and matmuls when allowed; fp8 when the
    fp8 technique converted layers). None on CPU or unknown GPUs; never raises (a record is written even
    when these figures cannot be had)."""
    hw = record.setdefault("hardware", {})
    thr = record.get("throughput") or {}
    try:
        settings = numerics_settings()
        hw["numerics"] = settings
        family = ((record.get("config") or {}).get("model") or {}).get("family")
        precision = str(record.get("precision", "fp32"))
        fp8 = ((record.get("techniques") or {}).get("quantization") or {}).get("converted")
        if fp8:  # torchao float8 layers: their GEMMs run in fp8 (the rest of the model does not)
            precision = "fp8"
        cuda = hw.get("device") == "cuda"
        precision = effective_precision(precision, family, settings) if cuda else precision
        name = hw.get("device_name") if cuda else None
        peak = peak_flops(name, precision)
        lm = (record.get("dataset_info") or {}).get("task") == "lm"
        rate = thr.get("tokens_per_s") if lm else thr.get("samples_per_s")
        world = int(hw.get("world_size") or 1)
        per_gpu = rate / world if rate else None
        fps = (record.get("model_info") or {}).get("flops_per_sample")
        hw["peak_flops"] = peak
        hw["peak_flops_precision"] = precision
        if "throughput" in record:
            record["throughput"]["mfu"] = mfu(fps, per_gpu, name, precision)
            record["throughput"]["mfu_basis"] = (
                f"per GPU (global rate / world_size {world}) over the {precision} peak of one GPU"
            )
    except Exception:  # noqa: BLE001  (a missing figure must not lose the record)
        hw.setdefault("peak_flops", None)
