"""The picture of a phantom case in the README (``docs/phantom.png``): a pure figure function.

Radiological display (patient's right on the image's left, anterior and head up), CT window
[-400, 400] HU, organ colours and names from ``utils/labels.py``.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from training.visualization import COLORS_RGB
from utils.labels import COLORS, DISPLAY_NAMES, ORGAN_IDS


def render_phantom_preview(phantom, path) -> None:
    """Save a PNG: axial slices at the kidneys and the pelvis and a coronal slice, truth overlaid.

    Args:
        phantom: a :class:`utils.phantom.Phantom` (``hu``, ``labels`` (X, Y, Z), ``spacing``).
        path: the PNG to write (atomically).

    Radiological display (patient's right on the image's left, anterior and head up), CT window
    [-400, 400] HU, organ colours and names from ``utils.labels``. Renders on matplotlib's Agg
    canvas directly, so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(13.5, 5.0), facecolor="black")
    FigureCanvasAgg(fig)
    for ax, (title, image, mask, aspect) in zip(fig.subplots(1, 3), _phantom_preview_views(phantom)):
        image, mask = image[::-1, ::-1], mask[::-1, ::-1]  # (rows, cols): anterior/head up, patient's right left
        tint = np.concatenate([COLORS_RGB[mask], np.where(mask > 0, 0.4, 0.0)[..., None]], axis=-1)  # (H, W, 4)
        ax.imshow(np.clip((image + 400.0) / 800.0, 0, 1), cmap="gray", vmin=0, vmax=1, aspect=aspect,
                  interpolation="nearest")
        ax.imshow(tint, aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=11)
        ax.text(0.01, 0.5, "R", color="white", transform=ax.transAxes, fontsize=10, va="center")
        ax.text(0.97, 0.5, "L", color="white", transform=ax.transAxes, fontsize=10, va="center")
        ax.set_axis_off()
    present = np.flatnonzero(np.bincount(phantom.labels.ravel(), minlength=len(COLORS))[1:]) + 1
    handles = [Patch(color=COLORS_RGB[organ_id], label=DISPLAY_NAMES[organ_id]) for organ_id in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9,
               labelcolor="white", handlelength=1.2, columnspacing=1.0)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.08, wspace=0.03)
    _save_png_with_palette(fig, path)


def _phantom_preview_views(phantom) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(title, HU (rows, cols), labels (rows, cols), pixel aspect) for the three preview panels."""
    labels, hu = phantom.labels, phantom.hu
    spacing_x, spacing_y, spacing_z = phantom.spacing
    per_slice = np.stack([np.bincount(labels[:, :, index].ravel(), minlength=len(COLORS))
                          for index in range(labels.shape[2])])  # (Z, classes)
    z_kidney = int(np.argmax(per_slice[:, ORGAN_IDS["kidney"]]))
    z_pelvis = int(np.argmax(per_slice[:, ORGAN_IDS["femur_head"]] + per_slice[:, ORGAN_IDS["bladder"]]))
    y_kidney = np.nonzero(labels == ORGAN_IDS["kidney"])[1]
    y_bowel = np.nonzero(labels == ORGAN_IDS["small_intestine"])[1]
    y_cut = labels.shape[1] // 2
    if y_kidney.size and y_bowel.size:  # coronal through the kidneys' front and the bowel behind
        y_cut = int(0.6 * y_kidney.mean() + 0.4 * y_bowel.mean())
    return [
        ("axial, kidneys", hu[:, :, z_kidney].T, labels[:, :, z_kidney].T, spacing_y / spacing_x),
        ("axial, pelvis", hu[:, :, z_pelvis].T, labels[:, :, z_pelvis].T, spacing_y / spacing_x),
        ("coronal", hu[:, y_cut, :].T, labels[:, y_cut, :].T, spacing_z / spacing_x),
    ]


def _save_png_with_palette(fig: Figure, path) -> None:
    """Save a figure as an 8-bit palette PNG (small) whose palette includes the exact organ colours."""
    from PIL import Image

    from utils.files import write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="black")
    buffer.seek(0)
    rgb = Image.open(buffer).convert("RGB")
    free = 256 - len(COLORS) - 1
    adaptive = rgb.quantize(colors=free).getpalette()[: 3 * free]
    palette = Image.new("P", (1, 1))
    palette.putpalette(adaptive + [channel for color in COLORS for channel in color] + [255, 255, 255])
    png = io.BytesIO()
    rgb.quantize(palette=palette, dither=Image.Dither.NONE).save(png, format="PNG", optimize=True)
    write_bytes(path, png.getvalue())
