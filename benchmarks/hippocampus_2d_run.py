"""The 2D hippocampus configuration scored per volume, beside the per-slice figure it replaces.

    python benchmarks/hippocampus_2d_run.py [--set KEY=VALUE ...] [--json FILE]

Runs `segmenter preload|train|predict|evaluate --config configs/hippocampus_2d.py` (see
spine_default_run.py) on ../shared/datasets/msd_hippocampus, then prints and writes:

- the evaluate stage's figures: each test volume scored as a whole, in 3D, in mm (``n_images`` volumes);
- whether `segmenter evaluate --truth --pred --images` on the same folders gives the same rows (it must:
  one evaluation path);
- the figure segmenter reported before cases became the unit, recomputed from the same predictions: each
  axial slice scored on its own in 2D, only the slices whose true mask shows some hippocampus (the test
  split was filtered by its labels), the mean taken over slices. Slices where a class is absent and not
  predicted count as Dice 1 there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from segmenter import layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_default_run import REPO_ROOT, report_figures, run_default  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "hippocampus_2d.py"


def per_slice_dice(truth_dir: Path, pred_dir: Path, classes: list[str], axis: int) -> dict:
    """Mean Dice over the axial slices that show foreground in the truth, as the slice-based evaluation did."""
    scores: dict[str, list[float]] = {name: [] for name in classes[1:]}
    for truth_path in sorted(truth_dir.glob("*.nii.gz")):
        truth = np.asarray(nib.load(truth_path).dataobj)
        pred = np.asarray(nib.load(pred_dir / truth_path.name).dataobj)
        for index in range(truth.shape[axis]):
            true_slice, pred_slice = np.take(truth, index, axis=axis), np.take(pred, index, axis=axis)
            if not true_slice.any():
                continue  # the old test split dropped slices without hippocampus
            for class_id, name in enumerate(classes[1:], start=1):
                t, p = true_slice == class_id, pred_slice == class_id
                total = t.sum() + p.sum()
                scores[name].append(1.0 if total == 0 else 2.0 * (t & p).sum() / total)
    return {name: {"dice_mean": float(np.mean(values)), "n_slices": len(values)} for name, values in scores.items()}


def folder_mode_matches(evaluate_dir: Path, truth_dir: Path, pred_dir: Path, images_dir: Path, classes: list[str],
                        out_dir: Path) -> bool:
    """Run the folder evaluation on the experiment's folders; True when its metrics.csv equals the experiment's."""
    import pandas as pd

    command = [sys.executable, "-m", "stages.evaluate", "--truth", str(truth_dir), "--pred", str(pred_dir),
               "--images", str(images_dir), "--classes", ",".join(classes), "--out", str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"folder evaluation failed:\n{result.stderr[-3000:]}")
    return pd.read_csv(out_dir / layout.METRICS).equals(pd.read_csv(evaluate_dir / layout.METRICS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets, seconds, evaluate_dir = run_default(str(CONFIG), args.overrides)
    summary = json.loads((evaluate_dir / layout.SUMMARY).read_text())
    pairs = json.loads((evaluate_dir / layout.PAIRS).read_text())
    truth_dir = Path(next(iter(pairs["matched"].values()))[0]).parent
    pred_dir = Path(next(iter(pairs["matched"].values()))[1]).parent
    classes = ["background", *summary["classes"]]
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"segmenter preload|train|predict|evaluate --config configs/{CONFIG.name} {' '.join(sets)}",
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "per_volume": {"n_volumes": summary["n_images"], "distance_unit": summary["distance_unit"],
                       **{name: {key: stats[key] for key in ("dice_mean", "dice_mean_ci95", "hd95_mean", "assd_mean")}
                          for name, stats in summary["classes"].items()}},
        "per_slice_as_before": per_slice_dice(truth_dir, pred_dir, classes, axis=2),
        "folder_mode_gives_the_same_rows": folder_mode_matches(
            evaluate_dir, truth_dir, pred_dir, truth_dir.parent / layout.TEST_IMAGES, classes,
            evaluate_dir.parent / "evaluate_as_folders"),
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()
