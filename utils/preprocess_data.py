"""Raw NIfTI cases -> a preprocessed folder; and the image geometry prediction must share.

Pipeline per case: load the CT and its mask (``utils/volume_io``), remap the mask to our ids
with one lookup table (``utils/labels``), then per axial slice: HU window -> resize to the
target size -> uint8, labels by nearest neighbour on the same grid, and a boundary-distance map.

Geometry (``PreprocessParams.spacing``):
    ``None``    the original project's plain resize of the whole ``(X, Y)`` slice to
                ``target_size`` (aspect ratio and pixel size change from case to case).
    ``s`` (mm)  resample in-plane to ``s`` mm/pixel, then centre crop/pad to ``target_size``
                (image padded with 0 = the bottom of the window, labels with background).
Slices keep the canonical axis order: output rows follow X (R), columns follow Y (A).
:func:`restore_in_plane` is the exact inverse, used by prediction to map logits back.

Folder layout (what :func:`preprocess_dataset` writes)::

    OUT/manifest.json                   {"version": 1, "params", "num_brightness_variations",
                                         "cases": [entry, ...], "failed": [{"case_id", "error"}]}
    OUT/<case_id>/image.npy             (Z, H, W) uint8, round(255 * windowed HU)
    OUT/<case_id>/label.npy             (Z, H, W) uint8, our class ids
    OUT/<case_id>/distance.npy          (Z, H, W) uint8, pixels to the nearest class boundary
    OUT/<case_id>/meta.json             the case's manifest entry (+ "params")

Plain ``.npy`` files, so the dataset memory-maps them. A case folder appears only complete
(built in ``OUT/.tmp-<case>-<pid>`` and renamed), so a killed run resumes by skipping finished
cases, and the manifest is rebuilt from every ``meta.json``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.errors import UserError
from utils.labels import NUM_CLASSES, ORGANS, LabelSource, get_source
from utils.phantom import write_phantom_dataset
from utils.volume_io import Volume, case_id_from_path, load_ct, load_mask

MANIFEST_VERSION = 1
MAX_DISTANCE = 255  # uint8 cap: "far from any boundary"


class PreprocessError(UserError):
    """Unusable input or output folder; the message names the folder or file."""


@dataclass(frozen=True)
class PreprocessParams:
    min_clip_value: float = -400.0          # HU mapped to 0 (bottom of the window)
    max_clip_value: float = 400.0           # HU mapped to 1 (255 stored)
    target_size: tuple[int, int] = (256, 256)  # (H, W) of every preprocessed slice
    spacing: float | None = None            # None: plain resize; else mm/pixel, then crop/pad

    def __post_init__(self):
        size = tuple(self.target_size)
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
            raise PreprocessError(f"target_size must be two positive integers, got {self.target_size!r}")
        object.__setattr__(self, "target_size", (int(size[0]), int(size[1])))
        if not self.min_clip_value < self.max_clip_value:
            raise PreprocessError(f"min_clip_value {self.min_clip_value} must be below "
                                  f"max_clip_value {self.max_clip_value}")
        if self.spacing is not None and not self.spacing > 0:
            raise PreprocessError(f"spacing must be None or > 0 mm, got {self.spacing!r}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (target_size as a list)."""
        return {"min_clip_value": float(self.min_clip_value), "max_clip_value": float(self.max_clip_value),
                "target_size": list(self.target_size),
                "spacing": None if self.spacing is None else float(self.spacing)}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessParams":
        """Params from :meth:`to_dict` output; unknown keys raise PreprocessError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PreprocessError(f"unknown preprocessing parameters {unknown} (known: {sorted(known)})")
        return cls(**d)


# --------------------------------------------------------------------------- pure geometry

def hu_window(hu: torch.Tensor, params: PreprocessParams) -> torch.Tensor:
    """Clip HU to [min_clip_value, max_clip_value] and scale to [0, 1]; float32, same shape."""
    low, high = float(params.min_clip_value), float(params.max_clip_value)
    # one float32 copy, then in place: whole chunks of 512 x 512 slices pass through here
    return hu.to(torch.float32, copy=True).clamp_(low, high).sub_(low).mul_(1.0 / (high - low))


def _resampled_size(shape_xy, spacing_xy, params: PreprocessParams) -> tuple[int, int]:
    """In-plane size after the resize step, before any crop/pad."""
    if params.spacing is None:
        return params.target_size
    return tuple(max(1, int(round(n * s / params.spacing))) for n, s in zip(shape_xy, spacing_xy))


def _crop_pad(size: int, target: int) -> tuple[int, int, int]:
    """(source start, destination start, length) of the centred window from `size` into `target`."""
    if size >= target:
        return (size - target) // 2, 0, target
    return 0, (target - size) // 2, size


def _place(resized: torch.Tensor, target_size, fill: float) -> torch.Tensor:
    """Centre crop/pad the last two axes of `resized` to `target_size`, padding with `fill`."""
    (sx, dx, nx), (sy, dy, ny) = (_crop_pad(n, t) for n, t in zip(resized.shape[-2:], target_size))
    if resized.shape[-2:] == tuple(target_size):
        return resized
    out = resized.new_full((*resized.shape[:-2], *target_size), fill)
    out[..., dx:dx + nx, dy:dy + ny] = resized[..., sx:sx + nx, sy:sy + ny]
    return out


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) float, antialiased when any axis shrinks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = any(s < n for s, n in zip(size, x.shape[-2:]))
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def preprocess_image(volume: Volume, params: PreprocessParams, device="cpu",
                     batch_slices: int = 64) -> torch.Tensor:
    """The image path shared by training data and prediction.

    Args:
        volume: canonical ``(X, Y, Z)`` HU (int16 or float32).
        params: window and geometry.
        device: where the work happens (chunks of ``batch_slices`` slices at a time).

    Returns:
        ``(Z, H, W)`` uint8 on `device`, ``round(255 * hu_window(...))`` resized to
        ``params.target_size``. Models see ``image / 255``.
    """
    data = volume.data
    size = _resampled_size(data.shape[:2], volume.spacing[:2], params)
    out = torch.empty((data.shape[2], *params.target_size), dtype=torch.uint8, device=device)
    for start in range(0, data.shape[2], batch_slices):
        # (X, Y, z) -> (z, X, Y), still int16/float32: the copy is one chunk, never float64
        chunk = np.ascontiguousarray(data[:, :, start:start + batch_slices].transpose(2, 0, 1))
        windowed = hu_window(torch.from_numpy(chunk).to(device), params)[:, None]  # (z, 1, X, Y)
        resized = _resize(windowed, size).clamp_(0, 1)
        out[start:start + chunk.shape[0]] = _place(resized[:, 0], params.target_size, 0.0).mul_(255).round_()
    return out


def _nearest_indices(size: int, resized: int, target: int) -> np.ndarray:
    """Source index along one axis for each target pixel (-1 where the pad lies outside)."""
    src, dst, length = _crop_pad(resized, target)
    index = np.full(target, -1, dtype=np.int64)
    positions = np.arange(src, src + length)
    # nearest pixel to the bilinear sample point (align_corners=False): floor((i + 0.5) * scale)
    index[dst:dst + length] = np.minimum(((positions + 0.5) * size / resized).astype(np.int64), size - 1)
    return index


def preprocess_labels(labels: np.ndarray, volume_spacing, params: PreprocessParams) -> np.ndarray:
    """Labels on the grid of :func:`preprocess_image`, by nearest neighbour.

    Args:
        labels: ``(X, Y, Z)`` uint8 class ids (our ids).
        volume_spacing: the volume's (x, y[, z]) spacing in mm.

    Returns:
        ``(Z, H, W)`` uint8; pixels outside the volume (spacing mode padding) are background.
    """
    size = _resampled_size(labels.shape[:2], volume_spacing[:2], params)
    rows, cols = (_nearest_indices(n, r, t) for n, r, t in zip(labels.shape[:2], size, params.target_size))
    out = labels[np.maximum(rows, 0)][:, np.maximum(cols, 0)]  # (H, W, Z)
    out[rows < 0] = 0
    out[:, cols < 0] = 0
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.uint8)  # (H, W, Z) -> (Z, H, W)


def distance_to_boundary(labels: np.ndarray) -> np.ndarray:
    """Per slice, Euclidean pixels to the nearest boundary between different classes.

    A boundary pixel has a 4-neighbour of another class (both sides of an edge count, distance
    0); the image border is not a boundary.

    Args:
        labels: ``(Z, H, W)`` class ids.

    Returns:
        ``(Z, H, W)`` uint8, rounded and capped at 255; 255 everywhere on single-class slices.
    """
    boundary = np.zeros(labels.shape, dtype=bool)
    vertical = labels[:, 1:, :] != labels[:, :-1, :]
    horizontal = labels[:, :, 1:] != labels[:, :, :-1]
    boundary[:, 1:, :] |= vertical
    boundary[:, :-1, :] |= vertical
    boundary[:, :, 1:] |= horizontal
    boundary[:, :, :-1] |= horizontal
    out = np.full(labels.shape, MAX_DISTANCE, dtype=np.uint8)
    for z in np.flatnonzero(boundary.any(axis=(1, 2))):
        distance = scipy.ndimage.distance_transform_edt(~boundary[z])
        out[z] = np.minimum(np.rint(distance), MAX_DISTANCE)
    return out


def restore_in_plane(tensor: torch.Tensor, volume_shape_xy, volume_spacing_xy, params: PreprocessParams,
                     pad_value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Map preprocessed-grid maps back onto the volume's in-plane grid (inverse of preprocess_image).

    Args:
        tensor: ``(N, C, H, W)`` float logits or probabilities, any device, ``(H, W) = target_size``.
        volume_shape_xy: the volume's ``(X, Y)``.
        volume_spacing_xy: its in-plane spacing in mm.
        pad_value: value where the volume reaches beyond the cropped field of view (spacing
            mode): a scalar, or a ``(C,)`` tensor per channel. With logits, the default 0 makes
            all classes equal there, and ``argmax`` picks class 0 (background).

    Returns:
        ``(N, C, X, Y)`` float on the same device (bilinear, align_corners=False).
    """
    if tuple(tensor.shape[-2:]) != tuple(params.target_size):
        raise ValueError(f"expected maps of size {params.target_size}, got {tuple(tensor.shape[-2:])}")
    shape_xy = tuple(int(n) for n in volume_shape_xy[:2])
    size = _resampled_size(shape_xy, tuple(volume_spacing_xy)[:2], params)
    if params.spacing is not None and size != tuple(params.target_size):
        resized = tensor.new_empty((*tensor.shape[:2], *size))
        fill = torch.as_tensor(pad_value, dtype=tensor.dtype, device=tensor.device)
        resized[:] = fill.view(1, -1, 1, 1) if fill.ndim == 1 else fill
        # the inverse of _place: what the crop kept goes back, what the pad added goes away
        (sx, dx, nx), (sy, dy, ny) = (_crop_pad(n, t) for n, t in zip(size, params.target_size))
        resized[..., sx:sx + nx, sy:sy + ny] = tensor[..., dx:dx + nx, dy:dy + ny]
        tensor = resized
    return _resize(tensor, shape_xy)


# --------------------------------------------------------------------------- one case

def pair_cases(images_dir, masks_dir) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pair images with masks by case id.

    Images are ``CASE_0000.nii.gz``, ``CASE.nii.gz`` or ``.nii`` in `images_dir`; masks
    ``CASE.nii.gz`` or ``CASE.nii`` in `masks_dir`.

    Returns:
        ``[(case_id, image_path, mask_path)]`` sorted by case id, and one-line problems
        (images without a mask, masks without an image, two files for one case).
    """
    images_dir, masks_dir = _input_folder(images_dir, "images"), _input_folder(masks_dir, "masks")
    images, problems = _by_case(images_dir, case_id_from_path)
    masks, mask_problems = _by_case(masks_dir, _strip_nifti_suffix)
    problems += mask_problems
    pairs = []
    for case_id, image in images.items():
        mask = masks.get(case_id)
        if mask is None:
            problems.append(f"{image}: no mask named {case_id}.nii.gz in {masks_dir}")
        else:
            pairs.append((case_id, image, mask))
    problems += [f"{mask}: no image named {case_id}_0000.nii.gz in {images_dir}"
                 for case_id, mask in masks.items() if case_id not in images]
    return sorted(pairs), problems


def _input_folder(folder, what: str) -> Path:
    if folder is None:
        raise PreprocessError(f"no {what} folder given")
    folder = Path(folder)
    if not folder.is_dir():
        raise PreprocessError(f"{folder}: {what} folder not found")
    if not any(_is_nifti(p) for p in folder.iterdir()):
        raise PreprocessError(f"{folder}: {what} folder holds no .nii or .nii.gz files")
    return folder


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith((".nii", ".nii.gz")) and path.is_file()


def _strip_nifti_suffix(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)


def _by_case(folder: Path, case_id_of) -> tuple[dict[str, Path], list[str]]:
    found, problems = {}, []
    for path in sorted(p for p in folder.iterdir() if _is_nifti(p)):
        case_id = case_id_of(path)
        if case_id in found:
            problems.append(f"{path}: a second file for case {case_id} (already have {found[case_id].name}); skipped")
        else:
            found[case_id] = path
    return found, problems


def load_case(image_path, mask_path, source: LabelSource | str, label_map=None) -> tuple[Volume, np.ndarray]:
    """Read a CT and its mask and harmonize the mask: (Volume, (X, Y, Z) uint8 our ids)."""
    if isinstance(source, str):
        source = get_source(source, label_map)
    volume = load_ct(image_path)
    return volume, source.remap(load_mask(mask_path, volume), mask_path)


def preprocess_case(case_id: str, image_path, mask_path, source: LabelSource, params: PreprocessParams,
                    out_dir) -> dict:
    """Preprocess one case into ``out_dir/<case_id>/`` atomically; returns its manifest entry.

    Raises:
        NiftiError / LabelMapError (both ValueError): unreadable files, a mask on another grid,
            mask values the source's label map does not declare. Nothing is left behind.
    """
    volume, labels = load_case(image_path, mask_path, source)
    voxel_counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    image = preprocess_image(volume, params).numpy()
    label = preprocess_labels(labels, volume.spacing, params)
    distance = distance_to_boundary(label)
    num_slices = label.shape[0]
    # (Z, H, W) -> (Z, classes): which classes each slice contains, in one bincount
    offsets = label.reshape(num_slices, -1) + (np.arange(num_slices) * NUM_CLASSES)[:, None]
    presence = np.bincount(offsets.ravel(), minlength=num_slices * NUM_CLASSES).reshape(num_slices, -1) > 0
    entry = {
        "case_id": case_id, "source": source.name, "annotated": sorted(source.annotated),
        "image_file": str(Path(image_path).absolute()), "mask_file": str(Path(mask_path).absolute()),
        "folder": case_id, "num_slices": int(num_slices),
        "original": {"shape": list(volume.data.shape), "spacing": list(volume.spacing),
                     "affine": volume.affine.tolist()},
        "slice_presence": {ORGANS[c]: int(presence[:, c].sum()) for c in range(1, NUM_CLASSES)},
        "voxel_counts": {ORGANS[c]: int(voxel_counts[c]) for c in range(1, NUM_CLASSES)},
    }
    out_dir = Path(out_dir)
    temporary = out_dir / f".tmp-{case_id}-{os.getpid()}"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        np.save(temporary / "image.npy", image)
        np.save(temporary / "label.npy", label)
        np.save(temporary / "distance.npy", distance)
        (temporary / "meta.json").write_text(json.dumps({**entry, "params": params.to_dict()}, indent=1))
        final = out_dir / case_id
        if final.exists():  # a folder without meta.json: leftover of something else
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return entry


def _run_case(case_id, image_path, mask_path, source, params, out_dir) -> tuple[str, dict | str]:
    """preprocess_case for a worker: ("ok", entry) or ("failed", one-line error)."""
    try:
        return "ok", preprocess_case(case_id, image_path, mask_path, source, params, out_dir)
    except ValueError as err:  # NiftiError, LabelMapError, PreprocessError
        return "failed", str(err)


def _init_worker() -> None:
    torch.set_num_threads(1)  # processes, not threads, give the parallelism


# --------------------------------------------------------------------------- whole folders

def preprocess_dataset(source: str, images_dir, masks_dir, out_dir, params: PreprocessParams = PreprocessParams(),
                       label_map=None, workers: int = 1, progress: bool = True,
                       num_brightness_variations: int = 4) -> dict:
    """Preprocess every image/mask pair of a folder; returns the manifest (also in OUT/manifest.json).

    Args:
        source: label source (``utils.labels.SOURCES``). For ``nnunet``, `images_dir` is the
            dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``) and `masks_dir` is
            ignored; `label_map` defaults to its ``dataset.json``.
        label_map: label-map JSON for ``pku`` / ``nnunet``.
        workers: processes; 1 runs inline.
        num_brightness_variations: recorded as a hint for online augmentation.

    Cases already in `out_dir` are skipped. A bad case is recorded under ``"failed"`` and the
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
    pairs, problems = pair_cases(images_dir, masks_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    existing = _read_metas(out_dir, params)
    failed = [{"case_id": _problem_case(p), "error": p} for p in problems]
    todo = []
    for case_id, image, mask in pairs:
        done = existing.get(case_id)
        if done is None:
            todo.append((case_id, image, mask))
        elif done["image_file"] != str(image.absolute()):
            failed.append({"case_id": case_id, "error": f"{image}: case id {case_id} is already in {out_dir} "
                                                        f"from {done['image_file']}; skipped"})
    for case_id, status, result in _run_all(todo, label_source, params, out_dir, workers, progress):
        if status == "failed":
            failed.append({"case_id": case_id, "error": result})
    manifest = {"version": MANIFEST_VERSION, "params": params.to_dict(),
                "num_brightness_variations": int(num_brightness_variations),
                "cases": [_entry(meta) for meta in _read_metas(out_dir, params).values()], "failed": failed}
    _write_json_atomically(out_dir / "manifest.json", manifest)
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
                yield (futures[future], *future.result())
                bar.update()
    finally:
        bar.close()


def _problem_case(problem: str) -> str:
    return case_id_from_path(problem.split(": ", 1)[0])


def _entry(meta: dict) -> dict:
    return {key: value for key, value in meta.items() if key != "params"}


def _read_metas(out_dir: Path, params: PreprocessParams) -> dict[str, dict]:
    """{case_id: meta} of every finished case folder; refuses folders made with other params."""
    metas = {}
    for meta_path in sorted(out_dir.glob("*/meta.json")):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PreprocessError(f"{meta_path}: not valid JSON ({err}); delete the case folder to redo it") from None
        if meta.get("params") != params.to_dict():
            raise PreprocessError(f"{out_dir}: already holds cases preprocessed with {meta.get('params')} "
                                  f"(e.g. {meta_path.parent.name}), not {params.to_dict()}; use another folder")
        metas[meta["case_id"]] = meta
    return metas


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete ``.tmp-<case>-<pid>`` folders whose process is gone (a killed run)."""
    for folder in out_dir.glob(".tmp-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json_atomically(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(value, indent=1))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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


def load_manifest(folder) -> dict:
    """Read and validate ``folder/manifest.json``.

    Checks the version, the preprocessing params and that every case folder is a plain relative
    name inside `folder` (no ``..``, no absolute paths). Returns the manifest dict as stored.

    Raises:
        PreprocessError: naming the manifest and the problem.
    """
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PreprocessError(f"{path}: no manifest; is {folder} a preprocessed folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreprocessError(f"{path}: not valid JSON ({err})") from None
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


def preprocess_phantoms(folder, cases: int, layout: str = "full", seed: int = 0, size: int = 128,
                        num_slices: int | None = None, params: PreprocessParams = PreprocessParams(),
                        workers: int = 1) -> Path:
    """Phantom cases written to ``folder/raw`` and preprocessed into ``folder/preprocessed``.

    Returns the preprocessed folder; raises PreprocessError if any case failed.
    """
    raw, out = Path(folder) / "raw", Path(folder) / "preprocessed"
    write_phantom_dataset(raw, cases, layout, seed=seed, size=size, num_slices=num_slices,
                          workers=workers, progress=False)
    manifest = preprocess_dataset(layout, raw / "Image", raw / "Mask", out, params, workers=workers,
                                  progress=False)
    if manifest["failed"]:
        raise PreprocessError(f"{out}: preprocessing failed: {manifest['failed']}")
    return out

