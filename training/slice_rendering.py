"""The slice viewer's rendering core: pure functions returning arrays, no widgets.

It turns a case (CT, prediction, ground truth, voxel spacing) into ``(H, W, 3)`` uint8 RGB
images of the axial, coronal and sagittal planes, in the radiological convention (patient's right
on the image's left; anterior at the top of the axial plane, superior at the top of the others,
anterior on the left of the sagittal plane) and with the true aspect ratio from the spacing.

Speed: the CT is converted once to 16-bit codes; a window/level change rebuilds a 65536-entry
uint8 look-up table (the pre-windowed grey levels), so a slider step is a gather of one slice
through that table, a colour blend and a JPEG encode, never a matplotlib redraw or a windowing of
the whole volume. ``benchmarks/viewer.py`` measures it.

The ipywidgets layer on top is ``training/viewer.py``; ``training/report.py`` uses the same
functions for its still images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np

from utils.labels import COLORS, DISPLAY_NAMES, NUM_CLASSES

PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the canonical (X, Y, Z) axis a slider moves
WINDOW_PRESETS = {"abdomen": (40.0, 400.0), "liver": (60.0, 160.0), "bone": (400.0, 1800.0),
                  "lung": (-600.0, 1500.0)}  # (level, width) in HU
MODES = ("prediction", "ground truth", "both", "errors")
ORGAN_COLORS = np.asarray(COLORS, dtype=np.uint8)  # (NUM_CLASSES, 3)
FALSE_POSITIVE_COLOR = (255, 0, 255)  # magenta: predicted, not in the ground truth
FALSE_NEGATIVE_COLOR = (0, 255, 255)  # cyan: in the ground truth, missed
CROSSHAIR_COLOR = (255, 255, 0)
WASH_FRACTION = 0.5  # a label filling more of a slice than this is drawn as an outline only


@dataclass(frozen=True)
class ViewSettings:
    """What the viewer shows; every field is a widget's value.

    level, width: display window in HU (or in the volume's own units).
    opacity: fill opacity in [0, 1].
    mode: one of ``MODES``.
    visible: organ ids (1..11) drawn; the others are hidden.
    """

    level: float = 40.0
    width: float = 400.0
    opacity: float = 0.4
    mode: str = "both"
    visible: frozenset = field(default_factory=lambda: frozenset(range(1, NUM_CLASSES)))


@dataclass
class CaseVolumes:
    """A case prepared for fast slicing (build with :func:`prepare_case`).

    codes: ``(X, Y, Z)`` uint16; value = ``code_offset + code_step * code``.
    prediction, truth: ``(X, Y, Z)`` uint8 class ids, or None.
    spacing: voxel size ``(sx, sy, sz)`` mm.
    """

    codes: np.ndarray
    code_offset: float
    code_step: float
    prediction: np.ndarray | None
    truth: np.ndarray | None
    spacing: tuple

    @property
    def shape(self) -> tuple:
        return self.codes.shape


def prepare_case(ct: np.ndarray, prediction=None, truth=None, spacing=(1.0, 1.0, 1.0),
                 num_classes: int = NUM_CLASSES) -> CaseVolumes:
    """Check a case and convert the CT to 16-bit codes (lossless for int16 HU).

    Args:
        ct: ``(X, Y, Z)`` canonical CT, any real dtype.
        prediction, truth: ``(X, Y, Z)`` class ids in ``0..num_classes-1``, or None.
        spacing: voxel size in mm along X, Y, Z.
        num_classes: at most ``NUM_CLASSES``.
    """
    ct = np.asarray(ct)
    if ct.ndim != 3:
        raise ValueError(f"ct must be (X, Y, Z), got shape {ct.shape}")
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes={num_classes}: colours exist for 1..{NUM_CLASSES} classes")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive mm values, got {spacing}")
    labels = [_check_volume_labels(a, ct.shape, name, num_classes)
              for a, name in ((prediction, "prediction"), (truth, "ground truth"))]
    if ct.dtype in (np.int16, np.uint8, np.int8, np.bool_):
        codes = (ct.astype(np.int16, copy=False).view(np.uint16) ^ np.uint16(0x8000))
        offset, step = -32768.0, 1.0
    else:
        low, high = (float(np.nanmin(ct)), float(np.nanmax(ct))) if ct.size else (0.0, 1.0)
        step = (high - low) / 65535.0 or 1.0
        codes = np.round((np.nan_to_num(ct, nan=low) - low) / step).astype(np.uint16)
        offset = low
    return CaseVolumes(codes, offset, step, labels[0], labels[1], tuple(float(s) for s in spacing))


def window_table(level: float, width: float, code_offset: float, code_step: float) -> np.ndarray:
    """``(65536,)`` uint8 grey level of every code: values at or below ``level - width/2`` are 0,
    at or above ``level + width/2`` are 255."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    values = code_offset + code_step * np.arange(65536, dtype=np.float64)
    grey = (values - (level - width / 2.0)) / width * 255.0
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One plane of an ``(X, Y, Z)`` volume as a display ``(rows, cols)`` array (a view).

    axial ``[:, :, z]`` -> ``(Y, X)``; coronal ``[:, y, :]`` -> ``(Z, X)``; sagittal
    ``[x, :, :]`` -> ``(Z, Y)``. Rows run anterior->posterior (axial) or superior->inferior;
    columns run patient's right->left (axial, coronal) or anterior->posterior (sagittal).
    """
    axis = PLANE_AXIS[plane]
    taken = volume[(slice(None),) * axis + (int(index),)]  # (X, Y), (X, Z) or (Y, Z); a view, never a copy
    return np.swapaxes(taken[::-1, ::-1], 0, 1)


def plane_pixel_mm(spacing, plane: str) -> tuple[float, float]:
    """``(row_mm, col_mm)``: the size of one display pixel of ``plane`` before resampling."""
    sx, sy, sz = (float(s) for s in spacing)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def display_mm_per_pixel(shape, spacing, min_pixels: int = 256, max_pixels: int = 512) -> float:
    """One scale for all three planes: the longest physical extent spans between ``min_pixels``
    and ``max_pixels`` display pixels (native resolution when it fits)."""
    extents = [n * float(s) for n, s in zip(shape, spacing)]
    longest = int(np.clip(max(shape), min_pixels, max_pixels))
    return max(extents) / longest


def resample_indices(count: int, pixel_mm: float, mm_per_pixel: float) -> np.ndarray:
    """Nearest-neighbour source index of each display pixel along one axis (true aspect)."""
    size = max(1, int(round(count * pixel_mm / mm_per_pixel)))
    return np.minimum((np.arange(size) + 0.5) * count / size, count - 1).astype(np.intp)


def crosshair_position(position, plane: str, shape) -> tuple[int, int]:
    """``(row, col)`` in the un-resampled display slice of ``plane`` for voxel ``(x, y, z)``."""
    (x, y, z), (size_x, size_y, size_z) = position, shape
    return {"axial": (size_y - 1 - y, size_x - 1 - x), "coronal": (size_z - 1 - z, size_x - 1 - x),
            "sagittal": (size_z - 1 - z, size_y - 1 - y)}[plane]


def error_map(prediction: np.ndarray, truth: np.ndarray, visible) -> np.ndarray:
    """Per pixel: 0 correct or hidden, 1 false positive, 2 false negative.

    False negative: the truth is a visible organ and the prediction differs. False positive: the
    prediction is a visible organ that the truth does not have. A pixel given the wrong organ is
    both; it is drawn as the miss (2) when the true organ is visible.
    """
    shown = np.zeros(NUM_CLASSES, dtype=bool)
    shown[list(visible)] = True
    differs = prediction != truth
    errors = np.zeros(prediction.shape, dtype=np.uint8)
    errors[differs & shown[prediction]] = 1
    errors[differs & shown[truth]] = 2
    return errors


def label_outline(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: labelled pixels with a 4-neighbour of another label (border = background)."""
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (centre > 0)


def blend(rgb: np.ndarray, where: np.ndarray, colors: np.ndarray, opacity: float) -> None:
    """In place: ``rgb[where] = (1 - opacity) * rgb[where] + opacity * colors`` (uint8)."""
    weight = int(round(opacity * 256))
    base = rgb[where].astype(np.uint16)
    rgb[where] = ((base * (256 - weight) + colors.astype(np.uint16) * weight) >> 8).astype(np.uint8)


def compose(grey: np.ndarray, prediction, truth, settings: ViewSettings) -> np.ndarray:
    """Overlay one display slice: ``(H, W)`` uint8 grey + label slices -> ``(H, W, 3)`` uint8 RGB.

    Modes: ``prediction`` / ``ground truth`` fill that label map; ``both`` fills the prediction
    and outlines the truth; ``errors`` colours false positives and false negatives
    (:func:`error_map`) and outlines the truth. A label (or kind of error) filling more than
    ``WASH_FRACTION`` of the slice is outlined instead of filled, so the CT under it stays readable.
    """
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
    if settings.mode == "errors":
        if prediction is None or truth is None:
            return rgb
        _errors(rgb, error_map(prediction, truth, settings.visible), max(settings.opacity, 0.5))
        _outline(rgb, truth, settings.visible)
        return rgb
    filled = prediction if settings.mode in ("prediction", "both") else truth
    if filled is not None:
        _fill(rgb, filled, settings)
    if settings.mode == "both" and truth is not None:
        _outline(rgb, truth, settings.visible)
    return rgb


def _fill(rgb: np.ndarray, labels: np.ndarray, settings: ViewSettings) -> None:
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    washing = [organ for organ in settings.visible if counts[organ] > WASH_FRACTION * labels.size]
    shown = np.zeros(NUM_CLASSES, dtype=bool)
    shown[[o for o in settings.visible if o not in washing]] = True
    where = shown[labels]
    blend(rgb, where, ORGAN_COLORS[labels[where]], settings.opacity)
    if washing:
        _outline(rgb, labels, washing)


def _errors(rgb: np.ndarray, errors: np.ndarray, opacity: float) -> None:
    """Fill false positives (1) and false negatives (2) in their colours; a kind covering more
    than ``WASH_FRACTION`` of the slice is outlined instead."""
    for kind, color in ((1, FALSE_POSITIVE_COLOR), (2, FALSE_NEGATIVE_COLOR)):
        where = errors == kind
        if where.sum() > WASH_FRACTION * errors.size:
            rgb[label_outline(where)] = color
        else:
            blend(rgb, where, np.asarray(color, dtype=np.uint8), opacity)


def _outline(rgb: np.ndarray, labels: np.ndarray, visible) -> None:
    shown = np.zeros(NUM_CLASSES, dtype=bool)
    shown[list(visible)] = True
    edge = label_outline(labels) & shown[labels]
    rgb[edge] = ORGAN_COLORS[labels[edge]]


def render_plane(case: CaseVolumes, table: np.ndarray, plane: str, index: int, settings: ViewSettings,
                 mm_per_pixel: float) -> np.ndarray:
    """One plane at ``index``, composed and resampled to the true aspect: ``(H, W, 3)`` uint8."""
    grey = table[plane_slice(case.codes, plane, index)]
    labels = [None if volume is None else plane_slice(volume, plane, index)
              for volume in (case.prediction, case.truth)]
    rgb = compose(grey, *labels, settings)
    row_mm, col_mm = plane_pixel_mm(case.spacing, plane)
    rows = resample_indices(rgb.shape[0], row_mm, mm_per_pixel)
    cols = resample_indices(rgb.shape[1], col_mm, mm_per_pixel)
    return rgb[rows[:, None], cols[None, :]]


def draw_crosshair(rgb: np.ndarray, plane: str, position, case: CaseVolumes, mm_per_pixel: float) -> np.ndarray:
    """A copy of a rendered plane with a dashed crosshair through voxel ``position`` ``(x, y, z)``."""
    row, col = crosshair_position(position, plane, case.shape)
    row_mm, col_mm = plane_pixel_mm(case.spacing, plane)
    out = rgb.copy()
    display_row = int((row + 0.5) * row_mm / mm_per_pixel)
    display_col = int((col + 0.5) * col_mm / mm_per_pixel)
    dashes_row = (np.arange(out.shape[1]) // 4) % 2 == 0
    dashes_col = (np.arange(out.shape[0]) // 4) % 2 == 0
    out[min(display_row, out.shape[0] - 1), dashes_row] = CROSSHAIR_COLOR
    out[dashes_col, min(display_col, out.shape[1] - 1)] = CROSSHAIR_COLOR
    return out


def confusion_counts(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(NUM_CLASSES, NUM_CLASSES)`` voxel counts, ``[predicted, true]`` (class ids < 16)."""
    counts = np.zeros(NUM_CLASSES ** 2, dtype=np.int64)
    for start in range(0, prediction.shape[-1], 16):  # chunks along the last axis bound the memory
        pairs = prediction[..., start:start + 16] * np.uint8(NUM_CLASSES) + truth[..., start:start + 16]
        counts += np.bincount(pairs.ravel(), minlength=NUM_CLASSES ** 2)[:NUM_CLASSES ** 2]
    return counts.reshape(NUM_CLASSES, NUM_CLASSES)


def visible_dice(counts: np.ndarray, visible) -> dict[int, float]:
    """3D Dice of each visible organ from :func:`confusion_counts`; NaN when absent from both."""
    dice = {}
    for organ in sorted(visible):
        overlap, predicted, true = counts[organ, organ], counts[organ].sum(), counts[:, organ].sum()
        dice[organ] = float(2 * overlap / (predicted + true)) if predicted + true else float("nan")
    return dice


def encode_image(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """``(H, W, 3)`` uint8 -> JPEG or PNG bytes (Pillow)."""
    from PIL import Image

    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    if image_format == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def settings_for_preset(settings: ViewSettings, preset: str) -> ViewSettings:
    """``settings`` with the window of a ``WINDOW_PRESETS`` name."""
    level, width = WINDOW_PRESETS[preset]
    return replace(settings, level=level, width=width)


def organ_name(organ: int) -> str:
    return DISPLAY_NAMES[organ]


def _check_volume_labels(labels, shape, name: str, num_classes: int):
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"{name} shape {labels.shape} != ct shape {tuple(shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} holds ids {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    return labels.astype(np.uint8, copy=False)
