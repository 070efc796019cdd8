"""Notebook slice viewer: a thin ipywidgets layer on the rendering core ``training/slice_rendering``.

Three planes side by side (axial, coronal, sagittal), each with its slider, drawn with the true
aspect ratio and linked by a crosshair; window/level presets and free sliders; overlay opacity;
one toggle per organ in its colour; modes prediction / ground truth / both / errors; the 3D Dice
of each visible organ on this case. Sliders update while dragging: a step renders one plane from
the cached grey-level table and re-encodes the images as JPEG (see ``benchmarks/viewer.py``).

Entry points: :func:`create_viewer` (arrays), :func:`view_case` (NIfTI paths),
:func:`view_prediction_folder` (one case of a ``predict`` output folder), and
:func:`create_interactive_visualization` (the seed's signature).
"""

from __future__ import annotations

import html
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.slice_rendering import (FALSE_NEGATIVE_COLOR, FALSE_POSITIVE_COLOR, MODES, ORGAN_COLORS, PLANE_AXIS,
                                      PLANES, WINDOW_PRESETS, ViewSettings, confusion_counts, display_mm_per_pixel,
                                      draw_crosshair, encode_image, prepare_case, render_plane, visible_dice,
                                      window_table)
from utils.labels import DISPLAY_NAMES, NUM_CLASSES


class SliceViewer:
    """The widgets and their state. ``SliceViewer(...).widget`` is what a notebook displays.

    Attributes a test or a notebook may use: ``sliders`` and ``images`` (dicts by plane),
    ``mode``, ``preset``, ``level``, ``width``, ``opacity`` (widgets), ``organ_toggles``
    (``{organ id: ToggleButton}``), ``info`` (HTML with the Dice of the visible organs).
    """

    def __init__(self, case, settings: ViewSettings, title: str = "", image_format: str = "jpeg"):
        import ipywidgets as widgets

        self.case, self.settings, self.image_format = case, settings, image_format
        self.mm_per_pixel = display_mm_per_pixel(case.shape, case.spacing)
        self.table = window_table(settings.level, settings.width, case.code_offset, case.code_step)
        self.counts = (confusion_counts(case.prediction, case.truth)
                       if case.prediction is not None and case.truth is not None else None)
        self.position = list(_start_position(case))
        self._base: dict = {}
        self._quiet = False
        self.sliders = {plane: widgets.IntSlider(value=self.position[PLANE_AXIS[plane]], min=0,
                                                 max=case.shape[PLANE_AXIS[plane]] - 1, description=plane,
                                                 continuous_update=True)
                        for plane in PLANES}
        self.images = {plane: widgets.Image(format=image_format) for plane in PLANES}
        self._build_controls(widgets)
        self.info = widgets.HTML()
        panels = [widgets.VBox([self.images[p], self.sliders[p]]) for p in PLANES]
        header = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = widgets.VBox(header + [widgets.HBox(panels), self.controls, self.organ_box, self.info])
        self.widget.viewer = self  # reachable from the displayed object
        self._connect()
        self.refresh()

    def _build_controls(self, widgets) -> None:
        case, settings = self.case, self.settings
        modes = [m for m in MODES if _mode_possible(m, case)]
        self.mode = widgets.ToggleButtons(options=modes, value=settings.mode if settings.mode in modes else modes[0],
                                          description="show")
        self.preset = widgets.ToggleButtons(options=list(WINDOW_PRESETS) + ["custom"], value=_preset_of(settings),
                                            description="window")
        low, high = case.code_offset, case.code_offset + 65535 * case.code_step
        if case.code_step == 1.0:  # integer HU: whole steps, so the presets' values are exact
            low, high, step = -1200.0, 3000.0, 1.0
        else:
            step = (high - low) / 500
        self.level = widgets.FloatSlider(value=settings.level, min=low, max=high, step=step, description="level",
                                         continuous_update=True)
        self.width = widgets.FloatSlider(value=settings.width, min=step, max=2 * (high - low), step=step,
                                         description="width", continuous_update=True)
        self.opacity = widgets.FloatSlider(value=settings.opacity, min=0.0, max=1.0, step=0.05,
                                           description="opacity", continuous_update=True)
        self.controls = widgets.VBox([self.mode, self.preset, widgets.HBox([self.level, self.width, self.opacity])])
        # ToggleButton has no colour style: the organ's colour is a thick left border
        self.organ_toggles = {organ: widgets.ToggleButton(
            value=organ in settings.visible, description=DISPLAY_NAMES[organ], tooltip="show / hide",
            layout=widgets.Layout(width="auto", border_left="14px solid #%02x%02x%02x"
                                  % tuple(int(c) for c in ORGAN_COLORS[organ])))
            for organ in _organs_present(case)}
        self.organ_box = widgets.HBox(list(self.organ_toggles.values()),
                                      layout=widgets.Layout(flex_flow="row wrap"))

    def _connect(self) -> None:
        for plane, slider in self.sliders.items():
            slider.observe(lambda change, plane=plane: self._on_slice(plane, change["new"]), names="value")
        for control in (self.mode, self.opacity, *self.organ_toggles.values()):
            control.observe(self._on_settings, names="value")
        for control in (self.level, self.width):
            control.observe(self._on_window, names="value")
        self.preset.observe(self._on_preset, names="value")

    def _on_slice(self, plane: str, index: int) -> None:
        self.position[PLANE_AXIS[plane]] = index
        self._base.pop(plane, None)
        self.refresh()

    def _on_settings(self, _change=None) -> None:
        visible = frozenset(organ for organ, toggle in self.organ_toggles.items() if toggle.value)
        self.settings = replace(self.settings, mode=self.mode.value, opacity=self.opacity.value, visible=visible)
        self._base.clear()
        self.refresh()

    def _on_window(self, _change=None) -> None:
        if self._quiet:
            return
        self.settings = replace(self.settings, level=self.level.value, width=self.width.value)
        self.table = window_table(self.settings.level, self.settings.width, self.case.code_offset,
                                  self.case.code_step)
        self._quiet = True
        self.preset.value = _preset_of(self.settings, tolerance=self.level.step / 2)
        self._quiet = False
        self._base.clear()
        self.refresh()

    def _on_preset(self, change) -> None:
        if change["new"] == "custom" or self._quiet:
            return
        level, width = WINDOW_PRESETS[change["new"]]
        self._quiet = True  # one redraw for the two sliders
        self.level.value, self.width.value = level, width
        self._quiet = False
        self._on_window()

    def refresh(self) -> None:
        """Render what changed: planes whose slice or settings moved, crosshairs on all three."""
        for plane in PLANES:
            if plane not in self._base:
                self._base[plane] = render_plane(self.case, self.table, plane, self.position[PLANE_AXIS[plane]],
                                                 self.settings, self.mm_per_pixel)
            rgb = draw_crosshair(self._base[plane], plane, self.position, self.case, self.mm_per_pixel)
            self.images[plane].value = encode_image(rgb, self.image_format)
            self.images[plane].layout.width = f"{rgb.shape[1]}px"
        self.info.value = self._info_html()

    def _info_html(self) -> str:
        x, y, z = self.position
        parts = [f"voxel (x, y, z) = ({x}, {y}, {z}); spacing {_spacing_text(self.case.spacing)} mm"]
        if self.settings.mode == "errors":
            parts.append(_swatch(FALSE_POSITIVE_COLOR, "false positive") + " "
                         + _swatch(FALSE_NEGATIVE_COLOR, "false negative") + " (outline: ground truth)")
        elif self.settings.mode == "both":
            parts.append("fill: prediction, outline: ground truth")
        if self.counts is not None:
            dice = visible_dice(self.counts, self.settings.visible & set(self.organ_toggles))
            cells = [_swatch(ORGAN_COLORS[o], DISPLAY_NAMES[o]) + (" n/a" if math.isnan(d) else f" {d:.3f}")
                     for o, d in dice.items()]
            parts.append("3D Dice on this case: " + " &nbsp; ".join(cells))
        return "<br>".join(parts)


def create_viewer(ct, prediction=None, truth=None, spacing=(1.0, 1.0, 1.0), title: str = "",
                  num_classes: int = NUM_CLASSES, window=None, opacity: float = 0.4, mode: str = "both",
                  image_format: str = "jpeg"):
    """The three-plane viewer of one case, as an ipywidgets ``VBox`` (``.viewer`` is the SliceViewer).

    Args:
        ct: ``(X, Y, Z)`` canonical CT in HU, or normalised values.
        prediction, truth: ``(X, Y, Z)`` class ids ``0..num_classes-1``, or None.
        spacing: voxel size in mm along X, Y, Z (the planes' aspect ratio).
        title: shown above the planes.
        num_classes: labels must lie in ``0..num_classes-1`` (at most ``NUM_CLASSES``).
        window: ``(level, width)``; None: the abdomen preset for HU, the full range for values in [0, 1].
        opacity: fill opacity in [0, 1].
        mode: one of ``prediction``, ``ground truth``, ``both``, ``errors``.
        image_format: ``jpeg`` (fast) or ``png`` (lossless).
    """
    case = prepare_case(ct, prediction, truth, spacing, num_classes)
    if window is None:
        ct = np.asarray(ct)
        normalised = ct.size and float(ct.min()) >= 0 and float(ct.max()) <= 1
        window = (0.5, 1.0) if normalised else WINDOW_PRESETS["abdomen"]
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    settings = ViewSettings(level=float(window[0]), width=float(window[1]), opacity=opacity, mode=mode)
    return SliceViewer(case, settings, title, image_format).widget


def create_interactive_visualization(ct_data, mask_data, predicted_masks, num_classes: int = NUM_CLASSES,
                                     low: float | None = None, high: float | None = None, alpha: float = 0.4):
    """The seed's viewer call: ``(X, Y, Z)`` CT, ground truth and prediction (either may be None).

    ``low``/``high`` set the display window (None: see :func:`create_viewer`); ``alpha`` the fill
    opacity. Spacing is unknown here, so voxels are drawn square; :func:`view_case` uses the files'.
    """
    window = None if low is None or high is None else ((low + high) / 2.0, high - low)
    return create_viewer(ct_data, predicted_masks, mask_data, num_classes=num_classes, window=window, opacity=alpha)


def view_case(image_path, prediction_path=None, mask_path=None, source: str = "full", label_map=None, **options):
    """The viewer on NIfTI files: a CT, its predicted labels (our ids) and ground truth (``source`` ids).

    ``options`` go to :func:`create_viewer` (``window``, ``opacity``, ``mode``, ``title``).
    """
    from utils.labels import get_source
    from utils.volume_io import load_ct, load_mask

    volume = load_ct(image_path)
    prediction = None if prediction_path is None else load_mask(prediction_path, volume)
    truth = None
    if mask_path is not None:
        truth = get_source(source, label_map).remap(load_mask(mask_path, volume), mask_path)
    options.setdefault("title", Path(image_path).name)
    return create_viewer(volume.data, prediction, truth, volume.spacing, **options)


def view_prediction_folder(prediction_dir, image_dir, mask_dir=None, case: str | None = None,
                           source: str = "full", label_map=None, **options):
    """The viewer on one case of a ``predict`` output folder (default: the first case).

    Args:
        prediction_dir: ``<case>.nii.gz`` label files written by ``predict``.
        image_dir: the CT files predicted (``<case>.nii.gz`` or ``<case>_0000.nii.gz``).
        mask_dir: ground truth in ``source`` ids, or None.
        case: case id; None = the first prediction.
    """
    from utils.errors import UserError
    from utils.case_files import case_id_from_path

    def by_case(folder):
        files = sorted(p for p in Path(folder).glob("*.nii*") if not p.name.startswith("."))
        return {case_id_from_path(p): p for p in files}

    predictions, images = by_case(prediction_dir), by_case(image_dir)
    masks = by_case(mask_dir) if mask_dir is not None else {}
    if not predictions:
        raise UserError(f"{prediction_dir}: no .nii / .nii.gz predictions")
    case = case or next(iter(predictions))
    if case not in predictions or case not in images:
        raise UserError(f"case {case!r}: need a prediction in {prediction_dir} and an image in {image_dir}")
    return view_case(images[case], predictions[case], masks.get(case), source, label_map,
                     **{"title": case, **options})


def _start_position(case) -> tuple[int, int, int]:
    """Centre of the labelled region (truth, else prediction), else of the volume."""
    labels = case.truth if case.truth is not None else case.prediction
    if labels is not None and labels.any():
        return tuple(int(np.mean(np.flatnonzero(labels.any(axis=other)))) for other in ((1, 2), (0, 2), (0, 1)))
    return tuple(n // 2 for n in case.shape)


def _organs_present(case) -> list[int]:
    present = np.zeros(NUM_CLASSES, dtype=bool)
    for labels in (case.prediction, case.truth):
        if labels is not None:
            present |= np.bincount(labels.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES] > 0
    return [organ for organ in range(1, NUM_CLASSES) if present[organ]]


def _mode_possible(mode: str, case) -> bool:
    """Whether ``mode`` has something to show; with no labels at all, "prediction" shows the CT."""
    has_prediction, has_truth = case.prediction is not None, case.truth is not None
    if mode == "prediction":
        return has_prediction or not has_truth
    return has_truth if mode == "ground truth" else has_prediction and has_truth


def _preset_of(settings: ViewSettings, tolerance: float = 1e-6) -> str:
    """The preset whose window is within ``tolerance`` of the settings' (the browser's slider may
    send back a value rounded to its step), else "custom"."""
    return next((name for name, (level, width) in WINDOW_PRESETS.items()
                 if abs(settings.level - level) <= tolerance and abs(settings.width - width) <= tolerance),
                "custom")


def _swatch(color, text: str) -> str:
    red, green, blue = (int(c) for c in color)
    return (f'<span style="display:inline-block;width:0.9em;height:0.9em;background:rgb({red},{green},{blue});'
            f'vertical-align:middle"></span> {html.escape(text)}')


def _spacing_text(spacing) -> str:
    return " x ".join(f"{s:.2g}" for s in spacing)
