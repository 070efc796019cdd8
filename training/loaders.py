"""Training data: datasets split by case, per-epoch batch order, loaders, and the data summary.

Batch order is a function of (seed, epoch) alone (:func:`epoch_batches`), so a resumed or a
distributed run sees the same global batches as an uninterrupted single-process one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from training.config import TrainConfig
from training.runtime import Runtime
from utils.dataset import SliceDataset, resident_batch, split_cases
from utils.geometry import PreprocessParams
from utils.labels import ORGANS
from utils.patients import patients_of, warn_identical_images


def folder_list(data_dirs) -> list[Path]:
    """One preprocessed folder or several, as a list of paths."""
    return [Path(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)]


def epoch_batches(num_items: int, cfg: TrainConfig, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This process's batches of item indices for one epoch, a function of (seed, epoch) alone.

    Every process draws the same global batches and takes its own contiguous share, so one
    process and N processes see the same global batches.
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world_size} processes")
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    steps = cfg.steps_per_epoch or max(num_items // cfg.batch_size, 1)
    needed = steps * cfg.batch_size
    order = torch.cat([torch.randperm(num_items, generator=generator)
                       for _ in range(math.ceil(needed / num_items))])[:needed]
    local = cfg.batch_size // world_size
    # (steps * batch,) -> (steps, world, local): rank r takes column r of every global batch
    return order.view(steps, world_size, local)[:, rank].tolist()


def build_datasets(cfg: TrainConfig, cases: list[dict]) -> tuple[SliceDataset, SliceDataset]:
    """Training and validation slices of ``utils.dataset.load_cases`` cases, split by case (never
    by slice) and by patient under ``cfg.patient_key``; identical images are warned about
    (cases whose manifest records ``image_hash``)."""
    patients = patients_of([case["case_id"] for case in cases], cfg.patient_key)
    warn_identical_images({case["case_id"]: case["image_hash"] for case in cases if "image_hash" in case})
    train_cases, val_cases = split_cases(cases, cfg.val_fraction, cfg.seed, patients)
    return (SliceDataset(train_cases, in_channels=cfg.in_channels),
            SliceDataset(val_cases, in_channels=cfg.in_channels))


def make_loaders(cfg: TrainConfig, train_set, val_set, rt: Runtime, epoch: int, start_step: int = 0):
    """Train and validation loaders for one epoch; training batches come from `epoch_batches`."""
    batches = epoch_batches(len(train_set), cfg, epoch, rt.rank, rt.world_size)[start_step:]
    common = {"num_workers": cfg.num_workers, "pin_memory": rt.device.type == "cuda",
              "persistent_workers": False}
    if cfg.resident:
        train_loader = ResidentLoader(train_set, rt.device, batches)
    else:
        train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, **common)
    val_indices = list(range(len(val_set)))
    if cfg.val_max_slices:
        step = max(len(val_indices) // cfg.val_max_slices, 1)
        val_indices = val_indices[::step][: cfg.val_max_slices]
    val_indices = val_indices[rt.rank::rt.world_size]
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, val_indices), batch_size=cfg.batch_size // rt.world_size, **common)
    return train_loader, val_loader


class ResidentLoader:
    """Batches gathered from a dataset held whole on the training device (``resident=True``)."""

    def __init__(self, dataset: SliceDataset, device: torch.device, batches: list[list[int]]):
        self.dataset, self.device, self.batches = dataset, device, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return (resident_batch(self.dataset, self.device, items) for items in self.batches)


def data_summary(cases: list[dict], data_dirs) -> tuple[PreprocessParams, dict]:
    """The preprocessing shared by all cases, and which sources annotate each organ."""
    params = {json.dumps(case["params"], sort_keys=True) for case in cases}
    if len(params) != 1:
        raise ValueError(f"data folders {list(map(str, data_dirs))} were preprocessed with different "
                         "settings; preprocess them with the same --size/--spacing/window")
    trained_by: dict[str, list[str]] = {}
    for case in cases:
        for organ_id in case["annotated"]:
            sources = trained_by.setdefault(ORGANS[organ_id], [])
            if case["source"] not in sources:
                sources.append(case["source"])
    return PreprocessParams.from_dict(cases[0]["params"]), trained_by
