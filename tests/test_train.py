"""Training loop: determinism, checkpoints that rebuild the model, exact resume after a kill."""

import csv
import math
import os
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
import training.runtime as runtime
from training.train import build_scheduler, fit
from utils.losses import WeightedCELoss

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(features=(4, 8), epochs=2, batch_size=4, steps_per_epoch=3, num_workers=0,
                   amp="off", channels_last=False, deterministic=True, val_max_slices=8, lr=1e-2)


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
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


@pytest.mark.slow
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


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def whole_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted command-line run the interrupted ones must reproduce."""
    run = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(train_command(tiny_data, run), check=True, cwd=REPO, env=ENV, capture_output=True)
    return run


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tiny_data, whole_run, tmp_path):
    process = subprocess.Popen(train_command(tiny_data, tmp_path / "killed"), cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    while not last.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert load_checkpoint(last)["epoch"] < 4
    subprocess.run(train_command(tiny_data, tmp_path / "killed", "--resume"), check=True, cwd=REPO,
                   env=ENV, capture_output=True)
    whole, resumed = final_weights(whole_run), final_weights(tmp_path / "killed")
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert [row["epoch"] for row in read_log(tmp_path / "killed")] == ["1", "2", "3", "4"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_last_and_resume_continues_to_the_same_weights(tiny_data, whole_run, tmp_path):
    run = tmp_path / "stopped"
    process = subprocess.Popen(train_command(tiny_data, run), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    while not (run / "curves.png").exists() and process.poll() is None:  # epoch 1 done and logged
        time.sleep(0.01)
    time.sleep(0.1)  # into epoch 2's 60 steps (about 0.5 s of them on one thread: stop well before the end)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output[-2000:]  # the CLI's exit code for an interrupt
    assert "interrupted: saved" in output
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 60, (state["epoch"], state["step_in_epoch"])
    subprocess.run(train_command(tiny_data, run, "--resume"), check=True, cwd=REPO, env=ENV, capture_output=True)
    whole, resumed = final_weights(whole_run), final_weights(run)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert [row["epoch"] for row in read_log(run)] == ["1", "2", "3", "4"]


def learning_rates(scheduler: str, epochs: int, **settings) -> list[float]:
    """The learning rate of each epoch 0..epochs for lr=1."""
    cfg = TINY.replace(lr=1.0, scheduler=scheduler, epochs=epochs, **settings)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = build_scheduler(cfg, optimizer)
    rates = []
    for _ in range(epochs + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_learning_rate_schedules_hand_computed():
    assert learning_rates("step", 5, step_size=2, gamma=0.5) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert learning_rates("constant", 3) == [1, 1, 1, 1]
    poly = learning_rates("poly", 4)  # (1 - epoch / 4) ** 0.9
    assert poly == pytest.approx([1, 0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9, 0])
    assert poly[2] == pytest.approx(0.535887, abs=1e-6)
    cosine = learning_rates("cosine", 4)  # (1 + cos(pi * epoch / 4)) / 2
    assert cosine == pytest.approx([1, (2 + math.sqrt(2)) / 4, 0.5, (2 - math.sqrt(2)) / 4, 0], abs=1e-12)


def test_fit_leaves_the_process_settings_as_it_found_them(tiny_data, tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), runtime.cpu_memory_is_kept(),
              torch.backends.cudnn.benchmark, torch.get_num_threads())
    assert not before[0] and not before[1]
    fit(TINY.replace(epochs=1, steps_per_epoch=1, cpu_keep_freed_memory=True), tiny_data, tmp_path, progress=False)
    after = (torch.are_deterministic_algorithms_enabled(), runtime.cpu_memory_is_kept(),
             torch.backends.cudnn.benchmark, torch.get_num_threads())
    assert after == before


def test_compile_failing_at_the_first_forward_trains_eagerly(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = TINY.replace(epochs=1, steps_per_epoch=2)
    eager = fit(cfg, tiny_data, tmp_path / "eager", progress=False)

    class FailsAtFirstCall(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("InductorError: no working C compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: FailsAtFirstCall())
    fallback = fit(cfg.replace(compile=True), tiny_data, tmp_path / "compiled", progress=False)
    assert "torch.compile failed" in capsys.readouterr().out
    assert (fallback["train_loss"], fallback["val_loss"]) == (eager["train_loss"], eager["val_loss"])
    first, second = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert all(torch.equal(first[key], second[key]) for key in first)
