"""Slice geometry shared by training data and prediction: pure functions, no files.

Per axial slice: HU window -> resize to the target size -> uint8 for images; labels by nearest
neighbour on the same grid; a boundary-distance map of the labels. :func:`restore_in_plane` is
the exact inverse of the image path, used by prediction to map logits back onto the volume.

Geometry (``PreprocessParams.spacing``):
    ``None``    the original project's plain resize of the whole ``(X, Y)`` slice to
                ``target_size`` (aspect ratio and pixel size change from case to case).
    ``s`` (mm)  resample in-plane to ``s`` mm/pixel, then centre crop/pad to ``target_size``
                (image padded with 0 = the bottom of the window, labels with background).
Slices keep the canonical axis order: output rows follow X (R), columns follow Y (A).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.volume_io import Volume

MAX_DISTANCE = 255  # uint8 cap: "far from any boundary"


class PreprocessError(UserError):
    """Unusable preprocessing parameters, input folder or output folder; the message names it."""


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
