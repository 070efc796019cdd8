"""Viewer and report figures: orientation, overlay colours, figures built without pyplot state."""

import matplotlib

matplotlib.use("Agg")  # tests must never open a window; the library itself sets no backend

import numpy as np
import pytest
from matplotlib.figure import Figure

from training import visualization as viz
from utils.labels import COLORS, DISPLAY_NAMES


def _synthetic_case(shape=(24, 20, 8)):
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[3:-3, 3:-3] = 40
    gt = np.zeros(shape, dtype=np.uint8)
    gt[5:10, 5:10, 2:6] = 5   # liver
    gt[14:18, 8:12, 3:5] = 4  # kidney
    return ct, np.roll(gt, 1, axis=0), gt


def test_to_display_puts_patient_right_left_and_anterior_top():
    slice_xy = np.zeros((5, 4))  # (X, Y): X grows toward the patient's right, Y toward anterior
    slice_xy[4, 3] = 1  # right-anterior corner
    slice_xy[0, 0] = 2  # left-posterior corner
    shown = viz.to_display(slice_xy)
    assert shown.shape == (4, 5)  # (rows = Y, cols = X)
    assert shown[0, 0] == 1  # top left of the image
    assert shown[-1, -1] == 2
    assert viz.to_display(np.zeros((5, 4, 3))).shape == (4, 5, 3)


def test_window_to_rgb_clips_to_unit_range():
    rgb = viz.window_to_rgb(np.array([[-1000.0, 0.0, 1000.0]]), low=-400, high=400)
    assert rgb.shape == (1, 3, 3)
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        viz.window_to_rgb(np.zeros((2, 2)), low=1, high=1)


def test_overlay_fill_and_contour():
    image = np.zeros((12, 12))
    prediction = np.zeros((12, 12), dtype=np.uint8)
    prediction[1, 1] = 5
    truth = np.zeros((12, 12), dtype=np.uint8)
    truth[4:9, 4:9] = 4  # a 5x5 square
    rgb = viz.overlay(image, prediction, truth, alpha=0.4)
    assert rgb.shape == (12, 12, 3) and rgb.min() >= 0 and rgb.max() <= 1
    grey = viz.window_to_rgb(image)[0, 0]
    liver, kidney = np.array(COLORS[5]) / 255, np.array(COLORS[4]) / 255
    np.testing.assert_allclose(rgb[1, 1], 0.6 * grey + 0.4 * liver, atol=1e-6)
    boundary = viz.label_boundary(truth)
    assert boundary.sum() == 16  # the ring of a 5x5 square
    for r, c in zip(*np.nonzero(boundary)):
        np.testing.assert_allclose(rgb[r, c], kidney, atol=1e-6)
    np.testing.assert_allclose(rgb[5:8, 5:8], np.broadcast_to(grey, (3, 3, 3)), atol=1e-6)  # interior untouched
    np.testing.assert_allclose(rgb[0, 5], grey, atol=1e-6)  # outside untouched


def test_overlay_rejects_bad_labels():
    with pytest.raises(ValueError, match="shape"):
        viz.overlay(np.zeros((4, 4)), np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="outside"):
        viz.overlay(np.zeros((4, 4)), np.full((4, 4), 12, dtype=np.uint8))


def test_legend_handles_names_and_colours():
    handles = viz.legend_handles([0, 5, 4])
    assert [h.get_label() for h in handles] == [DISPLAY_NAMES[4], DISPLAY_NAMES[5]]
    assert len(viz.legend_handles()) == 11


def test_slice_figure_is_a_plain_figure():
    import matplotlib.pyplot as plt

    ct, pred, gt = _synthetic_case()
    before = plt.get_fignums()
    fig = viz.slice_figure(ct[:, :, 3], pred[:, :, 3], gt[:, :, 3], title="z = 3")
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == before  # nothing registered with pyplot
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert DISPLAY_NAMES[5] in labels and DISPLAY_NAMES[4] in labels


def test_slice_grid_saves_png_and_picks_organ_slices(tmp_path):
    ct, pred, gt = _synthetic_case()
    path = tmp_path / "grid.png"
    fig = viz.slice_grid(ct, pred, gt, num_slices=3, path=path)
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert viz.choose_slices(gt, gt.shape[2], 3) == [2, 4, 5]  # organs on z = 2..5 only
    assert viz.choose_slices(None, 8, 12) == list(range(8))
    viz.slice_grid(ct, None, None, num_slices=2)  # CT alone works too


def test_dice_bar_chart_single_and_grouped(tmp_path):
    fig = viz.dice_bar_chart({"liver": 0.9, "kidney": float("nan"), "mean": 0.8}, path=tmp_path / "a.png")
    assert isinstance(fig, Figure) and (tmp_path / "a.png").exists()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["Kidney", "Liver", "mean"]  # organs in id order, other keys last
    grouped = viz.dice_bar_chart({"pku only": {"liver": 0.9}, "both": {"liver": 0.95, "spleen": 0.7}})
    assert len(grouped.axes[0].patches) == 4  # 2 series x 2 organs
    viz.dice_bar_chart({})


def test_error_bars_span_the_spread():
    from training.error_bars import add_error_bars

    fig = viz.dice_bar_chart({"a": {"liver": 0.8, "spleen": 0.5}, "b": {"liver": 0.9, "spleen": 0.6}})
    add_error_bars(fig, [[0.1, float("nan")], [0.0, 0.05]])  # organ id order: liver (5), spleen (10)
    bars = [line for collection in fig.axes[0].collections for line in collection.get_segments()]
    spans = sorted(round(float(segment[1][1] - segment[0][1]), 6) for segment in bars)
    assert spans == [0.0, 0.0, 0.1, 0.2]  # liver a 0.8 +- 0.1, spleen b 0.6 +- 0.05; NaN and 0 draw nothing
    with pytest.raises(ValueError, match="do not match"):
        add_error_bars(fig, [[0.1]])


def test_training_curves_from_csv_strings(tmp_path):
    rows = [{"epoch": str(e), "train_loss": str(1 / e), "val_loss": "", "val_mean_dice": "0.5", "lr": "0.001"}
            for e in range(1, 4)]
    fig = viz.training_curves(rows, path=tmp_path / "curves.png")
    assert len(fig.axes) == 3 and (tmp_path / "curves.png").exists()
    assert len(viz.training_curves([{k: v for k, v in r.items() if k != "lr"} for r in rows]).axes) == 2


def test_seed_viewer_import_path_still_works():
    from training.viewer import create_interactive_visualization

    assert viz.create_interactive_visualization is create_interactive_visualization
