"""Subsets of a split: K-fold cross-validation and ``--limit``."""

from __future__ import annotations

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import SegmentationDataset
from kdcache.data.registry import build_dataset


def kfold_indices(n: int, folds: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of fold ``fold`` of ``folds`` over ``n`` samples.

    Samples are shuffled once with ``seed`` (the same for every fold, so the folds partition
    the data) and cut into ``folds`` near-equal contiguous parts; both lists are returned in
    the original sample order.
    """
    if folds < 2:
        raise DatasetError(f"--folds must be at least 2, got {folds}")
    if not 0 <= fold < folds:
        raise DatasetError(f"--fold must be in 0..{folds - 1} for --folds {folds}, got {fold}")
    if n < folds:
        raise DatasetError(f"cannot cut {n} samples into {folds} folds")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    held = set(parts[fold].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def limit(dataset: SegmentationDataset, n: int | None) -> SegmentationDataset:
    """The first ``n`` samples (all when ``n`` is None)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise DatasetError(f"--limit must be positive, got {n}")
    return dataset.select(range(n))


def fold_split(
    dataset: SegmentationDataset, folds: int, fold: int, seed: int = 0
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Split one data set into (train, validation) parts for fold ``fold`` of ``folds``."""
    train_idx, val_idx = kfold_indices(len(dataset), folds, fold, seed)
    return dataset.select(train_idx), dataset.select(val_idx)


def train_val_sets(
    dataset: str,
    *,
    data_root: str | None = None,
    dataset_options: dict | None = None,
    train_split: str = "train",
    val_split: str = "val",
    folds: int | None = None,
    fold: int = 0,
    seed: int = 0,
    limit_n: int | None = None,
) -> tuple[SegmentationDataset, SegmentationDataset, str]:
    """The (train, validation, validation's name) sets of a run.

    Without folds: ``train_split`` and ``val_split``, each cut to its first ``limit_n``
    samples. With ``folds``: the first ``limit_n`` samples of ``train_split`` are divided, and
    fold ``fold`` is the validation part.
    """
    options = dataset_options or {}
    train = limit(build_dataset(dataset, train_split, data_root, **options), limit_n)
    if folds:
        train, val = fold_split(train, folds, fold, seed)
        return train, val, f"{train_split} fold {fold}/{folds}"
    val = limit(build_dataset(dataset, val_split, data_root, **options), limit_n)
    return train, val, val_split
