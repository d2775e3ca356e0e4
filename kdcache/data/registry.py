"""The data set registry and its one entry point, :func:`build_dataset`."""

from __future__ import annotations

import inspect
from pathlib import Path

from kdcache.core.errors import DatasetError
from kdcache.core.registry import Registry
from kdcache.data.base import SegmentationDataset

DATASETS: Registry[type[SegmentationDataset]] = Registry("data set", DatasetError)


def build_dataset(name: str, split: str, root: str | Path | None = None, **options) -> SegmentationDataset:
    """Open split ``split`` of data set ``name`` (``synthetic`` needs no root)."""
    cls = DATASETS.get(name)
    if getattr(cls, "needs_root", True):
        if root is None:
            raise DatasetError(f"data set '{name}' needs --data-root pointing at its files")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"--data-root {root} does not exist or is not a directory")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in params or k in ("self", "root", "split"))
    if unknown:
        accepted = [k for k in params if k not in ("self", "root", "split")]
        raise DatasetError(
            f"data set '{name}' does not take option(s) {unknown}; it accepts {accepted or 'none'}"
        )
    if not options:
        return cls(root=root, split=split)
    try:
        return cls(root=root, split=split, **options)
    except (TypeError, ValueError, OverflowError) as exc:  # an option's value of the wrong kind or out of range
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise DatasetError(f"data set '{name}' cannot take {given}: {exc}; fix the --dataset-option value") from None
