"""Training loop: determinism, checkpoints that rebuild the model, exact resume after a kill."""

import csv
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig
import training.train as train_module
from training.loaders import epoch_batches
from training.runtime import keep_freed_cpu_memory
from training.train import fit
from utils.losses import WeightedCELoss

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(features=(4, 8), epochs=2, batch_size=4, steps_per_epoch=3, num_workers=0,
                   amp="off", channels_last=False, deterministic=True, val_max_slices=8, lr=1e-2)


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_fit_writes_the_run_folder_and_same_seed_gives_same_loss(tiny_data, tmp_path):
    first = fit(TINY, tiny_data, tmp_path / "a", progress=False)
    second = fit(TINY, tiny_data, tmp_path / "b", progress=False)
    assert first["train_loss"] == second["train_loss"] and first["val_loss"] == second["val_loss"]
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "log.csv", "curves.png", "config.json"):
        assert (tmp_path / "a" / name).is_file(), name
    rows = read_log(tmp_path / "a")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"train_loss", "val_loss", "val_mean_dice", "lr", "images_per_s", "dice_liver"} <= set(rows[0])


def test_checkpoint_alone_rebuilds_the_model(tiny_data, tmp_path):
    fit(TINY.replace(epochs=1), tiny_data, tmp_path, progress=False)
    raw = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert raw["config"]["features"] == [4, 8] and raw["labels"]["organs"][5] == "liver"
    model, cfg, params = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    assert cfg.features == (4, 8) and params.target_size == (32, 32)
    again, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    image = torch.rand(2, 1, 32, 32)
    assert torch.equal(model(image), again(image))


def test_a_second_run_in_the_same_folder_is_refused(tiny_data, tmp_path):
    fit(TINY.replace(epochs=1), tiny_data, tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        fit(TINY.replace(epochs=1), tiny_data, tmp_path, progress=False)


def test_batches_are_the_same_global_batches_on_one_or_two_processes():
    cfg = TINY.replace(batch_size=4, steps_per_epoch=5)
    single = epoch_batches(50, cfg, epoch=3)
    rank0, rank1 = epoch_batches(50, cfg, 3, 0, 2), epoch_batches(50, cfg, 3, 1, 2)
    assert [a + b for a, b in zip(rank0, rank1)] == single
    assert epoch_batches(50, cfg, epoch=4) != single


def test_tiny_unet_overfits_one_phantom_batch(tiny_data):
    from utils.dataset import SliceDataset, batch_to_device, load_and_pair_files
    from training.checkpoint import build_model
    dataset = SliceDataset(load_and_pair_files(tiny_data))
    items = [dataset[i] for i in range(0, len(dataset), max(len(dataset) // 8, 1))][:8]
    batch = batch_to_device(torch.utils.data.default_collate(items), "cpu")
    torch.manual_seed(0)
    model = build_model(TrainConfig(features=(8, 16)))
    loss_fn = WeightedCELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["label"], batch["distance"], batch["annotated"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.15 * losses[0]


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    sets = ["features=[4,8]", "epochs=4", "batch_size=4", "steps_per_epoch=60", "num_workers=0",
            "amp=off", "channels_last=false", "deterministic=true", "val_max_slices=4", "lr=0.01"]
    return [sys.executable, "-m", "training", "train", "--data", str(data), "--out", str(out),
            "--set", *sets, *extra]


def final_weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_sigkilled_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(train_command(tiny_data, tmp_path / "whole"), check=True, cwd=REPO, env=env,
                   capture_output=True)
    process = subprocess.Popen(train_command(tiny_data, tmp_path / "killed"), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    while not last.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert load_checkpoint(last)["epoch"] < 4
    subprocess.run(train_command(tiny_data, tmp_path / "killed", "--resume"), check=True, cwd=REPO,
                   env=env, capture_output=True)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert [row["epoch"] for row in read_log(tmp_path / "killed")] == ["1", "2", "3", "4"]


def test_ctrl_c_mid_epoch_saves_and_resumes_to_the_same_weights(tiny_data, tmp_path, monkeypatch):
    cfg = TINY.replace(epochs=2, steps_per_epoch=6)
    fit(cfg, tiny_data, tmp_path / "whole", progress=False)
    real_augment, calls = train_module.augment_batch, []

    def interrupt_at_step_9(*args):
        calls.append(1)
        if len(calls) == 9:  # epoch 2, after 2 finished steps
            raise KeyboardInterrupt
        return real_augment(*args)

    monkeypatch.setattr(train_module, "augment_batch", interrupt_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tiny_data, tmp_path / "stopped", progress=False)
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    monkeypatch.setattr(train_module, "augment_batch", real_augment)
    fit(cfg, tiny_data, tmp_path / "stopped", resume=True, progress=False)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's mallopt")
def test_cpu_allocator_keeps_freed_memory_on_glibc():
    assert keep_freed_cpu_memory() is True  # mallopt accepted both settings
