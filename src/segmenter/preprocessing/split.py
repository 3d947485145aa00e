"""The train/test split: seeded, stratified on foreground, grouped by patient or volume."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np


def split_train_test(
    ids: Sequence[str], group_ids: Sequence[str], has_foreground: Sequence[bool], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_indices, test_indices) into ``ids``.

    No group (patient or volume) is in both parts, the share of slices with foreground is kept about
    equal, and the result depends only on the ids and the seed, not on the order the files were found
    in: the inputs are sorted by id first. With k = round(1 / test_fraction) folds the test part is one
    of k stratified group folds, as scikit-learn's StratifiedGroupKFold builds them.
    """
    # Imported here: scikit-learn adds ~180 MB to every preload worker process that imports this package.
    from sklearn.model_selection import StratifiedGroupKFold

    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    groups = np.asarray(group_ids)[order]
    strata = np.asarray(has_foreground, dtype=int)[order]
    num_groups = len(np.unique(groups))
    if num_groups < 2:
        raise ValueError(f"cannot split {num_groups} patient/volume group into train and test; need at least 2")
    num_folds = int(min(max(2, round(1.0 / test_fraction)), num_groups))
    folds = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Warns when a stratum has fewer members than folds; the split is still valid, just less balanced.
        warnings.simplefilter("ignore", UserWarning)
        train_sorted, test_sorted = next(folds.split(np.zeros(len(ids)), strata, groups))
    return np.sort(order[train_sorted]), np.sort(order[test_sorted])
