"""The partial-label study's design, checked without running it: seeds, sizes, arms, config."""

import json

import pytest

from benchmarks import partial_labels as study
from training.config import PARTIAL_LABEL_PRESETS
from utils.phantom import PHANTOM_SEEDS, TEST_SEEDS


def test_partial_labels_study_is_sized_as_promised():
    """>= 3 training seeds, >= 8 test phantoms from a seed no other phantom set uses, one config."""
    assert len(study.TRAINING_SEEDS) >= 3 and study.SETTINGS["test_cases"] >= 8
    used_elsewhere = {*PHANTOM_SEEDS.values(), *study.DATA_SEEDS.values(),
                      *(seed for name, seed in TEST_SEEDS.items() if name != "partial_labels")}
    assert study.TEST_SEED == TEST_SEEDS["partial_labels"] and study.TEST_SEED not in used_elsewhere
    assert len(set(TEST_SEEDS.values())) == len(TEST_SEEDS)
    assert set(study.ARMS) == {"seed_way", "marginal_only", "marginal", "full"}
    assert set(study.LONG_ARMS) == {"marginal", "full"} and study.LONG_EPOCHS > study.TRAIN.epochs
    # the long study's length was chosen after seeing the 600-step test results: its own test phantoms
    assert study.LONG_TEST_SEED == TEST_SEEDS["partial_labels_long"] and study.LONG_TEST_SEED not in {
        *PHANTOM_SEEDS.values(), *study.DATA_SEEDS.values(), study.TEST_SEED}


def test_every_arm_shares_the_one_config_but_its_preset():
    """The arms differ only in the partial-label switches; the rest is TRAIN, fixed in the script."""
    switches = {key for preset in PARTIAL_LABEL_PRESETS.values() for key in preset}
    configs = [study.with_partial_labels(study.TRAIN, preset).to_dict() for _, preset in study.ARMS.values()]
    for config in configs:
        assert {k: v for k, v in config.items() if k not in switches} == \
            {k: v for k, v in study.TRAIN.to_dict().items() if k not in switches}
    assert study.with_partial_labels(study.TRAIN, "marginal").exclusion == "published"


def test_paired_tests_compare_marginal_with_the_arms_that_ran():
    """--long runs marginal and full only: the tests against full and the gap, nothing else."""
    organs = study.unannotated_organs()
    names = [study.ORGANS[organ] for organ in organs]

    def run(seed: int, case_values: list[float]) -> dict:  # every unannotated organ gets the case's value
        cases = {f"Case_{i}": dict.fromkeys(names, value) for i, value in enumerate(case_values)}
        return {"seed": seed, "case_dice": cases, "dice": dict.fromkeys(names, sum(case_values) / len(case_values))}

    marginal = [0.50, 0.60, 0.55, 0.70, 0.65, 0.40]
    full = [value + 0.1 + 0.01 * i for i, value in enumerate(marginal)]  # full wins every case
    results = {"marginal": [run(0, marginal), run(1, marginal)], "full": [run(0, full), run(1, full)]}
    tests = study.paired_tests(results, organs)
    assert set(tests) == {"p_value_vs_full", "median_difference_vs_full", "n_test_cases", "gap_to_full"}
    assert abs(tests["gap_to_full"] - 0.125) < 1e-12  # 0.1 + mean of 0.00 .. 0.05, by hand
    assert abs(tests["median_difference_vs_full"] + 0.125) < 1e-12  # marginal - full: median of -0.10 .. -0.15
    assert tests["p_value_vs_full"] == 2 / 2**6 and tests["n_test_cases"] == 6  # exact two-sided, all one sign


def test_finished_runs_are_reused_only_from_a_report_of_the_same_study(tmp_path, capsys):
    report = tmp_path / "partial_labels.json"
    assert study.finished_runs(report, study.SETTINGS, study.TRAIN) == {}  # no report yet
    runs = {"marginal": [{"seed": 0, "dice": {}}, {"seed": 1, "dice": {}}], "full": [{"seed": 0, "dice": {}}]}
    study.write_json(report, {"settings": study.SETTINGS, "train": study.TRAIN.to_dict(),
                              "test_seed": study.TEST_SEED, "runs": runs})
    assert sorted(study.finished_runs(report, study.SETTINGS, study.TRAIN)) == [
        ("full", 0), ("marginal", 0), ("marginal", 1)]
    longer = study.TRAIN.replace(epochs=study.LONG_EPOCHS)  # another configuration: nothing reused
    assert study.finished_runs(report, study.SETTINGS, longer) == {}
    assert study.finished_runs(report, {**study.SETTINGS, "test_cases": 4}, study.TRAIN) == {}
    assert "not reused" in capsys.readouterr().out


def test_arms_without_marginal_or_unknown_are_refused_before_any_work(tmp_path, capsys):
    for arms in ("full,seed_way", "marginal,teacher"):
        with pytest.raises(SystemExit) as stopped:
            study.main(["--arms", arms, "--out", str(tmp_path / "out")])
        assert stopped.value.code == 2 and arms in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_users_folder_is_refused_as_out_and_left_as_it_is(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "work").mkdir(parents=True)
    (mine / "work" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit) as stopped:
        study.main(["--quick", "--out", str(mine)])
    assert stopped.value.code == 2 and "mine" in capsys.readouterr().err
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["work", "work/notes.txt"]


def test_runs_by_arm_orders_arms_as_the_study_and_seeds_ascending():
    runs = {("full", 1): "f1", ("marginal", 2): "m2", ("full", 0): "f0", ("seed_way", 0): "s0"}
    assert study.runs_by_arm(runs) == {"seed_way": ["s0"], "marginal": ["m2"], "full": ["f0", "f1"]}


def test_a_stopped_study_keeps_its_finished_runs_for_the_next_invocation(tmp_path, monkeypatch):
    """Stopped during its second run: the report holds the first, and the work folder is gone."""
    real_run_arm, calls = study.run_arm, []

    def stopped_on_the_second_run(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_arm(*args, **kwargs)

    monkeypatch.setattr(study, "run_arm", stopped_on_the_second_run)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        study.main(["--quick", "--out", str(out)])
    report = json.loads((out / "partial_labels.json").read_text())
    assert report["complete"] is False and list(report["runs"]) == ["seed_way"]
    assert [run["seed"] for run in report["runs"]["seed_way"]] == [0]
    assert calls[0][-1] == "fp32" and report["settings"]["predict_precision"] == "fp32"  # one precision for all arms
    assert not list(out.glob("work-*"))  # phantoms and checkpoints do not outlive the run
    settings = {**study.SETTINGS, **study.QUICK_SETTINGS}
    cfg = study.TRAIN.replace(**study.QUICK_TRAIN)
    assert list(study.finished_runs(out / "partial_labels.json", settings, cfg)) == [("seed_way", 0)]
    assert study.finished_runs(out / "partial_labels.json", settings, cfg, study.LONG_TEST_SEED) == {}
