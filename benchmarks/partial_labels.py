"""Partial labels against a known truth: does the marginal + exclusion loss stop the model from
learning to miss organs that one source leaves unannotated?

Two phantom training sets of equal size, one in the ``pku`` layout (no spleen, no pancreas) and
one in the ``abdomenct1k`` layout (only liver, kidney, spleen, pancreas). The same model, budget
and seed trained three ways:

    seed_way  unannotated organs are background (the original project)
    marginal  marginal + exclusion losses (Shi et al. 2021)
    full      every organ labelled on the same images (the upper bound)

all scored on the same fully labelled held-out phantoms. Writes ``OUT/partial_labels.json`` and
``OUT/partial_labels.png``; the last printed line is one JSON object.

    python benchmarks/partial_labels.py [--out runs/partial_labels] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import TrainConfig, with_partial_labels  # noqa: E402
from training.demo import DEMO, TRAIN as DEMO_TRAIN  # noqa: E402
from training.evaluate import boldness_report, evaluate_folders  # noqa: E402
from training.predict import predict_files  # noqa: E402
from training.train import fit  # noqa: E402
from training.visualization import dice_bar_chart  # noqa: E402
from utils.labels import EXAMPLE_PKU_MAP, ORGANS, get_source  # noqa: E402
from utils.phantom import write_phantom_dataset  # noqa: E402
from utils.preprocess_data import PreprocessParams, preprocess_dataset  # noqa: E402

SOURCES = ("pku", "abdomenct1k")
LABEL_MAPS = {"pku": EXAMPLE_PKU_MAP}  # the phantom writes the example map's PKU ids
METHODS = {"seed_way": "seed_way", "marginal": "marginal", "full": "seed_way"}  # PARTIAL_LABEL_PRESETS
# the demo's phantoms, model and loss (training/demo.py), with a budget that fits three runs
# in 25 minutes on a 2-core CPU; each method sets its own partial-label switches
SETTINGS = {**DEMO, "heldout_cases": 4}
TRAIN = with_partial_labels(DEMO_TRAIN.replace(epochs=30), "seed_way")
QUICK_SETTINGS = {"cases_per_source": 2, "heldout_cases": 1, "phantom_size": 64, "phantom_slices": 12,
                  "target_size": 32}
QUICK_TRAIN = {"features": [4, 8], "epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "val_max_slices": 4}


def unannotated_organs() -> list[int]:
    """Organs that at least one of the two sources leaves unannotated."""
    annotated = [get_source(name, LABEL_MAPS.get(name)).annotated for name in SOURCES]
    return [i for i in range(1, len(ORGANS)) if not all(i in a for a in annotated)]


def trained_by() -> dict[int, str]:
    """Which source's labels teach each organ in the partial setting."""
    labels = {name: get_source(name, LABEL_MAPS.get(name)).annotated for name in SOURCES}
    return {i: " + ".join(n for n in SOURCES if i in labels[n]) + (" only" if sum(i in a for a in labels.values()) == 1 else "")
            for i in range(1, len(ORGANS))}


def make_data(root: Path, settings: dict) -> dict[str, list[Path]]:
    """Phantoms and preprocessed folders; returns the training folders for each method."""
    shape = {"size": settings["phantom_size"], "num_slices": settings["phantom_slices"], "progress": False}
    params = PreprocessParams(target_size=(settings["target_size"],) * 2)
    folders = {"partial": [], "full": []}
    for seed, source in enumerate(SOURCES, start=11):
        for layout, kind in ((source, "partial"), ("full", "full")):
            raw = root / "raw" / f"{source}_{layout}"
            write_phantom_dataset(raw, settings["cases_per_source"], layout, seed=seed, **shape)
            preprocess_dataset(layout, raw / "Image", raw / "Mask", root / "pre" / f"{source}_{layout}",
                               params, label_map=LABEL_MAPS.get(layout), progress=False)
            folders[kind].append(root / "pre" / f"{source}_{layout}")
    write_phantom_dataset(root / "raw" / "heldout", settings["heldout_cases"], "full", seed=13, **shape)
    return {"seed_way": folders["partial"], "marginal": folders["partial"], "full": folders["full"]}


def run_method(name: str, cfg: TrainConfig, data: list[Path], root: Path) -> dict:
    """Train one way, predict and score the held-out phantoms."""
    run, heldout = root / "runs" / name, root / "raw" / "heldout"
    started = time.perf_counter()
    fit(with_partial_labels(cfg, METHODS[name]), data, run, overwrite=True, progress=False)
    predict_files(run / "checkpoints" / "last.pt", heldout / "Image", root / "pred" / name, progress=False)
    scores = evaluate_folders(root / "pred" / name, heldout / "Mask", "full", root / "eval" / name, progress=False)
    bold = boldness_report(root / "pred" / name, heldout / "Mask", trained_by())
    return {"dice": scores["dice"], "mean_dice": scores["mean_dice"], "boldness": bold,
            "seconds": round(time.perf_counter() - started, 1)}


def mean_over(values: dict, organs: list[int]) -> float:
    finite = [values[ORGANS[i]] for i in organs if values.get(ORGANS[i]) is not None
              and not math.isnan(values[ORGANS[i]])]
    return sum(finite) / len(finite) if finite else float("nan")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/partial_labels"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--keep", action="store_true", help="keep phantoms, runs and predictions")
    args = parser.parse_args(argv)
    settings = {**SETTINGS, **(QUICK_SETTINGS if args.quick else {})}
    cfg = TRAIN.replace(**(QUICK_TRAIN if args.quick else {}))
    work = args.out / "work"
    started = time.perf_counter()
    data = make_data(work, settings)
    results = {}
    for name in METHODS:
        results[name] = run_method(name, cfg, data[name], work)
        print(f"{name}: mean Dice {results[name]['mean_dice']:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    organs = unannotated_organs()
    unannotated = {name: mean_over(results[name]["dice"], organs) for name in METHODS}
    dice_bar_chart({name: results[name]["dice"] for name in METHODS}, path=args.out / "partial_labels.png",
                   title="Held-out Dice: seed's way vs marginal + exclusion vs fully labelled")
    headline = {
        "mean_dice_unannotated": unannotated,
        "gain_on_unannotated": unannotated["marginal"] - unannotated["seed_way"],
        "gap_to_full": unannotated["full"] - unannotated["marginal"],
        "mean_dice": {name: results[name]["mean_dice"] for name in METHODS},
        "unannotated_organs": [ORGANS[i] for i in organs],
        "seconds": round(time.perf_counter() - started, 1),
        "quick": args.quick,
    }
    report = {**headline, "settings": settings, "train": cfg.to_dict(), "methods": results}
    (args.out / "partial_labels.json").write_text(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
