"""The worker processes that read and prepare the cases, and the job each runs for one case.

A job reads its case once (:func:`segmenter.preload.prepare.read_case`); a training case sends back its
record and its training samples' records, their arrays appended to the worker's own scratch files
(:class:`segmenter.preload.store.ScratchSamples`); a test case is written by the worker itself and only its
record comes back, and a single volume split into a slab does both. Errors cross the process boundary as
one line of text.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from segmenter import interrupts
from segmenter.config import Config
from segmenter.errors import InputError, resource_problem
from segmenter.manifest import CaseRecord, VolumePlan
from segmenter.preload import prepare, store
from segmenter.preload.discovery import CaseFiles
from segmenter.preload.fingerprint import source_digest
from segmenter.preload.split import test_slab

TRAIN, TEST, SLAB, SURVEY = "train", "test", "slab", "survey"


@dataclasses.dataclass(frozen=True)
class CaseJob:
    case: CaseFiles
    role: str  # TRAIN, TEST, SLAB or SURVEY (what a 3D plan needs to know of a training case)
    preloaded_dir: Path  # where test cases (and 3D training volumes) are written (the stage's temporary folder)
    plan: Optional[VolumePlan] = None  # 3D training cases are prepared by it


@dataclasses.dataclass
class CaseOutcome:
    """What a worker sends back for one case."""

    job: CaseJob
    records: list[CaseRecord] = dataclasses.field(default_factory=list)  # the case's, or train part and slab
    test_records: list[CaseRecord] = dataclasses.field(default_factory=list)
    samples: list[dict] = dataclasses.field(default_factory=list)  # records; 2D arrays are in the scratch files
    error: Optional[str] = None  # the case is invalid (skipped with --skip-invalid)
    digests: Optional[dict] = None  # path -> sha256 of the case's sources, when asked for
    digest_error: Optional[str] = None  # a source could not be hashed: always fatal
    survey: Optional[prepare.CaseSurvey] = None  # role SURVEY


def run_case(job: CaseJob, config: Config) -> CaseOutcome:
    """Read one case and do its role's work; see the module docstring."""
    loaded = prepare.read_case(job.case, config)
    outcome = CaseOutcome(job)
    if job.role == SURVEY:
        outcome.survey = prepare.survey_case(loaded, config)
    elif job.role == TRAIN and job.plan is not None:
        outcome.records.append(prepare.case_record(job.case, loaded))
        outcome.samples = [store.write_training_volume(loaded, config, job.plan, job.preloaded_dir)]
    elif job.role == TRAIN:
        outcome.records.append(prepare.case_record(job.case, loaded))
        outcome.samples = _to_scratch(prepare.training_samples(loaded, config), job, config)
    elif job.role == TEST:
        if config.preload.spatial_dims == 3:
            prepare.check_volume(loaded)
        store.write_test_case(loaded, job.preloaded_dir)
        outcome.test_records.append(prepare.case_record(job.case, loaded))
    else:
        axis = config.preload.slice_axis
        if loaded.mask.ndim != 3:
            raise InputError(job.case.image_paths[0], "the only case is a 2D image: nothing to split into train "
                                                      "and test")
        slab = test_slab(loaded.mask.shape[axis], config.preload.test_fraction, config.seed)
        outcome.records.append(prepare.case_record(job.case, loaded))
        outcome.samples = _to_scratch(prepare.training_samples(loaded, config, skip=slab), job, config)
        test_case = prepare.cut_slab(loaded, slab, axis)
        store.write_test_case(test_case, job.preloaded_dir)
        outcome.test_records.append(prepare.case_record(job.case, test_case, slab=slab))
    return outcome


# This process's scratch files, opened on its first 2D training sample: a worker's, or the stage's own
# process's when it runs the cases itself (closed by Workers.close).
_scratch: Optional[store.ScratchSamples] = None


def _to_scratch(samples: list[dict], job: CaseJob, config: Config) -> list[dict]:
    """Move the samples' arrays to this process's scratch files; their records remain, with their place there."""
    global _scratch
    folder = job.preloaded_dir / store.SCRATCH_FOLDER / f"process_{os.getpid()}"
    if _scratch is None or _scratch.folder != folder:
        close_scratch()
        _scratch = store.ScratchSamples(folder, config.preload.image_size, len(config.preload.channels))
    for sample in samples:
        _scratch.append(sample)
    _scratch.flush()
    return samples


def close_scratch() -> None:
    global _scratch
    if _scratch is not None:
        _scratch.close()
        _scratch = None


def _case_job(job: CaseJob, config: Optional[Config] = None, with_digests: bool = False) -> CaseOutcome:
    """Run one case; with ``with_digests`` also hash its sources while they are in the page cache."""
    digests = None
    if with_digests:
        try:
            digests = {str(path): source_digest(path) for path in job.case.source_paths}
        except InputError as error:
            return CaseOutcome(job, digest_error=str(error))
    try:
        outcome = run_case(job, config or _worker_config)
    except InputError as error:  # InputError does not survive pickling between processes: send its text
        outcome = CaseOutcome(job, error=str(error))
    except Exception as error:  # An unexpected failure in a reader or the disk still names the file.
        if resource_problem(error) is not None:
            raise  # a full disk or too little memory is no fault of the case: it stops the stage (cli)
        outcome = CaseOutcome(job, error=str(InputError(job.case.image_paths[0], f"{type(error).__name__}: {error}")))
    outcome.digests = digests
    return outcome


# Set in each worker process by _init_worker, so the config crosses the process boundary once, not per job.
_worker_config: Optional[Config] = None


# glibc's mallopt parameters (malloc.h) and the values set in the workers (see _keep_freed_memory).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 * 2**20, 128 * 2**20


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory of up to 32 MB blocks for reuse, not hand it back to the kernel.

    A 512 x 512 case allocates and frees a few dozen arrays of 0.25 to 2 MB (file bytes, parsed values,
    resized slices). By default glibc maps blocks that large afresh and unmaps them when freed, or trims
    the heap, so each case faulted its memory in again: about 1,750 page faults and 4.5 to 5.5 ms of kernel
    time per 512 x 512 CSV slice on a virtual machine, a third of its CPU time; with these settings, about
    1 ms. A worker then keeps the memory of its largest case until it ends. Elsewhere than glibc nothing
    changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS; Windows has no CDLL(None))
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def _init_worker(config_json: str) -> None:
    global _worker_config
    # Ctrl-C reaches the whole process group: the main process stops the workers and cleans up, alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_freed_memory()
    _worker_config = Config.model_validate_json(config_json)


class Workers:
    """A process pool started on first use and shared by all the work (hashing, the cases); or none at all.

    ``processes`` 0 runs everything in this process (``parallel`` is False).
    """

    def __init__(self, config: Config, processes: int):
        self.config = config
        self.processes = processes
        self.parallel = processes > 0
        self._pool = None

    def start(self) -> None:
        """Start the worker processes now (they start on first use otherwise); nothing without workers."""
        if self.parallel:
            self._started()

    def _started(self):
        if self._pool is None:
            # "spawn" because a forked child of a process that has TensorFlow loaded (tests, notebooks) can hang.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.processes, initializer=_init_worker,
                                      initargs=(self.config.model_dump_json(),))
        return self._pool

    def map(self, function, items, ordered: bool, chunksize: int):
        pool = self._started()
        return (pool.imap if ordered else pool.imap_unordered)(function, items, chunksize=chunksize)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if not self.parallel:
            close_scratch()

    def run_cases(self, jobs: list[CaseJob], with_digests: bool):
        """Yield a CaseOutcome per job, in the order they finish, with a progress bar on a terminal."""
        progress = dict(total=len(jobs), unit="case", desc="preload", mininterval=1.0, disable=None)
        # Worker processes have the config already (_init_worker); in this process it is passed along.
        job = functools.partial(_case_job, config=None if self.parallel else self.config, with_digests=with_digests)
        if self.parallel:
            # A chunk of jobs goes to a worker at once and its outcomes come back as one message. The pool's
            # worker-handler thread wakes for each message and spins until it is read: with chunks of 4, 2 s
            # of CPU for 5,000 slices. A chunk is at most an eighth of a worker's share, so that no worker
            # is left alone with a long last chunk (a chunk of one for a few volumes).
            chunksize = max(1, min(16, len(jobs) // (8 * self.processes)))
            outcomes = self.map(job, jobs, ordered=False, chunksize=chunksize)
        else:
            outcomes = map(job, jobs)
        for outcome in tqdm(outcomes, **progress):
            interrupts.raise_if_requested()  # a Ctrl-C swallowed inside a reader stops here, not at the end
            yield outcome
