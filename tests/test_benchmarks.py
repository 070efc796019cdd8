"""Smoke tests of the benchmark scripts: each runs with ``--quick`` and ends with its JSON line.

No timing is asserted: the numbers of a smoke run on a shared CPU mean nothing. What is checked
is that every script still runs against the current library, ends with one JSON object holding
its headline keys, and leaves no temporary files behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess

REPO_ROOT = Path(__file__).resolve().parents[1]

HEADLINE_KEYS = {
    "preprocess.py": {"seconds_per_case", "seed_seconds_per_case", "speedup_vs_seed", "bytes_per_slice",
                      "seed_bytes_per_slice", "disk_ratio_vs_seed", "seed_scheme"},
    "loader.py": {"loader_images_per_s", "step_images_per_s", "ratio", "device", "peak_memory_mb_by_batch"},
    "train_throughput.py": {"train_images_per_s", "plain_fp32_train_images_per_s", "train_fraction_of_matmul_peak",
                            "infer_slices_per_s", "matmul_peak_gflops", "flops_per_image", "device",
                            "auto_train_precision", "auto_fraction_of_best", "by_precision", "calibration",
                            "cpu_model"},
}


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict:
    """Run ``benchmarks/<script> --quick`` on CPU with its temp files under `tmp_path`; returns the last line."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("script", sorted(HEADLINE_KEYS))
def test_quick_run_ends_with_headline_json(script, tmp_path):
    result = run_quick(script, tmp_path)
    missing = HEADLINE_KEYS[script] - set(result)
    assert not missing, f"{script}: headline keys missing from the last line: {sorted(missing)}"
    assert result["quick"] is True
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")]  # torch's own cache
    assert not left, f"{script} left files behind: {left}"
    if script == "train_throughput.py":
        assert set(result["matmul_peak_gflops"]) >= {"fp32", "bf16"}
        assert result["flops_per_image"] == flops_counted_by_torch(features=(8, 16), size=64)  # --quick's model
        assert set(result["by_precision"]) == {"fp32", "bf16"}
        best = max(run["train_images_per_s"] for run in result["by_precision"].values())
        chosen = result["by_precision"][result["auto_train_precision"]]["train_images_per_s"]
        assert result["auto_fraction_of_best"] == pytest.approx(chosen / best, abs=0.01)


def flops_counted_by_torch(features: tuple, size: int) -> int:
    """Forward FLOPs of one image through the U-Net, counted by torch's own FlopCounterMode
    (an independent count of the script's forward hooks)."""
    from torch.utils.flop_counter import FlopCounterMode
    from training.checkpoint import build_model
    from training.config import TrainConfig
    model = build_model(TrainConfig(features=features))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 1, size, size))
    return counter.get_total_flops()


def test_loader_resident_mode_runs(tmp_path):
    result = run_quick("loader.py", tmp_path, "--resident", "--no-memory")
    assert result["loader"] == "resident"
    assert result["peak_memory_mb_by_batch"] == {}


def test_partial_labels_quick_run_writes_its_report_and_chart(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "partial_labels.py"), "--quick",
                           "--out", str(tmp_path / "out"), "--chart", str(tmp_path / "chart.png")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # organs PKU, AbdomenCT-1K or TotalSegmentator leave out or label only as part of a set
    # (utils/labels.py source maps), written out by hand: only liver and kidney are certain in all
    assert sorted(result["unannotated_organs"]) == sorted([
        "bladder", "colon", "femur_head", "rectum", "small_intestine", "spinal_cord", "stomach", "spleen", "pancreas"])
    assert {"seed_way", "marginal_only", "marginal", "full"} <= set(result)
    for arm in ("seed_way", "marginal_only", "marginal", "full"):
        values = result[arm]
        assert values["n_seeds"] == 2 and [run["seed"] for run in values["per_seed"]] == [0, 1]
        assert 0 <= values["mean_dice_unannotated"] <= 1 and values["sd_dice_unannotated"] >= 0
        assert set(values["dice"]) == set(values["sd"]) and len(values["dice"]) == 11
    for key in ("p_value_vs_seed_way", "p_value_vs_marginal_only"):
        assert result["marginal"][key] is None or 0 < result["marginal"][key] <= 1
    assert result["marginal"]["n_test_cases"] == result["test_cases"] == 2
    assert abs(result["marginal"]["gap_to_full"]
               - (result["full"]["mean_dice_unannotated"] - result["marginal"]["mean_dice_unannotated"])) < 1e-12
    assert result["estimated_full_minutes"] > 0 and result["quick"] is True
    # the work folder (phantoms, checkpoints) is gone; abdoseg's marker stays
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".abdoseg-output.json", "partial_labels.json", "partial_labels.png"]
    report = json.loads((tmp_path / "out" / "partial_labels.json").read_text())
    assert report["train"]["exclusion"] == "published" and report["runs"].keys() == {
        "seed_way", "marginal_only", "marginal", "full"}
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "partial_labels.py"), "--quick",
                            "--arms", "marginal,full", "--out", str(tmp_path / "out")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["reused_runs"] == 4 and set(rerun) >= {"marginal", "full"} and "seed_way" not in rerun
    for arm in ("marginal", "full"):  # the same runs, so the same numbers
        assert rerun[arm]["per_seed"] == result[arm]["per_seed"]
    kept = json.loads((tmp_path / "out" / "partial_labels.json").read_text())["runs"]
    assert kept == report["runs"]  # the runs of the arms not named this time stay in the report


def test_partial_labels_tuning_scores_the_full_arm_on_validation_phantoms_only(tmp_path):
    """The study's configuration was chosen on the fully labelled arm and validation phantoms
    that no test set uses; --quick gives each batch-size candidate the same images."""
    from benchmarks import partial_labels as study
    from utils.phantom import TEST_SEEDS
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "partial_labels_tuning.py"), "--quick",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["arm"] == "full" and result["validation_seed"] == study.TUNING_SEED == 91
    assert study.TUNING_SEED not in TEST_SEEDS.values()
    candidates = result["candidates"]
    assert set(candidates) == {"batch16_600_steps", "lr_0.01", "batch8_1200_steps", "batch4_2400_steps",
                               "slices96_1000_steps"}
    images = {name: candidates[name]["steps"] * candidates[name]["batch_size"]
              for name in ("batch16_600_steps", "batch8_1200_steps", "batch4_2400_steps")}
    assert set(images.values()) == {128}  # 2 epochs x 4 steps x 16, 8 x 8 x 2, 16 x 4 x 2
    for values in candidates.values():
        assert 0 <= values["mean_dice_unannotated"] <= 1 and len(values["dice"]) == 11
    # the chosen candidate is the study's configuration
    assert study.FIRST_TRAIN.replace(**candidates["batch8_1200_steps"]["train_changes"]) == study.TRAIN
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".abdoseg-output.json", "partial_labels_tuning.json"]


def test_partial_labels_rescore_reproduces_the_study_from_its_kept_runs(tmp_path):
    """The kept checkpoints, scored again on the study's test seed and precision, give its numbers."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}

    def script(name, *args):
        return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / name), *map(str, args)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=1200)

    done = script("partial_labels.py", "--quick", "--arms", "marginal,full", "--keep", "--out", tmp_path / "study")
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.loads(done.stdout.strip().splitlines()[-1])
    work = next(line[len("kept: "):] for line in done.stdout.splitlines() if line.startswith("kept: "))
    again = script("partial_labels_rescore.py", work, "--out", tmp_path / "rescored")
    assert again.returncode == 0, again.stderr[-3000:]
    rescored = json.loads(again.stdout.strip().splitlines()[-1])
    assert rescored["test_seed"] == study["test_seed"] and rescored["precision"] == "fp32"
    for arm in ("marginal", "full"):
        assert [run["mean_dice_unannotated"] for run in rescored[arm]["per_seed"]] == \
            [run["mean_dice_unannotated"] for run in study[arm]["per_seed"]]
        assert rescored[arm]["dice"] == study[arm]["dice"]
    assert rescored["marginal"]["p_value_vs_full"] == study["marginal"]["p_value_vs_full"]
    assert (tmp_path / "rescored" / "partial_labels.png").exists()
    assert not list((tmp_path / "rescored").glob("work-*"))  # its scratch folder is gone

    nothing_kept = script("partial_labels_rescore.py", tmp_path / "rescored", "--report",
                          tmp_path / "study" / "partial_labels.json", "--out", tmp_path / "none")
    assert nothing_kept.returncode == 2 and "no kept marginal run" in nothing_kept.stderr
    assert len(nothing_kept.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


def test_inference_quick_run_reports_each_slice_count(tmp_path):
    result = run_quick("inference.py", tmp_path)  # --quick: 128 x 128 x (20, 40) instead of 512 x 512 x (200, 600)
    assert {"seconds_20", "seconds_40", "peak_rss_mb_20", "peak_rss_mb_40", "seed_way_seconds_20",
            "slices_per_s_model_only", "device"} <= set(result), sorted(result)
    if "int8_gate_passed" in result:  # ONNX Runtime installed: the timed model's gate decides about int8
        assert 0 <= result["int8_agreement"] <= 1
        assert result["precision_auto"] != "int8" or result["int8_gate_passed"], result["precision_auto"]
