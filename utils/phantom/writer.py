"""Writing phantom cases as an AbdomenCT-1K / nnU-Net style folder of NIfTI files."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from utils.errors import UserError, one_line_reason
from utils.files import read_json
from utils.output_folder import OutputFolder, claim_output_folder
from utils.phantom.generate import make_phantom
from utils.phantom.layouts import check_layout, layout_labels
from utils.volume_io import save_volume

# one seed per label layout, so bodies and case ids differ between folders; `make demo` and the
# notebooks use these: the partial layouts to train, "full" as a validation set (the demo's
# settings were chosen while watching Dice on seed 3, so it is not a test set)
PHANTOM_SEEDS = {"pku": 1, "abdomenct1k": 2, "full": 3, "totalseg": 4}
# Test phantoms (fully labelled) that were never looked at while choosing any setting: the demo
# and the benchmarks report on these. Do not tune against them; pick new validation seeds instead.
# partial_labels_long: the 1,600-step study, chosen after the 600-step results on seed 91 were seen.
# partial_labels was 91 until its batch size was chosen on those phantoms (benchmarks/partial_labels.py
# TUNING_SEED); 91 is validation since, and may never be a test seed again.
TEST_SEEDS = {"demo": 90, "partial_labels": 93, "partial_labels_long": 92}


def case_id(seed: int, case_index: int) -> str:
    """``Case_{seed * 1000 + case_index:05d}``; case_index must be below 1000 so ids stay unique."""
    if not 0 <= case_index < 1000 or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= case_index < 1000, got {seed}, {case_index}")
    return f"Case_{seed * 1000 + case_index:05d}"


SETTINGS_FILE = "phantom.json"  # the layout and grid of the cases in the folder


def write_phantom_dataset(out_dir, cases: int, layout: str, seed: int = 0, size: int = 512,
                          num_slices: int | None = None, workers: int = 1, progress: bool = True,
                          overwrite: bool = False) -> list[str]:
    """Write ``cases`` phantoms as ``OUT/Image/<id>_0000.nii.gz`` (int16 HU) and ``OUT/Mask/<id>.nii.gz``.

    Masks hold ``layout`` ids (see :func:`utils.phantom.layout_labels`). `out_dir` is claimed as
    a ``phantom`` output folder (``utils.output_folder``): new, empty or an earlier phantom run's,
    so a user's dataset (whose names may be the phantom's) is never written over. ``OUT/phantom.json``
    records the layout and grid: a folder holding another layout or grid is refused unless
    `overwrite`, which replaces the phantom files there. Each file is written atomically; a case
    whose two files both exist is kept (phantoms are deterministic in their settings), so an
    interrupted run can be rerun. One case's failure (out of memory, a bug) does not stop the
    others; the failures are raised together at the end.

    Returns:
        The case ids, in case order (kept ones included).

    Raises:
        UserError: `out_dir` refused, other settings without `overwrite`, or cases that failed.
    """
    check_layout(layout)
    out = claim_output_folder(out_dir, "phantom", overwrite=overwrite)
    _check_settings(out, {"layout": layout, "size": int(size), "slices": num_slices})
    ids = [case_id(seed, index) for index in range(cases)]
    todo = [index for index, name in enumerate(ids)
            if not ((out.path / _image_name(name)).exists() and (out.path / _mask_name(name)).exists())]
    jobs = [(out, seed, index, layout, size, num_slices) for index in todo]
    bar = tqdm(total=cases, initial=cases - len(todo), desc=f"phantom {layout}", unit="case", disable=not progress)
    failures = []
    with bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_write_case, job): case_id(seed, job[2]) for job in jobs}
                for future in as_completed(futures):
                    failures += _failure(futures[future], future)
                    bar.update()
        else:
            for job in jobs:
                error = _write_case(job)
                failures += [f"{case_id(seed, job[2])}: {error}"] if error else []
                bar.update()
    out.close()
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} phantom cases failed (the others are written): "
                        + "; ".join(sorted(failures)), out_dir)
    return ids


def _check_settings(out: OutputFolder, settings: dict) -> None:
    """Refuse to mix phantoms of another layout or grid into `out` (replace them with overwrite)."""
    path = out.path / SETTINGS_FILE
    if path.is_file() and out.is_recorded(SETTINGS_FILE):
        before = read_json(path, "phantom settings")
        if before == settings:
            return
        if not out.overwrite:
            raise UserError(f"holds phantoms made with {before}, not {settings}; choose another folder or pass "
                            "--overwrite to replace them", out.path)
        for folder in ("Image", "Mask"):
            if (out.path / folder).exists():
                out.remove(folder)
    out.write_json(SETTINGS_FILE, settings, replace=True)


def _failure(name: str, future) -> list[str]:
    try:
        error = future.result()
    except Exception as err:  # noqa: BLE001 (a worker process died: out of memory, killed)
        error = one_line_reason(err)
    return [f"{name}: {error}"] if error else []


def _image_name(name: str) -> str:
    return f"Image/{name}_0000.nii.gz"


def _mask_name(name: str) -> str:
    return f"Mask/{name}.nii.gz"


def _write_case(job) -> str | None:
    """Generate and write one case (module level so worker processes can run it); atomic writes.

    Returns None, or a one-line error: any exception is caught here (the per-case guard).
    """
    out, seed, index, layout, size, num_slices = job
    name = case_id(seed, index)
    try:
        phantom = make_phantom(seed, index, size=size, num_slices=num_slices)
        with out.atomic_path(_image_name(name), replace=True) as temporary:
            save_volume(phantom.hu, phantom.affine, temporary, dtype=np.int16)
        with out.atomic_path(_mask_name(name), replace=True) as temporary:
            save_volume(layout_labels(phantom, layout), phantom.affine, temporary, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001
        return one_line_reason(err)
    return None
