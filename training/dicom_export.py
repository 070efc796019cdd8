"""Predictions of a DICOM CT series as DICOM: a Segmentation (SEG) and an RT Structure Set.

Treatment-planning systems read RT Structure Sets (contours per slice); PACS viewers and 3D
Slicer also read DICOM SEG (a label per voxel). Both reference the input series (its study,
series, frame of reference and each slice's SOP Instance UID), so they load over the CT.

    write_dicom_seg(labels, volume, headers, path)      highdicom: one segment per organ present,
                                                        our name, colour and SNOMED CT code
    write_rtstruct(labels, volume, headers, path)       rt-utils: one ROI per organ present,
                                                        our name and colour, contours per slice
    labels_in_series_order(labels, volume)              canonical (X, Y, Z) -> (slices, rows, columns)

``labels`` are canonical ``(X, Y, Z)`` class ids (as ``training.predict`` returns), ``volume``
and ``headers`` come from ``utils.dicom_io.load_dicom_series``. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np

from training import __version__
from utils.errors import UserError
from utils.files import atomic_path
from utils.labels import COLORS, DISPLAY_NAMES, NUM_CLASSES, ORGANS
from utils.volume_io import Volume, to_original

# SNOMED CT codes of our organs (values as in pydicom's code dictionary, codes.SCT.*).
SNOMED_CODES = {
    "bladder": ("89837001", "Urinary bladder"),
    "colon": ("71854001", "Colon"),
    "femur_head": ("2812003", "Femoral head"),
    "kidney": ("64033007", "Kidney"),
    "liver": ("10200004", "Liver"),
    "rectum": ("34402009", "Rectum"),
    "small_intestine": ("30315005", "Small intestine"),
    "spinal_cord": ("2748008", "Spinal cord"),
    "stomach": ("69695003", "Stomach"),
    "spleen": ("78961009", "Spleen"),
    "pancreas": ("15776009", "Pancreas"),
}
MANUFACTURER = "abdoseg"
MODEL_NAME = "abdoseg 2D U-Net"


def labels_in_series_order(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """Canonical ``(X, Y, Z)`` labels -> ``(slices, rows, columns)`` in the series' slice order.

    ``volume.original_affine`` orders voxels as ``(column, row, slice)`` of the sorted series
    (``utils.dicom_io``), so this is the inverse reorientation and one transpose.
    """
    return np.ascontiguousarray(to_original(labels, volume).transpose(2, 1, 0))  # (C, R, S) -> (S, R, C)


def organs_present(labels: np.ndarray) -> list[int]:
    """Organ ids (1..11) with at least one voxel in ``labels``."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=NUM_CLASSES)
    return [organ for organ in range(1, NUM_CLASSES) if counts[organ] > 0]


def write_dicom_seg(labels: np.ndarray, volume: Volume, headers: list, path) -> Path | None:
    """Write a binary DICOM SEG of the organs present in ``labels``; None when no organ is.

    Segment ``k`` is the ``k``-th organ present in id order, labelled with our display name,
    coloured with ``utils.labels.COLORS`` and coded with SNOMED CT (category Organ).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    present = organs_present(labels)
    if not present:
        return None
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, organ in enumerate(present, start=1):
        code, meaning = SNOMED_CODES[ORGANS[organ]]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=DISPLAY_NAMES[organ],
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=ORGANS[organ], tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*COLORS[organ])))
    segment_of_organ = np.zeros(NUM_CLASSES, dtype=np.uint8)
    segment_of_organ[present] = np.arange(1, len(present) + 1)
    segments = segment_of_organ[labels_in_series_order(labels, volume)]  # (S, R, C) segment numbers
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=segments, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(headers, 100),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=__version__, device_serial_number="0",
        series_description="abdoseg organs", content_label="ABDOSEG")
    with atomic_path(path) as temporary:
        seg.save_as(temporary)
    return Path(path)


def write_rtstruct(labels: np.ndarray, volume: Volume, headers: list, path) -> Path | None:
    """Write an RT Structure Set with one ROI per organ present; None when no organ is.

    ROIs carry our display names and ``utils.labels.COLORS``; contours are traced per slice by
    rt-utils and reference each slice's SOP Instance UID and the series' frame of reference.

    Raises:
        UserError: the series has non-square pixels, which rt-utils (1.2.7) maps wrongly.
    """
    from rt_utils import RTStruct
    from rt_utils.ds_helper import create_rtstruct_dataset
    present = organs_present(labels)
    if not present:
        return None
    row_spacing, column_spacing = (float(s) for s in headers[0].PixelSpacing)
    if abs(row_spacing - column_spacing) > 1e-4 * max(row_spacing, column_spacing):
        raise UserError(f"pixel spacing {row_spacing} x {column_spacing} mm is not square; the RT Structure "
                        "Set writer (rt-utils) needs square pixels: use --format dicom-seg or nifti", volume.path)
    with _quiet_pydicom():
        rtstruct = RTStruct(headers, create_rtstruct_dataset(headers))
    rtstruct.ds.Manufacturer = MANUFACTURER
    rtstruct.ds.ManufacturerModelName = MODEL_NAME
    rtstruct.ds.SoftwareVersions = __version__
    rtstruct.ds.SeriesDescription = "abdoseg organs"
    rtstruct.ds.StructureSetLabel = "abdoseg"
    series_labels = labels_in_series_order(labels, volume)  # (S, R, C)
    for organ in present:
        mask = (series_labels == organ).transpose(1, 2, 0)  # (S, R, C) -> (R, C, S) as rt-utils takes it
        rtstruct.add_roi(mask=mask, color=list(COLORS[organ]), name=DISPLAY_NAMES[organ],
                         description=ORGANS[organ], roi_generation_algorithm="AUTOMATIC")
    with atomic_path(path) as temporary, _quiet_pydicom():
        rtstruct.ds.save_as(temporary, enforce_file_format=True)
    return Path(path)


@contextlib.contextmanager
def _quiet_pydicom():
    """rt-utils sets ``is_little_endian`` / ``is_implicit_VR``, which pydicom 3 deprecates with a
    warning and a log line per use; the file is right, so keep that noise out of the user's terminal."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _series_number(headers: list, offset: int) -> int:
    """A series number after the CT's own, so viewers list the result next to it."""
    number = headers[0].get("SeriesNumber")
    return int(number) + offset if number not in (None, "") else offset
