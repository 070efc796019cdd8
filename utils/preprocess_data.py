"""Raw NIfTI cases -> a preprocessed folder: the dataset preprocessing run, and the seed's entry points.

Per case: load the CT and its mask (``utils/volume_io``), remap the mask to our ids with one
lookup table (``utils/labels``), then the slice geometry training and prediction share
(``utils/geometry``: HU window, resize or resample, uint8; labels on the same grid; distance
maps), written as one case folder (``utils/preprocessed_folder``, which also describes the
layout). Images pair with masks by case id (``utils/case_files``). Cases run inline or in worker
processes; a bad case is recorded and the rest completes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.case_files import case_id_from_path, pair_cases
from utils.dicom_io import load_dicom_ct
from utils.geometry import (PreprocessError, PreprocessParams, distance_to_boundary, preprocess_image,
                            preprocess_labels)
from utils.labels import NUM_CLASSES, ORGANS, LabelSource, get_source, label_sets_to_lists
from utils.errors import one_line_reason
from utils.patients import array_hash
from utils.output_folder import claim_output_folder
from utils.preprocessed_folder import (MANIFEST_FILE, META_FILE, read_case_metas, remove_stale_temporaries,
                                       write_case_folder, write_manifest)
from utils.volume_io import Volume, load_ct, load_mask


def load_case(image_path, mask_path, source: LabelSource | str, label_map=None) -> tuple[Volume, np.ndarray]:
    """Read a CT and its mask and harmonize the mask: (Volume, (X, Y, Z) uint8 our ids)."""
    if isinstance(source, str):
        source = get_source(source, label_map)
    image_path = Path(image_path)
    volume = load_dicom_ct(image_path) if image_path.is_dir() else load_ct(image_path)  # DICOM series folder or NIfTI
    return volume, source.remap(load_mask(mask_path, volume), mask_path)


def preprocess_case(case_id: str, image_path, mask_path, source: LabelSource, params: PreprocessParams,
                    out_dir) -> dict:
    """Preprocess one case into ``out_dir/<case_id>/`` atomically; returns its manifest entry.

    Raises:
        NiftiError / LabelMapError (both ValueError): unreadable files, a mask on another grid,
            mask values the source's label map does not declare. Nothing is left behind.
    """
    volume, labels = load_case(image_path, mask_path, source)
    # torch's bincount counts uint8 as it is (numpy's casts to int64); memory order: no copy
    voxel_counts = torch.from_numpy(labels.ravel(order="K")).bincount(minlength=NUM_CLASSES).numpy()
    image = preprocess_image(volume, params).numpy()
    label = preprocess_labels(labels, volume.spacing, params)
    distance = distance_to_boundary(label)
    num_slices = label.shape[0]
    # (Z, H, W) -> (Z, classes): which classes each slice contains, in one bincount
    offsets = torch.from_numpy(label.reshape(num_slices, -1)).long() + torch.arange(num_slices)[:, None] * NUM_CLASSES
    presence = offsets.ravel().bincount(minlength=num_slices * NUM_CLASSES).reshape(num_slices, -1).numpy() > 0
    entry = {
        "case_id": case_id, "source": source.name, "annotated": sorted(source.annotated),
        "label_sets": label_sets_to_lists(source.label_sets()),
        "image_file": str(Path(image_path).absolute()), "mask_file": str(Path(mask_path).absolute()),
        "folder": case_id, "num_slices": int(num_slices), "image_hash": array_hash(image),
        "original": {"shape": list(volume.data.shape), "spacing": list(volume.spacing),
                     "affine": volume.affine.tolist()},
        "slice_presence": {ORGANS[c]: int(presence[:, c].sum()) for c in range(1, NUM_CLASSES)},
        "voxel_counts": {ORGANS[c]: int(voxel_counts[c]) for c in range(1, NUM_CLASSES)},
    }
    write_case_folder(out_dir, case_id, {"image": image, "label": label, "distance": distance},
                      {**entry, "params": params.to_dict()})
    return entry


def _run_case(case_id, image_path, mask_path, source, params, out_dir) -> tuple[str, dict | str]:
    """preprocess_case in its own guard: ("ok", entry) or ("failed", one line naming the file).

    Any exception counts (a TypeError from an odd file, MemoryError, a bug): the case fails,
    the others still run.
    """
    try:
        return "ok", preprocess_case(case_id, image_path, mask_path, source, params, out_dir)
    except Exception as err:  # noqa: BLE001 (the per-case guard)
        return "failed", failure_line(err, image_path)


def failure_line(err: BaseException, path) -> str:
    """One line for a failed case: the message (with `path` when it names no file) and, for an
    error that is not a UserError or OSError, its type (``MemoryError``, ``TypeError: ...``)."""
    text = one_line_reason(err)
    return text if str(path) in text else f"{path}: {text}"


def _init_worker() -> None:
    torch.set_num_threads(1)  # processes, not threads, give the parallelism


# --------------------------------------------------------------------------- whole folders

def preprocess_dataset(source: str, images_dir, masks_dir, out_dir, params: PreprocessParams = PreprocessParams(),
                       label_map=None, workers: int = 1, progress: bool = True,
                       num_brightness_variations: int = 4, overwrite: bool = False) -> dict:
    """Preprocess every image/mask pair of a folder; returns the manifest (also in OUT/manifest.json).

    Args:
        source: label source (``utils.labels.SOURCES``). For ``nnunet``, `images_dir` is the
            dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``) and `masks_dir` is
            ignored; `label_map` defaults to its ``dataset.json``.
        label_map: label-map JSON for ``pku`` / ``nnunet``.
        workers: processes; 1 runs inline.
        num_brightness_variations: recorded as a hint for online augmentation.
        overwrite: redo every case, replacing the case folders an earlier ``preprocess`` run
            wrote in `out_dir` (never anything else).

    `out_dir` is claimed as a ``preprocess`` output folder (``utils.output_folder``): new, empty
    or an earlier preprocessing's, never an input folder, inside one or around one; a folder in
    it that abdoseg did not write is never replaced or deleted. Cases already in `out_dir` are
    skipped. A bad case is recorded under ``"failed"`` and the
    rest completes; so are images without masks and masks without images.

    Raises:
        PreprocessError: missing or empty input folders, or `out_dir` preprocessed with other params.
        LabelMapError: an unusable label map (before any case is touched).
    """
    if source == "nnunet":
        dataset_dir = Path(images_dir)
        label_map = label_map if label_map is not None else dataset_dir / "dataset.json"
        images_dir, masks_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    label_source = get_source(source, label_map)
    pairs, problems = pair_cases(images_dir, masks_dir, error=PreprocessError)
    inputs = [images_dir, *([masks_dir] if masks_dir is not None else []),
              *([label_map] if isinstance(label_map, (str, Path)) else [])]
    out = claim_output_folder(out_dir, "preprocess", inputs=inputs, overwrite=overwrite)
    out_dir = out.path
    remove_stale_temporaries(out_dir)
    if overwrite:  # redo everything: drop the case folders abdoseg wrote (UserError if one holds a user's file)
        for meta_path in sorted(out_dir.glob(f"*/{META_FILE}")):
            out.remove(meta_path.parent.name)
    existing = read_case_metas(out_dir, params)
    failed = [{"case_id": _problem_case(p), "error": p} for p in problems]
    todo = []
    for case_id, image, mask in pairs:
        done = existing.get(case_id)
        if done is None:
            todo.append((case_id, image, mask))
        elif done["image_file"] != str(image.absolute()):
            failed.append({"case_id": case_id, "error": f"{image}: case id {case_id} is already in {out_dir} "
                                                        f"from {done['image_file']}; skipped"})
    for case_id, status, result in _run_all(todo, label_source, params, out, workers, progress):
        if status == "failed":
            failed.append({"case_id": case_id, "error": result})
    out.close()
    out.prepare(MANIFEST_FILE, replace=True)  # rebuilt by design on every run
    manifest = write_manifest(out_dir, params, failed, num_brightness_variations)
    out.close()
    return manifest


def _run_all(todo, source, params, out_dir, workers, progress):
    """Yield (case_id, status, entry or error) for each case, inline or in worker processes."""
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for case_id, image, mask in todo:
                yield (case_id, *_run_case(case_id, image, mask, source, params, out_dir))
                bar.update()
            return
        # spawn: forking a process whose torch/OpenMP threads already ran can deadlock
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                                    initializer=_init_worker) as pool:
            futures = {pool.submit(_run_case, case_id, image, mask, source, params, out_dir): case_id
                       for case_id, image, mask in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as err:  # noqa: BLE001 (a worker killed: out of memory, a crash)
                    outcome = ("failed", failure_line(err, futures[future]))
                yield (futures[future], *outcome)
                bar.update()
    finally:
        bar.close()


def _problem_case(problem: str) -> str:
    return case_id_from_path(problem.split(": ", 1)[0])


def preprocess_pku_dataset(image_input_path, mask_input_path, output_base_path, min_clip_value=-400,
                           max_clip_value=400, target_size=(256, 256), num_brightness_variations=4,
                           label_map=None, workers: int = 1) -> dict:
    """The original project's PKU entry point: :func:`preprocess_dataset` with source ``pku``.

    `num_brightness_variations` is only recorded in the manifest: augmentation happens online.
    """
    params = PreprocessParams(min_clip_value, max_clip_value, tuple(target_size))
    return preprocess_dataset("pku", image_input_path, mask_input_path, output_base_path, params,
                              label_map=label_map, workers=workers,
                              num_brightness_variations=num_brightness_variations)


def preprocess_other_dataset(image_input_path, mask_input_path, output_base_path, min_clip_value=-400,
                             max_clip_value=400, target_size=(256, 256), num_brightness_variations=4,
                             workers: int = 1) -> dict:
    """The original project's AbdomenCT-1K entry point: :func:`preprocess_dataset` with ``abdomenct1k``."""
    params = PreprocessParams(min_clip_value, max_clip_value, tuple(target_size))
    return preprocess_dataset("abdomenct1k", image_input_path, mask_input_path, output_base_path, params,
                              workers=workers, num_brightness_variations=num_brightness_variations)
