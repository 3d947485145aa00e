"""The 3D hippocampus configuration, scored per volume, beside the 2D configuration on the same split.

    python benchmarks/hippocampus_3d_run.py [--set KEY=VALUE ...] [--json FILE]

Runs `segmenter preload|train|predict|evaluate --config configs/hippocampus_3d.py` (see
spine_default_run.py) on ../shared/datasets/msd_hippocampus and prints and writes (as JSON):

- the time of each stage and in all (the issue's budget: 45 minutes on 2 CPU cores);
- the 3D plan preload made (target spacing, patch size, batch size, depth);
- the evaluate stage's figures: each test volume scored as a whole, in 3D, in mm;
- the test volume ids, and whether configs/hippocampus_2d.py splits the cases into the same test volumes
  (it must, for the comparison with its figures in benchmarks/results/hippocampus_2d_run.json to hold).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from segmenter import layout
from segmenter.config import load_config
from segmenter.manifest import read_manifest
from segmenter.preload.discovery import find_cases
from segmenter.preload.split import split_cases

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_default_run import REPO_ROOT, report_figures, run_default  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "hippocampus_3d.py"
CONFIG_2D = REPO_ROOT / "configs" / "hippocampus_2d.py"


def test_ids_of(config_path: Path, overrides: list[str]) -> list[str]:
    """The test case ids ``config_path`` splits the dataset into (no data is read but the file names)."""
    config = load_config(config_path, overrides=overrides)
    return sorted(case.case_id for case in split_cases(find_cases(config, log=lambda *_: None), config,
                                                     log=lambda *_: None).test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets, seconds, evaluate_dir = run_default(str(CONFIG), args.overrides)
    summary = json.loads((evaluate_dir / layout.SUMMARY).read_text())
    config = load_config(CONFIG, overrides=args.overrides)
    manifest = read_manifest(config.preloaded_dir)
    test_ids = sorted(case.id for case in manifest.test.cases)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"segmenter preload|train|predict|evaluate --config configs/{CONFIG.name} {' '.join(sets)}",
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "plan": manifest.plan.model_dump(mode="json"),
        "per_volume": {"n_volumes": summary["n_images"], "distance_unit": summary["distance_unit"],
                       **{name: {key: stats[key] for key in ("dice_mean", "dice_mean_ci95", "hd95_mean", "assd_mean")}
                          for name, stats in summary["classes"].items()}},
        "test_ids": test_ids,
        "same_test_volumes_as_2d": test_ids == test_ids_of(CONFIG_2D, []),
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()
