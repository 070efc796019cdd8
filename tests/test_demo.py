"""The whole main job (phantom -> preprocess -> train -> predict -> evaluate) on a tiny setting."""

import json
import math

import pytest

from training.__main__ import main
from utils.labels import ORGANS


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    organs = list(ORGANS[1:])
    assert list(summary["dice"]) == organs and list(summary["hd95_mm"]) == organs
    assert all(v is None or 0 <= v <= 1 for v in summary["dice"].values())
    assert math.isfinite(summary["mean_dice"]) and 0 <= summary["mean_dice"] <= 1
    assert set(summary["seconds"]) >= {"phantom", "preprocess", "train", "predict", "evaluate", "total"}
    for name in ("example_slices.png", "evaluation/metrics.csv", "evaluation/dice_per_organ.png",
                 "run/curves.png", "run/checkpoints/best.pt", "predictions/labels.txt"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "predictions").glob("Case_*.nii.gz"))) == 1
    out = capsys.readouterr().out
    assert "mean test-set 3D Dice" in out and str(tmp_path) in out


def test_demo_settings_can_be_overridden():
    from training.demo import demo_settings
    demo, cfg = demo_settings(quick=True, overrides={"heldout_cases": 2, "epochs": 3})
    assert demo["heldout_cases"] == 2 and cfg.epochs == 3 and cfg.marginal
