"""Integers a process shares with its DataLoader workers for a whole run.

A DataLoader whose workers are started once for the run (``persistent_workers``; kdcache keeps
spawned workers, which take seconds each to start: see :mod:`kdcache.train.batches`) gives each
worker a copy of its data set when the worker starts. What changes from epoch to epoch — the
epoch that seeds the augmentation, the samples of this rank's share, the view of a schedule the
epoch replays — must then reach the workers some other way: it lives in :class:`SharedInts`, a
torch tensor in shared memory. A forked worker maps the same memory, and a spawned one receives
it by handle (torch's multiprocessing pickler), so each reads what the main process last wrote.
The main process writes before it starts the epoch's iteration, and the workers read when they
start it (a DataLoader resumes its workers only after that), so no lock is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class SharedInts:
    """``size`` int64 values in shared memory (see the module docstring), each ``fill`` at first.
    A copy made by ``copy``/``pickle`` (not a worker's) has values of its own."""

    def __init__(self, size: int, fill: int = 0):
        self.values = torch.full((max(1, int(size)),), int(fill), dtype=torch.int64).share_memory_()
        self._view = self.values.numpy()  # the same memory, read without a tensor per value (items read the epoch)

    def __getstate__(self) -> dict:
        return {"values": self.values}  # the view is rebuilt on the receiving side, over the memory it maps

    def __setstate__(self, state: dict) -> None:
        self.values = state["values"]
        self._view = self.values.numpy()

    def __getitem__(self, i: int) -> int:
        return int(self._view[i])

    def __setitem__(self, i: int, value: int) -> None:
        self._view[i] = int(value)

    def read(self, start: int, count: int) -> np.ndarray:
        """Values ``start`` … ``start + count − 1``, copied out."""
        return self._view[start:start + count].copy()

    def write(self, start: int, values: Sequence[int] | np.ndarray) -> None:
        """Values from ``start`` on; refused (ValueError) beyond the size."""
        v = np.asarray(values, dtype=np.int64)
        if start + len(v) > len(self._view):
            raise ValueError(f"{len(v)} values from {start} do not fit in {len(self._view)}")
        self._view[start:start + len(v)] = v
