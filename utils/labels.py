"""The label scheme: the one place that knows organ ids, names, colours and each source's label map.

abdoseg segments 12 classes (0 background + 11 organs). Every source of training data labels its
own subset of organs with its own ids; a :class:`LabelSource` maps those ids into ours with one
lookup-table operation and declares which of our organs the source *annotates*. That set matters:
an organ a source does not annotate is written as 0 in its masks although it may be there, which
is what the partial-label losses (``utils/losses.py``) account for.

Set-valued labels. A stored label value may mean a *set* of our classes. Each source says so with
:meth:`LabelSource.label_sets`, a bool matrix ``(L, C)`` (``L >= C`` stored values, ``C`` classes):
row ``l`` is the set of classes a voxel stored as ``l`` may be. Rows of organs the source labels
with certainty are identity rows; row 0 is background plus every organ the source leaves out
(a 0 there may be any of them); a source label that covers several of our classes keeps the id
of its nominal class in the label arrays (what the seed's way trains on) and that row holds the
whole set. TotalSegmentator: its femur (75/76) is the whole femur, stored as femur head (3) with
row 3 = {femur_head, background}; it has no rectum class and its colon (20) most likely includes
the rectum, so row 2 = {colon, rectum} and row 0 = {background, rectum}. Rows past ``C`` are free
for sources whose labels need a set id besides the nominal one; none does yet. The losses take
one such matrix per item (``(B, L, C)``), :func:`scoreable_classes` says which classes an
evaluation may score, and :func:`label_sets_from_annotated` rebuilds the matrix from the older
list of annotated organs (a manifest written before label sets existed).

Sources:
    ``full``         our own ids (what the phantom writes for fully labelled cases).
    ``abdomenct1k``  1 liver, 2 kidney, 3 spleen, 4 pancreas.
    ``totalseg``     TotalSegmentator ``total`` ids; every id not listed becomes background.
    ``pku``          ids from a user-provided JSON file (see :func:`load_label_map`), required:
                     the ids are private. ``EXAMPLE_PKU_MAP`` (the phantom's ids) is passed explicitly.
    ``nnunet``       names in an nnU-Net ``dataset.json`` matched to our organs by name.

Label-map JSON format (``pku``; also what ``dataset.json`` holds under ``"labels"``)::

    {"labels": {"background": 0, "bladder": 1, "femur_head_left": 3, "kidney_right": 6, ...}}

Names are matched case-insensitively with synonyms (``urinary_bladder``, ``small_bowel``,
``kidney_left`` ...). Left and right merge into one class. A name we do not know is an error,
not a guess: list it under ``"ignore"`` to map it to background on purpose. Ids are integers in
``0..MAX_SOURCE_ID`` (65535), each used by one name only, and no organ has id 0 (background).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import read_json

ORGANS = (
    "background", "bladder", "colon", "femur_head", "kidney", "liver",
    "rectum", "small_intestine", "spinal_cord", "stomach", "spleen", "pancreas",
)
NUM_CLASSES = len(ORGANS)
ORGAN_IDS = {name: i for i, name in enumerate(ORGANS)}
DISPLAY_NAMES = tuple(name.replace("_", " ").capitalize() for name in ORGANS)

# RGB in 0..255, chosen to stay distinguishable over a grey CT window.
COLORS = (
    (0, 0, 0),          # background
    (255, 221, 51),     # bladder: yellow
    (166, 98, 42),      # colon: brown
    (0, 190, 170),      # femur head: teal (white would vanish on bone)
    (230, 60, 60),      # kidney: red
    (150, 40, 110),     # liver: plum
    (255, 140, 0),      # rectum: orange
    (255, 160, 200),    # small intestine: pink
    (60, 200, 255),     # spinal cord: sky blue
    (60, 180, 75),      # stomach: green
    (70, 90, 230),      # spleen: blue
    (190, 230, 70),     # pancreas: lime
)

# Default class weights of the weighted cross-entropy (the seed's hand-tuned values). Background is
# cheap to get right; bladder and colon are under-segmented without a push; small intestine is
# over-predicted into neighbouring bowel.
DEFAULT_CLASS_WEIGHTS = (0.3, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0, 1.0, 1.0)

# Names a label file may use for our organs (lower case). Side-specific names merge into one class.
SYNONYMS = {
    "background": "background", "bg": "background", "clear label": "background",
    "bladder": "bladder", "urinary_bladder": "bladder", "urinarybladder": "bladder",
    "colon": "colon", "large_intestine": "colon", "large_bowel": "colon",
    "femur_head": "femur_head", "femoral_head": "femur_head", "femur_head_left": "femur_head",
    "femur_head_right": "femur_head", "femur_left": "femur_head", "femur_right": "femur_head",
    "femoral_head_left": "femur_head", "femoral_head_right": "femur_head",
    "head_of_femur_left": "femur_head", "head_of_femur_right": "femur_head",
    "kidney": "kidney", "kidneys": "kidney", "kidney_left": "kidney", "kidney_right": "kidney",
    "left_kidney": "kidney", "right_kidney": "kidney",
    "liver": "liver",
    "rectum": "rectum",
    "small_intestine": "small_intestine", "small_bowel": "small_intestine",
    "smallintestine": "small_intestine", "duodenum": "small_intestine",
    "intestine": "small_intestine",
    "spinal_cord": "spinal_cord", "spinalcord": "spinal_cord", "cord": "spinal_cord",
    "stomach": "stomach",
    "spleen": "spleen",
    "pancreas": "pancreas",
}

# TotalSegmentator ``total`` ids that are organs of this project; every other id is background.
TOTALSEG_IDS = {
    1: "spleen", 2: "kidney", 3: "kidney", 5: "liver", 6: "stomach", 7: "pancreas",
    18: "small_intestine", 19: "small_intestine", 20: "colon", 21: "bladder",
    75: "femur_head", 76: "femur_head", 79: "spinal_cord",
}
# TotalSegmentator labels whose meaning is a set of our classes (nominal organ -> the set):
# ids 75/76 are the whole femur, of which our femur head is a part (the rest is background here);
# it has no rectum class, so its colon (20) most likely holds the rectum too.
TOTALSEG_SETS = {"femur_head": ("femur_head", "background"), "colon": ("colon", "rectum")}
ABDOMENCT1K_IDS = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
# Ids of the example PKU map shipped in examples/pku_label_map.json (the phantom writes these).
PKU_EXAMPLE_IDS = {
    "bladder": 1, "colon": 2, "femur_head_left": 3, "femur_head_right": 4, "kidney_left": 5,
    "kidney_right": 6, "liver": 7, "rectum": 8, "small_intestine": 9, "spinal_cord": 10,
    "stomach": 11,
}
SOURCES = ("full", "abdomenct1k", "pku", "totalseg", "nnunet")
# Largest id a label map may give: masks are read as integers of any width, but the lookup table
# has one entry per id, so ids stay in the uint16 range (TotalSegmentator uses up to 117).
MAX_SOURCE_ID = 65535


class LabelMapError(UserError):
    """A label map that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LabelSource:
    """How one source's mask ids map into our classes.

    Attributes:
        name: source name (one of SOURCES).
        lut: (max_id + 1,) uint8 lookup table, source id -> our id.
        known: (max_id + 1,) bool, the source ids the map declares (organs and background).
        annotated: our organ ids (1..11) this source labels, with certainty or as the nominal
            class of a set-valued label; background is implied.
        open_ids: True when undeclared ids are background (TotalSegmentator's many other
            structures); False when an undeclared id is an error.
        ambiguous: our nominal id -> the set of our ids a voxel stored with it may be, for
            source labels that mean several of our classes (empty for most sources).
    """

    name: str
    lut: np.ndarray
    known: np.ndarray
    annotated: frozenset[int]
    open_ids: bool = False
    ambiguous: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def remap(self, mask: np.ndarray, path: str | Path = "mask") -> np.ndarray:
        """Map a source mask (integer array, any shape) to our ids (uint8, same shape).

        One table lookup over the whole volume. Raises LabelMapError naming `path` for values
        the map does not declare (unless the source is open, where they become background).
        """
        if mask.size == 0:
            return mask.astype(np.uint8)
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or (high >= len(self.lut) and not self.open_ids):
            raise LabelMapError(self._unknown_message(mask, path))
        lut = self.lut
        if high >= len(lut):  # open source: ids past the table are background
            lut = np.zeros(high + 1, dtype=np.uint8)
            lut[: len(self.lut)] = self.lut
        # work on the flat memory order: volumes from NIfTI are Fortran-ordered
        order = "F" if mask.flags.f_contiguous and not mask.flags.c_contiguous else "C"
        flat = mask.reshape(-1, order=order)
        if not self.open_ids and not self.known.all() and not self.known[flat].all():
            raise LabelMapError(self._unknown_message(mask, path))
        return lut[flat].reshape(mask.shape, order=order)

    def annotated_mask(self) -> np.ndarray:
        """(NUM_CLASSES,) bool with background and the annotated organs True."""
        mask = np.zeros(NUM_CLASSES, dtype=bool)
        mask[0] = True
        mask[sorted(self.annotated)] = True
        return mask

    def label_sets(self, num_classes: int = NUM_CLASSES) -> np.ndarray:
        """(C, C) bool: row ``l`` holds the classes a voxel stored as ``l`` may be.

        Row 0 is background plus the organs the source leaves out; rows of set-valued labels
        (:attr:`ambiguous`) hold their set; every other row is the identity (a value the source
        never writes keeps its identity row, harmless since no voxel holds it).
        """
        sets = np.eye(num_classes, dtype=bool)
        sets[0, [c for c in range(1, num_classes) if c not in self.annotated]] = True
        for nominal, classes in self.ambiguous.items():
            sets[nominal] = False
            sets[nominal, sorted(classes)] = True
        return sets

    def _unknown_message(self, mask: np.ndarray, path: str | Path) -> str:
        values = np.unique(mask)
        bad = [int(v) for v in values if not 0 <= v < len(self.lut) or not self.known[v]]
        return (f"{path}: mask values {bad[:10]} are not in the '{self.name}' label map "
                f"(known ids: {np.flatnonzero(self.known).tolist()})")


def _source(name: str, ids: dict[int, str], background_ids=(), open_ids=False,
            sets: Mapping[str, Iterable[str]] | None = None) -> LabelSource:
    """A LabelSource from {source id: our organ name}; ``sets`` maps a nominal organ to the
    organ names its label may be (set-valued labels, see the module docstring)."""
    size = max([*ids, *background_ids, 0]) + 1
    lut = np.zeros(size, dtype=np.uint8)
    known = np.zeros(size, dtype=bool)
    known[[0, *background_ids]] = True
    for source_id, organ in ids.items():
        lut[source_id] = ORGAN_IDS[organ]
        known[source_id] = True
    ambiguous = {ORGAN_IDS[nominal]: frozenset(ORGAN_IDS[organ] for organ in classes)
                 for nominal, classes in (sets or {}).items()}
    return LabelSource(name, lut, known, frozenset(int(v) for v in lut if v > 0), open_ids, ambiguous)


def canonical_organ(name: str) -> str | None:
    """Our organ name for a label name from a file, or None if it is not one of ours."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return SYNONYMS.get(key)


def source_from_names(name: str, labels: dict[str, int], ignore=(), path: str | Path = "") -> LabelSource:
    """Build a source from a {label name: id} table, matching names to our organs.

    Ids are integers in ``0..MAX_SOURCE_ID``; each id belongs to one name only (two names with one
    id would let the last one win silently); an organ cannot have id 0, which every mask uses for
    the voxels outside all organs. Raises LabelMapError naming `path` for each of these, and for
    every label that is neither one of our organs nor in `ignore`.
    """
    ignore = {n.strip().lower() for n in ignore}
    ids, background_ids, unknown, owner = {}, [], [], {}
    for label_name, source_id in labels.items():
        _check_label_id(label_name, source_id, owner, path)
        organ = canonical_organ(label_name)
        if organ == "background" or label_name.strip().lower() in ignore:
            background_ids.append(source_id)
        elif organ is None:
            unknown.append(label_name)
        elif source_id == 0:
            raise LabelMapError(f"{path}: organ '{label_name}' has id 0, the id of background (every "
                                "unlabelled voxel); give it its own id > 0")
        else:
            ids[source_id] = organ
    if unknown:
        raise LabelMapError(
            f"{path}: label names {unknown} match none of our organs {list(ORGANS[1:])}; "
            "rename them or list them under \"ignore\" to map them to background")
    return _source(name, ids, background_ids)


def _check_label_id(label_name: str, source_id, owner: dict[int, str], path) -> None:
    """Refuse an id that is not an integer in 0..MAX_SOURCE_ID or that another name already has."""
    if not isinstance(source_id, int) or isinstance(source_id, bool) or not 0 <= source_id <= MAX_SOURCE_ID:
        raise LabelMapError(f"{path}: label '{label_name}' has id {source_id!r}; ids are integers "
                            f"0..{MAX_SOURCE_ID}")
    if source_id in owner:
        raise LabelMapError(f"{path}: labels '{owner[source_id]}' and '{label_name}' both have id "
                            f"{source_id}; each id must name one label")
    owner[source_id] = label_name


def load_label_map(path: str | Path, name: str = "pku") -> LabelSource:
    """Read a label-map JSON (``{"labels": {name: id}, "ignore": [names]}``) into a LabelSource.

    Raises:
        LabelMapError: missing or invalid JSON, no ``"labels"`` object, an id that is not an integer
            in ``0..MAX_SOURCE_ID``, two names with one id, an organ with id 0, an unknown name.
    """
    path = Path(path)
    try:
        spec = read_json(path, "label-map file")
    except UserError as err:
        raise LabelMapError(str(err)) from None
    labels = spec.get("labels") if isinstance(spec, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise LabelMapError(f"{path}: expected an object with a non-empty \"labels\" mapping of name to id")
    ignore = spec.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(item, str) for item in ignore):
        raise LabelMapError(f"{path}: \"ignore\" must be a list of label names")
    labels = {k: _as_int(v) for k, v in labels.items()}
    return source_from_names(name, labels, ignore, path)


def _as_int(value):
    # nnU-Net v2 allows region labels as lists; a one-element list is a plain id.
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def get_source(name: str, label_map: str | Path | None = None) -> LabelSource:
    """The LabelSource for a source name.

    Args:
        name: one of SOURCES.
        label_map: required for ``pku`` (its label-map JSON; the shipped example is
            ``EXAMPLE_PKU_MAP``, passed explicitly) and ``nnunet`` (``dataset.json`` or its folder);
            an error for ``full``, ``abdomenct1k`` and ``totalseg``, whose ids are fixed.

    Raises:
        LabelMapError: unknown source, a missing map, a map the source does not use, a bad map.
    """
    fixed = {"full": lambda: _source("full", dict(enumerate(ORGANS[1:], start=1))),
             "abdomenct1k": lambda: _source("abdomenct1k", ABDOMENCT1K_IDS),
             "totalseg": lambda: _source("totalseg", TOTALSEG_IDS, open_ids=True, sets=TOTALSEG_SETS)}
    if name not in SOURCES:
        raise LabelMapError(f"unknown source '{name}'; choose one of {', '.join(SOURCES)}")
    if name in fixed:
        if label_map is not None:
            raise LabelMapError(f"{label_map}: the '{name}' source has fixed ids and uses no label map; "
                                "drop the label map, or choose the source 'pku' or 'nnunet'")
        return fixed[name]()
    if label_map is None:
        needs = "its label-map JSON" if name == "pku" else "the dataset folder or its dataset.json"
        raise LabelMapError(f"the '{name}' source needs {needs} (--label-map)"
                            + (f"; the example map is {EXAMPLE_PKU_MAP}" if name == "pku" else ""))
    path = Path(label_map)
    if name == "nnunet" and path.is_dir():
        path = path / "dataset.json"
    return load_label_map(path, name)


EXAMPLE_PKU_MAP = Path(__file__).resolve().parents[1] / "examples" / "pku_label_map.json"


def organ_names(ids) -> list[str]:
    """Names for a collection of class ids, in id order."""
    return [ORGANS[i] for i in sorted(ids)]


# ----------------------------------------------------------------------------- label sets


def label_sets_from_annotated(annotated: Iterable[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(C, C) bool label sets of a source that annotates the organ ids ``annotated`` with
    certainty: identity rows, row 0 = background plus the other organs."""
    sets = np.eye(num_classes, dtype=bool)
    annotated = {int(i) for i in annotated}
    sets[0, [c for c in range(1, num_classes) if c not in annotated]] = True
    return sets


def scoreable_classes(label_sets: np.ndarray) -> np.ndarray:
    """Which classes an evaluation may score: a class is scoreable when every stored value whose
    set holds it means that class alone, so the reference says for each voxel whether it is there.

    Args:
        label_sets: ``(..., L, C)`` bool.

    Returns:
        ``(..., C)`` bool. Organs a source leaves out (they are in row 0) and the classes of a
        set-valued label (TotalSegmentator's colon and rectum, femur head and background) are
        False; with every row a single class all are True.
    """
    label_sets = np.asarray(label_sets, dtype=bool)
    ambiguous_rows = label_sets.sum(axis=-1) > 1  # (..., L)
    return ~(label_sets & ambiguous_rows[..., None]).any(axis=-2)


def label_sets_to_lists(label_sets: np.ndarray) -> list[list[int]]:
    """``(L, C)`` bool -> one sorted list of class ids per row (for JSON manifests)."""
    return [np.flatnonzero(row).tolist() for row in np.asarray(label_sets, dtype=bool)]


def label_sets_from_lists(rows: list[list[int]], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Inverse of :func:`label_sets_to_lists`: ``(L, C)`` bool. Raises ValueError for fewer than
    ``num_classes`` rows, an empty row, or a class id outside ``0..num_classes-1``."""
    if len(rows) < num_classes:
        raise ValueError(f"label sets need at least {num_classes} rows, got {len(rows)}")
    sets = np.zeros((len(rows), num_classes), dtype=bool)
    for value, classes in enumerate(rows):
        bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < num_classes)]
        if bad or not classes:
            raise ValueError(f"label set of value {value} must list class ids in 0..{num_classes - 1}, "
                             f"got {classes}")
        sets[value, classes] = True
    return sets
