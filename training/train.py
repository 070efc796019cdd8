"""Training: plain functions, everything passed as arguments.

``fit(cfg, data_dirs, out_dir)`` loops epochs of :func:`train_one_epoch` and :func:`validate`
and writes the run folder (``training.run_folder``). Its neighbours: ``training.runtime``
(device, precision, process group, process-wide settings), ``training.loaders`` (datasets and
batch order), ``training.checkpoint`` (what a checkpoint holds).

Exact resume: batch order and augmentation are functions of (seed, epoch), and the checkpoint
holds model, optimizer, scheduler, scaler and the position inside an interrupted epoch, so
``resume=True`` continues the same schedule to the same weights (bit-exact on CPU in fp32 with
``deterministic=True``). A run killed with SIGKILL resumes from the last complete epoch.

Under ``torchrun`` (WORLD_SIZE > 1) the same code runs DistributedDataParallel: ``batch_size``
is the global batch, split evenly over the processes, and only rank 0 writes files
(docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from training.checkpoint import checkpoint_state, restore_training_state, save_checkpoint
from training.config import TrainConfig
from training.loaders import build_datasets, data_summary, folder_list, make_loaders
from training.validation import validate_cases
from training.run_folder import (check_resume, data_fingerprint, load_resume_state, prepare_run_folder, report_epoch,
                                 start_wandb, write_log)
from training.runtime import (Runtime, broadcast_buffers, finish_runtime, graceful_interrupts, main_process_first,
                              make_grad_scaler, prepare_model, reduce_mean, restored_process_settings,
                              setup_runtime, stop_requested, wrap_model)
from utils.augment import augment_batch
from utils.dataset import batch_to_device, load_cases
from utils.errors import UserError
from utils.labels import ORGANS
from utils.losses import build_loss
from utils.metrics import SliceMetrics


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum (the config's ``optimizer``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch learning-rate factor: the seed's StepLR, poly (power 0.9), cosine or constant."""
    def factor(epoch: int) -> float:
        progress = min(epoch / max(cfg.epochs, 1), 1.0)
        if cfg.scheduler == "step":
            return cfg.gamma ** (epoch // max(cfg.step_size, 1))
        if cfg.scheduler == "poly":
            return (1.0 - progress) ** 0.9
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_from_config(cfg: TrainConfig) -> torch.nn.Module:
    """The training loss the config describes (``utils.losses.build_loss``)."""
    return build_loss(cfg.loss, num_classes=cfg.num_classes, class_weights=cfg.class_weights,
                      sigma=cfg.sigma, alpha=cfg.alpha, marginal=cfg.marginal,
                      exclusion_weight=cfg.exclusion_weight, exclusion=cfg.exclusion)


def batch_label_sets(batch: dict, num_classes: int) -> torch.Tensor:
    """The batch's ``(B, L, C)`` label sets cut to the model's classes (``annotated`` for batches
    of datasets that predate them)."""
    if "label_sets" not in batch:
        return batch["annotated"][:, :num_classes]
    return batch["label_sets"][:, :, :num_classes]


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: TrainConfig, rt: Runtime,
                    epoch: int, start_step: int = 0, progress: bool = True) -> dict:
    """One pass over `loader` (which already skips the first `start_step` batches).

    Returns {"train_loss", "images_per_s", "steps"}; raises KeyboardInterrupt with
    ``.step`` set to the number of batches finished when interrupted.
    """
    model.train()
    generator = torch.Generator(device=rt.device)
    loss_sum = torch.zeros((), device=rt.device)
    images, step, started = 0, start_step, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=start_step,
               total=start_step + len(loader), disable=not (progress and rt.is_main), leave=False)
    try:
        for batch in bar:
            if stop_requested():  # SIGTERM or Ctrl-C: stop between steps, never inside one
                raise KeyboardInterrupt
            batch = batch_to_device(batch, rt.device, channels_last=rt.channels_last)
            image, label, distance = batch["image"], batch["label"], batch["distance"]
            if cfg.augment.enabled:
                # seeded per step, so a resumed epoch draws the same augmentations
                generator.manual_seed(cfg.seed * 7919 + epoch * 104_729 + step * 31 + rt.rank)
                image, label, distance = augment_batch(image, label, distance, cfg.augment, generator)
            sync_now = (step + 1) % cfg.accumulation_steps == 0
            no_sync = model.no_sync() if (rt.world_size > 1 and not sync_now) else contextlib.nullcontext()
            with no_sync:
                with rt.autocast():
                    logits = model(image)
                loss = loss_fn(logits, label, distance, batch_label_sets(batch, cfg.num_classes))
                scaler.scale(loss / cfg.accumulation_steps).backward()
            if sync_now:
                optimizer_step(model, optimizer, scaler, cfg)
            loss_sum += loss.detach()
            images += image.shape[0]
            step += 1
            if progress and rt.is_main and step % 25 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / (step - start_step):.4f}")
    except KeyboardInterrupt as interrupt:
        interrupt.step = step
        raise
    seconds = time.perf_counter() - started
    done = max(step - start_step, 1)
    return {"train_loss": reduce_mean(loss_sum / done, rt), "images_per_s": images * rt.world_size / seconds,
            "steps": step}


def optimizer_step(model, optimizer, scaler, cfg: TrainConfig) -> None:
    """Unscale and clip (``grad_clip`` > 0), step, update the scaler, zero the gradients."""
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def validate(model, loader, loss_fn, cfg: TrainConfig, rt: Runtime) -> dict:
    """Validation loss (mean over slices of the batch loss) and the seed's per-slice Dice/IoU
    (organs scored only where the item's label sets say for certain), over the slices of every
    process. ``best.pt`` is chosen by ``training.validation.validate_cases`` instead."""
    model.eval()
    metrics = SliceMetrics(cfg.num_classes)
    totals = torch.zeros(2, device=rt.device)  # (sum of loss * slices, slices)
    for batch in loader:
        batch = batch_to_device(batch, rt.device, channels_last=rt.channels_last)
        with rt.autocast():
            logits = model(batch["image"])
        slices = logits.shape[0]
        label_sets = batch_label_sets(batch, cfg.num_classes)
        totals[0] += loss_fn(logits, batch["label"], batch["distance"], label_sets) * slices
        totals[1] += slices
        metrics.update(logits.argmax(1), batch["label"], label_sets)
    if rt.world_size > 1:
        # sums, not per-process means: a process may hold fewer validation slices, or none
        dist.all_reduce(totals)
        metrics.all_reduce(rt.device)
    result = metrics.compute()
    row = {"val_loss": float(totals[0] / totals[1].clamp(min=1)), "val_mean_dice": result["mean_dice"]}
    for organ_id in range(1, cfg.num_classes):
        row[f"dice_{ORGANS[organ_id]}"] = result["dice"][organ_id]
        row[f"iou_{ORGANS[organ_id]}"] = result["iou"][organ_id]
        row[f"fp_slices_{ORGANS[organ_id]}"] = result["false_positive_slices"][organ_id]
    return row


def fit(cfg: TrainConfig, data_dirs, out_dir, resume: bool = False, overwrite: bool = False,
        progress: bool = True) -> dict:
    """Train `cfg` on preprocessed folders; returns the last log row (plus 'out_dir').

    Process-wide settings training changes (cuDNN, TF32, determinism, threads, the CPU
    allocator) are put back on return. Under torchrun every process calls this with the same
    arguments.
    """
    with restored_process_settings():
        rt = setup_runtime(cfg)
        try:
            result = fit_in_runtime(cfg, data_dirs, out_dir, rt, resume, overwrite, progress)
            finish_runtime(rt)
            return result
        finally:
            if rt.owns_process_group:
                dist.destroy_process_group()


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; the run stopped without saving them."""


def fit_in_runtime(cfg: TrainConfig, data_dirs, out_dir, rt: Runtime, resume: bool = False,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """`fit` on a runtime already set up: this process's part of the run.

    The run folder is locked while this runs (rank 0; ``training.run_folder``).
    """
    with contextlib.ExitStack() as stack:
        out_dir = Path(out_dir)
        data_dirs = folder_list(data_dirs)
        cases = load_cases(data_dirs)  # read the manifests once
        params, trained_by = data_summary(cases, data_dirs)
        fingerprint = data_fingerprint(cases)
        wandb_run = None
        with main_process_first(rt):
            if rt.is_main:
                stack.enter_context(prepare_run_folder(out_dir, cfg, resume, overwrite, inputs=data_dirs))
                wandb_run = start_wandb(cfg, out_dir)
        state = load_resume_state(out_dir) if resume else None
        if state is not None:
            check_resume(state, cfg, fingerprint, out_dir)
        return _train_epochs(cfg, cases, params, trained_by, fingerprint, out_dir, rt, state, wandb_run, progress)


def _train_epochs(cfg: TrainConfig, cases, params, trained_by, fingerprint: str, out_dir: Path, rt: Runtime,
                  state: dict | None, wandb_run, progress: bool) -> dict:
    """The epoch loop of :func:`fit_in_runtime` (`state`: the checkpoint to resume from, or None)."""
    model = prepare_model(cfg, rt)
    optimizer, scaler = build_optimizer(cfg, model), make_grad_scaler(rt.device, rt.amp_dtype)
    scheduler, loss_fn = build_scheduler(cfg, optimizer), loss_from_config(cfg)
    epoch, step_in_epoch, best, history = 0, 0, -1.0, []
    if state is not None:
        epoch, step_in_epoch, best, history = restore_training_state(state, model, optimizer, scheduler, scaler)
    train_set, val_set = build_datasets(cfg, cases)
    wrapped = wrap_model(model, cfg, rt)

    def save(name: str, epoch_done: int, step: int) -> None:
        if rt.is_main:
            save_checkpoint({**checkpoint_state(model, optimizer, scheduler, scaler, cfg, params, trained_by,
                                                epoch_done, step, best, history), "data_fingerprint": fingerprint},
                            out_dir / "checkpoints" / name)

    with graceful_interrupts():
        while epoch < cfg.epochs:
            train_loader, val_loader = make_loaders(cfg, train_set, val_set, rt, epoch, step_in_epoch)
            try:
                train_row = train_one_epoch(wrapped, train_loader, loss_fn, optimizer, scaler, cfg, rt,
                                            epoch, step_in_epoch, progress)
            except KeyboardInterrupt as interrupt:
                if weights_finite(model):  # never NaN weights over the last good checkpoint
                    save("last.pt", epoch, getattr(interrupt, "step", step_in_epoch))
                    if rt.is_main:
                        print(f"\ninterrupted: saved {out_dir / 'checkpoints' / 'last.pt'}; continue with --resume")
                raise
            check_finite(train_row["train_loss"], model, epoch, out_dir)  # once per epoch: off the hot path
            broadcast_buffers(model, rt)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **train_row,
                   **validate(wrapped, val_loader, loss_fn, cfg, rt),
                   # the unwrapped model: cases are shared unevenly, DDP's forward would wait
                   **validate_cases(model, val_set, cfg.num_classes, cfg.batch_size, rt, cfg.val_max_cases)}
            row.pop("steps")
            scheduler.step()
            epoch, step_in_epoch = epoch + 1, 0
            history.append(row)
            improved = math.isfinite(row["val_case_dice"]) and row["val_case_dice"] > best
            best = max(best, row["val_case_dice"]) if improved else best
            save("last.pt", epoch, 0)
            if improved:  # best.pt only when a finite validation Dice chose it
                save("best.pt", epoch, 0)
            if rt.is_main:
                write_log(out_dir, history)
                report_epoch(row, cfg, progress, wandb_run)
    if wandb_run is not None:
        wandb_run.finish()
    return {**(history[-1] if history else {}), "out_dir": str(out_dir)}


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every float parameter and buffer of `model` is finite (once per epoch).

    One fused norm over all tensors and one host sync (~30 ms for the default 31 M-parameter
    U-Net on a CPU; an element-wise ``isfinite`` took 1.4 s): a NaN or inf anywhere makes the
    norm non-finite (so do weights so large their norm overflows, which are as broken).
    """
    tensors = [tensor.detach() for tensor in (*model.parameters(), *model.buffers()) if tensor.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors)))


def check_finite(train_loss: float, model: torch.nn.Module, epoch: int, out_dir: Path) -> None:
    """Raise TrainingDiverged when the epoch's loss or the weights are not finite; nothing is saved."""
    if math.isfinite(train_loss) and weights_finite(model):
        return
    last = Path(out_dir) / "checkpoints" / "last.pt"
    kept = (f"{last} still holds the last good weights (epoch {epoch})" if epoch > 0 and last.exists()
            else "no checkpoint was saved")
    what = f"the training loss became {train_loss}" if not math.isfinite(train_loss) else "the weights became NaN/inf"
    raise TrainingDiverged(f"{what} in epoch {epoch + 1}; training stopped and these weights were not saved; "
                           f"{kept}. Try a lower lr, grad_clip=1 or amp=off")
