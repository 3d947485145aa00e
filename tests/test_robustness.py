"""Nothing lost, nothing silently wrong: every stage under crashes, races and mistakes.

- locks: a second run on the same outputs stops at once with one line naming the first (pid, host, start,
  lock file); a lock of a process killed with SIGKILL is free again; train/tune/predict/evaluate do not
  run while preload writes their dataset, nor preload while they read it;
- SIGTERM and SIGINT: one line, no traceback, exit status 143 / 130, no temporary folder, the earlier
  output intact;
- a full disk and too little memory: one line with advice, exit status 4 / 5, nothing partial left;
- names that would escape their folder (case ids, class names) are refused with one line;
- predict and evaluate refuse a model of another preload, a model whose input does not fit the data, and
  (evaluate) predictions older than the model, naming the stage to run again.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segmenter import artifacts, cli, interrupts, layout, locks
from segmenter.artifacts import sha256_of_file
from segmenter.config import ConfigError, build_config
from segmenter.errors import BusyError, InputError, resource_problem
from segmenter.manifest import read_manifest
from segmenter.preload import preload
from tests.conftest import REPO_ROOT, run_cli, write_config
from tests.test_preload import make_png_npy_set

SLOW_CASES = 6000  # NPY pairs of 128 x 128: a preload takes 10 s or more on a 2-core machine (about 2 ms a case)


def _raw_config(data: Path, work: Path, **preload_settings) -> dict:
    return {"experiment": "t", "classes": ["background", "a", "b"],
            "paths": {"preloaded_root": str(work / "pre"), "experiments_root": str(work / "exp")},
            "preload": {"input_dir": str(data), "image_size": [16, 16], "workers": 1,
                        "normalization": {"method": "divide_255"}, **preload_settings},
            "evaluate": {"bootstrap_samples": 20}}


def _config(data: Path, work: Path, **preload_settings):
    return build_config(_raw_config(data, work, **preload_settings))


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> Path:
    """Enough cases that a preload runs for several seconds: time to start a second run or send a signal."""
    folder = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    mask = np.zeros((128, 128), np.uint8)
    mask[30:60, 30:60] = 1
    mask[80:100, 80:100] = 2
    # A few distinct images, hard-linked under many names: the preload reads and hashes every name as a case
    # of its own, at the cost of a few files on disk.
    distinct = 8
    for index in range(distinct):
        np.save(folder / "images" / f"{index}.npy", (rng.random((128, 128)) * 255).astype(np.float32))
        np.save(folder / "masks" / f"{index}.npy", mask)
    for index in range(distinct, SLOW_CASES):
        for kind in ("images", "masks"):
            os.link(folder / kind / f"{index % distinct}.npy", folder / kind / f"{index}.npy")
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_png_npy_set(tmp_path_factory.mktemp("small") / "data", count=6)


def _start_cli(*args: str) -> subprocess.Popen:
    """``segmenter <args>`` in a new process, with Python's Ctrl-C handler even when the tests run in the background."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from segmenter.cli import segmenter_main; sys.exit(segmenter_main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _temporaries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if ".tmp" in entry.name or entry.name.endswith(".old"))


def _lock_holder(path: Path):
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------------
def test_a_second_preload_stops_at_once_naming_the_first_and_a_killed_one_frees_the_lock(
        slow_data, small_data, tmp_path):
    config_file = write_config(tmp_path, _raw_config(slow_data, tmp_path))
    lock = tmp_path / "pre" / ".t.lock"
    first = _start_cli("preload", "--config", str(config_file))
    try:
        _wait_for(lambda: (_lock_holder(lock) or {}).get("pid") == first.pid, what="the first run's lock")
        started = time.monotonic()
        second = run_cli("preload", "--config", str(config_file), timeout=120)
        assert first.poll() is None, "the second run waited for the first to end"
        assert second.returncode == cli.EXIT_BUSY, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: {lock}: segmenter preload (pid {first.pid} on {socket.gethostname()}, "
                                   "started "), lines[0]
        assert "run segmenter preload again" in lines[0]
        assert time.monotonic() - started < 60
    finally:
        first.kill()  # SIGKILL: no cleanup at all, the kernel drops the flock
        first.wait()
    # A new run takes the lock over (same experiment, a smaller input to be quick) and clears the dead temporary.
    third = run_cli("preload", "--config", str(config_file), "--set", f"preload.input_dir={small_data}", timeout=300)
    assert third.returncode == 0, third.stderr
    assert _temporaries(tmp_path / "pre") == []
    assert read_manifest(tmp_path / "pre" / "t").train.num_samples > 0
    assert _lock_holder(lock) is None  # a finished run leaves no description behind


def test_train_waits_for_no_preload_and_preload_for_no_reader(small_data, tmp_path):
    config = _config(small_data, tmp_path)
    (tmp_path / "pre").mkdir()
    with locks.stage_lock(config, "preload"):
        for stage in locks.READERS:
            with pytest.raises(BusyError) as caught:
                with locks.stage_lock(config, stage):
                    pass
            message = str(caught.value)
            assert message.startswith(f"{locks.dataset_lock_path(config)}: segmenter preload (pid {os.getpid()} ")
            assert f"is writing the preloaded dataset {config.preloaded_dir}" in message
            assert message.endswith(f"run segmenter {stage} again")
    with locks.stage_lock(config, "train"), locks.stage_lock(config, "predict"):  # readers share the dataset
        with pytest.raises(BusyError) as caught:
            with locks.stage_lock(config, "preload"):
                pass
        message = str(caught.value)
        assert f"is in use by segmenter train (pid {os.getpid()} " in message
        assert f"(lock {locks.stage_lock_path(config, 'train')})" in message and "segmenter predict (pid" in message
        with pytest.raises(BusyError, match=r"\.train\.lock: segmenter train \(pid \d+ on .*already running for "
                                            r"experiment 't'.*run segmenter train again$"):
            with locks.stage_lock(config, "train"):
                pass
    with locks.stage_lock(config, "preload"):  # all free again
        pass
    # The last holder removes its lock file; nothing is left beside the outputs.
    assert sorted(os.listdir(tmp_path / "pre")) == [] and not (tmp_path / "exp").exists()


def test_a_stage_that_stops_at_once_leaves_no_lock_file_nor_folder(small_data, tmp_path, capsys):
    from segmenter.evaluation import pipeline

    config = _config(small_data, tmp_path)
    assert cli.run_stage(lambda: pipeline.evaluate_experiment(config)) == cli.EXIT_MISSING_INPUT
    assert "no preloaded dataset here; run the preload stage first" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists() and not (tmp_path / "pre").exists()


def test_a_distributed_tune_worker_shares_the_tune_folder(small_data, tmp_path, monkeypatch):
    config = _config(small_data, tmp_path)
    with locks.stage_lock(config, "tune"):  # the chief's
        monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
        monkeypatch.setenv("KERASTUNER_TUNER_ID", "worker0")
        with locks.stage_lock(config, "tune"):
            pass
        monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
        with pytest.raises(BusyError):
            with locks.stage_lock(config, "tune"):
                pass


def test_a_busy_stage_is_exit_status_6_with_one_line(small_data, tmp_path, capsys):
    config = _config(small_data, tmp_path)
    with locks.stage_lock(config, "preload"):
        assert cli.run_stage(lambda: preload(config)) == cli.EXIT_BUSY
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "segmenter preload (pid" in err


# ----------------------------------------------------------------------------------------------------
# SIGTERM and SIGINT
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_preload_keeps_the_earlier_output_and_says_so_in_one_line(slow_data, tmp_path, signum, status):
    config_file = write_config(tmp_path, _raw_config(slow_data, tmp_path))
    earlier = tmp_path / "pre" / "t"
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").write_text('{"earlier": true}\n')  # stands for the earlier output
    run = _start_cli("preload", "--config", str(config_file), "--overwrite")
    try:
        _wait_for(lambda: any(name.startswith(f".t.{run.pid}.tmp") for name in os.listdir(tmp_path / "pre")),
                  what="the temporary output folder")
        time.sleep(0.5)  # well inside the work on the cases
        assert run.poll() is None, "the preload ended before the signal"
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.strip() == "interrupted; the earlier output is kept"
    assert _temporaries(tmp_path / "pre") == []
    assert sorted(os.listdir(earlier)) == ["manifest.json"]
    assert (earlier / "manifest.json").read_text() == '{"earlier": true}\n'
    # The lock went with the process.
    assert _lock_holder(tmp_path / "pre" / ".t.lock") is None


def test_sigterm_raises_in_the_main_thread_only_while_a_stage_runs():
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("not interrupted")

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run_stage(body) == cli.EXIT_TERMINATED
    assert signal.getsignal(signal.SIGTERM) is before


def _swallowing(function):
    """Call ``function`` as some C and Rust libraries call Python back: any exception is dropped."""
    try:
        function()
    except BaseException:  # pydantic-core dropped a Ctrl-C raised inside an isinstance check like this
        pass


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, cli.EXIT_TERMINATED),
                                            (signal.SIGINT, cli.EXIT_INTERRUPTED)])
def test_a_stop_swallowed_by_a_library_still_keeps_the_earlier_output(tmp_path, signum, status, capsys,
                                                                      monkeypatch):
    # Python's Ctrl-C handler, as in a terminal, even when the tests run in the background (SIGINT ignored)
    monkeypatch.setattr(signal, "getsignal", lambda number: signal.default_int_handler)
    final = tmp_path / "out"
    final.mkdir()
    (final / "result.txt").write_text("earlier")

    def body():
        with artifacts.atomic_directory(final) as tmp:
            (tmp / "result.txt").write_text("new")
            _swallowing(lambda: (os.kill(os.getpid(), signum), time.sleep(5)))
            artifacts.write_text_atomic("half", tmp_path / "single.txt")

    assert cli.run_stage(body) == status
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED_MESSAGE
    assert (final / "result.txt").read_text() == "earlier"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert interrupts.requested() is None  # the next stage in this process starts afresh
    assert cli.run_stage(lambda: artifacts.write_text_atomic("next", tmp_path / "next.txt")) == 0


def test_an_error_that_a_stop_became_is_reported_as_the_stop(tmp_path, capsys):
    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException as error:  # as np.load turned a Ctrl-C into "TypeError: expected str, bytes ..."
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedReader") from error
        raise AssertionError("not interrupted")

    assert cli.run_stage(body) == cli.EXIT_TERMINATED
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED_MESSAGE


# ----------------------------------------------------------------------------------------------------
# A full disk, too little memory
# ----------------------------------------------------------------------------------------------------
def _preloaded(data: Path, work: Path, capsys):
    config = _config(data, work)
    assert cli.run_stage(lambda: preload(config)) == 0
    capsys.readouterr()
    return config, (config.preloaded_dir / layout.MANIFEST).read_bytes()


def test_a_full_disk_stops_with_status_4_and_nothing_partial(small_data, tmp_path, monkeypatch, capsys):
    config, manifest_before = _preloaded(small_data, tmp_path, capsys)

    def no_space(file, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(file, "name", file)))

    monkeypatch.setattr(np, "save", no_space)  # the test cases' files are written with np.save
    assert cli.run_stage(lambda: preload(config, overwrite=True)) == cli.EXIT_DISK_FULL
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: the disk is full (no space left on device writing ")
    assert "free disk space" in err and "nothing partial was kept" in err
    assert _temporaries(tmp_path / "pre") == []
    assert (config.preloaded_dir / layout.MANIFEST).read_bytes() == manifest_before


def test_too_little_memory_stops_with_status_5_and_advice(small_data, tmp_path, monkeypatch, capsys):
    config, manifest_before = _preloaded(small_data, tmp_path, capsys)
    from segmenter.preload import prepare

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(prepare, "training_samples", no_memory)
    assert cli.run_stage(lambda: preload(config, overwrite=True)) == cli.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: out of memory (MemoryError); try fewer preload.workers")
    assert _temporaries(tmp_path / "pre") == []
    assert (config.preloaded_dir / layout.MANIFEST).read_bytes() == manifest_before


def test_resource_problems_are_found_behind_other_errors():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("could not save") from error
    except RuntimeError as wrapped:
        assert resource_problem(wrapped) == "disk"
    assert resource_problem(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk"
    assert resource_problem(OSError(errno.EACCES, "Permission denied")) is None
    assert resource_problem(ValueError("x")) is None
    # keras-tuner gives up after failed trials with one RuntimeError holding their tracebacks.
    tuner_error = RuntimeError("Number of consecutive failures exceeded the limit of 3.\nTraceback ...\n"
                               "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating")
    assert resource_problem(tuner_error) == "memory"


# ----------------------------------------------------------------------------------------------------
# Names that would escape their folder
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes, problem", [
    (["background", "a/b"], "contains a path separator"),
    (["background", ".."], "is '.' or '..'"),
    (["background", "a\0b"], "contains a NUL character"),
])
def test_class_names_that_are_paths_are_refused(classes, problem):
    with pytest.raises(ConfigError) as caught:
        build_config({"classes": classes})
    assert problem in str(caught.value) and "\n" not in str(caught.value)
    build_config({"classes": ["background", "L1..L5"]})  # dots inside a name are fine


def test_case_ids_that_are_not_plain_file_names_are_refused_at_preload(small_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    for index in range(6):  # explicit pairs of hidden files: ids that every later listing would skip
        (data / "images" / f"{index}.png").rename(data / "images" / f".{index}.png")
    pairs = [[f"images/.{index}.png", f"masks/{index}.npy"] for index in range(6)]
    config = _config(data, tmp_path, pairs=pairs)
    assert cli.run_stage(lambda: preload(config)) == cli.EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "case id '.0' starts with '.'" in err and f"{data / 'images' / '.0.png'}" in err
    assert not config.preloaded_dir.exists()
    with pytest.raises(InputError, match="case id '../x' contains a path separator"):
        layout.safe_name("../x", "case id")


# ----------------------------------------------------------------------------------------------------
# Outputs of earlier stages that do not belong together (needs Keras: one tiny model, no training)
# ----------------------------------------------------------------------------------------------------
def _save_model(train_dir: Path, size=(16, 16), channels: int = 1, seed: int = 0) -> Path:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*size, channels))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    layout.model_dir(train_dir).mkdir(parents=True, exist_ok=True)
    model.save(layout.model_path(train_dir))
    return layout.model_path(train_dir)


def _write_preprocessing(config, **changes) -> None:
    """preprocessing.json as the train stage writes it, with ``changes``."""
    manifest = read_manifest(config.preloaded_dir)
    record = {**manifest.preprocessing, "classes": config.classes, "channels": manifest.channels,
              "preload_fingerprint": manifest.fingerprint, **changes}
    layout.preprocessing_path(config.stage_dir("train")).write_text(json.dumps(record))


@pytest.fixture()
def trained(small_data, tmp_path, capsys):
    """A preloaded dataset and a (untrained, tiny) model with the files the train stage writes."""
    pytest.importorskip("keras")
    config, _ = _preloaded(small_data, tmp_path, capsys)
    _save_model(config.stage_dir("train"))
    _write_preprocessing(config)
    return config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_predictions_of_an_older_model_are_refused_by_evaluate(trained, capsys):
    from segmenter import inference
    from segmenter.evaluation import pipeline

    config = trained
    train_dir = config.stage_dir("train")
    assert cli.run_stage(lambda: inference.predict_test_set(config)) == 0
    record = json.loads((config.stage_dir("predict") / "test" / layout.PREDICTIONS_RECORD).read_text())
    assert record["model_sha256"] == sha256_of_file(layout.model_path(train_dir))
    assert record["preload_fingerprint"] == read_manifest(config.preloaded_dir).fingerprint
    assert cli.run_stage(lambda: pipeline.evaluate_experiment(config)) == 0
    capsys.readouterr()
    _save_model(train_dir, seed=1)  # trained again since the predictions were made
    assert cli.run_stage(lambda: pipeline.evaluate_experiment(config)) == cli.EXIT_MISSING_INPUT
    line = _one_error_line(capsys)
    assert "the predictions were made with another model" in line and line.endswith("run segmenter predict again")
    # Predictions of an older segmenter carry no digest: the model's time decides.
    record_path = config.stage_dir("predict") / "test" / layout.PREDICTIONS_RECORD
    record.pop("model_sha256")
    record_path.write_text(json.dumps(record))
    os.utime(record_path, (time.time() - 100, time.time() - 100))
    assert cli.run_stage(lambda: pipeline.evaluate_experiment(config)) == cli.EXIT_MISSING_INPUT
    assert _one_error_line(capsys).endswith("run segmenter predict again")


def test_a_model_of_another_preload_is_refused_by_predict_and_evaluate(trained, capsys):
    from segmenter import inference
    from segmenter.evaluation import pipeline

    config = trained
    assert cli.run_stage(lambda: inference.predict_test_set(config)) == 0
    capsys.readouterr()
    _write_preprocessing(config, preload_fingerprint="0" * 64)  # trained before the data were preloaded again
    for run in (lambda: inference.predict_test_set(config), lambda: pipeline.evaluate_experiment(config)):
        assert cli.run_stage(run) == cli.EXIT_MISSING_INPUT
        line = _one_error_line(capsys)
        assert "the model was trained on another preload of" in line
        assert line.endswith("run segmenter train again")


def test_a_model_whose_input_does_not_fit_the_data_is_refused(trained, capsys):
    from segmenter import inference

    config = trained
    _save_model(config.stage_dir("train"), size=(8, 8))
    assert cli.run_stage(lambda: inference.predict_test_set(config)) == cli.EXIT_MISSING_INPUT
    line = _one_error_line(capsys)
    assert "the model takes inputs of shape (8, 8, 1)" in line and "(16, 16, 1)" in line
    assert line.endswith("run segmenter train again")
    _save_model(config.stage_dir("train"), channels=2)
    assert cli.run_stage(lambda: inference.predict_test_set(config)) == cli.EXIT_MISSING_INPUT
    assert "(16, 16, 2)" in _one_error_line(capsys)


def test_predict_writes_no_file_outside_its_folder(trained, tmp_path):
    from segmenter import inference

    config = trained
    model, preprocessing = inference.load_trained_model(config)
    image = next(layout.test_images_dir(config.preloaded_dir).iterdir())
    out = tmp_path / "out" / "masks"
    with pytest.raises(InputError, match=r"case id '\.\./escaped' contains a path separator"):
        inference.predict_cases(model, preprocessing, {"../escaped": [image]}, out, lambda *_: ".npy", 4, {})
    assert not (tmp_path / "out" / "escaped.npy").exists()
    assert not out.exists() and _temporaries(tmp_path / "out") == []


def test_tensorflow_out_of_memory_is_status_5(capsys):
    tf = pytest.importorskip("tensorflow")

    def body():
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,512,512,32]")

    assert cli.run_stage(body) == cli.EXIT_OUT_OF_MEMORY
    assert _one_error_line(capsys).startswith("error: out of memory (ResourceExhaustedError); try ")
    disk = tf.errors.ResourceExhaustedError(None, None, "experiments/x/train/model.keras; No space left on device")
    assert resource_problem(disk) == "disk"
