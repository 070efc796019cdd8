"""Per-organ statistics of a label map over its CT: volume in ml, mean and standard deviation of HU.

What TotalSegmentator's ``--statistics`` gives its users, for our organs. Pure numpy.

    organ_statistics(labels, hu, spacing)  -> {"organs": {name: {voxels, volume_ml, mean_hu, sd_hu}}, ...}
"""

from __future__ import annotations

import numpy as np

from utils.labels import NUM_CLASSES, ORGANS


def organ_statistics(labels: np.ndarray, hu: np.ndarray, spacing) -> dict:
    """Volume and HU of each organ in ``labels``.

    Args:
        labels: ``(X, Y, Z)`` integer class ids in 0..11 (our ids).
        hu: ``(X, Y, Z)`` CT values in HU on the same grid.
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        ``{"voxel_volume_ml": float, "organs": {organ: {"voxels": int, "volume_ml": float,
        "mean_hu": float | None, "sd_hu": float | None}}}`` for every organ 1..11 (volume 0 and
        HU None when the organ is absent). ``sd_hu`` is the population standard deviation
        (``ddof=0``); all sums run in float64.
    """
    labels = np.asarray(labels)
    hu = np.asarray(hu)
    if labels.shape != hu.shape:
        raise ValueError(f"labels shape {labels.shape} != CT shape {hu.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{NUM_CLASSES - 1}")
    flat_labels = labels.ravel().astype(np.intp)
    flat_hu = hu.ravel().astype(np.float64)
    counts = np.bincount(flat_labels, minlength=NUM_CLASSES)
    sums = np.bincount(flat_labels, weights=flat_hu, minlength=NUM_CLASSES)
    means = sums / np.maximum(counts, 1)
    # second pass around each organ's mean: no cancellation as in E[x^2] - E[x]^2
    squares = np.bincount(flat_labels, weights=(flat_hu - means[flat_labels]) ** 2, minlength=NUM_CLASSES)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0  # mm^3 -> ml
    organs = {}
    for organ in range(1, NUM_CLASSES):
        present = counts[organ] > 0
        organs[ORGANS[organ]] = {
            "voxels": int(counts[organ]),
            "volume_ml": float(counts[organ]) * voxel_ml,
            "mean_hu": float(means[organ]) if present else None,
            "sd_hu": float(np.sqrt(squares[organ] / counts[organ])) if present else None,
        }
    return {"voxel_volume_ml": voxel_ml, "organs": organs}
