"""The command line shared by every stage: ``--config``, ``--set key=value``, one-line errors.

``segmenter <stage> ...`` and ``python -m stages.<stage> ...`` run the same ``main`` function.
Exit statuses: 0 success, 1 bad input data (the message names the file), 2 bad configuration or usage.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from segmenter.config import Config, ConfigError, load_config
from segmenter.errors import InputError

STAGES = ("preload", "tune", "train", "predict", "evaluate")

EXIT_INPUT_ERROR = 1
EXIT_CONFIG_ERROR = 2


def stage_parser(doc: Optional[str], prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage has; stages add their own."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: config.py in the current folder if present, else "
                             "config_template.py there, else the same two in the segmenter checkout)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting by its dotted key, e.g. --set train.epochs=5 (repeatable)")
    return parser


def load_config_or_exit(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def run_stage(body: Callable[[], object]) -> int:
    """Run a stage body, turning known errors into one line on stderr and a non-zero exit status."""
    try:
        result = body()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if result is not None:
        print(result)
    return 0


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) out of the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def segmenter_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``segmenter`` console command: ``segmenter <stage> [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: segmenter {" + ",".join(STAGES) + "} [options]\n\n"
              "Run one stage of the pipeline; `segmenter <stage> --help` lists its options.", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_CONFIG_ERROR
    module = importlib.import_module(f"stages.{argv[0]}")
    return module.main(argv[1:], prog=f"segmenter {argv[0]}")
