"""The viewer and the report in a real browser: JupyterLab + headless Chromium driven by Playwright.

The test starts JupyterLab on a free localhost port with a token, opens notebook 04 (run alone, so
with its stand-in model, on tiny settings), runs all cells, drags the axial slider and toggles an
organ, and checks what a person would see: the images changed where they should, the slider
redrew while dragging, no JavaScript error and no Python traceback. The same browser then opens
the ``report.html`` the notebook's evaluation wrote and checks every case and image is there.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; Playwright's own browser download is not
used), and the ``playwright`` and ``jupyterlab`` Python packages. Without them the tests skip,
unless ``ABDOSEG_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which turns the skip into a failure.
Screenshots go to the test's temporary folder, or to ``$ABDOSEG_SCREENSHOTS`` (how the README's
``docs/`` pictures are made: then the held-out phantoms are larger)::

    ABDOSEG_SCREENSHOTS=docs python -m pytest -m browser tests/test_browser.py
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "04_predict_and_visualize.ipynb"
RUN_ALL_TIMEOUT_MS = 240_000
TINY = {"HELDOUT_CASES": 2, "SIZE": 64, "NUM_SLICES": 16, "DEVICE": "cpu"}
PICTURES = {"HELDOUT_CASES": 3, "SIZE": 160, "NUM_SLICES": 40, "DEVICE": "cpu"}  # for docs/ screenshots
TINY_FALLBACK = {"epochs": 1, "steps_per_epoch": 2, "features": [4, 8], "batch_size": 4, "cases_per_source": 2,
                 "phantom_size": 48, "target_size": 48, "phantom_slices": 12}
# JupyterLab settings: render every cell (no virtual scrolling) and fetch no news from the internet
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none",
                                                                              "autoStartDefaultKernel": True},
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                    {"fetchNews": "false", "checkForUpdates": False}}


def _require(available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get("ABDOSEG_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + "; ABDOSEG_REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ABDOSEG_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory) -> Path:
    """A folder JupyterLab serves: the library linked in, notebook 04 with tiny settings."""
    root = tmp_path_factory.mktemp("lab")
    for package in ("training", "utils", "network"):
        (root / package).symlink_to(REPO_ROOT / package, target_is_directory=True)
    notebook = json.loads((REPO_ROOT / "notebooks" / NOTEBOOK).read_text())
    for_pictures = bool(os.environ.get("ABDOSEG_SCREENSHOTS"))
    values = {**(PICTURES if for_pictures else TINY), "WORK": root / "work", "FALLBACK_TRAINING": TINY_FALLBACK}
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = [f"{k} = pathlib.Path({str(v)!r})" if isinstance(v, Path) else f"{k} = {v!r}" for k, v in values.items()]
    cell["source"] = "".join(cell["source"]) + "\n\n# injected by tests/test_browser.py\n" + "\n".join(lines) + "\n"
    # the committed notebook names no kernel; without one JupyterLab would ask in a dialog
    notebook["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (root / "notebooks").mkdir()
    (root / "notebooks" / NOTEBOOK).write_text(json.dumps(notebook))
    return root


@pytest.fixture(scope="module")
def lab_url(lab_root, tmp_path_factory):
    """JupyterLab on a free localhost port, with a token; yields the notebook's URL."""
    _require(_has_module("jupyterlab"), "jupyterlab is not installed (pip install jupyterlab)")
    state = tmp_path_factory.mktemp("jupyter")
    for name, value in LAB_SETTINGS.items():
        path = state / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_DATA_DIR": str(state / "data"),
           "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    log = open(state / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={lab_root}",
                               *(["--allow-root"] if os.geteuid() == 0 else [])],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(base, token, server, state / "server.log")
        yield f"{base}/lab/tree/notebooks/{NOTEBOOK}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _wait_for_server(base: str, token: str, server, log_path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited: {log_path.read_text()[-2000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout_s} s: {log_path.read_text()[-2000:]}", pytrace=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through Playwright, a fresh profile; yields ``(context, errors)``."""
    _require(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")
    _require(_has_module("playwright"), "playwright is not installed (pip install playwright)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1500, "height": 1100})
        context.on("page", lambda page: _watch(page, errors))
        for page in context.pages:
            _watch(page, errors)
        try:
            yield context, errors
        finally:
            context.close()


def _watch(page, errors: list[str]) -> None:
    page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
    page.on("console", lambda message: errors.append(f"console.{message.type}: {message.text}")
            if message.type == "error" else None)


@pytest.fixture(scope="module")
def notebook_page(browser, lab_url, lab_root):
    """Notebook 04 opened in JupyterLab and run to the end (Run > Run All Cells)."""
    context, errors = browser
    page = context.new_page()
    page.goto(lab_url)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    page.wait_for_timeout(2000)
    if page.locator(".jp-Dialog button:has-text('Select')").count():  # the kernel question, if asked
        page.locator(".jp-Dialog button:has-text('Select')").first.click()
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    try:
        page.wait_for_function(
            """() => { const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                       const failed = document.querySelector('.jp-OutputArea-output[data-mime-type*="stderr"]');
                       return (failed && failed.textContent.includes('Traceback'))
                           || (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent))); }""",
            timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
    except Exception:
        page.screenshot(path=str(lab_root / "timeout.png"), full_page=True)
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        pytest.fail(f"notebook did not finish; prompts {prompts}; screenshot {lab_root / 'timeout.png'}; "
                    f"outputs {page.locator('.jp-OutputArea-output').all_inner_texts()[-3:]}", pytrace=False)
    page.wait_for_selector("img.widget-image", timeout=30_000)
    page.wait_for_timeout(1500)  # the last widget images arrive
    return page, errors


def _pixels(locator) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def _changed(before: np.ndarray, after: np.ndarray, threshold: int = 40) -> np.ndarray:
    assert before.shape == after.shape, (before.shape, after.shape)
    return np.abs(before - after).max(axis=-1) > threshold  # (H, W) bool


def test_notebook_viewer_in_the_browser(notebook_page, screenshots):
    page, errors = notebook_page
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not [text for text in outputs if "Traceback (most recent call last)" in text], outputs
    assert not [text for text in outputs if "Error displaying widget" in text]
    assert any("FALLBACK IN USE" in text for text in outputs)  # run alone: it says what the model is
    images = page.locator("img.widget-image")
    assert images.count() >= 6  # two viewers (folder viewer and the seed's call), three planes each
    axial, coronal, sagittal = images.nth(0), images.nth(1), images.nth(2)
    viewer = page.locator(".widget-vbox:has(img.widget-image)").first
    viewer.scroll_into_view_if_needed()
    active = viewer.locator(".widget-toggle-buttons button.mod-active").all_inner_texts()
    assert [text.strip() for text in active] == ["both", "abdomen"], active
    viewer.screenshot(path=str(screenshots / "viewer_planes.png"))
    before = [_pixels(image) for image in (axial, coronal, sagittal)]

    updates_while_dragging = _drag_axial_slider(page)
    after = [_pixels(image) for image in (axial, coronal, sagittal)]
    assert updates_while_dragging >= 2, "the axial image did not redraw while the slider was held"
    assert _changed(before[0], after[0]).mean() > 0.01  # a new axial slice
    for plane_before, plane_after in zip(before[1:], after[1:]):  # only the crosshair moved there
        changed_rows = _changed(plane_before, plane_after).any(axis=1)
        assert 0 < changed_rows.mean() < 0.25

    assert _toggle_an_organ_changes_only_its_colour(page, axial)
    page.locator(".widget-toggle-buttons button:text-is('errors')").first.click()
    page.wait_for_timeout(1500)
    viewer.screenshot(path=str(screenshots / "viewer_errors.png"))
    assert "false positive" in page.locator(".widget-html").all_inner_texts().__str__()
    assert not errors, errors


def _drag_axial_slider(page) -> int:
    """Drag the first viewer's axial slider to the right; returns the redraws seen before release."""
    slider = page.locator(".widget-hslider:has(.widget-label:text-is('axial'))").first
    handle = slider.locator(".noUi-handle")
    page.evaluate("""() => { window.__axialUpdates = 0;
        const img = document.querySelector('img.widget-image');
        new MutationObserver(() => { window.__axialUpdates += 1; })
            .observe(img, {attributes: true, attributeFilter: ['src']}); }""")
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x + 6 * step, y)
        page.wait_for_timeout(250)
    seen = page.evaluate("() => window.__axialUpdates")
    page.mouse.up()
    page.wait_for_timeout(1500)
    return seen


def _toggle_an_organ_changes_only_its_colour(page, axial) -> bool:
    """Click the first viewer's organ buttons one by one until the axial image changes; the pixels
    that changed must have been coloured (not grey CT) before."""
    buttons = page.locator(".widget-hbox:has(> button.widget-toggle-button)").first.locator("button")
    for index in range(buttons.count()):
        before = _pixels(axial)
        buttons.nth(index).click()
        page.wait_for_timeout(1200)
        changed = _changed(before, _pixels(axial))
        buttons.nth(index).click()  # back on
        page.wait_for_timeout(800)
        if changed.any():
            chroma = before.max(axis=-1) - before.min(axis=-1)
            return bool((chroma[changed] > 25).mean() > 0.8)
    return False


def test_report_in_the_browser(browser, notebook_page, lab_root, screenshots):
    context, errors = browser
    evaluation = lab_root / "work" / "evaluation"
    summary = json.loads((evaluation / "summary.json").read_text())
    page = context.new_page()
    page.goto((evaluation / "report.html").as_uri())
    cases = page.locator("section.case")
    assert cases.count() == summary["cases"] == len(summary["case_ids"]) > 0
    assert sorted(cases.evaluate_all("s => s.map(x => x.dataset.case)")) == sorted(summary["case_ids"])
    images = page.locator("img")
    loaded = images.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)
    for index in range(cases.count()):
        assert cases.nth(index).locator(".strip img").count() >= 1
    assert page.locator("table.summary tr").count() == 12  # header + 11 organs
    page.screenshot(path=str(screenshots / "report_overview.png"))
    cases.first.screenshot(path=str(screenshots / "report_case.png"))
    worst_first = cases.evaluate_all("s => s.map(x => x.dataset.dice)")
    page.click("button[data-order='best']")
    best_first = page.locator("section.case").evaluate_all("s => s.map(x => x.dataset.dice)")
    assert best_first == sorted(worst_first, key=lambda d: -float(d) if d else float("inf"))
    assert not errors, errors
    shutil.rmtree(lab_root / "work" / "demo", ignore_errors=True)
