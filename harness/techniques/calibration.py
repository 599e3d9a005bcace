"""Post-hoc calibration (config group ``calibration=``): map a trained classifier's logits to better
calibrated probabilities, fitted on held-out validation logits only.

Design. Every calibrator is a ``Technique`` that acts in two hooks:

- ``prepare_model`` runs before any training and fails fast (``ConfigError``) when there is nothing to fit
  on: the run has no validation split (``dataset.val_size=0``) or is not a classification task.
- ``finalize`` runs after training. The loop provides ``ctx.extras["predict"]``, a callable
  ``predict(split) -> (logits, labels)`` evaluating the final model on a split. The calibrator fits on
  ``ctx.data.val`` (carved from the training set, so fitting on test is impossible by construction),
  applies the map to ``ctx.data.test`` and returns ``{"metrics": {test_<metric>_after: ...}, "params":
  {...fitted parameters...}, "reliability": {"before": bins, "after": bins}}``. The loop merges the metrics
  into ``record["metrics"]`` (the "before" values ``test_<metric>`` come from ``harness.metrics.calibration``
  for every classification run) and the params into ``record["techniques"][<name>]["params"]``. Test
  logits before and after are saved to ``<run_dir>/calibration_logits.pt`` for
  ``harness plot reliability RUN_DIR``.

Calibrators work on (N, C) float32 tensors on the run's device and output calibrated *logits* (log-
probabilities for the non-parametric ones), so every metric is computed the same way before and after.
Train-time techniques that also improve calibration (label smoothing, PS-KD, focal, mixup, squentropy)
live in the ``regularization=`` group (``harness.techniques.regularization``), so a run can combine one of each.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.build import NO_CHOICE, instantiate, spec_of, split
from harness.config import list_choices
from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.metrics.calibration import calibration_metrics, reliability_bins
from harness.registry import unknown_choice_message

LOGITS_FILE = "calibration_logits.pt"


def _lbfgs(params: list[Tensor], closure_loss, max_iter: int) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


def final_logits(ctx: RunContext) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(validation logits, labels) and (test logits, labels) of the trained model, float32."""
    if "predict" not in ctx.extras:
        raise RuntimeError(
            "post-hoc calibration needs the loop to set ctx.extras['predict'](split) -> (logits, labels)"
        )
    predict = ctx.extras["predict"]
    val_logits, val_labels = predict(ctx.data.val)
    test_logits, test_labels = predict(ctx.data.test)
    return (val_logits.float(), val_labels), (test_logits.float(), test_labels)


def save_logits(ctx: RunContext, test: tuple[Tensor, Tensor], calibrated: dict[str, Tensor], selected: str) -> None:
    """Test logits before and after (the selected calibrator's in ``calibrated``, every one's in
    ``by_method``) for ``harness plot reliability RUN_DIR``."""
    if not ctx.run_dir:
        return
    torch.save(
        {
            "logits": test[0].cpu(),
            "calibrated": calibrated[selected].float().cpu(),
            "labels": test[1].cpu(),
            "method": selected,
            "by_method": {k: v.float().cpu() for k, v in calibrated.items()},
        },
        Path(ctx.run_dir) / LOGITS_FILE,
    )


class PostHocCalibrator(Technique):
    """Shared hooks; subclasses implement ``fit(logits, labels)``, ``transform(logits)`` and ``params()``."""

    def __init__(self, **hyperparams: Any):
        self.fit_samples = 0
        if hyperparams:
            valid = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "hyperparams")]
            raise ConfigError(
                f"calibration={self.name} got unknown hyper-parameters {sorted(hyperparams)}; valid: {', '.join(valid)}"
            )

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        data = ctx.data
        if data is not None and data.task != "classification":
            raise ConfigError(f"calibration={self.name} applies to classification only, not task {data.task!r}")
        if data is not None and data.val is None:
            raise ConfigError(
                f"calibration={self.name} needs dataset.val_size > 0 (a validation split carved from train to fit on)"
            )
        return model

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def transform(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        val, test = final_logits(ctx)
        calibrated, after = self.fit_and_evaluate(val, test)
        metrics = {f"{k}_after": v for k, v in after.items()}
        save_logits(ctx, test, {self.name: calibrated}, self.name)
        reliability = {
            "before": reliability_bins(test[0].softmax(-1), test[1]),
            "after": reliability_bins(calibrated.float().softmax(-1), test[1]),
        }
        return {"metrics": metrics, "params": self.params(), "reliability": reliability}

    def fit_and_evaluate(self, val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
        """Fit on the validation (logits, labels); return the calibrated test logits and the metrics after
        calibration (``test_<metric>`` on test, plus ``val_nll``: the fitted map's validation NLL)."""
        with torch.enable_grad():  # fitting needs autograd even if the caller runs under no_grad
            self.fit(val[0], val[1])
        self.fit_samples = len(val[1])
        with torch.no_grad():
            calibrated = self.transform(test[0])
            val_after = calibration_metrics(self.transform(val[0]), val[1], prefix="val_")
        after = calibration_metrics(calibrated, test[1], prefix="test_")
        after["val_nll"] = val_after["val_nll"]
        return calibrated, after

    def summary(self) -> dict[str, Any]:
        # the fitted parameters reach the record through finalize's "params"
        return {"fit_split": "val", "fit_samples": self.fit_samples}


class TemperatureScaling(PostHocCalibrator):
    """softmax(z / T) with one scalar T > 0 minimising validation NLL (LBFGS on log T, so T stays positive).
    Dividing by T > 0 keeps the argmax, hence accuracy, unchanged. Guo et al. 2017."""

    name = "temperature"

    def __init__(self, max_iter: int = 200, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.max_iter = int(max_iter)
        self.log_t = torch.zeros(())

    @property
    def temperature(self) -> float:
        return float(self.log_t.exp())

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        log_t = torch.zeros((), device=logits.device, requires_grad=True)
        _lbfgs([log_t], lambda: F.cross_entropy(logits / log_t.exp(), labels), self.max_iter)
        self.log_t = log_t.detach()

    def transform(self, logits: Tensor) -> Tensor:
        return logits / self.log_t.to(logits.device).exp()

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class VectorScaling(PostHocCalibrator):
    """z * w + b with per-class scale w and bias b (initialised to identity) minimising validation NLL.
    Guo et al. 2017, section 4.2. Unlike temperature scaling it may change the argmax."""

    name = "vector"

    def __init__(self, max_iter: int = 500, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.max_iter = int(max_iter)
        self.w: Tensor | None = None
        self.b: Tensor | None = None

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        c = logits.shape[-1]
        w = torch.ones(c, device=logits.device, requires_grad=True)
        b = torch.zeros(c, device=logits.device, requires_grad=True)
        _lbfgs([w, b], lambda: F.cross_entropy(logits * w + b, labels), self.max_iter)
        self.w, self.b = w.detach(), b.detach()

    def transform(self, logits: Tensor) -> Tensor:
        return logits * self.w.to(logits.device) + self.b.to(logits.device)

    def params(self) -> dict[str, Any]:
        return {"scale": self.w.tolist(), "bias": self.b.tolist()}


class MatrixScaling(PostHocCalibrator):
    """z W^T + b with a full (C, C) matrix W (initialised to I) and bias b.

    Plain matrix scaling (Guo et al. 2017) overfits with many classes (C^2 parameters); Kull et al. 2019
    regularise the off-diagonal entries and the intercept (ODIR):
        loss = NLL + off_diagonal / (C (C - 1)) * sum_{i != j} W_ij^2 + bias / C * sum_j b_j^2,
    and, as they do, choose the weights by cross-validation on the calibration set: ``null`` (the default)
    picks the value from ``grid`` with the lowest held-out NLL over ``folds`` folds of the validation split
    (tied off_diagonal = bias when both are null); the search goes from the strongest value down and stops
    once the held-out NLL has risen twice in a row. Set both to 0 for Guo et al.'s unregularised version."""

    name = "matrix"
    GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)

    def __init__(
        self,
        off_diagonal: float | None = None,
        bias: float | None = None,
        grid: list[float] | tuple[float, ...] = GRID,
        folds: int = 3,
        max_iter: int = 500,
        **hyperparams: Any,
    ):
        super().__init__(**hyperparams)
        for key, v in (("off_diagonal", off_diagonal), ("bias", bias)):
            if v is not None and float(v) < 0:
                raise ConfigError(f"calibration=matrix: {key}={v} must be >= 0 or null (chosen by cross-validation)")
        if not grid or min(grid) < 0 or int(folds) < 2:
            raise ConfigError(
                f"calibration=matrix needs a non-empty grid of values >= 0 and folds >= 2, got {grid}, {folds}"
            )
        self.off_diagonal = None if off_diagonal is None else float(off_diagonal)
        self.bias = None if bias is None else float(bias)
        self.grid, self.folds, self.max_iter = [float(v) for v in grid], int(folds), int(max_iter)
        self.cv_nll: dict[float, float] = {}
        self.W: Tensor | None = None
        self.b: Tensor | None = None

    def _weights(self, value: float) -> tuple[float, float]:
        return (
            value if self.off_diagonal is None else self.off_diagonal,
            value if self.bias is None else self.bias,
        )

    def _fit(self, logits: Tensor, labels: Tensor, lam: float, mu: float) -> tuple[Tensor, Tensor]:
        c = logits.shape[-1]
        W = torch.eye(c, device=logits.device).requires_grad_(True)
        b = torch.zeros(c, device=logits.device, requires_grad=True)
        off = 1.0 - torch.eye(c, device=logits.device)

        def loss():
            reg = lam * ((W * off) ** 2).sum() / max(c * (c - 1), 1) + mu * (b**2).sum() / c
            return F.cross_entropy(logits @ W.T + b, labels) + reg

        _lbfgs([W, b], loss, self.max_iter)
        return W.detach(), b.detach()

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        if self.off_diagonal is None or self.bias is None:
            g = torch.Generator().manual_seed(0)
            folds = torch.randperm(len(labels), generator=g).to(logits.device).chunk(self.folds)
            worse = 0
            for value in sorted(self.grid, reverse=True):  # strongest first: those fits converge fastest
                lam, mu = self._weights(value)
                nll = 0.0
                for k, held in enumerate(folds):
                    fit_idx = torch.cat([f for j, f in enumerate(folds) if j != k])
                    W, b = self._fit(logits[fit_idx], labels[fit_idx], lam, mu)
                    nll += float(F.cross_entropy(logits[held] @ W.T + b, labels[held], reduction="sum"))
                worse = worse + 1 if self.cv_nll and nll / len(labels) > min(self.cv_nll.values()) else 0
                self.cv_nll[value] = nll / len(labels)
                if worse == 2:  # held-out NLL rose twice in a row: weaker regularisation only overfits more
                    break
            best = min(self.cv_nll, key=self.cv_nll.get)
            self.off_diagonal, self.bias = self._weights(best)
        self.W, self.b = self._fit(logits, labels, self.off_diagonal, self.bias)

    def transform(self, logits: Tensor) -> Tensor:
        return logits @ self.W.to(logits.device).T + self.b.to(logits.device)

    def params(self) -> dict[str, Any]:
        off = self.W - torch.diag(torch.diagonal(self.W))
        return {
            "off_diagonal": self.off_diagonal,
            "bias_reg": self.bias,
            "cv_nll": {str(k): v for k, v in self.cv_nll.items()},
            "diag_mean": float(torch.diagonal(self.W).mean()),
            "offdiag_abs_mean": float(off.abs().sum() / max(off.numel() - len(off), 1)),
            "bias_abs_mean": float(self.b.abs().mean()),
        }


def _renormalise(p: Tensor, eps: float) -> Tensor:
    """One-vs-rest calibrated class probabilities -> a distribution; eps keeps NLL finite when a binning
    map sends the true class to 0 (rows that are all zero become uniform)."""
    p = p.clamp(min=eps)
    return (p / p.sum(-1, keepdim=True)).log()


class IsotonicCalibration(PostHocCalibrator):
    """A non-decreasing piecewise-constant map per class (scikit-learn ``IsotonicRegression``) from p_k to
    P(y = k), fitted one-vs-rest on validation softmax outputs and renormalised at test time, the multiclass
    extension Guo et al. 2017 evaluate. Fitting runs on the CPU once, after training."""

    name = "isotonic"

    def __init__(self, eps: float = 1e-6, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.eps = float(eps)
        self.maps: list = []

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        from sklearn.isotonic import IsotonicRegression

        p = logits.softmax(-1).double().cpu().numpy()
        y = labels.cpu().numpy()
        self.maps = [
            IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p[:, k], (y == k).astype(float))
            for k in range(p.shape[1])
        ]

    def transform(self, logits: Tensor) -> Tensor:
        p = logits.softmax(-1).double().cpu().numpy()
        q = torch.stack([torch.from_numpy(m.predict(p[:, k])) for k, m in enumerate(self.maps)], dim=1)
        return _renormalise(q.float().to(logits.device), self.eps)

    def params(self) -> dict[str, Any]:
        return {
            "classes": len(self.maps),
            "mean_thresholds": sum(len(m.X_thresholds_) for m in self.maps) / max(len(self.maps), 1),
        }


class HistogramBinning(PostHocCalibrator):
    """Equal-width bins over p_k per class; each bin predicts the validation frequency of class k among the
    samples that fell in it (an empty bin keeps its centre). One-vs-rest, renormalised (Guo et al. 2017).
    Runs on the device."""

    name = "histogram"

    def __init__(self, n_bins: int = 15, eps: float = 1e-6, **hyperparams: Any):
        super().__init__(**hyperparams)
        if int(n_bins) < 1:
            raise ConfigError(f"calibration=histogram needs n_bins >= 1, got {n_bins}")
        self.n_bins, self.eps = int(n_bins), float(eps)
        self.theta: Tensor | None = None  # (C, n_bins) calibrated probability per class and bin

    def _bin(self, p: Tensor) -> Tensor:
        return (p * self.n_bins).long().clamp_(0, self.n_bins - 1)

    def fit(self, logits: Tensor, labels: Tensor) -> None:
        p = logits.softmax(-1)
        n, c = p.shape
        flat = (self._bin(p) + torch.arange(c, device=p.device) * self.n_bins).reshape(-1)
        hit = F.one_hot(labels, c).float().reshape(-1)
        count = torch.zeros(c * self.n_bins, device=p.device).index_add_(0, flat, torch.ones_like(hit))
        pos = torch.zeros_like(count).index_add_(0, flat, hit)
        centre = ((torch.arange(self.n_bins, device=p.device) + 0.5) / self.n_bins).repeat(c)
        self.theta = torch.where(count > 0, pos / count.clamp(min=1), centre).view(c, self.n_bins)

    def transform(self, logits: Tensor) -> Tensor:
        p = logits.softmax(-1)
        theta = self.theta.to(p.device)
        q = theta.gather(1, self._bin(p).T).T  # theta[k, bin(p[:, k])]
        return _renormalise(q, self.eps)

    def params(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "classes": int(self.theta.shape[0])}


class Calibrators(Technique):
    """Several post-hoc calibrators fitted on one trained model (``calibration=[temperature,vector,isotonic]``,
    i.e. ``calibration=compare calibration.methods=[...]``): the validation and test logits are computed once,
    each method (built from its own ``conf/calibration/<method>.yaml``, search path included) is fitted on
    validation only and evaluated on test. The record gets ``test_<metric>_after_<method>`` and
    ``val_nll_after_<method>`` for each, and the plain ``test_<metric>_after`` of the method with the lowest
    validation NLL (chosen on validation, never on test), named in ``techniques.calibration.selected``."""

    name = "compare"

    def __init__(self, methods: list[str]):
        names = [str(m) for m in methods or []]
        if not names or len(set(names)) != len(names):
            raise ConfigError(
                f"calibration.methods={names} must name one or more distinct post-hoc calibrators, "
                "e.g. calibration=[temperature,vector,isotonic]"
            )
        self.methods: dict[str, PostHocCalibrator] = {}
        valid = [c for c in list_choices("calibration") if c not in (*NO_CHOICE, self.name)]
        for name in names:
            if name not in valid:
                raise ConfigError(unknown_choice_message("calibrator in calibration.methods", name, valid))
            meta, params = split("calibration", spec_of("calibration", {"name": name}))
            calibrator = instantiate("calibration", params, name)
            if not isinstance(calibrator, PostHocCalibrator):
                raise ConfigError(f"calibration={name} is not a post-hoc calibrator ({type(calibrator).__name__})")
            self.methods[name] = calibrator
        self.selected: str | None = None
        self.fit_samples = 0

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        for calibrator in self.methods.values():
            model = calibrator.prepare_model(model, ctx)
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        val, test = final_logits(ctx)
        metrics: dict[str, float] = {}
        calibrated: dict[str, Tensor] = {}
        afters: dict[str, dict[str, float]] = {}
        for name, calibrator in self.methods.items():
            calibrated[name], afters[name] = calibrator.fit_and_evaluate(val, test)
            metrics.update({f"{k}_after_{name}": v for k, v in afters[name].items()})
        self.selected = min(afters, key=lambda n: afters[n]["val_nll"])  # selection reads validation only
        self.fit_samples = len(val[1])
        metrics.update({f"{k}_after": v for k, v in afters[self.selected].items()})
        save_logits(ctx, test, calibrated, self.selected)
        reliability = {
            "before": reliability_bins(test[0].softmax(-1), test[1]),
            "after": reliability_bins(calibrated[self.selected].float().softmax(-1), test[1]),
            "after_by_method": {n: reliability_bins(c.float().softmax(-1), test[1]) for n, c in calibrated.items()},
        }
        params = {name: c.params() for name, c in self.methods.items()}
        return {"metrics": metrics, "params": params, "reliability": reliability}

    def summary(self) -> dict[str, Any]:
        return {
            "fit_split": "val",
            "fit_samples": self.fit_samples,
            "methods": list(self.methods),
            "selected": self.selected,
            "selected_by": "val_nll",
        }
