"""DataLoader workers kept for the whole run: a student's spawned workers (an object store's) start
once, not every epoch, and every epoch's batches are those of workers started for that epoch;
what changes between epochs (the epoch, a schedule's view, a rank's share) reaches the kept
workers through shared memory (``core/shared``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kdcache.train.student_batches as student_batches
from kdcache.core.shared import SharedInts
from kdcache.store import CacheStore, CacheStream
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.batches import TrainingBatches
from kdcache.train.student import StudentTrainer, config_from_store

RES = {"resolution": [32, 48]}
EPOCHS = 3


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher):
    """A schedule of 3 epochs over 12 training images (each epoch reads its own view), 4 per
    shard, and a plain cache of 8 unlabelled images."""
    d = tmp_path_factory.mktemp("kept")
    common = dict(weights=str(teacher), dataset_options=dict(RES), topk=4, samples_per_shard=4, device="cpu",
                  workers=0)
    build_teacher_cache(CacheBuildConfig(out=str(d / "s.zarr"), limit=12, schedule_epochs=EPOCHS, **common),
                        show_progress=False)
    build_teacher_cache(CacheBuildConfig(out=str(d / "u.zarr"), split="unlabeled", limit=8, **common),
                        show_progress=False)
    return d / "s.zarr", d / "u.zarr"


def _batches(store, tmp_path, **kw):
    cfg = config_from_store(str(store), methods=[{"name": "kl"}], epochs=EPOCHS, limit=12, batch_size=2, workers=2,
                            device="cpu", out=str(tmp_path / "run"), **kw)
    return StudentTrainer(cfg, show_progress=False).prepare().batches


def _epochs(batches, views: list | None = None) -> tuple[list[list[dict]], list]:
    """Every epoch's batches, and the pids of the kept loader's workers after each (None: none
    kept); ``views``: gets the view each epoch's stream read."""
    out, pids = [], []
    for epoch in range(EPOCHS):
        loader = batches.loader(epoch)
        out.append(list(loader))
        if views is not None:
            views.append(loader.dataset.view)
        kept = batches._kept[0]._iterator if batches._kept is not None else None
        pids.append(None if kept is None else sorted(w.pid for w in kept._workers))
    return out, pids


def _equal(a: list[list[dict]], b: list[list[dict]]) -> bool:
    for ea, eb in zip(a, b, strict=True):
        for x, y in zip(ea, eb, strict=True):
            if x.keys() != y.keys():
                return False
            for k in x:
                same = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                if not same:
                    return False
    return True


@pytest.mark.slow  # spawned worker processes, each importing torch (10 s)
def test_spawned_workers_start_once_and_give_the_batches_of_workers_started_every_epoch(caches, tmp_path,
                                                                                          monkeypatch):
    """A schedule cache streamed as from an object store (spawned workers), with --skip-bad: the
    same two worker processes serve all three epochs, each epoch reading its own view, and the
    batches equal those of forked workers started for each epoch; close() stops the workers."""
    store, _ = caches
    # --skip-bad too: its placeholder travels to the spawned workers with the stream
    reference, ref_pids = _epochs(_batches(store, tmp_path / "fork", skip_bad=True))
    assert ref_pids == [None] * EPOCHS  # forked workers: started every epoch, as before
    monkeypatch.setattr(student_batches, "worker_start_method", lambda path: "spawn")
    batches = _batches(store, tmp_path / "spawn", skip_bad=True)
    assert batches.persistent()
    views: list = []
    got, pids = _epochs(batches, views)
    assert len(pids[0]) == 2 and pids == [pids[0]] * EPOCHS  # started once
    assert len(set(views)) == EPOCHS  # each epoch read a view of its own, from one stream
    assert [len(e) for e in got] == [6] * EPOCHS and _equal(got, reference)
    batches.close()
    for pid in pids[0]:
        with pytest.raises(ProcessLookupError):  # reaped
            os.kill(pid, 0)


@pytest.mark.slow  # forked worker processes kept over three epochs (3-4 s each)
@pytest.mark.parametrize("read", ["random", "mixed"])
def test_kept_workers_read_each_epochs_order_and_augmentation(caches, tmp_path, monkeypatch, read):
    """Random access (the sampler's order, the pipeline's epoch) and labelled + unlabelled batches
    (the batch sampler's), through workers kept for the run: forked here, which keep a copy of
    everything not in shared memory from the moment they start. A pipeline whose epoch is not
    shared (the control) gives epoch 0's crops again in later epochs."""
    store, pool = caches
    kw = {"cache_read": "random"} if read == "random" else {"unlabeled_caches": [str(pool)]}
    reference, _ = _epochs(_batches(store, tmp_path / "ref", **kw))
    monkeypatch.setattr(TrainingBatches, "persistent", lambda self: self.workers > 0)
    got, pids = _epochs(_batches(store, tmp_path / "kept", **kw))
    assert pids[0] and pids == [pids[0]] * EPOCHS and _equal(got, reference)

    def unshared(self, epoch):  # the epoch in memory of the main process's own (the workers keep theirs)
        self._epoch = SharedInts(1, epoch)

    monkeypatch.setattr(student_batches.KDPipeline, "set_epoch", unshared)
    control, _ = _epochs(_batches(store, tmp_path / "control", **kw))
    assert not _equal(control, reference)
    assert _equal(control[:1], reference[:1])


class _Unshared(CacheStream):
    """A stream whose positions live in each process's own memory (the control)."""

    @property
    def positions(self):
        return self.__dict__.get("_own")

    @positions.setter
    def positions(self, positions):
        self.__dict__["_own"] = None if positions is None else np.asarray(positions, dtype=np.int64)


def test_a_kept_stream_reads_each_epochs_share_and_view(small_store):
    """A rank's share (positions) and the epoch, set between epochs on the stream a kept loader's
    workers iterate, are what those workers read; a stream that keeps them in its own memory (the
    control) serves its first share again."""
    _, store = small_store
    s = CacheStore(str(store))
    shares = [list(range(0, 16, 2)), list(range(1, 16, 2)), list(range(8))]

    def ids(stream_type, kept: bool) -> list[list[str]]:
        stream = stream_type(s, groups=["logits"], seed=3, positions=shares[0], num_workers=2, batch_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, persistent_workers=kept,
                                             collate_fn=lambda b: [x["id"] for x in b])
        out = []
        for epoch, share in enumerate(shares):
            stream.set_epoch(epoch)
            stream.positions = share
            out.append(sorted(i for batch in loader for i in batch))
        return out

    fresh = ids(CacheStream, kept=False)
    assert fresh == [sorted(s.ids[p] for p in share) for share in shares]
    assert ids(CacheStream, kept=True) == fresh
    assert ids(_Unshared, kept=True) == [fresh[0]] * 3
