"""Losses: hand-computed values on tiny tensors, partial labels, stability, autocast."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.labels import DEFAULT_CLASS_WEIGHTS, get_source, label_sets_from_annotated
from utils.losses import (
    DiceCELoss,
    SoftDiceLoss,
    WeightedCELoss,
    boundary_weight,
    build_loss,
    exclusion_term,
)
from utils.partial_labels import (
    exclusion_cross_entropy,
    exclusion_dice,
    exclusion_masks,
    log_one_minus_softmax,
    scored_rows,
    set_probabilities,
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
    kwargs = {"num_classes": 12, "sigma": 2.0, "alpha": 3.0, "marginal": True, "exclusion_weight": 0.5}
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
    with pytest.raises(ValueError, match="label_sets"):
        loss_fn(logits, target, distance, torch.ones(2, 2, 3, dtype=torch.bool))  # L < C
    with pytest.raises(ValueError, match="exclusion"):
        build_loss("dice_ce", 3, class_weights=None, exclusion="paper")
    with pytest.raises(ValueError, match="class_weights"):
        WeightedCELoss(3)  # the 12 default weights do not fit 3 classes
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")


# ----------------------------------------------------------------------------- label sets
# A copy of the annotated-mask losses as they were before label sets (git main d0824c5), kept to
# check that the set-valued losses reduce to them exactly, values and gradients (torch.equal).


def _former_cross_entropy(logits, target, distance, annotated, weights, sigma, alpha, marginal,
                          exclusion_weight):
    annotated = annotated.clone()
    annotated[:, 0] = True
    log_norm = torch.logsumexp(logits, dim=1)
    nll = log_norm - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if marginal:
        merged = ~annotated
        merged[:, 0] = True
        merged_logit = torch.logsumexp(logits.masked_fill(~merged[:, :, None, None], -torch.inf), dim=1)
        nll = torch.where(target == 0, log_norm - merged_logit, nll)
    pixel_weights = weights.to(logits)[target]
    loss = (pixel_weights * nll).sum() / pixel_weights.sum()
    loss = loss + alpha * (torch.exp(-(distance**2) / (2.0 * sigma**2)) * nll).mean()
    if exclusion_weight:
        unannotated = ~annotated
        unannotated[:, 0] = False
        kept = torch.logsumexp(logits.masked_fill(unannotated[:, :, None, None], -torch.inf), dim=1)
        penalty = torch.logsumexp(logits, dim=1) - kept
        labelled = (target > 0) & annotated.gather(1, target.flatten(1)).view_as(target)
        pixels = labelled & unannotated.any(dim=1)[:, None, None]
        loss = loss + exclusion_weight * (penalty * pixels).sum() / pixels.sum().clamp(min=1)
    return loss


def _former_dice(logits, target, annotated, marginal, smooth=1e-5):
    probs = torch.softmax(logits, dim=1)
    annotated = annotated.clone()
    annotated[:, 0] = True
    scored = torch.ones_like(annotated)
    if marginal:
        unannotated = (~annotated).float()[:, :, None, None]
        background = probs[:, :1] + (probs * unannotated).sum(dim=1, keepdim=True)
        probs = torch.cat([background, probs[:, 1:] * (1 - unannotated[:, 1:])], dim=1)
        scored = annotated
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    scored_f = scored.float()
    intersection = ((probs * onehot).sum(dim=(2, 3)) * scored_f).sum(0)
    predicted = (probs.sum(dim=(2, 3)) * scored_f).sum(0)
    truth = (onehot.sum(dim=(2, 3)) * scored_f).sum(0)
    dice = (2 * intersection + smooth) / (predicted + truth + smooth)
    counted = truth > 0
    counted[0] = False
    return ((1 - dice) * counted).sum() / counted.sum().clamp(min=1)


def _former_loss(name, logits, target, distance, annotated, marginal, exclusion_weight):
    weights = torch.tensor(DEFAULT_CLASS_WEIGHTS, dtype=torch.float64)
    cross_entropy = _former_cross_entropy(logits, target, distance, annotated, weights, 2.0, 3.0,
                                          marginal, exclusion_weight)
    if name == "weighted_ce":
        return cross_entropy
    dice = _former_dice(logits, target, annotated, marginal)
    return dice if name == "dice" else cross_entropy + 0.4 * dice


@pytest.mark.parametrize("name", ["weighted_ce", "dice", "dice_ce"])
@pytest.mark.parametrize("marginal, exclusion_weight", [(False, 0.0), (True, 0.0), (True, 0.7),
                                                        (False, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("as_sets", [False, True])
def test_label_sets_reduce_exactly_to_the_annotated_mask_losses(name, marginal, exclusion_weight,
                                                                 dtype, as_sets):
    logits, target, distance = _random_batch(seed=3, batch=3, classes=12, height=7, width=9,
                                             dtype=dtype)
    annotated = torch.rand(3, 12, generator=torch.Generator().manual_seed(4)) > 0.4
    annotated[0] = True  # one fully labelled item; item 2 keeps labels of unannotated organs
    target[1][~annotated[1][target[1]]] = 0
    labels = annotated
    if as_sets:  # what the dataset will pass: one (C, C) matrix per item from labels.py
        labels = torch.from_numpy(np.stack([label_sets_from_annotated(np.flatnonzero(a), 12)
                                            for a in annotated.numpy()]))
    kwargs = {"num_classes": 12, "sigma": 2.0, "alpha": 3.0, "marginal": marginal,
                  "exclusion_weight": exclusion_weight, "dice_weight": 0.4}
    if name == "dice":
        kwargs = {"num_classes": 12, "marginal": marginal, "exclusion_weight": exclusion_weight}
    former_logits, new_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    former = _former_loss(name, former_logits, target, distance, annotated, marginal, exclusion_weight)
    new = build_loss(name, **kwargs)(new_logits, target, distance, labels)
    former.backward()
    new.backward()
    assert torch.equal(new, former)
    assert torch.equal(new_logits.grad, former_logits.grad)


def test_marginal_scores_a_pixel_against_its_whole_set():
    # TotalSegmentator: a colon pixel may be colon or rectum, a femur pixel femur head or
    # background. Classes 12; the colon pixel's nll is -log(p_colon + p_rectum).
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]  # (1, 12, 12)
    logits = torch.randn(1, 12, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[[2, 3, 5]]])
    probs = torch.softmax(logits, dim=1)[0, :, 0]  # (C, 3)
    nll = [-math.log(probs[2, 0] + probs[6, 0]), -math.log(probs[0, 1] + probs[3, 1]),
           -math.log(probs[5, 2])]
    loss = WeightedCELoss(12, class_weights=None, alpha=0.0, marginal=True)(logits, target, None, sets)
    assert loss.item() == pytest.approx(sum(nll) / 3, rel=1e-12)
    seed_way = WeightedCELoss(12, class_weights=None, alpha=0.0)(logits, target, None, sets)
    assert seed_way.item() == pytest.approx(-sum(math.log(probs[c, i]) for i, c in enumerate((2, 3, 5))) / 3)


def test_a_set_id_past_the_classes_weighs_its_mean_class_weight():
    # Three classes plus value 3 = {1, 2}. Pixel a: value 3, logits (0, 1, 2) -> -log(p1 + p2),
    # weight (2.0 + 1.0) / 2 = 1.5; pixel b: value 0 = {0}, logits (1, 0, 0) -> -log p0, weight 0.3.
    sets = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]], dtype=torch.bool)
    logits = _pixels((0.0, 1.0, 2.0), (1.0, 0.0, 0.0))
    target = torch.tensor([[[3, 0]]])
    e = math.exp
    nll_a = -math.log((e(1) + e(2)) / (1 + e(1) + e(2)))
    nll_b = -math.log(e(1) / (e(1) + 2))
    loss_fn = WeightedCELoss(3, class_weights=(0.3, 2.0, 1.0), alpha=0.0, marginal=True)
    expected = (1.5 * nll_a + 0.3 * nll_b) / 1.8
    assert loss_fn(logits, target, None, sets).item() == pytest.approx(expected, rel=1e-12)


def test_set_probabilities_and_scored_rows_of_totalsegmentator():
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]
    probs = torch.softmax(torch.randn(1, 12, 2, 2, dtype=torch.float64), dim=1)
    merged = set_probabilities(probs, sets)  # (1, 12, 2, 2)
    torch.testing.assert_close(merged[:, 2], probs[:, 2] + probs[:, 6])  # colon = {colon, rectum}
    torch.testing.assert_close(merged[:, 3], probs[:, 3] + probs[:, 0])  # femur = {head, background}
    torch.testing.assert_close(merged[:, 0], probs[:, 0] + probs[:, 6])  # rectum may hide in 0
    assert torch.equal(merged[:, 5], probs[:, 5])
    # the rectum's identity row is inside row 0 and row 2: scored only through them; the femur
    # row holds background, so it is no region and the Dice leaves it to the cross-entropy
    assert scored_rows(sets)[0].tolist() == [c not in (3, 6) for c in range(12)]


def test_marginal_dice_of_a_perfect_totalsegmentator_prediction_is_perfect():
    # 1 x 10 pixels: femur (stored 3 = {femur head, background}) on 2, liver on 3, background on 5.
    # The model says femur head on the femur, liver on the liver, background elsewhere, all sure.
    # A scored femur row would count p_head + p_background on the 7 femur and background pixels
    # against 2 true ones: Dice 4 / 9, loss (1 - 4/9) / 2 = 5/18 over rows {3, 5}, for a perfect
    # prediction (what this test measured before the fix).
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]
    target = torch.tensor([[[3, 3, 5, 5, 5, 0, 0, 0, 0, 0]]])
    logits = torch.full((1, 12, 1, 10), -30.0, dtype=torch.float64)
    logits[0, 3, 0, :2] = logits[0, 5, 0, 2:5] = logits[0, 0, 0, 5:] = 30.0
    loss = SoftDiceLoss(12, marginal=True)(logits, target, None, sets)  # smooth 1e-5
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_exclusion_masks_use_what_each_pixel_is_known_not_to_be():
    # TotalSegmentator: uncertain organs colon 2, femur head 3, rectum 6. Pixels stored as
    # 0 {bg, rectum}, 2 {colon, rectum}, 3 {femur head, bg}, 5 {liver}.
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]
    masks = exclusion_masks(torch.tensor([[[0, 2, 3, 5]]]), sets)[0, :, 0]  # (C, 4)
    assert masks[2].tolist() == [True, False, True, True]
    assert masks[3].tolist() == [True, True, False, True]
    assert masks[6].tolist() == [False, False, True, True]
    assert not masks[[0, 1, 4, 5, 7, 8, 9, 10, 11]].any()  # certain classes have no mask


def test_published_exclusion_cross_entropy_hand_computed():
    # Four classes, organs 2 and 3 not annotated. Pixel a: label 0, may be {0, 2, 3}: in no mask.
    # Pixel b: label 1, logits (0, 1, 0.5, -0.5), Z = 1 + e + e^0.5 + e^-0.5: in e_2 and e_3, so
    #   published = (-log(1 - p2) - log(1 - p3)) / 2 = (-log((Z - e^0.5)/Z) - log((Z - e^-0.5)/Z)) / 2
    #   merged    = -log(1 - p2 - p3) = -log((1 + e) / Z)
    logits = _pixels((0.5, -1.0, 2.0, 0.0), (0.0, 1.0, 0.5, -0.5))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False, False]])
    e = math.exp
    z = 1 + e(1) + e(0.5) + e(-0.5)
    published = (-math.log((z - e(0.5)) / z) - math.log((z - e(-0.5)) / z)) / 2
    merged = -math.log((1 + e(1)) / z)
    assert exclusion_cross_entropy(logits, target, annotated).item() == pytest.approx(published, rel=1e-12)
    assert exclusion_term(logits, target, annotated).item() == pytest.approx(merged, rel=1e-12)
    plain = WeightedCELoss(4, class_weights=None, alpha=0.0, marginal=True)
    with_exclusion = WeightedCELoss(4, class_weights=None, alpha=0.0, marginal=True,
                                    exclusion_weight=0.5, exclusion="published")
    assert with_exclusion(logits, target, None, annotated).item() == pytest.approx(
        plain(logits, target, None, annotated).item() + 0.5 * published, rel=1e-12)
    assert exclusion_cross_entropy(logits, torch.zeros_like(target), annotated).item() == 0.0


def test_published_exclusion_dice_hand_computed():
    # Three classes, organ 2 not annotated; e_2 = (0, 1) (pixel b is labelled organ 1), so
    #   D = (2 p2(b) + s) / (p2(a) + p2(b) + 1 + s), added to the marginal soft Dice.
    logits = _pixels((0.5, -1.0, 2.0), (0.0, 1.0, 0.5))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    p = torch.softmax(logits, dim=1)[0, :, 0].tolist()  # (C, N)
    dice = (2 * p[2][1] + 1e-5) / (p[2][0] + p[2][1] + 1 + 1e-5)
    probs = torch.softmax(logits, dim=1)
    sets = torch.tensor([[[1, 0, 1], [0, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    assert exclusion_dice(probs, target, sets).item() == pytest.approx(dice, rel=1e-10)
    marginal = SoftDiceLoss(3, marginal=True)(logits, target, None, annotated)
    published = SoftDiceLoss(3, marginal=True, exclusion_weight=2.0, exclusion="published")
    assert published(logits, target, None, annotated).item() == pytest.approx(
        marginal.item() + 2.0 * dice, rel=1e-10)
    merged = SoftDiceLoss(3, marginal=True, exclusion_weight=2.0)  # no Dice-side term, as before
    assert merged(logits, target, None, annotated).item() == marginal.item()


def test_log_one_minus_softmax_matches_the_direct_formula_and_stays_finite():
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits[0, 1, 0, 0] = logits[0, 2, 0, 0] = 4.0  # a tie at the maximum
    direct = torch.log1p(-torch.softmax(logits, dim=1))
    torch.testing.assert_close(log_one_minus_softmax(logits), direct)
    huge = (torch.sign(logits) * 1e4).float().requires_grad_()
    value = log_one_minus_softmax(huge)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(huge.grad).all()
    assert value.max().item() <= 0.0


@pytest.mark.parametrize("name", ["weighted_ce", "dice", "dice_ce"])
def test_published_exclusion_is_stable_and_differentiable(name):
    logits, target, distance = _random_batch(classes=12, dtype=torch.float32)
    logits = (torch.sign(logits) * 1e4).requires_grad_()
    sets = torch.from_numpy(np.stack([get_source("totalseg").label_sets(),
                                      get_source("abdomenct1k").label_sets()]))
    loss_fn = build_loss(name, 12, marginal=True, exclusion_weight=1.0, exclusion="published")
    loss = loss_fn(logits, target, distance, sets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
