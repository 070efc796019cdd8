"""report.html: written by evaluate, self-contained, every case with its images, worst first."""

import base64
import re

import numpy as np

from training.evaluate import evaluate_folders
from training.report import case_mean_dice, organ_slice
from utils.phantom import make_phantom
from utils.volume_io import save_volume


def _write_cases(root, with_images=True):
    """Two phantom cases: one predicted perfectly, one with the liver missed."""
    for folder in ("Image", "Mask", "pred"):
        (root / folder).mkdir(parents=True)
    for index, case in enumerate(("Case_good", "Case_bad")):
        phantom = make_phantom(seed=7, case_index=index, size=40, num_slices=10)
        prediction = phantom.labels.copy()
        if case == "Case_bad":
            prediction[prediction == 5] = 0
        if with_images:
            save_volume(phantom.hu, phantom.affine, root / "Image" / f"{case}_0000.nii.gz")
        save_volume(phantom.labels, phantom.affine, root / "Mask" / f"{case}.nii.gz")
        save_volume(prediction, phantom.affine, root / "pred" / f"{case}.nii.gz")


def test_evaluate_writes_a_self_contained_report_worst_case_first(tmp_path):
    _write_cases(tmp_path)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "Mask", "full", tmp_path / "eval", progress=False)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert re.findall(r'data-case="([^"]+)"', page) == ["Case_bad", "Case_good"]  # worst first
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)  # nothing outside
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    organs_present = len(np.unique(make_phantom(seed=7, case_index=0, size=40, num_slices=10).labels)) - 1
    assert len(sources) >= 1 + 2 * organs_present  # the chart, and a strip image per organ per case
    assert summary["cases"] == 2 and "<script>" in page and 'data-order="best"' in page
    assert page.count("<tr>") >= 12 + 2 * 2  # summary table, and each case's organ rows


def test_report_without_ct_draws_labels_on_black(tmp_path):
    _write_cases(tmp_path, with_images=False)
    evaluate_folders(tmp_path / "pred", tmp_path / "Mask", "full", tmp_path / "eval", progress=False)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count('class="case"') == 2 and page.count("<figure>") > 2


def test_case_mean_dice_and_organ_slice():
    rows = [{"annotated": True, "dice": 0.5}, {"annotated": True, "dice": float("nan")},
            {"annotated": False, "dice": 0.0}, {"annotated": True, "dice": 1.0}]
    assert case_mean_dice(rows) == 0.75
    assert np.isnan(case_mean_dice([{"annotated": False, "dice": 1.0}]))
    truth = np.zeros((4, 4, 5), np.uint8)
    truth[:2, :2, 3] = 5
    truth[0, 0, 1] = 5
    prediction = np.zeros_like(truth)
    prediction[1, 1, 4] = 9
    assert organ_slice(truth, prediction, 5) == 3       # most truth voxels
    assert organ_slice(truth, prediction, 9) == 4       # only in the prediction
    assert organ_slice(truth, prediction, 2) is None    # absent
