"""Predict: masks for the test set, or with --input DIR for a folder of new, unlabelled images.

Reads experiments/<experiment>/train/model.keras and the preloaded test split; writes
experiments/<experiment>/predict/test/<id>.npy, or predict/<DIR name>/<file name> for --input.
"""
from pathlib import Path

from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog)
    parser.add_argument("--input", type=Path, default=None,
                        help="folder of new images (CSV, PNG, NPY, DICOM, NIfTI) to segment instead of the test set")
    parser.add_argument("--output", type=Path, default=None,
                        help="where --input masks go (default: experiments/<experiment>/predict/<input folder name>)")
    args = parser.parse_args(argv)
    if args.output is not None and args.input is None:
        parser.error("--output goes with --input; the test-set masks always go to predict/test")
    config = cli.load_config_or_exit(args)
    cli.quiet_tensorflow()
    from segmenter import inference

    if args.input is not None:
        return cli.run_stage(lambda: inference.predict_folder(config, args.input, args.output))
    return cli.run_stage(lambda: inference.predict_test_set(config))


if __name__ == "__main__":
    raise SystemExit(main())
