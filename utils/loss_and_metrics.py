"""Training losses and evaluation metrics for multi-organ segmentation.

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

Metrics and their empty-case conventions:

- :class:`SliceMetrics` (the original project's metric, accumulated on the device): per class,
  Dice and IoU of each 2D slice *on which the class is in the ground truth*, averaged over those
  slices. A class never present gets NaN. A slice on which the class is predicted but absent from
  the ground truth is not scored by Dice but counted in ``false_positive_slices``, so false
  positives on organ-free slices stay visible.
- 3D per case (numpy): :func:`dice_iou_3d` is NaN when both masks are empty and 0 when exactly one
  is; :func:`hd95_mm` is NaN when either mask is empty (a distance to nothing is undefined; the
  miss shows up in Dice and :func:`false_positive_volume_ml` instead); :func:`surface_dice` is
  NaN when both are empty and 0 when exactly one is; :func:`false_positive_volume_ml` is the
  predicted volume when the ground truth is empty and 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

NUM_CLASSES = 12
# Background is cheap to get right; bladder and colon are under-segmented without a push;
# small intestine is over-predicted into neighbouring bowel.
DEFAULT_CLASS_WEIGHTS = (0.3, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0, 1.0, 1.0)
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


def _annotated_mask(annotated: torch.Tensor | None, batch: int, num_classes: int,
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
        annotated = _annotated_mask(annotated, logits.shape[0], self.num_classes, logits.device)
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
        annotated = _annotated_mask(annotated, batch, self.num_classes, logits.device)
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


# ----------------------------------------------------------------------------- slice metrics


class SliceMetrics:
    """Accumulates per-slice Dice and IoU per class, on the device, without host syncs.

    For each slice and class present in the ground truth: ``dice = 2|P&G| / (|P| + |G|)`` and
    ``iou = |P&G| / |P|G|``; :meth:`compute` averages them over those slices. Slices where the
    class is absent from the ground truth are not scored but, if the class is predicted there,
    counted in ``false_positive_slices``.

    Args:
        num_classes: C, background included.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._sums: dict[str, torch.Tensor] | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor,
               annotated: torch.Tensor | None = None) -> None:
        """Add a batch of slices.

        Args:
            pred: ``(B, H, W)`` int predicted class ids.
            target: ``(B, H, W)`` int ground-truth class ids, same device.
            annotated: optional ``(B, C)`` bool; a class not annotated for an item is not
                scored (nor counted as a false positive) on that item.
        """
        if pred.ndim != 3 or pred.shape != target.shape:
            raise ValueError(f"pred and target must both be (B, H, W), got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        classes = torch.arange(self.num_classes, device=pred.device)[None, :, None, None]
        predicted = pred.unsqueeze(1) == classes  # (B, 1, H, W) -> (B, C, H, W)
        truth = target.unsqueeze(1) == classes
        intersection = (predicted & truth).sum(dim=(2, 3))  # (B, C)
        predicted_sum, truth_sum = predicted.sum(dim=(2, 3)), truth.sum(dim=(2, 3))
        scored = torch.ones_like(truth_sum, dtype=torch.bool)
        annotated = _annotated_mask(annotated, pred.shape[0], self.num_classes, pred.device)
        if annotated is not None:
            scored = annotated
        present = (truth_sum > 0) & scored
        union = predicted_sum + truth_sum - intersection
        dice = 2 * intersection / (predicted_sum + truth_sum).clamp(min=1)
        iou = intersection / union.clamp(min=1)
        dtype = _sum_dtype(pred.device)
        batch = {
            "dice": (dice * present).sum(0).to(dtype),
            "iou": (iou * present).sum(0).to(dtype),
            "present_slices": present.sum(0),
            "false_positive_slices": ((predicted_sum > 0) & (truth_sum == 0) & scored).sum(0),
        }
        if self._sums is None:
            self._sums = batch
        else:
            for key, value in batch.items():
                self._sums[key] += value

    def all_reduce(self, device: torch.device | str | None = None) -> None:
        """Sum the accumulated state over all torch.distributed processes (call on every rank).

        Args:
            device: where to allocate zeros if this rank saw no batch (default: CPU, right for
                gloo; pass the CUDA device for NCCL).
        """
        if self._sums is None:
            device = torch.device(device or "cpu")
            float_dtype = _sum_dtype(device)
            zeros = partial(torch.zeros, self.num_classes, device=device)
            self._sums = {"dice": zeros(dtype=float_dtype), "iou": zeros(dtype=float_dtype),
                          "present_slices": zeros(dtype=torch.long),
                          "false_positive_slices": zeros(dtype=torch.long)}
        for value in self._sums.values():
            dist.all_reduce(value)

    def compute(self) -> dict:
        """Averages so far.

        Returns:
            dict with 'dice' and 'iou' (lists of C floats, NaN for classes never present,
            background at index 0), 'mean_dice' and 'mean_iou' (NaN-mean over organs 1..C-1,
            NaN if none was present), 'present_slices' and 'false_positive_slices' (lists of C
            ints).
        """
        if self._sums is None:
            nan, zeros = [float("nan")] * self.num_classes, [0] * self.num_classes
            return {"dice": nan, "iou": list(nan),
                    "mean_dice": float("nan"), "mean_iou": float("nan"),
                    "present_slices": zeros, "false_positive_slices": list(zeros)}
        count = self._sums["present_slices"].to(self._sums["dice"].dtype)
        dice = (self._sums["dice"] / count).cpu().numpy()  # 0 / 0 -> NaN for never-present classes
        iou = (self._sums["iou"] / count).cpu().numpy()
        return {
            "dice": dice.tolist(),
            "iou": iou.tolist(),
            "mean_dice": _nanmean(dice[1:]),
            "mean_iou": _nanmean(iou[1:]),
            "present_slices": self._sums["present_slices"].tolist(),
            "false_positive_slices": self._sums["false_positive_slices"].tolist(),
        }


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulating many per-slice scores, except on MPS which lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ----------------------------------------------------------------------------- 3D metrics


def dice_iou_3d(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean volumes of the same shape.

    Returns:
        ``(dice, iou)``: NaN, NaN when both are empty; 0, 0 when exactly one is.
    """
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask)
    pred_size, gt_size = int(pred_mask.sum()), int(gt_mask.sum())
    if pred_size == 0 and gt_size == 0:
        return float("nan"), float("nan")
    intersection = int(np.logical_and(pred_mask, gt_mask).sum())
    return (2 * intersection / (pred_size + gt_size),
            intersection / (pred_size + gt_size - intersection))


def false_positive_volume_ml(pred_mask: np.ndarray, gt_mask: np.ndarray,
                             spacing: Sequence[float]) -> float:
    """Predicted volume in ml when the ground truth is empty, else 0.0.

    Args:
        pred_mask, gt_mask: boolean volumes of the same shape.
        spacing: voxel size in mm per array axis.
    """
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask, spacing)
    if gt_mask.any():
        return 0.0
    return float(pred_mask.sum() * np.prod(spacing) / 1000.0)


def hd95_mm(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the two surfaces.

    Surfaces are the mask voxels removed by one erosion (face connectivity; the array edge counts
    as outside). The result is the larger of the two directed 95th percentiles (pred -> gt and
    gt -> pred), as in MONAI. NaN when either mask is empty.

    Args:
        pred_mask, gt_mask: boolean volumes of the same shape.
        spacing: voxel size in mm per array axis.
    """
    distances = _surface_distances(pred_mask, gt_mask, spacing)
    if distances is None:
        return float("nan")
    return float(max(np.percentile(d, 95) for d in distances))


def surface_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float) -> float:
    """Normalized surface Dice (Nikolov et al. 2021) at a tolerance in mm.

    The fraction of surface voxels of both masks lying within ``tolerance_mm`` of the other
    mask's surface, counting voxels (not surface area). NaN when both masks are empty, 0 when
    exactly one is.
    """
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask, spacing)
    if not pred_mask.any() and not gt_mask.any():
        return float("nan")
    distances = _surface_distances(pred_mask, gt_mask, spacing)
    if distances is None:
        return 0.0
    pred_to_gt, gt_to_pred = distances
    within = (pred_to_gt <= tolerance_mm).sum() + (gt_to_pred <= tolerance_mm).sum()
    return float(within / (pred_to_gt.size + gt_to_pred.size))


def _as_masks(pred_mask, gt_mask, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, gt_mask = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"masks differ in shape: {pred_mask.shape} vs {gt_mask.shape}")
    if spacing is not None and len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for {pred_mask.ndim}-D masks")
    return pred_mask, gt_mask


def _crop_to_union(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box, then padded by one empty voxel per side."""
    union = pred_mask | gt_mask
    box = []
    for axis in range(union.ndim):
        occupied = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(occupied[0], occupied[-1] + 1))
    box = tuple(box)
    return np.pad(pred_mask[box], 1), np.pad(gt_mask[box], 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(pred_mask, gt_mask, spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances (mm) from pred surface voxels to the gt surface and back; None if one is empty."""
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask, spacing)
    if not pred_mask.any() or not gt_mask.any():
        return None
    # Distances are Euclidean, so cropping to the joint box changes nothing and saves most work.
    pred_mask, gt_mask = _crop_to_union(pred_mask, gt_mask)
    pred_surface, gt_surface = _surface(pred_mask), _surface(gt_mask)
    spacing = tuple(float(s) for s in spacing)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_gt[pred_surface], to_pred[gt_surface]
