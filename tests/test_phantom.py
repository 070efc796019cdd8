"""Synthetic phantom: determinism, anatomy, label layouts, files on disk, HU overlap."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from utils import phantom as phantom_module
from utils.labels import ORGAN_IDS
from utils.phantom import (PKU_EXAMPLE_IDS, case_id, layout_labels, make_phantom, render_phantom_preview,
                           write_phantom_dataset)
from utils.volume_io import load_ct

SIZE = 96
CASES = [(0, 0), (0, 1), (3, 7)]


@pytest.fixture(scope="module")
def cases():
    return {key: make_phantom(*key, size=SIZE) for key in CASES}


def centroid_mm(p, organ: str | int, labels=None) -> np.ndarray:
    """World (RAS) centroid of an organ (our name, or an id of ``labels``), mm."""
    labels = p.labels if labels is None else labels
    label_id = ORGAN_IDS[organ] if isinstance(organ, str) else organ
    return nib.affines.apply_affine(p.affine, np.argwhere(labels == label_id).mean(axis=0))


def test_same_seed_and_index_give_identical_cases():
    a, b = make_phantom(5, 2, size=64), make_phantom(5, 2, size=64)
    for field in ("hu", "labels", "left", "affine"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.spacing == b.spacing
    c = make_phantom(5, 3, size=64)
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_shapes_types_and_ras_geometry(cases):
    p = cases[(0, 0)]
    assert p.hu.dtype == np.int16 and p.labels.dtype == np.uint8 and p.left.dtype == bool
    assert p.hu.shape == p.labels.shape == p.left.shape and p.hu.shape[:2] == (SIZE, SIZE)
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(p.affine)[:3], p.spacing)
    assert -1024 <= p.hu.min() and p.hu.max() <= 3071 and (p.hu < -900).mean() > 0.1  # air outside


def test_size_keeps_field_of_view_and_num_slices_keeps_anatomy():
    small, large = make_phantom(1, 4, size=48, num_slices=20), make_phantom(1, 4, size=96)
    assert small.spacing[0] == pytest.approx(2 * large.spacing[0])
    extent = [(p.hu.shape[2] - 1) * p.spacing[2] for p in (small, large)]
    assert extent[0] == pytest.approx(extent[1]) and 350 <= extent[0] <= 450
    assert np.linalg.norm(centroid_mm(small, "liver") - centroid_mm(large, "liver")) < 10


@pytest.mark.parametrize("num_slices", [None, 16])
def test_every_organ_present_in_plausible_places(num_slices):
    for key in CASES:
        p = make_phantom(*key, size=SIZE, num_slices=num_slices)
        counts = np.bincount(p.labels.ravel(), minlength=len(ORGAN_IDS))
        assert (counts[1:] > 0).all(), f"case {key}: organs missing {np.flatnonzero(counts == 0)}"
        liver, spleen = centroid_mm(p, "liver"), centroid_mm(p, "spleen")
        assert liver[0] > spleen[0], "liver must lie on the patient's right (RAS +x) of the spleen"
        assert centroid_mm(p, "bladder")[2] < liver[2]
        assert centroid_mm(p, "spinal_cord")[1] < centroid_mm(p, "pancreas")[1], "cord posterior of pancreas"
        assert centroid_mm(p, "femur_head")[2] < centroid_mm(p, "kidney")[2]


def test_organs_have_overlapping_soft_tissue_hu(cases):
    for key, p in cases.items():
        for organ in ("liver", "spleen", "kidney", "pancreas"):
            mean = p.hu[p.labels == ORGAN_IDS[organ]].mean()
            assert 20 <= mean <= 70, f"case {key}: {organ} mean {mean:.0f} HU"


def test_abdomenct1k_layout_is_a_remap_of_the_truth(cases):
    p = cases[(0, 1)]
    mask = layout_labels(p, "abdomenct1k")
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4}
    expected = np.zeros_like(p.labels)
    for organ, source_id in (("liver", 1), ("kidney", 2), ("spleen", 3), ("pancreas", 4)):
        expected[p.labels == ORGAN_IDS[organ]] = source_id
    np.testing.assert_array_equal(mask, expected)


def test_pku_layout_splits_sides_and_omits_spleen_and_pancreas(cases):
    assert PKU_EXAMPLE_IDS == {"bladder": 1, "colon": 2, "femur_head_left": 3, "femur_head_right": 4,
                               "kidney_left": 5, "kidney_right": 6, "liver": 7, "rectum": 8,
                               "small_intestine": 9, "spinal_cord": 10, "stomach": 11}
    example = Path(__file__).resolve().parents[1] / "examples" / "pku_label_map.json"
    if example.exists():
        labels = json.loads(example.read_text())["labels"]
        assert {k: v for k, v in labels.items() if k != "background"} == PKU_EXAMPLE_IDS
    p = cases[(3, 7)]
    mask = layout_labels(p, "pku")
    assert set(np.unique(mask)) == {0, *PKU_EXAMPLE_IDS.values()}
    assert not mask[np.isin(p.labels, [ORGAN_IDS["spleen"], ORGAN_IDS["pancreas"]])].any()
    for organ in ("kidney", "femur_head"):
        left = centroid_mm(p, PKU_EXAMPLE_IDS[f"{organ}_left"], mask)
        right = centroid_mm(p, PKU_EXAMPLE_IDS[f"{organ}_right"], mask)
        assert left[0] < right[0], f"{organ}: the patient's left has the smaller RAS x"
        assert ((mask == PKU_EXAMPLE_IDS[f"{organ}_left"]) == ((p.labels == ORGAN_IDS[organ]) & p.left)).all()
    assert (mask[p.labels == ORGAN_IDS["liver"]] == PKU_EXAMPLE_IDS["liver"]).all()


def test_full_layout_and_bad_layout(cases):
    p = cases[(0, 0)]
    np.testing.assert_array_equal(layout_labels(p, "full"), p.labels)
    with pytest.raises(ValueError, match="abdomenct1k"):
        layout_labels(p, "totalseg")
    with pytest.raises(ValueError, match="valid layouts"):
        write_phantom_dataset("unused", 1, "nope")


def test_case_id():
    assert case_id(0, 0) == "Case_00000"
    assert case_id(2, 17) == "Case_02017"
    with pytest.raises(ValueError):
        case_id(0, 1000)


def test_write_phantom_dataset_writes_readable_files_and_skips_existing(tmp_path, monkeypatch):
    ids = write_phantom_dataset(tmp_path, 2, "abdomenct1k", seed=4, size=48, num_slices=12, progress=False)
    assert ids == ["Case_04000", "Case_04001"]
    assert sorted(f.name for f in (tmp_path / "Image").iterdir()) == ["Case_04000_0000.nii.gz", "Case_04001_0000.nii.gz"]
    assert sorted(f.name for f in (tmp_path / "Mask").iterdir()) == ["Case_04000.nii.gz", "Case_04001.nii.gz"]
    expected = make_phantom(4, 1, size=48, num_slices=12)
    image, mask = nib.load(tmp_path / "Image" / "Case_04001_0000.nii.gz"), nib.load(tmp_path / "Mask" / "Case_04001.nii.gz")
    np.testing.assert_allclose(image.affine, expected.affine)
    np.testing.assert_allclose(mask.affine, expected.affine)
    assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected.hu)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), layout_labels(expected, "abdomenct1k"))
    loaded = load_ct(tmp_path / "Image" / "Case_04001_0000.nii.gz")  # canonical RAS+: the phantom's own axes
    np.testing.assert_array_equal(loaded.data, expected.hu)

    def fail(*args, **kwargs):
        raise AssertionError("an existing case was generated again")

    monkeypatch.setattr(phantom_module, "make_phantom", fail)
    assert write_phantom_dataset(tmp_path, 2, "abdomenct1k", seed=4, size=48, num_slices=12, progress=False) == ids


def test_render_phantom_preview_writes_png(tmp_path, cases):
    path = tmp_path / "preview.png"
    render_phantom_preview(cases[(0, 0)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
