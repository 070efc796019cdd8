"""The partial-label study: does marginal + exclusion stop the model from learning to miss
organs a source leaves unannotated, and what does the exclusion term add?

Training data: three phantom sets of equal size, each in one source's label layout, with seeds
used nowhere else: ``pku`` (no spleen, no pancreas), ``abdomenct1k`` (only liver, kidney, spleen,
pancreas) and ``totalseg`` (TotalSegmentator-style superset labels: its colon includes the rectum,
its femur is the whole femur). Four arms, ONE configuration (``TRAIN`` below, fixed before any run;
the arms change only the partial-label switches of ``training.config.PARTIAL_LABEL_PRESETS``):

    seed_way       unannotated organs are background (the original project)
    marginal_only  the marginal loss alone (unannotated organs may hide under a 0 label)
    marginal       marginal + exclusion, the exclusion as published (Shi et al. 2021)
    full           every organ labelled on the same images (the upper bound), the seed's loss

each trained with every seed of ``TRAINING_SEEDS``. ``TRAIN``'s batch of 8 was chosen by
``benchmarks/partial_labels_tuning.py`` on the fully labelled arm and validation phantoms.
``best.pt`` is chosen on validation cases split from the training phantoms (per-case 3D Dice);
every arm is scored once, on fully labelled test phantoms
(``utils.phantom.TEST_SEEDS["partial_labels"]``) never looked at while choosing anything.

Reported: per organ and overall mean +- SD over seeds of the test-set Dice; a paired Wilcoxon
signed-rank test over test cases (each case's Dice averaged over seeds) of marginal against
seed_way and against marginal_only. Writes ``OUT/partial_labels.json`` and ``OUT/partial_labels.png``
(``--chart`` also copies the chart there, e.g. ``docs/partial_labels.png``); the last printed line
is one JSON object with one object per arm.

    python benchmarks/partial_labels.py [--out runs/partial_labels] [--chart docs/partial_labels.png] [--quick]

``--long`` asks whether the gap to fully labelled closes with training: the marginal and full
arms only (``--arms`` for more), the first study's configuration (``FIRST_TRAIN``, batch 16)
trained 1,600 steps instead of 600 (about 30 min per arm on a 2-core AMD EPYC), scored with a
paired test of marginal against full on test phantoms of its own
(``TEST_SEEDS["partial_labels_long"]``): its length was chosen after the first study's test
results had been seen. ``--arms`` names the arms to run (marginal always among them).

``OUT`` is claimed as abdoseg's output folder (``utils.output_folder``: a folder of the user's is
refused, exit 2). The report is rewritten after every finished run, and runs that it holds for
the same settings, configuration and test seed are reused, not trained again: a stopped study
resumes where it stopped, and a study can be extended an arm at a time. Phantoms, checkpoints and
predictions live in a ``work-*`` folder made inside ``OUT`` for this run and deleted after it
(``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import TrainConfig, with_partial_labels  # noqa: E402
from training.cpu import cpu_model_name  # noqa: E402
from training.error_bars import add_error_bars  # noqa: E402
from training.evaluate import evaluate_folders  # noqa: E402
from training.predict import predict_files  # noqa: E402
from training.train import fit  # noqa: E402
from training.visualization import dice_bar_chart, save_figure  # noqa: E402
from utils.augment import AugmentParams  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import json_safe, write_json  # noqa: E402
from utils.labels import EXAMPLE_PKU_MAP, ORGANS, get_source, scoreable_classes  # noqa: E402
from utils.output_folder import claim_output_folder  # noqa: E402
from utils.phantom import TEST_SEEDS, write_phantom_dataset  # noqa: E402
from utils.preprocess_data import PreprocessParams, preprocess_dataset  # noqa: E402
from utils.statistics import mean_sd, paired_wilcoxon  # noqa: E402

SOURCES = ("pku", "abdomenct1k", "totalseg")
LABEL_MAPS = {"pku": EXAMPLE_PKU_MAP}  # the phantom writes the example map's PKU ids
DATA_SEEDS = {"pku": 51, "abdomenct1k": 52, "totalseg": 53}  # this study's training phantoms only
TEST_SEED = TEST_SEEDS["partial_labels"]
TUNING_SEED = 91  # the first study's test phantoms, seen since: validation for partial_labels_tuning.py
ARMS = {"seed_way": ("partial", "seed_way"), "marginal_only": ("partial", "marginal_only"),
        "marginal": ("partial", "marginal"), "full": ("full", "seed_way")}  # (training labels, preset)
TRAINING_SEEDS = (0, 1, 2)
# every arm predicts in fp32: `auto` would pick int8 for a model whose int8 labels pass its gate and
# bf16 for one whose do not, so the arms would differ in inference as well as training
SETTINGS = {"cases_per_source": 8, "test_cases": 10, "phantom_size": 128, "phantom_slices": 48,
            "target_size": 128, "predict_precision": "fp32"}
# ONE configuration for every arm, fixed here before any run of this study and never changed
# after looking at its results: the demo's quarter-width U-Net and Dice + CE, a budget that fits
# 12 runs in under an hour on 2 CPU cores. Only the partial-label switches differ per arm.
# FIRST_TRAIN is the first study's (batch 16, 600 steps; test seed 91, results/partial_labels_cpu.json):
# its epochs were 20 until `--quick` estimated 69.5 min on a 2-core AMD EPYC; lowered to 15 before
# its first full run, on timing alone.
FIRST_TRAIN = TrainConfig(
    features=(16, 32, 64, 128), loss="dice_ce", epochs=15, steps_per_epoch=40, batch_size=16, lr=3e-3,
    scheduler="cosine", val_fraction=0.1, val_max_slices=32, num_workers=0, augment=AugmentParams(rotate_deg=8.0),
    exclusion="published", seed=0)
# TRAIN: the same images in batches of 8 (1,200 steps), chosen by benchmarks/partial_labels_tuning.py
# on the fully labelled arm alone (the seed's loss, not the method), scored on validation phantoms
# (seed 91, the first study's test set, since seen); the method's arms were not looked at. The
# study with it is scored on test phantoms never used before (TEST_SEEDS["partial_labels"] = 93).
TRAIN = FIRST_TRAIN.replace(batch_size=8, steps_per_epoch=80)
# --quick: the same model, slice size and batch (so its per-step time predicts the full run's),
# on few small phantoms, two seeds and 2 epochs of 4 steps (the second epoch's steps are timed)
QUICK_SETTINGS = {"cases_per_source": 2, "test_cases": 2, "phantom_size": 64, "phantom_slices": 12}
QUICK_TRAIN = {"epochs": 2, "steps_per_epoch": 4, "val_max_slices": 8}
QUICK_SEEDS = (0, 1)
# --long: the first configuration trained longer (1,600 steps instead of 600), chosen before any
# long run, after the first study left every arm still improving and marginal 0.14 below full
LONG_EPOCHS = 40
LONG_TRAIN = FIRST_TRAIN.replace(epochs=LONG_EPOCHS)
LONG_ARMS = ("marginal", "full")
# ... scored on test phantoms of their own: the length was chosen after the first study's
# test results (seed 91) had been seen, so those phantoms served as validation for this choice
LONG_TEST_SEED = TEST_SEEDS["partial_labels_long"]


def unannotated_organs() -> list[int]:
    """Organs that at least one training source does not label with certainty (left out, or
    part of a set-valued label)."""
    certain = []
    for name in SOURCES:
        source = get_source(name, LABEL_MAPS.get(name))
        scoreable = scoreable_classes(source.label_sets())
        certain.append({organ for organ in source.annotated if scoreable[organ]})
    return [organ for organ in range(1, len(ORGANS)) if not all(organ in c for c in certain)]


def make_data(root: Path, settings: dict, test_seed: int = TEST_SEED) -> dict[str, list[Path]]:
    """Phantoms (partial and full layouts of the same bodies) and the test set; returns the
    preprocessed training folders of each kind of labels."""
    shape = {"size": settings["phantom_size"], "num_slices": settings["phantom_slices"], "progress": False}
    params = PreprocessParams(target_size=(settings["target_size"],) * 2)
    folders = {"partial": [], "full": []}
    for source in SOURCES:
        for layout, kind in ((source, "partial"), ("full", "full")):
            raw, pre = root / "raw" / f"{source}_{layout}", root / "pre" / f"{source}_{layout}"
            write_phantom_dataset(raw, settings["cases_per_source"], layout, seed=DATA_SEEDS[source], **shape,
                                  overwrite=True)
            manifest = preprocess_dataset(layout, raw / "Image", raw / "Mask", pre, params,
                                          label_map=LABEL_MAPS.get(layout), progress=False, overwrite=True)
            if manifest["failed"]:
                raise RuntimeError(f"preprocessing {raw} failed: {manifest['failed']}")
            folders[kind].append(pre)
    write_phantom_dataset(root / "raw" / "test", settings["test_cases"], "full", seed=test_seed, **shape,
                          overwrite=True)
    return folders


def run_arm(arm: str, seed: int, cfg: TrainConfig, folders: dict, root: Path, precision: str = "fp32") -> dict:
    """Train one arm with one seed, predict the test phantoms with best.pt (in `precision`) and score them.

    Returns ``{"seed", "dice": {organ: mean over test cases}, "case_dice": {case: {organ: Dice}},
    "seconds_per_step" (the last epoch's, warm), "seconds": {"fit", "predict", "evaluate"}}``.
    """
    labels, preset = ARMS[arm]
    name = f"{arm}_seed{seed}"
    run, test = root / "runs" / name, root / "raw" / "test"
    started = time.perf_counter()
    last = fit(with_partial_labels(cfg.replace(seed=seed), preset), folders[labels], run, overwrite=True,
               progress=False)
    seconds = {"fit": round(time.perf_counter() - started, 2)}
    score = score_run(run, test, root, name, precision)
    return {"seed": seed, "dice": score["dice"], "case_dice": score["case_dice"],
            "seconds_per_step": cfg.batch_size / last["images_per_s"], "seconds": {**seconds, **score["seconds"]}}


def score_run(run: Path, test: Path, root: Path, name: str, precision: str = "fp32") -> dict:
    """Predict the test phantoms in `test` with `run`'s best.pt (in `precision`) into
    ``root/pred/name`` and score them in ``root/eval/name``.

    Returns ``{"dice": {organ: mean over test cases}, "case_dice": {case: {organ: Dice}},
    "seconds": {"predict", "evaluate"}}``.
    """
    best = run / "checkpoints" / "best.pt"  # absent only if no validation case had a scoreable organ
    started = time.perf_counter()
    predict_files(best if best.exists() else run / "checkpoints" / "last.pt", test / "Image", root / "pred" / name,
                  progress=False, precision=precision, overwrite=True)
    seconds, started = {"predict": time.perf_counter() - started}, time.perf_counter()
    summary = evaluate_folders(root / "pred" / name, test / "Mask", "full", root / "eval" / name, progress=False,
                               overwrite=True)
    seconds["evaluate"] = time.perf_counter() - started
    return {"dice": summary["dice"], "case_dice": read_case_dice(root / "eval" / name / "metrics.csv"),
            "seconds": {key: round(value, 2) for key, value in seconds.items()}}


def read_case_dice(metrics_csv: Path) -> dict[str, dict[str, float]]:
    """``{case: {organ: Dice}}`` from evaluate's ``metrics.csv`` (empty cells are NaN)."""
    result: dict[str, dict[str, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            value = float(row["dice"]) if row["dice"] not in ("", "nan") else math.nan
            result.setdefault(row["case"], {})[row["organ"]] = value
    return result


def organ_mean(dice: dict[str, float], organs: list[int]) -> float:
    """Mean over `organs` of the finite values of ``{organ name: Dice}``; NaN if none."""
    return mean_sd([dice.get(ORGANS[organ], math.nan) for organ in organs])["mean"]


def summarize_arm(runs: list[dict], organs: list[int]) -> dict:
    """Mean +- SD over seeds, overall (unannotated organs and all organs) and per organ."""
    unannotated = [organ_mean(run["dice"], organs) for run in runs]
    overall = [organ_mean(run["dice"], list(range(1, len(ORGANS)))) for run in runs]
    per_organ = {name: mean_sd([run["dice"].get(name, math.nan) for run in runs]) for name in ORGANS[1:]}
    return {"mean_dice_unannotated": mean_sd(unannotated)["mean"], "sd_dice_unannotated": mean_sd(unannotated)["sd"],
            "mean_dice": mean_sd(overall)["mean"], "sd_dice": mean_sd(overall)["sd"], "n_seeds": len(runs),
            "dice": {name: value["mean"] for name, value in per_organ.items()},
            "sd": {name: value["sd"] for name, value in per_organ.items()},
            "per_seed": [{"seed": run["seed"], "mean_dice_unannotated": value, "mean_dice": all_organs,
                          "seconds": round(sum(run["seconds"].values()), 1)} for run, value, all_organs in zip(runs, unannotated, overall)]}


def per_case_unannotated(runs: list[dict], organs: list[int]) -> dict[str, float]:
    """Each test case's Dice over the unannotated organs, averaged over seeds: the paired values."""
    cases = sorted(runs[0]["case_dice"])
    return {case: mean_sd([organ_mean(run["case_dice"][case], organs) for run in runs])["mean"] for case in cases}


def paired_tests(results: dict, organs: list[int]) -> dict:
    """Wilcoxon signed-rank over test cases of marginal against each other arm that ran
    (seed_way, marginal_only, full), and marginal's gap to full (full minus marginal, the mean
    over seeds of the unannotated-organ Dice) when full ran."""
    paired = {arm: per_case_unannotated(runs, organs) for arm, runs in results.items()}
    cases = sorted(paired["marginal"])
    tests = {}
    for other in ("seed_way", "marginal_only", "full"):
        if other not in paired:
            continue
        test = paired_wilcoxon([paired["marginal"][c] for c in cases], [paired[other][c] for c in cases])
        tests[f"p_value_vs_{other}"] = test["p_value"]
        tests[f"median_difference_vs_{other}"] = test["median_difference"]
        tests["n_test_cases"] = test["n"]
    if "full" in results:
        means = {arm: mean_sd([organ_mean(run["dice"], organs) for run in results[arm]])["mean"]
                 for arm in ("marginal", "full")}
        tests["gap_to_full"] = means["full"] - means["marginal"]
    return tests


def summarize_study(results: dict[str, list[dict]], organs: list[int]) -> dict:
    """``{arm: summarize_arm(...)}``, with marginal's paired tests added to its entry."""
    summaries = {arm: summarize_arm(runs, organs) for arm, runs in results.items()}
    summaries["marginal"].update(paired_tests(results, organs))
    return summaries


def study_chart(summaries: dict, title: str):
    """Test-set Dice per organ (in id order), one bar per arm, error bars = SD over seeds."""
    chart = dice_bar_chart({arm: summary["dice"] for arm, summary in summaries.items()}, title=title)
    add_error_bars(chart, [[summary["sd"][name] for name in ORGANS[1:]] for summary in summaries.values()])
    return chart


def finished_runs(report_path: Path, settings: dict, cfg: TrainConfig,
                  test_seed: int = TEST_SEED) -> dict[tuple[str, int], dict]:
    """``{(arm, seed): run}`` from an earlier report of this script with the same settings,
    training configuration and test seed; empty when there is none or anything differs."""
    if not report_path.exists():
        return {}
    report = json.loads(report_path.read_text())
    same = (report.get("settings") == settings and report.get("train") == json_safe(cfg.to_dict())
            and report.get("test_seed") == test_seed)
    if not same:
        print(f"{report_path}: other settings; its runs are not reused", flush=True)
        return {}
    return {(arm, run["seed"]): run for arm, runs in report.get("runs", {}).items() for run in runs}


def runs_by_arm(runs: dict[tuple[str, int], dict]) -> dict[str, list[dict]]:
    """``{(arm, seed): run}`` as the report stores it: ``{arm: [run, ...]}``, arms in ``ARMS`` order."""
    return {arm: [runs[key] for key in sorted(runs) if key[0] == arm] for arm in ARMS
            if any(key[0] == arm for key in runs)}


def estimate_minutes(results: dict, data_seconds: float, settings: dict, cfg: TrainConfig,
                     full_train: TrainConfig = TRAIN) -> float:
    """Minutes the full study should take here, from this run's timings: training steps at the
    measured (warm) seconds per step; the rest of each fit (validation, checkpoints) per
    validation slice; prediction and scoring per test slice; data per phantom voxel. Fixed
    costs are scaled too, so the estimate errs long."""
    runs = [run for arm_runs in results.values() for run in arm_runs]
    per_step = sorted(run["seconds_per_step"] for run in runs)[len(runs) // 2]
    steps = cfg.epochs * cfg.steps_per_epoch
    validation = sum(max(run["seconds"]["fit"] - steps * per_step, 0.0) for run in runs) / len(runs)
    testing = sum(run["seconds"]["predict"] + run["seconds"]["evaluate"] for run in runs) / len(runs)
    full = {**settings, **SETTINGS}

    def validation_slices(values: dict, train: TrainConfig) -> float:  # per run
        cases = max(round(3 * values["cases_per_source"] * train.val_fraction), 1)
        return train.epochs * (cases * values["phantom_slices"] + train.val_max_slices)

    def voxels(values: dict) -> float:
        return (6 * values["cases_per_source"] + values["test_cases"]) * values["phantom_size"] ** 2 * values["phantom_slices"]

    test_ratio = (full["test_cases"] * full["phantom_slices"]) / (settings["test_cases"] * settings["phantom_slices"])
    per_run = (full_train.epochs * full_train.steps_per_epoch * per_step
               + validation * validation_slices(full, full_train) / validation_slices(settings, cfg) + testing * test_ratio)
    seconds = len(results) * len(TRAINING_SEEDS) * per_run + data_seconds * voxels(full) / voxels(settings)
    return round(seconds / 60, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/partial_labels"))
    parser.add_argument("--chart", type=Path, help="also save the chart here (e.g. docs/partial_labels.png)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few small phantoms, 2 seeds, 8 steps")
    parser.add_argument("--long", action="store_true",
                        help="marginal and full only, the first configuration trained 1,600 steps: "
                             "does the gap to full close?")
    parser.add_argument("--arms", help="comma-separated arms to run, marginal among them "
                                       "(default: all four; with --long: marginal,full)")
    parser.add_argument("--keep", action="store_true", help="keep phantoms, runs and predictions (OUT/work-*)")
    args = parser.parse_args(argv)
    arms = tuple(args.arms.split(",")) if args.arms else LONG_ARMS if args.long else tuple(ARMS)
    if "marginal" not in arms or not set(arms) <= set(ARMS):
        parser.error(f"--arms {args.arms}: name arms of {', '.join(ARMS)}, marginal among them")
    # OUT is abdoseg's: new, empty or an earlier study's; a user's folder is refused
    with claimed_folders(parser, args.out, "partial-labels", ("partial_labels.json", "partial_labels.png"),
                         args.keep) as (out, work):
        headline = run_study(args, arms, work, out.path)
    print(json.dumps(json_safe(headline), allow_nan=False))
    return headline


@contextlib.contextmanager
def claimed_folders(parser: argparse.ArgumentParser, folder: Path, command: str, names: tuple[str, ...],
                    keep: bool = False, inputs: tuple[Path, ...] = ()):
    """Claim `folder` as `command`'s output (a user's folder: one line, exit 2) with `names` made
    replaceable up front, and yield ``(out, work)``: ``work`` a ``work-*`` folder made inside it
    for this run, deleted on the way out unless `keep` (then its path is printed)."""
    try:
        out = claim_output_folder(folder, command, inputs=inputs)
        for name in names:
            out.prepare(name, replace=True)  # refused now, not after an hour of training
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out.path))  # made here, so deleted here
    try:
        yield out, work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    out.close()
    if keep:
        print(f"kept: {work}", flush=True)


def run_study(args: argparse.Namespace, arms: tuple[str, ...], work: Path, out: Path) -> dict:
    """Train and score every (arm, seed) that ``out``'s report does not hold yet, in ``work``;
    write the report and chart to ``out``; returns the headline."""
    settings = {**SETTINGS, **(QUICK_SETTINGS if args.quick else {})}
    full_train = LONG_TRAIN if args.long else TRAIN
    cfg = full_train.replace(**(QUICK_TRAIN if args.quick else {}))
    seeds = QUICK_SEEDS if args.quick else TRAINING_SEEDS
    report = out / "partial_labels.json"
    test_seed = LONG_TEST_SEED if args.long else TEST_SEED
    finished = finished_runs(report, settings, cfg, test_seed)
    known = dict(finished)  # every finished run of this study, saved after each: a stopped study resumes
    started = time.perf_counter()
    folders = make_data(work, settings, test_seed)
    data_seconds = time.perf_counter() - started
    organs = unannotated_organs()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS if arm in arms}  # in ARMS order
    precision = settings["predict_precision"]
    for seed in seeds:
        for arm in results:
            reused = (arm, seed) in finished
            run = finished[arm, seed] if reused else run_arm(arm, seed, cfg, folders, work, precision)
            results[arm].append(run)
            if not reused:
                known[arm, seed] = run
                write_json(report, {"complete": False, "settings": settings, "train": cfg.to_dict(),
                                    "test_seed": test_seed, "runs": runs_by_arm(known)})
            print(f"{arm} seed {seed}: unannotated Dice {organ_mean(run['dice'], organs):.3f} "
                  f"({sum(run['seconds'].values()):.0f} s, {run['seconds_per_step']:.2f} s/step"
                  f"{', from the earlier report' if reused else ''})", flush=True)
        if seed == seeds[0] and not args.quick:
            print(f"estimated total: {estimate_minutes(results, data_seconds, settings, cfg, full_train):.0f} min",
                  flush=True)
    summaries = summarize_study(results, organs)
    steps = f", {cfg.epochs * cfg.steps_per_epoch} steps" if args.long else ""
    chart = study_chart(summaries, f"Test-set Dice, mean +- SD over {len(seeds)} seeds "
                                   f"({settings['test_cases']} test phantoms{steps})")
    save_figure(chart, out / "partial_labels.png")
    if args.chart:
        save_figure(chart, args.chart)
    headline = {**summaries, "cpu_model": cpu_model_name(), "unannotated_organs": [ORGANS[i] for i in organs],
                "training_seeds": list(seeds),
                "test_seed": test_seed, "test_cases": settings["test_cases"],
                "seconds": round(time.perf_counter() - started, 1), "quick": args.quick, "long": args.long,
                "reused_runs": sum((arm, run["seed"]) in finished for arm, runs in results.items() for run in runs),
                "estimated_full_minutes": estimate_minutes(results, data_seconds, settings, cfg, full_train)}
    write_json(report, {**headline, "settings": settings, "train": cfg.to_dict(), "runs": runs_by_arm(known)})
    return headline


if __name__ == "__main__":
    main()
