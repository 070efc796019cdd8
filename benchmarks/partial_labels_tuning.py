"""How the partial-label study's configuration was chosen, rerunnable: candidate changes to
the first configuration, each trained on the FULLY LABELLED arm only (the seed's loss, not the
method under test) for about the same number of images, and scored on validation phantoms
(``partial_labels.TUNING_SEED``), never on a test set.

The first study (``FIRST_TRAIN``: batch 16, 600 steps) left the fully labelled arm 0.74 on the
9 organs (one organ missed in some seeds) and every arm still improving; the study must fit in an
hour on 2 CPU cores, so the question is which use of the same time trains furthest. Prints one
JSON line ``{candidate: {"mean_dice_unannotated", "mean_dice", "dice", "seconds", ...}}`` and
writes it to ``OUT/partial_labels_tuning.json``.

    python benchmarks/partial_labels_tuning.py [--out runs/partial_labels_tuning] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import partial_labels as study  # noqa: E402
from benchmarks.partial_labels import claimed_folders  # noqa: E402
from training.cpu import cpu_model_name  # noqa: E402
from utils.files import json_safe, write_json  # noqa: E402

# (changes to FIRST_TRAIN, changes to the study's SETTINGS): about the same images each
CANDIDATES = {
    "batch16_600_steps": ({}, {}),                                      # the first configuration
    "lr_0.01": ({"lr": 0.01}, {}),
    "batch8_1200_steps": ({"batch_size": 8, "steps_per_epoch": 80}, {}),  # chosen: TRAIN
    "batch4_2400_steps": ({"batch_size": 4, "steps_per_epoch": 160}, {}),
    "slices96_1000_steps": ({"epochs": 25}, {"target_size": 96}),       # smaller slices, more steps
}
ARM, SEED = "full", 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/partial_labels_tuning"))
    parser.add_argument("--quick", action="store_true", help="smoke run: the study's --quick sizes")
    parser.add_argument("--keep", action="store_true", help="keep phantoms, runs and predictions (OUT/work-*)")
    args = parser.parse_args(argv)
    with claimed_folders(parser, args.out, "partial-labels-tuning", ("partial_labels_tuning.json",),
                         args.keep) as (out, work):
        results = {name: run_candidate(name, *changes, work, args.quick) for name, changes in CANDIDATES.items()}
        report = {"candidates": results, "cpu_model": cpu_model_name(), "arm": ARM, "training_seed": SEED,
                  "validation_seed": study.TUNING_SEED, "quick": args.quick}
        write_json(out.path / "partial_labels_tuning.json", report)
    print(json.dumps(json_safe(report), allow_nan=False))
    return report


def run_candidate(name: str, train_changes: dict, settings_changes: dict, work: Path, quick: bool) -> dict:
    """Train the fully labelled arm with FIRST_TRAIN changed by `train_changes` on phantoms made
    with `settings_changes`, and score it on the validation phantoms."""
    settings = {**study.SETTINGS, **(study.QUICK_SETTINGS if quick else {}), **settings_changes}
    cfg = study.FIRST_TRAIN.replace(**train_changes)
    if quick:  # 2 epochs of a tenth of the steps: the candidates' images stay about equal
        cfg = cfg.replace(epochs=2, steps_per_epoch=max(cfg.steps_per_epoch // 10, 1),
                          val_max_slices=study.QUICK_TRAIN["val_max_slices"])
    root = work / name  # each candidate's own phantoms (identical for equal settings; ~20 s each)
    started = time.perf_counter()
    folders = study.make_data(root, settings, study.TUNING_SEED)
    run = study.run_arm(ARM, SEED, cfg, folders, root, settings["predict_precision"])
    organs = study.unannotated_organs()
    print(f"{name}: validation Dice {study.organ_mean(run['dice'], organs):.3f} "
          f"({cfg.batch_size / run['seconds_per_step']:.0f} images/s)", flush=True)
    return {"mean_dice_unannotated": study.organ_mean(run["dice"], organs),
            "mean_dice": study.organ_mean(run["dice"], list(range(1, len(study.ORGANS)))),
            "dice": run["dice"], "steps": cfg.epochs * cfg.steps_per_epoch, "batch_size": cfg.batch_size,
            "train_changes": train_changes, "settings_changes": settings_changes,
            "seconds_per_step": run["seconds_per_step"], "seconds": run["seconds"],
            "seconds_total": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    main()
