"""Benchmark: does the data loader keep up with the training step?

Issue: "the loader at least 3x faster than the training step, so the model never waits".

Measured side by side in one run, on a preprocessed phantom set (256 x 256 slices):

loader   everything the model waits on, without the model: the real training loader
         (``training.loaders.make_loaders``: ``SliceDataset`` + ``DataLoader`` with the configured
         ``num_workers`` and batch 16), then ``batch_to_device`` and ``augment_batch`` on the
         training device. With ``--resident``: the config's ``resident=True`` (the whole set held
         on the device, batches gathered there, no DataLoader) instead of the DataLoader.
step     the training step alone (``training.train.train_one_epoch`` with augmentation off) on
         batches made beforehand: the seed model (features 64..512), WeightedCELoss, AdamW and the
         project's fastest settings (autocast dtype from ``select_amp``, channels_last, and
         torch.compile on CUDA).
memory   peak memory of two training steps (eager, augmentation on) per batch size, each in a
         fresh subprocess: peak RSS of the process on CPU (Python, torch and the model included),
         ``torch.cuda.max_memory_allocated`` on CUDA.

``ratio`` = loader images/s / step images/s (the issue asks for >= 3). On a CPU the loader's
worker processes and the step share the same cores during real training, so there the ratio of
the two measured apart is an upper bound.

Usage::

    python benchmarks/loader.py                         # CPU or CUDA, whichever is there
    python benchmarks/loader.py --device cuda --resident
    python benchmarks/loader.py --quick                 # a smoke run in seconds

The last line of stdout is one JSON object with the headline keys; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from training.cpu import benchmark_record, prepare_openmp_environment  # noqa: E402

prepare_openmp_environment()  # before torch loads, as the command line does (training/cpu.py)

import torch  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.loaders import build_datasets, make_loaders  # noqa: E402
from training.runtime import make_grad_scaler, prepare_model, setup_runtime, wrap_model  # noqa: E402
from training.train import build_optimizer, loss_from_config, train_one_epoch  # noqa: E402
from utils.augment import AugmentParams, augment_batch  # noqa: E402
from utils.dataset import batch_to_device, load_and_pair_files  # noqa: E402
from utils.phantom.sets import preprocess_phantoms  # noqa: E402
from utils.preprocess_data import PreprocessParams  # noqa: E402

QUICK = {"cases": 2, "phantom_size": 64, "slices": 8, "target": 64, "features": (8, 16),
         "loader_steps": 4, "step_steps": 2, "memory_batches": (2,)}
FULL = {"cases": 4, "phantom_size": 256, "slices": 64, "target": 256, "features": (64, 128, 256, 512),
        "loader_steps": 40, "memory_batches": (2, 4, 8, 16)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(folder: Path, sizes: dict) -> Path:
    """A preprocessed phantom set; returns its folder."""
    return preprocess_phantoms(folder, sizes["cases"], size=sizes["phantom_size"], num_slices=sizes["slices"],
                               params=PreprocessParams(target_size=(sizes["target"],) * 2))


def raw_batches(cfg: TrainConfig, rt, data: Path):
    """Endless batches as the training loop receives them (uint8, before batch_to_device).

    ``make_loaders`` gives ``steps_per_epoch`` batches per epoch: a DataLoader, or with
    ``cfg.resident`` batches gathered from the set held on the device.
    """
    train_set, val_set = build_datasets(cfg, load_and_pair_files(data))
    for epoch in itertools.count():
        loader, _ = make_loaders(cfg, train_set, val_set, rt, epoch)
        yield from loader


def measure_loader(cfg: TrainConfig, rt, data: Path, warmup: int, steps: int) -> float:
    """Images/s of loading + batch_to_device + augment_batch, after `warmup` batches."""
    params = AugmentParams.from_config(cfg)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    started = None
    for i, batch in enumerate(itertools.islice(raw_batches(cfg, rt, data), warmup + steps)):
        if i == warmup:
            synchronize(rt.device)
            started = time.perf_counter()
        batch = batch_to_device(batch, rt.device, channels_last=cfg.channels_last)
        augment_batch(batch["image"], batch["label"], batch["distance"], params, generator)
    synchronize(rt.device)
    return steps * cfg.batch_size / (time.perf_counter() - started)


def training_parts(cfg: TrainConfig, rt):
    """Model (wrapped as fit wraps it), loss, optimizer and scaler, as ``fit`` builds them."""
    model = wrap_model(prepare_model(cfg, rt), cfg, rt)
    loss_fn = loss_from_config(cfg)
    optimizer = build_optimizer(cfg, model)
    scaler = make_grad_scaler(rt.device, rt.amp_dtype)
    return model, loss_fn, optimizer, scaler


def measure_step(cfg: TrainConfig, rt, batches: list[dict], warmup: int, steps: int) -> float:
    """Images/s of ``train_one_epoch`` (augmentation off) on batches already on the device."""
    cfg = cfg.replace(augment=False)
    model, loss_fn, optimizer, scaler = training_parts(cfg, rt)
    run = [batches[i % len(batches)] for i in range(warmup + steps)]
    train_one_epoch(model, run[:warmup], loss_fn, optimizer, scaler, cfg, rt, epoch=0, progress=False)
    synchronize(rt.device)
    started = time.perf_counter()
    train_one_epoch(model, run[warmup:], loss_fn, optimizer, scaler, cfg, rt, epoch=0, progress=False)
    synchronize(rt.device)  # train_one_epoch ends with a host sync already; this is belt and braces
    return steps * cfg.batch_size / (time.perf_counter() - started)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``/proc/self/status`` VmHWM where there is one: ``ru_maxrss`` survives ``exec``, so a child
    started from a large parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def memory_child(cfg: TrainConfig, rt, batch_size: int, size: int) -> dict:
    """Peak memory of two training steps at `batch_size` (this process is fresh)."""
    cfg = cfg.replace(batch_size=batch_size)
    generator = torch.Generator().manual_seed(0)
    batch = {  # synthetic uint8 batch on the device, as the loader would hand it over
        "image": torch.randint(0, 256, (batch_size, cfg.in_channels, size, size), dtype=torch.uint8,
                               generator=generator),
        "label": torch.randint(0, cfg.num_classes, (batch_size, size, size), dtype=torch.uint8, generator=generator),
        "distance": torch.randint(0, 256, (batch_size, size, size), dtype=torch.uint8, generator=generator),
        "annotated": torch.ones(batch_size, cfg.num_classes, dtype=torch.bool),
    }
    batch = {key: value.to(rt.device) for key, value in batch.items()}
    model, loss_fn, optimizer, scaler = training_parts(cfg, rt)
    before_mb = peak_rss_mb()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    train_one_epoch(model, [batch, batch], loss_fn, optimizer, scaler, cfg, rt, epoch=0, progress=False)
    synchronize(rt.device)
    if rt.device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(rt.device) / 2**20, "before_mb": None}
    return {"peak_mb": peak_rss_mb(), "before_mb": before_mb}


def measure_memory(args, batch_sizes) -> tuple[dict, dict]:
    """{batch size: peak MB}, {batch size: MB before training}, one fresh subprocess each."""
    peaks, before = {}, {}
    for batch_size in batch_sizes:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(batch_size),
                   "--device", args.device, "--compile", "off"] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child for batch {batch_size} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[str(batch_size)] = round(result["peak_mb"], 1)
        before[str(batch_size)] = None if result["before_mb"] is None else round(result["before_mb"], 1)
        print(f"  batch {batch_size}: peak {peaks[str(batch_size)]} MB", file=sys.stderr, flush=True)
    return peaks, before


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the config's num_workers")
    parser.add_argument("--steps", type=int, default=None, help="timed loader batches (the step gets fewer on CPU)")
    parser.add_argument("--step-steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the model for the step (auto: on CUDA only)")
    parser.add_argument("--resident", action="store_true", help="the resident loader instead of the DataLoader")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and model")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    base = TrainConfig(device=args.device, batch_size=args.batch_size, features=sizes["features"])
    rt = setup_runtime(base)
    compile_model = args.compile == "on" or (args.compile == "auto" and rt.device.type == "cuda")
    cfg = base.replace(compile=compile_model, num_workers=args.num_workers if args.num_workers is not None
                       else base.num_workers)
    if args.memory_child is not None:
        result = memory_child(cfg, rt, args.memory_child, sizes["target"])
        print(json.dumps(result))
        return result
    cuda = rt.device.type == "cuda"
    loader_steps = args.steps or (200 if cuda and not args.quick else sizes["loader_steps"])
    step_steps = args.step_steps or sizes.get("step_steps") or (50 if cuda else 3)
    warmup = 3 if cuda or args.quick else 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="abdoseg-bench-loader-") as tmp:
        print("writing and preprocessing phantoms ...", file=sys.stderr, flush=True)
        data = make_data(Path(tmp), sizes)
        loader_cfg = cfg.replace(steps_per_epoch=warmup + loader_steps, resident=args.resident)
        print(f"loader: {loader_steps} batches ...", file=sys.stderr, flush=True)
        loader_rate = measure_loader(loader_cfg, rt, data, warmup, loader_steps)
        batches = list(itertools.islice(raw_batches(cfg.replace(steps_per_epoch=4), rt, data), 4))
        batches = [{key: value.to(rt.device) if torch.is_tensor(value) else value for key, value in b.items()}
                   for b in batches]
        print(f"step: {step_steps} steps ...", file=sys.stderr, flush=True)
        step_rate = measure_step(cfg, rt, batches, 1 if not cuda else 5, step_steps)
    peaks, before = ({}, {}) if args.no_memory else measure_memory(args, sizes["memory_batches"])
    result = {
        "loader_images_per_s": round(loader_rate, 1),
        "step_images_per_s": round(step_rate, 2),
        "ratio": round(loader_rate / step_rate, 2),
        "device": str(rt.device),
        "peak_memory_mb_by_batch": peaks,
        "memory_measure": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
        "memory_before_training_mb_by_batch": before,
        "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "loader": "resident" if args.resident
        else "DataLoader", "amp_dtype": str(rt.amp_dtype), "channels_last": cfg.channels_last,
        "compile": cfg.compile, "features": list(cfg.features), "image_size": sizes["target"],
        "loader_batches": loader_steps, "step_batches": step_steps, "torch_threads": torch.get_num_threads(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": ("on CPU the loader workers and the step share the same cores in real training, "
                 "so the ratio measured apart is an upper bound") if not cuda else "",
        "calibration": benchmark_record(rt.device.type, cfg.features),  # what amp=auto chose here
        "quick": args.quick,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
