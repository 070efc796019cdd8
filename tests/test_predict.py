"""Prediction: outputs land in the input's own grid, and labels land on the right voxels."""

import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest

from utils.errors import UserError
import scipy.ndimage
import torch
from torch import nn

import training.predict as predict
from network.unet import UNet
from training.checkpoint import FORMAT, label_scheme, save_checkpoint
from training.config import TrainConfig
from training.predict import (generate_predictions, keep_largest_component, load_and_preprocess_ct_data,
                              predict_files, predict_volume, predict_volume_with_probabilities,
                              write_label_descriptions)
from utils.geometry import PreprocessParams
from utils.labels import NUM_CLASSES, ORGAN_IDS, ORGANS
from utils.volume_io import Volume, save_volume

TINY = TrainConfig(features=(4, 8))
LIVER = ORGAN_IDS["liver"]  # 5: what the fake model predicts on bright voxels


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny U-Net saved as training would save it."""
    torch.manual_seed(0)
    model = UNet(features=TINY.features)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint({"format": FORMAT, "model": model.state_dict(), "config": TINY.to_dict(),
                     "preprocess": PreprocessParams(target_size=(64, 64)).to_dict(),
                     "labels": label_scheme(), "epoch": 0}, path)
    return path


class BrightIsLiver(nn.Module):
    """Fake model: liver logits where the centre input channel is above 0.6 (the 1000 HU cube,
    not the -200 HU body), background elsewhere."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x):  # (B, C, H, W) -> (B, 12, H, W)
        assert x.shape[1] == self.in_channels
        bright = (x[:, self.in_channels // 2] > 0.6).float()
        logits = torch.zeros(x.shape[0], NUM_CLASSES, *x.shape[-2:])
        logits[:, 0] = 10 * (1 - bright)
        logits[:, LIVER] = 10 * bright
        return logits


def synthetic_ct(shape, cube) -> np.ndarray:
    """Air (-1000 HU) with a fat-like (-200 HU) body and a 1000 HU cube at the `cube` index slices."""
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[tuple(slice(n // 8, n - n // 8) for n in shape[:2])] = -200
    hu[cube] = 1000
    return hu


def slice_axis(affine) -> int:
    """The on-disk axis that runs head-to-foot (canonical Z)."""
    return int(np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)[0])


# --------------------------------------------------------------------------- real files

@pytest.mark.slow
def test_outputs_keep_the_input_grid_on_real_files(shared_data, tiny_checkpoint, tmp_path):
    derived = shared_data / "robustness" / "derived"
    real = shared_data / "real" / "totalseg_example" / "example_ct.nii.gz"
    with pytest.warns(UserWarning) as caught:
        summary = predict_files(tiny_checkpoint, derived, tmp_path / "derived", progress=False)
        summary_real = predict_files(tiny_checkpoint, real, tmp_path / "real", progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "oblique" in messages and "no orientation" in messages

    cts = sorted(p for p in derived.iterdir() if p.name.startswith("ct_sm_"))
    assert len(cts) == 9
    # the label maps in the folder are not CT: reported, the rest completes
    assert sorted(f["file"] for f in summary["failed"]) == sorted(str(p) for p in derived.glob("seg_sm_*"))
    assert len(summary["written"]) == len(cts) and len(summary_real["written"]) == 1
    for source in [*cts, real]:
        case_id = source.name.split(".nii")[0]
        out = (tmp_path / ("real" if source == real else "derived")) / f"{case_id}.nii.gz"
        original, written = nib.load(source), nib.load(out)
        assert written.shape == original.shape[:3], source.name
        assert np.array_equal(written.affine, original.affine), source.name
        assert np.array_equal(written.header.get_sform(), original.affine), source.name
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= set(range(NUM_CLASSES))


def test_load_and_preprocess_shapes_and_dtypes(shared_data):
    folder = shared_data / "real" / "totalseg_example"
    ct, mask = load_and_preprocess_ct_data(folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz",
                                           target_size=(96, 80), label_rearrange="totalseg")
    assert ct.shape == mask.shape == (96, 80, 30)  # slices along the last axis, like volumes
    assert ct.dtype == np.float32 and 0 <= ct.min() and ct.max() <= 1
    assert mask.dtype == np.uint8 and mask.max() < NUM_CLASSES and mask.any()
    ct_only, no_mask = load_and_preprocess_ct_data(folder / "example_ct_sm.nii.gz", target_size=(96, 80))
    assert no_mask is None and np.array_equal(ct_only, ct)


# --------------------------------------------------------------------------- geometry

GEOMETRIES = {
    # name: (on-disk shape, affine)
    "ras": ((90, 70, 12), np.diag([1.5, 2.0, 3.0, 1.0])),
    "lps": ((90, 70, 12), np.array([[-1.5, 0, 0, 120.0], [0, -2.0, 0, 80.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])),
    # slice axis first on disk, rows and columns flipped
    "permuted": ((12, 90, 70), np.array([[0, -1.5, 0, 50.0], [0, 0, 2.0, 0], [-3.0, 0, 0, 10.0], [0, 0, 0, 1]])),
}


@pytest.mark.parametrize("spacing", [None, 2.0, 3.0], ids=["resize", "crop", "pad"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_labels_land_on_the_input_voxels(geometry, spacing, tiny_checkpoint, tmp_path, monkeypatch):
    shape, affine = GEOMETRIES[geometry]
    # an off-centre cube, asymmetric along every axis so a flip or transpose would show
    index = {90: slice(14, 34), 70: slice(38, 52), 12: slice(2, 7)}
    cube = tuple(index[n] for n in shape)
    save_volume(synthetic_ct(shape, cube), affine, tmp_path / "in" / "case.nii.gz")
    params = PreprocessParams(target_size=(64, 64), spacing=spacing)
    monkeypatch.setattr(predict, "model_from_checkpoint", lambda state: (BrightIsLiver(), TINY, params))

    summary = predict_files(tiny_checkpoint, tmp_path / "in", tmp_path / "out", progress=False)

    assert summary["failed"] == []
    predicted = np.asarray(nib.load(tmp_path / "out" / "case.nii.gz").dataobj) == LIVER  # on-disk order
    expected = np.zeros(shape, dtype=bool)
    expected[cube] = True
    # exact along the slice axis (never resampled), within one voxel in-plane (bilinear edges)
    structure = np.moveaxis(np.stack([np.zeros((3, 3), bool), np.ones((3, 3), bool), np.zeros((3, 3), bool)]),
                            0, slice_axis(affine))
    inner = scipy.ndimage.binary_erosion(expected, structure)
    outer = scipy.ndimage.binary_dilation(expected, structure)
    assert predicted[inner].all() and not predicted[~outer].any()
    assert abs(int(predicted.sum()) - int(expected.sum())) < 0.15 * expected.sum()


def test_crop_outside_the_field_of_view_is_background(tmp_path):
    # spacing 1.0 mm on a 1.5 mm grid: 90 px -> 135 px, cropped to 64: the volume edges are outside
    hu = synthetic_ct((90, 70, 4), (slice(0, 90), slice(0, 70), slice(1, 3)))
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    volume = Volume(hu, (1.5, 2.0, 3.0), affine, affine, hu.shape, "x")
    labels = predict_volume(BrightIsLiver(), volume, PreprocessParams(target_size=(64, 64), spacing=1.0))
    assert labels[45, 35, 1] == LIVER and labels[0, 0, 1] == 0 and labels[89, 69, 2] == 0
    assert not labels[:, :, [0, 3]].any()


def test_neighbouring_slices_are_centred(tmp_path):
    hu = synthetic_ct((40, 40, 6), (slice(10, 30), slice(10, 30), slice(2, 3)))
    volume = Volume(hu, (1.0, 1.0, 1.0), np.eye(4), np.eye(4), hu.shape, "x")
    labels = predict_volume(BrightIsLiver(in_channels=5), volume, PreprocessParams(target_size=(32, 32)),
                            in_channels=5)
    assert np.array_equal(np.flatnonzero(labels.any(axis=(0, 1))), [2])


# --------------------------------------------------------------------------- pieces

def test_generate_predictions_shapes_and_dtypes():
    torch.manual_seed(0)
    ct = np.random.default_rng(0).random((36, 28, 5), dtype=np.float32)  # (H, W, Z)
    for in_channels in (1, 3):
        model = UNet(in_channels=in_channels, features=(4, 8)).train()
        out = generate_predictions(model, ct, "cpu", batch_size=2)
        assert out.shape == (36, 28, 5) and out.dtype == np.uint8 and out.max() < NUM_CLASSES
        assert model.training  # the caller's mode is restored
    bright = generate_predictions(BrightIsLiver(), ct, torch.device("cpu"))
    assert np.array_equal(bright == LIVER, ct > 0.6)


def test_keep_largest_component_drops_small_detached_blobs():
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[2:12, 2:12, 2:12] = LIVER
    labels[20:22, 20:22, 20:22] = LIVER  # detached blob
    kidney = ORGAN_IDS["kidney"]
    labels[2:8, 20:26, 2:8] = kidney
    labels[22:28, 20:26, 2:8] = kidney
    labels[15, 15, 25] = kidney  # a third, tiny kidney piece
    labels[2:5, 2:5, 20:23] = ORGAN_IDS["spleen"]

    kept = keep_largest_component(labels)

    assert not kept[20:22, 20:22, 20:22].any() and (kept[2:12, 2:12, 2:12] == LIVER).all()
    assert (kept == kidney).sum() == 2 * 6 ** 3 and kept[15, 15, 25] == 0
    assert (kept == ORGAN_IDS["spleen"]).sum() == 27
    assert labels[20, 20, 20] == LIVER  # input untouched


def test_label_description_files(tmp_path):
    itk, slicer = write_label_descriptions(tmp_path)
    rows = [line for line in itk.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == NUM_CLASSES
    assert rows[0].split() == ["0", "0", "0", "0", "0", "0", "0", '"Clear', 'Label"']
    for organ_id, row in enumerate(rows[1:], start=1):
        fields = row.split(maxsplit=7)
        assert int(fields[0]) == organ_id and fields[7].strip('"').lower().replace(" ", "_") == ORGANS[organ_id]
    table = [line.split() for line in slicer.read_text().splitlines() if not line.startswith("#")]
    assert [(int(t[0]), t[1]) for t in table] == list(enumerate(ORGANS))


def test_folder_with_a_bad_file(tiny_checkpoint, tmp_path):
    hu = synthetic_ct((40, 36, 5), (slice(5, 15), slice(5, 15), slice(1, 3)))
    save_volume(hu, np.diag([2.0, 2.0, 4.0, 1.0]), tmp_path / "in" / "good_0000.nii.gz")
    (tmp_path / "in" / "bad.nii.gz").write_text("not a NIfTI file")

    summary = predict_files(tiny_checkpoint, tmp_path / "in", tmp_path / "out", save_probabilities=True,
                            largest_component=True, progress=False)

    assert summary["written"] == [str(tmp_path / "out" / "good.nii.gz")]
    assert [f["file"] for f in summary["failed"]] == [str(tmp_path / "in" / "bad.nii.gz")]
    assert "bad.nii.gz" in summary["failed"][0]["error"]
    probabilities = nib.load(tmp_path / "out" / "good_probabilities.nii.gz")
    assert probabilities.shape == (40, 36, 5, NUM_CLASSES) and probabilities.get_data_dtype() == np.uint8
    sums = np.asarray(probabilities.dataobj).sum(axis=-1, dtype=np.int64)
    assert np.abs(sums - 255).max() <= NUM_CLASSES // 2 + 1  # rounding of 12 values
    assert (tmp_path / "out" / "labels.txt").is_file()
    assert not [p for p in (tmp_path / "out").rglob(".abdoseg-tmp-*")]  # no temporaries left


def test_refuses_to_write_into_the_input_folder(tiny_checkpoint, tmp_path):
    save_volume(synthetic_ct((20, 20, 4), (slice(5, 9),) * 3), np.eye(4), tmp_path / "case.nii.gz")
    with pytest.raises(UserError, match="input folder"):
        predict_files(tiny_checkpoint, tmp_path, tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.PredictError, match="no .nii"):
        predict_files(tiny_checkpoint, tmp_path / "empty", tmp_path / "out", progress=False)


@pytest.mark.slow
def test_memory_is_one_chunk_not_the_whole_volume(monkeypatch):
    # 128 x 128 x 200: whole-volume float32 logits would be 12 * 128 * 128 * 200 * 4 = 157 MB
    hu = synthetic_ct((128, 128, 200), (slice(30, 60), slice(40, 90), slice(20, 120)))
    volume = Volume(hu, (1.0, 1.0, 1.0), np.eye(4), np.eye(4), hu.shape, "x")
    chunk_shapes = []
    restore = predict.restore_in_plane

    def spy(tensor, *args, **kwargs):
        out = restore(tensor, *args, **kwargs)
        chunk_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(predict, "restore_in_plane", spy)
    monkeypatch.setattr(predict, "RESTORE_CHUNK_BYTES", 12 * 128 * 128 * 4 * 3)  # 3 slices per chunk
    tracemalloc.start()
    try:
        labels, probabilities = predict_volume_with_probabilities(
            BrightIsLiver(), volume, PreprocessParams(target_size=(128, 128)), batch_size=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert labels.shape == (128, 128, 200) and labels.dtype == np.uint8
    assert probabilities.shape == (NUM_CLASSES, 128, 128, 200) and probabilities.dtype == np.uint8
    assert max(shape[0] for shape in chunk_shapes) <= 3 and sum(shape[0] for shape in chunk_shapes) == 200
    # numpy holds labels (3.3 MB) + uint8 probabilities (39 MB) + one chunk, far from 157 MB
    assert peak < 39 * 2**20 + 3.3 * 2**20 + 12 * 2**20
    assert (labels[30:60, 40:90, 20:120] == LIVER).all() and (labels == LIVER).sum() == 30 * 50 * 100


def test_bf16_autocast_runs_in_bf16_and_predicts_like_fp32():
    """A real (conv) U-Net, whose output autocast does change: the bf16 path must compute in
    bf16 (its logits differ from fp32 and come out of the model as bf16) and agree within tolerance."""
    torch.manual_seed(0)
    model = UNet(features=(4, 8)).eval()
    seen = {}
    model.register_forward_hook(lambda module, inputs, output: seen.setdefault(output.dtype, []).append(
        output.detach().float().clone()))
    hu = synthetic_ct((48, 40, 3), (slice(10, 20), slice(10, 20), slice(0, 3)))
    volume = Volume(hu, (1.0, 1.0, 1.0), np.eye(4), np.eye(4), hu.shape, "x")
    params = PreprocessParams(target_size=(32, 32))
    labels32, probabilities32 = predict_volume_with_probabilities(model, volume, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPUs without native bf16 may warn
        labels16, probabilities16 = predict_volume_with_probabilities(model, volume, params, amp_dtype=torch.bfloat16)
    assert set(seen) == {torch.float32, torch.bfloat16}  # the bf16 run's logits really were bf16
    fp32_logits, bf16_logits = torch.cat(seen[torch.float32]), torch.cat(seen[torch.bfloat16])
    difference = (fp32_logits - bf16_logits).abs()
    assert 0 < difference.max() < 0.05 * fp32_logits.abs().max()  # changed, but only by rounding
    assert np.abs(probabilities32.astype(int) - probabilities16.astype(int)).max() <= 8  # of 255
    assert (labels32 == labels16).mean() > 0.95
