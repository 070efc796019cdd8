"""Validation on whole volumes: per-case 3D Dice with false positives counted, what picks ``best.pt``.

The validation cases' slices are already preprocessed, so each case is predicted slice by slice
in order, stacked back into a ``(Z, H, W)`` volume and scored with ``utils.metrics.case_dice_3d``
against its stored labels: an organ predicted in a case without it scores 0 (slice Dice would
skip it), and organs the case's source cannot score (left out, or a set-valued label) are left out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from training.runtime import Runtime
from utils.dataset import SliceDataset, batch_to_device
from utils.labels import ORGANS
from utils.metrics import case_dice_3d


@torch.inference_mode()
def predict_case_volume(model, dataset: SliceDataset, case: int, batch_size: int, rt: Runtime,
                        channels_last: bool = False) -> np.ndarray:
    """Predicted class ids ``(Z, H, W)`` uint8 of validation case `case` (model already in eval mode)."""
    items = np.flatnonzero(dataset.case_index == case)
    slices = []
    for start in range(0, len(items), batch_size):
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in items[start:start + batch_size]])
        batch = batch_to_device(batch, rt.device, channels_last=channels_last)
        with rt.autocast():
            logits = model(batch["image"])
        slices.append(logits.argmax(1).to("cpu", torch.uint8))
    return torch.cat(slices).numpy()


@torch.inference_mode()
def validate_cases(model, dataset: SliceDataset, num_classes: int, batch_size: int, rt: Runtime,
                   max_cases: int = 0) -> dict:
    """Mean over validation cases of the per-case mean 3D Dice over scoreable organs.

    ``max_cases`` > 0 scores that many cases, evenly spaced and the same every epoch. Cases are
    shared out over the processes (case ``k`` on rank ``k % world_size``) and the sums reduced, so
    every process returns the same numbers. Batches take the runtime's layout.

    Returns:
        ``{"val_case_dice": mean over cases (NaN if no case has a scoreable organ),
        "val_cases": cases scored, "case_dice_<organ>": per-organ mean over cases}``.
    """
    model.eval()
    # (organs, 2): sum of Dice and count per organ; one extra row for the per-case means
    totals = torch.zeros(num_classes, 2, dtype=torch.float64, device=rt.device)
    cases = evenly_spaced(len(dataset.cases), max_cases)
    for case in cases[rt.rank::rt.world_size]:
        pred = predict_case_volume(model, dataset, case, batch_size, rt, rt.channels_last)
        reference = np.asarray(dataset.arrays(case)["label"])
        dice = case_dice_3d(pred, reference, dataset.label_sets[case], num_classes)  # (C - 1,)
        scored = ~np.isnan(dice)
        totals[1:, 0] += torch.from_numpy(np.where(scored, dice, 0.0)).to(rt.device)
        totals[1:, 1] += torch.from_numpy(scored.astype(np.float64)).to(rt.device)
        if scored.any():
            totals[0] += torch.tensor([dice[scored].mean(), 1.0], dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(totals)
    means = (totals[:, 0] / totals[:, 1]).tolist()  # NaN where nothing was scored
    row = {"val_case_dice": means[0], "val_cases": int(totals[0, 1])}
    for organ in range(1, num_classes):
        row[f"case_dice_{ORGANS[organ]}"] = means[organ]
    return row


def evenly_spaced(count: int, limit: int) -> list[int]:
    """``limit`` indices out of ``range(count)``, evenly spaced (all of them if ``limit`` is 0)."""
    if not limit or limit >= count:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, limit).round()]
