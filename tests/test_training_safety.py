"""Issue 12, classes 4 and 5: training that cannot silently fail, evaluation that counts every case."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import training.train as train_module
from training.__main__ import main
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.run_folder import RunFolderError, lock_run_folder
from training.train import TrainingDiverged, fit
from utils.output_folder import claim_output_folder
from utils.volume_io import save_volume

TINY = TrainConfig(features=(4, 8), epochs=1, batch_size=4, steps_per_epoch=3, num_workers=0,
                   amp="off", channels_last=False, deterministic=True, val_max_slices=8, lr=1e-2)


class NaNAfter(torch.nn.Module):
    """The real loss for the first `calls` calls, NaN after (a run that diverges)."""

    def __init__(self, inner: torch.nn.Module, calls: int):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, logits, *rest):
        self.calls -= 1
        loss = self.inner(logits, *rest)
        return loss if self.calls >= 0 else loss * float("nan")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = train_module.loss_from_config
    # epoch 1: 3 training steps + 2 validation batches; NaN from the first step of epoch 2
    monkeypatch.setattr(train_module, "loss_from_config", lambda cfg: NaNAfter(real(cfg), 5))
    saved = {}
    original_save = train_module.save_checkpoint

    def save_checkpoint(state, path):
        original_save(state, path)
        saved[path.name] = sha(path)
    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    with pytest.raises(TrainingDiverged, match="training loss became nan in epoch 2.*last good weights \\(epoch 1\\)"):
        fit(TINY.replace(epochs=3), tiny_data, tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "last.pt"
    assert sha(last) == saved["last.pt"]  # not written after epoch 1
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 1


def test_nan_in_the_first_epoch_leaves_no_checkpoint_and_exits_2(tiny_data, tmp_path, monkeypatch, capsys):
    real = train_module.loss_from_config
    monkeypatch.setattr(train_module, "loss_from_config", lambda cfg: NaNAfter(real(cfg), 0))
    code = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--set", "features=[4,8]",
                 "epochs=1", "batch_size=4", "steps_per_epoch=2", "num_workers=0", "amp=off"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint was saved" in err and err.count("\n") == 1
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_without_a_finite_validation_there_is_no_best_pt_and_the_message_says_so(tiny_data, tmp_path, capsys):
    code = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--set", "features=[4,8]",
                 "epochs=1", "batch_size=4", "steps_per_epoch=2", "num_workers=0", "amp=off", "val_fraction=0"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert "best.pt" not in out.split(";")[0] and "no best.pt" in out and "last.pt" in out


def test_resume_with_another_config_or_other_data_is_refused(tiny_data, tmp_path):
    fit(TINY, tiny_data, tmp_path / "run", progress=False)
    with pytest.raises(RunFolderError, match="another config.*lr 0.01 -> 0.5"):
        fit(TINY.replace(epochs=2, lr=0.5), tiny_data, tmp_path / "run", resume=True, progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other, ignore=shutil.ignore_patterns(".abdoseg*"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["cases"] = manifest["cases"][:2]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="other data"):
        fit(TINY.replace(epochs=2), other, tmp_path / "run", resume=True, progress=False)
    result = fit(TINY.replace(epochs=2, num_workers=0), tiny_data, tmp_path / "run", resume=True, progress=False)
    assert result["epoch"] == 2  # epochs may change


def test_a_second_run_into_a_locked_run_folder_is_refused(tiny_data, tmp_path):
    with lock_run_folder(claim_output_folder(tmp_path / "run", "train")), \
            pytest.raises(RunFolderError, match="another training run is writing"):
        fit(TINY, tiny_data, tmp_path / "run", progress=False)
    fit(TINY, tiny_data, tmp_path / "run", progress=False)  # free again once the first one ends


# --------------------------------------------------------------------------- evaluation counts every case


MISS_PENALTY = (8 ** 2 + 8 ** 2 + 4 ** 2) ** 0.5  # the 8 x 8 x 4 grid's diagonal at 1 mm


@pytest.fixture
def folders(tmp_path):
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[2:6, 2:6, 1:3] = 5  # liver
    for case in ("Case_00001", "Case_00002"):
        save_volume(labels, np.eye(4), tmp_path / "gt" / f"{case}.nii.gz")
    save_volume(labels, np.eye(4), tmp_path / "pred" / "Case_00001.nii.gz")  # Case_00002 not predicted
    return tmp_path


def test_a_missing_prediction_is_an_error(folders, capsys):
    code = main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--source", "full",
                 "--out", str(folders / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "1 ground-truth case(s) have no prediction" in err and "Case_00002" in err
    assert "--missing-as-miss" in err and not (folders / "eval").exists()


def test_missing_as_miss_scores_a_complete_miss_in_strict_json(folders, capsys):
    code = main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--source", "full",
                 "--out", str(folders / "eval"), "--missing-as-miss"])
    assert code == 0 and "Case_00002" in capsys.readouterr().err

    def no_constants(name):
        raise AssertionError(f"{name} in summary.json")
    summary = json.loads((folders / "eval" / "summary.json").read_text(), parse_constant=no_constants)
    assert summary["cases"] == 2 and summary["dice"]["liver"] == 0.5  # (1 + 0) / 2, not 1 over one case
    assert summary["missing_predictions"] == ["Case_00002"] and summary["hd95_detected_mm"]["liver"] == 0.0
    # the miss is counted, and in the mean it is the volume diagonal (training.evaluate's conventions)
    assert summary["hd95_missed"]["liver"] == 1 and summary["hd95_mm"]["liver"] == pytest.approx(MISS_PENALTY / 2)
    assert summary["dice"]["spleen"] is None  # absent organ: null, never NaN
