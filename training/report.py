"""``report.html``: one self-contained page to page through an evaluation run.

It holds the per-organ summary table and chart, then one section per case: its metrics per organ
and a strip of axial overlay slices, one through each organ (the slice where the ground truth,
else the prediction, has the most of it, cropped around the organ; prediction filled, ground
truth outlined). Cases are sorted by their mean Dice, worst first; buttons re-sort them (a few
lines of inline JavaScript). Every image is a base64 PNG inside the page, so the file can be
mailed or archived alone.

The CT under the overlays is read from the image folder beside the ground truth (``Image/``,
``imagesTr/`` or ``imagesTs/`` next to ``Mask/`` / ``labelsTr/``) or from ``image_dir``; without
it, the labels are drawn on black.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from training.slice_rendering import (ORGAN_COLORS, ViewSettings, compose, encode_image, plane_pixel_mm, plane_slice, prepare_case,
                                      resample_indices, window_table)
from training.visualization import dice_bar_chart, figure_to_png
from utils.files import write_text
from utils.labels import DISPLAY_NAMES, NUM_CLASSES, ORGAN_IDS, ORGANS
from utils.case_files import case_id_from_path
from utils.volume_io import load_ct, load_mask

IMAGE_FOLDER_NAMES = ("Image", "imagesTr", "imagesTs", "images")
THUMBNAIL_PIXELS = 160  # longest side of a strip image
SUMMARY_COLUMNS = (("dice", "Dice", 3), ("iou", "IoU", 3), ("hd95_mm", "HD95 mm", 1),
                   ("surface_dice", "surface Dice", 3), ("false_positive_ml", "FP ml", 1),
                   ("slice_dice", "slice Dice", 3))
CASE_COLUMNS = (("dice", "Dice", 3), ("hd95_mm", "HD95 mm", 1), ("surface_dice", "surface Dice", 3),
                ("false_positive_ml", "FP ml", 1), ("volume_ratio", "volume ratio", 2))


def write_report(out_dir, rows: list[dict], summary: dict, pairs, label_source, image_dir=None) -> Path:
    """Write ``out_dir/report.html`` for an evaluation; returns its path.

    Args:
        out_dir: the evaluation folder.
        rows: the per-case, per-organ rows of ``metrics.csv`` (``training.evaluate``).
        summary: the summary dict (``summary.json``).
        pairs: ``[(case, prediction path, ground-truth path)]`` of the scored cases.
        label_source: the ground truth's ``utils.labels.LabelSource``.
        image_dir: the CT folder; None = guessed beside the ground truth, else labels on black.
    """
    scored = set(summary.get("case_ids", []))
    pairs = [pair for pair in pairs if pair[0] in scored]
    images = _images_by_case(image_dir, pairs)
    sections = []
    for case, prediction_path, truth_path in pairs:
        case_rows = [row for row in rows if row["case"] == case]
        strip = case_strip(images.get(case), prediction_path, truth_path, label_source)
        sections.append((case_mean_dice(case_rows), case, case_section(case, case_rows, strip)))
    sections.sort(key=lambda item: (math.isnan(item[0]), item[0], item[1]))  # worst first, NaN last
    page = _page(summary, [section for _, _, section in sections])
    path = Path(out_dir) / "report.html"
    write_text(path, page)
    return path


def case_mean_dice(case_rows: list[dict]) -> float:
    """Mean Dice over the case's scored organs (NaN when none is scored)."""
    values = [float(row["dice"]) for row in case_rows if row["annotated"] and not _is_nan(row["dice"])]
    return sum(values) / len(values) if values else float("nan")


def case_strip(image_path, prediction_path, truth_path, label_source) -> list[tuple[str, bytes]]:
    """``[(caption, PNG bytes)]``: one cropped axial overlay per organ in the truth or prediction."""
    if image_path is not None:
        volume = load_ct(image_path)
    else:  # no CT: the prediction's grid, drawn on black
        volume = load_ct(prediction_path, check_intensity=False)
        volume.data = np.full(volume.data.shape, -1000, dtype=np.int16)
    prediction = load_mask(prediction_path, volume)
    truth = label_source.remap(load_mask(truth_path, volume), truth_path)
    case = prepare_case(volume.data, prediction, truth, volume.spacing)
    settings = ViewSettings()
    table = window_table(settings.level, settings.width, case.code_offset, case.code_step)
    strip = []
    for organ in range(1, NUM_CLASSES):
        z = organ_slice(truth, prediction, organ)
        if z is not None:
            rgb = organ_thumbnail(case, table, organ, z, settings)
            strip.append((f"{DISPLAY_NAMES[organ]} · z = {z}", encode_image(rgb, "png")))
    return strip


def organ_slice(truth: np.ndarray, prediction: np.ndarray, organ: int) -> int | None:
    """The axial index with the most ``organ`` voxels in the truth, else the prediction; None if absent."""
    for labels in (truth, prediction):
        area = (labels == organ).sum(axis=(0, 1))  # (Z,)
        if area.any():
            return int(area.argmax())
    return None


def organ_thumbnail(case, table: np.ndarray, organ: int, z: int, settings: ViewSettings) -> np.ndarray:
    """``(H, W, 3)`` uint8: axial slice ``z`` cropped around ``organ`` with a margin, true aspect."""
    labels = [plane_slice(volume, "axial", z) for volume in (case.prediction, case.truth)]
    rows, cols = np.nonzero((labels[0] == organ) | (labels[1] == organ))
    height, width = labels[0].shape
    margin = max(8, (rows.max() - rows.min()) // 2, (cols.max() - cols.min()) // 2)
    top, bottom = max(0, rows.min() - margin), min(height, rows.max() + margin + 1)
    left, right = max(0, cols.min() - margin), min(width, cols.max() + margin + 1)
    crop = (slice(top, bottom), slice(left, right))
    grey = table[plane_slice(case.codes, "axial", z)][crop]
    rgb = compose(grey, labels[0][crop], labels[1][crop], settings)
    row_mm, col_mm = plane_pixel_mm(case.spacing, "axial")
    mm_per_pixel = max(rgb.shape[0] * row_mm, rgb.shape[1] * col_mm) / THUMBNAIL_PIXELS
    return rgb[resample_indices(rgb.shape[0], row_mm, mm_per_pixel)[:, None],
               resample_indices(rgb.shape[1], col_mm, mm_per_pixel)[None, :]]


def case_section(case: str, case_rows: list[dict], strip: list[tuple[str, bytes]]) -> str:
    """One case's ``<section>``: title, metrics table of its scored organs, image strip."""
    mean = case_mean_dice(case_rows)
    scored = [row for row in case_rows if row["annotated"] and not _is_nan(row["gt_voxels"])
              and (row["gt_voxels"] or row["pred_voxels"])]
    body = "".join(f"<tr><td>{_organ_cell(row['organ'])}</td>"
                   + "".join(f"<td>{_number(row[key], digits)}</td>" for key, _, digits in CASE_COLUMNS) + "</tr>"
                   for row in scored)
    head = "".join(f"<th>{label}</th>" for _, label, _ in CASE_COLUMNS)
    figures = "".join(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                      f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                      for caption, png in strip)
    sort_key = "" if math.isnan(mean) else f"{mean:.6f}"
    return (f'<section class="case" data-case="{html.escape(case)}" data-dice="{sort_key}">'
            f"<h3>{html.escape(case)} <small>mean Dice {_number(mean, 3)}</small></h3>"
            f"<table><tr><th>organ</th>{head}</tr>{body}</table>"
            f'<div class="strip">{figures or "<p>no organ in the ground truth or the prediction</p>"}</div>'
            "</section>")


def summary_table(summary: dict) -> str:
    """The per-organ means over cases as an HTML table."""
    head = "".join(f"<th>{label}</th>" for _, label, _ in SUMMARY_COLUMNS)
    body = "".join(f"<tr><td>{_organ_cell(organ)}</td>"
                   + "".join(f"<td>{_number(summary.get(key, {}).get(organ), digits)}</td>"
                             for key, _, digits in SUMMARY_COLUMNS) + "</tr>"
                   for organ in ORGANS[1:])
    return f'<table class="summary"><tr><th>organ</th>{head}</tr>{body}</table>'


def _page(summary: dict, sections: list[str]) -> str:
    cases = summary.get("cases", 0)
    chart = dice_bar_chart({o: d for o, d in summary.get("dice", {}).items() if not _is_nan(d)},
                           title=f"Mean Dice per organ over {cases} case{'s' if cases != 1 else ''}")
    chart_png = base64.b64encode(figure_to_png(chart)).decode()
    problems = "".join(f"<li>{html.escape(str(item))}</li>"
                       for item in [*(f"no prediction: {case}" for case in summary.get("missing_predictions", [])),
                                    *(f"failed: {f['case']}: {f['error']}" for f in summary.get("failed", []))])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>abdoseg evaluation report</title>
<style>{STYLE}</style></head><body>
<h1>abdoseg evaluation</h1>
<p>{cases} cases, ground truth source <code>{html.escape(str(summary.get("source", "")))}</code>,
mean Dice over organs <b>{_number(summary.get("mean_dice"), 3)}</b>; surface Dice tolerance
{_number(summary.get("tolerance_mm"), 1)} mm.</p>
{f"<ul class='problems'>{problems}</ul>" if problems else ""}
<h2>Per organ</h2>
<div class="overview">{summary_table(summary)}<img id="chart" alt="Dice per organ" src="data:image/png;base64,{chart_png}"></div>
<h2>Cases</h2>
<p>Sort: <button data-order="worst">Dice, worst first</button> <button data-order="best">Dice, best first</button>
<button data-order="name">case id</button>. Fill: prediction; outline: ground truth.</p>
<div id="cases">{"".join(sections)}</div>
<script>{SCRIPT}</script>
</body></html>
"""


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.overview{display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap}#chart{max-width:640px}
.case{border-top:2px solid #888;margin-top:1em}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:0.8em}.swatch{display:inline-block;width:0.9em;height:0.9em;
margin-right:4px;vertical-align:middle}.problems{color:#a00}"""

SCRIPT = """function sortCases(order){const box=document.getElementById('cases');
const items=Array.from(box.querySelectorAll('section.case'));
const dice=s=>s.dataset.dice===''?Infinity:parseFloat(s.dataset.dice);
items.sort((a,b)=>order==='name'?a.dataset.case.localeCompare(b.dataset.case)
:order==='best'?(dice(b)===Infinity?-1:dice(a)===Infinity?1:dice(b)-dice(a)):dice(a)-dice(b));
items.forEach(s=>box.appendChild(s));}
document.querySelectorAll('button[data-order]').forEach(b=>b.addEventListener('click',()=>sortCases(b.dataset.order)));"""


def _images_by_case(image_dir, pairs) -> dict[str, Path]:
    folders = [Path(image_dir)] if image_dir is not None else []
    if image_dir is None and pairs:
        truth_folder = Path(pairs[0][2]).parent
        folders = [truth_folder.parent / name for name in IMAGE_FOLDER_NAMES]
    images = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.nii*")):
                if not path.name.startswith("."):
                    images.setdefault(case_id_from_path(path), path)
    return images


def _organ_cell(organ: str) -> str:
    organ_id = ORGAN_IDS[organ]
    red, green, blue = (int(c) for c in ORGAN_COLORS[organ_id])
    return f'<span class="swatch" style="background:rgb({red},{green},{blue})"></span>{DISPLAY_NAMES[organ_id]}'


def _number(value, digits: int) -> str:
    return "n/a" if _is_nan(value) else f"{float(value):.{digits}f}"


def _is_nan(value) -> bool:
    try:
        return value is None or value == "" or math.isnan(float(value))
    except (TypeError, ValueError):
        return True
