"""Evaluate: Dice, IoU, Hausdorff, HD95, ASSD, NSD and clinical measures per test image and class.

Reads the preloaded test split and experiments/<experiment>/predict/test/; writes
experiments/<experiment>/evaluate/ (metrics.csv, summary.json, figures/, report.html) and prints the
report's path as its last line.
"""
from segmenter import cli


def main(argv=None, prog=None) -> int:
    parser = cli.stage_parser(__doc__, prog)
    args = parser.parse_args(argv)
    config = cli.load_config_or_exit(args)
    from segmenter.evaluation import pipeline

    return cli.run_stage(lambda: pipeline.evaluate_experiment(config))


if __name__ == "__main__":
    raise SystemExit(main())
