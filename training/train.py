"""Training: plain functions, everything passed as arguments.

``fit(cfg, data_dirs, out_dir)`` loops epochs of ``train_one_epoch`` and ``evaluate`` and writes
the run folder::

    RUN_DIR/checkpoints/last.pt   every epoch (and on Ctrl-C / SIGTERM, mid-epoch)
    RUN_DIR/checkpoints/best.pt   best mean validation Dice
    RUN_DIR/log.csv               one row per epoch
    RUN_DIR/curves.png            training curves
    RUN_DIR/config.json           the config, for people

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
import csv
import ctypes
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from training.checkpoint import (
    FORMAT,
    CheckpointError,
    build_model,
    label_scheme,
    load_checkpoint,
    save_checkpoint,
)
from training.config import TrainConfig
from training.sync_batchnorm import convert_sync_batchnorm
from utils.augment import AugmentParams, augment_batch
from utils.dataset import SliceDataset, batch_to_device, load_and_pair_files, resident_batch, split_cases
from utils.errors import UserError
from utils.labels import ORGANS
from utils.losses import build_loss
from utils.metrics import SliceMetrics
from utils.preprocess_data import PreprocessParams


class RunFolderError(UserError):
    """The output folder cannot be used as asked (holds another run, or cannot be written)."""


@dataclass
class Runtime:
    """Where and how the computation runs: device, precision and process group, set up once."""

    device: torch.device
    amp_dtype: torch.dtype | None    # autocast dtype, None = fp32
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # setup_runtime created it, so fit destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_amp(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype for a device: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16 if device.type == "cuda" else None
    if device.type == "cuda":
        return torch.bfloat16 if amp == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" or cpu_has_bf16():
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    A training step frees and reallocates the same large activation buffers every step. By
    default glibc serves every buffer over 32 MB with its own mmap and unmaps it on free, so
    each step page-faults and zero-fills gigabytes again: on the 2-core CPU this project is
    tested on, the seed model's bf16 step at batch 8 took 3.6 s, with 5.8 s of kernel time in a
    5-step run, and 3.1 s with 1.5 s once freed memory is reused (the effect PyTorch's CPU tuning
    guide gets from jemalloc or tcmalloc). The cost is memory: the process holds its peak until
    it exits, and the heap fragments, so peak RSS of the seed model's training rose by 27% at
    batch 8 and 38% at batch 16. Process-wide, and not undone. Linux with glibc only; returns
    False (and changes nothing) elsewhere. ``TrainConfig.cpu_keep_freed_memory=False`` skips it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # no mmap for large blocks (they come from the heap and are reused), never trim the heap
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision, allocator (CPU) and (under torchrun) the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = select_device(cfg.device)
    owns_process_group = False
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns_process_group = not dist.is_initialized()
        if owns_process_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and cfg.cpu_keep_freed_memory:
        keep_freed_cpu_memory()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, select_amp(device, cfg.amp), rank, world_size, owns_process_group)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
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


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: TrainConfig, rt: Runtime,
                    epoch: int, start_step: int = 0, progress: bool = True) -> dict:
    """One pass over `loader` (which already skips the first `start_step` batches).

    Returns {"train_loss", "images_per_s", "steps"}; raises KeyboardInterrupt with
    ``.step`` set to the number of batches finished when interrupted.
    """
    model.train()
    augment = AugmentParams.from_config(cfg)
    generator = torch.Generator(device=rt.device)
    loss_sum = torch.zeros((), device=rt.device)
    images, step, started = 0, start_step, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=start_step,
               total=start_step + len(loader), disable=not (progress and rt.is_main), leave=False)
    try:
        for batch in bar:
            batch = batch_to_device(batch, rt.device, channels_last=cfg.channels_last)
            image, label, distance = batch["image"], batch["label"], batch["distance"]
            if cfg.augment:
                # seeded per step, so a resumed epoch draws the same augmentations
                generator.manual_seed(cfg.seed * 7919 + epoch * 104_729 + step * 31 + rt.rank)
                image, label, distance = augment_batch(image, label, distance, augment, generator)
            sync_now = (step + 1) % cfg.accumulation_steps == 0
            no_sync = model.no_sync() if (rt.world_size > 1 and not sync_now) else contextlib.nullcontext()
            with no_sync:
                with rt.autocast():
                    logits = model(image)
                loss = loss_fn(logits, label, distance, batch["annotated"])
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
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def reduce_mean(value: torch.Tensor, rt: Runtime) -> float:
    """Mean of a scalar tensor over processes, as a Python float (one host sync)."""
    if rt.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world_size
    return float(value)


@torch.inference_mode()
def evaluate(model, loader, loss_fn, cfg: TrainConfig, rt: Runtime) -> dict:
    """Validation loss (mean over slices of the batch loss) and the seed's per-slice Dice/IoU
    (organs scored only where annotated), over the slices of every process."""
    model.eval()
    metrics = SliceMetrics(cfg.num_classes)
    totals = torch.zeros(2, device=rt.device)  # (sum of loss * slices, slices)
    for batch in loader:
        batch = batch_to_device(batch, rt.device, channels_last=cfg.channels_last)
        with rt.autocast():
            logits = model(batch["image"])
        slices = logits.shape[0]
        totals[0] += loss_fn(logits, batch["label"], batch["distance"], batch["annotated"]) * slices
        totals[1] += slices
        metrics.update(logits.argmax(1), batch["label"], batch["annotated"])
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


def build_datasets(cfg: TrainConfig, cases: list[dict]) -> tuple[SliceDataset, SliceDataset]:
    """Training and validation slices of `load_and_pair_files` cases, split by case (never by slice)."""
    train_cases, val_cases = split_cases(cases, cfg.val_fraction, cfg.seed)
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


def prepare_run_folder(out_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite."""
    last = out_dir / "checkpoints" / "last.pt"
    if resume:
        if not last.exists():
            raise RunFolderError(f"{out_dir}: nothing to resume (no checkpoints/last.pt)")
        return
    if (out_dir / "config.json").exists() or last.exists():
        if not overwrite:
            raise RunFolderError(f"{out_dir}: already holds a run; use --resume to continue it "
                                 "or --overwrite to replace it")
        for name in ("log.csv", "curves.png", "config.json", "checkpoints/last.pt", "checkpoints/best.pt"):
            (out_dir / name).unlink(missing_ok=True)
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"{out_dir}: cannot write there ({err.strerror})") from None
    write_text_atomic(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))


def load_resume_state(out_dir: Path) -> dict:
    """The last complete checkpoint; if it is damaged, say which good one remains."""
    if not (out_dir / "checkpoints" / "last.pt").exists():
        raise RunFolderError(f"{out_dir}: nothing to resume (no checkpoints/last.pt)")
    try:
        return load_checkpoint(out_dir / "checkpoints" / "last.pt")
    except CheckpointError as err:
        best = out_dir / "checkpoints" / "best.pt"
        hint = f"; {best} may still be good (copy it over last.pt to resume from it)" if best.exists() else ""
        raise CheckpointError(f"{err}{hint}") from None


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_log(out_dir: Path, history: list[dict]) -> None:
    """log.csv (one row per epoch) and curves.png, both rewritten whole each epoch."""
    from training.visualization import training_curves
    keys = list(dict.fromkeys(k for row in history for k in row))
    temporary = out_dir / ".log.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    os.replace(temporary, out_dir / "log.csv")
    figure = training_curves(history)
    figure.savefig(out_dir / ".curves.tmp.png", dpi=100)
    os.replace(out_dir / ".curves.tmp.png", out_dir / "curves.png")


def checkpoint_state(model, optimizer, scheduler, scaler, cfg, params, trained_by, epoch,
                     step_in_epoch, best, history) -> dict:
    module = model.module if isinstance(model, DistributedDataParallel) else model
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    return {
        "format": FORMAT, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
        "step_in_epoch": step_in_epoch, "rng": {"torch": torch.get_rng_state()},
        "config": cfg.to_dict(), "preprocess": params.to_dict(), "labels": label_scheme(),
        "trained_by": trained_by, "best_metric": best, "history": history,
    }


def prepare_model(cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.sync_batchnorm and rt.world_size > 1:
        model = convert_sync_batchnorm(model, rt.device)
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_model(model, cfg: TrainConfig, rt: Runtime):
    """DDP and torch.compile around the model; compile falls back to eager with a warning."""
    if rt.world_size > 1:
        # forward_sync_buffers=False: DDP would otherwise broadcast BatchNorm statistics (a
        # collective) on every forward, in eval mode too, and a process with fewer validation
        # batches would hang the others; fit broadcasts them once before validation instead
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if cfg.compile:
        try:
            model = torch.compile(model)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            print(f"torch.compile unavailable ({type(err).__name__}: {err}); training eagerly")
    return model


def fit(cfg: TrainConfig, data_dirs, out_dir, resume: bool = False, overwrite: bool = False,
        progress: bool = True) -> dict:
    """Train `cfg` on preprocessed folders; returns the last log row (plus 'out_dir').

    Under torchrun every process calls this with the same arguments.
    """
    rt = setup_runtime(cfg)
    try:
        result = fit_in_runtime(cfg, data_dirs, out_dir, rt, resume, overwrite, progress)
        if rt.world_size > 1:
            # wait for rank 0's last writes: a process exiting while gloo still releases its
            # last collective can abort at interpreter shutdown, and torchrun then kills rank 0
            dist.barrier(device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        return result
    finally:
        if rt.owns_process_group:
            dist.destroy_process_group()


def fit_in_runtime(cfg: TrainConfig, data_dirs, out_dir, rt: Runtime, resume: bool = False,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """`fit` on a runtime already set up: this process's part of the run."""
    out_dir = Path(out_dir)
    data_dirs = [Path(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)]
    cases = load_and_pair_files(data_dirs)  # read the manifests once
    params, trained_by = data_summary(cases, data_dirs)
    state, wandb_run = None, None
    with main_process_first(rt):
        if rt.is_main:
            prepare_run_folder(out_dir, cfg, resume, overwrite)
            wandb_run = start_wandb(cfg, out_dir)
    if resume:
        state = load_resume_state(out_dir)
    model = prepare_model(cfg, rt)
    optimizer, scaler = build_optimizer(cfg, model), torch.amp.GradScaler(
        rt.device.type, enabled=rt.amp_dtype == torch.float16)
    scheduler = build_scheduler(cfg, optimizer)
    loss_fn = build_loss(cfg.loss, num_classes=cfg.num_classes, class_weights=cfg.class_weights,
                         sigma=cfg.sigma, alpha=cfg.alpha, marginal=cfg.marginal,
                         exclusion_weight=cfg.exclusion_weight)
    epoch, step_in_epoch, best, history = 0, 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        best, history = state["best_metric"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
    train_set, val_set = build_datasets(cfg, cases)
    wrapped = wrap_model(model, cfg, rt)

    def save(name: str, epoch_done: int, step: int) -> None:
        if rt.is_main:
            save_checkpoint(checkpoint_state(model, optimizer, scheduler, scaler, cfg, params, trained_by,
                                             epoch_done, step, best, history), out_dir / "checkpoints" / name)

    with graceful_interrupts():
        while epoch < cfg.epochs:
            train_loader, val_loader = make_loaders(cfg, train_set, val_set, rt, epoch, step_in_epoch)
            try:
                train_row = train_one_epoch(wrapped, train_loader, loss_fn, optimizer, scaler, cfg, rt,
                                            epoch, step_in_epoch, progress)
            except KeyboardInterrupt as interrupt:
                save("last.pt", epoch, getattr(interrupt, "step", step_in_epoch))
                if rt.is_main:
                    print(f"\ninterrupted: saved {out_dir / 'checkpoints' / 'last.pt'}; "
                          "continue with --resume")
                raise
            broadcast_buffers(model, rt)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **train_row,
                   **evaluate(wrapped, val_loader, loss_fn, cfg, rt)}
            row.pop("steps")
            scheduler.step()
            epoch, step_in_epoch = epoch + 1, 0
            history.append(row)
            improved = not math.isnan(row["val_mean_dice"]) and row["val_mean_dice"] > best
            best = max(best, row["val_mean_dice"]) if improved else best
            save("last.pt", epoch, 0)
            if improved:
                save("best.pt", epoch, 0)
            if rt.is_main:
                write_log(out_dir, history)
                report_epoch(row, cfg, progress, wandb_run)
    if wandb_run is not None:
        wandb_run.finish()
    return {**(history[-1] if history else {}), "out_dir": str(out_dir)}


@contextlib.contextmanager
def main_process_first(rt: Runtime):
    """A block where only rank 0 works (``if rt.is_main``) and the others wait for it; if it
    raises on rank 0, every process raises, so none is left waiting in a collective."""
    failure = [None]
    try:
        yield
    except BaseException as err:
        failure = [str(err).strip() or type(err).__name__]
        raise
    finally:
        if rt.world_size > 1:
            dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RunFolderError(f"rank 0 failed: {failure[0]}")


def broadcast_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """Rank 0's BatchNorm statistics on every process, so all of them validate the model that
    rank 0 saves (without sync_batchnorm each process updates its own from its own slices)."""
    if rt.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def report_epoch(row: dict, cfg: TrainConfig, progress: bool, wandb_run) -> None:
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


@contextlib.contextmanager
def graceful_interrupts():
    """Treat SIGTERM (what schedulers send before killing a job) like Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
