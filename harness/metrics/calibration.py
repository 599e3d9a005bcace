"""Calibration metrics computed from logits kept on the device (one host sync per call).

Definitions (N samples, C classes, p = softmax(logits), confidence = max_k p_k, prediction = argmax):

- ``ece``: expected calibration error, top-label, 15 equal-width bins, L1 (Naeini et al. 2015; Guo et al.
  2017, *On Calibration of Modern Neural Networks*). Binning is exactly torchmetrics'
  ``MulticlassCalibrationError(n_bins=15, norm="l1")``: bin k holds confidences in [k/M, (k+1)/M) and a
  confidence of exactly 1.0 (float32 saturation) forms its own bin, so both give the same number.
- ``ece_adaptive``: equal-mass (adaptive) ECE, 15 bins with edges at confidence quantiles so each holds about
  N/15 samples; tied confidences share a bin (Nguyen & O'Connor 2015; Mukhoti et al. 2020, *Calibrating Deep
  Neural Networks using Focal Loss*).
- ``mce``: maximum calibration error, the largest |accuracy - confidence| over the equal-width bins.
- ``ece_classwise``: classwise ECE (Kull et al. 2019, *Beyond temperature scaling*): for every class k, the
  equal-width-bin ECE of p_k against 1[y = k] over all samples, averaged over classes.
- ``nll``: mean negative log-likelihood of the label.
- ``brier``: multiclass Brier score, mean over samples of sum_k (p_k - 1[y = k])^2 (Brier 1950), in [0, 2].
- ``aurc`` / ``eaurc``: area under the risk-coverage curve (Geifman et al. 2019), the ordinal-ranking metric
  of PS-KD (Kim et al. 2021): samples sorted by decreasing confidence, risk at coverage i/N is the error
  rate of the first i, AURC is the mean risk; E-AURC subtracts the optimum r + (1 - r) ln(1 - r) for
  error rate r, as in the PS-KD / CRL code.
- ``acc``: top-1 accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

N_BINS = 15


def _binned_gaps(conf: Tensor, hit: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (mean confidence, mean accuracy, count) over n_bins + 1 slots, the last holding conf == 1.0
    (torchmetrics' bucketize binning). ``conf`` and ``hit`` may carry a leading class dimension."""
    edges = torch.linspace(0, 1, n_bins + 1, device=conf.device, dtype=conf.dtype)
    idx = torch.bucketize(conf, edges, right=True) - 1
    idx = idx.clamp_(0, n_bins)  # clamp only guards against tiny negative rounding
    lead = conf.shape[:-1]
    flat = idx + torch.arange(lead.numel(), device=conf.device).view(*lead, 1) * (n_bins + 1) if lead else idx
    size = (lead.numel() if lead else 1) * (n_bins + 1)
    count = torch.zeros(size, device=conf.device, dtype=conf.dtype).index_add_(
        0, flat.reshape(-1), torch.ones_like(conf).reshape(-1)
    )
    s_conf = torch.zeros_like(count).index_add_(0, flat.reshape(-1), conf.reshape(-1))
    s_hit = torch.zeros_like(count).index_add_(0, flat.reshape(-1), hit.to(conf.dtype).reshape(-1))
    shape = (*lead, n_bins + 1)
    count, s_conf, s_hit = count.view(shape), s_conf.view(shape), s_hit.view(shape)
    denom = count.clamp(min=1)
    return s_conf / denom, s_hit / denom, count


def _top_label(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    return probs, conf, (pred == labels).float()


def expected_calibration_error(conf: Tensor, hit: Tensor, n_bins: int = N_BINS) -> Tensor:
    mc, ma, count = _binned_gaps(conf, hit, n_bins)
    return ((mc - ma).abs() * count).sum(-1) / count.sum(-1)


def maximum_calibration_error(conf: Tensor, hit: Tensor, n_bins: int = N_BINS) -> Tensor:
    mc, ma, count = _binned_gaps(conf, hit, n_bins)
    return torch.where(count > 0, (mc - ma).abs(), torch.zeros_like(mc)).amax(-1)


def adaptive_calibration_error(conf: Tensor, hit: Tensor, n_bins: int = N_BINS) -> Tensor:
    """Equal-mass bins: edges at the confidence quantiles k/M, so each bin holds ~N/M samples. Samples with
    equal confidence always share a bin (a tie is never split, so bins may be uneven or empty)."""
    n = conf.numel()
    ranks = (torch.arange(1, n_bins, device=conf.device) * n + n_bins - 1) // n_bins  # first rank of bins 1..M-1
    edges = conf.sort().values[ranks.clamp(max=n - 1)]
    idx = torch.bucketize(conf, edges, right=True)
    count = torch.zeros(n_bins, device=conf.device, dtype=conf.dtype).index_add_(0, idx, torch.ones_like(conf))
    gap = torch.zeros_like(count).index_add_(0, idx, conf - hit.to(conf.dtype))  # sum of (conf - acc) per bin
    return gap.abs().sum() / n


def classwise_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> Tensor:
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return expected_calibration_error(probs.T.contiguous(), onehot.T.contiguous(), n_bins).mean()


def aurc(conf: Tensor, hit: Tensor) -> tuple[Tensor, Tensor]:
    """(AURC, E-AURC). Ties in confidence keep the input order (stable sort), as the reference code does."""
    order = conf.argsort(descending=True, stable=True)
    err = 1.0 - hit[order].double()
    n = err.numel()
    risk = err.cumsum(0) / torch.arange(1, n + 1, device=err.device, dtype=err.dtype)
    area = risk.mean()
    r = risk[-1]
    optimum = r + (1 - r) * torch.log1p(-r) if r < 1 else r  # (1 - r) ln(1 - r) -> 0 as r -> 1
    return area, area - optimum


@torch.no_grad()
def calibration_metrics(
    logits: Tensor, labels: Tensor, prefix: str = "test_", n_bins: int = N_BINS
) -> dict[str, float]:
    """All calibration metrics of a whole split's (N, C) logits as Python floats, keys ``prefix + name``."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = logits.float(), labels.long()
    probs, conf, hit = _top_label(logits, labels)
    onehot = F.one_hot(labels, logits.shape[-1]).float()
    area, excess = aurc(conf, hit)
    values = {
        "acc": hit.mean(),
        "nll": F.cross_entropy(logits, labels),
        "brier": ((probs - onehot) ** 2).sum(-1).mean(),
        "ece": expected_calibration_error(conf, hit, n_bins),
        "ece_adaptive": adaptive_calibration_error(conf, hit, n_bins),
        "mce": maximum_calibration_error(conf, hit, n_bins),
        "ece_classwise": classwise_calibration_error(probs, labels, n_bins),
        "aurc": area,
        "eaurc": excess,
    }
    floats = torch.stack([v.double() for v in values.values()]).tolist()  # one host sync
    return {f"{prefix}{k}": v for k, v in zip(values, floats)}


@torch.no_grad()
def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """Per-bin top-label statistics for a reliability diagram: ``edges`` (n_bins + 1), and per bin
    ``confidence`` (mean), ``accuracy`` and ``count``. Confidences of exactly 1.0 are shown in the last bin."""
    probs = probs.float()
    conf, pred = probs.max(-1)
    mc, ma, count = _binned_gaps(conf, (pred == labels).float(), n_bins)
    # fold the conf == 1.0 slot into the last bin (weighted means) so the plot has n_bins bars
    c_last = count[-2] + count[-1]
    w = c_last.clamp(min=1)
    mc_last = (mc[-2] * count[-2] + mc[-1] * count[-1]) / w
    ma_last = (ma[-2] * count[-2] + ma[-1] * count[-1]) / w
    mc = torch.cat([mc[:-2], mc_last.view(1)])
    ma = torch.cat([ma[:-2], ma_last.view(1)])
    count = torch.cat([count[:-2], c_last.view(1)])
    return {
        "edges": torch.linspace(0, 1, n_bins + 1).tolist(),
        "confidence": mc.tolist(),
        "accuracy": ma.tolist(),
        "count": [int(c) for c in count.tolist()],
    }
