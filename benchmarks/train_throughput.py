"""Benchmark: training and inference throughput of the seed model, against the machine's matmul peak.

Issue: "the seed model's FLOPs per image at 256x256, training images/s and inference slices/s
for (a) a plain fp32 loop and (b) the project's fastest settings, and for each the achieved
FLOP/s as a fraction of the same machine's dense matmul FLOP/s measured in the same run (bf16
and fp32). Target >= 70% of the bf16 matmul figure for training with the real data loader and
loss in the loop, not just the bare model. GPU (batch 32+, bf16, channels_last, compiled):
>= 700 images/s training".

Measured in one run:

FLOPs      counted from the model (seed U-Net, features 64..512, 256 x 256): a forward hook on
           every Conv2d and ConvTranspose2d adds ``2 * Cin * Cout * kh * kw * Hout * Wout / groups``
           (for the transposed conv, whose every *input* pixel meets the kernel once, ``Hin * Win``
           replaces ``Hout * Wout``). BatchNorm, ReLU, pooling and the loss are not counted.
           Training = 3 x forward (forward, input gradients, weight gradients).
peak       a large square ``torch.matmul`` (2048 on CPU, 8192 on CUDA) in fp32 and bf16, GFLOP/s
           (on CUDA fp32 with TF32 off, plus a "tf32" figure), at the start and at the end of the
           run; the higher of the two is the peak (a busy shared machine only ever lowers it).
(a) plain  eager, contiguous (NCHW), fp32, no augmentation: ``train_one_epoch`` over the real
           loader (``make_loaders``) with WeightedCELoss and AdamW, PyTorch's default backend flags
           and allocator (it runs first, before ``setup_runtime`` changes them).
(b) fast   the project's fastest settings: ``setup_runtime`` (bf16 autocast from ``select_amp``,
           cuDNN benchmark / TF32 on CUDA, glibc keeping freed memory on CPU), channels_last,
           online augmentation on the device, the real loader and loss, and torch.compile with
           ``--compile`` (default: on for CUDA only).
inference  slices/s under ``torch.inference_mode`` at batch 32: (a) the plain fp32 model in eval
           mode; (b) ``fold_batchnorm`` + channels_last + the autocast dtype (+ compile), as
           ``training.predict`` runs it.

Each timing starts after warm-up steps (compilation, worker start-up, allocator warm-up), with
``torch.cuda.synchronize`` at both ends on CUDA. Fractions are achieved FLOP/s over the matmul
peak of the run's own precision: (a) over fp32, (b) over bf16 (or fp32 when the device has no
fast bf16 and ``select_amp`` picks fp32).

(b) and (c) on CPU run the fast settings twice, in fp32 and in bf16 (both channels_last), and
report which one ``amp=auto`` chose (``training.cpu.choose_cpu_precision``, the short calibration
on the model's own layer widths) and ``auto_fraction_of_best``: the chosen precision's rate over
the better of the two measured here. The fraction of peak of the fast run is taken over the
faster precision's matmul peak (the larger of the fp32 and bf16 figures).

``--contended`` then measures auto's precision again while ``usable_cpu_count()`` busy loops
(``python -c "while True: pass"``) compete for the CPUs, so this process's fair share is one
half; ``contended_fraction_of_quiet`` is that rate over the quiet one. ``--policy NAME`` runs
with another OpenMP wait policy (``training.cpu.OPENMP_POLICIES``) to compare them.

Usage::

    python benchmarks/train_throughput.py                        # CPU: a few minutes
    python benchmarks/train_throughput.py --contended            # and again with competitors
    python benchmarks/train_throughput.py --contended --policy default   # libgomp's own waiting
    python benchmarks/train_throughput.py --device cuda --batch-size 64 --compile
    python benchmarks/train_throughput.py --quick                # a smoke run in seconds

The last line of stdout is one JSON object with the headline keys; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from training.cpu import (OPENMP_POLICIES, choose_cpu_precision, cpu_model_name,  # noqa: E402
                          prepare_openmp_environment, usable_cpu_count)


def _policy_from_argv(argv) -> str | None:
    """``--policy NAME`` read before argparse: OpenMP reads its settings once, when torch loads."""
    return argv[argv.index("--policy") + 1] if "--policy" in argv[:-1] else None


OPENMP_SET = prepare_openmp_environment(_policy_from_argv(sys.argv))  # before torch loads

import torch  # noqa: E402
from torch import nn  # noqa: E402

from network.unet import fold_batchnorm  # noqa: E402
from training.checkpoint import build_model  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loaders import build_datasets, make_loaders  # noqa: E402
from training.runtime import (Runtime, make_grad_scaler, prepare_model, select_device,  # noqa: E402
                              setup_runtime, wrap_model)
from training.train import build_optimizer, loss_from_config, train_one_epoch  # noqa: E402
from utils.dataset import batch_to_device, load_and_pair_files  # noqa: E402
from utils.phantom.sets import preprocess_phantoms  # noqa: E402
from utils.preprocess_data import PreprocessParams  # noqa: E402

QUICK = {"cases": 2, "phantom_size": 64, "slices": 8, "size": 64, "features": (8, 16), "matmul": 256,
         "batch_size": 4, "infer_batch": 4, "warmup": 1, "steps": 2, "infer_steps": 2}
FULL = {"cases": 3, "phantom_size": 256, "slices": 48, "size": 256, "features": (64, 128, 256, 512),
        "infer_batch": 32}
CPU = {"matmul": 2048, "batch_size": 8, "warmup": 2, "steps": 4, "plain_steps": 2, "infer_steps": 1}
CUDA = {"matmul": 8192, "batch_size": 64, "warmup": 5, "steps": 50, "infer_steps": 20}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_flops_per_image(cfg: TrainConfig, size: int) -> int:
    """Forward FLOPs of the convolutions for one ``(in_channels, size, size)`` image (meta device)."""
    model = build_model(cfg).to("meta")
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        macs_per_pixel = module.in_channels * module.out_channels * kh * kw // module.groups
        pixels = inputs[0].shape[-2:] if isinstance(module, nn.ConvTranspose2d) else output.shape[-2:]
        total += 2 * macs_per_pixel * pixels[0] * pixels[1] * output.shape[0]

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, cfg.in_channels, size, size, device="meta"))
    return total


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, tf32: bool = False) -> float:
    """Best (CPU) or mean (CUDA) GFLOP/s of an n x n x n matmul."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        synchronize(device)
        if device.type == "cuda":
            repeats = 10
            started = time.perf_counter()
            for _ in range(repeats):
                torch.matmul(a, b)
            synchronize(device)
            seconds = (time.perf_counter() - started) / repeats
        else:
            seconds = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                torch.matmul(a, b)
                seconds = min(seconds, time.perf_counter() - started)
        return 2 * n**3 / seconds / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_peaks(device: torch.device, n: int) -> dict:
    """{"fp32", "bf16"} (and "tf32" on CUDA) matmul GFLOP/s."""
    peak = {"fp32": matmul_gflops(device, torch.float32, n), "bf16": matmul_gflops(device, torch.bfloat16, n)}
    if device.type == "cuda":
        peak["tf32"] = matmul_gflops(device, torch.float32, n, tf32=True)
    return peak


def make_data(folder: Path, sizes: dict) -> Path:
    """A preprocessed phantom set; returns its folder."""
    return preprocess_phantoms(folder, sizes["cases"], size=sizes["phantom_size"], num_slices=sizes["slices"],
                               params=PreprocessParams(target_size=(sizes["size"],) * 2))


class TimedLoader:
    """A loader that notes the time at which batch number `warmup` is handed out (device synced)."""

    def __init__(self, loader, warmup: int, device: torch.device):
        self.loader, self.warmup, self.device = loader, warmup, device
        self.started = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.warmup:
                synchronize(self.device)
                self.started = time.perf_counter()
            yield batch


def measure_training(cfg: TrainConfig, rt: Runtime, data: Path, warmup: int, steps: int):
    """(images/s over the last `steps` steps of one train_one_epoch, the unwrapped model)."""
    cfg = cfg.replace(steps_per_epoch=warmup + steps)
    module = prepare_model(cfg, rt)
    model = wrap_model(module, cfg, rt)
    loss_fn = loss_from_config(cfg)
    optimizer = build_optimizer(cfg, model)
    scaler = make_grad_scaler(rt.device, rt.amp_dtype)
    train_set, val_set = build_datasets(cfg, load_and_pair_files(data))
    loader, _ = make_loaders(cfg, train_set, val_set, rt, epoch=0)
    timed = TimedLoader(loader, warmup, rt.device)
    train_one_epoch(model, timed, loss_fn, optimizer, scaler, cfg, rt, epoch=0, progress=False)
    synchronize(rt.device)  # train_one_epoch ends with a host sync already
    return steps * cfg.batch_size / (time.perf_counter() - timed.started), module


def inference_batch(cfg: TrainConfig, data: Path, batch_size: int, rt: Runtime) -> torch.Tensor:
    """``(batch_size, C, H, W)`` float images of real preprocessed slices, on the device."""
    dataset, _ = build_datasets(cfg, load_and_pair_files(data))
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    batch = torch.utils.data.default_collate(items)
    return batch_to_device(batch, rt.device, channels_last=cfg.channels_last)["image"]


def measure_inference(model: nn.Module, images: torch.Tensor, rt: Runtime, warmup: int, steps: int) -> float:
    """Slices/s of ``model(images)`` in eval mode under inference_mode and the runtime's autocast."""
    model.eval()
    with torch.inference_mode():
        for i in range(warmup + steps):
            if i == warmup:
                synchronize(rt.device)
                started = time.perf_counter()
            with rt.autocast():
                model(images)
        synchronize(rt.device)
    return steps * images.shape[0] / (time.perf_counter() - started)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 8 CPU, 64 CUDA)")
    parser.add_argument("--infer-batch-size", type=int, default=None, help="default 32")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 4 CPU, 50 CUDA)")
    parser.add_argument("--plain-steps", type=int, default=None, help="timed steps of (a) (default 2 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 5 CUDA)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="torch.compile the fast run (default: on CUDA only)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--skip-plain", action="store_true", help="measure (b) only")
    parser.add_argument("--contended", action="store_true",
                        help="measure auto's precision again while busy loops compete for the CPUs")
    parser.add_argument("--policy", choices=sorted(OPENMP_POLICIES), default=None,
                        help="OpenMP wait policy (default: training.cpu's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and model")
    return parser.parse_args(argv)


def measure_fast(base: TrainConfig, amp: str, data: Path, sizes: dict, warmup: int, steps: int,
                 compile_fast: bool) -> dict:
    """Training images/s and inference slices/s of the fast settings with ``amp`` forced."""
    cfg = base.replace(compile=compile_fast, amp=amp)
    rt = setup_runtime(cfg)
    print(f"fast {amp} ({rt.amp_dtype}, channels_last, compile={compile_fast}): {warmup} + {steps} steps ...",
          file=sys.stderr, flush=True)
    train_rate, model = measure_training(cfg, rt, data, warmup, steps)
    infer_model = wrap_model(fold_batchnorm(model).to(memory_format=torch.channels_last), cfg, rt)
    images = inference_batch(cfg, data, sizes["infer_batch"], rt)
    infer_rate = measure_inference(infer_model, images, rt, 2 if compile_fast else 1, sizes["infer_steps"])
    return {"train": train_rate, "infer": infer_rate, "amp_dtype": str(rt.amp_dtype)}


def start_competitors(count: int) -> list[subprocess.Popen]:
    """`count` CPU-bound busy loops (killed by :func:`stop_competitors`)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_competitors(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill(), process.wait()


def auto_choice(cfg: TrainConfig, purpose: str, device: torch.device) -> dict:
    """What ``amp=auto`` takes for `purpose` (CPU: the calibration, cached; CUDA: bf16)."""
    if device.type != "cpu":
        return {"precision": "bf16", "how": "cuda rule"}
    return choose_cpu_precision(cfg.features, cfg.in_channels, purpose).to_dict()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    sizes = {**FULL, **(CUDA if cuda else CPU), **(QUICK if args.quick else {})}
    batch_size = args.batch_size or sizes["batch_size"]
    steps, warmup = args.steps or sizes["steps"], args.warmup if args.warmup is not None else sizes["warmup"]
    plain_steps = args.plain_steps or sizes.get("plain_steps", steps)
    compile_fast = cuda if args.compile is None else args.compile
    base = TrainConfig(device=str(device), batch_size=batch_size, features=sizes["features"])
    if args.num_workers is not None:
        base = base.replace(num_workers=args.num_workers)
    load_before = os.getloadavg()[0]
    calibration = {"train": auto_choice(base, "train", device), "predict": auto_choice(base, "predict", device)}
    auto_amp = calibration["train"]["precision"]

    flops_forward = conv_flops_per_image(base, sizes["size"])
    print(f"matmul peak ({sizes['matmul']}^3) ...", file=sys.stderr, flush=True)
    peaks = [matmul_peaks(device, sizes["matmul"])]

    with tempfile.TemporaryDirectory(prefix="abdoseg-bench-train-") as tmp:
        print("writing and preprocessing phantoms ...", file=sys.stderr, flush=True)
        data = make_data(Path(tmp), sizes)
        plain = {}
        if not args.skip_plain:  # first, while the process still has PyTorch's default allocator
            plain_cfg = base.replace(amp="off", channels_last=False, compile=False, augment=False)
            plain_rt = Runtime(device, None)
            print(f"(a) plain fp32: {warmup} + {plain_steps} steps of batch {batch_size} ...", file=sys.stderr, flush=True)
            plain["train"], plain_model = measure_training(plain_cfg, plain_rt, data, warmup, plain_steps)
            images = inference_batch(plain_cfg, data, sizes["infer_batch"], plain_rt)
            print("(a) plain fp32 inference ...", file=sys.stderr, flush=True)
            plain["infer"] = measure_inference(plain_model, images, plain_rt, 1, sizes["infer_steps"])
            del plain_model, images
        precisions = ("bf16",) if cuda else ("fp32", "bf16")
        fast = {amp: measure_fast(base, amp, data, sizes, warmup, steps, compile_fast) for amp in precisions}
        contended = None
        if args.contended:
            competitors = start_competitors(usable_cpu_count())
            try:
                time.sleep(0.5)
                contended = measure_fast(base, auto_amp, data, sizes, warmup, steps, compile_fast)
            finally:
                stop_competitors(competitors)

    print("matmul peak again ...", file=sys.stderr, flush=True)
    peaks.append(matmul_peaks(device, sizes["matmul"]))
    peak = {key: max(p[key] for p in peaks) for key in peaks[0]}
    result = summarize(args, base, sizes, device, peaks, peak, plain, fast, calibration, contended,
                       flops_forward, compile_fast, warmup, steps, plain_steps, load_before)
    print(json.dumps(result))
    return result


def summarize(args, base, sizes, device, peaks, peak, plain, fast, calibration, contended, flops_forward,
              compile_fast, warmup, steps, plain_steps, load_before) -> dict:
    """The JSON line: headline keys first."""
    flops_train = 3 * flops_forward
    cuda = device.type == "cuda"
    auto_amp = calibration["train"]["precision"] if calibration["train"]["precision"] in fast else "bf16"
    auto_infer = calibration["predict"]["precision"] if calibration["predict"]["precision"] in fast else auto_amp
    best_peak = max(peak["fp32"], peak["bf16"])  # the faster precision's matmul figure

    def fraction(rate, flops, peak_gflops):
        return round(rate * flops / 1e9 / peak_gflops, 4)

    best_train = max(run["train"] for run in fast.values())
    best_infer = max(run["infer"] for run in fast.values())
    result = {
        "train_images_per_s": round(fast[auto_amp]["train"], 2),
        "plain_fp32_train_images_per_s": round(plain["train"], 2) if plain else None,
        "train_fraction_of_matmul_peak": fraction(fast[auto_amp]["train"], flops_train, best_peak),
        "plain_fp32_train_fraction_of_fp32_matmul_peak": fraction(plain["train"], flops_train, peak["fp32"])
        if plain else None,
        "infer_slices_per_s": round(fast[auto_infer]["infer"], 2),
        "plain_fp32_infer_slices_per_s": round(plain["infer"], 2) if plain else None,
        "infer_fraction_of_matmul_peak": fraction(fast[auto_infer]["infer"], flops_forward, best_peak),
        "plain_fp32_infer_fraction_of_fp32_matmul_peak": fraction(plain["infer"], flops_forward, peak["fp32"])
        if plain else None,
        "auto_train_precision": auto_amp, "auto_predict_precision": calibration["predict"]["precision"],
        "auto_channels_last": {purpose: choice.get("channels_last") for purpose, choice in calibration.items()},
        "auto_fraction_of_best": round(fast[auto_amp]["train"] / best_train, 4),
        "auto_infer_fraction_of_best": round(fast[auto_infer]["infer"] / best_infer, 4),
        "by_precision": {amp: {"train_images_per_s": round(run["train"], 2),
                               "train_fraction_of_best_matmul_peak": fraction(run["train"], flops_train, best_peak),
                               "infer_slices_per_s": round(run["infer"], 2),
                               "infer_fraction_of_best_matmul_peak": fraction(run["infer"], flops_forward, best_peak)}
                         for amp, run in fast.items()},
        "contended_fraction_of_quiet": round(contended["train"] / fast[auto_amp]["train"], 4) if contended else None,
        "contended": {"train_images_per_s": round(contended["train"], 2),
                      "infer_slices_per_s": round(contended["infer"], 2),
                      "infer_fraction_of_quiet": round(contended["infer"] / fast[auto_amp]["infer"], 4),
                      "competitors": usable_cpu_count(), "precision": auto_amp} if contended else None,
        "calibration": calibration,
        "cpu_model": cpu_model_name(),
        "matmul_peak_gflops": {key: round(value, 1) for key, value in peak.items()},
        "matmul_gflops_start_end": [{key: round(value, 1) for key, value in p.items()} for p in peaks],
        "flops_per_image": flops_forward,  # forward, one image
        "train_flops_per_image": flops_train,
        "device": str(device),
        "speedup_vs_plain_fp32": round(fast[auto_amp]["train"] / plain["train"], 2) if plain else None,
        "fast_settings": {"channels_last": base.channels_last, "compile": compile_fast,
                          "augment": base.augment.enabled,
                          "cpu_keep_freed_memory": device.type == "cpu" and base.cpu_keep_freed_memory,
                          "fold_batchnorm_inference": True},
        "openmp": {"policy": args.policy or "default of training.cpu", "set_here": OPENMP_SET,
                   **{key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}},
        "batch_size": base.batch_size, "infer_batch_size": sizes["infer_batch"], "image_size": sizes["size"],
        "features": list(base.features), "num_workers": base.num_workers, "warmup_steps": warmup,
        "timed_steps": {"fast": steps, "plain": plain_steps if plain else 0},
        "torch_threads": torch.get_num_threads(), "usable_cpus": usable_cpu_count(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "notes": "train/infer_fraction_of_matmul_peak: auto's precision over the faster precision's matmul peak; "
                 "(a) over fp32; FLOPs count convolutions only; "
                 + ("CPU: compile off by default (pass --compile to try it)" if not cuda and not compile_fast else ""),
        "quick": args.quick,
    }
    return result


if __name__ == "__main__":
    main()
