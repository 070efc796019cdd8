"""``make demo``: the whole pipeline on the built-in phantom, sized for a laptop CPU.

Two partially labelled training sets (the ``pku`` layout without spleen and pancreas, the
``abdomenct1k`` layout with only liver, kidney, spleen and pancreas), trained together with the
partial-label losses (best.pt chosen on validation cases split from the training phantoms), then
fully labelled test phantoms (``utils.phantom.TEST_SEEDS``, never looked at while choosing the
settings) predicted to NIfTI and scored.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from training.config import TrainConfig
from utils.augment import AugmentParams
from training.evaluate import evaluate_folders
from training.predict import predict_files
from training.train import fit
from training.visualization import slice_grid
from utils.labels import EXAMPLE_PKU_MAP, ORGANS
from utils.phantom import PHANTOM_SEEDS, TEST_SEEDS, write_phantom_dataset
from utils.preprocess_data import PreprocessParams, preprocess_dataset
from utils.volume_io import load_ct, load_mask
from utils.case_files import case_id_from_path, nifti_files
from utils.output_folder import claim_output_folder

# Settings of the demo itself; the model's are in TRAIN below. `--set key=value` changes either.
DEMO = {
    "cases_per_source": 8,     # training phantoms per partial layout
    "heldout_cases": 3,        # fully labelled test phantoms, never seen in training or tuning
    "phantom_size": 128,       # in-plane voxels (the 512 phantom's field of view at ~3 mm/pixel)
    "phantom_slices": 48,
    "target_size": 128,        # preprocessed slice size
    "workers": 2,
}
# A quarter-width U-Net with Dice + boundary-weighted CE and the partial-label losses, sized to
# train in minutes on a laptop CPU (the seed's weighted CE alone learned more slowly in our runs:
# see the README). 1,600 steps of 8 slices, no augmentation (the phantoms come from one generator;
# keep it on for real data, the TrainConfig default). Chosen among three cheaper configurations
# on a 2-core AMD EPYC by time and by Dice on 6 validation phantoms (PHANTOM_SEEDS["full"]); every
# number of that choice is in benchmarks/results/amd_epyc.json ("demo_configurations"). Narrower
# widths (12, 24, ...) ran no faster.
TRAIN = TrainConfig(
    features=(16, 32, 64, 128), loss="dice_ce", epochs=20, batch_size=8, lr=3e-3,
    scheduler="cosine", marginal=True, exclusion_weight=1.0, steps_per_epoch=80,
    val_fraction=0.15, val_max_slices=32, num_workers=0, augment=AugmentParams(enabled=False), seed=0,
)
QUICK = {"cases_per_source": 2, "heldout_cases": 1, "phantom_size": 96, "phantom_slices": 16,
         "target_size": 64, "features": [4, 8], "epochs": 1, "steps_per_epoch": 2, "batch_size": 4,
         "val_max_slices": 8}


def demo_settings(quick: bool = False, overrides: dict | None = None) -> tuple[dict, TrainConfig]:
    """The demo's own settings and training config, after `quick` and `overrides`."""
    changes = {**(QUICK if quick else {}), **(overrides or {})}
    demo = {**DEMO, **{k: v for k, v in changes.items() if k in DEMO}}
    cfg = TRAIN.replace(**{k: v for k, v in changes.items() if k not in DEMO})
    return demo, cfg


@contextmanager
def timed(seconds: dict, stage: str):
    started = time.perf_counter()
    print(f"[{stage}] ...", flush=True)
    yield
    seconds[stage] = round(time.perf_counter() - started, 1)
    print(f"[{stage}] done in {seconds[stage]:.1f} s", flush=True)


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, overrides: dict | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Run phantom -> preprocess -> train -> predict -> evaluate; returns the summary dict.

    `out_dir` is claimed as a ``demo`` output folder (``utils.output_folder``), each step's
    folder inside it by that step; rerunning into it needs `overwrite` (finished phantom cases
    with the same settings are kept).
    """
    demo, cfg = demo_settings(quick, overrides)
    folder = claim_output_folder(out_dir, "demo", overwrite=overwrite)
    for name in ("summary.json", "example_slices.png"):
        folder.prepare(name)  # refused now, not after training, when an earlier demo is there
    out = folder.path
    seconds: dict[str, float] = {}
    raw, pre = out / "raw", out / "preprocessed"
    params = PreprocessParams(target_size=(demo["target_size"],) * 2)
    shape = {"size": demo["phantom_size"], "num_slices": demo["phantom_slices"], "workers": demo["workers"]}
    steps = {"overwrite": overwrite, "progress": progress}  # every step's own folder and progress bars
    with timed(seconds, "phantom"):
        for source in ("pku", "abdomenct1k"):
            write_phantom_dataset(raw / source, demo["cases_per_source"], source, PHANTOM_SEEDS[source],
                                  **shape, **steps)
        write_phantom_dataset(raw / "test", demo["heldout_cases"], "full", TEST_SEEDS["demo"], **shape, **steps)
    with timed(seconds, "preprocess"):
        for source in ("pku", "abdomenct1k"):
            preprocess_dataset(source, raw / source / "Image", raw / source / "Mask", pre / source, params,
                               label_map=EXAMPLE_PKU_MAP if source == "pku" else None, workers=demo["workers"], **steps)
    with timed(seconds, "train"):
        fit(cfg, [pre / "pku", pre / "abdomenct1k"], out / "run", **steps)
    with timed(seconds, "predict"):
        best = out / "run" / "checkpoints" / "best.pt"
        predict_files(best if best.exists() else best.with_name("last.pt"), raw / "test" / "Image",
                      out / "predictions", device=cfg.device, **steps)
    with timed(seconds, "evaluate"):
        metrics = evaluate_folders(out / "predictions", raw / "test" / "Mask", "full", out / "evaluation", **steps)
    with timed(seconds, "pictures"):
        picture = draw_example(raw / "test", out / "predictions", out / "example_slices.png")
    summary = {
        "mean_dice": metrics["mean_dice"],
        "dice": {organ: metrics["dice"].get(organ) for organ in ORGANS[1:]},
        "hd95_mm": {organ: metrics["hd95_mm"].get(organ) for organ in ORGANS[1:]},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        "settings": {**demo, "test_seed": TEST_SEEDS["demo"], "train": cfg.to_dict()},
    }
    folder.write_json("summary.json", summary)  # strict JSON: a NaN Dice is null
    folder.close()
    print_outputs(out, summary, picture)
    return summary


def draw_example(test_dir: Path, predictions: Path, path: Path) -> Path:
    """A grid of axial slices of the first test case: CT, prediction fill, truth contour."""
    image_path = nifti_files(test_dir / "Image", "test images")[0]
    case = case_id_from_path(image_path)
    volume = load_ct(image_path)
    truth = load_mask(test_dir / "Mask" / f"{case}.nii.gz", volume)
    predicted = load_mask(predictions / f"{case}.nii.gz", volume)
    slice_grid(volume.data, predicted, truth, num_slices=8, path=path)
    return path


def print_outputs(out: Path, summary: dict, picture: Path) -> None:
    print(f"\nmean test-set 3D Dice over 11 organs: {summary['mean_dice']:.3f} "
          f"(total {summary['seconds']['total']:.0f} s)")
    for organ, value in summary["dice"].items():
        print(f"  {organ:<16} Dice {value:.3f}  HD95 {summary['hd95_mm'][organ]:.1f} mm")
    print(f"""
Outputs in {out}/:
  summary.json                       the numbers above
  example_slices.png                 test slices: prediction fill, ground-truth contour
  evaluation/dice_per_organ.png      per-organ Dice chart; evaluation/metrics.csv per case and organ
  run/curves.png, run/log.csv        training curves and per-epoch log
  predictions/*.nii.gz               predicted label volumes; open one in ITK-SNAP or 3D Slicer over
                                     raw/test/Image/<case>_0000.nii.gz (labels: predictions/labels.txt)
  run/checkpoints/best.pt            the model; predict more CTs with
      python -m training predict --checkpoint {out}/run/checkpoints/best.pt --input CT.nii.gz --out DIR
In a notebook: notebooks/04_predict_and_visualize.ipynb shows the slice viewer.""")
