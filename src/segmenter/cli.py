"""The command line shared by every stage: ``--config``, ``--set key=value``, one-line errors.

``segmenter <stage> ...`` and ``python -m stages.<stage> ...`` run the same ``main`` function.

Exit statuses (``segmenter --help`` lists them too):

  0  success
  1  bad input data (the message names the file and the problem)
  2  bad configuration or usage (a setting, a config file, a command-line option)
  3  missing input from an earlier stage (e.g. "run the preload stage first"), or out of date for this one
  4  the disk is full
  5  out of memory
  6  another run of the stage holds the lock of the same outputs
  130, 143  interrupted by Ctrl-C (SIGINT) or stopped by SIGTERM
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from segmenter import interrupts
from segmenter.config import Config, ConfigError, load_config
from segmenter.errors import BusyError, InputError, resource_problem
from segmenter.interrupts import Terminated, interrupts_raise

STAGES = ("preload", "tune", "train", "predict", "evaluate")

EXIT_INPUT_ERROR = 1
EXIT_CONFIG_ERROR = 2  # bad configuration or usage, and nothing else
EXIT_MISSING_INPUT = 3  # an earlier stage's output is missing or out of date: run that stage (again)
EXIT_DISK_FULL = 4
EXIT_OUT_OF_MEMORY = 5
EXIT_BUSY = 6  # another live run holds the lock of the same outputs (segmenter.locks)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

EXIT_STATUSES = (
    (0, "success"),
    (EXIT_INPUT_ERROR, "bad input data (the message names the file)"),
    (EXIT_CONFIG_ERROR, "bad configuration or usage"),
    (EXIT_MISSING_INPUT, "missing or out-of-date input from an earlier stage (run that stage first, or again)"),
    (EXIT_DISK_FULL, "the disk is full (free space, then run the stage again)"),
    (EXIT_OUT_OF_MEMORY, "out of memory (a smaller batch or image size, fewer workers)"),
    (EXIT_BUSY, "another run of the stage is writing the same outputs (the message names it)"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl-C (SIGINT); the earlier output is kept"),
    (EXIT_TERMINATED, "stopped by SIGTERM; the earlier output is kept"),
)

INTERRUPTED_MESSAGE = "interrupted; the earlier output is kept"

#: Advice for an out-of-memory stop, by the stage that ran (segmenter.locks.last_stage).
_MEMORY_ADVICE = {
    "preload": "fewer preload.workers or a smaller preload.shard_size",
    "tune": "a smaller batch_size in tune.search_space or train.batch_size, a smaller preload.image_size or "
            "a smaller model (train.model.base_filters, depth)",
    "train": "a smaller train.batch_size, a smaller preload.image_size or a smaller model "
             "(train.model.base_filters, depth)",
    "predict": "a smaller predict.batch_size",
    "evaluate": "fewer or smaller volumes at a time (evaluate holds one pair in memory), or free memory",
}


def stage_parser(doc: Optional[str], prog: Optional[str] = None,
                 stage: Optional[str] = None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage has; stages add their own.

    ``prog`` defaults to ``segmenter <stage>``, so ``python -m stages.train --help`` reads as the command.
    """
    if prog is None and stage is not None:
        prog = f"segmenter {stage}"
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE_OR_RUN_DIR",
                        help="config file: .py (defining CONFIG), .json or .yaml/.yml; or a run folder such as "
                             "experiments/<name>, meaning its config.resolved.json (default: config.py in the "
                             "current folder if present, announced on stderr, else config_template.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting by its dotted key, e.g. --set train.epochs=5 (repeatable)")
    return parser


def load_config_or_exit(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def interrupted_status(error: KeyboardInterrupt) -> int:
    """Print the one line of an interrupted stage; 143 for SIGTERM, 130 for Ctrl-C."""
    print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True)
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def resource_message(problem: str, error: BaseException) -> str:
    """One line for a full disk or too little memory, with what to do about it."""
    from segmenter import locks

    if problem == "disk":
        where = f" writing {error.filename}" if isinstance(error, OSError) and error.filename else ""
        return (f"the disk is full (no space left on device{where}); free disk space "
                "(or point paths.preloaded_root / paths.experiments_root elsewhere), then run the stage again; "
                "nothing partial was kept")
    advice = _MEMORY_ADVICE.get(locks.last_stage or "", "a smaller batch size or image size")
    return f"out of memory ({type(error).__name__}); try {advice}; nothing partial was kept"


def run_stage(body: Callable[[], object]) -> int:
    """Run a stage body, turning known errors into one line on stderr and a non-zero exit status.

    SIGINT and SIGTERM stop the stage with one line and status 130 / 143 (see :mod:`segmenter.interrupts`).
    """
    try:
        with interrupts_raise():
            try:
                result = body()
            except Exception as error:
                # A stop that a library turned into another error (see segmenter.interrupts) is still a stop.
                stop = interrupts.requested()
                if stop is not None:
                    raise stop from error
                raise
    except KeyboardInterrupt as error:
        return interrupted_status(error)
    except Exception as error:
        problem = resource_problem(error)
        if problem is not None:  # checked first: a full disk may surface wrapped in another error
            print(f"error: {resource_message(problem, error)}", file=sys.stderr)
            return EXIT_DISK_FULL if problem == "disk" else EXIT_OUT_OF_MEMORY
        if isinstance(error, BusyError):
            status = EXIT_BUSY
        elif isinstance(error, InputError):
            status = EXIT_INPUT_ERROR
        elif isinstance(error, ConfigError):
            status = EXIT_CONFIG_ERROR
        elif isinstance(error, FileNotFoundError):  # "...; run the preload stage first" and the like
            status = EXIT_MISSING_INPUT
        else:
            raise
        print(f"error: {error}", file=sys.stderr)
        return status
    if result is not None:
        print(result)
    return 0


# ----------------------------------------------------------------------------------------------------
# TensorFlow's start-up chatter
# ----------------------------------------------------------------------------------------------------
# TensorFlow 2.21 logs through Abseil, and TF_CPP_MIN_LOG_LEVEL no longer silences what its shared
# libraries log while they are loaded: static initialisers in libtensorflow and in the separately linked
# profiler plugin each print Abseil's "before absl::InitializeLog()" banner, the oneDNN notice and, on
# machines without CUDA, "Could not find cuda drivers" (six lines per stage) before anything can set a log
# level, and Abseil writes everything logged before InitializeLog to stderr. No environment variable
# reaches them (TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel, ABSL_MIN_LOG_LEVEL were tried), and the oneDNN notice
# goes only with oneDNN itself (TF_ENABLE_ONEDNN_OPTS=0, 40% slower here: not an option). So the import
# runs with file descriptor 2 pointed at a temporary file, and what it wrote goes to stderr afterwards
# without the records TF_CPP_MIN_LOG_LEVEL would have dropped. TF_CPP_MIN_LOG_LEVEL=0 shows everything.
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# An Abseil/glog record: severity letter, MMDD, time, thread id, file:line]
_ABSL_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\] ")
_SEVERITIES = "IWEF"
# Second lines of records dropped above (cpu_feature_guard's instruction list).
_CONTINUATIONS = ("To enable the following instructions:",)


def tensorflow_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_tensorflow_chatter(text: str, level: int) -> str:
    """``text`` without the Abseil records below ``level`` (TF_CPP_MIN_LOG_LEVEL) and Abseil's banner."""
    if level <= 0:
        return text
    kept = []
    dropped_previous = False
    for line in text.splitlines(keepends=True):
        record = _ABSL_RECORD.match(line)
        if line.rstrip("\n") == _ABSL_BANNER:
            dropped_previous = True
        elif record and _SEVERITIES.index(record.group(1)) < level:
            dropped_previous = True
        elif dropped_previous and line.startswith(_CONTINUATIONS):
            pass
        else:
            dropped_previous = False
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture what is written to file descriptor 2 (C++ code included) and pass it on without the chatter."""
    level = tensorflow_log_level()
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            rest = filter_tensorflow_chatter(capture.read().decode("utf-8", errors="replace"), level)
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def silence_known_warnings() -> None:
    """Warnings that describe segmenter working as intended, not a problem of the user's."""
    # After a stop by train.time_budget_minutes / tune.time_budget_minutes Keras may take the unfinished
    # epoch for a dataset too short and say so; nothing is wrong.
    warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up chatter (see above) and silence warnings that are no problem."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    silence_known_warnings()
    if "tensorflow" in sys.modules:
        return
    with filtered_stderr():
        import tensorflow  # noqa: F401  (loads the shared libraries whose initialisers log)


_announced: Optional[str] = None


def describe_device() -> str:
    """``Running on GPU: <name>`` (or ``Running on N GPUs: ...``) or ``Running on CPU (N cores)``."""
    quiet_tensorflow()
    import tensorflow as tf

    with filtered_stderr():  # the first device query initialises CUDA, which has its own notices
        gpus = tf.config.list_physical_devices("GPU")
        names = []
        for gpu in gpus:
            try:
                details = tf.config.experimental.get_device_details(gpu)
            except (ValueError, RuntimeError):
                details = {}
            names.append(details.get("device_name") or gpu.name.replace("/physical_device:", ""))
    if len(names) == 1:
        return f"Running on GPU: {names[0]}"
    if names:
        return f"Running on {len(names)} GPUs: {', '.join(names)}"
    cores = _cpu_count()
    return f"Running on CPU ({cores} core{'s' if cores != 1 else ''})"


def announce_device(uses_tensorflow: bool = True) -> str:
    """Print once, on stdout, the device the stage computes on; stages call it after importing TensorFlow.

    ``uses_tensorflow`` False (preload, evaluate: NumPy and SciPy only) says so without importing TensorFlow.
    """
    global _announced
    if _announced is None:
        _announced = describe_device() if uses_tensorflow else (
            f"Running on CPU ({_cpu_count()} cores; this stage does not use TensorFlow)")
        print(_announced, flush=True)
    return _announced


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# The segmenter command
# ----------------------------------------------------------------------------------------------------
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segmenter")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def stage_summary(stage: str) -> str:
    """The first line of the stage module's docstring, without its leading ``<Stage>:``."""
    doc = importlib.import_module(f"stages.{stage}").__doc__ or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    prefix = f"{stage}:"
    if first.lower().startswith(prefix):
        first = first[len(prefix):].strip()
    return first


def main_help() -> str:
    width = max(len(stage) for stage in STAGES)
    lines = ["usage: segmenter <stage> [--config FILE_OR_RUN_DIR] [--set KEY=VALUE ...] [stage options]",
             "       segmenter --help | --version",
             "",
             "Run one stage of the segmentation pipeline; `segmenter <stage> --help` lists its options.",
             "",
             "stages:"]
    lines += [f"  {stage:<{width}}  {stage_summary(stage)}" for stage in STAGES]
    lines += ["", "exit status:"]
    status_width = max(len(str(status)) for status, _ in EXIT_STATUSES)
    lines += [f"  {status:>{status_width}}  {meaning}" for status, meaning in EXIT_STATUSES]
    return "\n".join(lines)


def unknown_stage_message(name: str) -> str:
    close = difflib.get_close_matches(name, STAGES, n=1)
    if close:
        return f"unknown stage {name!r}; did you mean {close[0]!r}?"
    return f"unknown stage {name!r}; the stages are {', '.join(STAGES)} (segmenter --help)"


def segmenter_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``segmenter`` console command: ``segmenter <stage> [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main_help(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    first = argv[0]
    if first in ("-h", "--help"):
        print(main_help())
        return 0
    if first in ("-V", "--version"):
        print(f"segmenter {package_version()}")
        return 0
    if first.startswith("-"):
        print(f"error: {first}: the stage comes first: segmenter <stage> [options] (segmenter --help)",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if first not in STAGES:
        print(f"error: {unknown_stage_message(first)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # Ctrl-C or SIGTERM before the stage's own run_stage (loading TensorFlow, say) stops as quietly.
    try:
        with interrupts_raise():
            module = importlib.import_module(f"stages.{first}")
            return module.main(argv[1:], prog=f"segmenter {first}")
    except KeyboardInterrupt as error:
        return interrupted_status(error)
