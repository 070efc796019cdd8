"""Where and how computation runs: device, precision, process group, process-wide settings.

The one place that builds autocast contexts (:func:`autocast_context`) and GradScalers
(:func:`make_grad_scaler`); training, prediction and the benchmarks all call these. Also the
distributed plumbing (process group, rank-0-first blocks, buffer broadcast), model placement
(SyncBatchNorm, channels_last, DDP, ``torch.compile`` with an eager fallback), and
:func:`restored_process_settings`, which puts back the process-wide settings training changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from training import cpu
from training.checkpoint import build_model
from training.config import TrainConfig
from training.cpu import available_candidates, choose_cpu_precision
from training.run_folder import RunFolderError
from training.sync_batchnorm import convert_sync_batchnorm

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}  # mallopt(3)
_allocator = {"kept": False}  # whether keep_freed_cpu_memory is in force (glibc has no getter)
_stop = {"requested": False}   # set by graceful_interrupts' signal handler


@dataclass
class Runtime:
    """Where and how the computation runs: device, precision and process group, set up once."""

    device: torch.device
    amp_dtype: torch.dtype | None    # autocast dtype, None = fp32
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # setup_runtime created it, so fit destroys it
    channels_last: bool = True        # memory layout of the model and batches

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast_context(self.device, self.amp_dtype)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_amp(device: torch.device, amp: str, cfg: TrainConfig | None = None,
               purpose: str = "train") -> torch.dtype | None:
    """Autocast dtype for a device: bf16 on CUDA (fp16 without bf16); on CPU, 'auto' takes
    whichever of fp32 and bf16 ran `cfg`'s layer shapes faster on this CPU (training/cpu.py).

    ``amp``: 'auto' | 'bf16' | 'fp16' | 'off' = 'fp32'. fp16 on CPU falls back to fp32.
    """
    if amp in ("off", "fp32"):
        return None
    if amp == "fp16":
        return torch.float16 if device.type == "cuda" else None
    if device.type == "cuda":
        return torch.bfloat16 if amp == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    if amp == "auto":  # measured, not assumed: bf16 is the slow path on some CPUs that support it
        return cpu_choice(cfg or TrainConfig(), purpose).dtype
    if amp == "bf16" and not cpu.cpu_has_bf16():
        # emulated bf16: 5.2 s per step against 0.39-0.48 in fp32 (batch 8, 128 x 128, features 16..128)
        # on a 2-core AMD EPYC with avx2 only
        cpu.log_line(f"amp=bf16: {cpu.cpu_model_name()} has no native bf16 (avx512_bf16 or AMX), so bf16 "
                     "is emulated and can run many times slower than fp32; amp=auto measures which is faster")
    return torch.bfloat16 if amp == "bf16" else None


def select_precision(device: torch.device, cfg: TrainConfig, purpose: str = "train") -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype, channels_last)``. On CPU with ``amp='auto'`` both come from the measured
    choice (channels_last only if ``cfg.channels_last`` allows it); otherwise ``select_amp`` and
    ``cfg.channels_last`` as set."""
    if device.type == "cpu" and cfg.amp == "auto":
        choice = cpu_choice(cfg, purpose)
        return choice.dtype, cfg.channels_last and choice.channels_last
    return select_amp(device, cfg.amp, cfg, purpose), cfg.channels_last


def cpu_choice(cfg: TrainConfig, purpose: str):
    """The measured (cached) fastest precision and layout for `cfg`'s model on this CPU."""
    return choose_cpu_precision(cfg.features, cfg.in_channels, purpose, candidates=available_candidates(purpose))


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` to `amp_dtype` on `device`'s type, or a no-op context for fp32 (None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return None


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    A training step frees and reallocates the same large activation buffers every step. By
    default glibc serves every buffer over 32 MB with its own mmap and unmaps it on free, so
    each step page-faults and zero-fills gigabytes again: on the 2-core CPU this project is
    tested on, the seed model's bf16 step at batch 8 took 3.6 s, with 5.8 s of kernel time in a
    5-step run, and 3.1 s with 1.5 s once freed memory is reused (the effect PyTorch's CPU tuning
    guide gets from jemalloc or tcmalloc). The cost is memory: the process holds its peak until
    :func:`release_freed_cpu_memory` (``fit`` calls it on return), and the heap fragments, so
    peak RSS of the seed model's training rose by 27% at batch 8 and 38% at batch 16. Linux with
    glibc only; returns False (and changes nothing) elsewhere.
    ``TrainConfig.cpu_keep_freed_memory=False`` skips it.
    """
    libc = _libc()
    if libc is None:
        return False
    # no mmap for large blocks (they come from the heap and are reused), never trim the heap
    kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    _allocator["kept"] = _allocator["kept"] or kept
    return kept


def release_freed_cpu_memory() -> bool:
    """Undo :func:`keep_freed_cpu_memory`: glibc's default limits again, and the kept heap trimmed."""
    libc = _libc()
    if libc is None:
        return False
    restored = all(bool(libc.mallopt(option, value)) for option, value in GLIBC_DEFAULTS.items())
    libc.malloc_trim(0)
    _allocator["kept"] = False
    return restored


def cpu_memory_is_kept() -> bool:
    """Whether :func:`keep_freed_cpu_memory` is in force in this process."""
    return _allocator["kept"]


@contextlib.contextmanager
def restored_process_settings():
    """Put back, on exit, the process-wide settings training may change.

    cuDNN benchmark and TF32 switches, deterministic algorithms, torch's intra-op thread count,
    and the glibc allocator setting, so a notebook kernel is left as it was after ``fit``.
    """
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
             cpu_memory_is_kept())
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:3]
        torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
        if torch.get_num_threads() != saved[5]:
            torch.set_num_threads(saved[5])
        if cpu_memory_is_kept() and not saved[6]:
            release_freed_cpu_memory()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision, allocator (CPU), cuDNN/TF32/determinism and (under torchrun) the
    process group. Changes process-wide settings: call it inside :func:`restored_process_settings`."""
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
    amp_dtype, channels_last = select_precision(device, cfg)
    return Runtime(device, amp_dtype, rank, world_size, owns_process_group, channels_last)


def prepare_model(cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """The config's U-Net, seeded, on the runtime's device (SyncBatchNorm, the runtime's layout)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.sync_batchnorm and rt.world_size > 1:
        model = convert_sync_batchnorm(model, rt.device)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class CompileFallback(torch.nn.Module):
    """A compiled module that falls back to eager when compiling fails.

    ``torch.compile`` compiles lazily, at the first forward (and again when shapes or the
    train/eval mode change), so its failures surface at a call, not at ``torch.compile``.
    """

    def __init__(self, compiled: torch.nn.Module, eager: torch.nn.Module):
        super().__init__()
        self.compiled, self.eager, self.failed = compiled, eager, False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                self.failed = True
                print(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training eagerly")
        return self.eager(*args, **kwargs)

    def no_sync(self):
        return self.eager.no_sync()


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """DDP and torch.compile around the model; compile falls back to eager with a message."""
    if rt.world_size > 1:
        # forward_sync_buffers=False: DDP would otherwise broadcast BatchNorm statistics (a
        # collective) on every forward, in eval mode too, and a process with fewer validation
        # batches would hang the others; fit broadcasts them once before validation instead
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if cfg.compile:
        try:
            return CompileFallback(torch.compile(model), model)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            print(f"torch.compile unavailable ({type(err).__name__}: {err}); training eagerly")
    return model


def reduce_mean(value: torch.Tensor, rt: Runtime) -> float:
    """Mean of a scalar tensor over processes, as a Python float (one host sync)."""
    if rt.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world_size
    return float(value)


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


def finish_runtime(rt: Runtime) -> None:
    """Wait for rank 0's last writes, then end the process group if `setup_runtime` made it."""
    if rt.world_size > 1 and dist.is_initialized():
        # a process exiting while gloo still releases its last collective can abort at
        # interpreter shutdown, and torchrun then kills rank 0
        dist.barrier(device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def stop_requested() -> bool:
    """Whether SIGTERM or Ctrl-C arrived inside :func:`graceful_interrupts` (checked between steps)."""
    return _stop["requested"]


@contextlib.contextmanager
def graceful_interrupts():
    """SIGTERM (what schedulers send before killing a job) and Ctrl-C stop training cleanly.

    The first signal only notes the request; ``train_one_epoch`` raises KeyboardInterrupt at
    the next step boundary, so the position saved in last.pt is exact (a KeyboardInterrupt in
    the middle of an optimizer step would leave half-updated weights and a step counted wrong).
    A second signal interrupts at once.
    """
    def handler(signum, frame):
        if _stop["requested"]:
            raise KeyboardInterrupt
        _stop["requested"] = True
    _stop["requested"] = False
    try:
        previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)
        _stop["requested"] = False
