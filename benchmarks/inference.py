"""Benchmark: NIfTI -> NIfTI prediction, this project's way against the seed's way.

Issue: "a 512x512x200 CT from NIfTI to NIfTI with the seed model (features 64..512) at 256x256
in under 60 s on a 2-core CPU, peak memory bounded; GPU: >= 3000 slices/s model-only and < 3 s
end to end".

In one run, on phantom CTs (``utils.phantom.make_phantom``, 512 x 512 x N int16, written with
``save_volume``) and a randomly initialised seed-sized model saved as a checkpoint, it measures:

(a) ``predict_files(checkpoint, ct, out)``: int16 read, windowing and resizing in chunks on the
    device, batched ``inference_mode`` with bf16 autocast where supported, channels_last, BatchNorm
    folded, logits mapped back and reduced to labels chunk by chunk, uint8 output.
(b) the seed's way, reimplemented as a baseline (see ``seed_way``): float64 ``get_fdata``, a
    per-slice Python loop with ``scipy.ndimage.zoom`` to 256 x 256, the model in fp32 on one
    slice at a time, argmax, ``zoom`` back (order 0). It is slow on a CPU, so by default its
    loop runs on the first 20 slices and is extrapolated linearly (``seed_way_extrapolated_from``);
    its load and save are measured whole.
(c) the model alone on random batches (``slices_per_s_model_only``), with (a)'s settings.

Each measurement runs in a fresh subprocess, so ``peak_rss_mb_*`` (the child's own peak,
``VmHWM``) is per run. Seconds are the wall time of the prediction call inside the child
(checkpoint load and device setup included, Python and torch import excluded:
``process_seconds_*`` includes them). ``peak_rss_mb_model_only`` is the floor every run shares
(Python, torch, the model); ``load_average_*`` shows whether other work shared the machine, and
``cpu_seconds_*`` (the child's user + system time, import included) is less sensitive to it.

(d) the first slice count again with the precision forced to fp32, bf16 and int8 (ONNX Runtime,
    when installed), then ``auto`` once more (``precision_auto``: what the calibration chose and
    the int8 gate allowed); ``auto_fraction_of_best`` is the fastest forced time over auto's.
    ``quantize_seconds`` is the one-time int8 quantization and gate of the timed model, run before
    any timing (``int8_agreement`` / ``int8_gate_passed``: that model's gate). With
    ``--dice-checkpoint`` a trained model's mean test-set Dice in fp32, int8 and auto, what auto
    ran for it and its gate (``dice_by_precision``; the demo's test phantoms).

The run has its own calibration/int8 cache (``ABDOSEG_CACHE_DIR`` in its temporary folder): the
parent calibrates first (``calibration`` in the JSON), and the children find the choice cached.

Usage::

    python benchmarks/inference.py                      # 200 and 600 slices, CPU: ~8 minutes
    python benchmarks/inference.py --dice-checkpoint runs/demo/run/checkpoints/best.pt \
        --dice-images runs/demo/raw/test/Image --dice-masks runs/demo/raw/test/Mask
    python benchmarks/inference.py --device cuda
    python benchmarks/inference.py --quick              # 128 x 128 x (20, 40), seconds

The last line of stdout is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from training.cpu import benchmark_record, prepare_openmp_environment  # noqa: E402

prepare_openmp_environment()  # before torch loads, as the command line does (training/cpu.py)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402
import torch  # noqa: E402

from network.unet import UNet, fold_batchnorm  # noqa: E402
from training.checkpoint import (FORMAT, label_scheme, load_checkpoint, model_from_checkpoint,  # noqa: E402
                                 save_checkpoint)
from training.config import TrainConfig  # noqa: E402
from training.predict import CPU_MAX_BATCH, predict_files  # noqa: E402
from training.quantize import onnxruntime_available  # noqa: E402
from training.runtime import autocast_context, select_amp, select_device  # noqa: E402
from utils.phantom import make_phantom  # noqa: E402
from utils.geometry import PreprocessParams  # noqa: E402
from utils.volume_io import save_volume  # noqa: E402

TARGET_SIZE = (256, 256)  # the seed's slice size
SEED_WAY = ("nib.load().get_fdata() float64; per slice: clip [-400, 400], normalise, scipy.ndimage.zoom "
            "to 256x256 (order 1), model fp32 on one (1, 1, 256, 256) slice under no_grad, argmax, "
            "zoom back (order 0) into a uint8 volume; nib.save")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM from /proc, else ru_maxrss (both in kB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- children

def ours(checkpoint: Path, ct: Path, out: Path, device: str, precision: str = "auto") -> dict:
    started = time.perf_counter()
    summary = predict_files(checkpoint, ct, out, device=device, progress=False, precision=precision,
                            overwrite=True)  # a rerun replaces its own outputs
    if summary["failed"]:
        raise RuntimeError(summary["failed"])
    return {"seconds": time.perf_counter() - started, "precision": summary["precision"]}


def quantize_once(checkpoint: Path) -> dict:
    """Make (and cache) the int8 model of `checkpoint` and its gate: what the first int8 (or auto)
    prediction of a model adds."""
    from training.quantize import int8_gate
    started = time.perf_counter()
    model, cfg, params = model_from_checkpoint(load_checkpoint(checkpoint))
    gate = int8_gate(fold_batchnorm(model), cfg, params)
    return {"seconds": time.perf_counter() - started, "int8_agreement": gate["agreement"],
            "int8_gate_passed": gate["passed"]}


def dice_by_precision(checkpoint: Path, images: Path, masks: Path, out: Path, device: str) -> dict:
    """Mean test-set 3D Dice of fp32, int8 and auto predictions (``evaluate_folders``, full labels),
    what auto ran for this trained model and its int8 gate."""
    from training.evaluate import evaluate_folders
    dice, ran = {}, {}
    for precision in ("fp32", "int8", "auto"):
        ran[precision] = predict_files(checkpoint, images, out / precision, device=device, progress=False,
                                       precision=precision, overwrite=True)["precision"]
        dice[precision] = evaluate_folders(out / precision, masks, "full", out / f"eval_{precision}",
                                           progress=False)["mean_dice"]
    return {"dice": dice, "int8_minus_fp32": dice["int8"] - dice["fp32"], "precision_auto": ran["auto"],
            **{key: value for key, value in quantize_once(checkpoint).items() if key != "seconds"}}


def seed_way(checkpoint: Path, ct: Path, out: Path, device: str, limit: int) -> dict:
    """The seed's per-slice loop on the first `limit` slices; load and save measured whole."""
    device = select_device(device)
    started = time.perf_counter()
    model = model_from_checkpoint(load_checkpoint(checkpoint))[0].to(device)  # fp32, BN unfolded
    image = nib.load(ct)
    data = image.get_fdata()  # (X, Y, Z) float64
    loaded = time.perf_counter()
    size_x, size_y, num_slices = data.shape
    labels = np.zeros(data.shape, dtype=np.uint8)
    done = min(limit, num_slices)
    for z in range(done):
        slice_ = (np.clip(data[:, :, z], -400, 400) + 400) / 800
        slice_ = scipy.ndimage.zoom(slice_, (256 / size_x, 256 / size_y), order=1)
        with torch.no_grad():
            logits = model(torch.from_numpy(slice_).float()[None, None].to(device))
        prediction = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        labels[:, :, z] = scipy.ndimage.zoom(prediction, (size_x / 256, size_y / 256), order=0)
    looped = time.perf_counter()
    nib.save(nib.Nifti1Image(labels, image.affine), out / "seed.nii.gz")
    saved = time.perf_counter()
    loop = (looped - loaded) * num_slices / done
    return {"seconds": (loaded - started) + loop + (saved - looped), "load_seconds": loaded - started,
            "loop_seconds_per_slice": (looped - loaded) / done, "save_seconds": saved - looped,
            "extrapolated_from": done if done < num_slices else None}


def model_only(device: str, seconds: float) -> dict:
    """Slices per second of the folded seed model alone, with predict_volume's settings."""
    device = select_device(device)
    cfg = TrainConfig()
    model = fold_batchnorm(UNet(features=cfg.features)).to(device).to(memory_format=torch.channels_last)
    amp_dtype = select_amp(device, cfg.amp, cfg, purpose="predict")
    batch_size = CPU_MAX_BATCH if device.type == "cpu" else 256
    batch = torch.rand(batch_size, 1, *TARGET_SIZE, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, amp_dtype):
        for _ in range(3):
            model(batch)
        _synchronize(device)
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            model(batch)
            done += batch_size
            _synchronize(device)
        elapsed = time.perf_counter() - started
    return {"slices_per_s": done / elapsed, "batch_size": batch_size,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args) -> None:
    started = time.perf_counter()
    if args.child == "ours":
        result = ours(args.checkpoint, args.input, args.out, args.device, args.precision)
    elif args.child == "quantize":
        result = quantize_once(args.checkpoint)
    elif args.child == "dice":
        result = dice_by_precision(args.checkpoint, args.input, args.masks, args.out, args.device)
    elif args.child == "seed":
        result = seed_way(args.checkpoint, args.input, args.out, args.device, args.seed_limit)
    else:
        result = model_only(args.device, args.model_seconds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(peak_rss_mb=peak_rss_mb(), child_seconds=time.perf_counter() - started,
                  cpu_seconds=usage.ru_utime + usage.ru_stime)
    print(json.dumps(result))


# --------------------------------------------------------------------------- parent

def run_child(mode: str, args, precision: str = "auto", **paths) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--device", args.device,
               "--size", str(args.size), "--seed-limit", str(args.seed_limit),
               "--model-seconds", str(args.model_seconds), "--precision", precision]
    for key, value in paths.items():
        command += [f"--{key}", str(value)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def main(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="abdoseg-inference-"))
    os.environ["ABDOSEG_CACHE_DIR"] = str(work / "cache")  # the children's calibration and int8 cache
    try:
        torch.manual_seed(0)
        cfg = TrainConfig()  # the seed model: features 64, 128, 256, 512
        params = PreprocessParams(target_size=TARGET_SIZE)
        checkpoint = work / "seed_model.pt"
        save_checkpoint({"format": FORMAT, "model": UNet(features=cfg.features).state_dict(),
                         "config": cfg.to_dict(), "preprocess": params.to_dict(), "labels": label_scheme(),
                         "epoch": 0}, checkpoint)
        cts = {}
        for num_slices in args.slices:
            started = time.perf_counter()
            phantom = make_phantom(0, 0, size=args.size, num_slices=num_slices)
            cts[num_slices] = work / f"ct_{num_slices}.nii.gz"
            save_volume(phantom.hu, phantom.affine, cts[num_slices])
            del phantom
            log(f"phantom {args.size}x{args.size}x{num_slices}: {time.perf_counter() - started:.1f} s")

        result = {"load_average_at_start": os.getloadavg(), "device": str(select_device(args.device)),
                  "size": args.size, "threads": torch.get_num_threads(),
                  "model": "UNet features (64, 128, 256, 512), random init, 256x256",
                  "cpu_max_batch": CPU_MAX_BATCH, "calibration": benchmark_record(str(select_device(args.device).type))}
        if onnxruntime_available() and result["device"] == "cpu":  # once per model, before any timing
            quantized = run_child("quantize", args, checkpoint=checkpoint)
            result.update(quantize_seconds=quantized.pop("seconds"), **quantized)
            log(f"int8 quantization and gate, once: {result['quantize_seconds']:.1f} s, agreement "
                f"{result['int8_agreement']:.4f}, passed {result['int8_gate_passed']}")
        model = run_child("model", args)
        result.update(slices_per_s_model_only=model["slices_per_s"], model_only_batch=model["batch_size"],
                      amp=model["amp"], peak_rss_mb_model_only=model["peak_rss_mb"])
        log(f"model only: {model['slices_per_s']:.1f} slices/s ({model['amp']}, batch {model['batch_size']})")
        for num_slices, ct in cts.items():
            out = work / f"out_{num_slices}"
            run = run_child("ours", args, checkpoint=checkpoint, input=ct, out=out)
            written = nib.load(out / ct.name)
            assert written.shape == nib.load(ct).shape and written.get_data_dtype() == np.uint8
            result.update({f"seconds_{num_slices}": run["seconds"], f"peak_rss_mb_{num_slices}": run["peak_rss_mb"],
                           f"process_seconds_{num_slices}": run["process_seconds"],
                           f"cpu_seconds_{num_slices}": run["cpu_seconds"]})
            log(f"ours {num_slices} slices: {run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB")

        num_slices = args.slices[0]
        result.update(by_precision(args, checkpoint, cts[num_slices], num_slices, work))
        seed = run_child("seed", args, checkpoint=checkpoint, input=cts[num_slices], out=work)
        result.update({f"seed_way_seconds_{num_slices}": seed["seconds"],
                       f"seed_way_peak_rss_mb_{num_slices}": seed["peak_rss_mb"],
                       "seed_way_cpu_seconds_run": seed["cpu_seconds"],
                       "seed_way_extrapolated_from": seed["extrapolated_from"],
                       "seed_way_seconds_per_slice": seed["loop_seconds_per_slice"],
                       "seed_way_load_seconds": seed["load_seconds"], "seed_way_save_seconds": seed["save_seconds"],
                       f"speedup_{num_slices}": seed["seconds"] / result[f"seconds_{num_slices}"],
                       "seed_way": SEED_WAY})
        result[f"seed_way_over_best_{num_slices}"] = seed["seconds"] / min(
            value for key, value in result.items() if key.startswith(f"seconds_{num_slices}"))
        if args.dice_checkpoint:
            result["dice_by_precision"] = run_child("dice", args, checkpoint=args.dice_checkpoint,
                                                    input=args.dice_images, masks=args.dice_masks,
                                                    out=work / "dice")
            log(f"Dice fp32 / int8: {result['dice_by_precision']['dice']}")
        result["load_average_at_end"] = os.getloadavg()  # other processes on the machine skew the seconds
        log(f"seed way {num_slices} slices: {seed['seconds']:.1f} s "
            f"(loop extrapolated from {seed['extrapolated_from']} slices), peak RSS {seed['peak_rss_mb']:.0f} MB")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def by_precision(args, checkpoint: Path, ct: Path, num_slices: int, work: Path) -> dict:
    """The same prediction forced to fp32, bf16 and int8 (int8: quantized once beforehand, timed apart)."""
    result = {"precision_auto": None}
    precisions = ["fp32", "bf16"] + (["int8"] if onnxruntime_available() and args.device != "cuda" else [])
    precisions = precisions[:1] if args.quick else precisions  # a smoke run: the mechanism, not the figures
    for precision in precisions:
        run = run_child("ours", args, precision, checkpoint=checkpoint, input=ct, out=work / f"out_{precision}")
        result[f"seconds_{num_slices}_{precision}"] = run["seconds"]
        log(f"ours, forced {precision}: {run['seconds']:.1f} s")
    forced = [value for key, value in result.items() if key.startswith("seconds_")]
    auto = run_child("ours", args, "auto", checkpoint=checkpoint, input=ct, out=work / "out_auto")
    result.update({"precision_auto": auto["precision"], f"seconds_{num_slices}_auto_cached": auto["seconds"],
                   "auto_fraction_of_best": min(forced) / auto["seconds"]})
    log(f"ours, auto again (calibration cached): {auto['seconds']:.1f} s, {auto['precision']}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=None, help="slice counts (default 200 600)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="128 x 128 x (20, 40): a smoke run")
    parser.add_argument("--size", type=int, default=None, help="in-plane voxels (default 512)")
    parser.add_argument("--seed-limit", type=int, default=None, help="seed-way slices actually run (default 20)")
    parser.add_argument("--model-seconds", type=float, default=None, help="model-only timing length")
    parser.add_argument("--dice-checkpoint", type=Path, help="a trained checkpoint (e.g. the demo's best.pt): "
                        "also report fp32 and int8 Dice on --dice-images / --dice-masks (full labels)")
    parser.add_argument("--dice-images", type=Path)
    parser.add_argument("--dice-masks", type=Path)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("ours", "seed", "model", "quantize", "dice"), help=argparse.SUPPRESS)
    for name in ("checkpoint", "input", "out", "masks"):
        parser.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.slices = args.slices or ([20, 40] if args.quick else [200, 600])
    args.size = args.size or (128 if args.quick else 512)
    args.seed_limit = args.seed_limit or (5 if args.quick else 20)
    args.model_seconds = args.model_seconds or (2.0 if args.quick else 15.0)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        child(arguments)
    else:
        print(json.dumps(main(arguments)))
