"""Set-valued labels end to end: the manifest stores each case's label sets, the dataset yields
them (rebuilt from "annotated" for older manifests), the training loss and the per-case 3D
validation Dice use them, and the exclusion switch is a validated config field."""

import numpy as np
import pytest
import torch

from training.config import ConfigError, TrainConfig, with_partial_labels
from training.runtime import Runtime
from training.train import batch_label_sets, loss_from_config
from training.validation import validate_cases
from utils.dataset import SliceDataset, batch_to_device, case_label_sets, load_cases, resident_batch
from utils.geometry import PreprocessError, PreprocessParams
from utils.labels import NUM_CLASSES, ORGAN_IDS, get_source, label_sets_from_annotated, label_sets_to_lists
from utils.metrics import case_dice_3d
from utils.phantom.sets import preprocess_phantoms

LIVER, KIDNEY, SPLEEN, COLON, RECTUM = (ORGAN_IDS[n] for n in ("liver", "kidney", "spleen", "colon", "rectum"))


@pytest.fixture(scope="module")
def totalseg_folder(tmp_path_factory):
    return preprocess_phantoms(tmp_path_factory.mktemp("totalseg"), 1, "totalseg", seed=41, size=48,
                               num_slices=6, params=PreprocessParams(target_size=(24, 24)))


def test_manifest_and_dataset_carry_the_totalseg_sets(totalseg_folder):
    case = load_cases(totalseg_folder)[0]
    assert case["label_sets"][COLON] == [COLON, RECTUM]
    dataset = SliceDataset([case])
    item = dataset[0]
    assert item["label_sets"].shape == (NUM_CLASSES, NUM_CLASSES) and item["label_sets"].dtype == torch.bool
    assert torch.equal(item["label_sets"], torch.from_numpy(get_source("totalseg").label_sets()))
    batch = batch_to_device(torch.utils.data.default_collate([dataset[0], dataset[1]]), "cpu")
    assert batch["label_sets"].shape == (2, NUM_CLASSES, NUM_CLASSES)
    assert torch.equal(resident_batch(dataset, "cpu", [0, 1])["label_sets"], batch["label_sets"])


def test_old_manifest_without_label_sets_falls_back_to_annotated():
    old = {"case_id": "a", "annotated": [LIVER, KIDNEY]}
    assert np.array_equal(case_label_sets(old), label_sets_from_annotated([LIVER, KIDNEY]))
    bad = {"case_id": "b", "annotated": [LIVER], "label_sets": [[0]] * 3}
    with pytest.raises(PreprocessError, match="case b"):
        case_label_sets(bad)


def test_training_loss_sees_the_sets_not_just_annotated():
    """On a colon pixel, predicting rectum costs nothing under the set but is penalised as a
    single-class label: the loss must get the (B, L, C) sets."""
    cfg = with_partial_labels(TrainConfig(loss="weighted_ce", alpha=0.0), "marginal")
    loss_fn = loss_from_config(cfg)
    target = torch.full((1, 2, 2), COLON)
    logits = torch.zeros(1, NUM_CLASSES, 2, 2)
    logits[:, RECTUM] = 8.0
    sets = torch.from_numpy(get_source("totalseg").label_sets())[None]
    batch = {"label_sets": sets, "annotated": torch.from_numpy(get_source("totalseg").annotated_mask())[None]}
    chosen = batch_label_sets(batch, NUM_CLASSES)
    assert chosen.shape == (1, NUM_CLASSES, NUM_CLASSES)
    with_sets = loss_fn(logits, target, torch.zeros(1, 2, 2), chosen)
    as_single = loss_fn(logits, target, torch.zeros(1, 2, 2), batch["annotated"])
    assert with_sets < 0.01 < as_single
    assert batch_label_sets({"annotated": batch["annotated"]}, 5).shape == (1, 5)


def test_exclusion_is_a_validated_config_field():
    assert TrainConfig().exclusion == "merged"
    assert with_partial_labels(TrainConfig(), "marginal").exclusion == "published"
    assert TrainConfig(exclusion="published").exclusion == "published"
    with pytest.raises(ConfigError, match="exclusion"):
        TrainConfig(exclusion="shi")
    assert TrainConfig.from_dict(TrainConfig().to_dict()).exclusion == "merged"  # saved whole


def test_case_dice_3d_counts_false_positives_and_skips_unscoreable():
    reference = np.zeros((2, 4, 4), dtype=np.uint8)
    reference[0, :2, :2] = LIVER  # 4 voxels
    reference[1, :2, :2] = COLON  # a TotalSegmentator colon label: colon or rectum
    pred = np.zeros_like(reference)
    pred[0, :2, :1] = LIVER  # 2 of 4: Dice 2 * 2 / 6
    pred[1, 3, 3] = SPLEEN  # predicted, absent: 0
    dice = case_dice_3d(pred, reference, get_source("totalseg").label_sets(), NUM_CLASSES)
    assert dice[LIVER - 1] == pytest.approx(2 / 3)
    assert dice[SPLEEN - 1] == 0.0
    assert np.isnan(dice[COLON - 1]) and np.isnan(dice[RECTUM - 1]) and np.isnan(dice[KIDNEY - 1])
    with pytest.raises(ValueError, match="shape"):
        case_dice_3d(pred, reference[:1], get_source("full").label_sets(), NUM_CLASSES)


class _Everywhere(torch.nn.Module):
    """Predicts one class at every pixel."""

    def __init__(self, class_id):
        super().__init__()
        self.class_id = class_id

    def forward(self, image):
        logits = torch.zeros(image.shape[0], NUM_CLASSES, *image.shape[2:])
        logits[:, self.class_id] = 1.0
        return logits


def _case(tmp_path, name, label, annotated):
    folder = tmp_path / name
    folder.mkdir()
    for array in ("image", "label", "distance"):
        np.save(folder / f"{array}.npy", label if array == "label" else np.zeros_like(label))
    return {"case_id": name, "folder": str(folder), "num_slices": label.shape[0], "annotated": annotated,
            "label_sets": label_sets_to_lists(label_sets_from_annotated(annotated))}


def test_validate_cases_is_per_case_3d_dice(tmp_path):
    first = np.zeros((3, 5, 5), dtype=np.uint8)
    first[:, :, :] = LIVER
    first[0] = 0  # 50 of 75 voxels liver: predicting liver everywhere gives 2 * 50 / 125 = 0.8
    second = np.zeros((2, 5, 5), dtype=np.uint8)
    second[:, 0, 0] = KIDNEY  # kidney missed (0), liver predicted but absent (0)
    dataset = SliceDataset([_case(tmp_path, "a", first, [LIVER, KIDNEY]),
                            _case(tmp_path, "b", second, [LIVER, KIDNEY])])
    row = validate_cases(_Everywhere(LIVER), dataset, NUM_CLASSES, 2, Runtime(torch.device("cpu"), None))
    assert row["val_cases"] == 2
    assert row["case_dice_liver"] == pytest.approx(0.4)  # (0.8 + 0) / 2
    assert row["case_dice_kidney"] == 0.0  # case a: absent from both, NaN; case b: 0
    assert row["val_case_dice"] == pytest.approx((0.8 + 0.0) / 2)  # case a: liver only; b: mean(0, 0)
    assert np.isnan(row["case_dice_spleen"])  # not annotated anywhere


def test_validate_cases_max_cases_scores_an_evenly_spaced_subset(tmp_path):
    volumes = []
    for index in range(5):  # case k is liver in its first k + 1 of 5 slices; predicting liver everywhere
        volume = np.zeros((5, 4, 4), dtype=np.uint8)  # gives Dice 2 (k + 1) / (k + 1 + 5)
        volume[: index + 1] = LIVER
        volumes.append(_case(tmp_path, f"c{index}", volume, [LIVER]))
    dataset = SliceDataset(volumes)
    model, rt = _Everywhere(LIVER), Runtime(torch.device("cpu"), None)
    every = validate_cases(model, dataset, NUM_CLASSES, 2, rt)
    three = validate_cases(model, dataset, NUM_CLASSES, 2, rt, max_cases=3)  # cases 0, 2, 4
    dice = [2 * (k + 1) / (k + 6) for k in range(5)]
    assert every["val_cases"] == 5 and every["val_case_dice"] == pytest.approx(np.mean(dice))
    assert three["val_cases"] == 3 and three["val_case_dice"] == pytest.approx(np.mean(dice[::2]))
    assert validate_cases(model, dataset, NUM_CLASSES, 2, rt, max_cases=9)["val_cases"] == 5


def test_val_max_cases_is_a_validated_config_field():
    assert TrainConfig(val_max_cases=4).val_max_cases == 4
    with pytest.raises(ConfigError, match="val_max_cases"):
        TrainConfig(val_max_cases=-1)
