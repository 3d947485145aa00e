"""The preload stage: find, split, prepare and store the cases, and write the manifest.

The work per case runs in worker processes (:mod:`segmenter.preload.workers`), which also compute the
sha256 of every source file for the manifest: of each case as they process it, or of all of them first when
an earlier manifest exists (the up-to-date check). Everything is written into a temporary folder that
replaces the output folder only when everything succeeded.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from segmenter import layout, locks
from segmenter.artifacts import atomic_directory
from segmenter.config import Config, ConfigError
from segmenter.errors import InputError
from segmenter.manifest import (MANIFEST_VERSION, Manifest, ManifestError, TestSplit, TrainSplit, VolumePlan,
                                read_manifest, read_manifest_version, write_manifest)
from segmenter.preload.discovery import find_cases
from segmenter.preload.fingerprint import fingerprint, hash_sources
from segmenter.preload.split import split_cases
from segmenter.preload.store import SCRATCH_FOLDER, ScratchFolders, write_shards
from segmenter.preload.workers import SLAB, SURVEY, TEST, TRAIN, CaseJob, Workers
from segmenter.preprocessing import normalization, planner, resample


@dataclasses.dataclass
class PreloadResult:
    output_dir: Path
    num_train_cases: int
    num_train_samples: int
    num_test_cases: int
    skipped: list
    up_to_date: bool = False

    def __str__(self) -> str:
        if self.up_to_date:
            return f"{self.output_dir} is up to date (use --overwrite to redo it)"
        return (f"{self.output_dir}: {self.num_train_cases} training cases ({self.num_train_samples} training "
                f"samples), {self.num_test_cases} test cases, {len(self.skipped)} skipped")


def _up_to_date(config: Config, source_hashes: dict, log) -> Optional[Manifest]:
    """The earlier manifest if the output is up to date, else None (with a notice when it is of another version)."""
    try:
        manifest = read_manifest(config.preloaded_dir)
    except ManifestError:
        version = read_manifest_version(config.preloaded_dir)
        if version is not None and version != MANIFEST_VERSION:
            log(f"{layout.manifest_path(config.preloaded_dir)} is of manifest version {version}, this segmenter "
                f"writes version {MANIFEST_VERSION}: preloading again.")
        return None
    files = [config.preloaded_dir / name for name in manifest.train.shards]
    files += [layout.test_labels_dir(config.preloaded_dir)]
    if manifest.fingerprint == fingerprint(config, source_hashes) and all(path.exists() for path in files):
        return manifest
    return None


@locks.locked("preload")
def preload(config: Config, overwrite: bool = False, skip_invalid: Optional[bool] = None, log=print) -> PreloadResult:
    """Run the preload stage for ``config``; see the module docstring."""
    skip_invalid = config.preload.skip_invalid if skip_invalid is None else skip_invalid
    output_dir = config.preloaded_dir
    cases = find_cases(config, log=log)
    processes = config.preload.workers if config.preload.workers > 1 and len(cases) > 1 else 0
    with contextlib.closing(Workers(config, processes)) as workers:
        # The up-to-date check needs every source's digest before any work; without it (a first run, or
        # --overwrite) the workers hash each case's files as they process it, saving a pass over the data.
        hash_first = layout.manifest_path(output_dir).is_file() and not overwrite
        if hash_first:
            source_hashes = hash_sources(cases, workers)
            old = _up_to_date(config, source_hashes, log)
            if old is not None:
                return PreloadResult(output_dir, len(old.train.cases), old.train.num_samples, len(old.test.cases),
                                     old.skipped, up_to_date=True)
        # The workers start (each imports the readers, about a second) while this process splits the cases
        # (scikit-learn's import, one to two seconds).
        workers.start()
        split = split_cases(cases, config, log)
        with atomic_directory(output_dir) as tmp_dir, _stopped_on_error(workers):
            layout.test_images_dir(tmp_dir).mkdir(parents=True)
            layout.test_labels_dir(tmp_dir).mkdir(parents=True)
            plan = None
            if config.preload.spatial_dims == 3:
                if split.method == "slab":
                    raise InputError(config.preload.input_dir, "preload.spatial_dims 3 needs at least two volumes "
                                                               "(one to train on, one to test)")
                plan = plan_volumes(config, split.train, workers, tmp_dir, log)
            roles = [(case, SLAB if split.method == "slab" else TRAIN) for case in split.train]
            roles += [(case, TEST) for case in split.test if split.method != "slab"]
            jobs = [CaseJob(case, role, tmp_dir, plan if role == TRAIN else None) for case, role in roles]
            scratch = ScratchFolders(tmp_dir / SCRATCH_FOLDER, config.preload.image_size, len(config.preload.channels))
            train_records, test_records, samples, skipped, digests = [], [], [], [], {}
            for outcome in workers.run_cases(jobs, with_digests=not hash_first):
                if outcome.digest_error:
                    raise InputError(None, outcome.digest_error)
                digests.update(outcome.digests or {})
                if outcome.error:
                    if not skip_invalid:
                        raise InputError(None, outcome.error)
                    case = outcome.job.case
                    skipped.append({"case_id": case.case_id, "image": str(case.image_paths[0]),
                                    "mask": str(case.mask_path), "error": outcome.error})
                    continue
                train_records += outcome.records
                test_records += outcome.test_records
                samples += outcome.samples  # records: the arrays of 2D samples are in the workers' scratch files
            workers.close()  # their memory is not needed while the shards are written
            if not hash_first:
                source_hashes = dict(sorted(digests.items()))
            skipped.sort(key=lambda entry: entry["case_id"])  # workers finish in any order
            _report_skipped(skipped, log)
            _check_split(config, train_records, test_records, samples)
            samples.sort(key=lambda sample: sample["id"])
            if plan is None:
                shards = write_shards(tmp_dir, "train", samples, scratch, config.preload.shard_size)
            else:  # 3D: the workers wrote one file per training volume
                shards = [layout.train_volume_name(sample["id"]) for sample in samples]
            scratch.remove()
            manifest = Manifest(
                version=MANIFEST_VERSION, fingerprint=fingerprint(config, source_hashes),
                experiment=config.experiment, classes=config.classes, channels=config.preload.channels,
                sample_size=list(config.preload.image_size if plan is None else plan.patch_size),
                slice_axis=config.preload.slice_axis, spatial_dims=config.preload.spatial_dims, plan=plan,
                preprocessing=config.preload.model_dump(mode="json"), sources=source_hashes, skipped=skipped,
                split=split.method,
                train=TrainSplit(cases=sorted(train_records, key=lambda r: r.id),
                                 samples=[{k: v for k, v in s.items() if k != "scratch"} for s in samples],
                                 shards=shards, samples_with_label=_label_counts(samples)),
                test=TestSplit(cases=sorted(test_records, key=lambda r: r.id)),
                config=config.to_jsonable(),
            )
            write_manifest(manifest, tmp_dir)
    return PreloadResult(output_dir, len(manifest.train.cases), manifest.train.num_samples, len(manifest.test.cases),
                         skipped)


def plan_volumes(config: Config, train_cases: list, workers: Workers, tmp_dir: Path, log) -> VolumePlan:
    """Plan a 3D dataset from its training cases, as nnU-Net plans: the target spacing (the median unless
    ``preload.target_spacing`` is set), the nnunet_ct statistics of each channel that uses it, and the patch
    size, batch size and depth for ``preload.plan_memory_mb`` (those the config leaves open)."""
    surveys, errors = [], []
    for outcome in workers.run_cases([CaseJob(case, SURVEY, tmp_dir) for case in train_cases], with_digests=False):
        if outcome.error:  # reported (or skipped, with --skip-invalid) by the preparation that follows
            errors.append(outcome.error)
            continue
        surveys.append(outcome.survey)
    if not surveys:
        raise InputError(config.preload.input_dir, f"no training volume could be read ({sorted(errors)[0]})")
    surveys.sort(key=lambda survey: survey.case_id)
    spacings = np.array([survey.spacing for survey in surveys])
    target = (tuple(config.preload.target_spacing) if config.preload.target_spacing is not None
              else tuple(float(v) for v in np.median(spacings, axis=0)))
    shapes = np.array([resample.resampled_shape(survey.shape, survey.spacing, target) for survey in surveys])
    median_shape = tuple(int(v) for v in np.median(shapes, axis=0))
    statistics = []
    for channel in range(len(config.preload.channels)):
        parts = [survey.foreground_samples[channel] for survey in surveys]
        if any(part is None for part in parts):
            statistics.append(None)
            continue
        if not any(len(part) for part in parts):
            raise InputError(config.preload.input_dir, "normalization nnunet_ct needs foreground intensities, and "
                                                       "no training volume has any foreground")
        statistics.append(normalization.foreground_intensity_statistics(parts))
    model, settings = config.train.model, config.preload
    sizes = dict(num_channels=len(settings.channels), num_classes=config.num_classes,
                 memory_mb=settings.plan_memory_mb, base_filters=model.base_filters)
    try:
        if settings.patch_size is None:
            plan = planner.plan_3d(median_shape, target, **sizes)
            if model.depth is not None:
                plan = planner.plan_for_patch(plan.patch_size, **sizes, depth=model.depth)
        else:
            plan = planner.plan_for_patch(settings.patch_size, **sizes, depth=model.depth)
    except ValueError as error:
        raise ConfigError(f"preload.patch_size / plan_memory_mb / train.model.depth: {error}") from None
    log(f"3D plan: spacing {' x '.join(f'{v:g}' for v in target)} mm, median shape {list(median_shape)}, "
        f"{planner.describe(plan)}")
    return VolumePlan(target_spacing=list(target), median_shape=list(median_shape),
                      patch_size=list(plan.patch_size), batch_size=plan.batch_size, depth=plan.depth,
                      estimated_mb=round(float(plan.estimated_mb), 1), crop_to_nonzero=settings.crop_to_nonzero,
                      intensity_statistics=statistics, image_interpolation=settings.image_interpolation,
                      label_interpolation=settings.label_interpolation,
                      anisotropy_threshold=settings.anisotropy_threshold)


@contextlib.contextmanager
def _stopped_on_error(workers: Workers):
    """Stop the workers before the temporary folder is removed, so none is still writing into it."""
    try:
        yield
    except BaseException:
        workers.close()
        raise


def _report_skipped(skipped: list[dict], log) -> None:
    if skipped:
        log(f"Skipped {len(skipped)} invalid cases (--skip-invalid):")
        for entry in skipped:
            log(f"  {entry['error']}")


def _check_split(config: Config, train_records: list, test_records: list, samples: list[dict]) -> None:
    """Both splits hold something, and no two samples share an id."""
    if not samples:
        raise InputError(config.preload.input_dir, f"no training samples left after validation and the filters "
                                                   f"(keep_empty_slices, require_labels) of {len(train_records)} "
                                                   "training cases")
    if not test_records:
        raise InputError(config.preload.input_dir, "no valid test case left (every test case was skipped)")
    counts = collections.Counter(sample["id"] for sample in samples)
    duplicates = sorted(sample_id for sample_id, count in counts.items() if count > 1)
    if duplicates:
        raise InputError(config.preload.input_dir, f"duplicate sample id {duplicates[0]!r}")


def _label_counts(samples: list[dict]) -> dict[int, int]:
    counts: dict[int, int] = collections.Counter()
    for sample in samples:
        counts.update(sample["labels"])
    return dict(sorted(counts.items()))
