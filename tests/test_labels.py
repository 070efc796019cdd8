import json

import numpy as np
import pytest

from utils.labels import (COLORS, NUM_CLASSES, ORGANS, PKU_EXAMPLE_IDS, EXAMPLE_PKU_MAP, LabelMapError,
                          get_source, load_label_map)


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
