"""The run folder training writes, and what it reads back to resume::

    RUN_DIR/checkpoints/last.pt   every epoch (and on Ctrl-C / SIGTERM, mid-epoch)
    RUN_DIR/checkpoints/best.pt   best mean per-case 3D validation Dice (val_case_dice)
    RUN_DIR/log.csv               one row per epoch
    RUN_DIR/curves.png            training curves
    RUN_DIR/config.json           the config, for people

Every file is written atomically (``utils.files``), so a kill leaves the old file or the new one.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from training.checkpoint import CheckpointError, load_checkpoint
from training.config import TrainConfig
from utils.errors import UserError
from utils.files import atomic_path
from utils.output_folder import OutputFolder, claim_output_folder

RUN_FILES = ("log.csv", "curves.png", "config.json", "checkpoints/last.pt", "checkpoints/best.pt")


class RunFolderError(UserError):
    """The output folder cannot be used as asked (holds another run, or cannot be written)."""


LOCK_FILE = ".abdoseg-run.lock"
# Config fields a resumed run may change: how and where it runs, and how long; not what it learns.
RESUME_MAY_CHANGE = frozenset({"epochs", "num_workers", "device", "wandb", "wandb_project", "compile", "resident",
                               "cpu_keep_freed_memory", "channels_last", "checkpointing", "sync_batchnorm"})


def prepare_run_folder(out_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool, inputs=()):
    """Claim and lock the run folder, refuse to mix two runs in it, write config.json.

    The folder is claimed as a ``train`` output (``utils.output_folder``: new, empty or a run's;
    never one of `inputs`, inside one or around one) and locked (``fcntl``) until the returned
    file is closed, so a second run into it is refused with one line. With `overwrite`, only the
    files a run writes are removed (``RUN_FILES``), never anything else.

    Returns:
        The open lock file: close it (``with``) when the run is done.
    """
    out = claim_output_folder(out_dir, "train", inputs=inputs, overwrite=overwrite)
    lock = lock_run_folder(out)
    try:
        last = out.path / "checkpoints" / "last.pt"
        if resume:
            if not last.exists():
                raise RunFolderError(f"{out_dir}: nothing to resume (no checkpoints/last.pt)")
        elif (out.path / "config.json").exists() or last.exists():
            if not overwrite:
                raise RunFolderError(f"{out_dir}: already holds a run; use --resume to continue it "
                                     "or --overwrite to replace it")
            for name in RUN_FILES:  # only the files a run writes, never anything else in the folder
                out.remove(name)
        for name in RUN_FILES:  # recorded before they are written; a user's file in the way is refused here
            out.prepare(name, replace=True)
        if not resume:
            out.write_json("config.json", cfg.to_dict(), replace=True)
        out.close()
    except BaseException:
        lock.close()
        raise
    return lock


def lock_run_folder(out: OutputFolder):
    """An exclusive ``fcntl`` lock on ``RUN/.abdoseg-run.lock``; RunFolderError if a run holds it."""
    path = out.prepare(LOCK_FILE, replace=True)
    handle = open(path, "a")  # noqa: SIM115 (returned: the lock lasts as long as the run); "a" never truncates
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunFolderError(f"{out.path}: another training run is writing to this folder (it holds "
                             f"{LOCK_FILE}); wait for it or choose another --out") from None
    return handle


def check_resume(state: dict, cfg: TrainConfig, fingerprint: str, out_dir: Path) -> None:
    """Refuse to resume with another config (beyond ``RESUME_MAY_CHANGE``) or other data.

    Raises:
        RunFolderError: naming the fields that differ, or saying the data's manifests differ.
    """
    before, now = state.get("config", {}), cfg.to_dict()
    changed = sorted(key for key in before.keys() | now.keys()
                     if key not in RESUME_MAY_CHANGE and before.get(key) != now.get(key))
    if changed:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:3])
        raise RunFolderError(f"{out_dir}: --resume with another config ({shown}); a resumed run may change only "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE))}; start a new run in another folder")
    stored = state.get("data_fingerprint")
    if stored is not None and stored != fingerprint:
        raise RunFolderError(f"{out_dir}: --resume on other data: the preprocessed cases (their manifests) differ "
                             "from the ones this run was trained on; pass the same --data folders")


def data_fingerprint(cases: list[dict]) -> str:
    """A hash of what the manifests say about the cases (ids, sources, sizes, params), not where they lie."""
    keys = ("case_id", "source", "annotated", "num_slices", "params", "voxel_counts")
    described = sorted(json.dumps({key: case.get(key) for key in keys}, sort_keys=True) for case in cases)
    return hashlib.sha256("\n".join(described).encode("utf-8")).hexdigest()


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
                   f"case_dice {row.get('val_case_dice', float('nan')):.3f}  "
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
