"""The train/test split and the search's folds: seeded, stratified on foreground, grouped by patient or volume."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np


def grouped_folds(
    ids: Sequence[str], group_ids: Sequence[str], has_foreground: Sequence[bool], num_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num_folds`` pairs of (train_indices, held_out_indices) into ``ids``, as StratifiedGroupKFold builds them.

    No group (patient or volume) is in two folds, the share of slices with foreground is kept about
    equal, and the folds depend only on the ids and the seed, not on the order the files were found in:
    the inputs are sorted by id first.
    """
    # Imported here: scikit-learn adds ~180 MB to every preload worker process that imports this package.
    from sklearn.model_selection import StratifiedGroupKFold

    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    groups = np.asarray(group_ids)[order]
    strata = np.asarray(has_foreground, dtype=int)[order]
    num_groups = len(np.unique(groups))
    if num_groups < max(2, num_folds):
        raise ValueError(f"cannot make {max(2, num_folds)} folds of {num_groups} patient/volume groups")
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Warns when a stratum has fewer members than folds; the folds are still valid, just less balanced.
        warnings.simplefilter("ignore", UserWarning)
        return [(np.sort(order[train]), np.sort(order[held_out]))
                for train, held_out in splitter.split(np.zeros(len(ids)), strata, groups)]


def split_train_test(
    ids: Sequence[str], group_ids: Sequence[str], has_foreground: Sequence[bool], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_indices, test_indices) into ``ids``: the first of k = round(1 / test_fraction) folds.

    See :func:`grouped_folds`; with fewer groups than k, there are as many folds as groups.
    """
    num_groups = len(set(group_ids))
    if num_groups < 2:
        raise ValueError(f"cannot split {num_groups} patient/volume group into train and test; need at least 2")
    num_folds = int(min(max(2, round(1.0 / test_fraction)), num_groups))
    return grouped_folds(ids, group_ids, has_foreground, num_folds, seed)[0]
