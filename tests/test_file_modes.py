"""Files abdoseg writes get the user's umask mode, not the 0600 of ``tempfile.mkstemp``."""

import os
import stat

import numpy as np
import pytest
import torch

from network.unet import UNet
from tests.test_preprocess import blob_mask, write_ct_case
from training.checkpoint import FORMAT, label_scheme, save_checkpoint
from training.config import TrainConfig
from training.evaluate import evaluate_folders
from training.predict import predict_files
from utils.geometry import PreprocessParams
from utils.preprocess_data import preprocess_dataset
from utils.volume_io import save_volume

TINY = TrainConfig(features=(4, 8))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(folder) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file under `folder`."""
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
            for path in folder.rglob("*") if path.is_file()}


def test_preprocess_predict_and_evaluate_outputs_are_readable_by_others(umask_022, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_ct_case(images, masks, "case", blob_mask())
    params = PreprocessParams(target_size=(32, 32))
    preprocess_dataset("abdomenct1k", images, masks, tmp_path / "pre", params, progress=False)
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint({"format": FORMAT, "model": UNet(features=TINY.features).state_dict(),
                     "config": TINY.to_dict(), "preprocess": params.to_dict(), "labels": label_scheme(),
                     "epoch": 0}, checkpoint)
    predict_files(checkpoint, images, tmp_path / "pred", device="cpu", save_probabilities=True, progress=False)
    evaluate_folders(tmp_path / "pred", masks, "abdomenct1k", tmp_path / "eval", progress=False)

    written = {stage: modes(tmp_path / stage) for stage in ("pre", "pred", "eval")}
    assert {"manifest.json", "case/meta.json", "case/image.npy"} <= set(written["pre"])
    assert {"case.nii.gz", "case_probabilities.nii.gz", "labels.txt", "abdoseg_labels.ctbl"} <= set(written["pred"])
    assert {"metrics.csv", "summary.json"} <= set(written["eval"])
    for stage, files in written.items():
        assert files and all(mode == 0o644 for mode in files.values()), (stage, files)


@pytest.mark.parametrize("name", ["scan.NII.GZ", "scan.Nii", "scan.nii"])
def test_save_volume_leaves_exactly_the_named_file(umask_022, tmp_path, name):
    """nibabel picks the format from a file name; the temporary's name must not mislead it."""
    save_volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4), tmp_path / name)
    assert modes(tmp_path) == {name: 0o644}
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.lower().endswith(".gz")
