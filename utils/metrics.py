"""Evaluation metrics for multi-organ segmentation.

Class ids: 0 is background, 1..C-1 are organs (``utils/labels.py``); every function takes
``num_classes`` and nothing assumes 12.

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
from scipy import ndimage

from utils.labels import NUM_CLASSES
from utils.losses import annotated_mask

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
        annotated = annotated_mask(annotated, pred.shape[0], self.num_classes, pred.device)
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
