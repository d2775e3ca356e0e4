"""DataLoader construction shared by training, evaluation and the cache build."""

from __future__ import annotations

import os

import torch

from kdcache.pipeline.transforms import collate


def default_workers(device: torch.device) -> int:
    """DataLoader workers when --workers is not given: none on CPU, where the model needs every
    core and a worker process would compete with it for them, and up to 8 on CUDA."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int | None, workers: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False, pin_memory: bool = False,
                context: str | None = None, sampler=None, batch_sampler=None,
                collate_fn=collate, persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with kdcache's collate. ``context``: the workers' start
    method (``spawn`` for fsspec file systems that are not fork-safe; None: the platform
    default). ``batch_sampler`` replaces ``batch_size``/``sampler``/``shuffle``/``drop_last``.
    ``persistent``: the workers are started once and kept for every later iteration (what
    changes between epochs must then reach them through shared memory: ``core/shared``)."""
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle if sampler is None else False, "sampler": sampler,
                    "drop_last": drop_last}
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=workers, collate_fn=collate_fn, generator=generator,
        pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        multiprocessing_context=context if workers > 0 else None,
    )
