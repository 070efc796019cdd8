"""Shared test fixtures.

Tests that need the real CT files in ``../shared/data`` use the ``shared_data`` fixture: it
skips with a clear reason when the folder is absent, and fails instead when
``ABDOSEG_REQUIRE_DATA=1`` (set by ``.ci/run``), so CI can never pass by skipping them.

Tests marked ``slow`` (whole training runs in subprocesses, notebooks, benchmarks, torchrun)
are left out by ``pytest -m "not slow"``, the quick subset for the edit-test loop.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ABDOSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (minutes on 2 cores); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "browser: drives JupyterLab and report.html in headless Chromium "
                                       "(tests/test_browser.py); deselect with -m 'not browser'")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only folder of real CT files, or a skip (a failure under ABDOSEG_REQUIRE_DATA=1)."""
    if (SHARED_DATA / "real").is_dir():
        return SHARED_DATA
    reason = f"real CT files not found at {SHARED_DATA} (set ABDOSEG_SHARED_DATA)"
    if os.environ.get("ABDOSEG_REQUIRE_DATA") == "1":
        pytest.fail(reason + "; ABDOSEG_REQUIRE_DATA=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A preprocessed folder of 3 fully labelled 64x64x12 phantoms at 32x32, shared by tests."""
    from utils.geometry import PreprocessParams
    from utils.phantom import write_phantom_dataset
    from utils.preprocess_data import preprocess_dataset
    root = tmp_path_factory.mktemp("tiny")
    write_phantom_dataset(root / "raw", 3, "full", seed=5, size=64, num_slices=12, progress=False)
    preprocess_dataset("full", root / "raw" / "Image", root / "raw" / "Mask", root / "pre",
                       PreprocessParams(target_size=(32, 32)), progress=False)
    return root / "pre"


@pytest.fixture(autouse=True, scope="session")
def private_cache_folder(tmp_path_factory):
    """Keep the precision calibration cache (training/cpu.py) out of the user's home during tests."""
    previous = os.environ.get("ABDOSEG_CACHE_DIR")
    os.environ["ABDOSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("abdoseg-cache"))
    yield
    if previous is None:
        os.environ.pop("ABDOSEG_CACHE_DIR", None)
    else:
        os.environ["ABDOSEG_CACHE_DIR"] = previous
