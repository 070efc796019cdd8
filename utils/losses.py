"""Training losses for multi-organ segmentation.

Class ids: 0 is background, 1..C-1 are organs (``utils/labels.py``); every function takes
``num_classes`` and nothing assumes 12.

Losses (torch). All take ``(logits, target, distance, label_sets)`` so the training loop calls
them one way, and compute in float32 even under autocast (float64 input stays float64):

- :class:`WeightedCELoss`: class-weighted cross-entropy plus a boundary term that weights each
  pixel by ``exp(-d^2 / 2 sigma^2)`` of its distance ``d`` (pixels) to the nearest organ boundary.
- :class:`SoftDiceLoss`: batch soft Dice over organs.
- :class:`DiceCELoss`: the sum of the two.

Partial and set-valued labels (Shi et al. 2021, "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", Medical Image Analysis 70, 101979). The fourth argument,
``label_sets``, is a bool tensor ``(B, L, C)``: ``label_sets[b, l]`` is the set of classes a pixel
of item ``b`` stored as ``l`` may be (``utils/labels.py``: ``LabelSource.label_sets``). Row 0 of
a source that leaves organs out is background plus those organs; a label meaning several classes
(TotalSegmentator's whole femur = {femur head, background}) has that set as its row. The older
``(B, C)`` bool ``annotated`` mask is accepted too and converted (:func:`label_sets_tensor`).

- marginal (``marginal=True``): a pixel is scored against the summed probability of its set,
  ``-log sum_{c in set(y)} p_c`` (a logsumexp over the set); the soft Dice scores each stored
  value against the summed probability of its set.
- exclusion (``exclusion_weight > 0``): an organ is *uncertain* in an item when some row of the
  item holding it holds other classes too (organs left out, parts of a set-valued label).
  ``exclusion="merged"`` (this project's first version): on pixels whose class is certain,
  ``-log(1 - q)`` with ``q`` the summed probability of the item's uncertain organs.
  ``exclusion="published"`` (Shi et al.): per uncertain organ ``k`` the pixels known not to be
  ``k`` (``k`` not in their set) form the exclusion mask ``e_k``; the cross-entropy side adds the
  mean of ``-log(1 - p_k)`` over ``e_k``, the Dice side adds the soft Dice between ``p_k`` and
  ``e_k`` (to be minimised).

``label_sets=None`` means every class is certain; the losses then equal the ordinary ones, and
with only single-class rows besides row 0 they equal the annotated-mask losses of before exactly
(``tests/test_losses.py`` checks values and gradients with ``torch.equal``). The label-set
helpers and exclusion terms live in ``utils/partial_labels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.labels import DEFAULT_CLASS_WEIGHTS, NUM_CLASSES
from utils.partial_labels import (  # noqa: F401  (annotated_mask, exclusion_term: former home)
    annotated_mask,
    at_least_float32,
    exclusion_cross_entropy,
    exclusion_dice,
    exclusion_term,
    label_sets_tensor,
    pixel_label_sets,
    scored_rows,
    set_probabilities,
)

LOSS_NAMES = ("weighted_ce", "dice", "dice_ce")
EXCLUSION_MODES = ("merged", "published")


# ----------------------------------------------------------------------------- helpers


def boundary_weight(distance: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-pixel weight ``exp(-d^2 / (2 sigma^2))``: 1 on an organ boundary, near 0 far away.

    Args:
        distance: ``(B, H, W)`` float, pixels to the nearest organ boundary (>= 0).
        sigma: width of the weighted band in pixels (> 0).

    Returns:
        ``(B, H, W)`` weights in (0, 1], float32 (float64 for float64 input).
    """
    distance = at_least_float32(distance)
    return torch.exp(-(distance**2) / (2.0 * sigma**2))


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}, H, W), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        expected = tuple(logits.shape[:1] + logits.shape[2:])
        raise ValueError(f"target must be (B, H, W) = {expected}, got {tuple(target.shape)}")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")


def _class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor:
    if class_weights is None:
        return torch.ones(num_classes, dtype=torch.float64)
    if len(class_weights) != num_classes:
        raise ValueError(f"class_weights has {len(class_weights)} entries, "
                         f"num_classes is {num_classes}")
    return torch.tensor([float(w) for w in class_weights], dtype=torch.float64)  # cast at use


# ----------------------------------------------------------------------------- losses


def _check_exclusion(exclusion: str) -> str:
    if exclusion not in EXCLUSION_MODES:
        raise ValueError(f"unknown exclusion {exclusion!r}; choose one of {EXCLUSION_MODES}")
    return exclusion


class WeightedCELoss(nn.Module):
    """Class-weighted cross-entropy plus a boundary-weighted term, with partial-label options.

    ``loss = sum_x w_x nll_x / sum_x w_x  +  alpha * mean_x(b_x * nll_x)
    + exclusion_weight * exclusion``, where ``nll_x = -log p(y_x | x)``, ``w_x`` is the class
    weight of the pixel's stored value and ``b_x = boundary_weight(distance_x, sigma)``. The
    boundary term is a plain mean over all pixels of the batch and does not use the class weights.

    With ``marginal=True`` and ``label_sets`` given, ``p(y_x)`` is the summed probability of the
    pixel's set, ``logsumexp(logits over the set) - logsumexp(all logits)``; a stored value past
    the classes (a set id, row ``l >= C``) weighs the mean of its set's class weights.

    Exclusion (needs ``label_sets``; see the module docstring): ``"merged"`` is the mean of
    ``-log(1 - q_x)`` over pixels whose class is a certain organ, in items with uncertain organs,
    ``q_x`` the summed probability of those organs; ``"published"`` is
    :func:`exclusion_cross_entropy`. Either is 0 when no pixel qualifies.

    Args:
        num_classes: C, background included.
        class_weights: C weights (None for all ones).
        sigma: boundary band width in pixels.
        alpha: weight of the boundary term (0 disables it; ``distance`` may then be None).
        marginal: score each pixel against its label set (needs ``label_sets``).
        exclusion_weight: weight of the exclusion term (needs ``label_sets``).
        exclusion: ``"merged"`` or ``"published"``.

    Shape:
        logits ``(B, C, H, W)``, target ``(B, H, W)`` int in ``0..L-1``, distance ``(B, H, W)``
        float, label_sets ``(B, L, C)`` or ``(B, C)`` bool or None; returns a float32 scalar.
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
                 sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
                 exclusion_weight: float = 0.0, exclusion: str = "merged"):
        super().__init__()
        self.num_classes = num_classes
        self.sigma = sigma
        self.alpha = alpha
        self.marginal = marginal
        self.exclusion_weight = exclusion_weight
        self.exclusion = _check_exclusion(exclusion)
        self.register_buffer("class_weights", _class_weight_tensor(class_weights, num_classes),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                label_sets: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(logits, target, self.num_classes)
        logits, target = at_least_float32(logits), target.long()
        sets = label_sets_tensor(label_sets, logits.shape[0], self.num_classes, logits.device)
        log_norm = torch.logsumexp(logits, dim=1)  # (B, H, W)
        if self.marginal and sets is not None:
            outside = ~pixel_label_sets(sets, target)  # (B, C, H, W)
            nll = log_norm - torch.logsumexp(logits.masked_fill(outside, -torch.inf), dim=1)
        else:
            nll = log_norm - logits.gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)

        weights = self._pixel_weights(target, sets).to(logits)  # (B, H, W)
        loss = (weights * nll).sum() / weights.sum()
        if self.alpha:
            if distance is None:
                raise ValueError("distance is required when alpha > 0")
            if distance.shape != target.shape:
                raise ValueError(f"distance must be (B, H, W) = {tuple(target.shape)}, "
                                 f"got {tuple(distance.shape)}")
            band = boundary_weight(distance, self.sigma).to(nll.dtype)  # (B, H, W)
            loss = loss + self.alpha * (band * nll).mean()
        if self.exclusion_weight and sets is not None:
            term = (exclusion_term(logits, target, sets) if self.exclusion == "merged"
                    else exclusion_cross_entropy(logits, target, sets))
            loss = loss + self.exclusion_weight * term
        return loss

    def _pixel_weights(self, target: torch.Tensor, sets: torch.Tensor | None) -> torch.Tensor:
        """Class weight of each pixel's stored value; a set id weighs its set's mean weight."""
        if sets is None or sets.shape[1] == self.num_classes:
            return self.class_weights[target]
        extra = sets[:, self.num_classes:].to(self.class_weights.dtype)  # (B, L - C, C)
        extra_weights = (extra @ self.class_weights) / extra.sum(-1).clamp(min=1)  # (B, L - C)
        rows = torch.cat([self.class_weights.expand(len(sets), -1), extra_weights], dim=1)
        return rows.gather(1, target.flatten(1)).view_as(target)


class SoftDiceLoss(nn.Module):
    """1 - soft Dice from softmax probabilities, batch Dice: sums run over (B, H, W) per class.

    ``dice_c = (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth)``; the loss is the mean of
    ``1 - dice_c`` over the scored classes (organs, plus background if ``include_background``).
    A class absent from the ground truth of every item that scores it is skipped, so empty
    classes neither count as perfect nor swamp the mean (their false positives are left to the
    cross-entropy of :class:`DiceCELoss`). If no scored class is present the loss is 0.

    With ``marginal=True`` and ``label_sets``, each stored value ``l`` is scored against the
    summed probability of its set (:func:`set_probabilities`), the values being rows ``0..L-1``
    in place of classes; an item leaves out the rows :func:`scored_rows` drops. With an annotated
    mask this is the former rule: unannotated organs' probabilities join background and are not
    scored on their own. With ``exclusion="published"`` and ``exclusion_weight > 0`` the loss
    adds ``exclusion_weight * exclusion_dice``.

    Args:
        num_classes: C, background included.
        smooth: added to numerator and denominator.
        include_background: also score class 0 (row 0).
        marginal: partial-label handling as above (needs ``label_sets``).
        exclusion_weight: weight of the published Dice exclusion (needs ``label_sets``).
        exclusion: ``"merged"`` (no Dice-side term, as before) or ``"published"``.

    Shape:
        logits ``(B, C, H, W)``, target ``(B, H, W)`` int, label_sets ``(B, L, C)`` or ``(B, C)``
        bool or None; ``distance`` is accepted and ignored so all losses share one call; returns
        a float32 scalar.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, smooth: float = 1e-5,
                 include_background: bool = False, marginal: bool = False,
                 exclusion_weight: float = 0.0, exclusion: str = "merged"):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth
        self.include_background = include_background
        self.marginal = marginal
        self.exclusion_weight = exclusion_weight
        self.exclusion = _check_exclusion(exclusion)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                label_sets: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(logits, target, self.num_classes)
        probs = torch.softmax(at_least_float32(logits), dim=1)  # (B, C, H, W)
        batch = logits.shape[0]
        sets = label_sets_tensor(label_sets, batch, self.num_classes, logits.device)
        rows, scored = self.num_classes, torch.ones(batch, self.num_classes, dtype=torch.bool,
                                                    device=logits.device)
        scored_probs = probs
        if self.marginal and sets is not None:
            rows, scored = sets.shape[1], scored_rows(sets)
            scored_probs = set_probabilities(probs, sets)  # (B, L, H, W)
        onehot = F.one_hot(target.long(), rows)  # (B, H, W, L)
        onehot = onehot.permute(0, 3, 1, 2).float()  # (B, H, W, L) -> (B, L, H, W)
        scored_f = scored.float()
        intersection = ((scored_probs * onehot).sum(dim=(2, 3)) * scored_f).sum(0)  # (B, L) -> (L,)
        predicted = (scored_probs.sum(dim=(2, 3)) * scored_f).sum(0)
        truth = (onehot.sum(dim=(2, 3)) * scored_f).sum(0)
        dice = (2 * intersection + self.smooth) / (predicted + truth + self.smooth)  # (L,)
        counted = truth > 0
        if not self.include_background:
            counted[0] = False
        loss = ((1 - dice) * counted).sum() / counted.sum().clamp(min=1)
        if self.exclusion == "published" and self.exclusion_weight and sets is not None:
            loss = loss + self.exclusion_weight * exclusion_dice(probs, target, sets, self.smooth)
        return loss


class DiceCELoss(nn.Module):
    """``WeightedCELoss + dice_weight * SoftDiceLoss``, sharing the partial-label settings.

    Args are those of :class:`WeightedCELoss` plus ``dice_weight``, ``smooth`` and
    ``include_background`` of :class:`SoftDiceLoss`. With ``exclusion="published"`` the
    cross-entropy side carries the exclusion cross-entropy and the Dice side the exclusion Dice
    (so the latter is scaled by ``dice_weight`` too). Same call and shapes as WeightedCELoss.
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
                 sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
                 exclusion_weight: float = 0.0, dice_weight: float = 1.0, smooth: float = 1e-5,
                 include_background: bool = False, exclusion: str = "merged"):
        super().__init__()
        self.dice_weight = dice_weight
        self.cross_entropy = WeightedCELoss(num_classes, class_weights, sigma, alpha, marginal,
                                            exclusion_weight, exclusion)
        self.dice = SoftDiceLoss(num_classes, smooth, include_background, marginal,
                                 exclusion_weight, exclusion)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                label_sets: torch.Tensor | None = None) -> torch.Tensor:
        return (self.cross_entropy(logits, target, distance, label_sets)
                + self.dice_weight * self.dice(logits, target, distance, label_sets))


def build_loss(name: str, num_classes: int = NUM_CLASSES,
               class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
               sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
               exclusion_weight: float = 0.0, dice_weight: float = 1.0,
               exclusion: str = "merged") -> nn.Module:
    """The loss called ``name`` ('weighted_ce' | 'dice' | 'dice_ce').

    Every returned loss is called as ``loss(logits, target, distance, label_sets)``. 'dice' uses
    only ``num_classes``, ``marginal`` and (published exclusion only) ``exclusion_weight``.
    ``exclusion`` picks the exclusion term: ``"merged"`` (default, this project's first form)
    or ``"published"`` (Shi et al. 2021).
    """
    _check_exclusion(exclusion)
    if name == "weighted_ce":
        return WeightedCELoss(num_classes, class_weights, sigma, alpha, marginal, exclusion_weight,
                              exclusion)
    if name == "dice":
        return SoftDiceLoss(num_classes, marginal=marginal, exclusion_weight=exclusion_weight,
                            exclusion=exclusion)
    if name == "dice_ce":
        return DiceCELoss(num_classes, class_weights, sigma, alpha, marginal, exclusion_weight,
                          dice_weight, exclusion=exclusion)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")
