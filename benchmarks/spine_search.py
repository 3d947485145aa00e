"""Does the search find a better spine model than the defaults? Validation and test figures, both ways.

    python benchmarks/spine_search.py [--minutes 20] [--json FILE]

1. Scores the default configuration (configs/spine_mri.py's train settings) on the search's validation
   split: trained on the search-train part for tune.max_epochs epochs, as a trial is.
2. Runs `segmenter tune` on the same split for at most --minutes (experiment "spine_mri_search").
3. Trains the final model from the best hyperparameters with the default run's time budget, predicts and
   evaluates the test slices, and compares with the default run's test Dice
   (experiments/spine_mri/evaluate from benchmarks/spine_default_run.py, run first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_default_run import report_figures  # noqa: E402

from segmenter import layout

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "spine_mri.py"


def run(stage: str, *args: str) -> str:
    command = [sys.executable, "-m", f"stages.{stage}", "--config", str(CONFIG), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{stage} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def default_validation_dice(config) -> float:
    """Validation mean foreground Dice of the default settings, trained like one search trial."""
    import keras

    from segmenter.data_pipeline import make_dataset
    from segmenter.training import build_compiled_model
    from segmenter.tuning import validation_indices

    keras.utils.set_random_seed(config.seed)
    train_indices, val_indices = validation_indices(config)
    settings = config.train
    train_data, _ = make_dataset(config.preloaded_dir, "train", config.num_classes, settings.batch_size,
                                 augmentation=settings.augmentation, shuffle=True, seed=config.seed,
                                 subset=train_indices)
    val_data, _ = make_dataset(config.preloaded_dir, "train", config.num_classes, settings.batch_size,
                               subset=val_indices)
    model = build_compiled_model(settings, (*config.preload.image_size, 1), config.classes)
    history = model.fit(train_data, validation_data=val_data, epochs=config.tune.max_epochs, shuffle=False,
                        verbose=0)
    # A trial's score is its best epoch (keras-tuner keeps the best), so the default gets the same.
    return float(max(history.history["val_mean_foreground_dice"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from segmenter.config import load_config

    experiment = ["--set", "experiment=spine_mri_search"]
    run("preload", *experiment)
    config = load_config(CONFIG, ["experiment=spine_mri_search"])
    started = time.perf_counter()
    default_val = default_validation_dice(config)
    default_seconds = time.perf_counter() - started
    print(f"default configuration: validation mean foreground Dice {default_val:.4f} ({default_seconds:.0f} s)",
          flush=True)

    started = time.perf_counter()
    run("tune", *experiment, "--overwrite", "--set", f"tune.time_budget_minutes={args.minutes}")
    search_seconds = time.perf_counter() - started
    best = json.loads((config.stage_dir("tune") / layout.BEST_HYPERPARAMETERS).read_text())
    print(f"search: best validation mean foreground Dice {best['score']:.4f} in {search_seconds:.0f} s "
          f"with {best['values']}", flush=True)

    run("train", *experiment)
    run("predict", *experiment)
    run("evaluate", *experiment)
    tuned = json.loads((config.stage_dir("evaluate") / layout.SUMMARY).read_text())
    default_summary_path = REPO_ROOT / "experiments" / "spine_mri" / "evaluate" / layout.SUMMARY
    default = json.loads(default_summary_path.read_text()) if default_summary_path.is_file() else None
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"python benchmarks/spine_search.py --minutes {args.minutes}",
        "validation_mean_foreground_dice": {"default": default_val, "best_trial": best["score"]},
        "best_hyperparameters": best["values"],
        "search_seconds": round(search_seconds, 1),
        "test_dice_mean": {
            "tuned": {name: stats["dice_mean"] for name, stats in tuned["classes"].items()},
            "default": ({name: stats["dice_mean"] for name, stats in default["classes"].items()}
                        if default else None),
        },
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()
