"""Training losses for multi-organ segmentation.

Class ids: 0 is background, 1..C-1 are organs (``utils/labels.py``); every function takes
``num_classes`` and nothing assumes 12.

Losses (torch). All take ``(logits, target, distance, annotated)`` so the training loop calls
them one way, and compute in float32 even under autocast (float64 input stays float64):

- :class:`WeightedCELoss`: class-weighted cross-entropy plus a boundary term that weights each
  pixel by ``exp(-d^2 / 2 sigma^2)`` of its distance ``d`` (pixels) to the nearest organ boundary.
- :class:`SoftDiceLoss`: batch soft Dice over organs.
- :class:`DiceCELoss`: the sum of the two.

Partial labels (Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation"). ``annotated`` is a bool tensor ``(B, C)``: ``annotated[b, c]`` says
whether the source of item ``b`` labels class ``c`` (background is always annotated). A pixel
labelled 0 in such an item may really be an unannotated organ, so:

- marginal (``marginal=True``): background and the unannotated organs of an item merge into one
  class whose probability is the sum of theirs; a background pixel is scored against that sum.
- exclusion (``exclusion_weight > 0``): a pixel labelled with an annotated organ cannot be an
  unannotated organ, so probability mass on the unannotated organs is penalised there.

``annotated=None`` means every class is annotated; the losses then equal the ordinary ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.labels import DEFAULT_CLASS_WEIGHTS, NUM_CLASSES

LOSS_NAMES = ("weighted_ce", "dice", "dice_ce")



# ----------------------------------------------------------------------------- helpers


def boundary_weight(distance: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-pixel weight ``exp(-d^2 / (2 sigma^2))``: 1 on an organ boundary, near 0 far away.

    Args:
        distance: ``(B, H, W)`` float, pixels to the nearest organ boundary (>= 0).
        sigma: width of the weighted band in pixels (> 0).

    Returns:
        ``(B, H, W)`` weights in (0, 1], float32 (float64 for float64 input).
    """
    distance = _at_least_float32(distance)
    return torch.exp(-(distance**2) / (2.0 * sigma**2))


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """Half-precision values (autocast) go up to float32; float64 stays float64."""
    return values if values.dtype == torch.float64 else values.float()


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}, H, W), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        expected = tuple(logits.shape[:1] + logits.shape[2:])
        raise ValueError(f"target must be (B, H, W) = {expected}, got {tuple(target.shape)}")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")


def annotated_mask(annotated: torch.Tensor | None, batch: int, num_classes: int,
                    device: torch.device) -> torch.Tensor | None:
    """Validated ``(B, C)`` bool mask with background forced to True, or None."""
    if annotated is None:
        return None
    if annotated.shape != (batch, num_classes):
        raise ValueError(f"annotated must be (B, C) = ({batch}, {num_classes}), "
                         f"got {tuple(annotated.shape)}")
    annotated = annotated.to(device=device, dtype=torch.bool).clone()
    annotated[:, 0] = True
    return annotated


def _class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor:
    if class_weights is None:
        return torch.ones(num_classes, dtype=torch.float64)
    if len(class_weights) != num_classes:
        raise ValueError(f"class_weights has {len(class_weights)} entries, "
                         f"num_classes is {num_classes}")
    return torch.tensor([float(w) for w in class_weights], dtype=torch.float64)  # cast at use


# ----------------------------------------------------------------------------- losses


class WeightedCELoss(nn.Module):
    """Class-weighted cross-entropy plus a boundary-weighted term, with partial-label options.

    ``loss = sum_x w_{y_x} nll_x / sum_x w_{y_x}  +  alpha * mean_x(b_x * nll_x)
    + exclusion_weight * exclusion``, where ``nll_x = -log p(y_x | x)``, ``w`` are the class
    weights and ``b_x = boundary_weight(distance_x, sigma)``. The boundary term is a plain mean
    over all pixels of the batch and does not use the class weights.

    With ``marginal=True`` and ``annotated`` given, for a pixel labelled 0 ``p(y_x)`` is the
    summed probability of background and the item's unannotated organs, computed as
    ``logsumexp(merged logits) - logsumexp(all logits)``; its class weight is ``class_weights[0]``.
    A pixel labelled with an organ uses that organ's own probability.

    The exclusion term is the mean of ``-log(1 - q_x)`` over pixels labelled with an annotated
    organ in items that have at least one unannotated organ, ``q_x`` being the summed
    probability of those unannotated organs; it is 0 when there are no such pixels.

    Args:
        num_classes: C, background included.
        class_weights: C weights (None for all ones).
        sigma: boundary band width in pixels.
        alpha: weight of the boundary term (0 disables it; ``distance`` may then be None).
        marginal: merge unannotated organs into background (needs ``annotated``).
        exclusion_weight: weight of the exclusion term (needs ``annotated``).

    Shape:
        logits ``(B, C, H, W)``, target ``(B, H, W)`` int, distance ``(B, H, W)`` float,
        annotated ``(B, C)`` bool or None; returns a float32 scalar.
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
                 sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
                 exclusion_weight: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.sigma = sigma
        self.alpha = alpha
        self.marginal = marginal
        self.exclusion_weight = exclusion_weight
        self.register_buffer("class_weights", _class_weight_tensor(class_weights, num_classes),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(logits, target, self.num_classes)
        logits, target = _at_least_float32(logits), target.long()
        annotated = annotated_mask(annotated, logits.shape[0], self.num_classes, logits.device)
        log_norm = torch.logsumexp(logits, dim=1)  # (B, H, W)
        target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)
        nll = log_norm - target_logit
        if self.marginal and annotated is not None:
            merged = ~annotated  # (B, C): background + unannotated organs
            merged[:, 0] = True
            merged_logits = logits.masked_fill(~merged[:, :, None, None], -torch.inf)
            merged_logit = torch.logsumexp(merged_logits, dim=1)  # (B, H, W)
            nll = torch.where(target == 0, log_norm - merged_logit, nll)

        weights = self.class_weights.to(logits)[target]  # (B, H, W), in the logits' dtype
        loss = (weights * nll).sum() / weights.sum()
        if self.alpha:
            if distance is None:
                raise ValueError("distance is required when alpha > 0")
            if distance.shape != target.shape:
                raise ValueError(f"distance must be (B, H, W) = {tuple(target.shape)}, "
                                 f"got {tuple(distance.shape)}")
            band = boundary_weight(distance, self.sigma).to(nll.dtype)  # (B, H, W)
            loss = loss + self.alpha * (band * nll).mean()
        if self.exclusion_weight and annotated is not None:
            loss = loss + self.exclusion_weight * exclusion_term(logits, target, annotated)
        return loss


def exclusion_term(logits: torch.Tensor, target: torch.Tensor,
                   annotated: torch.Tensor) -> torch.Tensor:
    """Mean ``-log(1 - q)`` on pixels labelled with an annotated organ (see WeightedCELoss).

    ``q`` is the summed softmax probability of the item's unannotated organs, and
    ``-log(1 - q) = logsumexp(all logits) - logsumexp(logits of the other classes)``, which stays
    finite for any logits. Pixels of items with every organ annotated are left out.

    Args:
        logits: ``(B, C, H, W)`` float.
        target: ``(B, H, W)`` int class ids.
        annotated: ``(B, C)`` bool, background True.

    Returns:
        float scalar, 0 (with a graph) when no pixel qualifies.
    """
    logits = _at_least_float32(logits)
    unannotated = ~annotated  # (B, C)
    unannotated[:, 0] = False
    kept_logits = logits.masked_fill(unannotated[:, :, None, None], -torch.inf)  # (B, C, H, W)
    kept_logit = torch.logsumexp(kept_logits, dim=1)  # (B, H, W)
    penalty = torch.logsumexp(logits, dim=1) - kept_logit  # (B, H, W), -log(1 - q)
    labelled_organ = (target > 0) & annotated.gather(1, target.flatten(1)).view_as(target)
    pixels = labelled_organ & unannotated.any(dim=1)[:, None, None]  # (B, H, W)
    return (penalty * pixels).sum() / pixels.sum().clamp(min=1)


class SoftDiceLoss(nn.Module):
    """1 - soft Dice from softmax probabilities, batch Dice: sums run over (B, H, W) per class.

    ``dice_c = (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth)``; the loss is the mean of
    ``1 - dice_c`` over the scored classes (organs, plus background if ``include_background``).
    A class absent from the ground truth of every item that scores it is skipped, so empty
    classes neither count as perfect nor swamp the mean (their false positives are left to the
    cross-entropy of :class:`DiceCELoss`). If no scored class is present the loss is 0.

    With ``marginal=True`` and ``annotated``, each item's unannotated organs have their
    probabilities added to its background channel, and the item's sums are left out of those
    classes' Dice (a per-item mask over the (B, C) partial sums).

    Args:
        num_classes: C, background included.
        smooth: added to numerator and denominator.
        include_background: also score class 0.
        marginal: partial-label handling as above (needs ``annotated``).

    Shape:
        logits ``(B, C, H, W)``, target ``(B, H, W)`` int, annotated ``(B, C)`` bool or None;
        ``distance`` is accepted and ignored so all losses share one call; returns a float32 scalar.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, smooth: float = 1e-5,
                 include_background: bool = False, marginal: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth
        self.include_background = include_background
        self.marginal = marginal

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(logits, target, self.num_classes)
        probs = torch.softmax(_at_least_float32(logits), dim=1)  # (B, C, H, W)
        batch = logits.shape[0]
        annotated = annotated_mask(annotated, batch, self.num_classes, logits.device)
        scored = torch.ones(batch, self.num_classes, dtype=torch.bool, device=logits.device)
        if self.marginal and annotated is not None:
            unannotated = (~annotated).float()[:, :, None, None]  # (B, C, 1, 1)
            background = probs[:, :1] + (probs * unannotated).sum(dim=1, keepdim=True)
            probs = torch.cat([background, probs[:, 1:] * (1 - unannotated[:, 1:])], dim=1)
            scored = annotated
        onehot = F.one_hot(target.long(), self.num_classes)  # (B, H, W, C)
        onehot = onehot.permute(0, 3, 1, 2).float()  # (B, H, W, C) -> (B, C, H, W)
        scored_f = scored.float()
        intersection = ((probs * onehot).sum(dim=(2, 3)) * scored_f).sum(0)  # (B, C) -> (C,)
        predicted = (probs.sum(dim=(2, 3)) * scored_f).sum(0)
        truth = (onehot.sum(dim=(2, 3)) * scored_f).sum(0)
        dice = (2 * intersection + self.smooth) / (predicted + truth + self.smooth)  # (C,)
        counted = truth > 0
        if not self.include_background:
            counted[0] = False
        return ((1 - dice) * counted).sum() / counted.sum().clamp(min=1)


class DiceCELoss(nn.Module):
    """``WeightedCELoss + dice_weight * SoftDiceLoss``, sharing the partial-label settings.

    Args are those of :class:`WeightedCELoss` plus ``dice_weight``, ``smooth`` and
    ``include_background`` of :class:`SoftDiceLoss`. Same call and shapes as WeightedCELoss.
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
                 sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
                 exclusion_weight: float = 0.0, dice_weight: float = 1.0, smooth: float = 1e-5,
                 include_background: bool = False):
        super().__init__()
        self.dice_weight = dice_weight
        self.cross_entropy = WeightedCELoss(num_classes, class_weights, sigma, alpha, marginal,
                                            exclusion_weight)
        self.dice = SoftDiceLoss(num_classes, smooth, include_background, marginal)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                distance: torch.Tensor | None = None,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        return (self.cross_entropy(logits, target, distance, annotated)
                + self.dice_weight * self.dice(logits, target, distance, annotated))


def build_loss(name: str, num_classes: int = NUM_CLASSES,
               class_weights: Sequence[float] | None = DEFAULT_CLASS_WEIGHTS,
               sigma: float = 3.0, alpha: float = 10.0, marginal: bool = False,
               exclusion_weight: float = 0.0, dice_weight: float = 1.0) -> nn.Module:
    """The loss called ``name`` ('weighted_ce' | 'dice' | 'dice_ce').

    Every returned loss is called as ``loss(logits, target, distance, annotated)``. 'dice' uses
    only ``num_classes`` and ``marginal``.
    """
    if name == "weighted_ce":
        return WeightedCELoss(num_classes, class_weights, sigma, alpha, marginal, exclusion_weight)
    if name == "dice":
        return SoftDiceLoss(num_classes, marginal=marginal)
    if name == "dice_ce":
        return DiceCELoss(num_classes, class_weights, sigma, alpha, marginal, exclusion_weight,
                          dice_weight)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")


