"""Patient-level split: a patient's scans stay on one side; identical images are flagged."""

import warnings

import numpy as np
import pytest

from training.config import ConfigError, TrainConfig
from training.loaders import build_datasets
from utils.dataset import split_cases
from utils.patients import (PatientKeyError, array_hash, compile_patient_regex, identical_images, patients_of,
                            read_patient_csv, warn_identical_images)


def _cases(ids):
    return [{"case_id": case} for case in ids]


IDS = [f"PAT{p:02d}_scan{s}" for p in range(7) for s in range(1 + p % 3)]  # 7 patients, 1-3 scans each


def test_regex_key_keeps_each_patient_on_one_side():
    patients = patients_of(IDS, r"^(PAT\d+)_")
    assert patients["PAT04_scan1"] == "PAT04" and len(set(patients.values())) == 7
    for seed in range(10):
        train, val = split_cases(_cases(IDS), 0.3, seed, patients)
        train_patients = {patients[c["case_id"]] for c in train}
        val_patients = {patients[c["case_id"]] for c in val}
        assert train_patients.isdisjoint(val_patients) and train and val
        assert len(val) >= round(0.3 * len(IDS))
        assert sorted(c["case_id"] for c in train + val) == sorted(IDS)


def test_every_case_its_own_patient_is_the_old_split():
    ids = [f"Case_{i:05d}" for i in range(11)]
    for seed in range(5):
        assert split_cases(_cases(ids), 0.2, seed) == split_cases(_cases(ids), 0.2, seed, patients_of(ids, ""))
        # the old rule, written out: a seeded permutation of the sorted cases, the first round(0.2 * 11) validate
        order = np.random.default_rng(seed).permutation(11)
        _, val = split_cases(_cases(ids), 0.2, seed, patients_of(ids, r"^(nomatch)"))
        assert sorted(c["case_id"] for c in val) == sorted(ids[i] for i in order[:2])


def test_one_patient_with_most_scans_never_empties_training():
    ids = ["A_1", "A_2", "A_3", "B_1"]
    train, val = split_cases(_cases(ids), 0.5, 0, patients_of(ids, r"^(\w)_"))
    assert train and {c["case_id"][0] for c in train}.isdisjoint(c["case_id"][0] for c in val)


def test_csv_key(tmp_path):
    table = tmp_path / "patients.csv"
    table.write_text("case,patient\nscan_a,p1\nscan_b,p1\nscan_c,p2\n")
    assert patients_of(["scan_a", "scan_b", "scan_c", "scan_d"], str(table)) == {
        "scan_a": "p1", "scan_b": "p1", "scan_c": "p2", "scan_d": "scan_d"}
    bad = tmp_path / "bad.csv"
    bad.write_text("case,patient\nscan_a,p1\nscan_a,p2\n")
    with pytest.raises(PatientKeyError, match="scan_a"):
        read_patient_csv(bad)
    (tmp_path / "cols.csv").write_text("id,who\nx,y\n")
    with pytest.raises(PatientKeyError, match="case,patient"):
        read_patient_csv(tmp_path / "cols.csv")
    with pytest.raises(PatientKeyError, match="cannot read"):
        read_patient_csv(tmp_path / "missing.csv")


def test_bad_regex_keys_are_config_errors():
    with pytest.raises(PatientKeyError, match="one group"):
        compile_patient_regex(r"^PAT\d+")
    with pytest.raises(ConfigError, match="patient_key"):
        TrainConfig(patient_key=r"^(PAT)(\d+)")
    with pytest.raises(ConfigError, match="patient_key"):
        TrainConfig(patient_key="(unclosed")
    assert TrainConfig(patient_key=r"^(PAT\d+)_").patient_key == r"^(PAT\d+)_"


def test_identical_images_are_flagged():
    image = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    hashes = {"a": array_hash(image), "b": array_hash(image.copy()), "c": array_hash(image[:, :, ::-1]),
              "d": array_hash(image.reshape(3, 2, 4))}  # same bytes, other shape: not identical
    assert identical_images(hashes) == [["a", "b"]]
    with pytest.warns(UserWarning, match="a = b"):
        warn_identical_images(hashes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_identical_images({"a": "1", "c": "2"}) == []


def test_build_datasets_splits_by_patient_and_warns_on_identical_images(tmp_path):
    cases = []
    for case in IDS:
        folder = tmp_path / case
        folder.mkdir()
        for name in ("image", "label", "distance"):
            np.save(folder / f"{name}.npy", np.zeros((2, 4, 4), dtype=np.uint8))
        cases.append({"case_id": case, "folder": str(folder), "num_slices": 2, "annotated": [1],
                      "image_hash": "same" if case.startswith("PAT05") else case})
    cfg = TrainConfig(val_fraction=0.3, patient_key=r"^(PAT\d+)_")
    with pytest.warns(UserWarning, match="PAT05_scan0 = PAT05_scan1"):
        train, val = build_datasets(cfg, cases)
    val_patients = {c["case_id"][:5] for c in val.cases}
    assert val_patients and val_patients.isdisjoint(c["case_id"][:5] for c in train.cases)
