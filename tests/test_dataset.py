"""Slice datasets over preprocessed folders: case-level splits, items, 2.5D, batches, workers."""

import numpy as np
import pytest
import torch

from tests.test_preprocess import blob_mask, write_ct_case
from utils.dataset import (SliceDataset, batch_to_device, create_train_val_datasets, load_and_pair_files,
                           load_cases, resident_batches, split_cases)
from utils.geometry import PreprocessError, PreprocessParams
from utils.labels import NUM_CLASSES, ORGAN_IDS
from utils.preprocess_data import preprocess_dataset

PARAMS = PreprocessParams(target_size=(32, 32))


def make_folder(tmp_path, name, source, case_ids, slices=6):
    """A preprocessed folder of small synthetic cases whose slices all differ."""
    raw = tmp_path / f"raw_{name}"
    for n, case_id in enumerate(case_ids):
        mask = blob_mask(shape=(24, 20, slices + n))
        image = np.full(mask.shape, -1000, dtype=np.int16)
        image[2:-2, 2:-2] = np.arange(mask.shape[2], dtype=np.int16) * 40 - 200  # slice z: its own HU
        write_ct_case(raw / "images", raw / "masks", case_id, mask, image=image)
    out = tmp_path / name
    manifest = preprocess_dataset(source, raw / "images", raw / "masks", out, PARAMS, progress=False)
    assert not manifest["failed"]
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dataset")
    return (make_folder(tmp_path, "act1k", "abdomenct1k", [f"A{i}" for i in range(5)]),
            make_folder(tmp_path, "full", "full", ["F0", "F1", "F2"]))


def test_split_is_by_case_and_deterministic(folders):
    cases = load_cases(list(folders))
    assert len(cases) == 8 and all(case["params"] == PARAMS.to_dict() for case in cases)
    assert load_and_pair_files(list(folders)) == cases  # the seed's name for the same records
    train, val = split_cases(cases, test_size=0.25, seed=3)
    train_ids, val_ids = {c["case_id"] for c in train}, {c["case_id"] for c in val}
    assert len(val_ids) == 2 and not train_ids & val_ids and len(train_ids | val_ids) == 8
    again = split_cases(list(reversed(cases)), test_size=0.25, seed=3)
    assert [c["case_id"] for c in again[1]] == [c["case_id"] for c in val]
    train_set, val_set = create_train_val_datasets(cases, test_size=0.25, seed=3)
    assert {train_set.cases[int(k)]["case_id"] for k in train_set.case_index} == train_ids
    assert {val_set.cases[int(k)]["case_id"] for k in val_set.case_index} == val_ids
    assert len(train_set) + len(val_set) == sum(c["num_slices"] for c in cases)
    tiny_train, tiny_val = split_cases(cases[:2], test_size=0.01)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_duplicate_case_ids_across_folders_are_an_error(folders, tmp_path):
    with pytest.raises(PreprocessError, match="A0.*unique"):
        load_cases([folders[0], folders[0]])
    with pytest.raises(PreprocessError, match="no manifest"):
        load_cases(tmp_path)


def test_items_shapes_dtypes_and_annotated(folders):
    dataset = SliceDataset(load_cases(list(folders)))
    item = dataset[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.uint8
    assert item["distance"].shape == (32, 32) and item["distance"].dtype == torch.uint8
    assert item["annotated"].shape == (NUM_CLASSES,) and item["annotated"].dtype == torch.bool
    by_source = {dataset.cases[dataset[i]["case"]]["source"]: dataset[i]["annotated"] for i in range(len(dataset))}
    act1k = {0, *(ORGAN_IDS[o] for o in ("liver", "kidney", "spleen", "pancreas"))}
    assert set(torch.nonzero(by_source["abdomenct1k"]).flatten().tolist()) == act1k
    assert by_source["full"].all()


def test_neighbouring_slices_as_channels(folders):
    (case,) = [c for c in load_cases(folders[0]) if c["case_id"] == "A1"]
    dataset = SliceDataset([case], in_channels=3)
    stored = np.load(f"{case['folder']}/image.npy")
    last = case["num_slices"] - 1
    for z, expected in ((0, [0, 0, 1]), (3, [2, 3, 4]), (last, [last - 1, last, last])):
        item = dataset[z]
        assert item["slice"] == z
        assert np.array_equal(item["image"].numpy(), stored[expected])
        assert np.array_equal(item["label"].numpy(), np.load(f"{case['folder']}/label.npy")[z])
    with pytest.raises(ValueError, match="odd"):
        SliceDataset([case], in_channels=2)


def test_batch_to_device_converts_dtypes(folders):
    dataset = SliceDataset(load_cases(folders[1]))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    moved = batch_to_device(batch, "cpu", channels_last=True)
    assert moved["image"].dtype == torch.float32 and moved["image"].max() <= 1
    assert torch.equal(moved["image"] * 255, batch["image"].float())
    assert moved["label"].dtype == torch.int64 and moved["distance"].dtype == torch.float32
    assert moved["annotated"].dtype == torch.bool and moved["annotated"].shape == (4, NUM_CLASSES)


def test_dataloader_with_workers(folders):
    dataset = SliceDataset(load_cases(list(folders)), in_channels=3)
    dataset[0]  # opens memory maps in this process; workers must open their own
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["slice"]) for b in batches) == len(dataset)
    assert torch.equal(batches[0]["image"][1], dataset[1]["image"])
    assert torch.equal(torch.cat([b["case"] for b in batches]), torch.as_tensor(dataset.case_index))


def test_resident_batches_match_items(folders):
    dataset = SliceDataset(load_cases(list(folders)), in_channels=3)
    generator = torch.Generator().manual_seed(0)
    batches = list(resident_batches(dataset, "cpu", 7, generator))
    assert sum(len(b["slice"]) for b in batches) == len(dataset)
    for batch in batches[:2]:
        for j in range(len(batch["slice"])):
            index = int(np.flatnonzero((dataset.case_index == int(batch["case"][j]))
                                       & (dataset.slice_index == int(batch["slice"][j])))[0])
            item = dataset[index]
            for key in ("image", "label", "distance", "annotated"):
                assert torch.equal(batch[key][j], item[key]), key
    order = [b["slice"] for b in resident_batches(dataset, "cpu", 7, torch.Generator().manual_seed(0))]
    assert all(torch.equal(a, b["slice"]) for a, b in zip(order, batches))

