"""Preprocessing: real-file label harmonisation, folder bookkeeping, and the shared geometry."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from utils.labels import ORGAN_IDS, LabelMapError
from utils.case_files import pair_cases
from utils.errors import UserError
from utils.files import TEMPORARY_PREFIX
from utils.geometry import (PreprocessError, PreprocessParams, distance_to_boundary, hu_window, preprocess_image,
                            preprocess_labels, restore_in_plane)
from utils.preprocess_data import preprocess_dataset, preprocess_other_dataset
from utils.preprocessed_folder import load_manifest
from utils.volume_io import Volume

SMALL = PreprocessParams(target_size=(128, 128))
ACT1K_ORGANS = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}


def write_ct_case(images_dir, masks_dir, case_id, mask, spacing=(1.5, 1.5, 3.0), image=None):
    """Write a small synthetic CT (air around a 40 HU body) and its mask as NIfTI files."""
    mask = np.asarray(mask, dtype=np.uint8)
    if image is None:
        image = np.full(mask.shape, -1000, dtype=np.int16)
        image[2:-2, 2:-2] = 40
        image[mask > 0] = 100 + 20 * mask[mask > 0]
    affine = np.diag([*spacing, 1.0])
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), images_dir / f"{case_id}_0000.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), masks_dir / f"{case_id}.nii.gz")


def blob_mask(shape=(24, 20, 6), values=(1, 2)):
    mask = np.zeros(shape, dtype=np.uint8)
    for i, value in enumerate(values):
        mask[4 + 8 * i: 10 + 8 * i, 5:12, 1:-1] = value
    return mask


def area_scale(case, params):
    shape = case["original"]["shape"]
    return params.target_size[0] / shape[0] * params.target_size[1] / shape[1]


def check_resized_counts(out_dir, case, params):
    """Per-organ pixels of the preprocessed labels ~ original voxels x the area scale."""
    label = np.load(out_dir / case["folder"] / "label.npy")
    for organ, count in case["voxel_counts"].items():
        resized = np.count_nonzero(label == ORGAN_IDS[organ]) / area_scale(case, params)
        assert resized == pytest.approx(count, rel=0.10, abs=0 if count else 1e-9), organ


# --------------------------------------------------------------------------- real files

def test_abdomenct1k_real_files(shared_data, tmp_path):
    layout = shared_data / "real" / "abdomenct1k_layout"
    manifest = preprocess_dataset("abdomenct1k", layout / "Image", layout / "Mask", tmp_path, SMALL,
                                  progress=False)
    assert manifest["failed"] == []
    assert [case["case_id"] for case in manifest["cases"]] == ["Case_90001", "Case_90002"]
    for case in manifest["cases"]:
        assert set(case["annotated"]) == {ORGAN_IDS[o] for o in ("kidney", "liver", "spleen", "pancreas")}
        source = np.asanyarray(nib.load(layout / "Mask" / f"{case['case_id']}.nii.gz").dataobj)
        source_counts = np.bincount(source.ravel().astype(np.int64), minlength=5)
        for source_id, organ in ACT1K_ORGANS.items():
            assert case["voxel_counts"][organ] == source_counts[source_id]
        assert sum(case["voxel_counts"].values()) == source_counts[1:].sum()
        check_resized_counts(tmp_path, case, SMALL)
        for name in ("image", "label", "distance"):
            array = np.load(tmp_path / case["case_id"] / f"{name}.npy", mmap_mode="r")
            assert array.dtype == np.uint8 and array.shape == (case["num_slices"], 128, 128)
    assert load_manifest(tmp_path) == json.loads((tmp_path / "manifest.json").read_text())


def test_totalseg_real_file(shared_data, tmp_path):
    example = shared_data / "real" / "totalseg_example"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    os.symlink(example / "example_ct.nii.gz", tmp_path / "images" / "TS_0001_0000.nii.gz")
    os.symlink(example / "example_seg_fast_force_split.nii.gz", tmp_path / "masks" / "TS_0001.nii.gz")
    out = tmp_path / "out"
    manifest = preprocess_dataset("totalseg", tmp_path / "images", tmp_path / "masks", out, SMALL, progress=False)
    (case,) = manifest["cases"]
    expected = {"spleen": 9668, "kidney": 7134 + 5090, "liver": 41692, "stomach": 4836, "pancreas": 695,
                "small_intestine": 19717 + 2319, "colon": 59968, "bladder": 17756,
                "femur_head": 4488 + 4396, "spinal_cord": 1553, "rectum": 0}
    assert case["voxel_counts"] == expected  # gallbladder, vertebrae, vessels ... are background
    assert set(case["annotated"]) == {ORGAN_IDS[o] for o in expected if o != "rectum"}
    check_resized_counts(out, case, SMALL)


def test_rerun_skips_finished_cases(shared_data, tmp_path):
    layout = shared_data / "real" / "abdomenct1k_layout"
    first = preprocess_other_dataset(layout / "Image", layout / "Mask", tmp_path, target_size=(64, 64))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*.npy")}
    second = preprocess_other_dataset(layout / "Image", layout / "Mask", tmp_path, target_size=(64, 64))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*.npy")} == stamps
    assert first == second and first["num_brightness_variations"] == 4
    with pytest.raises(PreprocessError, match="already holds cases preprocessed with"):
        preprocess_other_dataset(layout / "Image", layout / "Mask", tmp_path, target_size=(32, 32))


def test_bad_case_is_recorded_and_the_rest_completes(shared_data, tmp_path):
    layout = shared_data / "real" / "abdomenct1k_layout"
    images, masks = tmp_path / "Image", tmp_path / "Mask"
    images.mkdir()
    masks.mkdir()
    os.symlink(layout / "Image" / "Case_90002_0000.nii.gz", images / "Case_90002_0000.nii.gz")
    os.symlink(layout / "Mask" / "Case_90002.nii.gz", masks / "Case_90002.nii.gz")
    data = (layout / "Image" / "Case_90001_0000.nii.gz").read_bytes()
    (images / "Case_90003_0000.nii.gz").write_bytes(data[: len(data) // 2])  # truncated gzip
    os.symlink(layout / "Mask" / "Case_90001.nii.gz", masks / "Case_90003.nii.gz")
    os.symlink(layout / "Image" / "Case_90001_0000.nii.gz", images / "Case_90004_0000.nii.gz")  # no mask
    os.symlink(layout / "Mask" / "Case_90001.nii.gz", masks / "Case_90005.nii.gz")  # no image
    out = tmp_path / "out"
    manifest = preprocess_dataset("abdomenct1k", images, masks, out, PreprocessParams(target_size=(64, 64)),
                                  progress=False)
    assert [case["case_id"] for case in manifest["cases"]] == ["Case_90002"]
    errors = {failure["case_id"]: failure["error"] for failure in manifest["failed"]}
    assert set(errors) == {"Case_90003", "Case_90004", "Case_90005"}
    assert "Case_90003_0000.nii.gz" in errors["Case_90003"] and "\n" not in errors["Case_90003"]
    assert "no mask named Case_90004.nii.gz" in errors["Case_90004"]
    assert "no image named Case_90005_0000.nii.gz" in errors["Case_90005"]
    assert sorted(p.name for p in out.iterdir()) == [".abdoseg-output.json", "Case_90002", "manifest.json"]  # no temp dirs


# --------------------------------------------------------------------------- synthetic files

@pytest.mark.slow
def test_bad_masks_fail_per_case_in_parallel(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_ct_case(images, masks, "good", blob_mask())
    write_ct_case(images, masks, "unknown_value", blob_mask(values=(1, 9)))
    write_ct_case(images, masks, "other_grid", blob_mask())
    nib.save(nib.Nifti1Image(blob_mask(shape=(24, 20, 5)), np.diag([1.5, 1.5, 3.0, 1])),
             masks / "other_grid.nii.gz")
    out = tmp_path / "out"
    manifest = preprocess_dataset("abdomenct1k", images, masks, out, PreprocessParams(target_size=(32, 32)),
                                  workers=2, progress=False)
    assert [case["case_id"] for case in manifest["cases"]] == ["good"]
    errors = {failure["case_id"]: failure["error"] for failure in manifest["failed"]}
    assert "[9]" in errors["unknown_value"] and "abdomenct1k" in errors["unknown_value"]
    assert "grid differs" in errors["other_grid"]
    assert not list(out.glob(f"{TEMPORARY_PREFIX}*"))


def test_nnunet_dataset_maps_names(tmp_path):
    dataset = tmp_path / "Dataset001_Abdomen"
    labels = {"background": 0, "urinary_bladder": 1, "small_bowel": 2, "kidney_left": 3}
    mask = blob_mask(values=(1, 2))
    mask[4:10, 14:18, 1:-1] = 3
    write_ct_case(dataset / "imagesTr", dataset / "labelsTr", "abd_001", mask)
    (dataset / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                      "channel_names": {"0": "CT"}}))
    manifest = preprocess_dataset("nnunet", dataset, None, tmp_path / "out", PreprocessParams(target_size=(32, 32)),
                                  progress=False)
    (case,) = manifest["cases"]
    assert case["source"] == "nnunet"
    assert case["annotated"] == sorted(ORGAN_IDS[o] for o in ("bladder", "small_intestine", "kidney"))
    for source_id, organ in ((1, "bladder"), (2, "small_intestine"), (3, "kidney")):
        assert case["voxel_counts"][organ] == np.count_nonzero(mask == source_id)

    (dataset / "dataset.json").write_text(json.dumps({"labels": {**labels, "gallbladder": 4}}))
    with pytest.raises(LabelMapError, match="gallbladder"):
        preprocess_dataset("nnunet", dataset, None, tmp_path / "out2", progress=False)


def test_missing_or_empty_input_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="missing_images.*not found"):
        preprocess_dataset("abdomenct1k", tmp_path / "missing_images", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="empty.*no .nii"):
        pair_cases(tmp_path / "empty", tmp_path / "empty")


def test_load_manifest_refuses_paths_outside_the_folder(tmp_path):
    base = {"version": 1, "params": PreprocessParams().to_dict(), "failed": []}
    for folder in ("../elsewhere", "/abs/case", "a/../../b"):
        (tmp_path / "manifest.json").write_text(json.dumps({**base, "cases": [{"case_id": "x", "folder": folder}]}))
        with pytest.raises(PreprocessError, match="not a plain name inside"):
            load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**base, "version": 7, "cases": []}))
    with pytest.raises(PreprocessError, match="version 7"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "cases": []}))
    with pytest.raises(PreprocessError, match="params"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- pure functions

def test_hu_window_and_distance_values():
    params = PreprocessParams(min_clip_value=-100, max_clip_value=100)
    windowed = hu_window(torch.tensor([-1000, -100, 0, 50, 3000], dtype=torch.int16), params)
    assert windowed.dtype == torch.float32
    assert torch.allclose(windowed, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))

    labels = np.zeros((2, 5, 7), dtype=np.uint8)
    labels[0, :, 4:] = 3  # a vertical edge between columns 3 and 4
    distance = distance_to_boundary(labels)
    assert distance.dtype == np.uint8
    assert distance[0, 0].tolist() == [3, 2, 1, 0, 0, 1, 2]
    assert (distance[1] == 255).all()  # one class only


def synthetic_volume(shape=(100, 80, 3), spacing=(0.8, 1.2, 2.5)):
    data = np.full(shape, -1000, dtype=np.int16)
    data[40:60, 30:50] = 300
    affine = np.diag([*spacing, 1.0])
    return Volume(data=data, spacing=spacing, affine=affine, original_affine=affine,
                  original_shape=shape, path="synthetic")


@pytest.mark.parametrize("spacing", [None, 1.0, 0.5])
def test_restore_in_plane_inverts_the_geometry(spacing):
    volume = synthetic_volume()
    params = PreprocessParams(target_size=(128, 128), spacing=spacing)
    image = preprocess_image(volume, params, batch_slices=2)  # two chunks
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    square = (volume.data > 0).astype(np.uint8)
    label = preprocess_labels(square, volume.spacing, params)
    assert np.mean((image.numpy() > 112) == label.astype(bool)) > 0.995  # image and labels share a grid
    if spacing == 1.0:  # 20 x 0.8 mm rows and 20 x 1.2 mm columns become 16 x 24 pixels
        rows, cols = np.nonzero(label[0])
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 24)

    restored = restore_in_plane(image[:, None].float() / 255, (100, 80), volume.spacing[:2], params)
    assert restored.shape == (3, 1, 100, 80)
    rows, cols = np.nonzero(restored[0, 0].numpy() > 0.4375)
    assert abs(rows.min() - 40) <= 1 and abs(rows.max() - 59) <= 1
    assert abs(cols.min() - 30) <= 1 and abs(cols.max() - 49) <= 1
    if spacing == 0.5:  # the crop kept x 8..72, y 14..66 mm: the rest comes back as pad_value
        outside = restore_in_plane(image[:, None].float() / 255 + 1, (100, 80), volume.spacing[:2], params,
                                   pad_value=-5.0)
        assert torch.allclose(outside[0, 0, :5], torch.tensor(-5.0)) and (outside[0, 0, 20:80, 20:60] > 0).all()


def test_preprocess_keeps_axis_order():
    volume = synthetic_volume(shape=(40, 20, 2), spacing=(1.0, 1.0, 1.0))
    volume.data[:] = -1000
    volume.data[:10, :, :] = 400  # low X rows are bright
    image = preprocess_image(volume, PreprocessParams(target_size=(16, 16))).numpy()
    assert image[:, :3].min() == 255 and image[:, -4:].max() == 0
