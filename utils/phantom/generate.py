"""One phantom case: draw the anatomy, paint it on the voxel grid, form the image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.phantom.anatomy import sample_anatomy
from utils.phantom.body_wall import draw_body
from utils.phantom.canvas import Canvas
from utils.phantom.intensity import finish_image
from utils.phantom.organs import draw_organs
from utils.phantom.skeleton import draw_vessels_muscles_bones, femur_below_head


@dataclass(frozen=True)
class Phantom:
    """One synthetic case.

    Attributes:
        hu: (X, Y, Z) int16 HU, RAS+ voxel axes (x toward the patient's right, y anterior,
            z superior).
        labels: (X, Y, Z) uint8, our 12-class ids (utils.labels.ORGANS), the full truth.
        left: (X, Y, Z) bool, True on the patient's left (x left of the midline); splits the
            paired kidneys and femurs for the ``pku`` and ``totalseg`` layouts.
        affine: (4, 4) RAS affine, ``diag(sx, sy, sz)`` plus the origin.
        spacing: (sx, sy, sz) in mm.
        femur_shaft: (X, Y, Z) bool, the femurs' trochanters and shafts (label 0 in ``labels``,
            whose femur label is the head and neck); the ``totalseg`` layout labels them femur.
    """

    hu: np.ndarray
    labels: np.ndarray
    left: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    femur_shaft: np.ndarray


def make_phantom(seed: int, case_index: int = 0, size: int = 512, num_slices: int | None = None) -> Phantom:
    """Draw one synthetic abdominal CT case, deterministic in ``(seed, case_index)``.

    Args:
        seed: dataset seed.
        case_index: case number within the dataset.
        size: in-plane voxels; the field of view is fixed per case (0.6-0.9 mm at 512), so a
            smaller size means larger voxels of the same body.
        num_slices: number of axial slices; default from the case's slice thickness (2.5-5 mm).
            The slices always span the same anatomy (350-450 mm, femur heads to lung bases).

    Returns:
        A :class:`Phantom` of shape ``(size, size, Z)``.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if num_slices is not None and num_slices < 2:
        raise ValueError(f"num_slices must be at least 2, got {num_slices}")
    rng = np.random.default_rng([seed, case_index])
    anatomy = sample_anatomy(rng)
    canvas = Canvas(anatomy.body, size, num_slices)
    draw_body(canvas, anatomy)
    draw_organs(canvas, anatomy)
    draw_vessels_muscles_bones(canvas, anatomy)
    femur_shaft = femur_below_head(canvas, anatomy)  # no random draws: the image below is unchanged
    hu = finish_image(canvas, anatomy.noise, rng)
    left = np.empty(canvas.shape, dtype=bool, order="F")
    left[...] = (canvas.x < 0)[:, None, None]  # patient's left: x below the midline in RAS
    return Phantom(hu=hu, labels=canvas.labels, left=left, affine=canvas.affine, spacing=canvas.spacing,
                   femur_shaft=femur_shaft)
