"""The samples a process has drawn, for the built-in data sets that draw theirs (``synthetic``,
``shapes``): shared by every data set object in the process.

``kdcache demo`` trains a teacher, builds two caches, trains five students and compares them in
one process, and each of those steps opens the data set anew; so do the tests, hundreds of
times a process. A drawn sample depends on its key alone (seed, split, index and size), so a
second object reads the first one's drawing instead of drawing it again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from kdcache.core.errors import DatasetError

T = TypeVar("T", np.ndarray, tuple)

#: the most samples a drawn split may be given (each gets its reference when the data set opens)
MAX_SIZE = 1_000_000


def split_size(dataset: str, size, default: int) -> int:
    """A drawn data set's ``-o size=N`` (``default`` when not given), checked: 0 to :data:`MAX_SIZE`."""
    n = default if size is None else int(size)
    if not 0 <= n <= MAX_SIZE:
        raise DatasetError(f"{dataset} data set size must be in [0, {MAX_SIZE}], got {size}")
    return n


class Rendered:
    """Drawn samples by key, the least recently used going first beyond ``budget`` bytes. What is
    kept is read-only (its arrays' ``writeable`` flag cleared): readers copy it."""

    def __init__(self, budget: int):
        self.budget = budget
        self.samples: OrderedDict[tuple, np.ndarray | tuple[np.ndarray, ...]] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple, draw: Callable[[], T]) -> T:
        """The sample under ``key``: kept, or ``draw()`` (an array or a tuple of arrays) now."""
        hit = self.samples.get(key)
        if hit is not None:
            self.samples.move_to_end(key)
            return hit
        sample = draw()
        arrays = sample if isinstance(sample, tuple) else (sample,)
        for a in arrays:
            a.setflags(write=False)
        size = sum(a.nbytes for a in arrays)
        if size <= self.budget:
            self.samples[key] = sample
            self.bytes += size
            while self.bytes > self.budget:
                old = self.samples.popitem(last=False)[1]
                self.bytes -= sum(a.nbytes for a in (old if isinstance(old, tuple) else (old,)))
        return sample

    def clear(self) -> None:
        self.samples.clear()
        self.bytes = 0
