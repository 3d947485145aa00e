"""Predict: masks for the test set, or with --input DIR for a folder of new, unlabelled images.

Reads experiments/<experiment>/train/model/model.keras and the preloaded test cases; writes one label map per case,
in its source's format at its own geometry (NIfTI for volumes and DICOM), to experiments/<experiment>/predict/test/,
or predict/<DIR name>/ for --input, with preview/<case>.png and preview/index.html to look at them. With
--format dicom-seg, a DICOM series input also gets <case>.seg.dcm. With --visualize train|test it predicts no
masks but draws N evenly spaced training samples or test cases (image, truth, prediction, overlay) with the
trained model or a --checkpoint to predict/visualize_<split>.png.
"""
from pathlib import Path

from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog, stage="predict")
    parser.add_argument("--input", type=Path, default=None,
                        help="folder of new images (CSV, PNG, NPY, DICOM, NIfTI) to segment instead of the test set")
    parser.add_argument("--output", type=Path, default=None,
                        help="where --input masks go (default: experiments/<experiment>/predict/<input folder name>)")
    parser.add_argument("--format", choices=["native", "dicom-seg"], default="native",
                        help="dicom-seg: also write a DICOM Segmentation object (<case>.seg.dcm) referencing each "
                             "DICOM series input, with the class names as segment labels (--input only)")
    parser.add_argument("--visualize", choices=["train", "test"], default=None,
                        help="instead of writing masks, draw --count evenly spaced training samples (as stored: "
                             "normalised, at the sample size) or test cases (predicted as predict does) as image, "
                             "truth, prediction and overlay to experiments/<experiment>/predict/visualize_<split>.png")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                        help="with --visualize: the model to draw, a .keras file such as "
                             "experiments/<experiment>/train/checkpoints/last/model.keras (default: train/model/model.keras)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="with --visualize: how many samples or cases to draw, 1 to 48 (default 8)")
    args = parser.parse_args(argv)
    if args.visualize is None and (args.checkpoint is not None or args.count is not None):
        parser.error("--checkpoint and --count go with --visualize train|test")
    if args.visualize is not None and (args.input is not None or args.output is not None or args.format != "native"):
        parser.error("--visualize draws the preloaded training samples or test cases; it takes no --input, "
                     "--output or --format")
    if args.count is not None and not 1 <= args.count <= 48:
        parser.error(f"--count: {args.count} is outside 1..48")
    if args.format == "dicom-seg" and args.input is None:
        parser.error("--format dicom-seg goes with --input: the preloaded test cases are not DICOM series")
    if args.output is not None and args.input is None:
        parser.error("--output goes with --input; the test-set masks always go to predict/test")
    config = cli.load_config_or_exit(args)
    if args.checkpoint is not None:  # a wrong path fails at once, before TensorFlow is loaded
        from segmenter import visualize

        status = cli.run_stage(lambda: visualize.check_checkpoint(config, args.checkpoint) and None)
        if status:
            return status
    cli.quiet_tensorflow()
    from segmenter import inference

    cli.announce_device()

    if args.visualize is not None:
        from segmenter import visualize

        return cli.run_stage(lambda: visualize.visualize(config, args.visualize, args.checkpoint,
                                                         args.count or visualize.DEFAULT_COUNT))
    if args.input is not None:
        return cli.run_stage(lambda: inference.predict_folder(config, args.input, args.output,
                                                                            dicom_seg=args.format == "dicom-seg"))
    return cli.run_stage(lambda: inference.predict_test_set(config))


if __name__ == "__main__":
    raise SystemExit(main())
