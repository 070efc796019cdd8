"""Score the kept runs of a partial-label study again: on other test phantoms, or in another precision.

``partial_labels.py --keep`` keeps its work folder, which holds every run's checkpoints
(``runs/<arm>_seed<k>/checkpoints/best.pt``). This script predicts the fully labelled test
phantoms of ``--test-seed`` with each run's best.pt, without training anything, and reports as
the study does: per arm the mean +- SD over seeds, and the paired tests of marginal against the
other arms. The phantom size, slice count and number of test cases are read from the study's
report (``--report``, by default the ``partial_labels.json`` beside the work folder).

    python benchmarks/partial_labels.py --long --keep --out runs/pl_long       # prints "kept: .../work-..."
    python benchmarks/partial_labels_rescore.py runs/pl_long/work-... --test-seed 91 --out runs/pl_long_on_91

Writes ``OUT/partial_labels.json`` and ``OUT/partial_labels.png``; the last printed line is the
JSON headline. Scored with the study's own precision and test seed, it reproduces the study's
numbers exactly (a test checks this).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import partial_labels as study  # noqa: E402
from benchmarks.partial_labels import claimed_folders  # noqa: E402
from training.cpu import cpu_model_name  # noqa: E402
from training.visualization import save_figure  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import json_safe, write_json  # noqa: E402
from utils.phantom import write_phantom_dataset  # noqa: E402

RUN_NAME = re.compile(r"(?P<arm>[a-z_]+)_seed(?P<seed>\d+)")


def kept_runs(work: Path) -> dict[str, dict[int, Path]]:
    """``{arm: {seed: run folder}}`` of the study's runs in `work` that hold a checkpoint, arms in study order."""
    found: dict[str, dict[int, Path]] = {}
    for run in sorted((work / "runs").glob("*_seed*")):
        match = RUN_NAME.fullmatch(run.name)
        if match and match["arm"] in study.ARMS and any((run / "checkpoints" / f).exists()
                                                        for f in ("best.pt", "last.pt")):
            found.setdefault(match["arm"], {})[int(match["seed"])] = run
    return {arm: dict(sorted(found[arm].items())) for arm in study.ARMS if arm in found}


def check_inputs(work: Path, report_path: Path, test_seed: int) -> tuple[dict, dict[str, dict[int, Path]]]:
    """The study's settings and its kept runs, or a UserError naming what is wrong."""
    if not report_path.is_file():
        raise UserError(f"{report_path}: no study report there (name it with --report)")
    settings = json.loads(report_path.read_text()).get("settings")
    if not isinstance(settings, dict) or not {"phantom_size", "phantom_slices", "test_cases"} <= set(settings):
        raise UserError(f"{report_path}: not a partial_labels.py report (no phantom settings)")
    runs = kept_runs(work)
    if "marginal" not in runs:
        raise UserError(f"{work}: no kept marginal run (runs/marginal_seed<k>/checkpoints); "
                        "keep a study's work folder with partial_labels.py --keep")
    if test_seed in study.DATA_SEEDS.values():
        raise UserError(f"--test-seed {test_seed}: the study trains on phantoms of that seed")
    return settings, runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="a study's kept work folder (OUT/work-...)")
    parser.add_argument("--test-seed", type=int, default=study.TEST_SEED,
                        help=f"seed of the fully labelled test phantoms (default {study.TEST_SEED})")
    parser.add_argument("--precision", default=study.SETTINGS["predict_precision"],
                        choices=("fp32", "bf16", "int8", "auto"), help="prediction precision (default fp32)")
    parser.add_argument("--report", type=Path, help="the study's report (default: WORK/../partial_labels.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/partial_labels_rescore"))
    args = parser.parse_args(argv)
    try:
        settings, runs = check_inputs(args.work, args.report or args.work.parent / "partial_labels.json",
                                      args.test_seed)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    with claimed_folders(parser, args.out, "partial-labels-rescore", ("partial_labels.json", "partial_labels.png"),
                         inputs=(args.work,)) as (out, scratch):
        headline = rescore(runs, settings, args.test_seed, args.precision, scratch, out.path)
    print(json.dumps(json_safe(headline), allow_nan=False))
    return headline


def rescore(runs: dict[str, dict[int, Path]], settings: dict, test_seed: int, precision: str,
            scratch: Path, out: Path) -> dict:
    """Predict and score the test phantoms of `test_seed` with every run; write the report and chart."""
    started = time.perf_counter()
    test = scratch / "test"
    write_phantom_dataset(test, settings["test_cases"], "full", seed=test_seed, size=settings["phantom_size"],
                          num_slices=settings["phantom_slices"], progress=False)
    organs = study.unannotated_organs()
    results: dict[str, list[dict]] = {}
    for arm, seeds in runs.items():
        for seed, run in seeds.items():
            score = study.score_run(run, test, scratch, run.name, precision)
            results.setdefault(arm, []).append({"seed": seed, **score})
            print(f"{arm} seed {seed}: unannotated Dice {study.organ_mean(score['dice'], organs):.3f}", flush=True)
    summaries = study.summarize_study(results, organs)
    seeds = sorted({run["seed"] for arm_runs in results.values() for run in arm_runs})
    chart = study.study_chart(summaries, f"Test-set Dice, mean +- SD over {len(seeds)} seeds "
                                         f"({settings['test_cases']} test phantoms, seed {test_seed}, {precision})")
    save_figure(chart, out / "partial_labels.png")
    headline = {**summaries, "cpu_model": cpu_model_name(), "unannotated_organs": [study.ORGANS[i] for i in organs],
                "training_seeds": seeds, "test_seed": test_seed, "test_cases": settings["test_cases"],
                "precision": precision, "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "partial_labels.json", {**headline, "settings": settings, "runs": results})
    return headline


if __name__ == "__main__":
    main()
