import json

import numpy as np
import pytest

from utils.labels import (
    COLORS,
    EXAMPLE_PKU_MAP,
    NUM_CLASSES,
    ORGAN_IDS,
    ORGANS,
    PKU_EXAMPLE_IDS,
    LabelMapError,
    get_source,
    label_sets_from_annotated,
    label_sets_from_lists,
    label_sets_to_lists,
    load_label_map,
    scoreable_classes,
)


def test_scheme_has_twelve_classes_in_the_fixed_order():
    assert ORGANS == ("background", "bladder", "colon", "femur_head", "kidney", "liver", "rectum",
                      "small_intestine", "spinal_cord", "stomach", "spleen", "pancreas")
    assert NUM_CLASSES == 12 and len(COLORS) == 12 and len(set(COLORS)) == 12


def test_abdomenct1k_map_and_annotated_set():
    source = get_source("abdomenct1k")
    assert source.remap(np.array([0, 1, 2, 3, 4])).tolist() == [0, 5, 4, 10, 11]
    assert source.annotated == {4, 5, 10, 11}
    assert source.annotated_mask().tolist() == [True] + [i in (4, 5, 10, 11) for i in range(1, 12)]


def test_totalseg_maps_our_organs_and_sends_everything_else_to_background():
    source = get_source("totalseg")
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 18, 19, 20, 21, 22, 75, 76, 79, 117])
    assert source.remap(ids).tolist() == [10, 4, 4, 0, 5, 9, 11, 7, 7, 2, 1, 0, 3, 3, 8, 0]
    assert 6 not in source.annotated  # TotalSegmentator has no rectum class


def test_pku_example_map_merges_left_and_right():
    shipped = json.loads(EXAMPLE_PKU_MAP.read_text())["labels"]
    assert {k: v for k, v in shipped.items() if k != "background"} == PKU_EXAMPLE_IDS
    source = get_source("pku", EXAMPLE_PKU_MAP)
    assert source.remap(np.array([3, 4, 5, 6])).tolist() == [3, 3, 4, 4]
    assert source.annotated == set(range(1, 10))


def test_remap_is_one_lookup_on_a_full_volume():
    mask = np.random.default_rng(0).integers(0, 5, size=(64, 64, 20), dtype=np.uint8)
    out = get_source("abdomenct1k").remap(mask)
    assert out.shape == mask.shape and out.dtype == np.uint8
    assert (out[mask == 3] == 10).all()


def test_unknown_mask_values_name_the_file():
    with pytest.raises(LabelMapError, match=r"case7\.nii\.gz: mask values \[9\]"):
        get_source("abdomenct1k").remap(np.array([0, 9]), "case7.nii.gz")


def test_nnunet_names_with_synonyms(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {
        "background": 0, "urinary_bladder": 1, "small_bowel": 2, "kidney_left": 3, "Kidney Right": 4,
        "duodenum": 5}}))
    source = get_source("nnunet", tmp_path)
    assert source.remap(np.array([1, 2, 3, 4, 5])).tolist() == [1, 7, 4, 4, 7]


def test_unknown_label_names_are_reported_not_guessed(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "gallbladder": 2}}))
    with pytest.raises(LabelMapError, match="gallbladder"):
        load_label_map(path)
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "gallbladder": 2},
                                "ignore": ["gallbladder"]}))
    assert load_label_map(path).remap(np.array([1, 2])).tolist() == [5, 0]


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not a valid label-map file"),
    ('{"labels": []}', "non-empty \"labels\""),
    ('{"labels": {"liver": "one"}}', "has id 'one'"),
])
def test_malformed_label_map_files(tmp_path, text, problem):
    path = tmp_path / "map.json"
    path.write_text(text)
    with pytest.raises(LabelMapError, match=problem) as err:
        load_label_map(path)
    assert str(path) in str(err.value)


# --- label-map rules: each mistake is an error naming the file, never a silent guess --------------

def _write_map(tmp_path, labels, **extra):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"labels": labels, **extra}))
    return path


@pytest.mark.parametrize("labels, problem", [
    ({"background": 0, "liver": 1, "spleen": 1}, "'liver' and 'spleen' both have id 1"),
    ({"background": 0, "liver": 0}, "'background' and 'liver' both have id 0"),
    ({"liver": 0, "spleen": 1}, "organ 'liver' has id 0"),
    ({"background": 0, "liver": 65536}, r"id 65536; ids are integers 0..65535"),
    ({"background": 0, "liver": -1}, r"id -1; ids are integers 0..65535"),
    ({"background": 0, "liver": 1.0}, r"id 1.0; ids are integers"),
    ({"background": 0, "liver": True}, r"id True; ids are integers"),
    ({"background": 0, "kidney_left": [2, 3]}, r"id \[2, 3\]"),
])
def test_label_map_rules(tmp_path, labels, problem):
    path = _write_map(tmp_path, labels)
    with pytest.raises(LabelMapError, match=problem) as err:
        load_label_map(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_label_map_limits_that_are_allowed(tmp_path):
    """The largest id, background at a non-zero id, an ignored name: all usable."""
    path = _write_map(tmp_path, {"background": 0, "bg": 7, "liver": 65535, "heart": 2},
                      ignore=["heart"])
    source = load_label_map(path)
    assert source.remap(np.array([0, 7, 65535, 2], dtype=np.int32)).tolist() == [0, 0, 5, 0]
    assert source.annotated == {5}


def test_ignore_must_be_a_list_of_names(tmp_path):
    with pytest.raises(LabelMapError, match='"ignore" must be a list'):
        load_label_map(_write_map(tmp_path, {"background": 0, "liver": 1}, ignore="heart"))


def test_missing_label_map_file_names_it(tmp_path):
    with pytest.raises(LabelMapError, match=r"nope\.json: label-map file not found"):
        load_label_map(tmp_path / "nope.json")


def test_pku_needs_its_map():
    with pytest.raises(LabelMapError, match="'pku' source needs its label-map JSON") as err:
        get_source("pku")
    assert str(EXAMPLE_PKU_MAP) in str(err.value)  # the message says where the example is
    assert get_source("pku", EXAMPLE_PKU_MAP).remap(np.array([7])).tolist() == [5]


def test_nnunet_needs_its_dataset_json():
    with pytest.raises(LabelMapError, match="'nnunet' source needs the dataset folder"):
        get_source("nnunet")


@pytest.mark.parametrize("name", ["full", "abdomenct1k", "totalseg"])
def test_a_map_for_a_source_with_fixed_ids_is_an_error(name):
    with pytest.raises(LabelMapError, match=f"'{name}' source has fixed ids and uses no label map") as err:
        get_source(name, EXAMPLE_PKU_MAP)
    assert str(EXAMPLE_PKU_MAP) in str(err.value)


def test_unknown_source():
    with pytest.raises(LabelMapError, match="unknown source 'pkku'"):
        get_source("pkku", EXAMPLE_PKU_MAP)


def _ids(*names):
    return sorted(ORGAN_IDS[name] for name in names)


@pytest.mark.parametrize("name", ["full", "abdomenct1k", "pku"])
def test_single_class_sources_have_identity_rows_and_a_background_row(name):
    source = get_source(name, EXAMPLE_PKU_MAP if name == "pku" else None)
    sets = source.label_sets()
    assert sets.shape == (NUM_CLASSES, NUM_CLASSES) and sets.dtype == bool
    left_out = [c for c in range(1, NUM_CLASSES) if c not in source.annotated]
    assert np.flatnonzero(sets[0]).tolist() == [0, *left_out]
    assert (sets[1:] == np.eye(NUM_CLASSES, dtype=bool)[1:]).all()
    assert (sets == label_sets_from_annotated(source.annotated)).all()
    assert scoreable_classes(sets).tolist() == [not left_out] + [c in source.annotated for c in range(1, 12)]


def test_totalseg_femur_and_colon_are_sets():
    source = get_source("totalseg")
    sets = source.label_sets()
    assert np.flatnonzero(sets[ORGAN_IDS["femur_head"]]).tolist() == _ids("background", "femur_head")
    assert np.flatnonzero(sets[ORGAN_IDS["colon"]]).tolist() == _ids("colon", "rectum")
    assert np.flatnonzero(sets[0]).tolist() == _ids("background", "rectum")
    assert sets[ORGAN_IDS["liver"]].sum() == 1 and sets[ORGAN_IDS["liver"], ORGAN_IDS["liver"]]
    # the stored ids stay the nominal ones, so the seed's way trains on the same arrays
    assert source.remap(np.array([20, 75, 76])).tolist() == _ids("colon", "femur_head", "femur_head")
    scoreable = {ORGANS[c] for c in np.flatnonzero(scoreable_classes(sets))}
    assert scoreable == {"bladder", "kidney", "liver", "small_intestine", "spinal_cord", "stomach",
                         "spleen", "pancreas"}


def test_scoreable_classes_of_a_batch_and_of_a_set_id():
    sets = np.stack([label_sets_from_annotated([1], 3), np.eye(3, dtype=bool)])  # (2, 3, 3)
    assert scoreable_classes(sets).tolist() == [[False, True, False], [True, True, True]]
    with_set_id = np.vstack([np.eye(3, dtype=bool), [[False, True, True]]])  # value 3 = {1, 2}
    assert scoreable_classes(with_set_id).tolist() == [True, False, False]


def test_label_sets_round_trip_through_lists_and_reject_bad_rows():
    sets = get_source("totalseg").label_sets()
    rows = label_sets_to_lists(sets)
    assert rows[0] == _ids("background", "rectum") and rows[5] == [5]
    assert (label_sets_from_lists(rows) == sets).all()
    json.dumps(rows)  # plain ints, manifest-ready
    with pytest.raises(ValueError, match="at least 12 rows"):
        label_sets_from_lists(rows[:3])
    with pytest.raises(ValueError, match="value 4"):
        label_sets_from_lists(rows[:4] + [[]] + rows[5:])
    with pytest.raises(ValueError, match="value 1"):
        label_sets_from_lists([[0], [12]] + rows[2:])
