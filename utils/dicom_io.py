"""Read a DICOM CT series (one folder) into the same :class:`~utils.volume_io.Volume` as a NIfTI file.

pydicom reads the files; compressed transfer syntaxes (JPEG 2000, JPEG lossless, JPEG-LS, RLE)
are decoded by the pylibjpeg plugins that the ``[dicom]`` extra installs. The result follows
``utils.volume_io`` exactly: ``data`` is ``(X, Y, Z)`` HU in closest-canonical RAS+ (int16 when
the rescale is integral, else float32), ``affine`` maps those voxels to RAS mm, and
``original_affine`` / ``original_shape`` describe the series' own voxel order, so
``volume_io.save_labels`` writes a label NIfTI on the same grid that dcm2niix or dicom2nifti
would write for the series (after reorientation, the same voxels and affine).

Decisions:

* **Slice order** is by position along the slice normal (``ImagePositionPatient`` projected on
  row x column cosines), never by file name or InstanceNumber.
* **Spacing** in-plane from ``PixelSpacing``; between slices from the positions (not
  ``SliceThickness`` or ``SpacingBetweenSlices``, which scanners fill inconsistently).
* **Orientation** from ``ImageOrientationPatient``; DICOM's patient frame is LPS, so x and y
  change sign for RAS.
* **Refused** with one line naming the folder: no DICOM files, several series, a modality other
  than CT, slices of different size/orientation, two slices at one position, uneven slice
  spacing (a missing slice), and a gantry tilt (slices sheared along the normal).

    load_dicom_ct(folder)            -> Volume
    load_dicom_series(folder)        -> (Volume, headers sorted like the slices, pixel data dropped)
    dicom_files(folder)              -> the DICOM files directly in a folder
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.volume_io import Volume, check_ct_intensities, check_finite, scale_to_hu, to_canonical

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 0.01  # relative: slice gaps may differ by 1% (rounding), not by a missing slice
MIN_SPACING_MM = 1e-3  # two slices closer than this are at the same position
TILT_TOLERANCE_DEG = 0.1  # as in volume_io: below this a shear is rounding noise
ORIENTATION_ATOL = 1e-4


class DicomError(UserError):
    """A folder that is not one usable CT series. ``str(err)`` is ``'<folder>: <what is wrong>'``."""

    def __init__(self, folder, problem: str):
        super().__init__(problem, about=str(folder))


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("reading DICOM needs the [dicom] extra: pip install 'abdoseg[dicom]'") from None
    return pydicom


def dicom_files(folder) -> list[Path]:
    """The files directly in `folder` that start with the DICOM preamble (``DICM`` at byte 128).

    Hidden files and subfolders are skipped; a ``DICOMDIR`` index is not an image and is skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        with open(path, "rb") as handle:
            if handle.read(132)[128:132] == b"DICM":
                found.append(path)
    return found


def is_dicom_folder(path) -> bool:
    """True when `path` is a folder holding at least one DICOM file directly."""
    return bool(dicom_files(path))


def load_dicom_ct(folder, check_intensity: bool = True) -> Volume:
    """Load the CT series in `folder` as a canonical RAS+ :class:`Volume` (see the module docstring)."""
    return load_dicom_series(folder, check_intensity)[0]


def load_dicom_series(folder, check_intensity: bool = True) -> tuple[Volume, list]:
    """Load the CT series in `folder`; also return its headers in slice order.

    Args:
        folder: a folder holding the files of one DICOM CT series (other files are ignored).
        check_intensity: refuse values that do not look like CT in HU (as ``load_ct``).

    Returns:
        ``(volume, headers)``: ``volume.data`` ``(X, Y, Z)`` HU; ``headers`` the pydicom datasets
        sorted along the slice normal, slice ``k`` of the series' own order first, without
        their pixel data (what DICOM SEG / RTSTRUCT export references).

    Raises:
        DicomError: see the module docstring.
    """
    datasets = _read_series(folder)
    row_cosines, column_cosines, normal = _orientation(folder, datasets)
    datasets.sort(key=lambda ds: float(np.dot(_position(ds), normal)))
    slice_step = _slice_step(folder, datasets, normal)
    raw, slope, intercept = _pixels(folder, datasets)  # (columns, rows, slices) series order
    hu = scale_to_hu(raw, slope, intercept) if np.isscalar(slope) else _scale_per_slice(raw, slope, intercept)
    check_finite(folder, hu)
    if check_intensity:
        check_ct_intensities(folder, hu, raw.dtype)
    row_spacing, column_spacing = (float(s) for s in datasets[0].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosines * column_spacing  # i: along a row (to the next column)
    affine_lps[:3, 1] = column_cosines * row_spacing  # j: down a column (to the next row)
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = _position(datasets[0])
    original_affine = LPS_TO_RAS @ affine_lps
    data, affine = to_canonical(hu, original_affine)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    volume = Volume(data=data, spacing=spacing, affine=affine, original_affine=original_affine,
                    original_shape=tuple(int(s) for s in hu.shape), path=str(folder))
    return volume, datasets


def _read_series(folder) -> list:
    """The datasets of the one image series in `folder`; refuses zero or several series and non-CT."""
    pydicom = _pydicom()
    files = dicom_files(folder)
    if not files:
        raise DicomError(folder, "holds no DICOM files (files starting with the DICM preamble)")
    datasets = []
    for path in files:
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise DicomError(folder, f"{path.name} is not a readable DICOM file ({err})") from None
        if "PixelData" in dataset:  # skip non-image objects (SEG, RTSTRUCT, reports) ...
            datasets.append(dataset)
        elif dataset.get("Modality") not in ("SEG", "RTSTRUCT", "SR", "KO", "PR"):
            datasets.append(dataset)  # ... but an image without pixels is an error below
    if not datasets:
        raise DicomError(folder, "holds DICOM files but no images")
    series = {}
    for dataset in datasets:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append(dataset)
    if len(series) > 1:
        described = ", ".join(f"{uid or '(no UID)'} ({len(items)} files, {items[0].get('SeriesDescription', '')!s})"
                              for uid, items in series.items())
        raise DicomError(folder, f"holds {len(series)} DICOM series ({described}); put each series in "
                                 "its own folder")
    modalities = sorted({str(ds.get("Modality", "")) for ds in datasets})
    if modalities != ["CT"]:
        raise DicomError(folder, f"modality {'/'.join(modalities) or '(none)'} is not CT; abdoseg segments CT")
    missing = [name for name in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if any(name not in ds for ds in datasets)]
    if missing:
        raise DicomError(folder, f"slices lack {', '.join(missing)}; cannot place them in space")
    if len(datasets) < 2:
        raise DicomError(folder, "holds a single slice; abdoseg needs a 3D series")
    return datasets


def _position(dataset) -> np.ndarray:
    return np.array([float(v) for v in dataset.ImagePositionPatient])


def _orientation(folder, datasets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row cosines, column cosines and slice normal (row x column), shared by all slices."""
    cosines = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(cosines - cosines[0]).max() > ORIENTATION_ATOL:
        raise DicomError(folder, "slices have different Image Orientation (Patient); not one 3D volume")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets}
    if len(sizes) > 1 or len(spacings) > 1:
        raise DicomError(folder, f"slices differ in size {sorted(sizes)} or pixel spacing {sorted(spacings)}")
    row_cosines = cosines[0, :3] / np.linalg.norm(cosines[0, :3])
    column_cosines = cosines[0, 3:] / np.linalg.norm(cosines[0, 3:])
    return row_cosines, column_cosines, np.cross(row_cosines, column_cosines)


def _slice_step(folder, datasets, normal: np.ndarray) -> np.ndarray:
    """The LPS vector from one slice to the next; refuses duplicates, uneven gaps and a tilt."""
    positions = np.stack([_position(ds) for ds in datasets])  # (N, 3) sorted along the normal
    along_normal = positions @ normal
    gaps = np.diff(along_normal)
    if gaps.min() < MIN_SPACING_MM:
        first = int(np.argmin(gaps))
        raise DicomError(folder, f"two slices at the same position ({along_normal[first]:.2f} mm along the "
                                 "normal): several acquisitions in one series?")
    typical = float(np.median(gaps))
    uneven = np.abs(gaps - typical) > SPACING_TOLERANCE * typical
    if uneven.any():
        where = int(np.argmax(uneven))
        raise DicomError(folder, f"uneven slice spacing: a gap of {gaps[where]:.2f} mm after slice {where + 1} "
                                 f"of {len(datasets)} where the others are {typical:.2f} mm (a missing slice?)")
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    tilt = float(np.degrees(np.arccos(np.clip(np.dot(step, normal) / np.linalg.norm(step), -1.0, 1.0))))
    gantry = abs(float(datasets[0].get("GantryDetectorTilt", 0) or 0))
    if tilt > TILT_TOLERANCE_DEG or gantry > TILT_TOLERANCE_DEG:
        raise DicomError(folder, f"gantry tilt of {max(tilt, gantry):.1f} degrees (slices sheared along the "
                                 "normal); resample it first, e.g. dcm2niix writes a tilt-corrected NIfTI")
    return step


def _pixels(folder, datasets) -> tuple[np.ndarray, object, object]:
    """Stored values ``(columns, rows, slices)``, and the rescale slope and intercept.

    Slope and intercept are scalars when every slice shares them, else ``(slices,)`` arrays.
    Pixel data is dropped from the datasets once decoded.
    """
    slices = []
    for dataset in datasets:
        try:
            pixels = dataset.pixel_array
        except Exception as err:  # pydicom raises several types for a codec it lacks
            raise DicomError(folder, f"cannot decode pixel data of transfer syntax "
                                     f"{dataset.file_meta.TransferSyntaxUID.name} ({str(err).splitlines()[0]}); "
                                     "install the decoders: pip install 'abdoseg[dicom]'") from None
        if pixels.ndim != 2:
            raise DicomError(folder, f"a slice has pixel array shape {pixels.shape}; expected one 2D frame")
        slices.append(pixels.T)  # (rows, columns) -> (columns, rows): i along a row
        del dataset.PixelData
    raw = np.stack(slices, axis=-1)  # (columns, rows, slices)
    slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in datasets])
    intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets])
    if np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0]):
        return raw, float(slopes[0]), float(intercepts[0])
    return raw, slopes, intercepts


def _scale_per_slice(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """float32 HU when slices carry different rescale values: ``raw[..., k] * slope_k + intercept_k``."""
    return raw.astype(np.float32) * slopes.astype(np.float32) + intercepts.astype(np.float32)
