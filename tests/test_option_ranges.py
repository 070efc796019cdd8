"""Issue 12, class 2: every option checked at the edge, one line naming it, exit 2, nothing written.

Run through ``training.__main__.main`` with paths that do not exist: an option that is refused
must be refused before any file is read, any folder made or any memory allocated.
"""

import pytest

from training.__main__ import build_parser, main

PREPROCESS = ["preprocess", "--source", "abdomenct1k", "--images", "IMAGES", "--masks", "MASKS", "--out", "OUT"]
PHANTOM = ["phantom", "--out", "OUT"]
PREDICT = ["predict", "--checkpoint", "CKPT", "--input", "IMAGES", "--out", "OUT"]
EVALUATE = ["evaluate", "--pred", "PRED", "--gt", "GT", "--source", "full", "--out", "OUT"]

BAD = {
    "predict --batch-size -1": (PREDICT + ["--batch-size", "-1"], "--batch-size"),
    "predict --batch-size 0": (PREDICT + ["--batch-size", "0"], "--batch-size"),
    "preprocess --max-clip inf": (PREPROCESS + ["--max-clip", "inf"], "--min-clip/--max-clip"),
    "preprocess --min-clip nan": (PREPROCESS + ["--min-clip", "nan"], "--min-clip/--max-clip"),
    "preprocess min above max": (PREPROCESS + ["--min-clip", "100", "--max-clip", "-100"], "--min-clip/--max-clip"),
    "preprocess --size 100000": (PREPROCESS + ["--size", "100000"], "--size"),
    "preprocess --size 0": (PREPROCESS + ["--size", "0"], "--size"),
    "preprocess --spacing 0.001": (PREPROCESS + ["--spacing", "0.001"], "--spacing"),
    "preprocess --spacing -1": (PREPROCESS + ["--spacing", "-1"], "--spacing"),
    "preprocess --workers 0": (PREPROCESS + ["--workers", "0"], "--workers"),
    "preprocess without --masks": (PREPROCESS[:5] + ["--out", "OUT"], "--masks"),
    "evaluate --tolerance-mm -1": (EVALUATE + ["--tolerance-mm", "-1"], "--tolerance-mm"),
    "evaluate --tolerance-mm inf": (EVALUATE + ["--tolerance-mm", "inf"], "--tolerance-mm"),
    "phantom --cases 0": (PHANTOM + ["--cases", "0"], "--cases"),
    "phantom --cases 5000": (PHANTOM + ["--cases", "5000"], "--cases"),
    "phantom --size 100000": (PHANTOM + ["--size", "100000"], "--size"),
    "phantom --slices 100000": (PHANTOM + ["--slices", "100000"], "--slices"),
    "phantom --workers -2": (PHANTOM + ["--workers", "-2"], "--workers"),
    "phantom --seed -1": (PHANTOM + ["--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_option_is_one_line_naming_it_and_exit_2(name, tmp_path, monkeypatch, capsys):
    argv, option = BAD[name]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}:") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_repeated_set_accumulates():
    args = build_parser().parse_args(["train", "--data", "D", "--out", "O", "--set", "epochs=1",
                                      "--set", "batch_size=4", "lr=0.1"])
    assert args.set == ["epochs=1", "batch_size=4", "lr=0.1"]
    demo = build_parser().parse_args(["demo", "--set", "epochs=1", "--set", "heldout_cases=2"])
    assert demo.set == ["epochs=1", "heldout_cases=2"]


@pytest.mark.parametrize("argv", [["--debug", "phantom", "--out", "O"], ["phantom", "--out", "O", "--debug"]])
def test_debug_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).debug is True
    assert build_parser().parse_args(["phantom", "--out", "O"]).debug is False


def test_train_config_fields_are_checked_through_set(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "batch_size=-4"]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and err.count("\n") == 1 and not (tmp_path / "run").exists()
