"""Which cases are tested: a seeded split grouped by patient, a fixed test set, or a slab of one volume.

The split is made from the case ids and groups alone, before any label map is read: test cases are never
chosen by their labels. Whole cases are tested; the training filters (``keep_empty_slices``,
``require_labels``) apply to the training samples only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from segmenter.config import Config
from segmenter.errors import InputError
from segmenter.preload.discovery import CaseFiles
from segmenter.preprocessing.split import split_train_test


@dataclasses.dataclass
class CaseSplit:
    train: list[CaseFiles]
    test: list[CaseFiles]
    #: "random", "fixed" or "slab" (see segmenter.manifest.Manifest.split).
    method: str


def split_cases(cases: list[CaseFiles], config: Config, log) -> CaseSplit:
    """Split the cases for ``config``; see the module docstring.

    - ``preload.test_cases`` / ``preload.test_dir``: exactly those cases are tested ("fixed");
    - one case only: a 3D case is cut along ``preload.slice_axis`` into a training part and one test slab
      (see :func:`test_slab`; "slab"), which the log says is optimistic;
    - otherwise the groups are split with ``preload.test_fraction`` and the seed ("random").

    Raises InputError when a listed test case does not exist, or a split would leave one side empty.
    """
    settings = config.preload
    fixed_ids = set(settings.test_cases)
    if fixed_ids or any(case.in_test_dir for case in cases):
        known = {case.case_id for case in cases}
        unknown = sorted(fixed_ids - known)
        if unknown:
            raise InputError(settings.input_dir, f"preload.test_cases names {len(unknown)} cases that are not in "
                                                 f"the dataset (e.g. {unknown[0]!r})")
        test = [case for case in cases if case.in_test_dir or case.case_id in fixed_ids]
        train = [case for case in cases if not (case.in_test_dir or case.case_id in fixed_ids)]
        shared = sorted({case.group_id for case in train} & {case.group_id for case in test})
        if shared:
            log(f"Note: group {shared[0]!r} has cases in both the fixed test set and training "
                f"({len(shared)} such groups)")
        if not train:
            raise InputError(settings.input_dir, "the fixed test set holds every case; nothing is left to train on")
        return CaseSplit(train, test, "fixed")
    if len(cases) == 1:
        log(f"One case only ({cases[0].case_id}): a slab of {settings.test_fraction:.0%} of its slices along "
            f"axis {settings.slice_axis} is the test case, the rest is trained on; neighbouring slices are alike, "
            "so test figures will be optimistic.")
        return CaseSplit(cases, cases, "slab")
    groups = [case.group_id for case in cases]
    if len(set(groups)) < 2:
        raise InputError(settings.input_dir, f"cannot split into train and test: preload.group_pattern "
                                             f"{settings.group_pattern!r} puts all {len(cases)} cases in one "
                                             f"group ({groups[0]})")
    ids = [case.case_id for case in cases]
    train_idx, test_idx = split_train_test(ids, groups, [True] * len(cases), settings.test_fraction, config.seed)
    return CaseSplit([cases[i] for i in train_idx], [cases[i] for i in test_idx], "random")


def test_slab(num_slices: int, test_fraction: float, seed: int) -> tuple[int, int]:
    """[first, stop) of the test slab of a single volume: ``test_fraction`` of its slices, at a seeded place.

    The slab is contiguous, so that at most two training slices border it; its place is drawn from the seed,
    never from the labels.
    """
    if num_slices < 2:
        raise ValueError(f"a single case of {num_slices} slice cannot be split into train and test")
    length = min(num_slices - 1, max(1, round(test_fraction * num_slices)))
    first = int(np.random.default_rng(seed).integers(0, num_slices - length + 1))
    return first, first + length
