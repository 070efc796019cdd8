"""The voxel grid a phantom is drawn on, and shape fields evaluated in boxes of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.phantom.shapes import Blob, as_float32

AIR_HU = -1000.0
# Tissue zones of the body wall; organs are drawn only in the cavity.
OUTSIDE, SUBCUTIS, WALL, CAVITY, LUNG, MEDIASTINUM = range(6)


@dataclass(frozen=True)
class Region:
    """A box of the canvas: its index (3 slices) and the voxel centres along each axis (mm)."""

    index: tuple
    x: np.ndarray  # (nx,)
    y: np.ndarray  # (ny,)
    z: np.ndarray  # (nz,)


@dataclass(frozen=True)
class BlobField:
    region: Region
    level: np.ndarray  # (nx, ny, nz) float32, < 1 inside


@dataclass(frozen=True)
class TubeField:
    region: Region
    distance: np.ndarray  # (nx, ny, nz) float32: min over balls of |p - c_n| / r_n, < 1 inside
    nearest: np.ndarray  # (nx, ny, nz) int32: the ball that is nearest


class Canvas:
    """The volume being drawn: HU (float32), labels, tissue zones, and voxel centres in mm.

    Arrays are (X, Y, Z) in Fortran order, so an axial slice ``[:, :, k]`` is contiguous.
    Coordinates are relative to the body centre: x toward the patient's right, y anterior,
    z from the bottom of the covered anatomy.
    """

    def __init__(self, body, size: int, num_slices: int | None):
        """``body``: the case's :class:`utils.phantom.anatomy.BodyShape`."""
        pixel = body.spacing_at_512 * 512 / size
        depth = num_slices if num_slices is not None else int(round(body.length / body.slice_thickness)) + 1
        slice_spacing = body.length / (depth - 1)
        self.shape = (size, size, depth)
        self.spacing = (float(pixel), float(pixel), float(slice_spacing))
        centered = (np.arange(size) - (size - 1) / 2) * pixel
        self.x = (centered - body.center_offset[0]).astype(np.float32)
        self.y = (centered - body.center_offset[1]).astype(np.float32)
        self.z = (np.arange(depth) * slice_spacing).astype(np.float32)
        self.affine = np.diag([pixel, pixel, slice_spacing, 1.0])
        self.affine[:3, 3] = [centered[0], centered[0], body.origin_z]
        self.hu = np.full(self.shape, AIR_HU, np.float32, order="F")
        self.labels = np.zeros(self.shape, np.uint8, order="F")
        self.zone = np.zeros(self.shape, np.uint8, order="F")

    def box(self, low, high) -> Region | None:
        """The voxels with centres in [low, high] (each (3,) mm), or None if there are none."""
        bounds = []
        for axis, axis_low, axis_high in zip((self.x, self.y, self.z), low, high):
            first, stop = int(np.searchsorted(axis, axis_low)), int(np.searchsorted(axis, axis_high, side="right"))
            if stop <= first:
                return None
            bounds.append((first, stop))
        index = tuple(slice(first, stop) for first, stop in bounds)
        return Region(index, self.x[index[0]], self.y[index[1]], self.z[index[2]])


def blob_field(blob: Blob, x, y, z) -> np.ndarray:
    """Implicit value of ``blob`` on the grid x (nx,), y (ny,), z (nz,): (nx, ny, nz) float32, < 1 inside."""
    offsets = (x - np.float32(blob.center[0]), y - np.float32(blob.center[1]), z - np.float32(blob.center[2]))
    level = None
    for axis in range(3):
        weights = blob.axes[:, axis] / blob.radii[axis]
        local = as_float32(weights[0] * offsets[0])[:, None, None] + as_float32(weights[1] * offsets[1])[None, :, None]
        local = local + as_float32(weights[2] * offsets[2])[None, None, :]  # (nx, ny, nz) along local axis
        np.square(local, out=local)
        level = local if level is None else np.add(level, local, out=level)
    np.sqrt(level, out=level)
    for amplitude, frequency, phase in zip(blob.bump_amp, blob.bump_freq, blob.bump_phase):
        plane = (as_float32(amplitude * np.sin(frequency[0] * offsets[0] + phase[0]))[:, None, None]
                 * as_float32(np.sin(frequency[1] * offsets[1] + phase[1]))[None, :, None])
        level += plane * as_float32(np.sin(frequency[2] * offsets[2] + phase[2]))[None, None, :]
    return level


def blobs_field(canvas: Canvas, blobs) -> BlobField | None:
    """Union (minimum) of several blobs over their joint bounding box."""
    low = np.min([blob.bounds()[0] for blob in blobs], axis=0)
    high = np.max([blob.bounds()[1] for blob in blobs], axis=0)
    region = canvas.box(low, high)
    if region is None:
        return None
    level = np.full((len(region.x), len(region.y), len(region.z)), np.inf, np.float32)
    for blob in blobs:
        inner = canvas.box(*blob.bounds())
        if inner is None:
            continue
        sub = tuple(slice(part.start - outer.start, part.stop - outer.start)
                    for part, outer in zip(inner.index, region.index))
        np.minimum(level[sub], blob_field(blob, inner.x, inner.y, inner.z), out=level[sub])
    return BlobField(region, level)


def tube_field(canvas: Canvas, points, radii) -> TubeField | None:
    """Balls along a centreline (points (N, 3), radii (N,) mm) over their bounding box."""
    region = canvas.box((points - radii[:, None]).min(axis=0), (points + radii[:, None]).max(axis=0))
    if region is None:
        return None
    x, y, z = region.x, region.y, region.z
    distance = np.full((len(x), len(y), len(z)), np.inf, np.float32)
    nearest = np.zeros(distance.shape, np.int32)
    for ball, (center, radius) in enumerate(zip(points, radii)):
        ranges = []
        for axis, axis_center in zip((x, y, z), center):
            ranges.append((int(np.searchsorted(axis, axis_center - radius)),
                           int(np.searchsorted(axis, axis_center + radius, side="right"))))
        if any(stop <= first for first, stop in ranges):
            continue
        (x0, x1), (y0, y1), (z0, z1) = ranges
        inverse = 1.0 / radius
        squared = (as_float32(((x[x0:x1] - center[0]) * inverse) ** 2)[:, None, None]
                   + as_float32(((y[y0:y1] - center[1]) * inverse) ** 2)[None, :, None])
        squared = squared + as_float32(((z[z0:z1] - center[2]) * inverse) ** 2)[None, None, :]
        current = distance[x0:x1, y0:y1, z0:z1]
        better = squared < current
        current[better] = squared[better]
        nearest[x0:x1, y0:y1, z0:z1][better] = ball
    np.sqrt(distance, out=distance)
    return TubeField(region, distance, nearest)
