"""The default spine MRI run (no tuning), timed stage by stage, with its test Dice per class.

    python benchmarks/spine_default_run.py [--config configs/spine_mri.py] [--set KEY=VALUE ...] [--json FILE]

Runs `segmenter preload|train|predict|evaluate --config configs/spine_mri.py` as a user would (fresh
processes, --overwrite for preload), then prints and writes the wall-clock seconds of each stage and the
mean test Dice of disc and vertebra from evaluate/summary.json.
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

from segmenter import layout

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_default(config: str, overrides: list[str]) -> tuple[list[str], dict, Path]:
    """Run preload (--overwrite), train, predict and evaluate in fresh processes; (the --set arguments used,
    seconds per stage, the evaluate folder)."""
    sets = [item for override in overrides for item in ("--set", override)]
    # The default run trains with the config's own settings: tuning results, if any, are not used.
    sets += ["--set", "train.use_tuned_hyperparameters=False"]
    seconds = {}
    for stage, extra in (("preload", ["--overwrite"]), ("train", []), ("predict", []), ("evaluate", [])):
        started = time.perf_counter()
        command = [sys.executable, "-m", f"stages.{stage}", "--config", config, *sets, *extra]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
        seconds[stage] = round(time.perf_counter() - started, 1)
        if result.returncode != 0:
            sys.exit(f"{stage} failed:\n{result.stderr[-3000:]}")
        print(f"{stage}: {seconds[stage]} s; {result.stdout.strip().splitlines()[-1]}", flush=True)
        if stage == "evaluate":
            evaluate_dir = Path(result.stdout.strip().splitlines()[-1]).parent
    return sets, seconds, evaluate_dir


def report_figures(figures: dict, json_path) -> None:
    """Print the figures and, when ``json_path`` is given, write them there as JSON."""
    print(json.dumps(figures, indent=2))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "spine_mri.py"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets, seconds, evaluate_dir = run_default(args.config, args.overrides)
    summary = json.loads((evaluate_dir / layout.SUMMARY).read_text())
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"segmenter preload|train|predict|evaluate --config {Path(args.config).name} {' '.join(sets)}",
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "n_test_images": summary["n_images"],
        "dice_mean": {name: stats["dice_mean"] for name, stats in summary["classes"].items()},
        "hd95_mean": {name: stats["hd95_mean"] for name, stats in summary["classes"].items()},
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()
