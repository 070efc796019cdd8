"""Evaluation: hand-computed scores on tiny volumes, the empty-organ conventions, folder outputs."""

import csv
import json
import math

import numpy as np
import pytest

from training import evaluate
from utils.labels import ORGAN_IDS
from utils.volume_io import save_volume

LIVER, KIDNEY, SPLEEN, BLADDER = (ORGAN_IDS[name] for name in ("liver", "kidney", "spleen", "bladder"))
ALL_ORGANS = set(range(1, 12))
SPACING = (2.0, 2.0, 5.0)  # 20 mm^3 per voxel


def _by_organ(rows):
    return {row["organ"]: row for row in rows}


def test_exact_dice_iou_and_volume_scores():
    gt = np.zeros((20, 20, 10), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[2:6, 2:6, 2:4] = LIVER     # 32 voxels
    pred[2:6, 4:8, 2:4] = LIVER   # 32 voxels, 16 shared
    rows = _by_organ(evaluate.evaluate_case(pred, gt, SPACING, ALL_ORGANS))
    liver = rows["liver"]
    assert len(rows) == 11
    assert (liver["gt_voxels"], liver["pred_voxels"]) == (32, 32)
    assert liver["dice"] == pytest.approx(0.5)  # 2 * 16 / 64
    assert liver["iou"] == pytest.approx(1 / 3)  # 16 / 48
    assert liver["volume_ratio"] == pytest.approx(1.0)
    assert liver["false_negative_rate"] == pytest.approx(0.5)
    assert liver["false_positive_ml"] == 0.0
    assert liver["hd95_mm"] > 0 and 0 < liver["surface_dice"] < 1
    assert math.isnan(rows["kidney"]["dice"])  # absent from both: not averaged


def test_perfect_prediction():
    gt = np.zeros((12, 12, 6), dtype=np.uint8)
    gt[3:8, 3:8, 1:4] = KIDNEY
    kidney = _by_organ(evaluate.evaluate_case(gt.copy(), gt, SPACING, ALL_ORGANS))["kidney"]
    assert (kidney["dice"], kidney["iou"], kidney["surface_dice"]) == (1.0, 1.0, 1.0)
    assert kidney["hd95_mm"] == 0.0 and kidney["false_negative_rate"] == 0.0


def test_false_positive_of_absent_organ_scores_zero_and_its_volume():
    gt = np.zeros((20, 20, 10), dtype=np.uint8)
    pred = np.zeros_like(gt)
    pred[0:10, 0, 0] = SPLEEN  # 10 voxels of 2 x 2 x 5 mm = 200 mm^3 = 0.2 ml
    spleen = _by_organ(evaluate.evaluate_case(pred, gt, SPACING, ALL_ORGANS))["spleen"]
    assert spleen["false_positive_ml"] == pytest.approx(0.2)
    assert (spleen["dice"], spleen["iou"], spleen["surface_dice"]) == (0.0, 0.0, 0.0)  # nnU-Net's convention
    assert math.isnan(spleen["hd95_mm"]) and math.isnan(spleen["volume_ratio"])
    assert spleen["pred_voxels"] == 10


def test_missed_organ_scores_zero():
    gt = np.zeros((10, 10, 4), dtype=np.uint8)
    gt[2:5, 2:5, 1:3] = LIVER
    liver = _by_organ(evaluate.evaluate_case(np.zeros_like(gt), gt, SPACING, ALL_ORGANS))["liver"]
    assert (liver["dice"], liver["surface_dice"], liver["false_negative_rate"], liver["volume_ratio"]) == (0, 0, 1, 0)
    assert math.isnan(liver["hd95_mm"])


def test_unannotated_organ_is_not_scored_but_keeps_its_volume():
    gt = np.zeros((10, 10, 4), dtype=np.uint8)
    gt[1:4, 1:4, 1:3] = LIVER
    pred = gt.copy()
    pred[6:8, 6:8, 1] = BLADDER  # the source does not label the bladder
    rows = _by_organ(evaluate.evaluate_case(pred, gt, SPACING, {LIVER, KIDNEY}))
    bladder = rows["bladder"]
    assert bladder["annotated"] is False and bladder["pred_voxels"] == 4
    for key in evaluate.SCORE_COLUMNS + ("gt_voxels",):
        assert math.isnan(bladder[key]), key
    assert rows["liver"]["dice"] == 1.0


def test_slice_level_dice_averages_slices_with_the_organ():
    gt = np.zeros((6, 6, 4), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 0] = LIVER   # slice 0: perfect
    pred[1:3, 1:3, 0] = LIVER
    gt[1:3, 1:3, 1] = LIVER   # slice 1: half of it, Dice 2*2/(2+4)
    pred[1:3, 1, 1] = LIVER
    pred[4, 4, 3] = LIVER     # slice 3: no liver in gt, not averaged
    dice = evaluate.slice_level_dice(pred, gt, {LIVER, KIDNEY})
    assert dice["liver"] == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(dice["kidney"]) and math.isnan(dice["bladder"])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        evaluate.evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), SPACING, ALL_ORGANS)
    with pytest.raises(ValueError, match="spacing"):
        evaluate.evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1), ALL_ORGANS)


def _write(path, labels, affine=None):
    save_volume(labels.astype(np.uint8), np.diag([*SPACING, 1.0]) if affine is None else affine, path)


def _case_volumes():
    gt = np.zeros((16, 16, 6), dtype=np.uint8)  # abdomenct1k ids: 1 liver, 2 kidney
    gt[2:8, 2:8, 1:5] = 1
    gt[10:14, 10:14, 2:4] = 2
    pred = np.zeros_like(gt)  # our ids
    pred[2:8, 2:8, 1:5] = LIVER
    pred[10:14, 10:12, 2:4] = KIDNEY  # half the kidney
    pred[0, 0, 0] = BLADDER  # an organ abdomenct1k does not label
    return pred, gt


def test_evaluate_folders_writes_outputs(tmp_path):
    pred_dir, gt_dir, out_dir = tmp_path / "pred", tmp_path / "gt", tmp_path / "out"
    pred, gt = _case_volumes()
    _write(gt_dir / "Case_00001.nii.gz", gt)
    _write(pred_dir / "Case_00001.nii.gz", pred)
    _write(gt_dir / "Case_00002.nii.gz", gt)  # no prediction: scored as a complete miss
    _write(gt_dir / "Case_00003.nii.gz", gt)
    _write(pred_dir / "Case_00003.nii.gz", pred[:, :, :5])  # wrong grid: fails, the rest runs

    summary = evaluate.evaluate_folders(pred_dir, gt_dir, "abdomenct1k", out_dir, progress=False,
                                        missing_as_miss=True)

    assert {p.name for p in out_dir.iterdir() if not p.name.startswith(".abdoseg")} == {"metrics.csv", "summary.json", "dice_per_organ.png", "report.html"}
    on_disk = json.loads((out_dir / "summary.json").read_text())
    for key in ("tolerance_mm", "cases", "mean_dice", "dice", "iou", "hd95_mm", "surface_dice",
                "false_positive_ml", "slice_dice", "missing_predictions", "failed"):
        assert key in on_disk, key
    assert on_disk["cases"] == 2 and on_disk["missing_predictions"] == ["Case_00002"]
    assert [f["case"] for f in on_disk["failed"]] == ["Case_00003"] and "grid" in on_disk["failed"][0]["error"]
    assert on_disk["dice"]["liver"] == 0.5  # (1 + the miss's 0) / 2
    assert on_disk["dice"]["kidney"] == pytest.approx((2 / 3) / 2)  # 2 * 32 / (32 + 64), and 0
    assert on_disk["dice"]["bladder"] is None  # not annotated by abdomenct1k: null, not NaN
    assert on_disk["mean_dice"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert summary["mean_dice"] == pytest.approx(on_disk["mean_dice"])

    with open(out_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 22 and rows[0]["case"] == "Case_00001" and rows[11]["case"] == "Case_00002"
    assert set(evaluate.CSV_COLUMNS) == set(rows[0])
    bladder = next(r for r in rows if r["organ"] == "bladder")
    assert bladder["annotated"] == "False" and bladder["pred_voxels"] == "1"


def test_evaluate_folders_with_empty_gt_folder_is_an_error(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    with pytest.raises(ValueError, match="no ground-truth"):
        evaluate.evaluate_folders(tmp_path / "pred", tmp_path / "gt", "full", tmp_path / "out", progress=False)


def test_boldness_report_half_an_organ(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt = np.zeros((16, 16, 6), dtype=np.uint8)  # our ids, fully labelled
    gt[2:8, 2:8, 1:5] = LIVER
    gt[10:14, 10:14, 2:4] = KIDNEY
    pred = gt.copy()
    pred[2:8, 5:8, 1:5] = 0  # half the liver missed
    _write(gt_dir / "Case_00001.nii.gz", gt)
    _write(pred_dir / "Case_00001_0000.nii.gz", pred)  # channel suffix still pairs
    report = evaluate.boldness_report(pred_dir, gt_dir, {LIVER: "pku only", KIDNEY: "both"})
    liver, kidney = report["liver"], report["kidney"]
    assert liver["trained_by"] == "pku only" and liver["cases"] == 1
    assert liver["volume_ratio"] == pytest.approx(0.5)
    assert liver["false_negative_rate"] == pytest.approx(0.5)
    assert liver["mean_true_ml"] == pytest.approx(144 * 20 / 1000)
    assert (kidney["volume_ratio"], kidney["false_negative_rate"]) == (1.0, 0.0)
    assert report["spleen"]["cases"] == 0 and math.isnan(report["spleen"]["volume_ratio"])
    with pytest.raises(ValueError, match="organ ids"):
        evaluate.boldness_report(pred_dir, gt_dir, {12: "x"})
