import dataclasses
import json

import pytest

from training.config import PARTIAL_LABEL_PRESETS, ConfigError, TrainConfig, load_config, with_partial_labels
from utils.augment import AugmentParams


def test_defaults_match_the_seed_project():
    cfg = TrainConfig()
    assert cfg.features == (64, 128, 256, 512) and cfg.in_channels == 1
    assert cfg.class_weights == (0.3, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0, 1.0, 1.0)
    assert (cfg.sigma, cfg.alpha, cfg.loss) == (3.0, 10.0, "weighted_ce")


def test_round_trip_through_a_dict():
    cfg = TrainConfig(features=(8, 16), epochs=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_set_assignments_and_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"epochs": 7, "lr": 0.01}))
    cfg = load_config(path, ["features=[16,32,64,128]", "amp=off", "epochs=9"])
    assert cfg.features == (16, 32, 64, 128) and cfg.amp == "off" and cfg.epochs == 9 and cfg.lr == 0.01


@pytest.mark.parametrize("assignment, message", [
    ("epoch=3", "unknown key 'epoch'"),
    ("epochs=three", "'epochs' must be an integer"),
    ("features=16", "'features' must be a non-empty list of integers"),
    ("amp=fp8", "'amp' must be one of"),
    ("marginal=1", "'marginal' must be true or false"),
])
def test_bad_values_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [assignment])


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json: expected a JSON object"):
        load_config(path)
    path.write_text('{"lr": "fast"}')
    with pytest.raises(ConfigError, match="bad.json: 'lr' must be a number"):
        load_config(path)


def test_augmentation_settings_are_nested_and_reached_by_dotted_keys(tmp_path):
    cfg = load_config(None, ["augment.rotate_deg=5", "augment.scale_range=[0.8,1.25]"])
    assert cfg.augment == AugmentParams(rotate_deg=5.0, scale_range=(0.8, 1.25))
    assert cfg.to_dict()["augment"]["rotate_deg"] == 5.0 and "rotate_deg" not in cfg.to_dict()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"augment": {"noise_std": 0.0}}))
    merged = load_config(path, ["augment.flip_p=0.5"], base=cfg)  # file and --set change only their keys
    assert merged.augment == AugmentParams(rotate_deg=5.0, scale_range=(0.8, 1.25), noise_std=0.0, flip_p=0.5)
    assert load_config(None, ["augment=false"]).augment.enabled is False  # the old on/off switch
    assert cfg.replace(**{"augment.enabled": False}).augment.rotate_deg == 5.0


def test_a_checkpoint_config_in_the_old_flat_format_still_loads():
    old = {key: value for key, value in TrainConfig().to_dict().items() if key != "augment"}
    old.update(augment=False, rot90_p=0.25, flip_p=0.0, rotate_deg=8.0, scale_range=[0.9, 1.1],
               num_brightness_variations=4, brightness=0.1, contrast=0.15, noise_std=0.02, epochs=3)
    cfg = TrainConfig.from_dict(old, where="old.pt: config")
    assert cfg.augment == AugmentParams(enabled=False, rot90_p=0.25, rotate_deg=8.0) and cfg.epochs == 3


@pytest.mark.parametrize("assignment, message", [
    ("epochs=0", "'epochs' must be > 0, got 0"),
    ("batch_size=-4", "'batch_size' must be > 0"),
    ("lr=0", "'lr' must be > 0"),
    ("step_size=0", "'step_size' must be > 0"),
    ("gamma=1.5", "'gamma' must be in \\(0, 1\\]"),
    ("val_fraction=1", "'val_fraction' must be in \\[0, 1\\)"),
    ("features=[16,8]", "'features' must be positive and non-decreasing"),
    ("features=[0,8]", "'features' must be positive"),
    ("in_channels=2", "'in_channels' must be odd and >= 1"),
    ("class_weights=[1,1]", "'class_weights' must be 12 numbers"),
    ("augment.flip_p=1.5", "'augment.flip_p' must be a probability in \\[0, 1\\]"),
    ("augment.scale_range=[1.2,0.8]", "'augment.scale_range' must be \\[min, max\\] with 0 < min <= max"),
    ("augment.rotate_deg=x", "'augment.rotate_deg' must be a number"),
    ("augment.colour=1", "unknown key 'augment.colour'"),
    ("device=gpu", "'device' must be auto, cpu, cuda or cuda:N"),
])
def test_values_out_of_range_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=f"--set: {message}"):
        load_config(None, [assignment])


def test_every_way_of_making_a_config_is_checked():
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="'epochs' must be > 0"):
        dataclasses.replace(cfg, epochs=0)
    with pytest.raises(ConfigError, match="'val_fraction'"):
        TrainConfig(val_fraction=-0.1)
    with pytest.raises(ConfigError, match="'augment.contrast'"):
        cfg.replace(**{"augment.contrast": 1.0})
    with pytest.raises(ConfigError, match="'lr' must be a number"):
        dataclasses.replace(cfg, lr="fast")
    assert dataclasses.replace(cfg, features=[8, 16]).features == (8, 16)  # coerced like from_dict


def test_partial_label_presets():
    assert set(PARTIAL_LABEL_PRESETS) == {"seed_way", "marginal_only", "marginal"}
    cfg = TrainConfig(epochs=3)
    seed_way, marginal_only, marginal = (with_partial_labels(cfg, name) for name in PARTIAL_LABEL_PRESETS)
    assert (seed_way.marginal, seed_way.exclusion_weight) == (False, 0.0)
    assert (marginal_only.marginal, marginal_only.exclusion_weight) == (True, 0.0)
    assert (marginal.marginal, marginal.exclusion_weight, marginal.epochs) == (True, 1.0, 3)
    with pytest.raises(ConfigError, match="'partial'.*seed_way, marginal_only, marginal"):
        with_partial_labels(cfg, "partial")
