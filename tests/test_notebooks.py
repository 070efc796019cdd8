"""The notebooks run top to bottom on tiny settings, and are committed without outputs.

The notebooks run in order 01 -> 04 in one shared work folder, as a reader would run them: 02
preprocesses the phantoms 01 wrote, 03 trains on them, 04 predicts with 03's checkpoint. Each
notebook's cell tagged ``parameters`` gets tiny values appended (as papermill injects them), and
the kernel is this interpreter's own ipykernel, whatever kernelspecs the machine has installed.
"""

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 120

# Tiny settings per notebook, applied in this order; WORK is added by the fixture.
TINY = {
    "01_dataset_introduction.ipynb": {"CASES": 2, "SIZE": 64, "NUM_SLICES": 12},
    "02_preprocess.ipynb": {"TARGET_SIZE": 64},
    "03_train.ipynb": {"FEATURES": (4, 8), "EPOCHS": 1, "STEPS_PER_EPOCH": 2, "BATCH_SIZE": 4,
                       "NUM_WORKERS": 0, "DEVICE": "cpu"},
    "04_predict_and_visualize.ipynb": {"HELDOUT_CASES": 2, "SIZE": 64, "NUM_SLICES": 12, "DEVICE": "cpu"},
}


def parameters_cell(nb) -> nbformat.NotebookNode:
    """The notebook's one code cell tagged ``parameters``."""
    cells = [cell for cell in nb.cells
             if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def assigned_names(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def with_parameters(nb, values: dict):
    """A copy of `nb` whose parameters cell ends with ``NAME = value`` for each item of `values`.

    Only names the cell already assigns may be set, so a renamed parameter fails here instead of
    being silently ignored. Paths become ``pathlib.Path(...)`` (the notebooks import pathlib).
    """
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    cell = parameters_cell(nb)
    unknown = set(values) - assigned_names(cell.source)
    assert not unknown, f"not parameters of this notebook: {sorted(unknown)}"
    lines = [f"{name} = pathlib.Path({str(value)!r})" if isinstance(value, Path) else f"{name} = {value!r}"
             for name, value in values.items()]
    cell.source = cell.source.rstrip("\n") + "\n\n# injected by tests/test_notebooks.py\n" + "\n".join(lines) + "\n"
    return nb


def this_interpreters_kernel() -> KernelManager:
    """A kernel manager that starts ipykernel on ``sys.executable`` (the venv running the tests).

    With no kernel folders to search, jupyter_client falls back to ipykernel's built-in spec,
    which launches the current interpreter; an installed ``python3`` spec pointing at another
    Python cannot take its place.
    """
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    assert manager.kernel_spec.argv[0] == sys.executable, manager.kernel_spec.argv
    return manager


def execute(path: Path, values: dict) -> nbformat.NotebookNode:
    """Run the notebook at `path` with `values` injected, in the notebooks folder; returns it executed."""
    nb = with_parameters(nbformat.read(path, as_version=4), values)
    client = NotebookClient(nb, km=this_interpreters_kernel(), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()
    return nb


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The WORK folder the notebooks share, in run order."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def executed(work) -> dict:
    """Every notebook run once, in order 01 -> 04, in `work`: name -> executed notebook, or the
    exception that stopped it (each later notebook still runs, so each failure is reported once)."""
    results = {}
    for name in TINY:
        try:
            results[name] = execute(NOTEBOOKS_DIR / name, {"WORK": work, **TINY[name]})
        except Exception as err:  # noqa: BLE001 - reported by test_notebook_runs for this notebook
            results[name] = err
    return results


def test_every_notebook_has_tiny_settings():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(TINY)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_notebook_runs(name, executed):
    nb = executed[name]
    if isinstance(nb, Exception):
        raise nb
    errors = [output for cell in nb.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_notebooks_left_their_results(executed, work):
    """What each stage hands to the next, and that 04 used 03's checkpoint (no fallback training)."""
    assert len(list((work / "raw" / "full" / "Image").glob("*.nii.gz"))) == 2
    for source in ("pku", "abdomenct1k"):
        assert json.loads((work / "preprocessed" / source / "manifest.json").read_text())["cases"]
    assert (work / "run" / "checkpoints" / "best.pt").is_file() and (work / "run" / "log.csv").is_file()
    assert len(list((work / "predictions").glob("Case_*.nii.gz"))) == 2
    assert json.loads((work / "evaluation" / "summary.json").read_text())["cases"] == 2
    assert not (work / "demo").exists()


@pytest.mark.parametrize("path", sorted(NOTEBOOKS_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert nb.cells[0].cell_type == "markdown"
    parameters_cell(nb)
    for cell in code_cells:  # thin notebooks: no logic defined in them (magics made plain Python first)
        tree = ast.parse(TransformerManager().transform_cell(cell.source))
        assert not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                       for node in ast.walk(tree)), cell.source
