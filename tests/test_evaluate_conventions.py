"""Evaluation conventions comparable with papers: HD95 misses at a stated penalty, false-positive
volume over ground-truth-empty cases, Dice 0 on an organ predicted where the truth has none,
per-organ tolerances, and organs a set-valued reference cannot score."""

import json
import math

import numpy as np
import pytest

from training import evaluate
from utils.labels import ORGAN_IDS, TOTALSEG_IDS, get_source
from utils.volume_io import save_volume

LIVER, KIDNEY, SPLEEN = (ORGAN_IDS[name] for name in ("liver", "kidney", "spleen"))
SPACING = (2.0, 2.0, 5.0)


def _write(path, labels):
    save_volume(labels.astype(np.uint8), np.diag([*SPACING, 1.0]), path)


def _two_cases(tmp_path):
    """Case 1: liver found, spleen predicted though absent (10 voxels = 0.2 ml).
    Case 2: liver missed entirely, no spleen anywhere."""
    gt = np.zeros((12, 10, 6), dtype=np.uint8)
    gt[2:6, 2:6, 1:4] = LIVER
    found = gt.copy()
    found[8, 0:10, 0] = SPLEEN
    for case, pred in (("Case_00001", found), ("Case_00002", np.zeros_like(gt))):
        _write(tmp_path / "gt" / f"{case}.nii.gz", gt)
        _write(tmp_path / "pred" / f"{case}.nii.gz", pred)
    return evaluate.evaluate_folders(tmp_path / "pred", tmp_path / "gt", "full", tmp_path / "out", progress=False)


def test_hd95_miss_counts_at_the_volume_diagonal(tmp_path):
    summary = _two_cases(tmp_path)
    diagonal = math.sqrt((12 * 2.0) ** 2 + (10 * 2.0) ** 2 + (6 * 5.0) ** 2)
    assert summary["hd95_missed"]["liver"] == 1 and summary["hd95_cases"]["liver"] == 2
    assert summary["hd95_detected_mm"]["liver"] == 0.0  # the found liver is perfect
    assert summary["hd95_mm"]["liver"] == pytest.approx(diagonal / 2)  # (0 + penalty) / 2
    assert summary["dice"]["liver"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_false_positive_volume_over_ground_truth_empty_cases_and_dice_zero(tmp_path):
    summary = _two_cases(tmp_path)
    # both cases lack the spleen; one predicts 0.2 ml of it: mean 0.1 over the 2 empty cases
    assert summary["false_positive_ml"]["spleen"] == pytest.approx(0.1)
    assert summary["false_positive_cases"]["spleen"] == 2
    assert summary["dice"]["spleen"] == 0.0  # case 1: 0; case 2: absent from both, not averaged
    assert math.isnan(summary["false_positive_ml"]["liver"])  # no case lacks the liver
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(on_disk["conventions"]) >= {"dice", "hd95_mm", "false_positive_ml", "surface_dice"}
    assert on_disk["false_positive_ml"]["liver"] is None and on_disk["not_scored"] == []


def test_per_organ_tolerance_changes_only_that_organ():
    gt = np.zeros((20, 20, 8), dtype=np.uint8)
    gt[4:12, 4:12, 2:6] = LIVER
    gt[14:18, 14:18, 2:6] = KIDNEY
    pred = np.roll(gt, 1, axis=0)  # one 2 mm shift of both organs
    tight = {name: 0.0 for name in ORGAN_IDS if name != "background"}
    loose = {**tight, "liver": 2.0}
    rows_tight = {r["organ"]: r for r in evaluate.evaluate_case(pred, gt, SPACING, {LIVER, KIDNEY}, tight)}
    rows_loose = {r["organ"]: r for r in evaluate.evaluate_case(pred, gt, SPACING, {LIVER, KIDNEY}, loose)}
    assert rows_loose["liver"]["surface_dice"] == pytest.approx(1.0)
    assert rows_tight["liver"]["surface_dice"] < 1.0
    assert rows_tight["kidney"]["surface_dice"] == rows_loose["kidney"]["surface_dice"]
    with pytest.raises(ValueError, match="tolerance"):
        evaluate.evaluate_case(pred, gt, SPACING, {LIVER}, {"kidney": 1.0})


def test_totalseg_colon_and_femur_are_not_scored(tmp_path):
    assert {"colon", "rectum", "femur_head"}.isdisjoint(
        evaluate.ORGANS[i] for i in evaluate.scored_organs(get_source("totalseg")))
    gt = np.zeros((10, 10, 4), dtype=np.uint8)
    colon_id = next(i for i, name in TOTALSEG_IDS.items() if name == "colon")
    liver_id = next(i for i, name in TOTALSEG_IDS.items() if name == "liver")
    gt[1:4, 1:4, 1:3] = liver_id
    gt[6:9, 6:9, 1:3] = colon_id
    pred = np.zeros_like(gt)
    pred[1:4, 1:4, 1:3] = LIVER
    pred[6:9, 6:9, 1:3] = ORGAN_IDS["rectum"]  # may well be right: the colon label holds the rectum
    _write(tmp_path / "gt" / "Case_00001.nii.gz", gt)
    _write(tmp_path / "pred" / "Case_00001.nii.gz", pred)
    summary = evaluate.evaluate_folders(tmp_path / "pred", tmp_path / "gt", "totalseg", tmp_path / "out",
                                        progress=False)
    assert summary["dice"]["liver"] == 1.0
    assert math.isnan(summary["dice"]["colon"]) and math.isnan(summary["dice"]["rectum"])
    assert set(summary["not_scored"]) == {"colon", "femur_head"}
