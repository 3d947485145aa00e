"""Preload: read the original dataset, validate it and write the preloaded dataset, split into train and test.

Reads preload.input_dir; writes <paths.preloaded_root>/<experiment>/ (manifest.json, train.npz with the
training samples, test/images and test/labels with the whole test cases).
"""
from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog, stage="preload")
    parser.add_argument("--overwrite", action="store_true", help="redo the work even if the output is up to date")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip bad image/mask pairs (listed in the manifest) instead of stopping")
    args = parser.parse_args(argv)
    config = cli.load_config_or_exit(args)
    from segmenter import preload as preloading

    cli.announce_device(uses_tensorflow=False)

    return cli.run_stage(lambda: preloading.preload(config, overwrite=args.overwrite,
                                                    skip_invalid=args.skip_invalid or None))


if __name__ == "__main__":
    raise SystemExit(main())
