"""Slices of preprocessed folders as a torch Dataset, split by case.

Items stay uint8 until :func:`batch_to_device`, the one place that converts dtypes (on the
training device, after a 4x smaller copy). Arrays are memory-mapped lazily in each process, so
the dataset pickles cheaply into DataLoader workers. Cases from different sources mix freely in
a batch: each item carries its source's label sets (``utils.labels``: row ``l`` = the classes a
pixel stored as ``l`` may be), so the partial-label losses know what each label means.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from utils.labels import NUM_CLASSES, label_sets_from_annotated, label_sets_from_lists
from utils.geometry import PreprocessError
from utils.preprocessed_folder import load_manifest

ARRAYS = ("image", "label", "distance")
MAX_OPEN_CASES = 128  # each memory map holds a file descriptor; keep well under `ulimit -n`


def load_cases(path_or_paths) -> list[dict]:
    """Case records of one or several preprocessed folders, read from their manifests.

    Args:
        path_or_paths: a folder written by ``utils.preprocess_data.preprocess_dataset``, or a list.

    Returns:
        One dict per case: its manifest entry, with ``"folder"`` made absolute and the folder's
        preprocessing ``"params"`` added.

    Raises:
        PreprocessError: a bad manifest, a missing case folder, or a case id in two folders.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise PreprocessError("no preprocessed folders given")
    records, seen = [], {}
    for root in map(Path, paths):
        manifest = load_manifest(root)
        for entry in manifest["cases"]:
            case_id = entry["case_id"]
            if case_id in seen:
                raise PreprocessError(f"case id {case_id} is in both {seen[case_id]} and {root}; "
                                      "case ids must be unique across folders")
            seen[case_id] = root
            folder = (root / entry["folder"]).absolute()
            if not (folder / "image.npy").is_file():
                raise PreprocessError(f"{folder}: case folder listed in {root / 'manifest.json'} is missing")
            records.append({**entry, "folder": str(folder), "params": manifest["params"]})
    return records


def load_and_pair_files(path_or_paths) -> list[dict]:
    """The seed's name for :func:`load_cases` (kept for its README's imports): nothing is paired
    here; images and masks were paired when the folders were preprocessed."""
    return load_cases(path_or_paths)


def split_cases(cases: list[dict], test_size: float = 0.2, seed: int = 0,
                patients: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Split case records into (train, val) by case, deterministically from `seed`.

    The order of `cases` does not matter (they are sorted by case id first). With two or more
    cases and ``test_size > 0`` each side gets at least one case.

    Args:
        patients: optional ``{case id: patient}`` (``utils.patients.patients_of``): all cases of a
            patient go to the same side. Patients are drawn in a seeded order until the
            validation side holds at least ``round(test_size * cases)`` cases (never the last
            patient, so training keeps one); with every case its own patient this is exactly
            the split without `patients`.
    """
    ordered = sorted(cases, key=lambda case: case["case_id"])
    count = len(ordered)
    num_val = int(round(count * test_size))
    if test_size > 0 and count >= 2:
        num_val = min(max(num_val, 1), count - 1)
    patient_of = patients or {}
    groups: dict[str, list[int]] = {}  # patient -> case indices, patients in order of first case
    for index, case in enumerate(ordered):
        groups.setdefault(patient_of.get(case["case_id"], case["case_id"]), []).append(index)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    val: set[int] = set()
    for patient in order[:-1]:  # the last patient drawn always trains
        if len(val) >= num_val:
            break
        val.update(members[patient])
    return ([case for i, case in enumerate(ordered) if i not in val],
            [case for i, case in enumerate(ordered) if i in val])


def create_train_val_datasets(paired, test_size: float = 0.2, seed: int = 0,
                              in_channels: int = 1) -> tuple["SliceDataset", "SliceDataset"]:
    """Train and validation datasets split by case (never by slice: a patient's slices are
    strongly correlated, so a slice split leaks). `paired`: case records or folder path(s)."""
    if isinstance(paired, (str, os.PathLike)) or (paired and not isinstance(paired[0], dict)):
        paired = load_cases(paired)
    train_cases, val_cases = split_cases(paired, test_size, seed)
    return SliceDataset(train_cases, in_channels), SliceDataset(val_cases, in_channels)


def case_label_sets(case: dict, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(L, C)`` bool label sets of a case record: its manifest's ``"label_sets"``, or, for a
    manifest written before they existed, rebuilt from ``"annotated"`` (every label one class).

    Raises:
        PreprocessError: label sets that do not parse (naming the case).
    """
    if "label_sets" not in case:
        return label_sets_from_annotated(case["annotated"], num_classes)
    try:
        return label_sets_from_lists(case["label_sets"], num_classes)
    except (TypeError, ValueError) as err:
        raise PreprocessError(f"case {case.get('case_id')}: bad \"label_sets\" in its manifest: {err}") from None


class SliceDataset(torch.utils.data.Dataset):
    """Every axial slice of some cases; item ``i`` is (case, slice) in case order.

    Args:
        cases: case records from :func:`load_cases`.
        in_channels: odd number of neighbouring slices stacked as channels (2.5D), centred on
            the slice; slices past either end repeat the edge slice.

    Items are dicts: ``image`` uint8 ``(C, H, W)``, ``label`` uint8 ``(H, W)``, ``distance``
    uint8 ``(H, W)``, ``annotated`` bool ``(NUM_CLASSES,)``, ``label_sets`` bool
    ``(NUM_CLASSES, NUM_CLASSES)`` (:func:`case_label_sets`), ``case`` and ``slice`` ints.
    """

    def __init__(self, cases: list[dict], in_channels: int = 1):
        if in_channels < 1 or in_channels % 2 == 0:
            raise ValueError(f"in_channels must be odd and >= 1 (slices centred on the slice), got {in_channels}")
        self.cases = list(cases)
        self.in_channels = in_channels
        sizes = {tuple(case["params"]["target_size"]) for case in self.cases if "params" in case}
        if len(sizes) > 1:
            raise ValueError(f"cases were preprocessed to different slice sizes {sorted(sizes)}")
        counts = np.array([case["num_slices"] for case in self.cases], dtype=np.int64)
        self.case_index = np.repeat(np.arange(len(self.cases)), counts)  # (N,)
        self.slice_index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # (N,)
        self.annotated = np.zeros((len(self.cases), NUM_CLASSES), dtype=bool)  # (cases, classes)
        self.annotated[:, 0] = True
        for k, case in enumerate(self.cases):
            self.annotated[k, case["annotated"]] = True
        self.label_sets = np.stack([case_label_sets(case) for case in self.cases]) if self.cases \
            else np.zeros((0, NUM_CLASSES, NUM_CLASSES), dtype=bool)  # (cases, L, C)
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._pid = os.getpid()
        self._resident: dict = {}

    def __len__(self) -> int:
        return len(self.case_index)

    def __getstate__(self):
        # memory maps and device copies stay behind; each worker process opens its own
        return {**self.__dict__, "_open": OrderedDict(), "_resident": {}}

    def arrays(self, k: int) -> dict[str, np.ndarray]:
        """Case `k`'s ``image``, ``label``, ``distance`` as read-only memory maps ``(Z, H, W)``."""
        if self._pid != os.getpid():  # a forked worker: do not share the parent's maps
            self._open, self._pid = OrderedDict(), os.getpid()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        folder = Path(self.cases[k]["folder"])
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self._open[k] = arrays
        if len(self._open) > MAX_OPEN_CASES:
            self._open.popitem(last=False)
        return arrays

    def channel_slices(self, z, num_slices) -> np.ndarray:
        """Indices of the slices stacked for slice(s) `z`, edges repeated.

        Scalars give ``(in_channels,)``; ``(N,)`` arrays of slices and slice counts give ``(N, in_channels)``.
        """
        radius = self.in_channels // 2
        offsets = np.arange(-radius, radius + 1)
        z, num_slices = np.asarray(z)[..., None], np.asarray(num_slices)[..., None]
        return np.clip(z + offsets, 0, num_slices - 1)

    def __getitem__(self, i: int) -> dict:
        k, z = int(self.case_index[i]), int(self.slice_index[i])
        arrays = self.arrays(k)
        image = arrays["image"][self.channel_slices(z, arrays["image"].shape[0])]  # (C, H, W) copy
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.array(arrays["label"][z])),
            "distance": torch.from_numpy(np.array(arrays["distance"][z])),
            "annotated": torch.from_numpy(self.annotated[k].copy()),
            "label_sets": torch.from_numpy(self.label_sets[k].copy()),
            "case": k,
            "slice": z,
        }

    def resident(self, device) -> dict[str, torch.Tensor]:
        """The whole dataset on `device` as uint8 tensors, loaded on first use per device.

        Returns ``{"image", "label", "distance"}`` ``(sum Z, H, W)``, ``"channels"`` ``(N, C)``
        rows of ``image`` per item, ``"case"``/``"slice"`` ``(N,)``, ``"annotated"``
        ``(cases, classes)``, ``"label_sets"`` ``(cases, L, C)``.
        """
        key = str(torch.device(device))
        if key not in self._resident:
            stacked = {name: torch.cat([torch.from_numpy(np.array(self.arrays(k)[name]))
                                        for k in range(len(self.cases))]).to(device) for name in ARRAYS}
            counts = np.array([case["num_slices"] for case in self.cases], dtype=np.int64)
            first = np.repeat(np.cumsum(counts) - counts, counts)  # (N,) row of each item's slice 0
            channels = first[:, None] + self.channel_slices(self.slice_index, counts[self.case_index])
            self._resident[key] = {
                **stacked, "channels": torch.from_numpy(channels).to(device),
                "case": torch.from_numpy(self.case_index).to(device),
                "slice": torch.from_numpy(self.slice_index).to(device),
                "annotated": torch.from_numpy(self.annotated).to(device),
                "label_sets": torch.from_numpy(self.label_sets).to(device)}
        return self._resident[key]


def batch_to_device(batch: dict, device, channels_last: bool = False) -> dict:
    """Move a batch to `device` and convert dtypes (the only place that does).

    Returns ``image`` float32 ``(B, C, H, W)`` in [0, 1] (uint8 / 255), ``label`` int64
    ``(B, H, W)``, ``distance`` float32 ``(B, H, W)`` pixels, ``annotated`` bool
    ``(B, NUM_CLASSES)``, ``label_sets`` bool ``(B, L, C)`` (when present); other keys unchanged.
    """
    device = torch.device(device)
    moved = dict(batch)
    image = batch["image"].to(device, non_blocking=True).float().div_(255)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    moved["image"] = image
    moved["label"] = batch["label"].to(device, non_blocking=True).long()
    moved["distance"] = batch["distance"].to(device, non_blocking=True).float()
    moved["annotated"] = batch["annotated"].to(device, non_blocking=True).bool()
    if "label_sets" in batch:
        moved["label_sets"] = batch["label_sets"].to(device, non_blocking=True).bool()
    return moved


def resident_batch(dataset: SliceDataset, device, items) -> dict:
    """One batch gathered from the dataset held on `device` (no DataLoader, no host copy).

    The first call per device copies the whole dataset there as uint8 (about 3 bytes per pixel
    per slice); later calls reuse it. The batch looks like a DataLoader batch (uint8 images and
    labels, on `device`), so :func:`batch_to_device` applies unchanged.

    Args:
        items: (B,) item indices (list or tensor).
    """
    data = dataset.resident(device)
    items = torch.as_tensor(items, device=data["case"].device)
    slices = data["channels"][items]  # (B, C) rows of the stacked volume
    case = data["case"][items]
    centre = slices[:, dataset.in_channels // 2]
    return {"image": data["image"][slices], "label": data["label"][centre],  # (B, C, H, W), (B, H, W)
            "distance": data["distance"][centre], "annotated": data["annotated"][case],
            "label_sets": data["label_sets"][case],
            "case": case, "slice": data["slice"][items]}


def resident_batches(dataset: SliceDataset, device, batch_size: int, generator: torch.Generator,
                     drop_last: bool = False):
    """Yield one shuffled epoch of :func:`resident_batch` batches; the order comes from `generator`."""
    count = len(dataset)
    order = torch.randperm(count, generator=generator, device=generator.device)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        yield resident_batch(dataset, device, order[start:start + batch_size])
