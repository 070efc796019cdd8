"""The one training configuration: a dataclass with commented defaults, saved whole in every
checkpoint so the model can be rebuilt from the checkpoint alone.

Change fields with ``cfg.replace(epochs=2, **{"augment.rotate_deg": 5})`` or
``dataclasses.replace(cfg, epochs=2)`` in a notebook, ``--set epochs=2 augment.rotate_deg=5`` or
``--config FILE`` (JSON) on the command line. Every way meets the same checks: a TrainConfig
validates itself when it is made (``__post_init__``), so an unknown key, a wrong type or a value
out of range (``epochs=0``, ``val_fraction=1.5``) is a :class:`ConfigError` naming the key.

The partial-label handling the project compares lives here as named presets
(:data:`PARTIAL_LABEL_PRESETS`, :func:`with_partial_labels`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from utils.augment import AugmentParams
from utils.errors import UserError
from utils.labels import DEFAULT_CLASS_WEIGHTS, NUM_CLASSES
from utils.patients import PatientKeyError, compile_patient_regex, is_csv_key

class ConfigError(UserError):
    """A configuration value or file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    # model
    features: tuple[int, ...] = (64, 128, 256, 512)  # U-Net encoder widths; bottleneck is 2x the last
    in_channels: int = 1              # 1 = one slice; 3, 5 ... = neighbouring slices (2.5D)
    num_classes: int = NUM_CLASSES
    checkpointing: bool = False       # gradient checkpointing: less memory, ~30% slower
    # loss
    loss: str = "weighted_ce"         # weighted_ce | dice | dice_ce
    class_weights: tuple[float, ...] = DEFAULT_CLASS_WEIGHTS
    sigma: float = 3.0                # boundary weight exp(-d^2 / 2 sigma^2), d in pixels
    alpha: float = 10.0               # weight of the boundary term
    marginal: bool = False            # partial labels: unannotated organs merge with background
    exclusion_weight: float = 0.0     # partial labels: penalise unannotated organs on labelled pixels
    exclusion: str = "merged"         # merged: one -log(1 - sum of unannotated probabilities) term
                                      # (older runs) | published: Shi et al. 2021, per organ, CE + Dice
    # optimisation
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"          # adamw | sgd
    weight_decay: float = 1e-4
    momentum: float = 0.9             # sgd only
    scheduler: str = "step"           # step | poly | cosine | constant
    step_size: int = 10               # step: epochs between decays
    gamma: float = 0.5                # step: decay factor
    accumulation_steps: int = 1       # optimizer step every N batches
    grad_clip: float = 0.0            # max grad norm; 0 = off
    steps_per_epoch: int = 0          # 0 = one pass over the training slices
    val_fraction: float = 0.2         # fraction of cases (never slices) held out for validation
    val_max_slices: int = 0           # 0 = all validation slices (the slice loss and Dice)
    val_max_cases: int = 0            # 0 = all validation cases (the 3D Dice that picks best.pt)
    patient_key: str = ""             # keep a patient's scans on one side of the split: a regex over
                                      # case ids with one group (r"^(PAT\d+)_") or a case,patient CSV
    # augmentation, applied on the training device to whole batches (utils/augment.py documents
    # each setting): --set augment.rotate_deg=5, augment.enabled=false; the seed's right-angle
    # rotations (augment.rot90_p) stay off: they erase the left/right and front/back position
    # cues organs rely on
    augment: AugmentParams = field(default_factory=AugmentParams)
    # performance
    amp: str = "auto"                 # auto (CPU: measured, training/cpu.py) | bf16 | fp16 | off = fp32
    channels_last: bool = True
    compile: bool = False             # torch.compile; falls back to eager if it fails
    num_workers: int = 2
    resident: bool = False            # keep the whole preprocessed set on the training device
    cpu_keep_freed_memory: bool = True  # CPU, glibc: reuse freed memory; ~15-20% faster steps for
                                      # ~30% more peak RAM (training.runtime.keep_freed_cpu_memory)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    sync_batchnorm: bool = False      # DDP only
    # bookkeeping
    seed: int = 0
    deterministic: bool = False       # torch.use_deterministic_algorithms (exact resume tests)
    wandb: str = "off"                # off | offline | online; never required
    wandb_project: str = "abdoseg"

    def __post_init__(self):
        for item in fields(self):
            object.__setattr__(self, item.name, _coerce(item.name, getattr(self, item.name)))
        check_ranges(self)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists, ``augment`` nested), what checkpoints store."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        """Validated config from a dict; unknown keys, wrong types and values out of range raise
        ConfigError. Accepts dotted keys (``augment.rotate_deg``) and the flat augmentation keys
        of checkpoints written before the settings were nested (``rotate_deg``, ``augment: true``)."""
        try:
            values = nest_augment_keys(values)
            unknown = [key for key in values if key not in _HINTS]
            if unknown:
                known = ", ".join(item.name for item in fields(cls))
                raise ConfigError(f"unknown key '{unknown[0]}' (known keys: {known})")
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def replace(self, **changes) -> "TrainConfig":
        """A copy with fields changed (validated like from_dict); dotted keys reach into ``augment``."""
        return TrainConfig.from_dict(merge_values(self.to_dict(), changes))


AUGMENT_KEYS = tuple(item.name for item in fields(AugmentParams))
_HINTS = typing.get_type_hints(TrainConfig)
_AUGMENT_HINTS = typing.get_type_hints(AugmentParams)
_CHOICES = {
    "loss": ("weighted_ce", "dice", "dice_ce"), "optimizer": ("adamw", "sgd"),
    "scheduler": ("step", "poly", "cosine", "constant"), "amp": ("auto", "bf16", "fp16", "off", "fp32"),
    "wandb": ("off", "offline", "online"), "exclusion": ("published", "merged"),
}

# How organs a source leaves unannotated are treated (benchmarks/partial_labels.py measures them)
PARTIAL_LABEL_PRESETS = {
    "seed_way": {"marginal": False, "exclusion_weight": 0.0},       # unannotated organs count as
                                                                    # background (the original project)
    "marginal_only": {"marginal": True, "exclusion_weight": 0.0},   # they may hide under a 0 label
    "marginal": {"marginal": True, "exclusion_weight": 1.0,         # and labelled pixels push them away
                 "exclusion": "published"},                         # (marginal + exclusion, Shi et al. 2021)
}


def check_ranges(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first field of `cfg` out of its range (types already checked)."""
    infinite = [f.name for f in fields(cfg) if any(isinstance(v, float) and not math.isfinite(v)
                                                   for v in _numbers(getattr(cfg, f.name)))]
    rules = [(name, False, "finite (not inf or nan)") for name in infinite] + [
        ("features", all(width > 0 for width in cfg.features)
         and all(a <= b for a, b in zip(cfg.features, cfg.features[1:])), "positive and non-decreasing"),
        ("in_channels", cfg.in_channels >= 1 and cfg.in_channels % 2 == 1, "odd and >= 1"),
        ("num_classes", 2 <= cfg.num_classes <= NUM_CLASSES, f"between 2 and {NUM_CLASSES}"),
        ("class_weights", len(cfg.class_weights) == cfg.num_classes and min(cfg.class_weights) >= 0,
         f"{cfg.num_classes} numbers >= 0 (one per class)"),
        ("sigma", cfg.sigma > 0, "> 0"), ("alpha", cfg.alpha >= 0, ">= 0"),
        ("exclusion_weight", cfg.exclusion_weight >= 0, ">= 0"),
        ("epochs", cfg.epochs > 0, "> 0"), ("batch_size", cfg.batch_size > 0, "> 0"),
        ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"), ("step_size", cfg.step_size > 0, "> 0"),
        ("gamma", 0 < cfg.gamma <= 1, "in (0, 1]"), ("accumulation_steps", cfg.accumulation_steps >= 1, ">= 1"),
        ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0 = off)"),
        ("steps_per_epoch", cfg.steps_per_epoch >= 0, ">= 0 (0 = one pass)"),
        ("val_fraction", 0 <= cfg.val_fraction < 1, "in [0, 1)"),
        ("val_max_slices", cfg.val_max_slices >= 0, ">= 0 (0 = all)"),
        ("val_max_cases", cfg.val_max_cases >= 0, ">= 0 (0 = all)"),
        ("num_workers", cfg.num_workers >= 0, ">= 0"), ("device", _is_device(cfg.device), "auto, cpu, cuda or cuda:N"),
        ("wandb_project", bool(cfg.wandb_project.strip()), "a non-empty name"),
        ("patient_key", _is_patient_key(cfg.patient_key),
         "a regular expression with exactly one group, or a .csv file with columns case,patient"),
    ]
    _raise_first(rules, lambda key: getattr(cfg, key))


def check_augment(values: dict) -> None:
    """The same for augmentation settings (a dict of some of AugmentParams' fields, typed)."""
    settings = dict(values)
    get = settings.get
    scale = tuple(get("scale_range", (1.0, 1.0)))
    rules = [
        ("rot90_p", 0 <= get("rot90_p", 0.0) <= 1, "a probability in [0, 1]"),
        ("flip_p", 0 <= get("flip_p", 0.0) <= 1, "a probability in [0, 1]"),
        ("rotate_deg", 0 <= get("rotate_deg", 0.0) <= 180, "in [0, 180] degrees"),
        ("scale_range", len(scale) == 2 and 0 < scale[0] <= scale[1],
         "[min, max] with 0 < min <= max"),
        ("num_brightness_variations", get("num_brightness_variations", 0) >= 0, ">= 0"),
        ("brightness", get("brightness", 0.0) >= 0, ">= 0"),
        ("contrast", 0 <= get("contrast", 0.0) < 1, "in [0, 1)"),
        ("noise_std", get("noise_std", 0.0) >= 0, ">= 0"),
    ]
    _raise_first(rules, lambda key: settings.get(key), prefix="augment.")


def _numbers(value) -> tuple:
    """A field's numbers: the value itself, or the items of a tuple field (features, class_weights)."""
    return tuple(value) if isinstance(value, tuple) else (value,)


def _raise_first(rules: list, value_of, prefix: str = "") -> None:
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"'{prefix}{key}' must be {rule}, got {value_of(key)!r}")


def _is_patient_key(key: str) -> bool:
    if not key or is_csv_key(key):
        return True  # the CSV is read (and checked) when training starts
    try:
        compile_patient_regex(key)
    except PatientKeyError:
        return False
    return True


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def with_partial_labels(cfg: TrainConfig, preset: str) -> TrainConfig:
    """`cfg` with the partial-label handling of a :data:`PARTIAL_LABEL_PRESETS` entry."""
    if preset not in PARTIAL_LABEL_PRESETS:
        raise ConfigError(f"partial-label preset {preset!r}: expected one of {', '.join(PARTIAL_LABEL_PRESETS)}")
    return cfg.replace(**PARTIAL_LABEL_PRESETS[preset])


def nest_augment_keys(values: dict) -> dict:
    """`values` with augmentation settings gathered under ``augment`` as a (partial) dict.

    Takes ``augment`` as a dict or an AugmentParams, ``augment.KEY`` dotted keys, and the older
    flat form (``rotate_deg`` at the top, ``augment`` true/false for on/off).
    """
    values = dict(values)
    augment = values.pop("augment", {})
    if isinstance(augment, AugmentParams):
        augment = dataclasses.asdict(augment)
    elif isinstance(augment, bool):  # before nesting, 'augment' was the on/off switch
        augment = {"enabled": augment}
    elif not isinstance(augment, dict):
        raise ConfigError(f"'augment' must be an object of augmentation settings, got {augment!r}")
    augment = dict(augment)
    for key in list(values):
        if key.startswith("augment."):
            augment[key.removeprefix("augment.")] = values.pop(key)
        elif key in AUGMENT_KEYS and key != "enabled":  # flat keys of older checkpoints
            augment[key] = values.pop(key)
    if augment:
        values["augment"] = augment
    return values


def merge_values(base: dict, changes: dict) -> dict:
    """`base` (a ``to_dict``) updated by `changes`; augmentation settings merge key by key."""
    base, changes = nest_augment_keys(base), nest_augment_keys(changes)
    merged = {**base, **changes}
    if "augment" in changes:
        merged["augment"] = {**base.get("augment", {}), **changes["augment"]}
    return merged


def _coerce(key: str, value):
    if key == "augment":
        return _coerce_augment(value)
    return _coerce_value(key, value, _HINTS[key])


def _coerce_augment(value) -> AugmentParams:
    values = nest_augment_keys({"augment": value}).get("augment", {})
    unknown = [key for key in values if key not in _AUGMENT_HINTS]
    if unknown:
        raise ConfigError(f"unknown key 'augment.{unknown[0]}' (known keys: "
                          f"{', '.join('augment.' + key for key in AUGMENT_KEYS)})")
    coerced = {key: _coerce_value(f"augment.{key}", item, _AUGMENT_HINTS[key]) for key, item in values.items()}
    check_augment(coerced)
    return AugmentParams(**coerced)


def _coerce_value(key: str, value, hint):
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = tuple(_scalar(typing.get_args(hint)[0], item) for item in value)
            if not value:
                raise TypeError
        else:
            value = _scalar(hint, value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{key}' must be {_describe(hint)}, got {value!r}") from None
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"'{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def _scalar(kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a non-empty list of {_TYPE_WORDS[typing.get_args(hint)[0]].split()[-1]}s"
    return _TYPE_WORDS[hint]


def parse_set(assignments: list[str]) -> dict:
    """Parse ``key=value`` strings; values are JSON (``features=[16,32]``, ``amp=off`` as text).
    Keys may be dotted: ``augment.rotate_deg=5``."""
    values = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


def load_config(path: str | Path | None = None, assignments: list[str] = (),
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`), then a JSON config file, then ``--set`` assignments."""
    values = (base or TrainConfig()).to_dict()
    if path is not None:
        path = Path(path)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object of config keys")
        values = merge_values(values, loaded)
        TrainConfig.from_dict(values, where=str(path))
    values = merge_values(values, parse_set(list(assignments)))
    return TrainConfig.from_dict(values, where="--set")
