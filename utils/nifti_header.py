"""Checks of a NIfTI header against its file, made before any voxel is read (used by ``volume_io``).

Each check takes what nibabel parsed from the header and raises :class:`NiftiError` (a
``UserError``) with one line naming the file; the rules are listed in ``utils/volume_io.py``.
The point is that a lying header (a 1 kB file claiming 1.5 GB, a gzip bomb, a singular affine,
an RGB datatype) is refused with a clear reason instead of an allocation or a deep nibabel error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.errors import UserError

MAX_COMPRESSION_RATIO = 1100  # above deflate's 1032:1, so only a header that lies exceeds it
MAX_VOXEL_BYTES = 8 * 1024**3  # no CT abdoseg reads needs more than 8 GiB of voxel data
MAX_AFFINE_CONDITION = 1e6  # voxel axes this far from independent are a broken header, not a scan
SPATIAL_UNITS_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}  # xyzt_units & 7: unknown, m, mm, micron
VOXEL_MM_RANGE = (1e-3, 1e3)  # a voxel edge outside this is a wrong unit or a broken header

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")  # nibabel decompresses these by name


class NiftiError(UserError):
    """Bad input file. ``str(err)`` is one line: ``'<path>: <what is wrong>'``."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


def checked_shape(path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape, refusing several volumes, empty axes, 2D images and single slices."""
    extra = math.prod(shape[3:])
    if 0 in shape:
        raise NiftiError(path, f"shape {shape} has an empty axis: the file holds no voxels")
    if len(shape) > 3 and extra > 1:
        raise NiftiError(path, f"{len(shape)}D image with {extra} volumes; abdoseg needs one 3D CT volume")
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise NiftiError(path, f"shape {shape} is a 2D image or a single slice; abdoseg needs a 3D volume "
                               "with at least 2 voxels along each axis")
    return tuple(int(s) for s in shape[:3])


def checked_dtype(path, header) -> np.dtype:
    """The on-disk dtype; one integer or float value per voxel (no RGB, complex, structured)."""
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        name = header.get_value_label("datatype")
        raise NiftiError(path, f"datatype {name} ({dtype}) is not supported: abdoseg reads one integer "
                               "or float value per voxel")
    return dtype


def check_size(path, data_offset: int, shape: tuple[int, int, int], dtype: np.dtype) -> None:
    """Refuse a header implying more voxel bytes than the file can hold (before anything is read).

    Args:
        data_offset: where the voxels start (``img.dataobj.offset``: the header copy that
            nibabel keeps on the image reports 0).
    """
    needed = math.prod(shape) * dtype.itemsize  # Python integers: no overflow on absurd dims
    offset = int(data_offset)
    file_size = os.path.getsize(path)
    if needed > MAX_VOXEL_BYTES:
        raise NiftiError(path, f"header implies {size_text(needed)} of voxel data (shape {shape}, {dtype}); "
                               f"abdoseg reads at most {size_text(MAX_VOXEL_BYTES)}")
    if Path(path).suffix.lower() in _COMPRESSED_SUFFIXES:
        if offset + needed > MAX_COMPRESSION_RATIO * file_size:
            raise NiftiError(path, f"header implies {size_text(needed)} of voxel data (shape {shape}, {dtype}), "
                                   f"more than a {size_text(file_size)} compressed file can hold: truncated, "
                                   "or the header is wrong")
    elif needed > file_size - offset:
        raise NiftiError(path, f"header implies {size_text(needed)} of voxel data (shape {shape}, {dtype}) "
                               f"after byte {offset}, but the file holds {size_text(max(file_size - offset, 0))}"
                               ": truncated, or the header is wrong")


def checked_affine_mm(path, header, affine: np.ndarray) -> np.ndarray:
    """The voxel-to-world affine in mm; refuses unknown units, NaN/inf and singular axes."""
    unit_code = int(header["xyzt_units"]) & 0x07
    if unit_code not in SPATIAL_UNITS_MM:
        raise NiftiError(path, f"xyzt_units has spatial unit code {unit_code}, which NIfTI does not "
                               "define (0 unknown, 1 meter, 2 mm, 3 micron)")
    affine = np.array(affine, dtype=np.float64)
    affine[:3] *= SPATIAL_UNITS_MM[unit_code]
    origin = ("sform" if int(header["sform_code"]) > 0 else "qform" if int(header["qform_code"]) > 0
              else "pixdim")
    if not np.isfinite(affine).all():
        raise NiftiError(path, f"the affine (from the {origin}) holds NaN or inf")
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.linalg.cond(affine[:3, :3]) < MAX_AFFINE_CONDITION:
        raise NiftiError(path, f"the affine (from the {origin}) is singular: voxel axes of "
                               f"{np.round(voxel_mm, 6).tolist()} mm that do not span 3D space")
    if not ((voxel_mm >= VOXEL_MM_RANGE[0]) & (voxel_mm <= VOXEL_MM_RANGE[1])).all():
        raise NiftiError(path, f"voxel size {np.round(voxel_mm, 6).tolist()} mm (from the {origin}) is outside "
                               f"{VOXEL_MM_RANGE[0]:g}..{VOXEL_MM_RANGE[1]:g} mm: a wrong unit or header")
    return affine


def checked_scaling(path, img: nib.Nifti1Image) -> tuple[float, float]:
    """``(slope, inter)`` of the voxel values, as nibabel reads ``scl_slope``/``scl_inter``.

    A slope of 0 or not finite means no scaling (the NIfTI rule; nibabel writes NaN); a finite
    slope with a non-finite intercept was refused when the file was opened.
    """
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if not (abs(slope) <= _FLOAT32_MAX and abs(inter) <= _FLOAT32_MAX):  # also False for inf, NaN
        raise NiftiError(path, f"scl_slope {slope:g} and scl_inter {inter:g} cannot scale voxel values "
                               "(beyond float32)")
    return slope, inter


def size_text(num_bytes: int) -> str:
    """``1536 -> '1.5 kB'``: a byte count for a message."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes} bytes" if unit == "bytes" else f"{num_bytes:.3g} {unit}"
        num_bytes /= 1024
