"""Tune: keras-tuner search over architectures, losses and hyperparameters on a validation split of train.

Reads <paths.preloaded_root>/<experiment>/; writes experiments/<experiment>/tune/ (trials.csv,
best_hyperparameters.json, objective figure, TensorBoard logs of every trial). An interrupted search
resumes where it stopped; --overwrite starts afresh.
"""
from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog, stage="tune")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier search and start afresh")
    args = parser.parse_args(argv)
    config = cli.load_config_or_exit(args)
    cli.quiet_tensorflow()
    from segmenter import tuning

    cli.announce_device()

    return cli.run_stage(lambda: tuning.run_search(config, overwrite=args.overwrite))


if __name__ == "__main__":
    raise SystemExit(main())
