"""Atomic file and folder writes: temporary names, fsync, cleanup after dead processes, recovery."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segmenter import artifacts
from segmenter.artifacts import (atomic_directory, atomic_file, read_json, temporary_file_path, write_json_atomic,
                                 write_text_atomic)
from segmenter.errors import InputError
from segmenter.io import writers


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    """The id of a running process (another than this one), stopped after the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def test_temporary_name_carries_pid_and_suffix(tmp_path):
    pid = os.getpid()
    assert temporary_file_path(tmp_path / "case_01.nii.gz") == tmp_path / f".case_01.{pid}.tmp.nii.gz"
    assert temporary_file_path(tmp_path / "model.keras") == tmp_path / f".model.{pid}.tmp.keras"
    assert temporary_file_path(tmp_path / "a.b.png") == tmp_path / f".a.b.{pid}.tmp.png"
    assert temporary_file_path(tmp_path / "summary.json", "") == tmp_path / f".summary.json.{pid}.tmp"
    assert temporary_file_path(tmp_path / "X.NII.GZ", ".nii.gz") == tmp_path / f".X.{pid}.tmp.nii.gz"
    with pytest.raises(ValueError):
        temporary_file_path(tmp_path / "model.keras", ".png")


def test_atomic_file_writes_through_the_temporary_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "figure.png"
    with atomic_file(target) as tmp:
        assert tmp == tmp_path / "sub" / f".figure.{os.getpid()}.tmp.png"
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert names(target.parent) == ["figure.png"]


def test_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "report.html"
    write_text_atomic("old", target)
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half of the new one")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert names(tmp_path) == ["report.html"]


def test_writing_nothing_is_an_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        with atomic_file(target):
            pass
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["model.keras"]


def test_json_and_text_go_through_atomic_file(tmp_path):
    path = write_json_atomic({"a": np.int64(3), "b": np.arange(2), "c": tmp_path}, tmp_path / "x" / "s.json")
    assert read_json(path) == {"a": 3, "b": [0, 1], "c": str(tmp_path)}
    assert names(path.parent) == ["s.json"]
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert read_json(path)["a"] == 3
    assert names(path.parent) == ["s.json"]


def test_write_mask_uses_a_pid_temporary_with_the_format_suffix(tmp_path, monkeypatch):
    seen = []
    original = writers.WRITERS[".npy"]

    def spy(array, path, reference):
        seen.append(Path(path))
        original(array, path, reference)

    monkeypatch.setitem(writers.WRITERS, ".npy", spy)
    target = writers.write_mask(np.ones((3, 4), dtype=np.int64), tmp_path / "case.npy")
    assert seen == [tmp_path / f".case.{os.getpid()}.tmp.npy"]
    assert np.load(target).sum() == 12
    assert names(tmp_path) == ["case.npy"]


def test_failing_write_mask_names_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "case.csv"
    target.write_text("0,1\n")
    with pytest.raises(InputError) as caught:
        writers.write_mask(np.zeros((2, 2, 2), dtype=np.uint8), target)  # CSV holds 2D maps only
    assert caught.value.path == target
    assert target.read_text() == "0,1\n"
    assert names(tmp_path) == ["case.csv"]


def test_file_leftovers_of_dead_processes_are_removed_by_the_next_write(tmp_path, live_pid):
    folder = tmp_path / "run"
    folder.mkdir()
    gone = dead_pid()
    dead_leftovers = [f".model.{gone}.tmp.keras", f".summary.json.{gone}.tmp"]
    live_leftovers = [f".model.{live_pid}.tmp.keras", f".summary.json.{live_pid}.tmp"]
    for name in dead_leftovers + live_leftovers:
        (folder / name).write_bytes(b"partial")
    with atomic_file(folder / "model.keras") as tmp:
        tmp.write_bytes(b"model")
    write_json_atomic({}, folder / "summary.json")
    assert names(folder) == sorted(["model.keras", "summary.json"] + live_leftovers)


def test_own_pid_leftover_of_an_earlier_process_is_overwritten(tmp_path):
    # containers often give each run the same process id
    stale = temporary_file_path(tmp_path / "out.png")
    stale.write_bytes(b"stale")
    with atomic_file(tmp_path / "out.png") as tmp:
        assert not tmp.exists()
        tmp.write_bytes(b"fresh")
    assert names(tmp_path) == ["out.png"]


def test_atomic_file_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    target = tmp_path / "table.csv"
    write_text_atomic("a,b\n", target)
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert synced[0].endswith(f".table.csv.{os.getpid()}.tmp")  # the file, before the rename
        assert synced[1] == str(tmp_path)  # then the folder, after it


# ----------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(params=["exchange", "two renames"])
def swap_mode(request, monkeypatch):
    """Run a folder test with the one-step exchange (where supported) and with the two-rename fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(artifacts, "_exchange", lambda first, second: False)
    return request.param


def test_atomic_directory_replaces_the_folder_whole(tmp_path, swap_mode):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with atomic_directory(final) as building:
        assert building == tmp_path / f".out.{os.getpid()}.tmp"
        (building / "new.txt").write_text("new")
        assert names(final) == ["stale.txt"]
    assert names(final) == ["new.txt"]
    assert names(tmp_path) == ["out"]


def test_failing_build_keeps_the_old_folder(tmp_path, swap_mode):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as building:
            (building / "new.txt").write_text("new")
            raise RuntimeError("stage failed")
    assert names(final) == ["old.txt"]
    assert names(tmp_path) == ["out"]


def test_interrupted_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_exchange", lambda first, second: False)
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_replace = os.replace

    def interrupted_replace(source, destination):
        if Path(source).name.endswith(".tmp"):  # the second rename
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(artifacts.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as building:
            (building / "new.txt").write_text("new")
    assert names(final) == ["old.txt"]
    assert names(tmp_path) == ["out"]


def test_folder_lost_by_a_killed_swap_is_restored_and_leftovers_removed(tmp_path):
    # The state a process killed between "out -> .out.<pid>.old" and ".out.<pid>.tmp -> out" leaves behind.
    gone = dead_pid()
    old = tmp_path / f".out.{gone}.old"
    old.mkdir()
    (old / "result.txt").write_text("previous result")
    half = tmp_path / f".out.{gone}.tmp"
    half.mkdir()
    (half / "result.txt").write_text("new result")
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as building:
            assert (final / "result.txt").read_text() == "previous result"  # restored on entry
            assert names(tmp_path) == sorted(["out", building.name])
            raise RuntimeError("this run fails too")
    assert (final / "result.txt").read_text() == "previous result"
    assert names(tmp_path) == ["out"]


def test_dead_leftovers_beside_an_existing_folder_are_removed(tmp_path):
    gone = dead_pid()
    final = tmp_path / "out"
    final.mkdir()
    (final / "current.txt").write_text("current")
    for kind in ("tmp", "old"):
        (tmp_path / f".out.{gone}.{kind}").mkdir()
        (tmp_path / f".out.{gone}.{kind}" / "x").write_text("leftover")
    (tmp_path / f".other.{gone}.tmp").mkdir()  # another folder's leftover: not this call's business
    with atomic_directory(final) as building:
        assert names(tmp_path) == sorted(["out", building.name, f".other.{gone}.tmp"])
        (building / "next.txt").write_text("next")
    assert names(final) == ["next.txt"]


def test_live_process_leftovers_are_left_alone(tmp_path, live_pid):
    final = tmp_path / "out"
    busy = [tmp_path / f".out.{live_pid}.tmp", tmp_path / f".out.{live_pid}.old"]
    for folder in busy:
        folder.mkdir()
        (folder / "x").write_text("in progress")
    with atomic_directory(final) as building:
        (building / "mine.txt").write_text("mine")
    assert names(final) == ["mine.txt"]
    assert names(tmp_path) == sorted(["out"] + [folder.name for folder in busy])
    assert all((folder / "x").read_text() == "in progress" for folder in busy)


def test_atomic_directory_fsyncs_everything_it_built(tmp_path, monkeypatch, swap_mode):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    with atomic_directory(tmp_path / "out") as building:
        (building / "a.txt").write_text("a")
        (building / "sub").mkdir()
        (building / "sub" / "b.txt").write_text("b")
    # two files, two folders in the tree, and the parent folder after the swap
    assert len(calls) >= 5
