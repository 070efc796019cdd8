"""Losses: hand-computed values on tiny tensors, partial labels, stability, autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.labels import DEFAULT_CLASS_WEIGHTS
from utils.losses import (
    DiceCELoss,
    SoftDiceLoss,
    WeightedCELoss,
    boundary_weight,
    build_loss,
    exclusion_term,
)


def _pixels(*columns):
    """Logits (1, C, 1, N) from N per-pixel tuples of C logits."""
    return torch.tensor(columns, dtype=torch.float64).T[None, :, None, :]  # (N, C) -> (1, C, 1, N)


def _random_batch(seed=0, batch=2, classes=4, height=5, width=6, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, height, width, generator=generator, dtype=dtype) * 3
    target = torch.randint(0, classes, (batch, height, width), generator=generator)
    distance = torch.rand(batch, height, width, generator=generator, dtype=dtype) * 6
    return logits, target, distance


def test_boundary_weight_values():
    distance = torch.tensor([[[0.0, 3.0, 6.0]]])
    expected = torch.tensor([[[1.0, math.exp(-0.5), math.exp(-2.0)]]])  # exp(-d^2 / 18)
    torch.testing.assert_close(boundary_weight(distance, sigma=3.0), expected)


def test_weighted_ce_hand_computed():
    # Two classes, weights (0.5, 2.0); pixel a: logits (1, 0), label 0; pixel b: (0, 2), label 1.
    logits = _pixels((1.0, 0.0), (0.0, 2.0))
    target = torch.tensor([[[0, 1]]])
    distance = torch.tensor([[[0.0, 3.0]]], dtype=torch.float64)
    nll_a = math.log(1 + math.exp(-1))  # 0.313262
    nll_b = math.log(1 + math.exp(-2))  # 0.126928
    cross_entropy = (0.5 * nll_a + 2.0 * nll_b) / 2.5  # 0.164195
    boundary = (1.0 * nll_a + math.exp(-0.5) * nll_b) / 2  # 0.195124: mean over both pixels
    loss_fn = WeightedCELoss(2, class_weights=(0.5, 2.0), sigma=3.0, alpha=10.0)
    loss = loss_fn(logits, target, distance)
    assert loss.item() == pytest.approx(cross_entropy + 10 * boundary, rel=1e-12)  # 2.115432
    assert loss.item() == pytest.approx(2.1154318, abs=1e-7)


def test_boundary_term_is_unweighted_mean_of_nll():
    logits, target, distance = _random_batch()
    plain = WeightedCELoss(4, class_weights=None, alpha=0.0)(logits, target, distance)
    with_boundary = WeightedCELoss(4, class_weights=None, sigma=2.0, alpha=1.0)(
        logits, target, distance)
    nll = F.cross_entropy(logits, target, reduction="none")
    expected = (torch.exp(-distance**2 / 8.0) * nll).mean()
    torch.testing.assert_close(with_boundary - plain, expected)


def test_alpha_zero_equals_torch_cross_entropy():
    logits, target, distance = _random_batch(classes=12)
    weights = torch.tensor(DEFAULT_CLASS_WEIGHTS, dtype=torch.float64)
    loss = WeightedCELoss(12, alpha=0.0)(logits, target, distance)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, weight=weights))
    assert WeightedCELoss(12, alpha=0.0)(logits, target, None).shape == ()  # distance optional


def test_perfect_prediction_gives_zero_loss():
    _, target, distance = _random_batch(classes=12)
    onehot = F.one_hot(target, 12).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    logits = 50.0 * onehot.double()
    for name in ("weighted_ce", "dice", "dice_ce"):
        assert build_loss(name, 12)(logits, target, distance, None).item() < 1e-6


def test_marginal_with_everything_annotated_equals_ordinary_loss():
    logits, target, distance = _random_batch(classes=5)
    annotated = torch.ones(2, 5, dtype=torch.bool)
    ordinary = WeightedCELoss(5, class_weights=None, alpha=2.0)(logits, target, distance)
    marginal = WeightedCELoss(5, class_weights=None, alpha=2.0, marginal=True)
    assert torch.equal(marginal(logits, target, distance, annotated), ordinary)
    assert torch.equal(marginal(logits, target, distance, None), ordinary)


def test_marginal_hand_computed():
    # Three classes, class 2 not annotated. Pixel a: label 0, logits (0.5, -1, 2) -> -log(p0 + p2);
    # pixel b: label 1, logits (0, 1, 0.5) -> -log p1. Class weights (0.3, 2, 1), no boundary term.
    logits = _pixels((0.5, -1.0, 2.0), (0.0, 1.0, 0.5))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    e = math.exp
    nll_a = -math.log((e(0.5) + e(2.0)) / (e(0.5) + e(-1.0) + e(2.0)))
    nll_b = -math.log(math.exp(1.0) / (1 + math.exp(1.0) + math.exp(0.5)))
    expected = (0.3 * nll_a + 2.0 * nll_b) / 2.3
    loss_fn = WeightedCELoss(3, class_weights=(0.3, 2.0, 1.0), alpha=0.0, marginal=True)
    assert loss_fn(logits, target, None, annotated).item() == pytest.approx(expected, rel=1e-12)


def test_marginal_and_exclusion_are_stable_for_huge_logits():
    logits, target, distance = _random_batch(classes=4, dtype=torch.float32)
    logits = (torch.sign(logits) * 1e4).requires_grad_()
    annotated = torch.tensor([[True, True, False, False], [True, False, True, True]])
    loss_fn = WeightedCELoss(4, class_weights=None, marginal=True, exclusion_weight=1.0)
    loss = loss_fn(logits, target, distance, annotated)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_exclusion_hand_computed():
    # Same pixels as the marginal case. Only pixel b (label 1, annotated) counts:
    # -log(1 - p2) with p2 = e^0.5 / (1 + e + e^0.5).
    logits = _pixels((0.5, -1.0, 2.0), (0.0, 1.0, 0.5))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    term = -math.log((1 + math.exp(1.0)) / (1 + math.exp(1.0) + math.exp(0.5)))
    assert exclusion_term(logits, target, annotated).item() == pytest.approx(term, rel=1e-12)
    plain = WeightedCELoss(3, class_weights=None, alpha=0.0)(logits, target, None, annotated)
    with_exclusion = WeightedCELoss(3, class_weights=None, alpha=0.0, exclusion_weight=0.7)
    assert with_exclusion(logits, target, None, annotated).item() == pytest.approx(
        plain.item() + 0.7 * term, rel=1e-12)


def test_exclusion_ignores_fully_annotated_items_and_is_zero_without_pixels():
    logits = torch.cat([_pixels((0.5, -1.0, 2.0), (0.0, 1.0, 0.5))] * 2)  # two identical items
    target = torch.tensor([[[0, 1]], [[0, 1]]])
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    term = -math.log((1 + math.exp(1.0)) / (1 + math.exp(1.0) + math.exp(0.5)))
    assert exclusion_term(logits, target, annotated).item() == pytest.approx(term, rel=1e-12)
    background_only = torch.zeros_like(target)
    assert exclusion_term(logits, background_only, annotated).item() == 0.0


def test_soft_dice_hand_computed():
    # Two classes, background not scored; labels (0, 1);
    # p1 = sigmoid(x1 - x0) = (sigmoid(-1), sigmoid(2)).
    logits = _pixels((1.0, 0.0), (0.0, 2.0))
    target = torch.tensor([[[0, 1]]])
    p_a, p_b = 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-2.0))
    dice = (2 * p_b + 1e-5) / (p_a + p_b + 1 + 1e-5)
    loss = SoftDiceLoss(2)(logits, target)
    assert loss.item() == pytest.approx(1 - dice, rel=1e-10)


def test_soft_dice_skips_classes_absent_from_ground_truth():
    # Class 2 is absent from the labels, so its predicted mass does not enter Dice.
    logits = _pixels((0.0, 3.0, 1.0), (0.0, 0.0, 2.0))
    target = torch.tensor([[[1, 0]]])
    probs = torch.softmax(logits, dim=1)[0, :, 0]  # (C, N)
    dice_1 = (2 * probs[1, 0] + 1e-5) / (probs[1].sum() + 1 + 1e-5)
    assert SoftDiceLoss(3)(logits, target).item() == pytest.approx(1 - dice_1.item(), rel=1e-10)


def test_soft_dice_all_empty_and_perfect():
    logits = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(2, 5, 5, dtype=torch.long)
    loss = SoftDiceLoss(4)(logits, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    perfect = 50.0 * F.one_hot(empty, 4).permute(0, 3, 1, 2).double()
    assert SoftDiceLoss(4, include_background=True)(perfect, empty).item() < 1e-6


def test_soft_dice_marginal_hand_computed():
    # Class 2 not annotated: its probability joins background, and it is not scored.
    logits = _pixels((0.5, -1.0, 2.0), (0.0, 1.0, 0.5))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    p = torch.softmax(logits, dim=1)[0, :, 0].tolist()  # (C, N)
    background = [p[0][0] + p[2][0], p[0][1] + p[2][1]]
    dice_0 = (2 * background[0] + 1e-5) / (sum(background) + 1 + 1e-5)
    dice_1 = (2 * p[1][1] + 1e-5) / (sum(p[1]) + 1 + 1e-5)
    loss = SoftDiceLoss(3, include_background=True, marginal=True)(logits, target, None, annotated)
    assert loss.item() == pytest.approx(1 - (dice_0 + dice_1) / 2, rel=1e-10)


def test_dice_ce_is_the_sum():
    logits, target, distance = _random_batch(classes=12)
    annotated = torch.rand(2, 12) > 0.3
    kwargs = dict(num_classes=12, sigma=2.0, alpha=3.0, marginal=True, exclusion_weight=0.5)
    total = DiceCELoss(**kwargs, dice_weight=0.4)(logits, target, distance, annotated)
    parts = (WeightedCELoss(**kwargs)(logits, target, distance, annotated)
             + 0.4 * SoftDiceLoss(12, marginal=True)(logits, target, distance, annotated))
    torch.testing.assert_close(total, parts)


@pytest.mark.parametrize("name", ["weighted_ce", "dice", "dice_ce"])
def test_losses_under_bfloat16_autocast_return_float32(name):
    logits, target, distance = _random_batch(classes=12, dtype=torch.float32)
    logits = logits.bfloat16().requires_grad_()
    loss_fn = build_loss(name, 12, marginal=True, exclusion_weight=0.1)
    annotated = torch.ones(2, 12, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(logits, target, distance, annotated)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()
    reference = loss_fn(logits.detach().float(), target, distance, annotated)
    torch.testing.assert_close(loss.detach(), reference)


def test_bad_inputs_raise():
    logits, target, distance = _random_batch(classes=3)
    loss_fn = WeightedCELoss(3, class_weights=None)
    with pytest.raises(ValueError, match="target"):
        loss_fn(logits, target[:, :-1], distance)
    with pytest.raises(ValueError, match="logits"):
        loss_fn(logits[:, :2], target, distance)
    with pytest.raises(ValueError, match="distance"):
        loss_fn(logits, target, None)
    with pytest.raises(ValueError, match="integer"):
        loss_fn(logits, target.double(), distance)
    with pytest.raises(ValueError, match="annotated"):
        loss_fn(logits, target, distance, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="class_weights"):
        WeightedCELoss(3)  # the 12 default weights do not fit 3 classes
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")
