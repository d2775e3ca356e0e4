"""Training batches: which samples each process takes in an epoch, and the DataLoader that serves
them. :class:`TrainingBatches` is supervised training's (every sample once an epoch in a shuffled
order; under torchrun the ranks take disjoint, equal shares); the student trainer's cached
targets subclass it (:mod:`kdcache.train.student_batches`). A trainer asks its batches for the steps of
an epoch, each epoch's loader and the samples seen, and nothing else about its data.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.core.distributed import Dist
from kdcache.core.errors import KDCacheError
from kdcache.pipeline.loaders import make_loader
from kdcache.pipeline.transforms import SegPipeline


def rank_indices(n: int, seed, rank: int, world: int, groups: np.ndarray | None = None,
                 min_size: int = 1) -> list[int]:
    """This rank's training samples for one epoch (``seed`` fixes the epoch's draw).

    With ``groups`` (e.g. the store shard of each sample) whole groups are dealt to the ranks in
    a shuffled order, so each rank reads its own shards; otherwise samples are dealt one by one.
    Every rank gets as many samples as the smallest share (ranks must take the same number of
    steps); no sample goes to two ranks."""
    rng = np.random.default_rng(seed)
    parts = None
    if groups is not None:
        uniq = np.unique(groups)
        order = uniq[rng.permutation(len(uniq))]
        parts = []
        for r in range(world):
            mine = np.isin(groups, order[r::world])
            parts.append(np.random.default_rng((*np.atleast_1d(seed), r)).permutation(np.flatnonzero(mine)))
        if min(len(p) for p in parts) < min_size:  # too few groups for this many ranks
            parts = None
    if parts is None:
        perm = rng.permutation(n)
        parts = [perm[r::world] for r in range(world)]
    m = min(len(p) for p in parts)
    return [int(i) for i in parts[rank][:m]]


class EpochOrder(torch.utils.data.Sampler):
    """The sample indices (or, as a batch sampler, the batches) of the current epoch, set before
    each: the sampler of a DataLoader kept for the whole run, which iterates its sampler anew every
    epoch in the main process."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class TrainingBatches:
    """The training items of ``pipeline`` as an epoch's batches of ``batch_size``: whole batches
    only, shuffled by (seed, epoch); this process's share of them under torchrun (``dist``).

    Spawned DataLoader workers (an object store's, :meth:`context`) are started once for the run
    and kept (:meth:`persistent`): each costs a new Python that imports torch and opens the store,
    seconds of a core and most of a gigabyte, which every epoch would otherwise pay again (a CE
    run's forked workers start at once). The loader is then built once and each epoch sets its
    order (:class:`EpochOrder`) and the pipeline's epoch, which the workers read from shared
    memory; the batches are the same as with workers started every epoch. :meth:`close` stops
    the workers."""

    def __init__(self, pipeline: SegPipeline, *, batch_size: int, seed: int, workers: int, dist: Dist,
                 pin_memory: bool = False):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.dist = dist
        self.pin_memory = pin_memory
        self._kept: tuple[torch.utils.data.DataLoader, EpochOrder] | None = None

    @property
    def augment(self):
        return self.pipeline.augment

    def __len__(self) -> int:
        return len(self.pipeline)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (per process under torchrun): whole batches only."""
        steps = len(self) // self.dist.world_size // self.batch_size
        if steps == 0:
            raise KDCacheError(f"--batch-size {self.batch_size} is larger than the {len(self)} training samples")
        return steps

    def groups(self) -> np.ndarray | None:
        """Group id per training sample that ranks should not split (store shards); None: any."""
        return None

    def context(self) -> str | None:
        """Start method of the DataLoader's workers (None: the platform default)."""
        return None

    def rank_share(self, epoch: int) -> list[int] | None:
        """This rank's training samples this epoch under torchrun (whole groups where possible,
        equal counts on every rank); None in a single process (every sample)."""
        world = self.dist.world_size
        if world == 1:
            return None
        share = rank_indices(len(self), (self.seed, epoch), self.dist.rank, world, self.groups(),
                             min_size=self.batch_size)
        return share[:self.steps_per_epoch * self.batch_size]

    def persistent(self) -> bool:
        """Whether the loader's workers are started once for the run (spawned ones are)."""
        return self.workers > 0 and self.context() == "spawn"

    def kept_loader(self, build, items: list) -> torch.utils.data.DataLoader:
        """The run's one loader, ``build(order)`` the first time (``order``: an
        :class:`EpochOrder`, its sampler or batch sampler), with the order set to ``items``."""
        if self._kept is None:
            order = EpochOrder()
            self._kept = (build(order), order)
        self._kept[1].items = items
        return self._kept[0]

    def close(self) -> None:
        """Stop the workers of the loader kept for the run, if any (they stop with the process too)."""
        if self._kept is not None:
            iterator = self._kept[0]._iterator  # a DataLoader with persistent workers keeps its iterator
            if iterator is not None:
                iterator._shutdown_workers()
            self._kept = None

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """Epoch ``epoch``'s shuffled batches (this rank's share under torchrun)."""
        self.pipeline.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        sampler = self.rank_share(epoch)
        if not self.persistent():
            return make_loader(self.pipeline, self.batch_size, self.workers, shuffle=sampler is None, generator=gen,
                               drop_last=True, pin_memory=self.pin_memory, context=self.context(), sampler=sampler)
        if sampler is None:  # the order a DataLoader built this epoch shuffles into: it first draws
            # its workers' base seed from the generator, then the permutation
            torch.empty((), dtype=torch.int64).random_(generator=gen)
            sampler = torch.randperm(len(self.pipeline), generator=gen).tolist()
        return self.kept_loader(
            lambda order: make_loader(self.pipeline, self.batch_size, self.workers, drop_last=True,
                                      pin_memory=self.pin_memory, context=self.context(), sampler=order,
                                      persistent=True), sampler)

    def seen_counts(self, per_rank: list[list[int]]) -> dict:
        """The epoch record's sample counts from each rank's sample indices."""
        return {"train_samples_seen": sum(len(s) for s in per_rank),
                "train_samples_distinct": len(set().union(*map(set, per_rank))),
                "train_samples_per_rank": [len(s) for s in per_rank]}
