"""Tests for utils/volume_io.py: real-file geometry, dtypes, round trips and one test per bad input."""

import gzip
import io
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest

from utils.case_files import case_id_from_path
from utils.volume_io import (NiftiError, Volume, load_ct, load_mask, save_labels,
                             save_volume, to_original)

SOURCE_CT = "real/totalseg_example/example_ct_sm.nii.gz"
SOURCE_SEG = "real/totalseg_example/example_seg.nii.gz"
CT_VARIANTS = ["LPS.nii.gz", "uncompressed.nii", "4d_singleton.nii.gz", "bigendian.nii.gz",
               "qform_only.nii.gz", "uint16_inter-1024.nii.gz", "int16_slope0.5.nii.gz"]


def _source(shared_data) -> Volume:
    return load_ct(shared_data / SOURCE_CT)


def _ct_volume(shape=(8, 7, 6)) -> np.ndarray:
    """A small CT-like int16 block: air with a soft-tissue core, ``(I, J, K)``."""
    data = np.full(shape, -1000, dtype=np.int16)
    data[2:-2, 2:-2, :] = 40
    return data


# --- real files: same HU at the same world positions --------------------------------------------

@pytest.mark.parametrize("variant", CT_VARIANTS)
def test_ct_variants_match_source(shared_data, variant):
    source = _source(shared_data)
    volume = load_ct(shared_data / "robustness/derived" / f"ct_sm_{variant}")
    assert volume.data.shape == source.data.shape == (122, 101, 30)
    np.testing.assert_allclose(volume.affine, source.affine, atol=1e-3)
    if variant.startswith("uint16"):
        # uint16 + inter -1024 cannot store HU below -1024: the source's few values below clip there.
        np.testing.assert_array_equal(volume.data, np.maximum(source.data, -1024))
    else:
        np.testing.assert_array_equal(volume.data, source.data)
    assert volume.spacing == pytest.approx((3.0, 3.0, 3.0))


@pytest.mark.parametrize("variant", ["LPS", "float32", "int16"])
def test_mask_variants_match_source(shared_data, variant):
    expected = load_mask(shared_data / SOURCE_SEG, _source(shared_data))
    ct_name = "ct_sm_LPS.nii.gz" if variant == "LPS" else "ct_sm_uncompressed.nii"
    reference = load_ct(shared_data / "robustness/derived" / ct_name)
    labels = load_mask(shared_data / "robustness/derived" / f"seg_sm_{variant}.nii.gz", reference)
    assert labels.dtype == np.uint8 and expected.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    assert expected.max() == 117


def test_mask_stored_in_other_axis_order_is_accepted(shared_data):
    """A mask on the same world grid, written LPS, against the RAS image."""
    labels = load_mask(shared_data / "robustness/derived/seg_sm_LPS.nii.gz", _source(shared_data))
    np.testing.assert_array_equal(labels, load_mask(shared_data / SOURCE_SEG, _source(shared_data)))


def test_hu_dtypes(shared_data):
    derived = shared_data / "robustness/derived"
    assert _source(shared_data).data.dtype == np.int16
    assert load_ct(derived / "ct_sm_uint16_inter-1024.nii.gz").data.dtype == np.int16
    assert load_ct(derived / "ct_sm_int16_slope0.5.nii.gz").data.dtype == np.float32
    int32_on_disk = shared_data / "real/totalseg_example/example_ct.nii.gz"
    assert load_ct(int32_on_disk).data.dtype == np.int16


def test_large_int16_file_loads_as_int16(tmp_path):
    data = np.full((512, 512, 200), -1000, dtype=np.int16)
    data[100:400, 100:400, :] = 40
    path = tmp_path / "big.nii"
    save_volume(data, np.diag([0.8, 0.8, 2.5, 1.0]), path)
    volume = load_ct(path)
    assert volume.data.dtype == np.int16
    assert volume.data.shape == (512, 512, 200)


def test_float_file_loads_as_float32(tmp_path):
    path = tmp_path / "float64.nii.gz"
    save_volume(_ct_volume().astype(np.float64), np.eye(4), path)
    assert load_ct(path).data.dtype == np.float32


# --- orientation warnings ---------------------------------------------------------------------

def test_oblique_loads_with_warning(shared_data):
    path = shared_data / "robustness/derived/ct_sm_oblique10deg.nii.gz"
    with pytest.warns(UserWarning, match="oblique"):
        volume = load_ct(path)
    np.testing.assert_array_equal(volume.original_affine, nib.load(path).affine)
    labels = load_mask(shared_data / "robustness/derived/seg_sm_oblique10deg.nii.gz", volume)
    np.testing.assert_array_equal(labels, load_mask(shared_data / SOURCE_SEG, _source(shared_data)))


def test_no_xform_codes_loads_with_warning(shared_data):
    with pytest.warns(UserWarning, match="orientation is unknown"):
        volume = load_ct(shared_data / "robustness/derived/ct_sm_no_xform_codes.nii.gz")
    assert volume.data.shape == (122, 101, 30)


def test_plain_file_loads_without_warning(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ct(shared_data / "robustness/derived/ct_sm_LPS.nii.gz")


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [SOURCE_CT, "robustness/derived/ct_sm_LPS.nii.gz"])
def test_to_original_inverts_reorientation(shared_data, name):
    volume = load_ct(shared_data / name)
    on_disk = np.asanyarray(nib.load(shared_data / name).dataobj)
    np.testing.assert_array_equal(to_original(volume.data, volume), on_disk)
    probabilities = np.stack([volume.data, -volume.data], axis=-1)  # trailing axes are carried along
    np.testing.assert_array_equal(to_original(probabilities, volume)[..., 1], -on_disk)


def test_permuted_axes_match_nibabel_canonical(tmp_path):
    """A file stored (Y, Z, X)-first with flips: same result as nib.as_closest_canonical, and back."""
    affine = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -5], [0, -3.0, 0, 7], [0, 0, 0, 1]])
    on_disk = np.arange(-1000, -1000 + 5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    on_disk[0, 0, 0] = 300
    path = tmp_path / "permuted.nii.gz"
    save_volume(on_disk, affine, path)
    volume = load_ct(path, check_intensity=False)
    canonical = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_array_equal(volume.data, np.asanyarray(canonical.dataobj))
    np.testing.assert_allclose(volume.affine, canonical.affine)
    assert volume.spacing == pytest.approx((2.0, 1.5, 3.0))
    assert volume.original_shape == (5, 4, 3)
    np.testing.assert_array_equal(to_original(volume.data, volume), on_disk)


@pytest.mark.parametrize("name", [SOURCE_CT, "robustness/derived/ct_sm_LPS.nii.gz",
                                  "robustness/derived/ct_sm_oblique10deg.nii.gz"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_save_labels_round_trip(shared_data, tmp_path, name, suffix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oblique warning is tested above
        volume = load_ct(shared_data / name)
    labels = (np.arange(volume.data.size) % 13).reshape(volume.data.shape).astype(np.uint8)
    out = tmp_path / "pred" / f"case{suffix}"
    save_labels(labels, volume, out)
    written = nib.load(out)
    assert written.shape == volume.original_shape
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(written.header.get_sform(), volume.original_affine)
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), to_original(labels, volume))
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    np.testing.assert_array_equal(load_mask(out, volume), labels)


def test_save_labels_rejects_wrong_shape(shared_data, tmp_path):
    volume = _source(shared_data)
    with pytest.raises(ValueError, match="shape"):
        save_labels(np.zeros((3, 3, 3), np.uint8), volume, tmp_path / "x.nii.gz")


# --- refusals: each names the file and the problem ---------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("nibabel/anatomical.nii", "below -500 HU"),
    ("nibabel/functional.nii", "4D image with 20 volumes"),
    ("nibabel/example4d.nii.gz", "4D image with 2 volumes"),
    ("nibabel/resampled_anat_moved.nii", "NaN"),
    ("nibabel/standard.nii.gz", "8-bit"),
    ("nibabel/reoriented_anat_moved.nii", "below -500 HU"),
    ("niivue/CT_AVM.nii.gz", "stored as uint8"),
    ("niivue/CT_pitch.nii.gz", "8-bit"),
])
def test_refuses_non_ct_files(shared_data, name, problem):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CT_pitch is oblique; the refusal is what matters
        with pytest.raises(NiftiError, match=problem) as info:
            load_ct(shared_data / "robustness" / name)
    message = str(info.value)
    assert name.split("/")[-1] in message and "\n" not in message


def test_nifti2_is_not_refused_for_being_nifti2(shared_data):
    with pytest.raises(NiftiError) as info:
        load_ct(shared_data / "robustness/nibabel/example_nifti2.nii.gz")
    assert "4D image with 2 volumes" in str(info.value)  # read fine; refused as 4D MR


def test_refuses_missing_file(tmp_path):
    with pytest.raises(NiftiError, match="missing.nii.gz: file not found"):
        load_ct(tmp_path / "missing.nii.gz")


def test_refuses_truncated_gzip(shared_data, tmp_path):
    content = (shared_data / SOURCE_CT).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(NiftiError, match="truncated.nii.gz: voxel data unreadable"):
        load_ct(path)


def test_refuses_text_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_text("not an image\n")
    with pytest.raises(NiftiError, match="x.nii.gz: not a readable NIfTI"):
        load_ct(path)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_refuses_2d_image(tmp_path, shape):
    path = tmp_path / "slice.nii.gz"
    save_volume(np.full(shape, -1000, np.int16), np.eye(4), path)
    with pytest.raises(NiftiError, match="slice.nii.gz: .*2D image"):
        load_ct(path)


def test_refuses_no_tissue(tmp_path):
    path = tmp_path / "air.nii.gz"
    save_volume(np.full((4, 4, 4), -1000, np.int16), np.eye(4), path)
    with pytest.raises(NiftiError, match="air.nii.gz: maximum is -1000 HU"):
        load_ct(path)
    assert load_ct(path, check_intensity=False).data.max() == -1000


def test_refuses_mask_on_other_grid(shared_data, tmp_path):
    path = tmp_path / "shifted_mask.nii.gz"
    volume = _source(shared_data)
    shifted = volume.original_affine.copy()
    shifted[2, 3] += 1.5  # half a voxel along z
    save_volume(np.zeros(volume.original_shape, np.uint8), shifted, path)
    with pytest.raises(NiftiError, match="shifted_mask.nii.gz: mask grid differs.*1.5 mm"):
        load_mask(path, volume)
    other_shape = tmp_path / "small_mask.nii.gz"
    save_volume(np.zeros((10, 10, 10), np.uint8), volume.original_affine, other_shape)
    with pytest.raises(NiftiError, match=r"small_mask.nii.gz: .*\(10, 10, 10\) vs \(122, 101, 30\)"):
        load_mask(other_shape, volume)


@pytest.mark.parametrize("value, problem", [(1.5, "non-integer values"), (-1.0, "negative values")])
def test_refuses_bad_mask_values(shared_data, tmp_path, value, problem):
    volume = _source(shared_data)
    labels = np.zeros(volume.original_shape, np.float32)
    labels[5, 5, 5] = value
    path = tmp_path / "bad_mask.nii.gz"
    save_volume(labels, volume.original_affine, path)
    with pytest.raises(NiftiError, match=f"bad_mask.nii.gz: .*{problem}"):
        load_mask(path, volume)


def test_mask_with_large_labels_is_int32(tmp_path):
    path_ct, path_mask = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    save_volume(_ct_volume(), np.eye(4), path_ct)
    save_volume(np.full((8, 7, 6), 300, np.int16), np.eye(4), path_mask)
    labels = load_mask(path_mask, load_ct(path_ct))
    assert labels.dtype == np.int32 and labels.max() == 300



# --- headers checked before reading: units, size, affine, datatype, scaling ------------------------

def _patched(tmp_path, data, name="patched.nii", affine=None, **fields):
    """Write `data` with nibabel, then overwrite header `fields` byte for byte (no nibabel checks)."""
    plain = tmp_path / "plain.nii"
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(plain)
    content = plain.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(content), check=False)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, on purpose
        for field, value in fields.items():
            header.structarr[field] = value
    content = header.binaryblock + content[348:]
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    return path


@pytest.mark.parametrize("unit_code, mm_per_unit", [(0, 1.0), (1, 1000.0), (2, 1.0), (3, 0.001), (2 | 8, 1.0)],
                         ids=["unknown_is_mm", "meter", "mm", "micron", "mm_with_seconds"])
def test_spatial_units_become_mm(tmp_path, unit_code, mm_per_unit):
    affine_mm = np.diag([0.5, 0.7, 2.0, 1.0])
    affine_mm[:3, 3] = (-100.0, 50.0, 30.0)
    affine_in_file = affine_mm.copy()
    affine_in_file[:3] /= mm_per_unit
    volume = load_ct(_patched(tmp_path, _ct_volume(), affine=affine_in_file, xyzt_units=unit_code))
    assert volume.spacing == pytest.approx((0.5, 0.7, 2.0))
    np.testing.assert_allclose(volume.original_affine, affine_mm)
    labels = (volume.data > 0).astype(np.uint8)
    save_labels(labels, volume, tmp_path / "pred.nii.gz")  # written in mm, same world grid
    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(written.affine, affine_mm)
    np.testing.assert_array_equal(load_mask(tmp_path / "pred.nii.gz", volume), labels)


def test_mask_in_meters_matches_image_in_mm(tmp_path):
    affine_mm = np.diag([2.0, 2.0, 3.0, 1.0])
    volume = load_ct(_patched(tmp_path, _ct_volume(), "ct.nii", affine=affine_mm, xyzt_units=2))
    mask = _patched(tmp_path, np.ones((8, 7, 6), np.uint8), "mask.nii", affine=affine_mm / 1000 * [1, 1, 1, 1000],
                    xyzt_units=1)
    assert load_mask(mask, volume).sum() == 8 * 7 * 6


def test_undefined_unit_code_is_refused(tmp_path):
    with pytest.raises(NiftiError, match="patched.nii: xyzt_units has spatial unit code 5"):
        load_ct(_patched(tmp_path, _ct_volume(), xyzt_units=5))


@pytest.mark.parametrize("srow_z, problem", [([0.0, 0.0, 0.0, 0.0], "affine \\(from the sform\\) is singular"),
                                             ([0.0, 0.0, np.nan, 0.0], "affine \\(from the sform\\) holds NaN"),
                                             ([0.0, 0.0, 1e-7, 0.0], "affine \\(from the sform\\) is singular")])
def test_singular_or_non_finite_affine_is_refused(tmp_path, srow_z, problem):
    path = _patched(tmp_path, _ct_volume(), srow_z=srow_z, sform_code=1)
    for load in (load_ct, lambda p: load_mask(p, load_ct(_patched(tmp_path, _ct_volume(), "ok.nii")))):
        with pytest.raises(NiftiError, match=problem):
            load(path)


@pytest.mark.parametrize("mm", [1e-5, 1e5])
def test_absurd_voxel_size_is_refused(tmp_path, mm):
    path = _patched(tmp_path, _ct_volume(), srow_x=[mm, 0, 0, 0], srow_y=[0, mm, 0, 0], srow_z=[0, 0, mm, 0])
    with pytest.raises(NiftiError, match=r"voxel size \[.*\] mm \(from the sform\) is outside 0.001..1000 mm"):
        load_ct(path)


def test_truncated_nii_is_refused_before_reading(tmp_path):
    """A 1.3 kB .nii whose header claims 1.5 GB: refused with the sizes, nothing allocated."""
    path = _patched(tmp_path, _ct_volume(), dim=[3, 1024, 1024, 768, 1, 1, 1, 1])
    tracemalloc.start()
    try:
        with pytest.raises(NiftiError, match=r"patched.nii: header implies 1.5 GB of voxel data .* after byte 352, "
                                             r"but the file holds 672 bytes: truncated"):
            load_ct(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2


def test_header_beyond_the_absolute_cap_is_refused(tmp_path):
    path = _patched(tmp_path, _ct_volume(), dim=[3, 32767, 32767, 32767, 1, 1, 1, 1])
    with pytest.raises(NiftiError, match=r"header implies 64 TB .*; abdoseg reads at most 8 GB"):
        load_ct(path)


def test_all_zero_gzip_at_the_deflate_limit_still_loads(tmp_path):
    """An empty mask compresses ~1028:1; the ratio bound (1100) must not refuse it."""
    shape = (256, 256, 64)
    volume = Volume(np.zeros(shape, np.int16), (1.0, 1.0, 1.0), np.eye(4), np.eye(4), shape, "ct.nii")
    path = tmp_path / "empty_mask.nii.gz"
    content = _patched(tmp_path, np.zeros(shape, np.uint8), "mask.nii").read_bytes()
    path.write_bytes(gzip.compress(content, compresslevel=9))
    assert 1000 < len(content) / path.stat().st_size < 1100
    assert load_mask(path, volume).max() == 0


@pytest.mark.parametrize("data", [np.zeros((4, 4, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                  np.zeros((4, 4, 4), np.complex64)], ids=["rgb", "complex"])
def test_rgb_and_complex_datatypes_are_refused(tmp_path, data):
    path = tmp_path / "color.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    with pytest.raises(NiftiError, match=r"color.nii.gz: datatype (RGB|complex64) .* is not supported"):
        load_ct(path)


def test_huge_uint64_mask_is_refused(tmp_path):
    volume = load_ct(_patched(tmp_path, _ct_volume(), "ct.nii"))
    labels = np.zeros((8, 7, 6), np.uint64)
    labels[1, 1, 1] = np.iinfo(np.uint64).max
    path = tmp_path / "mask.nii.gz"
    nib.Nifti1Image(labels, np.eye(4), dtype=np.uint64).to_filename(path)
    with pytest.raises(NiftiError, match=r"mask.nii.gz: label map holds values up to 1.8\d*e\+19; label ids are "
                                         r"0..65535"):
        load_mask(path, volume)


@pytest.mark.parametrize("slope, inter, problem", [
    (1e36, 0.0, "NaN or inf after scl_slope 1e\\+36"),     # integral scaling beyond int64 -> float32 inf
    (1.0, 1e39, "not a readable NIfTI file .*invalid intercept inf"),  # NIfTI-1 stores float32: inf
])
def test_absurd_scaling_is_refused(tmp_path, slope, inter, problem):
    path = _patched(tmp_path, _ct_volume(), scl_slope=slope, scl_inter=inter)
    with np.errstate(over="ignore"), pytest.raises(NiftiError, match=problem):
        load_ct(path, check_intensity=False)


def test_nan_or_zero_slope_means_no_scaling(tmp_path):
    for slope in (0.0, np.nan):
        volume = load_ct(_patched(tmp_path, _ct_volume(), scl_slope=slope, scl_inter=-1024.0))
        np.testing.assert_array_equal(volume.data, _ct_volume())

# --- small pieces -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, case_id", [
    ("Case_00012_0000.nii.gz", "Case_00012"),
    ("/data/Mask/Case_00012.nii.gz", "Case_00012"),
    ("x.nii", "x"),
    ("FLARE22_Tr_0001.nii.gz", "FLARE22_Tr_0001"),  # only the _0000 channel suffix is dropped
])
def test_case_id_from_path(path, case_id):
    assert case_id_from_path(path) == case_id


def test_save_volume_refuses_other_suffix(tmp_path):
    with pytest.raises(ValueError, match="must end with .nii or .nii.gz"):
        save_volume(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "x.mha")
