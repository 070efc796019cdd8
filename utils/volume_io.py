"""Read and write NIfTI volumes: the only module that touches ``.nii`` / ``.nii.gz`` files.

Pure numpy + nibabel (no torch). Every array handed to the rest of abdoseg is in
*closest-canonical RAS+* orientation (``nib.as_closest_canonical`` semantics: axis permutations
and flips only, never resampling), shape ``(X, Y, Z)``, so axial slices are ``data[:, :, z]``.
Predictions go back to the file's own axis order and affine with :func:`to_original` /
:func:`save_labels`.

Decisions (what the loader does with awkward files):

* **Intensities.** Raw integers are read and ``scl_slope``/``scl_inter`` applied without ever
  making float64: integer data whose scaling maps integers to integers exactly (identity,
  ``uint16`` with ``inter=-1024``, ...) becomes ``int16`` HU when it fits, anything else
  (non-integral slope, float files, integers out of int16 range) becomes ``float32``.
* **Shape.** A trailing singleton 4th axis is dropped; more than one volume is refused. A volume
  must have at least 2 voxels along each of its 3 spatial axes: 2D images and single-slice
  files are refused (no slice spacing, nothing 3D to preprocess).
* **Not CT** (``check_intensity=True``): refused when all values lie in 0..255 (an 8-bit
  image), when fewer than 0.1% of voxels are below -500 HU (no air: MR, or raw CT without its
  rescale intercept), or when the maximum is below -200 HU (no tissue). NaN/inf voxels are
  refused always.
* **Oblique affines** load with a ``UserWarning``: slices are taken along the nearest voxel axis
  without resampling, and predictions are written back with the exact original affine.
* **No xform codes** (``sform_code == qform_code == 0``) load with a ``UserWarning``: the
  orientation is unknown and assumed from the header's pixdim (nibabel's fallback affine).
  Otherwise nibabel's choice is used: the sform, else the qform. An affine that is not finite,
  is singular (a zero or repeated axis), or has a voxel edge outside 0.001..1000 mm is refused.
* **Units.** Every affine abdoseg hands out is in millimetres: the spatial unit of the header's
  ``xyzt_units`` is honoured (meters x1000, microns x0.001); unit code 0 ("unknown") is read as
  millimetres, as nibabel and ITK do. ``Volume.original_affine`` is the file's affine in mm, and
  predictions are written in mm.
* **Size before reading** (checks in ``utils/nifti_header.py``). Before any voxel is read, the
  bytes the header implies (voxels x bytes per voxel) are checked: an uncompressed ``.nii`` must
  hold them after ``vox_offset``; a compressed file must not imply more than 1100 times its own
  size (deflate cannot compress more than 1032:1, so such a header is a lie), and no file more
  than 8 GiB. nibabel then reads exactly the implied bytes, so neither a lying header nor a gzip
  bomb allocates beyond that bound, and the file is read once.
* **Datatypes.** One integer or float value per voxel; RGB, complex and other structured types are
  refused. ``scl_slope`` 0 or not finite means "no scaling" (the NIfTI rule, as nibabel reads it;
  nibabel writes NaN); a slope or intercept beyond float32, or scaled values that overflow to
  inf, are refused.
* **Masks** hold integer label ids 0..65535 (``utils.labels.MAX_SOURCE_ID``, the range label
  maps may use); negative, fractional or larger values are refused.

Bad input files raise :class:`NiftiError` with a one-line ``'<path>: <what is wrong>'``.
"""

import gzip
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from utils.case_files import is_nifti
from utils.files import atomic_path
from utils.labels import MAX_SOURCE_ID
from utils.nifti_header import (NiftiError, check_size, checked_affine_mm, checked_dtype,
                                 checked_scaling, checked_shape)

AIR_HU = -500.0  # voxels below this count as air (air is ~ -1000 HU, fat ~ -100 HU)
MIN_AIR_FRACTION = 0.001  # abdominal CT has air outside the body, in bowel and lung bases
MIN_MAX_HU = -200.0  # a CT of a body contains tissue above this
OBLIQUE_TOLERANCE_DEG = 0.1  # below this an axis tilt is rounding noise, not an oblique scan
MASK_GRID_ATOL_MM = 1e-3

_INT16 = np.iinfo(np.int16)
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


@dataclass
class Volume:
    """A CT volume in closest-canonical RAS+ orientation, with what is needed to write back.

    Attributes:
        data: ``(X, Y, Z)`` HU, int16 or float32 (see module docstring); axial slices ``data[:, :, z]``.
        spacing: voxel size in mm along the canonical axes X, Y, Z.
        affine: ``(4, 4)`` voxel-to-world (RAS mm) affine of ``data``.
        original_affine: ``(4, 4)`` affine of the file as written on disk.
        original_shape: the file's 3D shape, in its own axis order.
        path: the file it came from.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    path: str


def load_ct(path, check_intensity: bool = True) -> Volume:
    """Load a CT volume, reoriented to closest-canonical RAS+.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2), 3D or 4D with one volume.
        check_intensity: refuse images whose values do not look like CT in HU.

    Returns:
        A :class:`Volume`; ``data`` is ``(X, Y, Z)`` int16 HU, or float32 when the file's
        scaling is not integral or the file stores floats; affines and spacing in mm.

    Raises:
        NiftiError: missing, unreadable, truncated, a header that does not fit the file, an
            unsupported datatype or scaling, a singular affine, not 3D, NaN/inf voxels, or not CT.
    """
    contents = _read_nifti(path)
    hu = scale_to_hu(contents.raw, contents.slope, contents.inter)
    check_finite(path, hu, contents.slope, contents.inter)
    if check_intensity:
        check_ct_intensities(path, hu, contents.disk_dtype)
    _warn_about_orientation(path, contents.header, contents.affine)
    data, affine = to_canonical(hu, contents.affine)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(data=data, spacing=spacing, affine=affine, original_affine=contents.affine.copy(),
                  original_shape=tuple(int(s) for s in contents.raw.shape), path=str(path))


def load_mask(path, reference: Volume) -> np.ndarray:
    """Load a label map on the same grid as ``reference``, in the same canonical orientation.

    The grid is compared after canonical reorientation (in mm), so a mask stored with another
    axis order or spatial unit than its image (same world grid) is accepted.

    Returns:
        ``(X, Y, Z)`` integer labels like ``reference.data``: uint8 when the labels fit, else int32.

    Raises:
        NiftiError: what :func:`load_ct` refuses for the file itself, a different grid, NaN/inf,
            negative or non-integer values, or values above ``MAX_SOURCE_ID`` (65535).
    """
    contents = _read_nifti(path)
    labels = _apply_scaling(contents.raw, contents.slope, contents.inter)
    check_finite(path, labels, contents.slope, contents.inter)
    labels, affine = to_canonical(labels, contents.affine)
    affine_difference = float(np.abs(affine - reference.affine).max())
    if labels.shape != reference.data.shape or affine_difference > MASK_GRID_ATOL_MM:
        raise NiftiError(path, f"mask grid differs from its image {reference.path}: canonical shape "
                               f"{labels.shape} vs {reference.data.shape}, max affine difference "
                               f"{affine_difference:.4g} mm")
    if labels.dtype.kind == "f":
        fractional = labels != np.round(labels)
        if fractional.any():
            raise NiftiError(path, f"label map holds non-integer values (e.g. {labels[fractional][0]:g}); "
                                   "labels must be integer class ids")
    low, high = labels.min(), labels.max()
    if low < 0:
        raise NiftiError(path, f"label map holds negative values (min {low:g}); labels must be >= 0")
    if high > MAX_SOURCE_ID:
        raise NiftiError(path, f"label map holds values up to {high:g}; label ids are 0..{MAX_SOURCE_ID}")
    return labels.astype(np.uint8 if high <= 255 else np.int32, copy=False)


def to_original(array: np.ndarray, reference: Volume) -> np.ndarray:
    """Canonical ``(X, Y, Z[, ...])`` -> the file's own axis order and flips ``(I, J, K[, ...])``.

    The exact inverse of the reorientation done by :func:`load_ct`; trailing axes (e.g.
    class probabilities) are carried along. Returns a view when possible.
    """
    ornt = nib.orientations.io_orientation(reference.original_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.orientations.apply_orientation(array, back)


def save_labels(labels: np.ndarray, reference: Volume, path) -> None:
    """Write canonical ``(X, Y, Z)`` labels in the reference file's own grid, as uint8.

    The file gets ``reference.original_shape`` and exactly ``reference.original_affine`` (sform
    and qform, codes 1), so viewers overlay it on the input. Written atomically; ``.nii`` or
    ``.nii.gz`` by the suffix of ``path``.
    """
    labels = np.asarray(labels)
    if labels.shape != reference.data.shape:
        raise ValueError(f"labels shape {labels.shape} != reference canonical shape {reference.data.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, which does not fit uint8")
    save_volume(to_original(labels, reference).astype(np.uint8), reference.original_affine, path)


def save_volume(array, affine, path, dtype=None) -> None:
    """Write ``array`` as given (no reorientation) to a NIfTI-1 file, atomically.

    Args:
        array: ``(I, J, K[, ...])`` voxels in the order of ``affine``; bool is stored as uint8.
        affine: ``(4, 4)`` voxel-to-world affine, stored as sform and qform (codes 1).
        path: ends with ``.nii`` or ``.nii.gz`` (gzip-compressed).
        dtype: on-disk dtype; the array is cast with numpy ``astype`` (no scaling).
            Default: the array's own dtype.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: NIfTI path must end with .nii or .nii.gz")
    array = np.asarray(array)
    if dtype is None:
        dtype = np.uint8 if array.dtype == bool else array.dtype  # NIfTI has no bool type
    array = array.astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine, dtype=array.dtype)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    compress = path.name.lower().endswith(".gz")
    # nibabel picks the format from the name; the stream is ours, so the temporary name cannot mislead it
    with atomic_path(path) as temporary, open(temporary, "xb") as handle:
        if compress:  # level 1 and no name or time in the header, as nibabel writes .nii.gz
            with gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=1, mtime=0) as stream:
                img.to_stream(stream)
        else:
            img.to_stream(handle)


@dataclass
class _NiftiContents:
    """A checked file: raw voxels ``(I, J, K)`` in file order, and what the header says about them."""

    raw: np.ndarray
    affine: np.ndarray  # (4, 4) voxel-to-world, mm
    slope: float
    inter: float
    disk_dtype: np.dtype
    header: nib.Nifti1Header


def _read_nifti(path) -> _NiftiContents:
    """Open a NIfTI file, check its header against the file, then read its raw (unscaled) voxels."""
    if not os.path.isfile(path):
        raise NiftiError(path, "file not found" if not os.path.exists(path) else "not a file")
    try:
        img = nib.load(path, mmap=False)  # reads the header only; mmap=False: voxels read once below
    except _READ_ERRORS as err:
        raise NiftiError(path, f"not a readable NIfTI file ({_first_line(err)})") from err
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise NiftiError(path, f"is a {type(img).__name__}, not a NIfTI image")
    shape = checked_shape(path, img.shape)
    disk_dtype = checked_dtype(path, img.header)
    check_size(path, img.dataobj.offset, shape, disk_dtype)
    affine = checked_affine_mm(path, img.header, img.affine)
    slope, inter = checked_scaling(path, img)
    try:
        # Read inside the try: a truncated or corrupt gzip only fails when the data is read.
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except _READ_ERRORS as err:
        raise NiftiError(path, f"voxel data unreadable, truncated or corrupt ({_first_line(err)})") from err
    return _NiftiContents(raw.reshape(shape), affine, slope, inter, disk_dtype, img.header)


def _apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``raw * slope + inter`` without float64: integers stay integers when the scaling is integral.

    Returns an integer array (int16 when the values fit, else int32/int64) or float32 (also
    when integral scaling would overflow int64; values beyond float32 become inf).
    """
    if raw.dtype.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        out = _apply_integer_scaling(raw, int(slope), int(inter))
        if out is not None:
            return out
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused by the caller
        out = raw.astype(np.float32)  # float32 first: int32 * float32 would promote to float64
        if slope != 1:
            out *= np.float32(slope)
        if inter != 0:
            out += np.float32(inter)
    return out


def _apply_integer_scaling(raw: np.ndarray, slope: int, inter: int) -> np.ndarray | None:
    """Integer ``raw * slope + inter`` in the narrowest of int16/32/64 that holds it, else None."""
    raw_low, raw_high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
    out_low, out_high = sorted((raw_low * slope + inter, raw_high * slope + inter))
    low = min(raw_low, out_low, -abs(slope), -abs(inter))  # slope, inter must fit too
    high = max(raw_high, out_high, abs(slope), abs(inter))
    work = next((t for t in (np.int16, np.int32, np.int64)
                 if np.iinfo(t).min <= low and high <= np.iinfo(t).max), None)
    if work is None:
        return None
    out = raw.astype(work, copy=False)  # no copy for native int16 on disk
    if slope != 1 or inter != 0:
        out = out * work(slope)  # a new array: the raw buffer may be read-only
        out += work(inter)
    if out_low >= _INT16.min and out_high <= _INT16.max:
        out = out.astype(np.int16, copy=False)
    return out


def scale_to_hu(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """HU as int16 when exact, else float32 (never wider integers: float32 holds them exactly)."""
    hu = _apply_scaling(raw, slope, inter)
    return hu if hu.dtype in (np.int16, np.float32) else hu.astype(np.float32)


def check_finite(path, array: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> None:
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            scaled = f" after scl_slope {slope:g}, scl_inter {inter:g}" if (slope, inter) != (1, 0) else ""
            raise NiftiError(path, f"{bad} of {array.size} voxels are NaN or inf{scaled}")


def check_ct_intensities(path, hu: np.ndarray, disk_dtype: np.dtype) -> None:
    """Refuse values that cannot be CT in HU (thresholds in the module docstring)."""
    low, high = float(hu.min()), float(hu.max())
    stored = f"stored as {disk_dtype}"
    if low >= 0 and high <= 255:
        raise NiftiError(path, f"values span {low:g}..{high:g}, which looks like an 8-bit image, "
                               f"not CT in HU ({stored})")
    air = int(np.count_nonzero(hu < AIR_HU))
    if air < max(1, MIN_AIR_FRACTION * hu.size):
        raise NiftiError(path, f"only {air} of {hu.size} voxels are below {AIR_HU:g} HU (values span "
                               f"{low:g}..{high:g}, {stored}): no air, so not CT in HU (an MR image, "
                               "or CT without its rescale intercept?)")
    if high < MIN_MAX_HU:
        raise NiftiError(path, f"maximum is {high:g} HU: no tissue above {MIN_MAX_HU:g} HU, so not CT in HU")


def _warn_about_orientation(path, header, affine: np.ndarray) -> None:
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        warnings.warn(f"{path}: no orientation in the header (sform_code = qform_code = 0); orientation "
                      "is unknown and assumed from pixdim (nibabel's default affine)", UserWarning,
                      stacklevel=3)
    tilt = float(np.degrees(nib.affines.obliquity(affine)).max())
    if tilt > OBLIQUE_TOLERANCE_DEG:
        warnings.warn(f"{path}: the volume is oblique ({tilt:.1f} degrees off the world axes); slices "
                      "are taken along the nearest voxel axis without resampling, and predictions keep "
                      "the original affine", UserWarning, stacklevel=3)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """File-order ``(I, J, K)`` -> closest-canonical RAS+ ``(X, Y, Z)`` and its affine.

    Same as ``nib.as_closest_canonical``; the result is Fortran-ordered, as NIfTI stores it,
    so each axial slice ``[:, :, z]`` is one contiguous block and no stride is negative (torch
    cannot take those). It is copied only when the file is not already RAS+; a C-order copy
    would gather every voxel across slices and cost more than reading the file.
    """
    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(array, ornt)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return np.asfortranarray(canonical), canonical_affine


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
