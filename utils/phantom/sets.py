"""Phantom sets ready to train on: written, then preprocessed (for benchmarks, the demo and tests)."""

from __future__ import annotations

from pathlib import Path

from utils.geometry import PreprocessError, PreprocessParams
from utils.phantom.writer import write_phantom_dataset
from utils.preprocess_data import preprocess_dataset


def preprocess_phantoms(folder, cases: int, layout: str = "full", seed: int = 0, size: int = 128,
                        num_slices: int | None = None, params: PreprocessParams = PreprocessParams(),
                        workers: int = 1) -> Path:
    """Phantom cases written to ``folder/raw`` and preprocessed into ``folder/preprocessed``.

    Returns the preprocessed folder; raises PreprocessError if any case failed.
    """
    raw, out = Path(folder) / "raw", Path(folder) / "preprocessed"
    write_phantom_dataset(raw, cases, layout, seed=seed, size=size, num_slices=num_slices,
                          workers=workers, progress=False)
    manifest = preprocess_dataset(layout, raw / "Image", raw / "Mask", out, params, workers=workers,
                                  progress=False)
    if manifest["failed"]:
        raise PreprocessError(f"{out}: preprocessing failed: {manifest['failed']}")
    return out
