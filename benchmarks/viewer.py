"""Benchmark: slice-viewer frames per second while a slider moves, the seed's way against ours.

Issue 17: "sliders that update while dragging, at 10 or more frames per second on a
512 x 512 x 200 volume on 2 CPU cores".

On one synthetic case (``utils.phantom.make_phantom`` at 512 x 512 x 200, its labels as ground
truth, the labels shifted by 6 voxels as the prediction) it measures, in one run:

(a) ``old``: what one step of the previous viewer's axial slider cost: a matplotlib figure of the
    slice with its overlay and legend (``slice_figure``), rendered to PNG (``old_render`` below is
    a copy of the previous ``create_interactive_visualization`` render function).
(b) ``new``: one step of the axial slider of ``training.viewer.create_viewer``: the slider's
    value is set, and the widget callback renders the axial plane from the cached grey-level
    table, redraws the crosshair on all three planes and re-encodes the three images as JPEG.
    The widgets run without a browser, so the time is the kernel's side of a step (what limits
    the frame rate while dragging); the browser's decode of three ~50 kB JPEGs adds little.

Usage::

    python benchmarks/viewer.py             # 512 x 512 x 200
    python benchmarks/viewer.py --quick     # 128 x 128 x 40, seconds

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.cpu import cpu_model_name  # noqa: E402
from training.visualization import figure_to_png, slice_figure  # noqa: E402
from training.viewer import create_viewer  # noqa: E402
from utils.phantom import make_phantom  # noqa: E402


def old_render(ct_data, mask_data, predicted_masks, z: int, mode: str = "both", alpha: float = 0.4,
               low: float = -400.0, high: float = 400.0) -> bytes:
    """The previous viewer's per-step render (its ``render`` closure), kept here as the baseline."""
    prediction = predicted_masks if mode in ("both", "prediction") else None
    ground_truth = mask_data if mode in ("both", "ground truth") else None
    fig = slice_figure(ct_data[:, :, z], None if prediction is None else prediction[:, :, z],
                       None if ground_truth is None else ground_truth[:, :, z],
                       title=f"axial slice z = {z} / {ct_data.shape[2] - 1}", alpha=alpha, low=low, high=high)
    return figure_to_png(fig)


def frames_per_second(step, indices) -> float:
    """Steps per second over ``indices`` (after one warm-up step)."""
    step(indices[0])
    started = time.perf_counter()
    for index in indices[1:]:
        step(index)
    return (len(indices) - 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 x 128 x 40 instead of 512 x 512 x 200")
    parser.add_argument("--steps", type=int, default=40, help="slider steps timed per path")
    args = parser.parse_args()
    size, depth = (128, 40) if args.quick else (512, 200)
    phantom = make_phantom(seed=0, size=size, num_slices=depth)
    truth = phantom.labels
    prediction = np.roll(truth, 6, axis=0)
    organ_slices = np.flatnonzero(truth.any(axis=(0, 1)))
    indices = [int(i) for i in np.linspace(organ_slices[0], organ_slices[-1], args.steps + 1).round()]

    old_fps = frames_per_second(lambda z: old_render(phantom.hu, truth, prediction, z), indices)
    started = time.perf_counter()
    box = create_viewer(phantom.hu, prediction, truth, phantom.spacing)
    create_seconds = time.perf_counter() - started
    slider = box.viewer.sliders["axial"]
    new_fps = frames_per_second(lambda z: setattr(slider, "value", z), indices)
    image_bytes = sum(len(image.value) for image in box.viewer.images.values())
    result = {
        "volume": list(phantom.hu.shape), "spacing_mm": [round(s, 3) for s in phantom.spacing],
        "steps": args.steps, "old_fps": round(old_fps, 2), "new_fps": round(new_fps, 2),
        "speedup": round(new_fps / old_fps, 1), "new_create_seconds": round(create_seconds, 2),
        "new_bytes_per_step": image_bytes, "cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "quick": args.quick,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
