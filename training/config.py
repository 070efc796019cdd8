"""The one training configuration: a dataclass with commented defaults, saved whole in every
checkpoint so the model can be rebuilt from the checkpoint alone.

Change fields with ``dataclasses.replace(cfg, epochs=2)`` in a notebook, ``--set epochs=2`` or
``--config FILE`` (JSON) on the command line. Unknown keys and wrong types are errors that name
the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from utils.errors import UserError
from utils.labels import DEFAULT_CLASS_WEIGHTS, NUM_CLASSES


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
    val_max_slices: int = 0           # 0 = all validation slices
    # augmentation (applied on the training device, whole batches at once)
    augment: bool = True
    rot90_p: float = 0.0              # the seed's right-angle rotations; off: they erase the
                                      # left/right and front/back position cues organs rely on
    flip_p: float = 0.0
    rotate_deg: float = 10.0          # small rotations, uniform in +-rotate_deg
    scale_range: tuple[float, float] = (0.9, 1.1)
    num_brightness_variations: int = 4  # the seed's brightness/contrast levels, now sampled online
    brightness: float = 0.1           # max additive shift of the normalised image
    contrast: float = 0.15            # max relative contrast change
    noise_std: float = 0.02           # Gaussian noise on the normalised image
    # performance
    amp: str = "auto"                 # auto | bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False             # torch.compile; falls back to eager if it fails
    num_workers: int = 2
    resident: bool = False            # keep the whole preprocessed set on the training device
    cpu_keep_freed_memory: bool = True  # CPU, glibc: reuse freed memory; ~15-20% faster steps for
                                      # ~30% more peak RAM (training.train.keep_freed_cpu_memory)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    sync_batchnorm: bool = False      # DDP only
    # bookkeeping
    seed: int = 0
    deterministic: bool = False       # torch.use_deterministic_algorithms (exact resume tests)
    wandb: str = "off"                # off | offline | online; never required
    wandb_project: str = "abdoseg"

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists), what checkpoints store."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        """Validated config from a dict; unknown keys and wrong types raise ConfigError."""
        return cls(**{key: _coerce(key, value, where) for key, value in values.items()})

    def replace(self, **changes) -> "TrainConfig":
        """A copy with fields changed (validated like from_dict)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


_HINTS = typing.get_type_hints(TrainConfig)
_CHOICES = {
    "loss": ("weighted_ce", "dice", "dice_ce"), "optimizer": ("adamw", "sgd"),
    "scheduler": ("step", "poly", "cosine", "constant"), "amp": ("auto", "bf16", "fp16", "off"),
    "wandb": ("off", "offline", "online"),
}


def _coerce(key: str, value, where: str):
    if key not in _HINTS:
        known = ", ".join(f.name for f in fields(TrainConfig))
        raise ConfigError(f"{where}: unknown key '{key}' (known keys: {known})")
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            item_type = typing.get_args(hint)[0]
            value = tuple(_scalar(item_type, v) for v in value)
            if not value:
                raise TypeError
        else:
            value = _scalar(hint, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be {_describe(hint)}, got {value!r}") from None
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
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
    """Parse ``key=value`` strings; values are JSON (``features=[16,32]``, ``amp=off`` as text)."""
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
        TrainConfig.from_dict({**values, **loaded}, where=str(path))
        values.update(loaded)
    overrides = parse_set(list(assignments))
    TrainConfig.from_dict({**values, **overrides}, where="--set")
    values.update(overrides)
    return TrainConfig.from_dict(values)
