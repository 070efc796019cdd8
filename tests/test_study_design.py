"""The partial-label study's design, checked without running it: seeds, sizes, arms, config."""

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


def test_every_arm_shares_the_one_config_but_its_preset():
    """The arms differ only in the partial-label switches; the rest is TRAIN, fixed in the script."""
    switches = {key for preset in PARTIAL_LABEL_PRESETS.values() for key in preset}
    configs = [study.with_partial_labels(study.TRAIN, preset).to_dict() for _, preset in study.ARMS.values()]
    for config in configs:
        assert {k: v for k, v in config.items() if k not in switches} == \
            {k: v for k, v in study.TRAIN.to_dict().items() if k not in switches}
    assert study.with_partial_labels(study.TRAIN, "marginal").exclusion == "published"
