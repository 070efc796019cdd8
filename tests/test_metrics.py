"""Metrics: hand-computed slice Dice/IoU, 3D Dice, HD95, surface Dice and their empty cases."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from utils.metrics import (
    SliceMetrics,
    dice_iou_3d,
    false_positive_volume_ml,
    hd95_mm,
    surface_dice,
)

# Two 2x2 slices, four classes (class 3 never appears in the ground truth).
TARGET = torch.tensor([[[1, 1], [0, 0]],
                       [[1, 0], [0, 0]]])
PRED = torch.tensor([[[1, 0], [0, 2]],
                     [[1, 1], [1, 2]]])
# slice 1: class 0 gt {(1,0),(1,1)} pred {(0,1),(1,0)}: dice 2*1/4 = 1/2, iou 1/3
#          class 1 gt {(0,0),(0,1)} pred {(0,0)}:      dice 2*1/3 = 2/3, iou 1/2
#          class 2 predicted at (1,1) but absent:     a false-positive slice
# slice 2: class 0 gt 3 pixels, predicted nowhere:    dice 0, iou 0
#          class 1 gt {(0,0)} pred 3 pixels:          dice 2*1/4 = 1/2, iou 1/3
#          class 2 predicted at (1,1) but absent:     a false-positive slice


def test_slice_metrics_hand_computed():
    metrics = SliceMetrics(4)
    metrics.update(PRED[:1], TARGET[:1])  # two updates accumulate like one
    metrics.update(PRED[1:], TARGET[1:])
    result = metrics.compute()
    assert result["dice"][:2] == pytest.approx([(1 / 2 + 0) / 2, (2 / 3 + 1 / 2) / 2])
    assert result["iou"][:2] == pytest.approx([(1 / 3 + 0) / 2, (1 / 2 + 1 / 3) / 2])
    # classes 2 and 3 are never in the ground truth
    assert math.isnan(result["dice"][2]) and math.isnan(result["dice"][3])
    assert math.isnan(result["iou"][3])
    assert result["mean_dice"] == pytest.approx(7 / 12)  # organs 1..3, NaNs skipped
    assert result["present_slices"] == [2, 2, 0, 0]
    assert result["false_positive_slices"] == [0, 0, 2, 0]


def test_slice_metrics_organ_free_slice_keeps_its_false_positive():
    metrics = SliceMetrics(3)
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    prediction = empty.clone()
    prediction[0, 1, 1] = 2
    metrics.update(prediction, empty)
    result = metrics.compute()
    assert result["false_positive_slices"] == [0, 0, 1]
    assert math.isnan(result["dice"][2]) and math.isnan(result["mean_dice"])
    assert result["dice"][0] == pytest.approx(2 * 15 / 31)


def test_slice_metrics_skip_unannotated_classes():
    metrics = SliceMetrics(4)
    annotated = torch.tensor([[True, True, True, True], [True, False, False, True]])
    metrics.update(PRED, TARGET, annotated)
    result = metrics.compute()
    assert result["dice"][1] == pytest.approx(2 / 3)  # slice 2 does not score class 1
    assert result["false_positive_slices"] == [0, 0, 1, 0]  # nor count class 2 there


def test_slice_metrics_before_any_update_and_after_reset():
    metrics = SliceMetrics(3)
    assert all(math.isnan(v) for v in metrics.compute()["dice"])
    metrics.update(PRED.clamp(max=2), TARGET)
    metrics.reset()
    assert metrics.compute()["present_slices"] == [0, 0, 0]


def test_slice_metrics_update_needs_no_host_sync():
    # Meta tensors hold no data: any .item() or host copy inside update would raise.
    metrics = SliceMetrics(4)
    annotated = torch.ones(2, 4, dtype=torch.bool, device="meta")
    metrics.update(PRED.to("meta"), TARGET.to("meta"), annotated)


def test_slice_metrics_bad_shapes_raise():
    with pytest.raises(ValueError, match="B, H, W"):
        SliceMetrics(4).update(PRED, TARGET[:, :1])


def _cube(shape, corner, side=4):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


# Two 4x4x4 cubes offset by 2 voxels along axis 0, spacing 2 mm along that axis.
# Surface voxels per cube: 64 - 8 = 56. Their distances to the other surface:
#   24 voxels 0 mm (the shared lateral rings), 4 voxels 1 mm (inner face, 1 voxel from the side),
#   12 voxels 2 mm (ring 1 voxel before the other cube), 16 voxels 4 mm (the far face).
A = _cube((12, 10, 10), (2, 3, 3))
B = _cube((12, 10, 10), (4, 3, 3))
SPACING = (2.0, 1.0, 1.0)


def test_dice_iou_3d_values_and_empty_conventions():
    assert dice_iou_3d(A, B) == pytest.approx((2 * 32 / 128, 32 / 96))
    assert dice_iou_3d(A, A) == (1.0, 1.0)
    empty = np.zeros_like(A)
    assert dice_iou_3d(A, empty) == (0.0, 0.0) and dice_iou_3d(empty, A) == (0.0, 0.0)
    assert all(math.isnan(v) for v in dice_iou_3d(empty, empty))


def test_hd95_of_offset_cubes():
    # 16 of 56 distances (29% > 5%) are the largest, 4 mm, so the 95th percentile is 4 mm.
    assert hd95_mm(A, B, SPACING) == pytest.approx(4.0)
    shifted = _cube((12, 10, 10), (2, 5, 3))  # 2 voxels along axis 1, 3 mm each
    assert hd95_mm(A, shifted, (2.0, 3.0, 1.0)) == pytest.approx(6.0)
    assert hd95_mm(A, A, SPACING) == 0.0


def test_hd95_empty_is_nan():
    empty = np.zeros_like(A)
    assert math.isnan(hd95_mm(A, empty, SPACING))
    assert math.isnan(hd95_mm(empty, A, SPACING))
    assert math.isnan(hd95_mm(empty, empty, SPACING))


@pytest.mark.parametrize("tolerance, expected", [(0.0, 48 / 112), (1.0, 56 / 112), (2.0, 80 / 112),
                                                 (3.0, 80 / 112), (4.0, 1.0), (50.0, 1.0)])
def test_surface_dice_of_offset_cubes(tolerance, expected):
    assert surface_dice(A, B, SPACING, tolerance) == pytest.approx(expected)


def test_surface_dice_empty_conventions():
    empty = np.zeros_like(A)
    assert surface_dice(A, empty, SPACING, 1.0) == 0.0
    assert surface_dice(empty, A, SPACING, 1.0) == 0.0
    assert math.isnan(surface_dice(empty, empty, SPACING, 1.0))


def _reference_surface_distances(pred, gt, spacing):
    """Brute force on the full, uncropped volume: all pairwise distances between surface voxels."""
    def surface_points(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)
    distances = cdist(surface_points(pred), surface_points(gt))
    return distances.min(axis=1), distances.min(axis=0)


def test_cropped_distances_match_brute_force_on_blobs():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.3)
    for _ in range(3):
        pred = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.55)
        gt = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.6)
        gt[0, :4, :4] = True  # touches the array edge: the edge counts as outside
        to_gt, to_pred = _reference_surface_distances(pred, gt, spacing)
        expected_hd95 = max(np.percentile(to_gt, 95), np.percentile(to_pred, 95))
        assert hd95_mm(pred, gt, spacing) == pytest.approx(expected_hd95)
        expected_nsd = ((to_gt <= 2.0).sum() + (to_pred <= 2.0).sum()) / (to_gt.size + to_pred.size)
        assert surface_dice(pred, gt, spacing, 2.0) == pytest.approx(expected_nsd)


def test_false_positive_volume_ml():
    empty = np.zeros_like(A)
    assert false_positive_volume_ml(A, empty, SPACING) == pytest.approx(64 * 2.0 / 1000)  # 0.128 ml
    assert false_positive_volume_ml(A, B, SPACING) == 0.0
    assert false_positive_volume_ml(empty, empty, SPACING) == 0.0


def test_3d_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        dice_iou_3d(A, A[:-1])
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(A, B, (1.0, 1.0))


def test_slice_metrics_all_reduce_in_a_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        metrics, idle_rank = SliceMetrics(4), SliceMetrics(4)
        metrics.update(PRED, TARGET)
        before = metrics.compute()
        metrics.all_reduce()
        idle_rank.all_reduce()  # a rank that saw no batch contributes zeros
        assert metrics.compute()["false_positive_slices"] == before["false_positive_slices"]
        assert metrics.compute()["dice"][:2] == pytest.approx(before["dice"][:2])
        assert idle_rank.compute()["present_slices"] == [0, 0, 0, 0]
    finally:
        dist.destroy_process_group()
