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
import zipfile
from pathlib import Path

import torch

from network.unet import UNet
from training.config import TrainConfig
from utils.labels import COLORS, ORGANS
from utils.preprocess_data import PreprocessParams

FORMAT = 1


class CheckpointError(ValueError):
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

    Raises CheckpointError for a missing, truncated, corrupt or foreign file, and for one that
    carries pickled objects (which would run code if unpickled without ``weights_only``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else "unsupported content"
        raise CheckpointError(f"{path}: refused: it holds pickled objects that only a full "
                              f"unpickle could load, which can run code ({reason[:120]})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not an abdoseg checkpoint (no format {FORMAT} model state)")
    if list(state.get("labels", {}).get("organs", ORGANS)) != list(ORGANS):
        raise CheckpointError(f"{path}: trained with another label scheme: {state['labels']['organs']}")
    return state


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
