"""Tests for utils/output_folder.py: abdoseg writes only into folders it owns, never over a user's file."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import UserError
from utils.output_folder import MARKER_NAME, RECORDS_NAME, OutputFolder, claim_output_folder

REPO = Path(__file__).resolve().parents[1]


def marker(folder: Path) -> dict:
    return json.loads((folder / MARKER_NAME).read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- claiming a folder

def test_new_folder_is_created_with_a_marker(tmp_path):
    out = claim_output_folder(tmp_path / "a" / "b", "predict")
    assert out.path == (tmp_path / "a" / "b").resolve() and out.command == "predict"
    assert marker(out.path) == {"abdoseg_output": 1, "command": "predict", "files": []}
    assert os.stat(out.path / MARKER_NAME).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_empty_folder_is_accepted(tmp_path):
    (tmp_path / "out").mkdir()
    out = claim_output_folder(tmp_path / "out", "evaluate")
    assert marker(out.path)["command"] == "evaluate"


@pytest.mark.parametrize("entry", ["notes.txt", ".DS_Store", "Case_00001"])
def test_users_non_empty_folder_is_refused(tmp_path, entry):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / entry).mkdir() if entry.startswith("Case") else (folder / entry).write_text("mine")
    before = snapshot(folder)
    with pytest.raises(UserError, match=f"out: is not empty and abdoseg did not make it .*'{entry}'") as err:
        claim_output_folder(folder, "predict")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert snapshot(folder) == before and not (folder / MARKER_NAME).exists()


def test_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(UserError, match="out: is a file, not a folder"):
        claim_output_folder(tmp_path / "out", "predict")
    assert (tmp_path / "out").read_text() == "mine"


def test_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="a_file/out: cannot create the output folder: Not a directory"):
        claim_output_folder(tmp_path / "a_file" / "out", "predict")


def test_other_commands_folder_is_refused(tmp_path):
    claim_output_folder(tmp_path / "out", "preprocess").write_text("manifest.json", "{}")
    with pytest.raises(UserError, match="holds the output of 'abdoseg preprocess'; choose a new or empty folder "
                                        "for 'predict'"):
        claim_output_folder(tmp_path / "out", "predict", overwrite=True)


def test_same_commands_folder_is_accepted_again(tmp_path):
    first = claim_output_folder(tmp_path / "out", "predict")
    first.write_text("Case_1.nii.gz", "one")
    first.close()
    again = claim_output_folder(tmp_path / "out", "predict")
    assert again.recorded() == {"Case_1.nii.gz"}
    again.write_text("Case_2.nii.gz", "two")  # a new case needs no --overwrite


@pytest.mark.parametrize("content", ["{broken", '{"command": 3, "files": []}', '["predict"]'])
def test_damaged_marker_is_refused(tmp_path, content):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / MARKER_NAME).write_text(content)
    with pytest.raises(UserError, match=r"\.abdoseg-output\.json: not a valid|\.abdoseg-output\.json: is not a valid"):
        claim_output_folder(folder, "predict")


# ----------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("relation, out", [("is", "data/Mask"), ("lies inside", "data/Mask/pred"),
                                           ("contains", "data")])
def test_output_overlapping_an_input_folder_is_refused(tmp_path, relation, out):
    (tmp_path / "data" / "Mask").mkdir(parents=True)
    (tmp_path / "data" / "Mask" / "Case_1.nii.gz").write_text("ground truth")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"{out}: {relation} the input folder .*Mask"):
        claim_output_folder(tmp_path / out, "predict", inputs=[tmp_path / "other", tmp_path / "data" / "Mask"])
    assert snapshot(tmp_path) == before and not (tmp_path / "data" / "Mask" / "pred").exists()


def test_overlap_is_found_through_symlinks(tmp_path):
    (tmp_path / "data" / "Mask").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(UserError, match="is the input folder"):
        claim_output_folder(tmp_path / "link" / "Mask", "predict", inputs=[tmp_path / "data" / "Mask"])
    with pytest.raises(UserError, match="lies inside the input folder"):
        claim_output_folder(tmp_path / "link" / "Mask" / "x", "predict", inputs=[tmp_path / "data"])
    with pytest.raises(UserError, match="contains the input folder"):
        claim_output_folder(tmp_path / "data", "predict", inputs=[tmp_path / "link" / "Mask"])


def test_output_containing_an_input_file_is_refused_but_a_sibling_is_fine(tmp_path):
    scan = tmp_path / "scans" / "ct.nii.gz"
    scan.parent.mkdir()
    scan.write_text("ct")
    with pytest.raises(UserError, match="scans: contains the input file .*ct.nii.gz"):
        claim_output_folder(tmp_path / "scans", "predict", inputs=[scan])
    claim_output_folder(tmp_path / "scans" / "pred", "predict", inputs=[scan])  # next to the input: allowed
    claim_output_folder(tmp_path / "elsewhere", "predict", inputs=[scan, tmp_path / "missing"])


# ----------------------------------------------------------------------------- writing

def test_writes_are_recorded_in_the_marker(tmp_path):
    out = claim_output_folder(tmp_path / "out", "train")
    out.write_bytes("checkpoints/last.pt", b"weights")
    out.write_json("summary.json", {"dice": float("nan")})
    with out.atomic_path("curves.png") as temporary:
        temporary.write_bytes(b"png")
    out.close()
    assert marker(out.path)["files"] == ["checkpoints/", "checkpoints/last.pt", "curves.png", "summary.json"]
    assert json.loads((out.path / "summary.json").read_text()) == {"dice": None}
    assert not (out.path / RECORDS_NAME).exists()  # merged into the marker


def test_a_users_file_with_a_cases_name_is_never_overwritten(tmp_path):
    out = claim_output_folder(tmp_path / "out", "predict", overwrite=True)
    (out.path / "Case_1.nii.gz").write_text("the user's own file")
    (out.path / "Case_2").mkdir()
    (out.path / "Case_2" / "notes.txt").write_text("the user's folder")
    for write in (lambda: out.write_text("Case_1.nii.gz", "prediction"),
                  lambda: out.write_text("Case_1.nii.gz", "prediction", replace=True),
                  lambda: out.write_text("Case_2/labels.txt", "labels"),
                  lambda: out.atomic_folder("Case_2").__enter__(),
                  lambda: out.remove("Case_1.nii.gz"),
                  lambda: out.remove("Case_2")):
        with pytest.raises(UserError, match="abdoseg did not (write|make)"):
            write()
    assert (out.path / "Case_1.nii.gz").read_text() == "the user's own file"
    assert (out.path / "Case_2" / "notes.txt").read_text() == "the user's folder"
    assert out.recorded() == set()


def test_overwrite_replaces_only_recorded_files(tmp_path):
    first = claim_output_folder(tmp_path / "out", "predict")
    first.write_text("Case_1.nii.gz", "old prediction")
    first.write_text("Case_1.nii.gz", "same run may rewrite")  # written by this object: allowed
    first.close()
    (first.path / "user.txt").write_text("mine")

    again = claim_output_folder(tmp_path / "out", "predict")
    with pytest.raises(UserError, match="Case_1.nii.gz: already written by an earlier 'predict' run; pass "
                                        "--overwrite"):
        again.write_text("Case_1.nii.gz", "new prediction")
    again.write_text("log.csv", "a", replace=False)
    again.write_text("log.csv", "a\nb", replace=True)

    forced = claim_output_folder(tmp_path / "out", "predict", overwrite=True)
    forced.write_text("Case_1.nii.gz", "new prediction")
    with pytest.raises(UserError, match="user.txt: a file abdoseg did not write is in the way"):
        forced.write_text("user.txt", "x")
    assert (first.path / "Case_1.nii.gz").read_text() == "new prediction"
    assert (first.path / "user.txt").read_text() == "mine"


def test_atomic_folder_replaces_only_a_folder_abdoseg_wrote_whole(tmp_path):
    out = claim_output_folder(tmp_path / "out", "preprocess", overwrite=True)
    with out.atomic_folder("Case_1") as temporary:
        (temporary / "image.npy").write_bytes(b"1")
        (temporary / "meta.json").write_text("{}")
    assert out.recorded() >= {"Case_1/", "Case_1/image.npy", "Case_1/meta.json"}
    with out.atomic_folder("Case_1") as temporary:  # recorded, overwrite: replaced whole
        (temporary / "image.npy").write_bytes(b"2")
    assert sorted(p.name for p in (out.path / "Case_1").iterdir()) == ["image.npy"]
    assert sorted(p.name for p in out.path.iterdir()) == [MARKER_NAME, RECORDS_NAME, "Case_1"]
    (out.path / "Case_1" / "user_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="user_notes.txt: abdoseg did not write this"):
        with out.atomic_folder("Case_1") as temporary:
            (temporary / "image.npy").write_bytes(b"3")
    assert (out.path / "Case_1" / "image.npy").read_bytes() == b"2"
    assert (out.path / "Case_1" / "user_notes.txt").read_text() == "mine"


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    out = claim_output_folder(tmp_path / "out", "predict")
    with pytest.raises(RuntimeError), out.atomic_path("Case_1.nii.gz") as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    with pytest.raises(RuntimeError), out.atomic_folder("Case_2") as temporary:
        (temporary / "image.npy").write_bytes(b"half")
        raise RuntimeError("crash while writing")
    visible = sorted(p.name for p in out.path.iterdir() if p.name not in (MARKER_NAME, RECORDS_NAME))
    assert visible == []


def test_remove_deletes_recorded_entries_only(tmp_path):
    out = claim_output_folder(tmp_path / "out", "preprocess")
    out.write_text("a.txt", "a")
    with out.atomic_folder("Case_1") as temporary:
        (temporary / "x.npy").write_bytes(b"x")
    out.remove("a.txt")
    out.remove("Case_1")
    out.remove("never_written.txt")  # nothing there: nothing to do
    assert sorted(p.name for p in out.path.iterdir()) == [MARKER_NAME, RECORDS_NAME]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../escape.txt", "a/../../b", MARKER_NAME,
                                 f"{RECORDS_NAME}/x.json", ".abdoseg-tmp-1-x"])
def test_paths_outside_the_folder_are_a_bug(tmp_path, bad):
    out = claim_output_folder(tmp_path / "out", "predict")
    with pytest.raises(ValueError, match="is not a path abdoseg may write"):
        out.write_text(bad, "x")


# ----------------------------------------------------------------------------- processes and crashes

def _write_case(args) -> str:
    out, index = args
    out.write_text(f"Case_{index}/labels.txt", str(index))
    return f"Case_{index}/labels.txt"


def test_worker_processes_write_into_one_folder(tmp_path):
    out = claim_output_folder(tmp_path / "out", "predict")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        written = pool.map(_write_case, [(out, index) for index in range(6)])
    out.close()
    files = marker(out.path)["files"]
    assert set(written) <= set(files) and {f"Case_{i}/" for i in range(6)} <= set(files)
    assert (out.path / "Case_5" / "labels.txt").read_text() == "5"


def test_records_of_a_crashed_run_are_merged_by_the_next_claim(tmp_path):
    out = claim_output_folder(tmp_path / "out", "predict")
    out.write_text("Case_1.nii.gz", "one")  # no close(): the process died here
    assert marker(out.path)["files"] == []
    again = claim_output_folder(tmp_path / "out", "predict", overwrite=True)
    assert marker(again.path)["files"] == ["Case_1.nii.gz"]
    again.write_text("Case_1.nii.gz", "replaced")


def test_marker_survives_a_crash_mid_write(tmp_path, monkeypatch):
    out = claim_output_folder(tmp_path / "out", "predict")
    out.write_text("Case_1.nii.gz", "one")
    out.close()
    out.write_text("Case_2.nii.gz", "two")
    import utils.files

    def crash(*args):
        raise KeyboardInterrupt("killed while replacing the marker")
    monkeypatch.setattr(utils.files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        out.close()
    monkeypatch.undo()
    assert marker(out.path)["files"] == ["Case_1.nii.gz"]  # the old marker, whole
    again = claim_output_folder(tmp_path / "out", "predict")
    assert marker(again.path)["files"] == ["Case_1.nii.gz", "Case_2.nii.gz"]


def test_marker_survives_a_killed_process(tmp_path):
    """A process killed while rewriting the marker in a loop leaves it readable."""
    out = claim_output_folder(tmp_path / "out", "predict")
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from utils.output_folder import claim_output_folder\n"
              f"out = claim_output_folder({str(out.path)!r}, 'predict', overwrite=True)\n"
              "for i in range(100000):\n"
              "    out.write_text(f'Case_{i}.txt', 'x')\n"
              "    out.close()\n"
              "    print(i, flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(30):  # let it write a few times, then kill it in the middle of its loop
        process.stdout.readline()
    process.kill()
    process.wait()
    again = claim_output_folder(out.path, "predict")
    assert len(marker(again.path)["files"]) >= 30


def test_output_folder_is_picklable_for_workers(tmp_path):
    import pickle
    out = claim_output_folder(tmp_path / "out", "predict")
    copy = pickle.loads(pickle.dumps(out))
    assert isinstance(copy, OutputFolder) and copy.path == out.path and copy.command == "predict"
