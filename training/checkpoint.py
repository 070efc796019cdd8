"""Checkpoints: written atomically, read without pickle, enough on their own to predict.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path, weights_only=True)``: a file carrying pickled code is refused, never run.

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "epoch": epochs finished, "step_in_epoch": batches done in an interrupted epoch,
     "rng": {...}, "config": TrainConfig.to_dict(), "preprocess": PreprocessParams.to_dict(),
     "labels": {"organs": [...], "colors": [...]}, "trained_by": {organ: [sources]},
     "best_metric": float, "history": [per-epoch log rows]}
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from network.unet import UNet
from training.config import TrainConfig
from utils.errors import UserError
from utils.geometry import PreprocessParams
from utils.labels import COLORS, ORGANS

FORMAT = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container
PICKLE_PROTOCOL = b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def label_scheme() -> dict:
    """The label scheme stored in every checkpoint."""
    return {"organs": list(ORGANS), "colors": [list(c) for c in COLORS]}


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then a rename,
    so a kill at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check it is one of ours.

    Checks that it is a torch.save file, that it unpickles without running code, and that its
    weights fit the U-Net its config describes (so :func:`model_from_checkpoint` cannot fail).

    Raises CheckpointError for a missing, empty, truncated, corrupt or foreign file, and for one
    that carries pickled objects (which would run code if unpickled without ``weights_only``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip or pickle file; "
                              f"this one starts with {head!r})")
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: it holds {_unsafe_content(err)}, which only a full unpickle "
                              "could load, and a full unpickle can run code") from None
    except (EOFError, KeyError, IndexError, ValueError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_sentence(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not an abdoseg checkpoint (no format {FORMAT} model state)")
    if list(state.get("labels", {}).get("organs", ORGANS)) != list(ORGANS):
        raise CheckpointError(f"{path}: trained with another label scheme: {state['labels']['organs']}")
    _check_model(state, path)
    return state


def _check_model(state: dict, path: Path) -> None:
    """Config and preprocessing parse, and the weights have the names and shapes the config's U-Net has."""
    try:
        cfg = TrainConfig.from_dict(state["config"], where=f"{path}: config")
        PreprocessParams.from_dict(state["preprocess"])
    except KeyError as err:
        raise CheckpointError(f"{path}: not an abdoseg checkpoint (no {err} entry)") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {key: tuple(value.shape) for key, value in build_model(cfg).state_dict().items()}
    weights = state["model"] if isinstance(state["model"], dict) else {}
    found = {key: tuple(getattr(value, "shape", ())) for key, value in weights.items()}
    if found != expected:
        wrong = sorted(key for key in expected.keys() | found.keys() if found.get(key) != expected.get(key))
        raise CheckpointError(f"{path}: the model weights do not fit the U-Net its config describes (features "
                              f"{list(cfg.features)}); e.g. {wrong[0]}: {found.get(wrong[0])} in the file, "
                              f"{expected.get(wrong[0])} expected")


def _unsafe_content(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, from torch's long message."""
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"a reference to {named.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return f"pickle content the safe loader does not accept ({detail.group(1) if detail else 'unsupported'})"


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].split(". ")[0][:160] if text else type(err).__name__


def build_model(cfg: TrainConfig) -> UNet:
    """The U-Net a config describes."""
    return UNet(in_channels=cfg.in_channels, out_channels=cfg.num_classes,
                features=tuple(cfg.features), checkpointing=cfg.checkpointing)


def model_from_checkpoint(state: dict) -> tuple[UNet, TrainConfig, PreprocessParams]:
    """Rebuild the model (eval mode, on CPU) and its settings from a loaded checkpoint alone."""
    cfg = TrainConfig.from_dict(state["config"], where="checkpoint config")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, PreprocessParams.from_dict(state["preprocess"])


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The U-Net inside DDP, ``torch.compile`` and the compile fallback wrappers."""
    while True:
        inner = getattr(model, "eager", None) or getattr(model, "_orig_mod", None)
        if isinstance(model, DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def checkpoint_state(model, optimizer, scheduler, scaler, cfg: TrainConfig, params: PreprocessParams,
                     trained_by: dict, epoch: int, step_in_epoch: int, best: float, history: list) -> dict:
    """What a checkpoint holds (see the module docstring): enough to predict and to resume exactly."""
    return {
        "format": FORMAT, "model": unwrapped(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
        "step_in_epoch": step_in_epoch, "rng": {"torch": torch.get_rng_state()},
        "config": cfg.to_dict(), "preprocess": params.to_dict(), "labels": label_scheme(),
        "trained_by": trained_by, "best_metric": best, "history": history,
    }


def restore_training_state(state: dict, model, optimizer, scheduler, scaler) -> tuple[int, int, float, list]:
    """Load a resume checkpoint into the training objects; returns (epoch, step_in_epoch, best, history)."""
    unwrapped(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["epoch"], state["step_in_epoch"], state["best_metric"], state["history"]
