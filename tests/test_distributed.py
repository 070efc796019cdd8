"""DistributedDataParallel on CPU: two torchrun processes (gloo) against one process.

Every run is a subprocess of the real command line (``torchrun ... -m training train``), on a
tiny phantom set, so the launcher, the process group, rank-0-only writing and its teardown are
what is tested.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import build_model, load_checkpoint
from training.config import TrainConfig
from training.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm

pytestmark = pytest.mark.slow  # torchrun subprocesses

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.json", "log.csv", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt",
             ".abdoseg-output.json", ".abdoseg-run.lock"}  # the output marker and the run's lock file
# Global batch 4 (2 per process), 4 steps of which every second one syncs (accumulation under
# no_sync), SGD, uniform class weights (see test_two_processes_train_like_one). 5 validation
# slices split 3 / 2, so the processes hold different numbers of validation batches.
SETTINGS = ["features=[4,8]", "epochs=2", "batch_size=4", "steps_per_epoch=4", "accumulation_steps=2",
            "num_workers=0", "amp=off", "channels_last=false", "augment=false", "sync_batchnorm=true",
            "deterministic=true", "device=cpu", "val_max_slices=5", "optimizer=sgd", "lr=0.01",
            "class_weights=[1,1,1,1,1,1,1,1,1,1,1,1]"]
LOSS_RTOL = 1e-5  # see test_two_processes_train_like_one for the measured differences
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def train(data: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """`python -m training train` on one process, or under torchrun on `processes`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "training", "train", "--data", str(data), "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as handle:
        return list(csv.DictReader(handle))


def final_weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict:
    """The same config trained on one process, and on two: one epoch, then ``--resume`` to two."""
    root = tmp_path_factory.mktemp("runs")
    check_ok(train(tiny_data, root / "one", 1, "--set", *SETTINGS))
    one_epoch = [item for item in SETTINGS if not item.startswith("epochs=")] + ["epochs=1"]
    check_ok(train(tiny_data, root / "two", 2, "--set", *one_epoch))
    first_launch = {"log": read_log(root / "two"),
                    "epoch": load_checkpoint(root / "two" / "checkpoints" / "last.pt")["epoch"]}
    check_ok(train(tiny_data, root / "two", 2, "--resume", "--set", "epochs=2"))
    return {"one": root / "one", "two": root / "two", "first_launch": first_launch}


def test_only_rank_zero_writes_one_run_folder(runs):
    files = {path.relative_to(runs["two"]).as_posix() for path in runs["two"].rglob("*") if path.is_file()}
    assert files == RUN_FILES  # no second log, no leftover temporary files from either rank
    assert [row["epoch"] for row in read_log(runs["two"])] == ["1", "2"]


def test_resume_under_two_processes_continues(runs):
    assert runs["first_launch"]["epoch"] == 1 and len(runs["first_launch"]["log"]) == 1
    log = read_log(runs["two"])
    assert log[0] == runs["first_launch"]["log"][0]  # history kept, the second epoch appended
    assert load_checkpoint(runs["two"] / "checkpoints" / "last.pt")["epoch"] == 2
    # that it continued the same schedule (weights, optimizer momentum, batches) is checked
    # by comparing the resumed run with the uninterrupted one-process run below


def test_two_processes_train_like_one(runs):
    """Same global batches, SyncBatchNorm, averaged gradients: two processes follow one.

    Not bit-exact: convolutions and BatchNorm reduce over half-batches and then across
    processes, so float sums are added in another order (measured: loss within 1e-7 relative,
    weights within 3e-7 absolute; the tolerances leave ~100x and ~40x room). The class weights
    are uniform here on purpose: the weighted cross-entropy divides by the summed class weights
    of the pixels *in each process's half*, and the mean of the two halves' ratios is not the
    ratio over the whole batch, a real (not rounding) difference: with the default weights the
    loss differs by ~1e-4 relative after one epoch and ~7e-4 after two. Without SyncBatchNorm
    (statistics of half-batches) it is ~3e-4 and ~4e-3, so this test also fails if
    sync_batchnorm is ignored. SGD rather than Adam, whose first steps are lr * sign(grad) and
    so can turn a rounding difference in a near-zero gradient into a full step.
    """
    one, two = read_log(runs["one"]), read_log(runs["two"])
    assert len(one) == len(two) == 2
    for row_one, row_two in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert float(row_two[key]) == pytest.approx(float(row_one[key]), rel=LOSS_RTOL), key
        assert float(row_two["val_mean_dice"]) == pytest.approx(float(row_one["val_mean_dice"]), abs=1e-6)
    weights_one, weights_two = final_weights(runs["one"]), final_weights(runs["two"])
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:  # BatchNorm2d keys on both: the checkpoint loads into the plain model
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda message, key=key: f"{key}: {message}")


def test_a_rank_zero_error_stops_every_process(tiny_data, runs):
    result = train(tiny_data, runs["two"], 2, "--set", *SETTINGS)  # a run is already there
    assert result.returncode != 0
    assert "already holds a run" in result.stderr and "error: rank 0 failed:" in result.stderr, \
        result.stderr[-3000:]


def test_cpu_sync_batchnorm_keeps_the_state_and_is_batchnorm_on_one_process():
    plain = build_model(TrainConfig(features=(4, 8)))
    synced = convert_sync_batchnorm(build_model(TrainConfig(features=(4, 8))), torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())  # same keys as the plain model's
    assert any(isinstance(module, CPUSyncBatchNorm) for module in synced.modules())
    assert not any(type(module) is torch.nn.BatchNorm2d for module in synced.modules())
    image = torch.rand(3, 1, 32, 32)
    assert torch.equal(synced(image), plain(image))  # no process group: plain BatchNorm
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())
