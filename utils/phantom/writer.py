"""Writing phantom cases as an AbdomenCT-1K / nnU-Net style folder of NIfTI files."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.phantom.generate import make_phantom
from utils.phantom.layouts import check_layout, layout_labels
from utils.volume_io import save_volume

# one seed per label layout, so bodies and case ids differ between folders; `make demo` and the
# notebooks use these: the partial layouts to train, "full" held out
PHANTOM_SEEDS = {"pku": 1, "abdomenct1k": 2, "full": 3}


def case_id(seed: int, case_index: int) -> str:
    """``Case_{seed * 1000 + case_index:05d}``; case_index must be below 1000 so ids stay unique."""
    if not 0 <= case_index < 1000 or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= case_index < 1000, got {seed}, {case_index}")
    return f"Case_{seed * 1000 + case_index:05d}"


def write_phantom_dataset(out_dir, cases: int, layout: str, seed: int = 0, size: int = 512,
                          num_slices: int | None = None, workers: int = 1, progress: bool = True) -> list[str]:
    """Write ``cases`` phantoms as ``OUT/Image/<id>_0000.nii.gz`` (int16 HU) and ``OUT/Mask/<id>.nii.gz``.

    Masks hold ``layout`` ids (see :func:`utils.phantom.layout_labels`). Each file is written
    atomically; a case whose two files both exist is skipped, so an interrupted run can be rerun.

    Returns:
        The case ids, in case order (skipped ones included).
    """
    check_layout(layout)
    out = Path(out_dir)
    ids = [case_id(seed, index) for index in range(cases)]
    todo = [index for index, name in enumerate(ids)
            if not (_image_path(out, name).exists() and _mask_path(out, name).exists())]
    jobs = [(out, seed, index, layout, size, num_slices) for index in todo]
    bar = tqdm(total=cases, initial=cases - len(todo), desc=f"phantom {layout}", unit="case", disable=not progress)
    with bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_write_case, jobs):
                    bar.update()
        else:
            for job in jobs:
                _write_case(job)
                bar.update()
    return ids


def _image_path(out: Path, name: str) -> Path:
    return out / "Image" / f"{name}_0000.nii.gz"


def _mask_path(out: Path, name: str) -> Path:
    return out / "Mask" / f"{name}.nii.gz"


def _write_case(job) -> str:
    """Generate and write one case (module level so worker processes can run it); atomic writes."""
    out, seed, index, layout, size, num_slices = job
    name = case_id(seed, index)
    phantom = make_phantom(seed, index, size=size, num_slices=num_slices)
    save_volume(phantom.hu, phantom.affine, _image_path(out, name), dtype=np.int16)
    save_volume(layout_labels(phantom, layout), phantom.affine, _mask_path(out, name), dtype=np.uint8)
    return name
