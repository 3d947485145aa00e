"""Train: fit the final model on the whole training set with the tuned (or configured) hyperparameters.

Reads <paths.preloaded_root>/<experiment>/ and, when present, experiments/<experiment>/tune/best_hyperparameters.json;
writes experiments/<experiment>/train/ (model.keras, checkpoints/, history.csv, tensorboard/, training_curves.png).
"""
from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    args = parser.parse_args(argv)
    config = cli.load_config_or_exit(args)
    cli.quiet_tensorflow()
    from segmenter import training

    return cli.run_stage(lambda: training.train_final_model(config, resume=args.resume))


if __name__ == "__main__":
    raise SystemExit(main())
