"""Score predicted label volumes against ground truth: per case and organ, then summarised.

``evaluate_folders`` pairs ``pred_dir/<case>.nii.gz`` with the ground truth of the same case id in
``gt_dir`` (``utils.case_files.match_cases``, so ``Case_00012_0000.nii.gz`` pairs too),
remaps the ground truth from its source's ids to ours (``utils.labels``), and writes:

- ``metrics.csv``: one row per case and organ (columns of :func:`evaluate_case` plus ``case``
  and ``slice_dice``);
- ``summary.json``: per-organ summaries over cases (:func:`summarize`), the overall
  ``mean_dice``, the organs not scored and the conventions below in words (``conventions``);
- ``dice_per_organ.png``: the per-organ mean Dice as a bar chart.

Conventions (the metric functions are in ``utils/metrics.py``):

- Arrays are canonical ``(X, Y, Z)``; distances use the voxel spacing along those axes. The
  prediction and ground truth must be on the same grid (``load_mask`` checks it to 1e-3 mm), so
  the spacing read from the prediction's header is the ground truth's.
- Organs the ground-truth source does not annotate are *not scored*: a 0 in their mask means
  "not labelled", not "absent". Nor are organs its labels name only as part of a set
  (TotalSegmentator's colon, which includes the rectum, and its whole femur for our femur head:
  ``utils.labels.scoreable_classes``). Their rows have ``annotated`` False, NaN scores (and NaN
  ``gt_voxels``) but keep ``pred_voxels``.
- Dice, IoU and surface Dice are 0 for an organ predicted where the ground truth has none (as in
  nnU-Net and most challenges) and NaN only when neither has it, so NaN-means over cases
  average the cases that contain or predict the organ. ``false_positive_ml`` is the predicted
  volume of an organ the ground truth lacks (> 0 exactly then); the summary averages it over
  the ground-truth-empty cases only.
- An organ present but not predicted scores Dice, IoU and surface Dice 0; its ``hd95_mm`` is NaN
  (no surface to measure from) and the summary counts it as a miss (``hd95_missed``) whose HD95
  in the mean is the case's volume diagonal (``hd95_penalty_mm``, ``utils.metrics.miss_penalty_mm``);
  ``hd95_detected_mm`` is the mean over detected cases. A case without the organ in the ground
  truth has no HD95.
- Surface Dice is Nikolov et al.'s normalised surface Dice (area-weighted); the tolerance is one
  value in mm or one per organ name.
- ``volume_ratio`` = predicted / true volume and ``false_negative_rate`` = fraction of true
  voxels not predicted; both NaN when the ground truth is empty.
- ``slice_dice`` is the original project's metric: per organ, the 2D Dice averaged over the
  axial slices whose ground truth contains the organ.
- Means are NaN-means; a mean with nothing to average is NaN in the CSV and null in the JSON.

Outputs are written atomically (``utils.files``). A case that cannot be
read or scored is listed under ``failed`` in the summary and the other cases still run.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.report import write_report
from training.visualization import dice_bar_chart, save_figure
from utils.case_files import match_cases, nifti_files
from utils.errors import UserError, one_line_reason
from utils.files import write_json, write_text
from utils.labels import NUM_CLASSES, ORGANS, get_source, scoreable_classes
from utils.metrics import (dice_iou_3d, false_positive_volume_ml, hd95_mm, miss_penalty_mm, organ_tolerance_mm,
                           summarize_false_positive_volume, summarize_hd95, surface_dice)
from utils.option_checks import check_positive
from utils.output_folder import claim_output_folder
from utils.volume_io import load_ct, load_mask

ORGAN_RANGE = range(1, NUM_CLASSES)
SCORE_COLUMNS = ("dice", "iou", "hd95_mm", "surface_dice", "false_positive_ml", "volume_ratio",
                 "false_negative_rate")
CASE_COLUMNS = ("organ_id", "organ", "annotated", "gt_voxels", "pred_voxels") + SCORE_COLUMNS + ("hd95_penalty_mm",)
CSV_COLUMNS = ("case",) + CASE_COLUMNS + ("slice_dice",)
SUMMARY_METRICS = ("dice", "iou", "surface_dice", "slice_dice")  # plain NaN-means over cases
CONVENTIONS = {
    "dice": "0 when the organ is predicted but absent from the ground truth, NaN (not averaged) "
            "when absent from both; same for iou and surface_dice",
    "surface_dice": "normalised surface Dice, surface-area weighted (Nikolov et al. 2021), at tolerance_mm",
    "hd95_mm": "mean over cases with the organ in the ground truth; a miss (nothing predicted) "
               "counts as hd95_penalty_mm, the diagonal of the case's volume; hd95_missed counts them",
    "false_positive_ml": "mean predicted volume over the cases whose ground truth lacks the organ",
    "not_scored": "organs the ground-truth source leaves out or labels only as part of a set",
}
NAN = float("nan")


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing, annotated, tolerance_mm=2.0) -> list[dict]:
    """Per-organ scores of one case.

    Args:
        pred: ``(X, Y, Z)`` predicted class ids 0..11.
        gt: ``(X, Y, Z)`` ground-truth class ids 0..11 (already remapped to ours).
        spacing: voxel size ``(sx, sy, sz)`` in mm along the array axes.
        annotated: organ ids the ground truth scores (labels each with certainty); the others
            are not scored.
        tolerance_mm: surface Dice tolerance, one value or ``{organ name: mm}``.

    Returns:
        11 dicts (organs 1..11) with keys ``CASE_COLUMNS``: ``organ_id``, ``organ`` (name),
        ``annotated``, ``gt_voxels``, ``pred_voxels``, ``dice``, ``iou``, ``hd95_mm``,
        ``surface_dice``, ``false_positive_ml``, ``volume_ratio``, ``false_negative_rate``,
        ``hd95_penalty_mm`` (conventions in the module docstring).
    """
    pred, gt = _check_pair(pred, gt)
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (mm along X, Y, Z), got {spacing}")
    annotated = {int(i) for i in annotated}
    penalty = miss_penalty_mm(gt.shape, spacing)
    rows = []
    for organ in ORGAN_RANGE:
        pred_mask = pred == organ
        row = {"organ_id": organ, "organ": ORGANS[organ], "annotated": organ in annotated,
               "gt_voxels": NAN, "pred_voxels": int(pred_mask.sum()), **dict.fromkeys(SCORE_COLUMNS, NAN),
               "hd95_penalty_mm": penalty}
        if organ in annotated:
            tolerance = organ_tolerance_mm(tolerance_mm, ORGANS[organ])
            row.update(_organ_scores(pred_mask, gt == organ, spacing, tolerance))
        rows.append(row)
    return rows


def _organ_scores(pred_mask, gt_mask, spacing, tolerance_mm: float) -> dict:
    """Scores of one annotated organ (boolean masks of the same shape)."""
    gt_voxels, pred_voxels = int(gt_mask.sum()), int(pred_mask.sum())
    dice, iou = dice_iou_3d(pred_mask, gt_mask)  # 0 when exactly one is empty, NaN when both
    scores = {"gt_voxels": gt_voxels, "false_positive_ml": false_positive_volume_ml(pred_mask, gt_mask, spacing),
              "dice": dice, "iou": iou, "surface_dice": surface_dice(pred_mask, gt_mask, spacing, tolerance_mm)}
    if gt_voxels == 0:  # absent organ: no reference surface or volume; a false positive shows above
        return scores
    missed = int(np.count_nonzero(gt_mask & ~pred_mask))
    scores.update(hd95_mm=hd95_mm(pred_mask, gt_mask, spacing),
                  volume_ratio=pred_voxels / gt_voxels, false_negative_rate=missed / gt_voxels)
    return scores


def slice_level_dice(pred: np.ndarray, gt: np.ndarray, annotated) -> dict[str, float]:
    """The original project's metric: per organ, mean 2D Dice over the axial slices where the
    ground truth contains the organ.

    Args:
        pred, gt: ``(X, Y, Z)`` class ids; slices are ``[:, :, z]``.
        annotated: organ ids the ground truth labels.

    Returns:
        ``{organ name: Dice}`` for organs 1..11; NaN for organs not annotated or never present.
    """
    pred, gt = _check_pair(pred, gt)
    annotated = {int(i) for i in annotated}
    result = {}
    for organ in ORGAN_RANGE:
        if organ not in annotated:
            result[ORGANS[organ]] = NAN
            continue
        pred_mask, gt_mask = pred == organ, gt == organ
        gt_area = gt_mask.sum(axis=(0, 1))  # (Z,)
        present = gt_area > 0
        if not present.any():
            result[ORGANS[organ]] = NAN
            continue
        pred_area = pred_mask.sum(axis=(0, 1))
        overlap = (pred_mask & gt_mask).sum(axis=(0, 1))
        result[ORGANS[organ]] = float(np.mean(2 * overlap[present] / (pred_area[present] + gt_area[present])))
    return result


OUTPUT_FILES = ("metrics.csv", "summary.json", "dice_per_organ.png", "report.html")


def evaluate_folders(pred_dir, gt_dir, source: str, out_dir, label_map=None, tolerance_mm=2.0,
                     progress: bool = True, missing_as_miss: bool = False, overwrite: bool = False) -> dict:
    """Score every ground-truth case in ``gt_dir`` against its prediction in ``pred_dir``.

    Args:
        pred_dir: folder of predicted label NIfTIs in our ids, named ``<case>.nii.gz``.
        gt_dir: folder of ground-truth label NIfTIs in ``source``'s ids.
        source: ground-truth source name (``utils.labels.SOURCES``); decides the id mapping and
            which organs are scored (:func:`scored_organs`).
        out_dir: where ``metrics.csv``, ``summary.json`` and ``dice_per_organ.png`` go.
        label_map: label-map JSON for ``pku`` / ``nnunet`` sources.
        tolerance_mm: surface Dice tolerance in mm (positive), one value or ``{organ name: mm}``.
        progress: show a progress bar.
        missing_as_miss: score a ground-truth case without a prediction as a complete miss (an
            empty prediction: Dice 0 for every organ present, HD95 NaN); without it such a case
            is a UserError naming the cases, raised before anything is written.
        overwrite: replace files an earlier ``evaluate`` run wrote in `out_dir` (claimed with
            ``utils.output_folder``: never an input folder, never over a user's file).

    Every ground-truth case counts: scored, scored as a miss, or listed under ``failed`` (any
    error in one case is caught there and the rest completes).

    Returns:
        The summary (also written to ``summary.json``): ``tolerance_mm``, ``source``, ``cases``
        (number scored), ``case_ids``, ``mean_dice``, per-organ ``dice``, ``iou``, ``hd95_mm``,
        ``hd95_detected_mm``, ``hd95_missed``, ``hd95_cases``, ``surface_dice``,
        ``false_positive_ml``, ``false_positive_cases``, ``slice_dice``, ``not_scored`` (organ
        names), ``conventions``, ``missing_predictions`` (case ids) and ``failed``
        (``[{"case", "error"}]``).
    """
    for value in (tolerance_mm.values() if isinstance(tolerance_mm, dict) else [tolerance_mm]):
        check_positive(value, "tolerance_mm")
    label_source = get_source(source, label_map)
    organs = scored_organs(label_source)
    pairs, missing = _pair_cases(pred_dir, gt_dir)
    if missing and not missing_as_miss:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} ground-truth case(s) have no prediction in {pred_dir} ({shown}); "
                        "predict them, or pass --missing-as-miss to score them as complete misses", gt_dir)
    out = claim_output_folder(out_dir, "evaluate", inputs=[pred_dir, gt_dir], overwrite=overwrite)
    for name in OUTPUT_FILES:
        out.prepare(name)  # checked and recorded before anything is scored
    todo = [*pairs, *[(case, None, gt_path) for case, gt_path in sorted(missing.items())]]
    rows, failed, scored = [], [], []
    for case, pred_path, gt_path in tqdm(todo, desc="evaluate", disable=not progress):
        try:  # the per-case guard: any error (a bug, out of memory too) fails this case only
            pred, gt, spacing = _load_case(pred_path, gt_path, label_source)
            case_rows = evaluate_case(pred, gt, spacing, organs, tolerance_mm)
            slice_dice = slice_level_dice(pred, gt, organs)
        except Exception as err:  # noqa: BLE001
            failed.append({"case": case, "error": one_line_reason(err)})
            continue
        rows += [{"case": case, **row, "slice_dice": slice_dice[row["organ"]]} for row in case_rows]
        scored.append(case)
    not_scored = [ORGANS[organ] for organ in sorted(label_source.annotated) if organ not in organs]
    summary = {"source": source, **summarize(rows, tolerance_mm), "not_scored": not_scored,
               "conventions": CONVENTIONS, "case_ids": scored,
               "missing_predictions": sorted(missing), "failed": failed}
    write_outputs(rows, summary, out.path)
    write_report(out.path, rows, summary, pairs, label_source)
    out.close()
    return summary


def scored_organs(label_source) -> list[int]:
    """Organ ids a ground truth of `label_source` can be scored on: annotated, and each voxel
    certainly in or out (``utils.labels.scoreable_classes``)."""
    scoreable = scoreable_classes(label_source.label_sets())
    return [organ for organ in sorted(label_source.annotated) if scoreable[organ]]


def summarize(rows: list[dict], tolerance_mm) -> dict:
    """Per-organ summaries over cases of the scored rows, and the mean over organs of Dice.

    ``dice``, ``iou``, ``surface_dice``, ``slice_dice``: NaN-means. ``hd95_mm``: misses at
    their penalty (``utils.metrics.summarize_hd95``), with ``hd95_detected_mm``,
    ``hd95_missed``, ``hd95_cases``. ``false_positive_ml``: over ground-truth-empty cases
    (``utils.metrics.summarize_false_positive_volume``), with ``false_positive_cases``.
    """
    by_organ = {organ: [row for row in rows if row["organ_id"] == organ and row["annotated"]]
                for organ in ORGAN_RANGE}
    summary = {metric: {ORGANS[organ]: _nanmean([row[metric] for row in by_organ[organ]]) for organ in ORGAN_RANGE}
               for metric in SUMMARY_METRICS}
    for key in ("hd95_mm", "hd95_detected_mm", "hd95_missed", "hd95_cases", "false_positive_ml",
                "false_positive_cases"):
        summary[key] = {}
    for organ in ORGAN_RANGE:
        organ_rows, name = by_organ[organ], ORGANS[organ]
        column = {key: [row[key] for row in organ_rows] for key in CASE_COLUMNS}
        hd95 = summarize_hd95(column["hd95_mm"], column["gt_voxels"], column["pred_voxels"],
                              column["hd95_penalty_mm"])
        false_positive = summarize_false_positive_volume(column["false_positive_ml"], column["gt_voxels"])
        summary["hd95_mm"][name], summary["hd95_detected_mm"][name] = hd95["mean_mm"], hd95["mean_detected_mm"]
        summary["hd95_missed"][name], summary["hd95_cases"][name] = hd95["misses"], hd95["cases"]
        summary["false_positive_ml"][name] = false_positive["mean_ml"]
        summary["false_positive_cases"][name] = false_positive["cases"]
    return {"tolerance_mm": tolerance_mm, "cases": len({row["case"] for row in rows}),
            "mean_dice": _nanmean(list(summary["dice"].values())), **summary}


def write_outputs(rows: list[dict], summary: dict, out_dir) -> None:
    """Write ``metrics.csv``, ``summary.json`` and ``dice_per_organ.png`` to ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "metrics.csv", table.getvalue())
    write_json(out_dir / "summary.json", summary, indent=2)
    scored = {organ: dice for organ, dice in summary["dice"].items() if not _is_nan(dice)}
    cases = summary["cases"]
    title = f"Mean Dice per organ over {cases} case{'s' if cases != 1 else ''}"
    save_figure(dice_bar_chart(scored, title=title), out_dir / "dice_per_organ.png")


def boldness_report(pred_dir, gt_dir, trained_by: dict[int, str], source: str = "full", label_map=None,
                    progress: bool = False) -> dict:
    """How much of each organ the model predicts, on fully labelled held-out data.

    A model trained on partial labels may learn to under-segment an organ its other source leaves
    unlabelled; this shows it per organ, next to the source that taught that organ.

    Args:
        pred_dir: predicted label NIfTIs in our ids, ``<case>.nii.gz``.
        gt_dir: ground truth labelling every organ the report covers.
        trained_by: organ id -> a label for what trained it (``'pku only'``, ``'both'``, ...).
        source, label_map: the ground truth's id scheme (default: our ids).
        progress: show a progress bar.

    Returns:
        ``{organ name: {"organ_id", "trained_by", "cases", "mean_predicted_ml", "mean_true_ml",
        "volume_ratio", "false_negative_rate"}}`` for every organ the ground truth annotates.
        Pooled over the cases containing the organ: ``volume_ratio`` = total predicted / total
        true volume, ``false_negative_rate`` = missed true voxels / true voxels (NaN, and
        ``cases`` 0, if no case contains it). Cases without a prediction are skipped with a
        warning; an unreadable case raises.
    """
    bad = [organ for organ in trained_by if organ not in ORGAN_RANGE]
    if bad:
        raise ValueError(f"trained_by keys {bad} are not organ ids 1..{NUM_CLASSES - 1}")
    label_source = get_source(source, label_map)
    pairs, missing = _pair_cases(pred_dir, gt_dir)
    if missing:
        warnings.warn(f"boldness_report: no prediction for {len(missing)} cases: {sorted(missing)[:10]}", UserWarning,
                      stacklevel=2)
    organs = sorted(label_source.annotated)
    totals = {organ: np.zeros(4) for organ in organs}  # cases, predicted ml, true ml, missed ml
    for _case, pred_path, gt_path in tqdm(pairs, desc="boldness", disable=not progress):
        pred, gt, spacing = _load_case(pred_path, gt_path, label_source)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for organ in organs:
            gt_mask = gt == organ
            if gt_mask.any():
                pred_mask = pred == organ
                totals[organ] += (1, pred_mask.sum() * voxel_ml, gt_mask.sum() * voxel_ml,
                                  np.count_nonzero(gt_mask & ~pred_mask) * voxel_ml)
    report = {}
    for organ in organs:
        cases, predicted, true, missed = totals[organ]
        report[ORGANS[organ]] = {
            "organ_id": organ, "trained_by": trained_by.get(organ, "unknown"), "cases": int(cases),
            "mean_predicted_ml": predicted / cases if cases else NAN, "mean_true_ml": true / cases if cases else NAN,
            "volume_ratio": predicted / true if cases else NAN, "false_negative_rate": missed / true if cases else NAN}
    return report


# ----------------------------------------------------------------------------- files


def _pair_cases(pred_dir, gt_dir) -> tuple[list[tuple[str, Path, Path]], dict[str, Path]]:
    """``[(case, prediction, ground truth)]`` for ground-truth cases with a prediction, and
    ``{case: ground truth}`` of those without one. Predictions named after their CT (``CASE_0000.nii.gz``) pair too."""
    names = ("predictions", "ground-truth masks")
    nifti_files(gt_dir, names[1])  # the reference: a missing or empty ground truth is reported first
    match = match_cases(pred_dir, gt_dir, names)
    if match.duplicates:
        case, kept, second = match.duplicates[0]
        raise UserError(f"case {case} has two files, {kept.name} and {second.name}", second.parent)
    return match.pairs, dict(match.labels_only)


def _load_case(pred_path: Path | None, gt_path: Path, label_source) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Prediction (our ids), remapped ground truth and spacing, canonical ``(X, Y, Z)``.

    Without `pred_path` (a missing prediction scored as a miss) the prediction is all background
    on the ground truth's grid.
    """
    if pred_path is None:
        reference = load_ct(gt_path, check_intensity=False)
        return (np.zeros(reference.data.shape, dtype=np.uint8),
                label_source.remap(np.asarray(reference.data), gt_path), reference.spacing)
    # The prediction is a label map, so no CT intensity check; it sets the reference grid.
    reference = load_ct(pred_path, check_intensity=False)
    pred = reference.data
    if pred.size and (pred.min() < 0 or pred.max() >= NUM_CLASSES or np.any(pred != np.round(pred))):
        raise ValueError(f"{pred_path}: prediction holds values outside the class ids 0..{NUM_CLASSES - 1}")
    gt = label_source.remap(load_mask(gt_path, reference), gt_path)
    return pred.astype(np.uint8), gt, reference.spacing


# ----------------------------------------------------------------------------- small helpers


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be (X, Y, Z) of one shape")
    return pred, gt


def _nanmean(values) -> float:
    finite = [float(v) for v in values if not _is_nan(v)]
    return sum(finite) / len(finite) if finite else NAN


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
