"""Packaging: the `abdoseg` command, its version and help, the wheel's contents, the notebooks' imports."""

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import training
from training.__main__ import build_parser, main, progress_wanted

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("pytest", "hypothesis", "monai", "playwright", "nbclient", "nbformat")


def installed_distribution():
    try:
        return importlib.metadata.distribution("abdoseg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("abdoseg is not installed in this environment (pip install -e .; make test does)")


def test_installed_metadata_matches_the_checkout():
    dist = installed_distribution()
    assert dist.version == training.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"abdoseg": "training.__main__:main"}
    extras = set(dist.metadata.get_all("Provides-Extra"))
    assert {"dicom", "notebooks", "wandb", "test"} <= extras
    # the torch requirement is met by the torch that is installed (pip never replaced it)
    packaging_version = pytest.importorskip("packaging.requirements")
    torch_requirement = next(packaging_version.Requirement(r) for r in dist.requires if r.startswith("torch"))
    assert torch_requirement.specifier.contains(torch.__version__.split("+")[0])


@pytest.mark.slow
def test_console_command_prints_the_version():
    installed_distribution()
    command = Path(sys.executable).with_name("abdoseg")
    if not command.exists():
        pytest.skip(f"{command} not found (the environment's scripts folder)")
    result = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"abdoseg {training.__version__}"
    module = subprocess.run([sys.executable, "-m", "training", "--version"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert module.stdout.strip() == result.stdout.strip()


def test_help_shows_defaults_and_aliases(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "(default: 32)" in text and "(default: ['nifti'])" in text and "(default: auto)" in text
    assert "-i INPUT, --input INPUT" in text and "-o OUT, --out OUT" in text and "--quiet" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # noise left out
    args = build_parser().parse_args(["predict", "-c", "m.pt", "-i", "ct", "-o", "out", "--format", "rtstruct",
                                      "nifti"])
    assert (str(args.input), str(args.out), args.format) == ("ct", "out", ["rtstruct", "nifti"])


@pytest.mark.parametrize("quiet, env, expected", [
    (False, None, True), (True, None, False), (False, "1", False), (False, "true", False),
    (False, "0", True), (False, "", True),
])
def test_quiet_and_tqdm_disable(monkeypatch, quiet, env, expected):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    args = build_parser().parse_args(["evaluate", "--pred", "p", "--gt", "g", "--source", "full", "-o", "o"]
                                     + (["--quiet"] if quiet else []))
    assert progress_wanted(args) is expected


@pytest.mark.slow
def test_wheel_holds_exactly_the_three_packages(tmp_path):
    """`pip install .` builds this wheel; auto-discovery would fail with 'Multiple top-level packages'."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    for name in ("network", "utils", "training"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    (source / "tests").mkdir()  # a folder that must stay out of the wheel
    (source / "tests" / "__init__.py").write_text("")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("abdoseg-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names}
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert top == {"network", "utils", "training", f"abdoseg-{training.__version__}.dist-info"}
    assert "training/dicom_export.py" in names and "utils/dicom_io.py" in names
    assert "abdoseg = training.__main__:main" in entry_points


def test_project_files():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]
    requirements = (ROOT / "requirements.txt").read_text().lower().splitlines()
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in requirements
             if line.strip() and not line.startswith("#")}
    assert not names & set(TEST_ONLY), names & set(TEST_ONLY)
    assert "torch" in names and "ipywidgets" in names
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert f"version: {training.__version__}" in (ROOT / "CITATION.cff").read_text()


def test_notebooks_do_not_touch_sys_path():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
        assert "sys.path" not in code, path.name
