"""NIfTI names, case ids and the one pairing rule (``utils/case_files.py``)."""

import pytest

from utils.case_files import (case_id_from_path, is_nifti, match_cases, nifti_files, pair_cases,
                              strip_nifti_suffix)
from utils.errors import UserError


@pytest.mark.parametrize("name, expected", [
    ("a.nii", True), ("a.nii.gz", True), ("A.NII.GZ", True), ("dir/b_0000.Nii", True),
    ("a.nii.gz.bak", False), ("a.gz", False), ("a.niigz", False), ("nii", False), ("a.txt", False),
])
def test_is_nifti_is_the_name_only(name, expected):
    assert is_nifti(name) is expected


def test_case_ids_of_images_and_of_label_maps():
    assert strip_nifti_suffix("x/Case_7.NII.GZ") == "Case_7"
    assert case_id_from_path("Case_7_0000.nii") == "Case_7"
    # a label map keeps a case id that itself ends in _0000; its image drops only the channel
    assert strip_nifti_suffix("liver_0000.nii.gz") == case_id_from_path("liver_0000_0000.nii.gz") == "liver_0000"


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_listing_skips_hidden_files_folders_and_other_names(tmp_path):
    folder = touch(tmp_path / "in", "b.nii", "a_0000.nii.gz", ".abdoseg-tmp-1-x-c.nii.gz", "notes.txt")
    (folder / "d.nii.gz").mkdir()
    assert [p.name for p in nifti_files(folder, "images")] == ["a_0000.nii.gz", "b.nii"]
    with pytest.raises(UserError, match="masks folder not found"):
        nifti_files(tmp_path / "missing", "masks")
    with pytest.raises(UserError, match=r"no masks in this folder \(no .nii"):
        nifti_files(touch(tmp_path / "empty", "x.txt"), "masks")
    with pytest.raises(UserError, match="no masks folder given"):
        nifti_files(None, "masks")


def test_matching_by_case_id_reports_every_unmatched_and_duplicate_file(tmp_path):
    images = touch(tmp_path / "images", "A_0000.nii.gz", "B_0000.nii.gz", "B.nii", "C_0000.nii.gz",
                   "liver_0000_0000.nii.gz")
    masks = touch(tmp_path / "masks", "A.nii.gz", "B.nii.gz", "D.nii.gz", "liver_0000.nii.gz")
    match = match_cases(images, masks)
    assert [(case, image.name, mask.name) for case, image, mask in match.pairs] == [
        ("A", "A_0000.nii.gz", "A.nii.gz"), ("B", "B.nii", "B.nii.gz"),
        ("liver_0000", "liver_0000_0000.nii.gz", "liver_0000.nii.gz")]
    assert list(match.images_only) == ["C"] and list(match.labels_only) == ["D"]
    assert [(case, kept.name, second.name) for case, kept, second in match.duplicates] == [
        ("B", "B.nii", "B_0000.nii.gz")]

    pairs, problems = pair_cases(images, masks)
    assert pairs == match.pairs
    assert len(problems) == 3
    assert "a second file for case B" in problems[0] and problems[0].startswith(str(images / "B_0000.nii.gz"))
    assert problems[1].startswith(str(images / "C_0000.nii.gz")) and "no mask named C.nii.gz" in problems[1]
    assert problems[2].startswith(str(masks / "D.nii.gz")) and "no image named D_0000.nii.gz" in problems[2]


def test_the_error_class_is_the_callers(tmp_path):
    class FolderError(UserError):
        pass

    with pytest.raises(FolderError, match="images folder not found"):
        pair_cases(tmp_path / "nope", tmp_path / "nope", error=FolderError)
