import json

import pytest

from training.config import ConfigError, TrainConfig, load_config


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
