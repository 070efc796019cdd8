"""DICOM in and out: series built here from the real CT with pydicom, read back, round-tripped.

The series are written as a scanner would (CT Image Storage, LPS, int16 + rescale intercept,
generated UIDs) in shuffled file order with shuffled InstanceNumbers; one copy is JPEG 2000.
"""

import json
import random

import nibabel as nib
import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
highdicom = pytest.importorskip("highdicom")
rt_utils = pytest.importorskip("rt_utils")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from network.unet import UNet  # noqa: E402
from training.__main__ import main  # noqa: E402
from training.checkpoint import FORMAT, label_scheme, save_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.dicom_export import labels_in_series_order, write_dicom_seg, write_rtstruct  # noqa: E402
from training.predict import predict_files  # noqa: E402
from utils.dicom_io import load_dicom_ct, load_dicom_series  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.labels import COLORS, DISPLAY_NAMES, NUM_CLASSES, ORGAN_IDS, get_source  # noqa: E402
from utils.organ_statistics import organ_statistics  # noqa: E402
from utils.geometry import PreprocessParams  # noqa: E402
from utils.volume_io import load_ct, load_mask  # noqa: E402

INTERCEPT = -1024


def write_series(data, affine, folder, *, compress=False, tilt_deg=0.0, drop_slice=None, modality="CT",
                 study_uid=None, seed=0, shuffle_instances=True):
    """Write canonical RAS ``data`` (X, Y, Z) HU with ``affine`` as an axial LPS DICOM series.

    Pixel column i runs to patient left (RAS X decreasing), row j to posterior (Y decreasing).
    File names are in shuffled order; InstanceNumbers too unless ``shuffle_instances=False``.
    """
    size_x, size_y, num_slices = data.shape
    flip = np.array([[-1, 0, 0, size_x - 1], [0, -1, 0, size_y - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine @ flip  # (i, j, k) -> LPS mm
    row_cosines = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    column_cosines = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(num_slices))
    random.Random(seed).shuffle(order)  # file names and instance numbers unrelated to position
    for name_index, k in enumerate(order):
        if k == drop_slice:
            continue
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        position[1] += k * np.linalg.norm(lps[:3, 2]) * np.tan(np.radians(tilt_deg))
        pixels = (data[::-1, ::-1, k].T - INTERCEPT).astype(np.int16)  # (rows=Y, columns=X)
        dataset = _slice_dataset(pixels, position, row_cosines, column_cosines, lps, modality,
                                 (study_uid, series_uid, frame_uid),
                                 instance=num_slices - name_index if shuffle_instances else k + 1)
        if compress:
            dataset.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
        dataset.save_as(folder / f"IM{name_index:04d}x{k * 7919 % 1000:03d}", enforce_file_format=True)
    return folder


def _slice_dataset(pixels, position, row_cosines, column_cosines, lps, modality, uids, instance):
    study_uid, series_uid, frame_uid = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Abdoseg", "ABD001", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
    ds.SeriesNumber, ds.InstanceNumber = 3, instance
    ds.ImagePositionPatient = [float(v) for v in position[:3]]
    ds.ImageOrientationPatient = [float(v) for v in (*row_cosines, *column_cosines)]
    ds.PixelSpacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
    ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1, "HU"
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def real_ct(shared_data):
    path = shared_data / "real" / "totalseg_example" / "example_ct.nii.gz"
    return path, load_ct(path)


@pytest.fixture(scope="module")
def series(real_ct, tmp_path_factory):
    """The whole real CT as an uncompressed series (122 x 101 pixels, 112 slices)."""
    _, volume = real_ct
    return write_series(volume.data, volume.affine, tmp_path_factory.mktemp("dicom") / "ct_series")


@pytest.fixture(scope="module")
def harmonised_labels(real_ct, shared_data):
    """The TotalSegmentator labels of the real CT in our ids: the 'prediction' for export tests."""
    _, volume = real_ct
    path = shared_data / "real" / "totalseg_example" / "example_seg_fast_force_split.nii.gz"
    return get_source("totalseg").remap(load_mask(path, volume), path)


def test_series_reads_as_the_nifti_it_came_from(real_ct, series):
    _, volume = real_ct
    dicom = load_dicom_ct(series)
    assert dicom.data.dtype == np.int16 and dicom.data.shape == volume.data.shape
    np.testing.assert_array_equal(dicom.data, volume.data)  # same HU at the same voxel ...
    np.testing.assert_allclose(dicom.affine, volume.affine, atol=1e-4)  # ... at the same world position
    np.testing.assert_allclose(dicom.spacing, volume.spacing, atol=1e-6)
    assert dicom.original_shape == (122, 101, 112)  # (columns, rows, slices)
    # the series' own voxel order is LPS-like: i runs to the left, so RAS x decreases
    assert dicom.original_affine[0, 0] < 0 and dicom.original_affine[1, 1] < 0


@pytest.mark.slow
def test_volume_and_affine_match_dicom2nifti(real_ct, tmp_path):
    """The reference converter gives the same voxels and affine (after reorientation to RAS+).

    dicom2nifti orders slices by InstanceNumber, so this series numbers its instances by position.
    """
    dicom2nifti = pytest.importorskip("dicom2nifti")
    _, volume = real_ct
    folder = write_series(volume.data, volume.affine, tmp_path / "series", shuffle_instances=False, seed=5)
    dicom2nifti.dicom_series_to_nifti(str(folder), str(tmp_path / "reference.nii.gz"), reorient_nifti=False)
    reference = load_ct(tmp_path / "reference.nii.gz")
    ours = load_dicom_ct(folder)
    np.testing.assert_array_equal(ours.data, reference.data)
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-4)


def test_jpeg2000_series_decodes_to_the_same_volume(real_ct, tmp_path):
    _, volume = real_ct
    crop = volume.data[:, :, 40:52]
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ [0, 0, 40, 1])[:3]
    folder = write_series(crop, affine, tmp_path / "j2k", compress=True, seed=3)
    first = pydicom.dcmread(next(folder.iterdir()))
    assert first.file_meta.TransferSyntaxUID == JPEG2000Lossless
    dicom = load_dicom_ct(folder)
    np.testing.assert_array_equal(dicom.data, crop)
    np.testing.assert_allclose(dicom.affine, affine, atol=1e-4)


def _small_series(real_ct, folder, **kwargs):
    _, volume = real_ct
    return write_series(volume.data[:, :, 50:58], volume.affine, folder, **kwargs)


@pytest.mark.parametrize("variant, expected", [
    ("two_series", "holds 2 DICOM series"),
    ("missing_slice", "uneven slice spacing"),
    ("tilted", "gantry tilt of 10.0 degrees"),
    ("mr", "modality MR is not CT"),
    ("empty", "holds no DICOM files"),
])
def test_bad_series_get_one_line_naming_the_folder(real_ct, tmp_path, variant, expected):
    folder = tmp_path / "bad"
    folder.mkdir()
    if variant == "two_series":
        _small_series(real_ct, folder, seed=1)
        _small_series(real_ct, folder, seed=2)
    elif variant == "missing_slice":
        _small_series(real_ct, folder, drop_slice=4)
    elif variant == "tilted":
        _small_series(real_ct, folder, tilt_deg=10.0)
    elif variant == "mr":
        _small_series(real_ct, folder, modality="MR")
    else:
        (folder / "notes.txt").write_text("not DICOM")
    with pytest.raises(UserError) as caught:
        load_dicom_ct(folder)
    message = str(caught.value)
    assert expected in message and str(folder) in message and "\n" not in message


def test_seg_reads_back_voxel_for_voxel(series, harmonised_labels, tmp_path):
    volume, headers = load_dicom_series(series)
    path = write_dicom_seg(harmonised_labels, volume, headers, tmp_path / "case_seg.dcm")
    seg = highdicom.seg.segread(path)
    present = [organ for organ in range(1, NUM_CLASSES) if (harmonised_labels == organ).any()]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert len(seg.SegmentSequence) == len(present)
    for item, organ in zip(seg.SegmentSequence, present):
        assert item.SegmentLabel == DISPLAY_NAMES[organ]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        rgb = highdicom.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(rgb, int) - COLORS[organ]).max() <= 1
    uids = [h.SOPInstanceUID for h in headers]
    segments = seg.get_pixels_by_source_instance(uids, combine_segments=True)  # (S, R, C) segment numbers
    organ_of_segment = np.array([0, *present])
    empty = np.zeros_like(harmonised_labels)
    assert write_dicom_seg(empty, volume, headers, tmp_path / "empty_seg.dcm") is None  # SEG needs a segment
    assert not (tmp_path / "empty_seg.dcm").exists()
    np.testing.assert_array_equal(organ_of_segment[segments], labels_in_series_order(harmonised_labels, volume))


def _rows_by_columns(monkeypatch):
    """rt-utils 1.2.7 reads contours into (Columns, Rows) buffers, but fills them as (row, column),
    which clips a non-square image; give its rasteriser (Rows, Columns) buffers instead."""
    from rt_utils import image_helper
    monkeypatch.setattr(image_helper, "create_empty_slice_mask",
                        lambda s: np.zeros((int(s.Rows), int(s.Columns)), dtype=bool))
    monkeypatch.setattr(image_helper, "create_empty_series_mask",
                        lambda d: np.zeros((int(d[0].Rows), int(d[0].Columns), len(d)), dtype=bool))


@pytest.mark.parametrize("square", [False, True], ids=["122x101 pixels", "square 101x101 crop"])
def test_rtstruct_rasterises_back_at_dice_095(real_ct, series, harmonised_labels, tmp_path, monkeypatch, square):
    if square:  # rt-utils as it is (no patch) reads square images right
        _, full = real_ct
        affine = full.affine.copy()
        affine[:3, 3] = (full.affine @ [10, 0, 0, 1])[:3]
        series = write_series(full.data[10:111], affine, tmp_path / "square", seed=4)
        harmonised_labels = harmonised_labels[10:111]
    else:
        _rows_by_columns(monkeypatch)
    volume, headers = load_dicom_series(series)
    path = write_rtstruct(harmonised_labels, volume, headers, tmp_path / "case_rtstruct.dcm")
    dataset = pydicom.dcmread(path)
    assert dataset.Modality == "RTSTRUCT" and dataset.StudyInstanceUID == headers[0].StudyInstanceUID
    referenced = dataset.ReferencedFrameOfReferenceSequence[0]
    assert referenced.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    series_ref = referenced.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series_ref.ContourImageSequence} == \
        {h.SOPInstanceUID for h in headers}
    present = [organ for organ in range(1, NUM_CLASSES) if (harmonised_labels == organ).any()]
    names = [roi.ROIName for roi in dataset.StructureSetROISequence]
    assert names == [DISPLAY_NAMES[organ] for organ in present]
    colours = [[int(v) for v in roi.ROIDisplayColor] for roi in dataset.ROIContourSequence]
    assert colours == [list(COLORS[organ]) for organ in present]
    read_back = rt_utils.RTStructBuilder.create_from(str(series), str(path))
    expected = labels_in_series_order(harmonised_labels, volume).transpose(1, 2, 0)  # (R, C, S)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    checked = 0
    for organ in present:
        truth = expected == organ
        if truth.sum() * voxel_ml <= 5:
            continue
        mask = read_back.get_roi_mask_by_name(DISPLAY_NAMES[organ])
        dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
        assert dice >= 0.95, (DISPLAY_NAMES[organ], dice)
        checked += 1
    assert checked >= 8  # liver, kidneys, spleen, stomach, bowel, colon, bladder, femur heads are > 5 ml


def test_organ_statistics_by_hand():
    labels = np.zeros((3, 2, 2), np.uint8)
    labels[0, 0, 0] = labels[1, 0, 0] = ORGAN_IDS["liver"]
    labels[2, 1, 1] = ORGAN_IDS["kidney"]
    hu = np.zeros((3, 2, 2), np.int16)
    hu[0, 0, 0], hu[1, 0, 0], hu[2, 1, 1] = 40, 60, -7
    stats = organ_statistics(labels, hu, (2.0, 2.5, 4.0))  # 20 mm^3 = 0.02 ml per voxel
    liver, kidney = stats["organs"]["liver"], stats["organs"]["kidney"]
    assert liver == {"voxels": 2, "volume_ml": pytest.approx(0.04), "mean_hu": 50.0, "sd_hu": 10.0}
    assert kidney["mean_hu"] == -7.0 and kidney["sd_hu"] == 0.0
    assert stats["organs"]["spleen"] == {"voxels": 0, "volume_ml": 0.0, "mean_hu": None, "sd_hu": None}
    with pytest.raises(ValueError, match="shape"):
        organ_statistics(labels, hu[:2], (1, 1, 1))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = TrainConfig(features=(4, 8))
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint({"format": FORMAT, "model": UNet(features=config.features).state_dict(),
                     "config": config.to_dict(), "preprocess": PreprocessParams(target_size=(64, 64)).to_dict(),
                     "labels": label_scheme(), "epoch": 0}, path)
    return path


class IntensityBands(torch.nn.Module):
    """Fake model: organ ids by intensity band of the centre slice (window -400..400 HU -> 0..1),
    so the labels follow the anatomy and any flip or shift between the two paths shows."""

    in_channels = 1

    def forward(self, x):  # (B, 1, H, W) -> (B, 12, H, W)
        image = x[:, 0]
        band = (image > 0.3).long() + (image > 0.5).long() + (image > 0.6).long() + (image > 0.9).long()
        organ = torch.tensor([0, 7, 5, 4, 3])[band]  # air 0, fat 7, soft tissue 5 / 4, bone 3
        return torch.nn.functional.one_hot(organ, NUM_CLASSES).permute(0, 3, 1, 2).float()


@pytest.mark.slow
def test_nifti_and_dicom_paths_predict_the_same_labels(real_ct, series, tiny_checkpoint, tmp_path, monkeypatch):
    import training.predict
    nifti_path, volume = real_ct
    params = PreprocessParams(target_size=(64, 64))
    monkeypatch.setattr(training.predict, "model_from_checkpoint",
                        lambda state: (IntensityBands(), TrainConfig(features=(4, 8)), params))
    from_nifti = predict_files(tiny_checkpoint, nifti_path, tmp_path / "single.nii.gz", progress=False)
    assert from_nifti["written"] == [str(tmp_path / "single.nii.gz")]
    code = main(["predict", "-c", str(tiny_checkpoint), "-i", str(series), "-o", str(tmp_path / "out"),
                 "--format", "rtstruct", "dicom-seg", "nifti", "--statistics", "--quiet"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".abdoseg-output.json", "abdoseg_labels.ctbl", "ct_series.nii.gz", "ct_series_rtstruct.dcm", "ct_series_seg.dcm",
                     "ct_series_statistics.json", "labels.txt"]
    nifti_labels = np.asanyarray(nib.as_closest_canonical(nib.load(tmp_path / "single.nii.gz")).dataobj)
    dicom_image = nib.as_closest_canonical(nib.load(tmp_path / "out" / "ct_series.nii.gz"))
    np.testing.assert_allclose(dicom_image.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(dicom_image.dataobj), nifti_labels)
    assert len(np.unique(nifti_labels)) == 5  # the check can fail: the labels vary
    stats = json.loads((tmp_path / "out" / "ct_series_statistics.json").read_text())
    voxels = sum(organ["voxels"] for organ in stats["organs"].values())
    assert voxels == int(np.count_nonzero(nifti_labels))


def test_dicom_formats_need_dicom_input_and_outputs_stay_out_of_inputs(real_ct, series, tiny_checkpoint, tmp_path):
    nifti_path, _ = real_ct
    with pytest.raises(UserError, match="needs DICOM input"):
        predict_files(tiny_checkpoint, nifti_path, tmp_path / "out", formats=("dicom-seg",), progress=False)
    with pytest.raises(UserError, match="never writes into its inputs"):
        predict_files(tiny_checkpoint, series, series / "predictions", progress=False)
    with pytest.raises(UserError, match="the output file is the input"):
        predict_files(tiny_checkpoint, nifti_path, nifti_path, progress=False)
    assert not (series / "predictions").exists()


def test_preprocess_reads_a_dicom_series_as_it_reads_the_nifti(real_ct, shared_data, tmp_path):
    """An image folder may hold a DICOM series subfolder per case: same arrays as from the NIfTI."""
    from utils.preprocess_data import preprocess_dataset
    path, volume = real_ct
    mask = shared_data / "real" / "totalseg_example" / "example_seg_fast_force_split.nii.gz"
    for kind in ("nifti", "dicom"):
        images, masks = tmp_path / kind / "Image", tmp_path / kind / "Mask"
        masks.mkdir(parents=True)
        (masks / "Case_1.nii.gz").symlink_to(mask)
        if kind == "dicom":
            write_series(volume.data, volume.affine, images / "Case_1")
        else:
            images.mkdir()
            (images / "Case_1_0000.nii.gz").symlink_to(path)
        manifest = preprocess_dataset("totalseg", images, masks, tmp_path / kind / "pre",
                                      PreprocessParams(target_size=(64, 64)), progress=False)
        assert len(manifest["cases"]) == 1 and not manifest.get("failed"), manifest.get("failed")
    arrays = sorted(p.name for p in (tmp_path / "nifti" / "pre" / "Case_1").glob("*.npy"))
    assert arrays
    for name in arrays:
        from_nifti = np.load(tmp_path / "nifti" / "pre" / "Case_1" / name)
        from_dicom = np.load(tmp_path / "dicom" / "pre" / "Case_1" / name)
        np.testing.assert_allclose(from_dicom, from_nifti, atol=1e-3, err_msg=name)
