"""Issue 12, class 1: every command writes only into an output folder abdoseg owns.

Each test is one mistake a user made in the trial: the command must refuse it with one line and
exit 2 (or stay safe), and the user's files must be byte for byte as they were.
"""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from network.unet import UNet
from training.__main__ import main
from training.checkpoint import FORMAT, label_scheme, save_checkpoint
from training.config import TrainConfig
from utils.geometry import PreprocessParams
from utils.phantom import write_phantom_dataset
from utils.preprocess_data import preprocess_dataset

TINY = TrainConfig(features=(4, 8), amp="off", channels_last=False, num_workers=0)


def digest(folder) -> dict:
    """{relative path: sha256} of every file under `folder` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 'user's dataset': two tiny phantom cases in Image/ and Mask/, without abdoseg's marker."""
    root = tmp_path_factory.mktemp("user")
    write_phantom_dataset(root / "made", 2, "abdomenct1k", seed=6, size=32, num_slices=6, progress=False)
    for sub in ("Image", "Mask"):
        (root / "data" / sub).mkdir(parents=True)
        for path in (root / "made" / sub).iterdir():
            (root / "data" / sub / path.name).write_bytes(path.read_bytes())
    return root / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint({"format": FORMAT, "model": UNet(features=TINY.features).state_dict(), "config": TINY.to_dict(),
                     "preprocess": PreprocessParams(target_size=(32, 32)).to_dict(), "labels": label_scheme(),
                     "epoch": 0}, path)
    return path


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_predict_into_the_ground_truth_folder_is_refused(dataset, checkpoint, capsys):
    before = digest(dataset)
    code, err = run(["predict", "--checkpoint", str(checkpoint), "--input", str(dataset / "Image"),
                     "--out", str(dataset / "Mask")], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not empty and abdoseg did not make it" in err
    assert digest(dataset) == before


@pytest.mark.parametrize("out", ["Image", "Image/predictions", "."])
def test_an_output_equal_to_inside_or_around_an_input_is_refused(dataset, checkpoint, capsys, out):
    before = digest(dataset)
    code, err = run(["predict", "--checkpoint", str(checkpoint), "--input", str(dataset / "Image"),
                     "--out", str(dataset / out)], capsys)
    assert code == 2 and "input folder" in err and err.count("\n") == 1
    assert digest(dataset) == before and not (dataset / "Image" / "predictions").exists()


def test_phantom_over_an_existing_dataset_is_refused(dataset, capsys):
    (dataset / "Mask" / "Case_06001.nii.gz").rename(dataset / "Case_06001.moved")  # a CT whose mask is missing
    try:
        before = digest(dataset)
        code, err = run(["phantom", "--out", str(dataset), "--cases", "2", "--seed", "6", "--size", "32",
                         "--slices", "6"], capsys)
        assert code == 2 and "is not empty and abdoseg did not make it" in err
        assert digest(dataset) == before
    finally:
        (dataset / "Case_06001.moved").rename(dataset / "Mask" / "Case_06001.nii.gz")


def test_phantom_with_another_layout_is_refused_not_a_silent_success(tmp_path, capsys):
    args = ["phantom", "--out", str(tmp_path / "ph"), "--cases", "1", "--size", "32", "--slices", "6"]
    assert main(args + ["--layout", "full"]) == 0
    full = np.asarray(nib.load(tmp_path / "ph" / "Mask" / "Case_00000.nii.gz").dataobj)
    capsys.readouterr()
    code, err = run(args + ["--layout", "pku"], capsys)
    assert code == 2 and "holds phantoms made with" in err and "--overwrite" in err
    assert main(args + ["--layout", "pku", "--overwrite"]) == 0
    pku = np.asarray(nib.load(tmp_path / "ph" / "Mask" / "Case_00000.nii.gz").dataobj)
    assert not np.array_equal(full, pku)  # really rewritten in the other layout
    assert json.loads((tmp_path / "ph" / "phantom.json").read_text())["layout"] == "pku"


def test_preprocess_never_deletes_a_users_folder_named_like_a_case(dataset, tmp_path, capsys):
    out = tmp_path / "pre"
    (out / "Case_06000").mkdir(parents=True)
    (out / "Case_06000" / "notes.txt").write_text("mine")
    (out / ".tmp-mine").mkdir()
    code, err = run(["preprocess", "--source", "abdomenct1k", "--images", str(dataset / "Image"),
                     "--masks", str(dataset / "Mask"), "--out", str(out), "--size", "16"], capsys)
    assert code == 2 and "not empty" in err
    assert (out / "Case_06000" / "notes.txt").read_text() == "mine" and (out / ".tmp-mine").is_dir()


def test_preprocess_into_its_own_folder_skips_a_users_folder_that_appeared_there(dataset, tmp_path):
    out = tmp_path / "pre"
    params = PreprocessParams(target_size=(16, 16))
    first = preprocess_dataset("abdomenct1k", dataset / "Image", dataset / "Mask", out, params, progress=False)
    assert len(first["cases"]) == 2
    (out / "Case_06000" / "mine.txt").write_text("added by the user")
    with pytest.raises(ValueError, match="abdoseg did not write this"):  # --overwrite would delete it: refused
        preprocess_dataset("abdomenct1k", dataset / "Image", dataset / "Mask", out, params, progress=False,
                           overwrite=True)
    assert (out / "Case_06000" / "mine.txt").read_text() == "added by the user"
    assert (out / "Case_06000" / "image.npy").is_file()


def test_overwrite_replaces_only_what_abdoseg_wrote(dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(dataset / "Image"), "--out", str(out)]
    assert main(args) == 0
    written = digest(out)
    code, err = run(args, capsys)  # a rerun without --overwrite replaces nothing
    assert code == 2 and "pass --overwrite" in err and digest(out) == written
    # a file abdoseg never wrote, under a name it would write with --probabilities
    (out / "Case_06001_probabilities.nii.gz").write_bytes(b"the user's own file")
    code, err = run(args + ["--overwrite", "--probabilities"], capsys)
    assert code == 2 and "Case_06001_probabilities.nii.gz" in err and "abdoseg never overwrites it" in err
    assert (out / "Case_06001_probabilities.nii.gz").read_bytes() == b"the user's own file"
    assert (out / "Case_06000_probabilities.nii.gz").is_file()  # the other case completed
    assert nib.load(out / "Case_06000.nii.gz").shape == (32, 32, 6)  # its own file was replaced


def test_evaluate_into_the_prediction_folder_is_refused(dataset, tmp_path, capsys):
    before = digest(dataset)
    code, err = run(["evaluate", "--pred", str(dataset / "Mask"), "--gt", str(dataset / "Mask"),
                     "--source", "abdomenct1k", "--out", str(dataset / "Mask" / "eval")], capsys)
    assert code == 2 and "input folder" in err
    assert digest(dataset) == before


def test_train_into_a_users_folder_is_refused(tiny_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("mine")
    code, err = run(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--overwrite",
                     "--set", "features=[4,8]", "epochs=1"], capsys)
    last = err.strip().splitlines()[-1]  # (after training's one-line note on the CPU precision it measured)
    assert code == 2 and err.count("error:") == 1 and last.startswith("error:") and "not empty" in last
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["thesis.tex"]


def test_files_get_the_users_umask_mode(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        write_phantom_dataset(tmp_path / "ph", 1, "full", size=16, num_slices=4, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "ph" / "Mask" / "Case_00000.nii.gz").stat().st_mode & 0o777 == 0o644
