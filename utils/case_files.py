"""NIfTI file names, case ids, and which image goes with which label map: one rule for the repo.

* A NIfTI file is a name ending in ``.nii`` or ``.nii.gz``, in any letter case (:func:`is_nifti`).
  Folder listings take the visible regular files among them; names starting with ``.`` are
  skipped (abdoseg's own temporaries start so).
* Case ids follow nnU-Net naming. An image is ``CASE_0000.nii.gz`` (``_0000``: the channel), or
  plainly ``CASE.nii.gz``: :func:`case_id_from_path` drops the suffix and the channel. A label
  map (mask, ground truth) is ``CASE.nii.gz``: :func:`strip_nifti_suffix` drops only the suffix,
  since label files carry no channel and a case id may itself end in ``_0000``.
* An image may also be a DICOM CT series: a subfolder of the image folder holding DICOM files
  (its case id is the subfolder's name), listed by :func:`image_inputs`.
* Pairing (:func:`match_cases`): an image-side file (a CT, or a prediction named after its CT)
  and a label map with the same case id belong together; a second file for one case id on one
  side is reported, never guessed between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"  # nnU-Net's channel suffix of a single-channel (CT) image


def is_nifti(path) -> bool:
    """Whether ``path``'s name ends in ``.nii`` or ``.nii.gz`` (any case); the name only, no disk access."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(path) -> str:
    """``'Case_00012.nii.gz' -> 'Case_00012'``: the file name without ``.nii(.gz)``."""
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE)


def case_id_from_path(path) -> str:
    """``'Case_00012_0000.nii.gz' -> 'Case_00012'``: drop ``.nii(.gz)`` and a ``_0000`` channel suffix."""
    return re.sub(f"{CHANNEL_SUFFIX}$", "", strip_nifti_suffix(path))


def nifti_files(folder, what: str, error: type[UserError] = UserError) -> list[Path]:
    """The visible NIfTI files directly in ``folder``, sorted by name.

    Args:
        what: what the files are, plural, for messages (``"images"``, ``"predictions"``).
        error: the :class:`UserError` subclass to raise.

    Raises:
        error: ``folder`` is None, not a folder, or holds no NIfTI file.
    """
    if folder is None:
        raise error(f"no {what} folder given")
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{what} folder not found", folder)
    files = sorted(path for path in folder.iterdir()
                   if is_nifti(path) and not path.name.startswith(".") and path.is_file())
    if not files:
        raise error(f"no {what} in this folder (no .nii or .nii.gz files)", folder)
    return files


def image_inputs(folder, what: str, error: type[UserError] = UserError) -> list[Path]:
    """The NIfTI files directly in ``folder`` and its visible subfolders holding a DICOM series, sorted.

    Raises:
        error: ``folder`` is None, not a folder, or holds neither.
    """
    from utils.dicom_io import (
        is_dicom_folder,  # reads 132 bytes per file; pydicom not needed
    )

    if folder is not None and Path(folder).is_dir():
        series = [path for path in Path(folder).iterdir()
                  if path.is_dir() and not path.name.startswith(".") and is_dicom_folder(path)]
        if series:
            nifti = [path for path in Path(folder).iterdir()
                     if is_nifti(path) and not path.name.startswith(".") and path.is_file()]
            return sorted(nifti + series)
    return nifti_files(folder, what, error)


@dataclass
class CaseMatch:
    """Files of two folders matched by case id (see the module docstring).

    Attributes:
        pairs: ``[(case_id, image_path, label_path)]`` sorted by case id.
        images_only: ``{case_id: image_path}`` without a label map.
        labels_only: ``{case_id: label_path}`` without an image.
        duplicates: ``[(case_id, kept_path, second_path)]``: a second file for a case id on one
            side; the second is left out of everything else.
    """

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    images_only: dict[str, Path] = field(default_factory=dict)
    labels_only: dict[str, Path] = field(default_factory=dict)
    duplicates: list[tuple[str, Path, Path]] = field(default_factory=list)


def match_cases(images_dir, labels_dir, names: tuple[str, str] = ("images", "masks"),
                error: type[UserError] = UserError) -> CaseMatch:
    """Match image-side files (by :func:`case_id_from_path`) with label maps (by :func:`strip_nifti_suffix`).

    Args:
        images_dir: CTs (``CASE.nii.gz``, ``CASE_0000.nii.gz`` or a DICOM series folder ``CASE/``),
            or predictions named after their CT.
        labels_dir: label maps named ``CASE.nii.gz``.
        names: what the two folders hold, plural, for messages.
        error: the :class:`UserError` subclass raised for a missing or empty folder.
    """
    match = CaseMatch()
    images = _by_case(image_inputs(images_dir, names[0], error), case_id_from_path, match.duplicates)
    labels = _by_case(nifti_files(labels_dir, names[1], error), strip_nifti_suffix, match.duplicates)
    match.pairs = sorted((case_id, image, labels[case_id])
                         for case_id, image in images.items() if case_id in labels)
    match.images_only = {case_id: path for case_id, path in images.items() if case_id not in labels}
    match.labels_only = {case_id: path for case_id, path in labels.items() if case_id not in images}
    return match


def pair_cases(images_dir, masks_dir,
               error: type[UserError] = UserError) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pair images with masks by case id (:func:`match_cases`), the way preprocessing reports it.

    Images are ``CASE_0000.nii.gz``, ``CASE.nii.gz`` or ``.nii`` in `images_dir`; masks
    ``CASE.nii.gz`` or ``CASE.nii`` in `masks_dir`.

    Returns:
        ``[(case_id, image_path, mask_path)]`` sorted by case id, and one-line problems
        (two files for one case, images without a mask, masks without an image).

    Raises:
        error: a folder not given, missing, or without NIfTI files.
    """
    match = match_cases(images_dir, masks_dir, ("images", "masks"), error)
    problems = [f"{second}: a second file for case {case_id} (already have {kept.name}); skipped"
                for case_id, kept, second in match.duplicates]
    problems += [f"{image}: no mask named {case_id}.nii.gz in {masks_dir}"
                 for case_id, image in match.images_only.items()]
    problems += [f"{mask}: no image named {case_id}{CHANNEL_SUFFIX}.nii.gz in {images_dir}"
                 for case_id, mask in match.labels_only.items()]
    return match.pairs, problems


def _by_case(files: list[Path], case_id_of, duplicates: list) -> dict[str, Path]:
    """``{case_id: path}`` of `files` in order; a second file of a case id goes to `duplicates`."""
    found: dict[str, Path] = {}
    for path in files:
        case_id = case_id_of(path)
        if case_id in found:
            duplicates.append((case_id, found[case_id], path))
        else:
            found[case_id] = path
    return found
