"""The phantom's truth in each source's label convention."""

from __future__ import annotations

import numpy as np

from utils.labels import ABDOMENCT1K_IDS, ORGAN_IDS, PKU_EXAMPLE_IDS
from utils.phantom.generate import Phantom

LAYOUTS = ("full", "abdomenct1k", "pku", "totalseg")  # label conventions the phantom can write

# TotalSegmentator ``total`` ids the ``totalseg`` layout writes (utils.labels.TOTALSEG_IDS reads
# them back). As in TotalSegmentator, the colon id covers the rectum and the femur ids the whole femur.
TOTALSEG_WRITE_IDS = {
    "spleen": 1, "liver": 5, "stomach": 6, "pancreas": 7, "small_intestine": 18, "colon": 20, "rectum": 20,
    "bladder": 21, "spinal_cord": 79,
}
TOTALSEG_PAIRED_IDS = {"kidney": {"right": 2, "left": 3}, "femur_head": {"right": 76, "left": 75}}


def check_layout(layout: str) -> None:
    """Raise ValueError naming the valid layouts if ``layout`` is not one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")


def layout_labels(phantom: Phantom, layout: str) -> np.ndarray:
    """The phantom's truth in one source's label convention.

    Args:
        phantom: a case from :func:`utils.phantom.make_phantom`.
        layout: ``full`` (our ids), ``abdomenct1k`` (1 liver, 2 kidney, 3 spleen, 4 pancreas),
            ``pku`` (``PKU_EXAMPLE_IDS``; spleen and pancreas not annotated) or ``totalseg``
            (TotalSegmentator ids, :data:`TOTALSEG_WRITE_IDS`: colon 20 includes the rectum, femur
            75 left / 76 right is the whole femur, head to shaft).

    Returns:
        (X, Y, Z) uint8 mask; organs the layout does not annotate are 0.
    """
    check_layout(layout)
    if layout == "full":
        return phantom.labels.copy(order="K")
    if layout == "abdomenct1k":
        return _lookup(phantom.labels, {name: source_id for source_id, name in ABDOMENCT1K_IDS.items()})
    if layout == "pku":
        mask = _lookup(phantom.labels, {name: source_id for name, source_id in PKU_EXAMPLE_IDS.items()
                                        if name in ORGAN_IDS})
        return _split_sides(phantom, mask, {organ: {side: PKU_EXAMPLE_IDS[f"{organ}_{side}"]
                                                    for side in ("left", "right")}
                                            for organ in ("kidney", "femur_head")})
    mask = _split_sides(phantom, _lookup(phantom.labels, TOTALSEG_WRITE_IDS), TOTALSEG_PAIRED_IDS)
    mask[phantom.femur_shaft & phantom.left] = TOTALSEG_PAIRED_IDS["femur_head"]["left"]
    mask[phantom.femur_shaft & ~phantom.left] = TOTALSEG_PAIRED_IDS["femur_head"]["right"]
    return mask


def _lookup(labels: np.ndarray, source_ids: dict) -> np.ndarray:
    """Our ids -> source ids by a lookup table; ``source_ids``: {our organ name: source id}."""
    table = np.zeros(len(ORGAN_IDS), dtype=np.uint8)
    for name, source_id in source_ids.items():
        table[ORGAN_IDS[name]] = source_id
    return table[labels]


def _split_sides(phantom: Phantom, mask: np.ndarray, paired: dict) -> np.ndarray:
    """Write each paired organ's left and right ids; ``paired``: {organ: {"left": id, "right": id}}."""
    for organ, ids in paired.items():
        organ_voxels = phantom.labels == ORGAN_IDS[organ]
        mask[organ_voxels & phantom.left] = ids["left"]
        mask[organ_voxels & ~phantom.left] = ids["right"]
    return mask
