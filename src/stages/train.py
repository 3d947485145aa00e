"""Train: fit the final model on the whole training set with the tuned (or configured) hyperparameters.

Reads <paths.preloaded_root>/<experiment>/ and, when present, experiments/<experiment>/tune/best_hyperparameters.json;
writes experiments/<experiment>/train/ (model.keras, checkpoints/, history.csv, tensorboard/, training_curves.png).
"""
from pathlib import Path

from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog, stage="train")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint; with RUN_DIR (e.g. "
                             "experiments/<name>) the settings come from that folder's config.resolved.json, "
                             "as with --config RUN_DIR, so no config file is needed")
    parser.add_argument("--fold", default=None, metavar="K|all",
                        help="train fold K (0 .. train.folds - 1) of a k-fold cross-validation into train/fold_K/, "
                             "or all folds in turn; predict then ensembles the fold models")
    args = parser.parse_args(argv)
    folds = None
    if args.fold is not None:
        if args.fold == "all":
            folds = "all"
        elif args.fold.isdigit():
            folds = [int(args.fold)]
        else:
            parser.error(f"--fold {args.fold}: give a fold number (0, 1, ...) or all")
    if isinstance(args.resume, str):
        if args.config is not None:
            parser.error("--resume RUN_DIR takes the settings from RUN_DIR; give either --config FILE --resume "
                         "or --resume RUN_DIR")
        if not Path(args.resume).is_dir():
            parser.error(f"--resume {args.resume}: no such run folder (e.g. experiments/<name>)")
        args.config = Path(args.resume)
    config = cli.load_config_or_exit(args)
    cli.quiet_tensorflow()
    from segmenter import training

    cli.announce_device()

    if folds is None:
        return cli.run_stage(lambda: training.train_final_model(config, resume=bool(args.resume)))
    return cli.run_stage(lambda: training.train_folds(config, folds, resume=bool(args.resume)))


if __name__ == "__main__":
    raise SystemExit(main())
