"""One run at a time per output: a lock per preloaded dataset and per stage of an experiment.

Two runs that write the same outputs would interleave their files (two trainings writing one
``checkpoints/last/model.keras``, two preloads swapping the same folder), and a stage reading the preloaded
dataset while preload replaces it may mix two versions of it. So every stage run holds locks, taken when
it starts and released when it ends, however it ends:

==========  ==================================================  =========================================
stage       exclusive lock (one run at a time)                  shared lock (no preload meanwhile)
==========  ==================================================  =========================================
preload     ``<preloaded_root>/.<experiment>.lock``             --
tune        ``<experiments_root>/<experiment>/.tune.lock``      the preloaded dataset's lock
train       ``<experiments_root>/<experiment>/.train.lock``     the preloaded dataset's lock
predict     ``<experiments_root>/<experiment>/.predict.lock``   the preloaded dataset's lock (the test set)
evaluate    ``<experiments_root>/<experiment>/.evaluate.lock``  the preloaded dataset's lock
==========  ==================================================  =========================================

The lock files lie *beside* the folders they guard, not in them, because preload and evaluate replace their
output folder whole (:func:`segmenter.artifacts.atomic_directory`). They are hidden, and the last holder
removes its lock file when it lets go, while still holding the lock; a run that opened the file just before
then finds, once it holds its lock, that the path no longer names the file it locked, and starts over on the
new file, so two runs never hold "the" lock at once. Only a run killed with SIGKILL leaves a lock file
behind, free to take.

A run that finds a lock held stops at once with :class:`segmenter.errors.BusyError`, one line naming the
lock file and the process holding it: an exclusive holder writes its process id, host, start time and
command into the lock file. Locks are ``flock`` locks (``fcntl``), which the kernel releases when the
process ends, however it ends (``kill -9`` included): a lock of a dead process is simply free, and its
stale description in the file is overwritten by the next holder. Several stages may read the preloaded
dataset at once (shared locks); preload waits for none of them: it stops, naming the stage reading it.

In a distributed search (``KERASTUNER_TUNER_ID`` other than ``chief``) a tune worker shares the tune folder
with the chief and the other workers by design: it takes only the shared lock of the preloaded dataset.

``flock`` works on local filesystems and on NFS (Linux emulates it with NFS byte-range locks). On systems
without ``fcntl`` (Windows) exclusive locks use ``msvcrt.locking`` and shared locks are not taken.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from segmenter import layout
from segmenter.errors import BusyError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: The stages that read the preloaded dataset, each holding the dataset's lock shared while it runs.
READERS = ("tune", "train", "predict", "evaluate")

#: The stage whose locks this process took last (cli words its out-of-memory advice by it).
last_stage: Optional[str] = None

#: How long a run waits for a just-started holder to write its description into the lock file.
_DESCRIPTION_WAIT_S = 1.0


def dataset_lock_path(config) -> Path:
    """``<preloaded_root>/.<experiment>.lock``: the lock of the preloaded dataset (beside its folder)."""
    return layout.dataset_lock_path(config.paths.preloaded_root, config.experiment)


def stage_lock_path(config, stage: str) -> Path:
    """``<experiments_root>/<experiment>/.<stage>.lock``: the lock of the stage's output folder (beside it)."""
    return layout.stage_lock_path(config.experiment_dir, stage)


# ----------------------------------------------------------------------------------------------------
# One lock file
# ----------------------------------------------------------------------------------------------------
class FileLock:
    """A non-blocking ``flock`` on one lock file, shared or exclusive; :meth:`acquire` returns False when held."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self._fd: Optional[int] = None
        self._created: list[Path] = []  # folders made for the lock file, removed with it when left empty

    def acquire(self) -> bool:
        if fcntl is None and self.shared:
            return True  # no shared locks without fcntl: readers do not lock
        for _ in range(100):
            self._make_folder()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
            except FileNotFoundError:  # the folder was removed meanwhile by a run that let go
                continue
            try:
                if fcntl is not None:
                    fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                else:  # pragma: no cover - Windows
                    import msvcrt

                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:  # BlockingIOError (EWOULDBLOCK), or EACCES on some systems
                os.close(fd)
                return False
            # The last holder removes the file when it lets go (see release): a lock taken on a file that was
            # removed meanwhile guards nothing, so try again on the file now at the path.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                return True
            os.close(fd)
        return False

    def _make_folder(self) -> None:
        missing = [folder for folder in [self.path.parent, *self.path.parent.parents] if not folder.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = self._created or missing

    def write_description(self, description: dict) -> None:
        """Put the holder's description into the lock file (exclusive holders only)."""
        if self._fd is None or fcntl is None:
            return
        data = (json.dumps(description) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Let go; the last holder removes the lock file (a run killed with SIGKILL leaves it, which is harmless)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if fcntl is not None:
                if self.shared:  # the last reader out: only it can take the lock exclusively now
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(self.path)  # still locked: whoever opened the file meanwhile tries again (acquire)
        except OSError:  # other readers still hold it, or it is gone already
            pass
        finally:
            os.close(fd)  # releases the flock
        for folder in self._created:  # innermost first; a folder something else was put into stays
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def held_by_another(self) -> bool:
        """Whether another process holds this lock exclusively right now (probed with a shared lock)."""
        if fcntl is None or not self.path.is_file():
            return False
        probe = FileLock(self.path, shared=True)
        if probe.acquire():
            probe.release()
            return False
        return True


def _read_description(path: Path) -> Optional[dict]:
    try:
        description = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return description if isinstance(description, dict) and "pid" in description else None


def _holder(path: Path) -> Optional[dict]:
    """The description a live holder wrote into ``path``, waiting briefly for one that has just started."""
    deadline = time.monotonic() + _DESCRIPTION_WAIT_S
    while True:
        description = _read_description(path)
        if description is not None or time.monotonic() >= deadline:
            return description
        time.sleep(0.05)


def _describe(description: Optional[dict], fallback: str) -> str:
    """``segmenter train (pid 12 on host, started 2025-01-31 12:00:00)``, or ``fallback`` without a description."""
    if description is None:
        return fallback
    what = f"segmenter {description.get('stage', '?')}"
    return (f"{what} (pid {description.get('pid')} on {description.get('host', '?')}, started "
            f"{description.get('started', '?')})")


def _own_description(config, stage: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "experiment": config.experiment,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


# ----------------------------------------------------------------------------------------------------
# The locks of a stage run
# ----------------------------------------------------------------------------------------------------
def _is_tune_worker() -> bool:
    """A worker of a distributed search (the rule of :func:`segmenter.tuning.distributed_role`)."""
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "chief")


def _readers_of(config) -> str:
    """Which stages of the experiment hold the dataset's shared lock, as words for a message."""
    running = []
    for stage in READERS:
        path = stage_lock_path(config, stage)
        if FileLock(path).held_by_another():
            running.append(_describe(_holder(path), f"segmenter {stage}") + f" (lock {path})")
    return ", ".join(running) if running else "another stage reading it (tune, train, predict or evaluate)"


@contextlib.contextmanager
def stage_lock(config, stage: str, reads_dataset: bool = True) -> Iterator[None]:
    """Hold the locks of a run of ``stage`` for ``config`` (see the module docstring) while the block runs.

    Raises BusyError at once, before any work, when another live process holds one of them.
    ``reads_dataset=False`` (``predict --input``) leaves the preloaded dataset's lock alone.
    """
    global last_stage
    last_stage = stage
    held: list[FileLock] = []
    try:
        if stage == "preload":
            path = dataset_lock_path(config)
            lock = FileLock(path)
            if not lock.acquire():
                if FileLock(path).held_by_another():  # another preload
                    holder = _describe(_holder(path), "another preload")
                    raise BusyError(f"{path}: {holder} is already preloading {config.preloaded_dir}; wait for it "
                                    "to end or stop it, then run segmenter preload again")
                raise BusyError(f"{path}: the preloaded dataset {config.preloaded_dir} is in use by "
                                f"{_readers_of(config)}; wait for it to end or stop it, then run segmenter "
                                "preload again")
            lock.write_description(_own_description(config, stage))
            held.append(lock)
        else:
            if not (stage == "tune" and _is_tune_worker()):
                path = stage_lock_path(config, stage)
                lock = FileLock(path)
                if not lock.acquire():
                    holder = _describe(_holder(path), "another process")
                    raise BusyError(f"{path}: {holder} is already running for experiment {config.experiment!r} "
                                    f"and writes the same outputs; wait for it to end or stop it, then run "
                                    f"segmenter {stage} again")
                lock.write_description(_own_description(config, stage))
                held.append(lock)
            # Nothing to guard where no preloaded dataset can be yet (the stage then says to preload first).
            if reads_dataset and Path(config.paths.preloaded_root).is_dir():
                path = dataset_lock_path(config)
                lock = FileLock(path, shared=True)
                if not lock.acquire():
                    holder = _describe(_holder(path), "segmenter preload")
                    raise BusyError(f"{path}: {holder} is writing the preloaded dataset {config.preloaded_dir}; "
                                    f"wait for it to end, then run segmenter {stage} again")
                held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


F = TypeVar("F", bound=Callable)


def locked(stage: str, reads_dataset: bool = True) -> Callable[[F], F]:
    """Decorate a stage's entry point ``function(config, ...)`` to run under :func:`stage_lock`."""
    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(config, *args, **kwargs):
            with stage_lock(config, stage, reads_dataset=reads_dataset):
                return function(config, *args, **kwargs)
        return run  # type: ignore[return-value]
    return decorate
