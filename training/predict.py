"""Prediction: CT NIfTI in, label NIfTI out, in the input's own grid and affine.

The image path is the training one (``utils.geometry.preprocess_image``: HU window,
in-plane resize or resample, uint8; the model sees ``uint8 / 255``), and
``restore_in_plane`` is its exact inverse, so logits go back onto the volume's grid before the
``argmax``. Memory stays bounded by the input, the output and one chunk of slices: logits are
mapped back and reduced to labels chunk by chunk, never held for the whole volume.

    predict_files(checkpoint, inputs, out_dir)  a CT file or a folder of them, or DICOM series ->
        OUT/<case_id>.nii.gz                    uint8 labels, the input's shape and affine
        OUT/<case_id>_{seg,rtstruct}.dcm        optional, DICOM input (training/predict_io.py)
        OUT/<case_id>_statistics.json           optional, volume (ml) and HU per organ
        OUT/<case_id>_probabilities.nii.gz      optional, 4D uint8 (X, Y, Z, 12), 255 = 1.0
        OUT/labels.txt                          ITK-SNAP label description file
        OUT/abdoseg_labels.ctbl                 3D Slicer colour table
    predict_volume(model, volume, params)       one loaded Volume -> (X, Y, Z) labels
    predict_volume_with_probabilities(...)      -> (labels, (12, X, Y, Z) uint8 probabilities)
    generate_predictions(model, ct_data, device)   the original project's slice-grid predictions
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
from tqdm.auto import tqdm

from network.unet import fold_batchnorm
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.predict_io import (  # noqa: F401
    ITKSNAP_FILE,
    SLICER_FILE,
    SUFFIXES,
    case_name,
    check_formats,
    collect_written,
    input_cases,
    output_place,
    read_case_or_error,
    write_case,
    write_label_descriptions,
)
from training.quantize import prediction_model
from training.runtime import autocast_context, select_device
from utils.errors import UserError, one_line_reason
from utils.geometry import (
    PreprocessParams,
    preprocess_image,
    preprocess_labels,
    restore_in_plane,
)
from utils.labels import NUM_CLASSES, ORGANS, LabelSource, get_source
from utils.option_checks import check_positive
from utils.output_folder import claim_output_folder
from utils.volume_io import (
    Volume,
    load_ct,
    load_mask,
)

# On a 2-core CPU 4-slice batches ran as fast as or faster than 16 or 32 (activations stay in cache).
CPU_MAX_BATCH = 4
# Logits mapped back to the volume grid at a time: (slices, 12, X, Y) float32 under this size.
RESTORE_CHUNK_BYTES = 256 * 2**20
# Paired organs: keep the two largest components.
PAIRED_ORGANS = ("femur_head", "kidney")


class PredictError(UserError):
    """Inputs or outputs that cannot be used as asked; the message names the path."""


# --------------------------------------------------------------------------- the original API

def load_and_preprocess_ct_data(ct_image_path, mask_path=None, target_size=(256, 256), min_clip_value=-400,
                                max_clip_value=400, label_rearrange=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a CT (and optionally its mask) as the model sees it.

    Args:
        ct_image_path: CT NIfTI.
        mask_path: label NIfTI on the same grid, or None.
        label_rearrange: the mask's label source: a name from ``utils.labels.SOURCES`` or a
            ``LabelSource``; None means the mask already holds our ids.

    Returns:
        ``ct_data`` ``(H, W, Z)`` float32 in [0, 1] (the preprocessed uint8 / 255) and
        ``mask_data`` ``(H, W, Z)`` uint8 in our ids on the same grid, or None. Slices run
        along the last axis, as in the volumes, so both go straight to
        ``create_interactive_visualization``.
    """
    params = PreprocessParams(min_clip_value, max_clip_value, tuple(target_size))
    volume = load_ct(ct_image_path)
    ct_data = preprocess_image(volume, params).float().div_(255).numpy()  # (Z, H, W)
    ct_data = np.moveaxis(ct_data, 0, -1)  # (Z, H, W) -> (H, W, Z)
    if mask_path is None:
        return ct_data, None
    if not isinstance(label_rearrange, LabelSource):
        label_rearrange = get_source(label_rearrange or "full")
    labels = label_rearrange.remap(load_mask(mask_path, volume), mask_path)  # (X, Y, Z) our ids
    return ct_data, np.moveaxis(preprocess_labels(labels, volume.spacing, params), 0, -1)


def generate_predictions(model: torch.nn.Module, ct_data, device, batch_size: int = 32,
                         amp_dtype: torch.dtype | None = None, channels_last: bool = True) -> np.ndarray:
    """Class ids for preprocessed slices, predicted in batches.

    Args:
        model: returns logits ``(B, classes, H, W)`` for ``(B, C, H, W)``; its ``in_channels``
            (default 1) neighbouring slices are stacked, edge slices repeated. Moved to `device`.
        ct_data: ``(H, W, Z)`` float in [0, 1] (numpy or tensor), as from
            :func:`load_and_preprocess_ct_data`.
        batch_size: slices per model call (at most ``CPU_MAX_BATCH`` on CPU).
        amp_dtype: autocast dtype (``training.runtime.select_amp``), None for fp32.

    Returns:
        ``(H, W, Z)`` uint8 class ids on the preprocessed grid.
    """
    device = torch.device(device)
    image = ct_data if torch.is_tensor(ct_data) else torch.from_numpy(np.asarray(ct_data, dtype=np.float32))
    image = image.to(device, torch.float32).permute(2, 0, 1)  # (H, W, Z) -> (Z, H, W)
    out = np.empty(tuple(image.shape), dtype=np.uint8)
    with _inference(model, device, channels_last) as model:
        for start, logits in _logits_in_batches(model, image, 1.0, device, amp_dtype, batch_size, channels_last):
            out[start:start + len(logits)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    return np.moveaxis(out, 0, -1)  # (Z, H, W) -> (H, W, Z)


# --------------------------------------------------------------------------- one volume

def predict_volume(model: torch.nn.Module, volume: Volume, params: PreprocessParams, in_channels: int = 1,
                   device="cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 32,
                   channels_last: bool = True, largest_component: bool = False) -> np.ndarray:
    """Segment one CT volume on its own grid.

    Slices are preprocessed on `device` exactly as for training, predicted in batches under
    ``torch.inference_mode()`` (autocast to `amp_dtype` if given), and each batch's logits are
    mapped back with ``restore_in_plane`` and reduced by ``argmax`` straight into the output.

    Args:
        model: logits ``(B, 12, H, W)`` for ``(B, in_channels, H, W)``; moved to `device`,
            run in eval mode (its training flag is restored afterwards).
        volume: canonical CT from ``load_ct``.
        params: the preprocessing the model was trained with (from its checkpoint).
        in_channels: neighbouring slices per input (2.5D), centred, edges repeated.
        batch_size: slices per model call (at most ``CPU_MAX_BATCH`` on CPU, where that is faster).
        largest_component: apply :func:`keep_largest_component` to the labels.

    Returns:
        ``(X, Y, Z)`` uint8 class ids, canonical like ``volume.data`` (a Fortran-ordered array).
    """
    labels, _ = _segment(model, volume, params, in_channels, device, amp_dtype, batch_size, channels_last,
                         probabilities=False)
    return keep_largest_component(labels) if largest_component else labels


def predict_volume_with_probabilities(model: torch.nn.Module, volume: Volume, params: PreprocessParams,
                                      in_channels: int = 1, device="cpu", amp_dtype: torch.dtype | None = None,
                                      batch_size: int = 32, channels_last: bool = True,
                                      largest_component: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_volume`, and the class probabilities on the same grid (same arguments).

    Returns:
        ``(labels, probabilities)``: labels as from :func:`predict_volume`; probabilities
        ``(12, X, Y, Z)`` uint8, ``round(255 * softmax)``, before `largest_component`.
    """
    labels, probabilities = _segment(model, volume, params, in_channels, device, amp_dtype, batch_size,
                                     channels_last, probabilities=True)
    return (keep_largest_component(labels) if largest_component else labels), probabilities


def _segment(model, volume: Volume, params: PreprocessParams, in_channels: int, device, amp_dtype,
             batch_size: int, channels_last: bool, probabilities: bool):
    """``(labels (X, Y, Z), probabilities (12, X, Y, Z) or None)``; see :func:`predict_volume`."""
    device = torch.device(device)
    size_x, size_y, num_slices = volume.data.shape
    image = preprocess_image(volume, params, device=device)  # (Z, H, W) uint8
    # Filled in (Z, Y, X) order, returned as (X, Y, Z) views: Fortran order, as NIfTI stores
    # voxels, so each chunk is one contiguous block and writing the file needs no reshuffle.
    labels_zyx = np.empty((num_slices, size_y, size_x), dtype=np.uint8)
    probabilities_czyx = (np.empty((NUM_CLASSES, num_slices, size_y, size_x), dtype=np.uint8)
                          if probabilities else None)
    restore_slices = max(1, RESTORE_CHUNK_BYTES // (NUM_CLASSES * size_x * size_y * 4))
    with _inference(model, device, channels_last) as model:
        batches = _logits_in_batches(model, image, 255.0, device, amp_dtype, batch_size, channels_last,
                                     in_channels)
        for start, logits in batches:
            for offset in range(0, len(logits), restore_slices):
                chunk = logits[offset:offset + restore_slices]
                first, stop = start + offset, start + offset + len(chunk)
                # (n, 12, H, W) -> (n, 12, X, Y); channels_last makes the argmax over classes contiguous
                restored = restore_in_plane(chunk, (size_x, size_y), volume.spacing[:2], params)
                restored = restored.contiguous(memory_format=torch.channels_last)
                # (n, X, Y) -> (n, Y, X)
                chunk_labels = restored.argmax(1).to(torch.uint8).transpose(1, 2)
                labels_zyx[first:stop] = chunk_labels.contiguous().cpu().numpy()
                if probabilities_czyx is not None:
                    scaled = restored.softmax(1).mul_(255).round_().to(torch.uint8)
                    # (n, 12, X, Y) -> (12, n, Y, X)
                    probabilities_czyx[:, first:stop] = scaled.permute(1, 0, 3, 2).contiguous().cpu().numpy()
    labels = labels_zyx.transpose(2, 1, 0)  # (X, Y, Z)
    if probabilities_czyx is None:
        return labels, None
    return labels, probabilities_czyx.transpose(0, 3, 2, 1)  # (12, X, Y, Z)


@contextlib.contextmanager
def _inference(model: torch.nn.Module, device: torch.device, channels_last: bool):
    """The model on `device` in eval mode under ``torch.inference_mode()``; restores ``.training``."""
    was_training = model.training
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def _logits_in_batches(model, image: torch.Tensor, scale: float, device: torch.device,
                       amp_dtype: torch.dtype | None, batch_size: int, channels_last: bool,
                       in_channels: int | None = None):
    """Yield ``(first slice, logits (n, classes, H, W) float32)`` for ``image`` ``(Z, H, W)``.

    The input is ``image / scale`` with `in_channels` neighbouring slices stacked (default: the
    model's ``in_channels``, else 1).
    """
    in_channels = in_channels or getattr(model, "in_channels", 1)
    if in_channels < 1 or in_channels % 2 == 0:
        raise ValueError(f"in_channels must be odd and >= 1 (slices centred on the slice), got {in_channels}")
    if device.type == "cpu":
        batch_size = min(batch_size, CPU_MAX_BATCH)
    num_slices = image.shape[0]
    offsets = torch.arange(-(in_channels // 2), in_channels // 2 + 1, device=image.device)
    autocast = autocast_context(device, amp_dtype)
    for start in range(0, num_slices, batch_size):
        slices = torch.arange(start, min(start + batch_size, num_slices), device=image.device)
        channels = (slices[:, None] + offsets).clamp_(0, num_slices - 1)  # (n, C) edges repeated
        batch = image[channels].to(torch.float32).div_(scale)  # (n, C, H, W) in [0, 1]
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(batch)
        yield start, logits.float()


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Per organ, keep the largest 3D connected component (the two largest for femur head and
    kidney, which come in pairs); the rest becomes background.

    Components are 26-connected. Each organ is labelled only inside its bounding box.

    Args:
        labels: ``(X, Y, Z)`` uint8 class ids.

    Returns:
        A new ``(X, Y, Z)`` uint8 array.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    structure = np.ones((3, 3, 3), dtype=bool)
    boxes = scipy.ndimage.find_objects(out, max_label=NUM_CLASSES - 1)  # boxes[c - 1] for class c
    for organ_id, box in enumerate(boxes, start=1):
        if box is None:
            continue
        region = out[box]  # a view: edits land in out
        components, count = scipy.ndimage.label(region == organ_id, structure=structure)
        keep = 2 if ORGANS[organ_id] in PAIRED_ORGANS else 1
        if count <= keep:
            continue
        sizes = np.bincount(components.ravel())[1:]  # component k has size sizes[k - 1]
        kept = np.zeros(count + 1, dtype=bool)
        kept[np.argsort(sizes)[::-1][:keep] + 1] = True
        region[(components > 0) & ~kept[components]] = 0
    return out


# --------------------------------------------------------------------------- files

def predict_files(checkpoint, inputs, out_dir, device="auto", batch_size: int = 32,
                  save_probabilities: bool = False, largest_component: bool = False, fold_bn: bool = True,
                  progress: bool = True, formats=("nifti",), statistics: bool = False,
                  precision: str = "auto", overwrite: bool = False) -> dict:
    """Predict every CT in `inputs` (a file, a folder, a DICOM series folder or a folder of them) into `out_dir`.

    Writes ``OUT/<case_id>.nii.gz`` (uint8, the input's exact shape and affine), optionally
    ``OUT/<case_id>_probabilities.nii.gz``, and the label files of
    :func:`write_label_descriptions`. Reading the next file and writing the previous one run
    in background threads while the model works. `out_dir` is claimed as a ``predict`` output
    folder (``utils.output_folder``): new, empty or an earlier prediction's, never an input
    folder, inside one or around one; every file is written atomically, and a file an earlier
    run wrote is replaced only with `overwrite` (a file abdoseg did not write, never). Any error
    in one case (an unreadable CT, a volume too large for memory) is reported with its file, and
    the rest completes.

    Args:
        checkpoint: a checkpoint from training; its config and preprocessing rebuild the model.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``.
        fold_bn: fold BatchNorm into the convolutions (same outputs, faster).
        formats: of ``predict_io.FORMATS``; ``dicom-seg``/``rtstruct`` need DICOM input.
        statistics: also write ``<case_id>_statistics.json``. An `out_dir` ending in ``.nii.gz``
            names a single case's label file (no label description files then).
        precision: auto | fp32 | bf16 | int8 (``training.quantize.prediction_model``).
        overwrite: replace files an earlier ``predict`` run wrote in `out_dir` (or, for a
            ``.nii.gz`` `out_dir`, the named file if it exists).

    Returns:
        ``{"written": [label files], "probabilities", "seg", "rtstruct", "statistics": [files],
        "failed": [{"file", "error"}], "seconds": wall time, "precision": what ran}``.

    Raises:
        UserError: `inputs` missing or empty, `out_dir` refused (``utils.output_folder``), a bad `batch_size`.
        training.checkpoint.CheckpointError: an unusable checkpoint.
    """
    started = time.perf_counter()
    check_positive(batch_size, "batch_size", integer=True)
    files = input_cases(inputs, PredictError)
    formats = check_formats(formats, files, PredictError)
    out_dir, single_stem = output_place(Path(out_dir), files, PredictError)
    summary = {"written": [], "probabilities": [], "seg": [], "rtstruct": [], "statistics": [], "failed": []}
    seen: dict[str, Path] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        pending_read = reader.submit(read_case_or_error, files[0])  # read while the model loads
        pending_write = None
        device = select_device(device)
        model, cfg, params = model_from_checkpoint(load_checkpoint(checkpoint))
        model = (fold_batchnorm(model) if fold_bn else model).to(device)
        model, amp_dtype, summary["precision"], channels_last = prediction_model(model, cfg, params, device, precision)
        out = _claim_output(out_dir, single_stem, [inputs, checkpoint], overwrite)  # after the checkpoint loaded
        settings = (params, cfg.in_channels, device, amp_dtype, batch_size, channels_last, largest_component)
        for i, path in enumerate(tqdm(files, desc="predict", unit="case", disable=not progress)):
            (volume, headers), error = pending_read.result()
            if i + 1 < len(files):
                pending_read = reader.submit(read_case_or_error, files[i + 1])
            case_id = single_stem or case_name(path)
            if error is None and case_id in seen:
                error = f"{path}: case id {case_id} already predicted from {seen[case_id]}; skipped"
            if error is not None:
                summary["failed"].append({"file": str(path), "error": error})
                continue
            seen[case_id] = path
            try:  # one case's failure (out of memory, a bug) is reported; the rest completes
                labels, probabilities = _segment_case(model, volume, settings, save_probabilities)
            except Exception as err:  # noqa: BLE001 (the per-case guard); MemoryError too
                summary["failed"].append({"file": str(path), "error": f"{path}: {one_line_reason(err)}"})
                continue
            collect_written(pending_write, summary)  # at most one volume waits to be written
            extras = (headers, formats, statistics, out, overwrite)
            pending_write = writer.submit(write_case, labels, probabilities, volume, out_dir / case_id, *extras)
        collect_written(pending_write, summary)
        if out is not None:
            out.close()
    summary["seconds"] = time.perf_counter() - started
    return summary


def _claim_output(out_dir: Path, single_stem: str | None, inputs: list, overwrite: bool):
    """The :class:`OutputFolder` for a folder `out_dir`; None for a file the user named (``x.nii.gz``),
    which goes where it is named."""
    if single_stem is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return None
    out = claim_output_folder(out_dir, "predict", inputs=inputs, overwrite=overwrite)
    write_label_descriptions(out)
    return out


def _segment_case(model, volume: Volume, settings: tuple, save_probabilities: bool):
    """``(labels, probabilities or None)`` of one volume."""
    if save_probabilities:
        return predict_volume_with_probabilities(model, volume, *settings)
    return predict_volume(model, volume, *settings), None
