"""Train-time targets and losses: label smoothing, PS-KD, focal, squentropy, mixup, cutmix."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.hooks import Batch, RunContext, soft_cross_entropy
from harness.techniques.registry import build_techniques
from harness.techniques.regularization import PSKD, CutMix, FocalLoss, LabelSmoothing, Mixup, Squentropy

CONF = Path(__file__).resolve().parents[1] / "conf"
C = 5


def make_ctx(n_train=40, seed=0, epoch=0, epochs=10, task="classification", input_shape=(3, 8, 8)):
    data = SimpleNamespace(task=task, train=range(n_train), num_classes=C, input_shape=input_shape)
    return RunContext(
        cfg=OmegaConf.create({"seed": seed}), device=torch.device("cpu"), data=data, epoch=epoch, epochs=epochs
    )


def make_batch(n=8, seed=0, index=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return Batch(x=x, y=y, index=torch.arange(n) if index is None else index), torch.randn(n, C, generator=g)


@pytest.mark.parametrize("choice", ["label_smoothing", "pskd", "focal", "mixup", "cutmix", "squentropy"])
def test_every_yaml_builds_its_technique(choice):
    cfg = OmegaConf.create({"regularization": OmegaConf.load(CONF / "regularization" / f"{choice}.yaml")})
    (tech,) = build_techniques(cfg)
    assert tech.name == choice


def test_bad_hyperparameters_name_the_value_and_valid_choices():
    with pytest.raises(ConfigError, match="alpha_T=1.5"):
        PSKD(alpha_T=1.5)
    with pytest.raises(ConfigError, match=r"\['eps'\].*valid: epsilon"):
        build_techniques(OmegaConf.create({"regularization": {"name": "label_smoothing", "eps": 0.1}}))
    with pytest.raises(ConfigError, match="classification only"):
        PSKD().prepare_model(torch.nn.Identity(), make_ctx(task="lm"))
    with pytest.raises(ConfigError, match="images"):
        Mixup().prepare_model(torch.nn.Identity(), make_ctx(input_shape=(64,)))


def test_label_smoothing_matches_the_formula_and_smooths_soft_targets():
    batch, logits = make_batch()
    ls = LabelSmoothing(epsilon=0.1)
    target = F.one_hot(batch.y, C).float() * 0.9 + 0.1 / C
    manual = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert ls.loss(logits, batch, make_ctx()) == pytest.approx(manual.item(), rel=1e-6)
    soft = torch.softmax(torch.randn(8, C), -1)
    batch.soft_targets = soft
    manual = -((soft * 0.9 + 0.1 / C) * logits.log_softmax(-1)).sum(-1).mean()
    assert ls.loss(logits, batch, make_ctx()) == pytest.approx(manual.item(), rel=1e-6)
    # language-model shaped logits (batch, time, vocab)
    lm = Batch(x=torch.zeros(2, 3), y=torch.randint(0, C, (2, 3)))
    z = torch.randn(2, 3, C)
    assert ls.loss(z, lm, make_ctx()) == pytest.approx(
        F.cross_entropy(z.view(-1, C), lm.y.view(-1), label_smoothing=0.1).item()
    )


def test_pskd_targets_mix_one_hot_with_previous_epoch_predictions():
    n = 16
    pskd = PSKD(alpha_T=0.8)
    ctx = make_ctx(n_train=n, epochs=5)
    pskd.prepare_model(torch.nn.Identity(), ctx)
    # epoch 0: plain cross-entropy, predictions recorded at batch.index
    batch, logits0 = make_batch(n=n, index=torch.randperm(n))
    assert pskd.loss(logits0, batch, ctx) == pytest.approx(F.cross_entropy(logits0, batch.y).item(), rel=1e-6)
    stored = torch.zeros(n, C)
    stored[batch.index] = logits0.softmax(-1)
    assert torch.allclose(pskd.predictions, stored)
    # epoch t = 2 (0-based): alpha = 0.8 * 3 / 5, targets from epoch-1 predictions of the same samples
    ctx.epoch = 2
    batch2, logits2 = make_batch(n=6, seed=1, index=torch.tensor([3, 0, 9, 15, 7, 1]))
    alpha = 0.8 * 3 / 5
    expected = (1 - alpha) * F.one_hot(batch2.y, C).float() + alpha * stored[batch2.index]
    assert torch.allclose(pskd.targets(batch2, C, ctx), expected)
    loss = pskd.loss(logits2, batch2, ctx)
    assert loss == pytest.approx(-(expected * logits2.log_softmax(-1)).sum(-1).mean().item(), rel=1e-6)
    assert pskd.last_alpha == pytest.approx(alpha)
    # the buffer now holds this epoch's predictions for those samples, and resume restores it exactly
    assert torch.allclose(pskd.predictions[batch2.index], logits2.softmax(-1))
    restored = PSKD(alpha_T=0.8)
    restored.prepare_model(torch.nn.Identity(), ctx)
    restored.load_state_dict(pskd.state_dict())
    ctx.epoch = 4
    assert torch.equal(restored.targets(batch2, C, ctx), pskd.targets(batch2, C, ctx))
    assert restored.last_alpha == pytest.approx(0.8)  # the last epoch uses alpha_T


def test_pskd_falls_back_to_one_hot_for_samples_without_a_prediction():
    pskd = PSKD()
    ctx = make_ctx(n_train=10, epoch=3, epochs=4)
    pskd.prepare_model(torch.nn.Identity(), ctx)
    batch, logits = make_batch(n=4, index=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(pskd.targets(batch, C, ctx), F.one_hot(batch.y, C).float())


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_downweights_easy_samples():
    batch, logits = make_batch()
    ctx = make_ctx()
    assert FocalLoss(gamma=0).loss(logits, batch, ctx) == pytest.approx(
        F.cross_entropy(logits, batch.y).item(), rel=1e-6
    )
    p = logits.softmax(-1).gather(1, batch.y[:, None]).squeeze(1)
    manual = -((1 - p) ** 2 * p.log()).mean()
    assert FocalLoss(gamma=2).loss(logits, batch, ctx) == pytest.approx(manual.item(), rel=1e-5)
    gamma = torch.where(p < 0.2, 5.0, 3.0)
    adaptive = -((1 - p) ** gamma * p.log()).mean()
    assert FocalLoss(adaptive=True).loss(logits, batch, ctx) == pytest.approx(adaptive.item(), rel=1e-5)
    # one-hot soft targets give the hard-label value
    soft = Batch(x=batch.x, y=batch.y, soft_targets=F.one_hot(batch.y, C).float())
    assert FocalLoss(gamma=2).loss(logits, soft, ctx) == pytest.approx(manual.item(), rel=1e-5)


def test_squentropy_is_cross_entropy_plus_mean_square_of_wrong_logits():
    batch, logits = make_batch()
    ctx = make_ctx()
    wrong = 1 - F.one_hot(batch.y, C).float()
    manual = F.cross_entropy(logits, batch.y) + ((logits**2) * wrong).sum(-1).mean() / (C - 1)
    assert Squentropy().loss(logits, batch, ctx) == pytest.approx(manual.item(), rel=1e-6)
    soft = Batch(x=batch.x, y=batch.y, soft_targets=F.one_hot(batch.y, C).float())
    assert Squentropy().loss(logits, soft, ctx) == pytest.approx(manual.item(), rel=1e-6)


def test_mixup_is_a_convex_combination_with_the_sampled_lambda_and_is_seeded():
    batch, _ = make_batch()
    ctx = make_ctx(seed=3)
    mixup = Mixup(alpha=1.0)
    mixup.prepare_model(torch.nn.Identity(), ctx)
    out = mixup.prepare_batch(batch, ctx)
    lam, perm = mixup.last_lam, mixup.last_perm
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(out.x, lam * batch.x + (1 - lam) * batch.x[perm])
    onehot = F.one_hot(batch.y, C).float()
    assert torch.allclose(out.soft_targets, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(out.soft_targets.sum(-1), torch.ones(8))
    assert torch.equal(out.y, batch.y) and batch.soft_targets is None  # the input batch is not modified
    # the default loss trains against the mixed targets
    logits = torch.randn(8, C)
    assert soft_cross_entropy(logits, out) == pytest.approx(
        (
            lam * F.cross_entropy(logits, batch.y, reduction="none")
            + (1 - lam) * F.cross_entropy(logits, batch.y[perm], reduction="none")
        )
        .mean()
        .item(),
        rel=1e-5,
    )
    # same seed -> same lambdas; different seed -> different; state_dict resumes the stream
    lams = lambda m, c, k: [m.prepare_batch(batch, c) and m.last_lam for _ in range(k)]  # noqa: E731
    a, b, other = Mixup(), Mixup(), Mixup()
    a.prepare_model(None, make_ctx(seed=1))
    b.prepare_model(None, make_ctx(seed=1))
    other.prepare_model(None, make_ctx(seed=2))
    first = lams(a, ctx, 3)
    assert first == lams(b, ctx, 3) and first != lams(other, ctx, 3)
    resumed = Mixup()
    resumed.load_state_dict(a.state_dict())
    assert lams(resumed, ctx, 3) == lams(a, ctx, 3)


def test_cutmix_pastes_a_box_and_mixes_targets_by_its_area():
    batch, _ = make_batch(n=6)
    ctx = make_ctx(seed=0)
    cutmix = CutMix(alpha=1.0)
    cutmix.prepare_model(torch.nn.Identity(), ctx)
    for _ in range(5):
        out = cutmix.prepare_batch(batch, ctx)
        lam, perm = cutmix.last_lam, cutmix.last_perm
        from_other = (out.x == batch.x[perm]).all(1) & (out.x != batch.x).any(1)  # (N, H, W) pasted pixels
        from_self = (out.x == batch.x).all(1)
        assert (from_other | from_self).all()
        pasted = from_other.float().mean((1, 2))
        moved = perm != torch.arange(6)
        assert torch.allclose(pasted[moved], torch.full_like(pasted[moved], 1 - lam))
        onehot = F.one_hot(batch.y, C).float()
        assert torch.allclose(out.soft_targets, lam * onehot + (1 - lam) * onehot[perm])


def test_mixing_probability_zero_leaves_the_batch_alone():
    batch, _ = make_batch()
    ctx = make_ctx()
    mix = Mixup(prob=0.0)
    mix.prepare_model(None, ctx)
    out = mix.prepare_batch(batch, ctx)
    assert out is batch and mix.summary()["applied_fraction"] == 0
