"""One test per class of bad input, through the real command line (``training.__main__.main``).

Every refusal must end with exit code 2 and one ``error: <file or key>: <problem>`` line (or one
``failed: ...`` line per bad case of a folder command, while the good cases complete), never a
traceback, and never leave a partial or temporary file behind.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from training.__main__ import main
from training.config import TrainConfig
from training.train import fit
from utils.phantom import write_phantom_dataset
from utils.geometry import PreprocessParams
from utils.preprocess_data import preprocess_dataset
from utils.volume_io import save_volume

REPO = Path(__file__).resolve().parents[1]
NUM_CASES = 6
TINY = TrainConfig(features=(4, 8), epochs=1, batch_size=4, steps_per_epoch=2, num_workers=0, amp="off",
                   channels_last=False, val_max_slices=4)
TINY_SETS = ["features=[4,8]", "epochs=1", "batch_size=4", "steps_per_epoch=2", "num_workers=0", "amp=off",
             "channels_last=false", "val_max_slices=4"]


# ----------------------------------------------------------------------------- fixtures and checks

@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Six tiny phantom cases in our ids: ``raw/Image/Case_07000_0000.nii.gz``, ``raw/Mask/Case_07000.nii.gz``."""
    root = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(root, NUM_CASES, "full", seed=7, size=64, num_slices=12, progress=False)
    return root


@pytest.fixture(scope="module")
def pre(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    preprocess_dataset("full", raw / "Image", raw / "Mask", out, PreprocessParams(target_size=(32, 32)),
                       progress=False)
    return out


@pytest.fixture(scope="module")
def run(pre, tmp_path_factory) -> Path:
    """A finished one-epoch tiny run; its checkpoints serve the prediction tests."""
    out = tmp_path_factory.mktemp("run")
    fit(TINY, pre, out, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(run) -> Path:
    return run / "checkpoints" / "last.pt"


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``python -m training ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def message_lines(err: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    lines = (line.split("\r")[-1].strip() for line in err.splitlines())
    return [line for line in lines if line and not re.search(r"\[\d\d:\d\d", line)]


def assert_refused(code: int, err: str, *words: str) -> str:
    """Exit 2 with exactly one ``error:`` line holding `words`, and no traceback."""
    assert "Traceback" not in err
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def failed_lines(code: int, err: str) -> list[str]:
    """The ``failed:`` lines of a folder command that exited 2 with no other message."""
    assert "Traceback" not in err
    lines = message_lines(err)
    assert code == 2 and lines and all(line.startswith("failed: ") for line in lines), err
    return lines


def assert_no_temporaries(folder: Path) -> None:
    if folder.exists():
        kept = (".abdoseg-output.json", ".abdoseg-run.lock")  # the output marker and a run folder's lock file
        leftovers = [p for p in folder.rglob("*") if (p.name.startswith(".") or ".tmp" in p.name) and p.name not in kept]
        assert not leftovers, leftovers


def copy_case(raw: Path, index: int, images: Path, masks: Path | None = None) -> str:
    """Copy phantom case `index` into `images` (and its mask into `masks`); returns its case id."""
    case = sorted(p.name for p in (raw / "Mask").iterdir())[index].removesuffix(".nii.gz")
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw / "Image" / f"{case}_0000.nii.gz", images)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / "Mask" / f"{case}.nii.gz", masks)
    return case


# ----------------------------------------------------------------------------- 1. input folders

@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_input_folder(state, raw, checkpoint, tmp_path, capsys):
    folder = tmp_path / "inputs"
    if state == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("no NIfTI here")
    word = "not found" if state == "missing" else "no .nii"

    code, _, err = cli(capsys, "preprocess", "--source", "full", "--images", folder, "--masks", raw / "Mask",
                       "--out", tmp_path / "pre")
    assert_refused(code, err, str(folder), word)
    code, _, err = cli(capsys, "predict", "--checkpoint", checkpoint, "--input", folder, "--out",
                       tmp_path / "pred", "--device", "cpu")
    assert_refused(code, err, str(folder), "no such file" if state == "missing" else "no .nii")
    code, _, err = cli(capsys, "evaluate", "--pred", folder, "--gt", raw / "Mask", "--source", "full",
                       "--out", tmp_path / "eval")
    assert_refused(code, err, str(folder))
    code, _, err = cli(capsys, "evaluate", "--pred", raw / "Mask", "--gt", folder, "--source", "full",
                       "--out", tmp_path / "eval")
    assert_refused(code, err, str(folder))
    for out in ("pre", "pred", "eval"):
        assert not (tmp_path / out).exists()


# ----------------------------------------------------------------------------- 2. unpaired files

def test_image_without_mask_and_mask_without_image(raw, tmp_path, capsys):
    images, masks = tmp_path / "Image", tmp_path / "Mask"
    good = copy_case(raw, 0, images, masks)
    lonely_image = copy_case(raw, 1, images)
    lonely_mask = copy_case(raw, 2, tmp_path / "unused", masks)

    code, out, err = cli(capsys, "preprocess", "--source", "full", "--images", images, "--masks", masks,
                         "--out", tmp_path / "pre", "--size", "32")

    lines = failed_lines(code, err)
    assert len(lines) == 2
    assert any(f"{lonely_image}_0000.nii.gz" in line and "no mask" in line for line in lines)
    assert any(f"{lonely_mask}.nii.gz" in line and "no image" in line for line in lines)
    assert "1 cases ready" in out
    manifest = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert [case["case_id"] for case in manifest["cases"]] == [good]
    assert_no_temporaries(tmp_path / "pre")


# ----------------------------------------------------------------------------- 3. bad NIfTI files

def write_bad_case(kind: str, image: Path, mask: Path, good_image: Path, good_mask: Path) -> str:
    """Write a bad image (and a mask) of `kind`; returns the file the error must name."""
    reference = nib.load(good_image)
    hu = np.asarray(reference.dataobj)
    affine = reference.affine
    shutil.copy(good_mask, mask)
    if kind == "truncated":
        data = good_image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    elif kind == "not_nifti":
        image.write_text("this is a text file, not a NIfTI image\n")
    elif kind == "2d":
        save_volume(hu[:, :, 0], affine, image)
    elif kind == "4d":
        save_volume(np.stack([hu, hu], axis=-1), affine, image)
    elif kind == "grid":
        save_volume(np.asarray(nib.load(good_mask).dataobj)[::2, ::2], affine, mask)
        shutil.copy(good_image, image)
        return str(mask)
    elif kind == "unknown_labels":
        labels = np.asarray(nib.load(good_mask).dataobj).copy()
        labels[:4, :4, :2] = 42
        save_volume(labels, affine, mask)
        shutil.copy(good_image, image)
        return str(mask)
    elif kind == "nan":
        float_hu = hu.astype(np.float32)
        float_hu[3, 3, 3] = np.nan
        float_hu[4, 4, 4] = np.inf
        save_volume(float_hu, affine, image)
    elif kind == "not_ct":
        save_volume(np.clip(hu / 8 + 128, 0, 255).astype(np.uint8), affine, image)
    return str(image)


BAD_FILES = {  # kind -> words the one-line reason must hold
    "truncated": "truncated", "not_nifti": "not a readable NIfTI", "2d": "2D", "4d": "2 volumes",
    "grid": "grid differs", "unknown_labels": "[42]", "nan": "NaN", "not_ct": "8-bit image",
}
IMAGE_PROBLEMS = ("truncated", "not_nifti", "2d", "4d", "nan", "not_ct")


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_preprocess_reports_a_bad_case_and_completes_the_others(kind, raw, tmp_path, capsys):
    images, masks = tmp_path / "Image", tmp_path / "Mask"
    good = copy_case(raw, 0, images, masks)
    named = write_bad_case(kind, images / "Bad_0000.nii.gz", masks / "Bad.nii.gz",
                           images / f"{good}_0000.nii.gz", masks / f"{good}.nii.gz")

    code, out, err = cli(capsys, "preprocess", "--source", "full", "--images", images, "--masks", masks,
                         "--out", tmp_path / "pre", "--size", "32")

    [line] = failed_lines(code, err)
    assert named in line and BAD_FILES[kind] in line, line
    assert "1 cases ready" in out and (tmp_path / "pre" / good / "meta.json").is_file()
    assert not (tmp_path / "pre" / "Bad").exists()
    assert_no_temporaries(tmp_path / "pre")


@pytest.mark.parametrize("kind", IMAGE_PROBLEMS)
def test_predict_reports_a_bad_file_and_completes_the_others(kind, raw, checkpoint, tmp_path, capsys):
    images = tmp_path / "in"
    good = copy_case(raw, 0, images)
    named = write_bad_case(kind, images / "Bad_0000.nii.gz", tmp_path / "unused.nii.gz",
                           images / f"{good}_0000.nii.gz", raw / "Mask" / f"{good}.nii.gz")

    code, out, err = cli(capsys, "predict", "--checkpoint", checkpoint, "--input", images, "--out",
                         tmp_path / "out", "--device", "cpu")

    [line] = failed_lines(code, err)
    assert named in line and BAD_FILES[kind] in line, line
    assert "wrote 1 label files" in out and (tmp_path / "out" / f"{good}.nii.gz").is_file()
    assert not (tmp_path / "out" / "Bad.nii.gz").exists()
    assert_no_temporaries(tmp_path / "out")


# ----------------------------------------------------------------------------- 4. label maps

@pytest.mark.parametrize("content, words", [
    ('{"labels": {"background": 0, "liver": 1,', ["not a valid label-map file"]),
    ('{"labels": {"background": 0, "liver": 1, "heart": 2}}', ["'heart'", "ignore"]),
    ('{"labels": {"background": 0, "liver": "one"}}', ["'liver'", "integers"]),
    ('["liver"]', ['"labels"']),
    ('{"labels": {"background": 0, "liver": 1, "spleen": 1}}', ["'liver' and 'spleen' both have id 1"]),
    ('{"labels": {"liver": 0, "spleen": 1}}', ["organ 'liver' has id 0"]),
    ('{"labels": {"background": 0, "liver": 70000}}', ["id 70000", "0..65535"]),
], ids=["malformed", "unknown_organ", "bad_id", "not_an_object", "duplicate_id", "organ_id_0", "id_too_large"])
def test_bad_label_map(content, words, raw, tmp_path, capsys):
    label_map = tmp_path / "bad.json"
    label_map.write_text(content)

    code, _, err = cli(capsys, "preprocess", "--source", "pku", "--label-map", label_map, "--images",
                       raw / "Image", "--masks", raw / "Mask", "--out", tmp_path / "pre")

    assert_refused(code, err, str(label_map), *words)
    assert not (tmp_path / "pre").exists()



@pytest.mark.parametrize("source, label_map, words", [
    ("pku", None, ["'pku' source needs its label-map JSON", "--label-map", "pku_label_map.json"]),
    ("full", "examples/pku_label_map.json", ["'full' source has fixed ids", "pku_label_map.json"]),
    ("abdomenct1k", "examples/pku_label_map.json", ["'abdomenct1k' source has fixed ids"]),
], ids=["pku_without_map", "map_for_full", "map_for_abdomenct1k"])
def test_label_map_missing_or_not_used(source, label_map, words, raw, tmp_path, capsys):
    extra = ["--label-map", REPO / label_map] if label_map else []
    code, _, err = cli(capsys, "preprocess", "--source", source, *extra, "--images", raw / "Image", "--masks",
                       raw / "Mask", "--out", tmp_path / "pre")
    assert_refused(code, err, *words)
    assert not (tmp_path / "pre").exists()
    code, _, err = cli(capsys, "evaluate", "--pred", raw / "Mask", "--gt", raw / "Mask", "--source", source,
                       *extra, "--out", tmp_path / "eval")
    assert_refused(code, err, *words)

# ----------------------------------------------------------------------------- 5. unwritable output

@pytest.mark.parametrize("command", ["preprocess", "train", "predict", "evaluate"])
def test_unwritable_output_folder(command, raw, pre, checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("a regular file, so nothing can be created under it")
    out = tmp_path / "a_file" / "out"
    args = {
        "preprocess": ["--source", "full", "--images", raw / "Image", "--masks", raw / "Mask", "--size", "32"],
        "train": ["--data", pre, "--set", *TINY_SETS],
        "predict": ["--checkpoint", checkpoint, "--input", raw / "Image" / sorted(os.listdir(raw / "Image"))[0],
                    "--device", "cpu"],
        "evaluate": ["--pred", raw / "Mask", "--gt", raw / "Mask", "--source", "full"],
    }[command]

    code, _, err = cli(capsys, command, *args, "--out", out)

    assert_refused(code, err, str(out), "ot a directory")
    assert (tmp_path / "a_file").read_text().startswith("a regular file")


# ----------------------------------------------------------------------------- 6. a second run

def test_second_run_in_the_same_folder_is_refused(pre, run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    code, _, err = cli(capsys, "train", "--data", pre, "--out", run, "--set", *TINY_SETS)

    assert_refused(code, err, str(run), "already holds a run", "--resume", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_second_run_is_allowed_with_resume_or_overwrite(pre, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, out, err = cli(capsys, "train", "--data", pre, "--out", copy, "--resume")  # already finished
    assert code == 0 and "done:" in out, err
    (copy / "log.csv").write_text("stale\n")
    code, out, err = cli(capsys, "train", "--data", pre, "--out", copy, "--overwrite", "--set", *TINY_SETS)
    assert code == 0 and "done:" in out, err
    assert (copy / "log.csv").read_text().startswith("epoch,")
    assert_no_temporaries(copy)


# ----------------------------------------------------------------------------- 7. configuration

@pytest.mark.parametrize("option, words", [
    (["--set", "epochs=1", "colour=red"], ["unknown key 'colour'"]),
    (["--set", "epochs=three"], ["'epochs'", "integer", "'three'"]),
    (["--set", "features=[4,x]"], ["'features'", "list of integers"]),
    (["--set", "loss=hinge"], ["'loss'", "weighted_ce"]),
    (["--set", "epochs"], ["'epochs'", "key=value"]),
    (["--config", "CONFIG"], ["not valid JSON"]),
    (["--config", "MISSING"], ["not found"]),
], ids=["unknown_key", "wrong_type", "wrong_item_type", "bad_choice", "no_value", "bad_json", "missing_file"])
def test_bad_config(option, words, pre, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"epochs": 1,}')
    option = [{"CONFIG": config, "MISSING": tmp_path / "missing.json"}.get(o, o) for o in option]

    code, _, err = cli(capsys, "train", "--data", pre, "--out", tmp_path / "run", *option)

    line = assert_refused(code, err, *words)
    if option[0] == "--config":
        assert str(option[1]) in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 8. checkpoints

class Planted:
    """Unpickling this would create a file: what a malicious checkpoint does to its victim."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


class PlantedShell(Planted):
    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def write_checkpoint(kind: str, path: Path, good: Path, sentinel: Path) -> str:
    """A bad checkpoint of `kind`; returns the words the error must hold."""
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "truncated"
    if kind == "empty":
        path.write_bytes(b"")
        return "empty"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
        return "not a PyTorch checkpoint"
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        return "not an abdoseg checkpoint"
    if kind == "wrong_weights":
        state = torch.load(good, weights_only=True)
        state["config"]["features"] = [8, 16]
        torch.save(state, path)
        return "do not fit"
    if kind == "evil_open":
        torch.save({"format": 1, "model": Planted(sentinel)}, path)
    elif kind == "evil_shell":
        torch.save({"format": 1, "model": PlantedShell(sentinel)}, path)
    elif kind == "evil_pickle":  # a bare pickle, not torch.save's zip
        path.write_bytes(pickle.dumps({"format": 1, "model": PlantedShell(sentinel)}))
    return "refused"


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "foreign", "wrong_weights", "evil_open",
                                  "evil_shell", "evil_pickle"])
def test_predict_refuses_a_bad_checkpoint(kind, raw, checkpoint, tmp_path, capsys):
    bad, sentinel = tmp_path / f"{kind}.pt", tmp_path / "SENTINEL"
    words = write_checkpoint(kind, bad, checkpoint, sentinel)

    code, _, err = cli(capsys, "predict", "--checkpoint", bad, "--input", raw / "Image", "--out",
                       tmp_path / "out", "--device", "cpu")

    assert_refused(code, err, str(bad), words)
    assert not sentinel.exists(), "loading the checkpoint ran code"
    assert not (tmp_path / "out").exists()


def test_resume_from_a_truncated_checkpoint_names_the_good_one(pre, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])

    code, _, err = cli(capsys, "train", "--data", pre, "--out", copy, "--resume")

    assert_refused(code, err, str(last), "truncated", str(copy / "checkpoints" / "best.pt"))
    (copy / "checkpoints" / "best.pt").unlink()
    code, _, err = cli(capsys, "train", "--data", pre, "--out", copy, "--resume")
    line = assert_refused(code, err, str(last), "truncated")
    assert "best.pt" not in line


# ----------------------------------------------------------------------------- 9. manifest safety

@pytest.mark.parametrize("folder", ["../outside", "/etc", "nested/../../outside"])
def test_manifest_pointing_outside_its_folder_is_refused(folder, pre, tmp_path, capsys):
    data = tmp_path / "pre"
    shutil.copytree(pre, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["cases"][0]["folder"] = folder
    (data / "manifest.json").write_text(json.dumps(manifest))

    code, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--set", *TINY_SETS)

    assert_refused(code, err, str(data / "manifest.json"), repr(folder), "not a plain name")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 10. --debug

@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    """A real process: without --debug one line and exit 2; with it the traceback (exit 1)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["preprocess", "--source", "full", "--images", str(tmp_path / "missing"), "--masks",
            str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    plain = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert_refused(plain.returncode, plain.stderr, str(tmp_path / "missing"), "not found")
    debug = subprocess.run([sys.executable, "-m", "training", "--debug", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "PreprocessError" in debug.stderr and "images folder not found" in debug.stderr


# ----------------------------------------------------------------------------- 11. real awkward files

VALID_ROBUSTNESS = {  # files the loader reads; the rest must be refused with the reason
    "ct_sm_4d_singleton", "ct_sm_LPS", "ct_sm_bigendian", "ct_sm_int16_slope0.5", "ct_sm_no_xform_codes",
    "ct_sm_oblique10deg", "ct_sm_qform_only", "ct_sm_uint16_inter-1024", "ct_sm_uncompressed",
}
REFUSED_ROBUSTNESS = {  # file -> words of its reason
    "seg_sm_LPS.nii.gz": "8-bit", "seg_sm_float32.nii.gz": "8-bit", "seg_sm_int16.nii.gz": "8-bit",
    "seg_sm_oblique10deg.nii.gz": "8-bit", "anatomical.nii": "no air", "reoriented_anat_moved.nii": "no air",
    "example4d.nii.gz": "2 volumes", "example_nifti2.nii.gz": "2 volumes", "functional.nii": "20 volumes",
    "resampled_anat_moved.nii": "NaN", "standard.nii.gz": "8-bit", "CT_AVM.nii.gz": "no air",
    "CT_pitch.nii.gz": "8-bit",
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(oblique|no orientation in the header).*:UserWarning")
def test_every_robustness_file_is_predicted_or_refused_by_name(shared_data, checkpoint, tmp_path, capsys):
    robustness = shared_data / "robustness"
    written, refused = set(), {}
    for folder in sorted(p for p in robustness.iterdir() if p.is_dir()):
        code, _, err = cli(capsys, "predict", "--checkpoint", checkpoint, "--input", folder, "--out",
                           tmp_path / folder.name, "--device", "cpu")
        for line in failed_lines(code, err):
            name = line.removeprefix(f"failed: {folder}/").split(":", 1)[0]
            refused[name] = line
        written |= {p.name.removesuffix(".nii.gz") for p in (tmp_path / folder.name).glob("*.nii.gz")}
        assert_no_temporaries(tmp_path / folder.name)
    assert written == VALID_ROBUSTNESS
    assert set(refused) == set(REFUSED_ROBUSTNESS)
    for name, words in REFUSED_ROBUSTNESS.items():
        assert words in refused[name], refused[name]
    for name in VALID_ROBUSTNESS:  # the input's own grid
        source = next(robustness.rglob(f"{name}.nii*"))
        assert nib.load(tmp_path / "derived" / f"{name}.nii.gz").shape == nib.load(source).shape[:3]


# ----------------------------------------------------------------------------- 12. SIGKILL in preprocessing

SLOW_PREPROCESS = """
import sys, time
import numpy
save = numpy.save
def slow_save(*args, **kwargs):  # each case takes ~0.6 s, so the kill lands inside one
    time.sleep(0.2)
    return save(*args, **kwargs)
numpy.save = slow_save
from training.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_preprocessing_loses_no_finished_case(raw, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pre"
    args = ["preprocess", "--source", "full", "--images", str(raw / "Image"), "--masks", str(raw / "Mask"),
            "--out", str(out), "--size", "32", "--workers", "1"]
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPROCESS, *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not list(out.glob("[!.]*/meta.json")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "preprocessing ended before it could be killed"
    finished = {p.parent.name for p in out.glob("[!.]*/meta.json")}
    assert 1 <= len(finished) < NUM_CASES
    assert not (out / "manifest.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for case in finished for p in (out / case).iterdir()}
    assert len(mtimes) == 4 * len(finished)

    again = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)

    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished cases were skipped
    manifest = json.loads((out / "manifest.json").read_text())
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (raw / "Mask").iterdir())
    assert sorted(case["case_id"] for case in manifest["cases"]) == ids and manifest["failed"] == []
    assert_no_temporaries(out)
