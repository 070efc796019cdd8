"""The preprocessed folder on disk: case folders, their metas, the manifest, and leftovers.

Layout (what ``utils.preprocess_data.preprocess_dataset`` writes)::

    OUT/manifest.json                   {"version": 1, "params", "num_brightness_variations",
                                         "cases": [entry, ...], "failed": [{"case_id", "error"}]}
    OUT/<case_id>/image.npy             (Z, H, W) uint8, round(255 * windowed HU)
    OUT/<case_id>/label.npy             (Z, H, W) uint8, our class ids
    OUT/<case_id>/distance.npy          (Z, H, W) uint8, pixels to the nearest class boundary
    OUT/<case_id>/meta.json             the case's manifest entry (+ "params")

A case entry's ``"label_sets"`` lists, per stored label value, the classes it may be
(``utils.labels.label_sets_to_lists`` of its source's ``label_sets()``); manifests written before
it existed have only ``"annotated"``, from which the dataset rebuilds the sets. ``"image_hash"``
(``utils.patients.array_hash`` of ``image.npy``) lets training flag the same image under two ids.

Plain ``.npy`` files, so the dataset memory-maps them. A case folder appears only complete (built
under a hidden temporary name, ``utils.files.temporary_name``, and renamed), so a killed run
resumes by skipping finished cases, and the manifest is rebuilt from every ``meta.json``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import TEMPORARY_PREFIX, read_json, temporary_name, write_json
from utils.geometry import PreprocessError, PreprocessParams
from utils.output_folder import OutputFolder

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"


def write_case_folder(out_dir, case_id: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``out_dir/<case_id>/`` with ``<name>.npy`` per array and ``meta.json``, all at once.

    The folder is built under a hidden temporary name and renamed, so it appears complete or
    not at all. With an :class:`~utils.output_folder.OutputFolder` (what preprocessing passes),
    a folder of that name is replaced only if abdoseg wrote all of it (and the output folder
    allows it); a user's folder is never touched (UserError). With a plain path, an existing
    folder of that name is refused (PreprocessError), never deleted. Returns the case folder.
    """
    if isinstance(out_dir, OutputFolder):
        with out_dir.atomic_folder(case_id) as temporary:
            for name, array in arrays.items():
                np.save(temporary / f"{name}.npy", array)
            write_json(temporary / META_FILE, meta, indent=1)
        return out_dir.path / case_id
    out_dir = Path(out_dir)
    temporary = temporary_name(out_dir / case_id)
    final = out_dir / case_id
    try:
        temporary.mkdir(parents=True)
        for name, array in arrays.items():
            np.save(temporary / f"{name}.npy", array)
        write_json(temporary / META_FILE, meta, indent=1)
        if os.path.lexists(final):  # never deleted here: it may be a user's folder
            raise PreprocessError(f"{final}: already exists; abdoseg does not replace a folder it has no record of")
        os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def read_case_metas(out_dir, params: PreprocessParams) -> dict[str, dict]:
    """``{case_id: meta}`` of every finished case folder; refuses folders made with other params.

    Raises:
        PreprocessError: a ``meta.json`` that is not valid JSON, or made with other params.
    """
    out_dir = Path(out_dir)
    metas = {}
    for meta_path in sorted(out_dir.glob(f"*/{META_FILE}")):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            meta = read_json(meta_path, "case meta file")
        except UserError as err:
            raise PreprocessError(f"{err}; delete the case folder to redo it") from None
        if meta.get("params") != params.to_dict():
            raise PreprocessError(f"{out_dir}: already holds cases preprocessed with {meta.get('params')} "
                                  f"(e.g. {meta_path.parent.name}), not {params.to_dict()}; use another folder")
        metas[meta["case_id"]] = meta
    return metas


def manifest_entry(meta: dict) -> dict:
    """A case's manifest entry: its ``meta.json`` without the folder-wide ``"params"``."""
    return {key: value for key, value in meta.items() if key != "params"}


def write_manifest(out_dir, params: PreprocessParams, failed: list[dict],
                   num_brightness_variations: int) -> dict:
    """Rebuild ``out_dir/manifest.json`` from every finished case's ``meta.json``; returns it."""
    manifest = {"version": MANIFEST_VERSION, "params": params.to_dict(),
                "num_brightness_variations": int(num_brightness_variations),
                "cases": [manifest_entry(meta) for meta in read_case_metas(out_dir, params).values()],
                "failed": failed}
    write_json(Path(out_dir) / MANIFEST_FILE, manifest, indent=1)
    return manifest


def load_manifest(folder) -> dict:
    """Read and validate ``folder/manifest.json``.

    Checks the version, the preprocessing params and that every case folder is a plain relative
    name inside `folder` (no ``..``, no absolute paths). Returns the manifest dict as stored.

    Raises:
        PreprocessError: naming the manifest and the problem.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise PreprocessError(f"{path}: no manifest; is {folder} a preprocessed folder?")
    try:
        manifest = read_json(path, "manifest")
    except UserError as err:
        raise PreprocessError(str(err)) from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise PreprocessError(f"{path}: manifest version {version!r}, expected {MANIFEST_VERSION}")
    if not isinstance(manifest.get("params"), dict):
        raise PreprocessError(f"{path}: no \"params\" (preprocessing parameters)")
    try:
        PreprocessParams.from_dict(manifest["params"])
    except (TypeError, ValueError) as err:
        raise PreprocessError(f"{path}: bad \"params\": {err}") from None
    if not isinstance(manifest.get("cases"), list):
        raise PreprocessError(f"{path}: no \"cases\" list")
    for case in manifest["cases"]:
        relative = case.get("folder") if isinstance(case, dict) else None
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute() \
                or ".." in Path(relative).parts or len(Path(relative).parts) != 1:
            raise PreprocessError(f"{path}: case folder {relative!r} is not a plain name inside {folder}")
    return manifest


def remove_stale_temporaries(out_dir) -> None:
    """Delete abdoseg's temporary files and folders in `out_dir` whose process is gone (a killed run).

    Only names made by ``utils.files.temporary_name`` (``.abdoseg-tmp-<pid>-...``) are touched.
    """
    for path in Path(out_dir).glob(f"{TEMPORARY_PREFIX}*"):
        pid = path.name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
