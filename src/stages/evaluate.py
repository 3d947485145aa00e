"""Evaluate: Dice, IoU, Hausdorff, HD95, ASSD, NSD and clinical measures per test case and class.

Three modes:

  segmenter evaluate [--config FILE]
      an experiment: the folder evaluation (below) of the preloaded test cases' label maps (test/labels, with
      test/images) against experiments/<experiment>/predict/test/; writes experiments/<experiment>/evaluate/
      (metrics.csv, summary.json, pairs.json, figures/, report.html). Volumes are scored whole, in 3D.
  segmenter evaluate --truth DIR --pred DIR --out DIR [--classes background,liver] [--spacing 0.8,0.8]
                     [--images DIR [--window=-200,200]] [--hd95 max_directed|pooled]
      any two folders of masks (PNG, NPY, CSV, NIfTI, DICOM), paired by file name without the suffix;
      spacing from NIfTI/DICOM headers, else --spacing, else pixels. With --images (same names), the
      mean intensity inside each mask (HU for CT) and figures drawn on the image in --window.
      Writes the same files into --out.
  segmenter evaluate --compare RUN_DIR RUN_DIR [...] [--out DIR]
      two or more runs (folders with metrics.csv and summary.json): per-class means side by side,
      paired plots of per-image Dice and Wilcoxon signed-rank tests; writes comparison.csv,
      comparison.json, figures/ and report.html into --out (default ./comparison).

  segmenter evaluate --follow [--interval SECONDS] [--once]
      beside a running `segmenter train` (with train.validation_fraction): scores each new checkpoint on the
      validation cases, keeps the best; writes experiments/<experiment>/follow/ (see segmenter.evaluation.follow).

The last line printed is the report's path. The folder and compare modes need no config.
"""
import argparse
from pathlib import Path

from segmenter import cli


def _names(text: str) -> list:
    names = [name.strip() for name in text.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected two or more distinct comma-separated class names, "
                                         f"background first, e.g. background,liver; got {text!r}")
    return names


def _spacing(text: str) -> tuple:
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or not all(0 < value < float("inf") for value in values):
        raise argparse.ArgumentTypeError(f"expected 2 or 3 positive comma-separated millimetres per axis, "
                                         f"e.g. 0.8,0.8; got {text!r}")
    return values


def _window(text: str) -> tuple:
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        low = high = float("nan")
    if not (low < high and abs(low) < float("inf") and abs(high) < float("inf")):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW < HIGH, e.g. -200,200; got {text!r}")
    return low, high


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a distance >= 0, got {text!r}")
    return value


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog, stage="evaluate")
    folders = parser.add_argument_group("two folders of masks (no --config)")
    folders.add_argument("--truth", type=Path, metavar="DIR", help="folder of true masks")
    folders.add_argument("--pred", type=Path, metavar="DIR", help="folder of predicted masks, same file names")
    folders.add_argument("--classes", type=_names, metavar="NAMES",
                         help="class names, background first (default: background,class_1,... to the largest label)")
    folders.add_argument("--spacing", type=_spacing, metavar="MM,MM",
                         help="pixel spacing in mm per axis for files without one in their header (PNG, NPY, CSV)")
    folders.add_argument("--images", type=Path, metavar="DIR",
                         help="folder of the images, same names as the masks: mean intensity inside each mask "
                              "(HU for CT) and figures on the image; masks are scored on the image's grid")
    folders.add_argument("--window", type=_window, metavar="LOW,HIGH",
                         help="display window of the figures' images, e.g. --window=-200,200 for CT in HU (with "
                              "'=': the value starts with a minus); default: each image's 1st-99th percentile")
    folders.add_argument("--nsd-tolerance", type=_tolerance, default=2.0, metavar="DISTANCE",
                         help="normalised surface Dice tolerance, mm (pixels without spacing); default 2")
    folders.add_argument("--hd95", choices=["max_directed", "pooled"], default=None,
                         help="HD95 as the larger of the two directed 95th percentiles (default; MONAI, DeepMind's "
                              "surface-distance) or the percentile of both directions pooled (medpy)")
    compare = parser.add_argument_group("comparing runs (no --config)")
    compare.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR",
                         help="two or more folders holding metrics.csv and summary.json")
    follow = parser.add_argument_group("following a training run (experiment mode)")
    follow.add_argument("--follow", action="store_true",
                        help="score each new checkpoint of the running training on its validation cases and keep "
                             "the best, until the training ends; writes experiments/<experiment>/follow/")
    follow.add_argument("--interval", type=_tolerance, default=30.0, metavar="SECONDS",
                        help="with --follow: seconds between looks for a new checkpoint (default 30)")
    follow.add_argument("--once", action="store_true", help="with --follow: score what is there and return")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder of the --truth/--pred and --compare modes")
    args = parser.parse_args(argv)

    folder_options = (args.truth or args.pred or args.classes or args.spacing or args.images or args.window
                      or args.hd95)
    if args.follow and (args.compare or folder_options):
        parser.error("--follow follows an experiment's training: it takes --config/--set, not --truth/--pred or "
                     "--compare")
    if (args.compare or folder_options) and (args.config or args.overrides):
        parser.error("--config and --set belong to the experiment mode, not to --truth/--pred or --compare")
    if args.compare:
        if folder_options:
            parser.error("--compare cannot be combined with --truth, --pred, --classes, --spacing, --images "
                         "or --window")
        if len(args.compare) < 2:
            parser.error("--compare needs two or more run folders")
        from segmenter.evaluation import compare as comparison

        return cli.run_stage(lambda: comparison.compare_runs(args.compare, args.out or Path("comparison")))
    if folder_options:
        if not (args.truth and args.pred and args.out):
            parser.error("--truth, --pred and --out are all needed to evaluate two folders of masks")
        if args.window and not args.images:
            parser.error("--window sets how --images are shown; it needs --images")
        from segmenter.evaluation import folders as mask_folders

        return cli.run_stage(lambda: mask_folders.evaluate_folders(
            args.truth, args.pred, args.out, class_names=args.classes, spacing=args.spacing,
            images_dir=args.images, display_window=args.window, nsd_tolerance=args.nsd_tolerance,
            hd95=args.hd95 or "max_directed"))
    if args.out:
        parser.error("--out belongs to the --truth/--pred and --compare modes; an experiment writes to "
                     "experiments/<experiment>/evaluate/")
    if (args.once or args.interval != 30.0) and not args.follow:
        parser.error("--once and --interval belong to --follow")
    config = cli.load_config_or_exit(args)
    if args.follow:
        cli.quiet_tensorflow()
        from segmenter.evaluation import follow as following

        cli.announce_device()
        return cli.run_stage(lambda: following.follow_training(config, args.interval, once=args.once))
    from segmenter.evaluation import pipeline

    cli.announce_device(uses_tensorflow=False)

    return cli.run_stage(lambda: pipeline.evaluate_experiment(config))


if __name__ == "__main__":
    raise SystemExit(main())
