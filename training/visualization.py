"""Static pictures of CT slices, labels and results: pure functions returning arrays or figures.
The slice viewer is ``training/viewer.py`` (``create_interactive_visualization`` re-exported here).

Orientation. Volumes arrive as canonical RAS+ ``(X, Y, Z)`` arrays (``utils/volume_io``): +X points
to the patient's right, +Y to anterior, +Z to superior, and an axial slice is ``data[:, :, z]``,
an ``(X, Y)`` array. :func:`to_display` turns such a slice into ``(rows, cols)`` in the
radiological convention (as seen from the feet: patient's right on the image's left, anterior at
the top). :func:`overlay` works on display arrays of any orientation; the functions that take
slices or volumes (:func:`slice_figure`, :func:`slice_grid`) call :func:`to_display`.

Colours and names come from ``utils/labels.py``. Figures are built with
``matplotlib.figure.Figure`` directly, never pyplot, so no global state or backend is touched and
figures are freed when dropped; in a notebook the returned Figure displays itself.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from training.viewer import create_interactive_visualization  # noqa: F401  (the seed's import path)
from utils.labels import COLORS, DISPLAY_NAMES, NUM_CLASSES, ORGAN_IDS, ORGANS

COLORS_RGB = np.asarray(COLORS, dtype=np.float32) / 255.0  # (NUM_CLASSES, 3) in [0, 1]
OTHER_COLOR = (0.6, 0.6, 0.6)  # bars for keys that are not organs (e.g. "mean")
SERIES_HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo", "---", "+++")


def to_display(slice_xy: np.ndarray) -> np.ndarray:
    """Canonical axial slice ``(X, Y)`` -> ``(rows, cols)`` image in radiological convention.

    Row 0 is the most anterior voxel row (largest y); column 0 is the patient's right (largest x).
    Works for trailing channel axes too (``(X, Y, C)`` -> ``(Y, X, C)``). Returns a view.
    """
    slice_xy = np.asarray(slice_xy)
    if slice_xy.ndim < 2:
        raise ValueError(f"expected an (X, Y) slice, got shape {slice_xy.shape}")
    return np.swapaxes(slice_xy[::-1, ::-1], 0, 1)  # (X, Y, ...) -> (Y, X, ...), both reversed


def window_to_rgb(hu_or_norm: np.ndarray, low: float = -400.0, high: float = 400.0) -> np.ndarray:
    """Grey-level window: ``(H, W)`` values -> ``(H, W, 3)`` float32 RGB in [0, 1].

    Values at or below ``low`` are black, at or above ``high`` white. The default is a soft-tissue
    window in HU; pass ``low=0, high=1`` for images already normalised to [0, 1].
    """
    if high <= low:
        raise ValueError(f"window needs low < high, got low={low}, high={high}")
    grey = (np.asarray(hu_or_norm, dtype=np.float32) - low) / (high - low)
    grey = np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)


def label_boundary(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: labelled pixels (> 0) with a 4-neighbour of another label (the inner contour).

    The image border counts as background, so an organ cut by the field of view is closed.
    """
    labels = np.asarray(labels)
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (centre > 0)


def overlay(image: np.ndarray, prediction: np.ndarray | None = None, ground_truth: np.ndarray | None = None,
            alpha: float = 0.4, low: float = -400.0, high: float = 400.0) -> np.ndarray:
    """CT window with the prediction as a translucent fill and the ground truth as contours.

    Args:
        image: ``(H, W)`` HU (or normalised values with a matching ``low``/``high``).
        prediction: ``(H, W)`` class ids 0..NUM_CLASSES-1, or None. Filled with the label colour
            at opacity ``alpha``.
        ground_truth: ``(H, W)`` class ids, or None. Drawn as 1-pixel inner contours in the label
            colour, opaque, on top of the fill.
        alpha: fill opacity in [0, 1].
        low, high: display window (see :func:`window_to_rgb`).

    Returns:
        ``(H, W, 3)`` float32 RGB in [0, 1].
    """
    rgb = window_to_rgb(image, low, high)
    if prediction is not None:
        prediction = _check_labels(prediction, rgb.shape[:2], "prediction")
        filled = prediction > 0
        rgb[filled] = (1.0 - alpha) * rgb[filled] + alpha * COLORS_RGB[prediction[filled]]
    if ground_truth is not None:
        ground_truth = _check_labels(ground_truth, rgb.shape[:2], "ground_truth")
        contour = label_boundary(ground_truth)
        rgb[contour] = COLORS_RGB[ground_truth[contour]]
    return rgb


def legend_handles(class_ids=None) -> list[Patch]:
    """Matplotlib patches named and coloured like the organs; default: all organs 1..11."""
    ids = range(1, NUM_CLASSES) if class_ids is None else sorted(int(i) for i in class_ids if i > 0)
    return [Patch(facecolor=COLORS_RGB[i], edgecolor="black", linewidth=0.5, label=DISPLAY_NAMES[i])
            for i in ids]


def slice_figure(image: np.ndarray, prediction: np.ndarray | None = None,
                 ground_truth: np.ndarray | None = None, title: str = "", alpha: float = 0.4,
                 low: float = -400.0, high: float = 400.0, pixel_spacing=None,
                 figsize=(7.5, 5.5)) -> Figure:
    """One axial slice with its overlay and a legend of the organs shown.

    Args:
        image, prediction, ground_truth: canonical ``(X, Y)`` slices (``volume[:, :, z]``);
            labels may be None. Shown in radiological convention (:func:`to_display`).
        title: axes title.
        alpha, low, high: as in :func:`overlay`.
        pixel_spacing: ``(sx, sy)`` mm, for the right aspect ratio; None = square pixels.
        figsize: inches.

    Returns:
        A matplotlib Figure (not registered with pyplot).
    """
    labels = [to_display(a) if a is not None else None for a in (prediction, ground_truth)]
    rgb = overlay(to_display(image), *labels, alpha=alpha, low=low, high=high)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    _show(ax, rgb, pixel_spacing)
    ax.set_title(title)
    handles = legend_handles(_present_ids(*labels)) + _mode_handles(*labels)
    if handles:
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)
    return fig


def slice_grid(volume_hu: np.ndarray, prediction: np.ndarray | None = None,
               ground_truth: np.ndarray | None = None, num_slices: int = 12, path=None,
               columns: int = 4, alpha: float = 0.4, low: float = -400.0, high: float = 400.0,
               spacing=None, title: str = "") -> Figure:
    """A grid of evenly spaced axial slices through the organs, for a static report.

    Slices are chosen evenly among those where the ground truth (else the prediction) has an
    organ; if neither has any, evenly through the whole volume.

    Args:
        volume_hu: ``(X, Y, Z)`` canonical CT in HU.
        prediction, ground_truth: ``(X, Y, Z)`` class ids, or None.
        num_slices: at most this many panels.
        path: if given, the figure is also saved there as PNG (atomically).
        columns: panels per row.
        alpha, low, high: as in :func:`overlay`.
        spacing: voxel size ``(sx, sy, sz)`` mm, for the in-plane aspect ratio; None = square.
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {volume_hu.shape}")
    for name, labels in (("prediction", prediction), ("ground_truth", ground_truth)):
        if labels is not None and np.shape(labels) != volume_hu.shape:
            raise ValueError(f"{name} shape {np.shape(labels)} != volume shape {volume_hu.shape}")
    slices = choose_slices(ground_truth if ground_truth is not None else prediction,
                           volume_hu.shape[2], num_slices)
    columns = max(1, min(columns, len(slices)))
    rows = math.ceil(len(slices) / columns)
    fig = Figure(figsize=(2.6 * columns + 1.8, 2.7 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    shown_ids = set()
    for ax, z in zip(axes, slices):
        labels = [to_display(a[:, :, z]) if a is not None else None for a in (prediction, ground_truth)]
        shown_ids.update(_present_ids(*labels))
        _show(ax, overlay(to_display(volume_hu[:, :, z]), *labels, alpha=alpha, low=low, high=high),
              None if spacing is None else spacing[:2])
        ax.set_title(f"z = {z}", fontsize=9)
    for ax in axes[len(slices):]:
        ax.set_axis_off()
    handles = legend_handles(shown_ids) + _mode_handles(prediction, ground_truth)
    if handles:
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def choose_slices(labels: np.ndarray | None, depth: int, num_slices: int) -> list[int]:
    """Up to ``num_slices`` evenly spaced z indices among slices where ``labels > 0`` (all if none)."""
    candidates = np.arange(depth)
    if labels is not None:
        with_organs = np.flatnonzero(np.asarray(labels).any(axis=(0, 1)))
        if with_organs.size:
            candidates = with_organs
    picks = np.linspace(0, len(candidates) - 1, min(num_slices, len(candidates))).round().astype(int)
    return [int(candidates[i]) for i in np.unique(picks)]


def dice_bar_chart(per_organ: dict, path=None, title: str = "", ylabel: str = "Dice") -> Figure:
    """Bar chart of a score per organ, one series or several side by side.

    Args:
        per_organ: ``{organ: value}`` (one series), or ``{series: {organ: value}}`` (grouped,
            e.g. one series per training method). Organ keys are names from ``utils.labels``
            (``"small_intestine"``) or display names; other keys (``"mean"``) get grey bars.
            NaN values are marked "n/a".
        path: if given, also saved there as PNG (atomically).
        title, ylabel: texts.

    Returns:
        A matplotlib Figure. Bars take the organ colours; in a grouped chart the series differ
        by hatching, explained in the legend.
    """
    grouped = bool(per_organ) and all(isinstance(v, dict) for v in per_organ.values())
    series = per_organ if grouped else {"": per_organ}
    organs = _ordered_keys(k for values in series.values() for k in values)
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.75 * len(organs) * max(1, len(series) ** 0.5) + 2), 4.2),
                 layout="constrained")
    ax = fig.add_subplot()
    for s, (series_name, values) in enumerate(series.items()):
        x = np.arange(len(organs)) + (s - (len(series) - 1) / 2) * width
        heights = np.array([_as_float(values.get(o)) for o in organs])
        bars = ax.bar(x, np.nan_to_num(heights), width * 0.95, color=[_key_color(o) for o in organs],
                      edgecolor="black", linewidth=0.6, hatch=SERIES_HATCHES[s % len(SERIES_HATCHES)])
        labels = ["n/a" if np.isnan(h) else f"{h:.2f}" for h in heights]
        ax.bar_label(bars, labels=labels, fontsize=7 if grouped else 8, padding=2,
                     rotation=90 if grouped and len(series) > 2 else 0)
    if not grouped and organs:
        mean = np.nanmean([_as_float(per_organ[o]) for o in organs]) if not _all_nan(per_organ) else np.nan
        if not np.isnan(mean):
            ax.axhline(mean, color="black", linestyle="--", linewidth=0.8)
            # x in axes units: the label sits just right of the plot, clear of the bars
            ax.text(1.005, mean, f"mean\n{mean:.3f}", transform=ax.get_yaxis_transform(), va="center",
                    ha="left", fontsize=8)
    ax.set_xticks(np.arange(len(organs)), [_key_label(o) for o in organs], rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, _max_value(series)) * 1.12)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(title)
    if grouped:
        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=SERIES_HATCHES[s % len(SERIES_HATCHES)],
                                 label=str(name)) for s, name in enumerate(series)],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def training_curves(rows: list[dict], path=None, title: str = "") -> Figure:
    """Loss, validation Dice and learning rate against epoch, from the rows of ``log.csv``.

    Args:
        rows: dicts with ``epoch`` and any of ``train_loss``, ``val_loss``, ``val_mean_dice``,
            ``lr``; values may be strings (as from ``csv.DictReader``); empty or missing is NaN.
        path: if given, also saved there as PNG (atomically).
        title: figure title.

    Returns:
        A Figure with a loss panel, a Dice panel, and an lr panel when ``lr`` is logged.
    """
    def column(key):
        return np.array([_as_float(row.get(key)) for row in rows], dtype=float)

    epochs = column("epoch") if rows and "epoch" in rows[0] else np.arange(1, len(rows) + 1, dtype=float)
    has_lr = any("lr" in row for row in rows) and not np.isnan(column("lr")).all()
    fig = Figure(figsize=(4.2 * (3 if has_lr else 2), 3.6), layout="constrained")
    axes = fig.subplots(1, 3 if has_lr else 2)
    panels = [("Loss", [("train_loss", "train"), ("val_loss", "validation")], "linear"),
              ("Validation Dice", [("val_mean_dice", "slice"), ("val_case_dice", "per-case 3D")], "linear")]
    if has_lr:
        panels.append(("Learning rate", [("lr", "lr")], "log"))
    for ax, (panel_title, keys, scale) in zip(axes, panels):
        for key, label in keys:
            values = column(key)
            if not np.isnan(values).all():
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically (temporary name, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(temporary, format="png", dpi=dpi)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes (to embed in HTML or show in an ipywidgets Image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _check_labels(labels: np.ndarray, shape, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"{name} shape {labels.shape} != image shape {tuple(shape)}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{name} holds ids {labels.min()}..{labels.max()}, outside 0..{NUM_CLASSES - 1}")
    return labels.astype(np.intp, copy=False)


def _show(ax, rgb: np.ndarray, pixel_spacing) -> None:
    # Display rows run along y and columns along x, so the pixel aspect is sy / sx.
    aspect = 1.0 if pixel_spacing is None else float(pixel_spacing[1]) / float(pixel_spacing[0])
    ax.imshow(rgb, interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    for side, text in (("left", "R"), ("right", "L")):
        ax.text(0.01 if side == "left" else 0.99, 0.5, text, transform=ax.transAxes, color="yellow",
                ha=side, va="center", fontsize=8, fontweight="bold")


def _present_ids(*label_arrays) -> list[int]:
    ids = set()
    for labels in label_arrays:
        if labels is not None:
            ids.update(int(i) for i in np.unique(labels) if i > 0)
    return sorted(ids)


def _mode_handles(prediction, ground_truth) -> list[Patch]:
    """Legend entries that explain the fill and the contour, when both are drawn."""
    handles = []
    if prediction is not None:
        handles.append(Patch(facecolor=(0.75, 0.75, 0.75), edgecolor="none", label="fill = prediction"))
    if ground_truth is not None:
        handles.append(Patch(facecolor="none", edgecolor=(0.3, 0.3, 0.3), linewidth=1.5,
                             label="contour = ground truth"))
    return handles


def _ordered_keys(keys) -> list[str]:
    unique = list(dict.fromkeys(keys))
    organ_rank = {o: i for i, o in enumerate(ORGANS)}
    known = sorted((k for k in unique if _organ_id(k) is not None), key=lambda k: organ_rank[ORGANS[_organ_id(k)]])
    return known + [k for k in unique if _organ_id(k) is None]


def _organ_id(key) -> int | None:
    if isinstance(key, (int, np.integer)) and 0 < key < NUM_CLASSES:
        return int(key)
    text = str(key)
    if text in ORGAN_IDS:
        return ORGAN_IDS[text]
    return DISPLAY_NAMES.index(text) if text in DISPLAY_NAMES else None


def _key_color(key):
    organ = _organ_id(key)
    return OTHER_COLOR if organ is None else tuple(COLORS_RGB[organ])


def _key_label(key) -> str:
    organ = _organ_id(key)
    return str(key) if organ is None else DISPLAY_NAMES[organ]


def _as_float(value) -> float:
    if value is None or value == "":
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _all_nan(values: dict) -> bool:
    return all(np.isnan(_as_float(v)) for v in values.values())


def _max_value(series: dict) -> float:
    values = [_as_float(v) for s in series.values() for v in s.values()]
    finite = [v for v in values if np.isfinite(v)]
    return max(finite, default=1.0)
