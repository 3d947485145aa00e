"""Prediction in bfloat16 against float32 on a trained experiment's test cases: Dice, changed voxels, time.

    python benchmarks/predict_precision.py --config configs/hippocampus_2d.py [--set KEY=VALUE ...] [--json FILE]

The experiment must be preloaded and trained (``benchmarks/hippocampus_2d_run.py``,
``benchmarks/spine_default_run.py``, or the stages by hand). For each of float32 and bfloat16 this runs, as a
user would and in fresh processes, ``segmenter predict --input <preloaded test images> --output <tmp folder>
--set predict.precision=<precision>`` and ``segmenter evaluate --truth <preloaded test labels> --pred <that
folder> --images <test images>``, then reports per class the mean Dice and HD95 of both, the largest change of
one case's Dice, and the share of labelled pixels or voxels (foreground in either prediction) whose label
changed; with the predict commands' wall-clock seconds (which include loading TensorFlow and the model).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segmenter import io, layout
from segmenter.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_default_run import report_figures  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def run(command: list[str]) -> float:
    """Run a segmenter stage in a fresh process; its wall-clock seconds (exit on failure)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:2])} failed:\n{result.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def changed_labels(first: Path, second: Path) -> dict:
    """Pixels (voxels) whose label differs between two folders of masks with the same names."""
    changed = labelled = 0
    for path in sorted(first.iterdir()):
        if path.is_dir() or path.name == layout.PREDICTIONS_RECORD:
            continue
        a, b = io.read_mask(path).array, io.read_mask(second / path.name).array
        changed += int((a != b).sum())
        labelled += int(((a > 0) | (b > 0)).sum())
    return {"changed": changed, "labelled_in_either": labelled, "changed_share_of_labelled": round(changed / labelled, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = load_config(Path(args.config), args.overrides)
    sets = [item for override in args.overrides for item in ("--set", override)]
    images, labels = layout.test_images_dir(config.preloaded_dir), layout.test_labels_dir(config.preloaded_dir)
    seconds, metrics = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        folders = {precision: Path(scratch) / precision for precision in PRECISIONS}
        for precision, folder in folders.items():
            seconds[precision] = run(["stages.predict", "--config", args.config, *sets, "--input", str(images),
                                      "--output", str(folder), "--set", f"predict.precision={precision}"])
            run(["stages.evaluate", "--truth", str(labels), "--pred", str(folder), "--images", str(images),
                 "--classes", ",".join(config.classes), "--out", str(Path(scratch) / f"evaluate_{precision}")])
            metrics[precision] = pd.read_csv(Path(scratch) / f"evaluate_{precision}" / layout.METRICS)
            print(f"{precision}: predict {seconds[precision]} s", flush=True)
        changes = changed_labels(folders["float32"], folders["bfloat16"])
    per_class = {}
    for name in config.classes[1:]:
        rows = {p: metrics[p][metrics[p]["class"] == name].set_index("image_id").sort_index() for p in PRECISIONS}
        per_class[name] = {
            **{f"dice_mean_{p}": round(float(rows[p].dice.mean()), 4) for p in PRECISIONS},
            **{f"hd95_mean_{p}": round(float(rows[p].hd95.mean()), 3) for p in PRECISIONS},
            "largest_case_dice_change": round(float(np.abs(rows["bfloat16"].dice - rows["float32"].dice).max()), 4)}
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"python benchmarks/predict_precision.py --config {args.config} {' '.join(sets)}".strip(),
        "experiment": config.experiment, "n_test_cases": int(metrics["float32"].image_id.nunique()),
        "predict_seconds": seconds, "classes": per_class, "labels": changes,
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()
