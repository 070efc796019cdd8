"""Metrics: hand-computed slice Dice/IoU, 3D Dice, HD95, surface Dice and their empty cases."""

import math
import os

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from utils.labels import get_source
from utils.metrics import (
    SliceMetrics,
    dice_iou_3d,
    false_positive_volume_ml,
    hd95_mm,
    miss_penalty_mm,
    organ_tolerance_mm,
    reference_masks,
    summarize_false_positive_volume,
    summarize_hd95,
    surface_dice,
)
from utils.surface_distance import surfel_measure_table


def _monai_surface_dice():
    """MONAI's compute_surface_dice (a test-only dependency), or a skip (a failure in CI)."""
    try:
        from monai.metrics import compute_surface_dice
    except ImportError:
        reason = "monai is not installed (pip install monai): the cross-check against it is skipped"
        if os.environ.get("ABDOSEG_REQUIRE_DATA") == "1":
            pytest.fail(reason + "; ABDOSEG_REQUIRE_DATA=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    return compute_surface_dice


def _monai_nsd(pred, gt, spacing, tolerance):
    compute_surface_dice = _monai_surface_dice()
    onehot = [torch.from_numpy(np.stack([~m, m])[None]) for m in (pred, gt)]  # (1, 2, ...)
    value = compute_surface_dice(*onehot, class_thresholds=[tolerance], spacing=tuple(spacing),
                                 use_subvoxels=True)
    return float(value[0, 0])

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


def test_surfel_areas_by_hand():
    spacing = (0.8, 1.5, 3.0)
    table = surfel_measure_table(spacing)  # 3D codes: bit b = corner itertools.product((0,1), 3)[b]
    corner_only = 0.125 * math.sqrt((1.5 * 3.0) ** 2 + (0.8 * 3.0) ** 2 + (0.8 * 1.5) ** 2)
    assert table[0b00000001] == pytest.approx(corner_only)  # one voxel in: a corner triangle
    assert table[0b00001111] == pytest.approx(1.5 * 3.0)  # the four with axis-0 index 0: a face
    # two voxels along axis 2: a strip of length 3.0 across the cell's axis-0/axis-1 diagonal
    assert table[0b00000011] == pytest.approx(math.hypot(0.5 * 3.0 * 1.5, 0.5 * 3.0 * 0.8))
    assert table[0] == 0 and table[255] == 0
    # one voxel: eight corner triangles, a closed octahedron
    voxel = np.zeros((3, 3, 3), dtype=bool)
    voxel[1, 1, 1] = True
    assert surface_dice(voxel, voxel, spacing, 0.0) == 1.0


def test_surface_dice_weights_surfels_by_length_by_hand():
    # 2D, spacing (3, 0.8): a 2x2 square and the same square one row (3 mm) down. Corner grid:
    # each contour has 4 vertex corners of length v = |(0.5 * 3, 0.5 * 0.8)| = sqrt(2.41),
    # 2 side corners of length 3 and 2 end corners of length 0.8: total 4v + 7.6. At 2 mm
    # tolerance, of each contour the two side corners (0 mm), two vertices (0 mm) and one end
    # corner (0.8 mm) agree: 6.8 + 2v; the other three corners are 3 mm away.
    first = np.zeros((5, 4), dtype=bool)
    first[1:3, 1:3] = True
    second = np.roll(first, 1, axis=0)
    v = math.sqrt(2.41)
    expected = (6.8 + 2 * v) / (7.6 + 4 * v)  # 0.7172; counting corners: 5/8 = 0.625
    assert surface_dice(first, second, (3.0, 0.8), 2.0) == pytest.approx(expected)
    assert surface_dice(first, second, (3.0, 0.8), 3.0) == pytest.approx(1.0)
    assert surface_dice(first, second, (3.0, 0.8), 0.5) == pytest.approx((6 + 2 * v) / (7.6 + 4 * v))


def test_surface_dice_of_one_slice_shift_on_an_anisotropic_grid():
    # A 10 x 10 x 4 voxel box on a 0.8 x 0.8 x 3 mm grid, shifted by one slice, 1 mm tolerance:
    # area weighting gives 0.728, where counting boundary voxels gave 0.500.
    box = np.zeros((16, 16, 8), dtype=bool)
    box[3:13, 3:13, 2:6] = True
    shifted = np.roll(box, 1, axis=2)
    assert surface_dice(box, shifted, (0.8, 0.8, 3.0), 1.0) == pytest.approx(0.728, abs=5e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation notice, not ours
def test_surface_dice_matches_monai_with_subvoxels_on_anisotropic_cases():
    _monai_surface_dice()
    rng = np.random.default_rng(0)
    box = np.zeros((16, 16, 8), dtype=bool)
    box[3:13, 3:13, 2:6] = True
    cases = [(box, np.roll(box, 1, axis=2), (0.8, 0.8, 3.0), 1.0),
             (A, B, SPACING, 2.0)]
    for _ in range(3):
        pred = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.55)
        gt = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.6)
        gt[0, :4, :4] = True  # touches the array edge
        cases.append((pred, gt, tuple(rng.uniform(0.5, 3.0, 3)), float(rng.uniform(0.5, 4.0))))
    for pred, gt, spacing, tolerance in cases:
        assert surface_dice(pred, gt, spacing, tolerance) == pytest.approx(
            _monai_nsd(pred, gt, spacing, tolerance), abs=1e-5)


def test_surfel_table_matches_monai_for_every_code():
    _monai_surface_dice()
    import itertools

    from monai.metrics.utils import (
        ENCODING_KERNEL,
        create_table_neighbour_code_to_surface_area,
    )
    corners = list(itertools.product((0, 1), repeat=3))
    kernel = np.asarray(ENCODING_KERNEL[3])
    for spacing in [(1.0, 1.0, 1.0), (0.8, 0.8, 3.0), (2.5, 0.7, 1.3)]:
        theirs = create_table_neighbour_code_to_surface_area(spacing)[0].numpy()
        ours = surfel_measure_table(spacing)
        for code in range(256):
            their_code = sum(int(kernel[c]) for b, c in enumerate(corners) if code >> b & 1)
            assert ours[code] == pytest.approx(theirs[their_code], rel=1e-6, abs=1e-6)


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


def test_cropped_hd95_matches_brute_force_on_blobs():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.3)
    for _ in range(3):
        pred = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.55)
        gt = ndimage.binary_opening(rng.random((14, 16, 12)) > 0.6)
        gt[0, :4, :4] = True  # touches the array edge: the edge counts as outside
        to_gt, to_pred = _reference_surface_distances(pred, gt, spacing)
        expected_hd95 = max(np.percentile(to_gt, 95), np.percentile(to_pred, 95))
        assert hd95_mm(pred, gt, spacing) == pytest.approx(expected_hd95)


def test_false_positive_volume_ml():
    empty = np.zeros_like(A)
    assert false_positive_volume_ml(A, empty, SPACING) == pytest.approx(64 * 2.0 / 1000)  # 0.128 ml
    assert false_positive_volume_ml(A, B, SPACING) == 0.0
    assert false_positive_volume_ml(empty, empty, SPACING) == 0.0


def test_summarize_hd95_counts_misses_at_the_penalty():
    # Cases: detected 4 mm; detected 6 mm; missed (GT present, nothing predicted); GT empty with a
    # spurious prediction (left out: no reference surface); GT and prediction empty.
    hd95 = [4.0, 6.0, math.nan, math.nan, math.nan]
    gt_voxels, pred_voxels = [10, 12, 9, 0, 0], [11, 10, 0, 5, 0]
    summary = summarize_hd95(hd95, gt_voxels, pred_voxels, penalty_mm=[100.0, 100.0, 200.0, 50.0, 50.0])
    assert summary == {"mean_mm": pytest.approx((4 + 6 + 200) / 3), "mean_detected_mm": 5.0,
                       "misses": 1, "cases": 3}
    none = summarize_hd95([math.nan], [0], [0], 10.0)
    assert none["cases"] == 0 and math.isnan(none["mean_mm"]) and math.isnan(none["mean_detected_mm"])


def test_miss_penalty_is_the_volume_diagonal():
    assert miss_penalty_mm((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=5e-3)  # BraTS
    assert miss_penalty_mm((3, 4), (1.0, 1.0)) == 5.0
    with pytest.raises(ValueError, match="spacing"):
        miss_penalty_mm((3, 4, 5), (1.0, 1.0))


def test_false_positive_volume_is_summarized_over_ground_truth_empty_cases_only():
    summary = summarize_false_positive_volume([0.0, 0.0, 2.0, 0.0], gt_voxels=[5, 0, 0, 0])
    assert summary == {"mean_ml": pytest.approx(2.0 / 3), "cases": 3, "cases_with_false_positive": 1}
    assert math.isnan(summarize_false_positive_volume([0.0], [4])["mean_ml"])


def test_organ_tolerance():
    assert organ_tolerance_mm(2.0, "liver") == 2.0
    assert organ_tolerance_mm({"liver": 5.0, "pancreas": 1.5}, "pancreas") == 1.5
    with pytest.raises(ValueError, match="spleen"):
        organ_tolerance_mm({"liver": 5.0}, "spleen")
    with pytest.raises(ValueError, match=">= 0"):
        organ_tolerance_mm(-1.0, "liver")


def test_reference_masks_of_a_set_valued_reference():
    # TotalSegmentator stored values: 0 {bg, rectum}, 2 {colon, rectum}, 3 {femur head, bg}, 5 liver
    sets = get_source("totalseg").label_sets()
    reference = np.array([0, 2, 3, 5])
    certain, possible = reference_masks(reference, sets, 2)  # colon
    assert certain.tolist() == [False, False, False, False] and possible.tolist() == [False, True, False, False]
    certain, possible = reference_masks(reference, sets, 6)  # rectum may hide in 0 and in the colon
    assert possible.tolist() == [True, True, False, False] and not certain.any()
    certain, possible = reference_masks(reference, sets, 5)  # liver: certain, scoreable
    assert (certain == possible).all() and certain.tolist() == [False, False, False, True]


def test_slice_metrics_skip_classes_of_set_valued_labels():
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]  # (1, 12, 12)
    target = torch.tensor([[[2, 2], [5, 0]]])  # colon(+rectum), liver, background(+rectum)
    pred = torch.tensor([[[2, 6], [5, 0]]])
    metrics = SliceMetrics(12)
    metrics.update(pred, target, sets)
    result = metrics.compute()
    assert result["dice"][5] == 1.0
    assert math.isnan(result["dice"][2]) and result["false_positive_slices"][6] == 0  # not scored
    assert result["present_slices"][0] == 1  # background is scored as before


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
