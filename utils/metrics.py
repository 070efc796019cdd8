"""Evaluation metrics for multi-organ segmentation.

Class ids: 0 is background, 1..C-1 are organs (``utils/labels.py``); every function takes
``num_classes`` and nothing assumes 12.

Metrics and their empty-case conventions:

- :class:`SliceMetrics` (the original project's metric, accumulated on the device): per class,
  Dice and IoU of each 2D slice *on which the class is in the ground truth*, averaged over those
  slices. A class never present gets NaN. A slice on which the class is predicted but absent from
  the ground truth is not scored by Dice but counted in ``false_positive_slices``, so false
  positives on organ-free slices stay visible.
- 3D per case (numpy): :func:`dice_iou_3d` is NaN when both masks are empty (nothing to score)
  and 0 when exactly one is, so an organ predicted where the ground truth has none scores Dice 0
  (as in nnU-Net and most challenges); :func:`hd95_mm` is NaN when either mask is empty (a
  distance to nothing is undefined): a missed organ is then counted and penalised by the
  summaries below, never skipped; :func:`surface_dice` is the normalised surface Dice of
  Nikolov et al. (2021) with surface-area weighting (``utils/surface_distance.py``), NaN when
  both are empty and 0 when exactly one is; :func:`false_positive_volume_ml` is the predicted
  volume when the ground truth is empty and 0 otherwise.
- Summaries over cases (pure functions for ``training/evaluate.py``): :func:`summarize_hd95`
  (mean with each miss counted at :func:`miss_penalty_mm`, the diagonal of the case's volume,
  plus the miss count), :func:`summarize_false_positive_volume` (over ground-truth-empty cases
  only), and :func:`organ_tolerance_mm` for per-organ surface-Dice tolerances.
- Ambiguous references (set-valued labels, ``utils/labels.py``): :func:`reference_masks` gives,
  for one class, the voxels where the reference says it certainly is and where it may be; a
  class whose two masks differ cannot be scored against that reference.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage

from utils.labels import NUM_CLASSES, scoreable_classes
from utils.partial_labels import label_sets_tensor, scoreable
from utils.surface_distance import crop_to_union, surfel_distances

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
               label_sets: torch.Tensor | None = None) -> None:
        """Add a batch of slices.

        Args:
            pred: ``(B, H, W)`` int predicted class ids.
            target: ``(B, H, W)`` int ground-truth stored values, same device.
            label_sets: optional ``(B, L, C)`` bool label sets or ``(B, C)`` annotated mask; an
                organ the item's reference does not say for certain (not scoreable: left out,
                or part of a set-valued label) is not scored (nor counted as a false positive)
                on that item. Background is always scored, as before.
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
        sets = label_sets_tensor(label_sets, pred.shape[0], self.num_classes, pred.device)
        if sets is not None:
            scored = scoreable(sets)
            scored[:, 0] = True
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
    """Normalised surface Dice (Nikolov et al. 2021) at a tolerance in mm, area-weighted.

    ``(area of pred surface within tolerance of gt + area of gt surface within tolerance of
    pred) / (area of both surfaces)``, surfaces made of surfels on the voxel-corner grid with
    marching-cubes areas (``utils/surface_distance.py``), as the DeepMind ``surface-distance``
    package and MONAI's ``compute_surface_dice(..., use_subvoxels=True)`` compute it. NaN when
    both masks are empty, 0 when exactly one is. 2D masks use contour lengths.

    Args:
        pred_mask, gt_mask: boolean volumes of the same shape (2D or 3D).
        spacing: voxel size in mm per array axis.
        tolerance_mm: distances up to and including it count as agreement (>= 0).
    """
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask, spacing)
    if not pred_mask.any() and not gt_mask.any():
        return float("nan")
    if not pred_mask.any() or not gt_mask.any():
        return 0.0
    pred_to_gt, pred_areas, gt_to_pred, gt_areas = surfel_distances(pred_mask, gt_mask, spacing)
    within = pred_areas[pred_to_gt <= tolerance_mm].sum() + gt_areas[gt_to_pred <= tolerance_mm].sum()
    return float(within / (pred_areas.sum() + gt_areas.sum()))


def _as_masks(pred_mask, gt_mask, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, gt_mask = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"masks differ in shape: {pred_mask.shape} vs {gt_mask.shape}")
    if spacing is not None and len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for {pred_mask.ndim}-D masks")
    return pred_mask, gt_mask


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(pred_mask, gt_mask, spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances (mm) from pred surface voxels to the gt surface and back; None if one is empty."""
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask, spacing)
    if not pred_mask.any() or not gt_mask.any():
        return None
    # Distances are Euclidean, so cropping to the joint box changes nothing and saves most work.
    pred_mask, gt_mask = crop_to_union(pred_mask, gt_mask)
    pred_surface, gt_surface = _surface(pred_mask), _surface(gt_mask)
    spacing = tuple(float(s) for s in spacing)
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_gt[pred_surface], to_pred[gt_surface]


# ----------------------------------------------------------------------------- summaries


def miss_penalty_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The HD95 a missed organ counts as in means: the diagonal of the case's volume in mm, the
    largest distance two points of the scan can have (BraTS scores a miss the same way, 373.13 mm
    for its 240 x 240 x 155 grid at 1 mm)."""
    if len(shape) != len(spacing):
        raise ValueError(f"spacing has {len(spacing)} entries for a {len(shape)}-D shape")
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def summarize_hd95(hd95: Sequence[float], gt_voxels: Sequence[int], pred_voxels: Sequence[int],
                   penalty_mm: float | Sequence[float]) -> dict:
    """HD95 of one organ over cases, misses counted rather than skipped.

    Cases whose ground truth lacks the organ have no reference surface and are left out (a
    prediction there is a false positive, reported by :func:`summarize_false_positive_volume`).
    A case with the organ in the ground truth and none predicted is a *miss*: its HD95 (NaN) is
    replaced by its penalty.

    Args:
        hd95: per case, :func:`hd95_mm` (NaN when a mask is empty).
        gt_voxels, pred_voxels: per case, the organ's voxel counts.
        penalty_mm: one value, or one per case (:func:`miss_penalty_mm` of each case).

    Returns:
        ``{"mean_mm": mean with misses at their penalty, "mean_detected_mm": mean over detected
        cases, "misses": int, "cases": int (cases with the organ in the ground truth)}``; means
        are NaN when there is nothing to average.
    """
    hd95, gt_voxels, pred_voxels = (np.asarray(v, dtype=np.float64) for v in (hd95, gt_voxels, pred_voxels))
    penalty = np.broadcast_to(np.asarray(penalty_mm, dtype=np.float64), hd95.shape)
    present = gt_voxels > 0
    missed = present & (pred_voxels == 0)
    detected = present & ~missed
    with_misses = np.where(missed, penalty, hd95)[present]
    return {"mean_mm": _nanmean(with_misses), "mean_detected_mm": _nanmean(hd95[detected]),
            "misses": int(missed.sum()), "cases": int(present.sum())}


def summarize_false_positive_volume(false_positive_ml: Sequence[float],
                                    gt_voxels: Sequence[int]) -> dict:
    """False-positive volume of one organ over the cases whose ground truth lacks it (elsewhere
    it is 0 by definition and would only dilute the mean).

    Returns:
        ``{"mean_ml": mean over those cases (NaN if none), "cases": their number,
        "cases_with_false_positive": how many of them have a prediction}``.
    """
    volume = np.asarray(false_positive_ml, dtype=np.float64)
    absent = np.asarray(gt_voxels, dtype=np.float64) == 0
    return {"mean_ml": _nanmean(volume[absent]), "cases": int(absent.sum()),
            "cases_with_false_positive": int((volume[absent] > 0).sum())}


def organ_tolerance_mm(tolerance_mm: float | Mapping[str, float], organ: str) -> float:
    """The surface-Dice tolerance of ``organ``: one value for all, or a per-organ mapping
    (e.g. ``{"liver": 5.0, "pancreas": 2.0, ...}``). Raises ValueError for an organ the mapping
    lacks or a negative tolerance."""
    value = tolerance_mm.get(organ) if isinstance(tolerance_mm, Mapping) else tolerance_mm
    if value is None:
        raise ValueError(f"no surface-Dice tolerance for organ '{organ}' in {dict(tolerance_mm)}")
    if not value >= 0:
        raise ValueError(f"surface-Dice tolerance for '{organ}' must be >= 0 mm, got {value}")
    return float(value)


def reference_masks(reference: np.ndarray, label_sets: np.ndarray,
                    class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a reference with set-valued labels says one class certainly is, and may be.

    Args:
        reference: integer stored values, any shape (e.g. a remapped TotalSegmentator mask).
        label_sets: ``(L, C)`` bool, its source's ``label_sets()``.
        class_id: the class.

    Returns:
        ``(certain, possible)`` boolean arrays of the reference's shape: ``certain`` where the
        voxel's set is the class alone, ``possible`` where the set holds it. Outside
        ``possible`` the class is certainly absent. When the two differ the class cannot be
        scored against this reference (Dice, HD95, surface Dice); a prediction outside
        ``possible`` is still a certain false positive.
    """
    label_sets = np.asarray(label_sets, dtype=bool)
    possible_rows = label_sets[:, class_id]
    certain_rows = possible_rows & (label_sets.sum(axis=1) == 1)
    return certain_rows[reference], possible_rows[reference]


def case_dice_3d(pred: np.ndarray, reference: np.ndarray, label_sets: np.ndarray,
                 num_classes: int) -> np.ndarray:
    """Per-organ 3D Dice of one case, false positives counted: what chooses ``best.pt``.

    Args:
        pred: ``(Z, H, W)`` (any shape) predicted class ids.
        reference: stored label values, same shape.
        label_sets: ``(L, C)`` bool, the case's label sets; organs it cannot score
            (``utils.labels.scoreable_classes``) are NaN.
        num_classes: C.

    Returns:
        ``(C - 1,)`` float64 for organs 1..C-1: :func:`dice_iou_3d`'s Dice (0 for an organ
        predicted where the reference has none, NaN when neither has it).
    """
    pred, reference = np.asarray(pred), np.asarray(reference)
    if pred.shape != reference.shape:
        raise ValueError(f"prediction {pred.shape} and reference {reference.shape} differ in shape")
    scoreable = scoreable_classes(label_sets)  # (C,)
    dice = np.full(num_classes - 1, np.nan)
    for organ in range(1, num_classes):
        if scoreable[organ]:
            dice[organ - 1] = dice_iou_3d(pred == organ, reference == organ)[0]
    return dice
