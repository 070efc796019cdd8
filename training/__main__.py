"""The command line: ``abdoseg <command>`` (the same as ``python -m training <command>``). Each command parses, validates and calls
one library function. Bad input ends with one line naming the file and the problem and exit
code 2 (``--debug`` shows the traceback); Ctrl-C exits with 130 after saving what it can.
``--quiet`` (or the environment variable TQDM_DISABLE=1) silences progress bars.

    phantom     write synthetic abdominal CT cases (image + mask NIfTI)
    preprocess  NIfTI cases -> a preprocessed folder (manifest.json + arrays per case)
    train       train a U-Net on preprocessed folders
    predict     CT NIfTI or DICOM series -> labels (NIfTI, DICOM SEG, RT Structure Set)
    evaluate    per-organ, per-case metrics of predictions against ground truth
    demo        the whole pipeline on phantom data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from training import __version__
from training.cpu import prepare_openmp_environment
from utils.errors import UserError
from utils.files import write_text
from utils.labels import SOURCES
from utils.option_checks import check_positive, check_range, check_window


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default in ``--help`` (not for flags and
    options without a default, where "(default: None)" says nothing)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    prepare_openmp_environment()  # before torch loads: thread count and wait policy (training/cpu.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = one_line_warning
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as err:  # a user's mistake, a full disk, a permission: one line, exit 2
        if args.debug:
            raise
        print(f"error: {user_error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else is a bug in abdoseg: one line, the traceback saved
        if args.debug:
            raise
        saved = save_traceback(err)
        print(f"error: this is a bug in abdoseg ({type(err).__name__}: {first_line(err)}); "
              f"the traceback is in {saved} (rerun with --debug to print it)", file=sys.stderr)
        return 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_error_line(err: Exception) -> str:
    """One line for a UserError or an OSError (``FILE: permission denied``, not ``[Errno 13] ...``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror[0].lower()}{err.strerror[1:]}"
    return first_line(err)


def save_traceback(err: BaseException) -> Path | str:
    """Write the traceback to a new file under the user's cache (``$XDG_CACHE_HOME/abdoseg/``).

    Never into an output folder: it may be the folder abdoseg refused to write into. Returns
    the file, or a sentence when no file could be written.
    """
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "abdoseg"
    try:
        return write_text(cache / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt", text)
    except OSError as problem:
        return f"nowhere ({cache}: {problem.strerror or problem})"


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (an oblique scan, a file without orientation) as one line, like errors."""
    print(f"warning: {str(message).strip().splitlines()[0]}", file=sys.stderr)


def progress_wanted(args) -> bool:
    """False under ``--quiet`` or a true ``TQDM_DISABLE`` (tqdm's own variable; explicit
    ``disable=`` arguments would otherwise override it)."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return not (getattr(args, "quiet", False) or disabled)


def build_parser() -> argparse.ArgumentParser:
    called_as_module = Path(sys.argv[0]).name == "__main__.py"
    parser = argparse.ArgumentParser(prog="python -m training" if called_as_module else "abdoseg",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"abdoseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also: TQDM_DISABLE=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_options, run in (
        ("phantom", "write synthetic abdominal CT cases", add_phantom_options, run_phantom),
        ("preprocess", "NIfTI cases -> preprocessed folder", add_preprocess_options, run_preprocess),
        ("train", "train a U-Net", add_train_options, run_train),
        ("predict", "CT NIfTI or DICOM series -> labels", add_predict_options, run_predict),
        ("evaluate", "score predictions against ground truth", add_evaluate_options, run_evaluate),
        ("demo", "the whole pipeline on phantom data", add_demo_options, run_demo),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text, parents=[common],
                                      formatter_class=HelpFormatter)
        add_options(command)
        command.set_defaults(run=run)
    for command in commands.choices.values():  # --debug before or after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def add_phantom_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``phantom``."""
    parser.add_argument("-o", "--out", required=True, type=Path, help="folder for Image/ and Mask/")
    parser.add_argument("--cases", type=int, default=4, help="number of cases")
    parser.add_argument("--layout", choices=("abdomenct1k", "pku", "full", "totalseg"), default="full", help="label layout")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels (same field of view)")
    parser.add_argument("--slices", type=int, default=None, help="number of axial slices (None: by size)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier phantom run wrote")


def add_preprocess_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``preprocess``."""
    parser.add_argument("--source", required=True, choices=SOURCES, help="label convention of the masks")
    parser.add_argument("-i", "--images", required=True, type=Path, help="image folder (nnunet: the dataset folder)")
    parser.add_argument("--masks", type=Path, help="mask folder (not for nnunet)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="preprocessed folder to write")
    parser.add_argument("--label-map", type=Path, help="label-map JSON (pku; see examples/)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--size", type=int, default=256, help="target size N x N")
    parser.add_argument("--spacing", type=float, default=None, help="resample in-plane to MM per pixel (None: resize)")
    parser.add_argument("--min-clip", type=float, default=-400.0, help="HU window low end")
    parser.add_argument("--max-clip", type=float, default=400.0, help="HU window high end")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier preprocess run wrote")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``train``."""
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="preprocessed folder(s)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="run folder")
    parser.add_argument("--config", type=Path, help="JSON file of config fields")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config fields, e.g. epochs=5 features=[16,32,64,128]")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), help="Weights & Biases logging")


def add_predict_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``predict``."""
    parser.add_argument("-c", "--checkpoint", required=True, type=Path, help="a checkpoint from train (best.pt)")
    parser.add_argument("-i", "--input", required=True, type=Path,
                         help="a CT NIfTI, a folder of them, a DICOM series folder or a folder of series folders")
    parser.add_argument("-o", "--out", required=True, type=Path,
                         help="output folder, or a .nii.gz file name for a single input")
    parser.add_argument("--format", nargs="+", default=["nifti"], choices=("nifti", "dicom-seg", "rtstruct"),
                         help="outputs to write (several allowed); dicom-seg and rtstruct need DICOM input")
    parser.add_argument("--statistics", action="store_true",
                         help="write <case>_statistics.json: volume (ml), mean and SD of HU per organ")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per model call")
    parser.add_argument("--probabilities", action="store_true", help="also save class probabilities")
    parser.add_argument("--largest-component", action="store_true", help="keep each organ's largest component")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                         help="auto: the fastest on this CPU, measured once and cached; int8 (needs onnxruntime) "
                              "only for a model whose int8 labels agree with fp32's (training.quantize.int8_gate)")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier predict run wrote")


def add_evaluate_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``evaluate``."""
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label NIfTIs")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label NIfTIs")
    parser.add_argument("--source", required=True, choices=SOURCES, help="label convention of --gt")
    parser.add_argument("--label-map", type=Path, help="label-map JSON (pku)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="folder for metrics.csv, summary.json")
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance")
    parser.add_argument("--missing-as-miss", action="store_true",
                          help="score a ground-truth case without a prediction as a complete miss (else an error)")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier evaluate run wrote")


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo``."""
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/demo"), help="demo folder")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                      help="override demo settings")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier demo run wrote")


# Bounds on sizes, from the memory they imply (a clear error instead of allocating gigabytes).
MAX_PHANTOM_SIZE = 1024          # in-plane voxels of a phantom
MAX_PHANTOM_VOXELS = 2**28       # size * size * slices: about 4 GB of work arrays while drawing
MAX_SLICE_SIZE = 2048            # preprocess --size: a 2048 x 2048 slice batch is ~1 GB of float32
MIN_SPACING_MM = 0.25            # preprocess --spacing: 0.25 mm puts a 500 mm field of view on 2000 pixels


def check_phantom_options(args) -> None:
    """Range checks of ``phantom``'s options (UserError naming the option)."""
    check_positive(args.cases, "--cases", integer=True)
    check_range(args.cases, "--cases", 1, 999, integer=True)  # case ids hold the index in 3 digits
    check_range(args.seed, "--seed", 0, None, integer=True)
    check_range(args.size, "--size", 8, MAX_PHANTOM_SIZE, integer=True)
    if args.slices is not None:
        check_range(args.slices, "--slices", 2, MAX_PHANTOM_VOXELS // args.size**2, integer=True)
    check_positive(args.workers, "--workers", integer=True)


def run_phantom(args) -> int:
    from utils.phantom import write_phantom_dataset
    check_phantom_options(args)
    ids = write_phantom_dataset(args.out, args.cases, args.layout, seed=args.seed, size=args.size,
                                num_slices=args.slices, workers=args.workers, progress=progress_wanted(args),
                                overwrite=args.overwrite)
    print(f"wrote {len(ids)} {args.layout} cases to {args.out}/Image and {args.out}/Mask")
    return 0


def check_preprocess_options(args) -> None:
    """Range checks of ``preprocess``'s options (UserError naming the option)."""
    if args.source != "nnunet" and args.masks is None:
        raise UserError(f"is required for --source {args.source}", "--masks")
    check_positive(args.workers, "--workers", integer=True)
    check_range(args.size, "--size", 8, MAX_SLICE_SIZE, integer=True)
    if args.spacing is not None:
        check_range(args.spacing, "--spacing", MIN_SPACING_MM, None)
    check_window(args.min_clip, args.max_clip, "--min-clip/--max-clip")


def run_preprocess(args) -> int:
    from utils.preprocess_data import PreprocessParams, preprocess_dataset
    check_preprocess_options(args)
    params = PreprocessParams(args.min_clip, args.max_clip, (args.size, args.size), args.spacing)
    manifest = preprocess_dataset(args.source, args.images, args.masks, args.out, params,
                                  label_map=args.label_map, workers=args.workers,
                                  progress=progress_wanted(args), overwrite=args.overwrite)
    failed = manifest.get("failed", [])
    print(f"{len(manifest['cases'])} cases ready in {args.out}")
    for item in failed:
        print(f"failed: {item['error']}", file=sys.stderr)
    return 2 if failed else 0


def run_train(args) -> int:
    from training.config import TrainConfig, load_config
    from training.run_folder import load_resume_state
    from training.train import fit
    assignments = list(args.set) + ([f"wandb={args.wandb}"] if args.wandb else [])
    # a resumed run keeps its own config; --set may still change fields such as epochs
    base = TrainConfig.from_dict(load_resume_state(args.out)["config"]) if args.resume else None
    cfg = load_config(args.config, assignments, base=base)
    result = fit(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite,
                 progress=progress_wanted(args))
    written = [args.out / name for name in ("checkpoints/last.pt", "checkpoints/best.pt", "log.csv", "curves.png")]
    dice = result.get("val_mean_dice", float("nan"))
    print(f"done: {', '.join(str(path) for path in written if path.exists())}; last val Dice "
          f"{dice:.3f}" + ("" if (args.out / "checkpoints/best.pt").exists()
                           else " (no best.pt: no validation gave a finite Dice)"))
    return 0


def run_predict(args) -> int:
    from training.predict import predict_files
    check_positive(args.batch_size, "--batch-size", integer=True)
    summary = predict_files(args.checkpoint, args.input, args.out, device=args.device,
                            batch_size=args.batch_size, save_probabilities=args.probabilities,
                            largest_component=args.largest_component, progress=progress_wanted(args),
                            formats=args.format, statistics=args.statistics, precision=args.precision,
                            overwrite=args.overwrite)
    print(f"wrote {len(summary['written'])} label files to {args.out}")
    extras = ", ".join(f"{len(summary[key])} {what}" for key, what in
                       (("seg", "DICOM SEG"), ("rtstruct", "RT Structure Set"), ("statistics", "statistics JSON"))
                       if summary[key])
    if extras:
        print(f"wrote {extras} to {args.out}")
    for item in summary["failed"]:
        print(f"failed: {item['error']}", file=sys.stderr)
    return 2 if summary["failed"] else 0


def run_evaluate(args) -> int:
    from training.evaluate import evaluate_folders
    check_positive(args.tolerance_mm, "--tolerance-mm")
    summary = evaluate_folders(args.pred, args.gt, args.source, args.out, label_map=args.label_map,
                               tolerance_mm=args.tolerance_mm, progress=progress_wanted(args),
                               missing_as_miss=args.missing_as_miss, overwrite=args.overwrite)
    print(json.dumps({k: summary[k] for k in ("cases", "mean_dice") if k in summary}))
    print(f"wrote {args.out / 'metrics.csv'}, {args.out / 'summary.json'}, {args.out / 'dice_per_organ.png'}")
    for case in summary.get("missing_predictions", []):
        print(f"missing prediction: {case} (scored as a complete miss)", file=sys.stderr)
    for item in summary.get("failed", []):
        print(f"failed: {item.get('case')}: {item.get('error')}", file=sys.stderr)
    return 2 if summary.get("failed") else 0


def run_demo(args) -> int:
    from training.config import parse_set
    from training.demo import run_demo as demo
    demo(args.out, quick=args.quick, overrides=parse_set(args.set), overwrite=args.overwrite,
         progress=progress_wanted(args))
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun, skip the interpreter's teardown: gloo's threads can abort there
        # ("terminate called without an active exception") after all work is saved
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
