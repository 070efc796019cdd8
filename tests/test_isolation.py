"""Issue 12, class 3: one bad case never stops the rest; an unexpected error is a reported bug.

Each folder command gets one case that raises an exception the old code did not catch (a
TypeError, MemoryError, StopIteration, RuntimeError): that case is reported with its file and a
one-line reason, the others finish, the manifest or summary lists the failure, and the command
exits non-zero. At the top level a user error is one line and exit 2, anything else one line
saying it is a bug with the traceback saved, exit 1, and ``--debug`` raises it.
"""

import json

import pytest
import torch

import training.__main__ as cli
import training.evaluate as evaluate_module
import training.predict as predict_module
import training.predict_io as predict_io
import utils.phantom.writer as phantom_writer
import utils.preprocess_data as preprocess_module
from network.unet import UNet
from training.checkpoint import FORMAT, label_scheme, save_checkpoint
from training.config import TrainConfig
from utils.errors import UserError
from utils.geometry import PreprocessParams
from utils.phantom import write_phantom_dataset

TINY = TrainConfig(features=(4, 8), amp="off", channels_last=False, num_workers=0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Three tiny phantom cases (Image/, Mask/)."""
    root = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(root, 3, "full", seed=8, size=32, num_slices=6, progress=False)
    return root


def failing_for(case: str, original, error: BaseException):
    """`original`, except that it raises `error` when its first argument's name holds `case`."""
    def wrapped(path, *args, **kwargs):
        if case in str(path):
            raise error
        return original(path, *args, **kwargs)
    return wrapped


@pytest.mark.parametrize("error", [TypeError("RGB image"), MemoryError(), StopIteration(), RuntimeError("bug")])
def test_preprocess_one_case_raising_anything_fails_alone(raw, tmp_path, monkeypatch, error):
    monkeypatch.setattr(preprocess_module, "load_ct", failing_for("Case_08001", preprocess_module.load_ct, error))
    manifest = preprocess_module.preprocess_dataset("full", raw / "Image", raw / "Mask", tmp_path / "pre",
                                                    PreprocessParams(target_size=(16, 16)), progress=False)
    assert [case["case_id"] for case in manifest["cases"]] == ["Case_08000", "Case_08002"]
    assert [item["case_id"] for item in manifest["failed"]] == ["Case_08001"]
    message = manifest["failed"][0]["error"]
    assert "Case_08001_0000.nii.gz" in message and type(error).__name__ in message and "\n" not in message
    on_disk = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert on_disk["failed"] == manifest["failed"]


def test_preprocess_command_exits_non_zero_when_a_case_failed(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preprocess_module, "load_ct",
                        failing_for("Case_08002", preprocess_module.load_ct, MemoryError()))
    code = cli.main(["preprocess", "--source", "full", "--images", str(raw / "Image"), "--masks", str(raw / "Mask"),
                     "--out", str(tmp_path / "pre"), "--size", "16"])
    assert code == 2 and "failed: " in capsys.readouterr().err
    assert len(json.loads((tmp_path / "pre" / "manifest.json").read_text())["cases"]) == 2


def tiny_checkpoint(path):
    torch.manual_seed(0)
    save_checkpoint({"format": FORMAT, "model": UNet(features=TINY.features).state_dict(), "config": TINY.to_dict(),
                     "preprocess": PreprocessParams(target_size=(32, 32)).to_dict(), "labels": label_scheme(),
                     "epoch": 0}, path)
    return path


@pytest.mark.parametrize("where", ["read", "predict"])
def test_predict_one_case_raising_memory_error_fails_alone(raw, tmp_path, monkeypatch, where):
    if where == "read":
        monkeypatch.setattr(predict_io, "load_ct", failing_for("Case_08001", predict_io.load_ct, MemoryError()))
    else:
        original = predict_module.predict_volume

        def predict_volume(model, volume, *args):
            if "Case_08001" in str(volume.path):
                raise MemoryError()
            return original(model, volume, *args)
        monkeypatch.setattr(predict_module, "predict_volume", predict_volume)
    summary = predict_module.predict_files(tiny_checkpoint(tmp_path / "tiny.pt"), raw / "Image", tmp_path / "out",
                                           progress=False)
    assert [path.rsplit("/", 1)[1] for path in summary["written"]] == ["Case_08000.nii.gz", "Case_08002.nii.gz"]
    assert len(summary["failed"]) == 1 and "Case_08001_0000.nii.gz" in summary["failed"][0]["error"]
    assert "MemoryError" in summary["failed"][0]["error"]


def test_evaluate_one_case_raising_anything_is_listed_and_the_rest_scored(raw, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_ct",
                        failing_for("Case_08001", evaluate_module.load_ct, RuntimeError("boom")))
    summary = evaluate_module.evaluate_folders(raw / "Mask", raw / "Mask", "full", tmp_path / "eval", progress=False)
    assert summary["case_ids"] == ["Case_08000", "Case_08002"] and summary["mean_dice"] == 1.0
    assert summary["failed"] == [{"case": "Case_08001", "error": "RuntimeError: boom"}]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["failed"] == summary["failed"]


def test_phantom_one_case_failing_lets_the_others_finish(tmp_path, monkeypatch):
    original = phantom_writer.make_phantom

    def make_phantom(seed, index, **kwargs):
        if index == 1:
            raise MemoryError()
        return original(seed, index, **kwargs)
    monkeypatch.setattr(phantom_writer, "make_phantom", make_phantom)
    with pytest.raises(UserError, match="1 of 3 phantom cases failed.*Case_00001: MemoryError"):
        write_phantom_dataset(tmp_path, 3, "full", size=16, num_slices=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "Mask").iterdir()) == ["Case_00000.nii.gz", "Case_00002.nii.gz"]


# --------------------------------------------------------------------------- the top level


def command_raising(error: BaseException):
    def run(args):
        raise error
    return run


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_phantom", command_raising(UserError("must be positive", "--cases")))
    assert cli.main(["phantom", "--out", "unused"]) == 2
    assert capsys.readouterr().err == "error: --cases: must be positive\n"


def test_an_unexpected_error_is_a_bug_with_its_traceback_saved(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "run_phantom", command_raising(KeyError("oops")))
    assert cli.main(["phantom", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bug in abdoseg" in err and "KeyError" in err
    saved = list((tmp_path / "cache" / "abdoseg").iterdir())
    assert len(saved) == 1 and str(saved[0]) in err
    assert "Traceback" in saved[0].read_text() and "KeyError: 'oops'" in saved[0].read_text()


@pytest.mark.parametrize("argv", [["--debug", "phantom", "--out", "unused"], ["phantom", "--out", "unused", "--debug"]])
def test_debug_raises_the_error_with_its_traceback(monkeypatch, argv):
    monkeypatch.setattr(cli, "run_phantom", command_raising(KeyError("oops")))
    with pytest.raises(KeyError):
        cli.main(argv)
