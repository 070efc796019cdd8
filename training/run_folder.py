"""The run folder training writes, and what it reads back to resume::

    RUN_DIR/checkpoints/last.pt   every epoch (and on Ctrl-C / SIGTERM, mid-epoch)
    RUN_DIR/checkpoints/best.pt   best mean validation Dice
    RUN_DIR/log.csv               one row per epoch
    RUN_DIR/curves.png            training curves
    RUN_DIR/config.json           the config, for people

Every file is written atomically (``utils.files``), so a kill leaves the old file or the new one.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tqdm.auto import tqdm

from training.checkpoint import CheckpointError, load_checkpoint
from training.config import TrainConfig
from utils.errors import UserError
from utils.files import atomic_path, write_json

RUN_FILES = ("log.csv", "curves.png", "config.json", "checkpoints/last.pt", "checkpoints/best.pt")


class RunFolderError(UserError):
    """The output folder cannot be used as asked (holds another run, or cannot be written)."""


def prepare_run_folder(out_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite; write config.json."""
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.pt"
    if resume:
        if not last.exists():
            raise RunFolderError(f"{out_dir}: nothing to resume (no checkpoints/last.pt)")
        return
    if (out_dir / "config.json").exists() or last.exists():
        if not overwrite:
            raise RunFolderError(f"{out_dir}: already holds a run; use --resume to continue it "
                                 "or --overwrite to replace it")
        for name in RUN_FILES:  # only the files a run writes, never anything else in the folder
            (out_dir / name).unlink(missing_ok=True)
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", cfg.to_dict())
    except OSError as err:
        raise RunFolderError(f"{out_dir}: cannot write there ({err.strerror})") from None


def load_resume_state(out_dir: Path) -> dict:
    """The last complete checkpoint; if it is damaged, say which good one remains."""
    out_dir = Path(out_dir)
    if not (out_dir / "checkpoints" / "last.pt").exists():
        raise RunFolderError(f"{out_dir}: nothing to resume (no checkpoints/last.pt)")
    try:
        return load_checkpoint(out_dir / "checkpoints" / "last.pt")
    except CheckpointError as err:
        best = out_dir / "checkpoints" / "best.pt"
        hint = f"; {best} may still be good (copy it over last.pt to resume from it)" if best.exists() else ""
        raise CheckpointError(f"{err}{hint}") from None


def write_log(out_dir: Path, history: list[dict]) -> None:
    """log.csv (one row per epoch) and curves.png, both rewritten whole each epoch."""
    from training.visualization import training_curves
    keys = list(dict.fromkeys(key for row in history for key in row))
    with atomic_path(Path(out_dir) / "log.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    figure = training_curves(history)
    with atomic_path(Path(out_dir) / "curves.png") as temporary:
        figure.savefig(temporary, dpi=100)


def report_epoch(row: dict, cfg: TrainConfig, progress: bool, wandb_run) -> None:
    """One line per epoch (with `progress`) and the row to W&B (when a run is open)."""
    if progress:
        tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                   f"val_loss {row['val_loss']:.4f}  val_dice {row['val_mean_dice']:.3f}  "
                   f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s")
    if wandb_run is not None:
        wandb_run.log(row, step=row["epoch"])


def start_wandb(cfg: TrainConfig, out_dir: Path):
    """A Weights & Biases run when asked for; offline mode needs no network and no login."""
    if cfg.wandb == "off" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise RunFolderError("--wandb needs the wandb package: pip install wandb") from None
    if cfg.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RunFolderError("--wandb online needs WANDB_API_KEY set (or use --wandb offline)")
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=str(out_dir),
                      mode=cfg.wandb, reinit=True)
