"""A kdcache store read by other Zarr v3 readers: every array, through tensorstore and through
zarr-python, holds the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr


def assert_every_array_plain_zarr(path: Path, must_hold: set[str]) -> list[str]:
    """Open every array of the store at ``path`` with tensorstore's zarr3 driver and compare it with
    zarr-python's read; ``must_hold`` names arrays that must be among them. Returns the names."""
    ts = pytest.importorskip("tensorstore", reason='tensorstore is not installed: pip install "kdcache[dev]"')
    g = zarr.open_group(str(path), mode="r")
    arrays = [name for name, a in g.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert must_hold <= set(arrays), sorted(arrays)
    for name in arrays:
        other = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(path) / name)}}).result()
        np.testing.assert_array_equal(other.read().result(), g[name][:], err_msg=name)
    return arrays
