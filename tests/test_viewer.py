"""The three-plane viewer: its pure rendering core on hand-made cases, then the widget layer."""

import math

import numpy as np
import pytest

from training import slice_rendering as render
from training.viewer import create_interactive_visualization, create_viewer, view_case, view_prediction_folder
from utils.labels import COLORS

ALL_ORGANS = frozenset(range(1, 12))


def _case(shape=(7, 5, 3)):
    """A CT whose value encodes its voxel (100 x + 10 y + z), and labels on one corner voxel."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ct = (100 * x + 10 * y + z).astype(np.int16)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[1:3, 1:3, 1] = 5
    prediction = np.roll(truth, 1, axis=0)
    return ct, prediction, truth


def test_plane_slices_have_display_orientation_and_shape():
    ct, _, _ = _case()
    axial = render.plane_slice(ct, "axial", 2)
    coronal = render.plane_slice(ct, "coronal", 1)
    sagittal = render.plane_slice(ct, "sagittal", 3)
    assert axial.shape == (5, 7) and coronal.shape == (3, 7) and sagittal.shape == (3, 5)
    assert axial[0, 0] == 100 * 6 + 10 * 4 + 2   # top left: most anterior y, patient's right (largest x)
    assert coronal[0, 0] == 100 * 6 + 10 * 1 + 2  # top: most superior z
    assert sagittal[0, 0] == 100 * 3 + 10 * 4 + 2  # left: most anterior y
    for plane, (row, col) in (("axial", (4 - 3, 6 - 2)), ("coronal", (2 - 1, 6 - 2)), ("sagittal", (2 - 1, 4 - 3))):
        index = {"axial": 1, "coronal": 3, "sagittal": 2}[plane]
        assert render.crosshair_position((2, 3, 1), plane, ct.shape) == (row, col)
        assert render.plane_slice(ct, plane, index)[row, col] == 100 * 2 + 10 * 3 + 1


def test_true_aspect_from_spacing():
    assert render.plane_pixel_mm((0.8, 0.7, 2.5), "axial") == (0.7, 0.8)
    assert render.plane_pixel_mm((0.8, 0.7, 2.5), "coronal") == (2.5, 0.8)
    assert render.plane_pixel_mm((0.8, 0.7, 2.5), "sagittal") == (2.5, 0.7)
    # 512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm: the 500 mm z extent is the longest, on 512 pixels
    scale = render.display_mm_per_pixel((512, 512, 200), (0.8, 0.8, 2.5))
    assert scale == pytest.approx(500 / 512)
    rows = render.resample_indices(200, 2.5, scale)
    cols = render.resample_indices(512, 0.8, scale)
    assert len(rows) == 512 and len(cols) == round(512 * 0.8 / scale)
    assert rows[0] == 0 and rows[-1] == 199 and np.all(np.diff(rows) >= 0)
    case = render.prepare_case(np.zeros((512, 512, 200), np.int16), spacing=(0.8, 0.8, 2.5))
    table = render.window_table(40, 400, case.code_offset, case.code_step)
    coronal = render.render_plane(case, table, "coronal", 0, render.ViewSettings(), scale)
    assert coronal.shape == (512, 419, 3) and coronal.dtype == np.uint8
    small = render.display_mm_per_pixel((10, 10, 4), (1, 1, 1))  # upscaled to 256 pixels
    assert small == pytest.approx(10 / 256)


def test_window_table_matches_level_and_width():
    int_case = render.prepare_case(np.array([[[-1000, 40], [240, -160]]] * 2, dtype=np.int16))
    table = render.window_table(40, 400, int_case.code_offset, int_case.code_step)
    grey = table[int_case.codes]
    assert grey[0, 0, 0] == 0 and grey[0, 0, 1] == 128 and grey[0, 1, 0] == 255 and grey[0, 1, 1] == 0
    float_case = render.prepare_case(np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 2, 2))
    float_grey = render.window_table(0.5, 1.0, float_case.code_offset, float_case.code_step)[float_case.codes]
    assert float_grey.min() == 0 and float_grey.max() == 255
    with pytest.raises(ValueError, match="width"):
        render.window_table(0, 0, 0, 1)


def test_fill_colour_and_opacity():
    grey = np.full((4, 4), 100, dtype=np.uint8)
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[1, 1] = 4
    rgb = render.compose(grey, labels, None, render.ViewSettings(mode="prediction", opacity=0.5))
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[1, 1], (np.array(COLORS[4]) + 100) / 2, atol=1)
    assert (rgb[0, 0] == 100).all()
    hidden = render.compose(grey, labels, None, render.ViewSettings(mode="prediction", visible=frozenset({5})))
    assert (hidden == 100).all()


def test_a_label_covering_the_slice_is_outlined_not_washed():
    grey = np.full((10, 10), 100, dtype=np.uint8)
    labels = np.full((10, 10), 6, dtype=np.uint8)  # rectum everywhere, as an untrained model does
    rgb = render.compose(grey, labels, None, render.ViewSettings(mode="prediction", opacity=0.9))
    assert (rgb[1:-1, 1:-1] == 100).all()  # the CT inside stays readable
    assert (rgb[0, 0] == COLORS[6]).all()   # the outline shows the label


def test_error_mode_colours_false_positives_and_negatives():
    prediction = np.array([[0, 5, 5, 4]], dtype=np.uint8)
    truth = np.array([[5, 5, 0, 5]], dtype=np.uint8)
    errors = render.error_map(prediction, truth, ALL_ORGANS)
    assert errors.tolist() == [[2, 0, 1, 2]]  # missed, correct, extra, wrong organ (a miss)
    assert render.error_map(prediction, truth, frozenset({4})).tolist() == [[0, 0, 0, 1]]
    grey = np.zeros((5, 5), dtype=np.uint8)
    pred2d, truth2d = np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8)
    pred2d[0, 0] = 3   # false positive
    truth2d[4, 4] = 3  # false negative
    rgb = render.compose(grey, pred2d, truth2d, render.ViewSettings(mode="errors", opacity=1.0))
    assert tuple(rgb[0, 0]) == render.FALSE_POSITIVE_COLOR
    assert tuple(rgb[4, 4]) == render.FALSE_NEGATIVE_COLOR or tuple(rgb[4, 4]) == COLORS[3]  # outline on top
    assert (rgb[2, 2] == 0).all()


def test_dice_of_visible_organs():
    prediction = np.zeros((4, 4, 2), dtype=np.uint8)
    truth = np.zeros((4, 4, 2), dtype=np.uint8)
    truth[:2, :2, 0] = 5            # 4 liver voxels
    prediction[:2, :1, 0] = 5       # 2 of them predicted
    prediction[3, 3, 1] = 4         # kidney predicted, absent from the truth
    counts = render.confusion_counts(prediction, truth)
    assert counts.sum() == 32 and counts[5, 5] == 2 and counts[0, 5] == 2
    dice = render.visible_dice(counts, {5, 4, 7})
    assert dice[5] == pytest.approx(2 * 2 / (2 + 4)) and dice[4] == 0.0 and math.isnan(dice[7])
    assert list(render.visible_dice(counts, {5})) == [5]


def test_prepare_case_rejects_bad_input():
    ct, prediction, truth = _case()
    with pytest.raises(ValueError, match="shape"):
        render.prepare_case(ct, prediction[:-1], truth)
    with pytest.raises(ValueError, match="outside"):
        render.prepare_case(ct, np.full(ct.shape, 12, np.uint8))
    with pytest.raises(ValueError, match="spacing"):
        render.prepare_case(ct, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        render.prepare_case(ct[:, :, 0])


def test_crosshair_crosses_the_other_planes():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    case = render.prepare_case(np.zeros((30, 20, 10), np.int16))
    out = render.draw_crosshair(rgb, "axial", (5, 7, 0), case, 1.0)
    assert (rgb == 0).all()  # a copy
    assert (out[20 - 1 - 7, 0] == render.CROSSHAIR_COLOR).all() and (out[0, 30 - 1 - 5] == render.CROSSHAIR_COLOR).all()


def test_widget_sliders_toggles_modes_and_window():
    widgets = pytest.importorskip("ipywidgets")
    ct, prediction, truth = _case((24, 20, 9))
    truth = np.zeros(ct.shape, np.uint8)
    truth[5:12, 5:12, 2:7], truth[14:18, 8:12, 3:6] = 5, 4
    prediction = np.roll(truth, 2, axis=0)
    box = create_viewer(ct, prediction, truth, spacing=(1.0, 1.0, 3.0))
    viewer = box.viewer
    assert isinstance(box, widgets.VBox) and set(viewer.sliders) == {"axial", "coronal", "sagittal"}
    assert all(slider.continuous_update for slider in viewer.sliders.values())
    assert sorted(viewer.organ_toggles) == [4, 5] and list(viewer.mode.options) == list(render.MODES)
    before = {plane: bytes(image.value) for plane, image in viewer.images.items()}
    assert before["axial"][:2] == b"\xff\xd8"  # JPEG
    viewer.sliders["axial"].value = 3 if viewer.sliders["axial"].value != 3 else 4
    assert all(bytes(viewer.images[plane].value) != before[plane] for plane in before)  # slice + crosshairs
    axial = bytes(viewer.images["axial"].value)
    viewer.organ_toggles[5].value = False
    assert bytes(viewer.images["axial"].value) != axial and "Liver" not in viewer.info.value and "Kidney" in viewer.info.value
    assert viewer.preset.value == "abdomen" and viewer.level.step == 1.0  # presets exact on the slider grid
    viewer.preset.value = "bone"
    assert (viewer.level.value, viewer.width.value) == render.WINDOW_PRESETS["bone"]
    viewer.level.value = 123.0
    assert viewer.preset.value == "custom"
    viewer.mode.value = "errors"
    assert "false positive" in viewer.info.value


def test_seed_signature_and_missing_labels():
    pytest.importorskip("ipywidgets")
    ct, prediction, truth = _case((12, 10, 6))
    viewer = create_interactive_visualization(ct, truth, prediction, num_classes=12).viewer
    assert viewer.settings.opacity == 0.4
    truth_only = create_interactive_visualization(ct, truth, None).viewer
    assert truth_only.mode.options == ("ground truth",) and truth_only.counts is None
    normalised = create_interactive_visualization(np.random.default_rng(0).random((8, 8, 4)), None, None).viewer
    assert (normalised.settings.level, normalised.settings.width) == (0.5, 1.0)
    with pytest.raises(ValueError, match="shape"):
        create_interactive_visualization(ct, truth[:-1], prediction)


def test_view_case_and_prediction_folder_read_nifti(tmp_path):
    pytest.importorskip("ipywidgets")
    from utils.errors import UserError
    from utils.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "raw", 1, "full", seed=3, size=32, num_slices=8, progress=False)
    image = next((tmp_path / "raw" / "Image").glob("*.nii.gz"))
    mask = tmp_path / "raw" / "Mask" / image.name.replace("_0000", "")
    mask = mask if mask.exists() else next((tmp_path / "raw" / "Mask").glob("*.nii.gz"))
    viewer = view_case(image, mask, mask).viewer  # the truth as its own prediction: Dice 1
    assert viewer.case.spacing[0] > 1 and "1.000" in viewer.info.value
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / mask.name).write_bytes(mask.read_bytes())
    folder_viewer = view_prediction_folder(tmp_path / "pred", tmp_path / "raw" / "Image", tmp_path / "raw" / "Mask")
    assert folder_viewer.viewer.counts is not None
    with pytest.raises(UserError, match="no .nii"):
        view_prediction_folder(tmp_path / "raw" / "none", tmp_path / "raw" / "Image")


def test_error_mode_outlines_an_error_covering_the_slice():
    grey = np.full((10, 10), 100, dtype=np.uint8)
    prediction = np.full((10, 10), 6, dtype=np.uint8)  # rectum everywhere
    truth = np.zeros((10, 10), dtype=np.uint8)
    rgb = render.compose(grey, prediction, truth, render.ViewSettings(mode="errors"))
    assert (rgb[1:-1, 1:-1] == 100).all() and tuple(rgb[0, 0]) == render.FALSE_POSITIVE_COLOR
