"""How train-student reads the cache: only the arrays its methods use, whole shards in a
shuffled order (the same items as random access), split between DataLoader workers and ranks
with equal whole batches, and on an object store one request per shard and array."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from stream_order import fix_shard_order, shard_order
from typer.testing import CliRunner

from kdcache.cli.app import app
from kdcache.store import BadSampleError, CacheStore, CacheStream
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store

runner = CliRunner()
RES = {"resolution": [32, 48]}


def _build(teacher, out, n=24, per_shard=8):
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=n,
                                         topk=4, features=("stage3",), attention=True, samples_per_shard=per_shard,
                                         device="cpu", workers=0), show_progress=False)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher):
    return _build(teacher, tmp_path_factory.mktemp("c") / "c.zarr")


def _pipeline(store, methods, tmp_path, **kw):
    tr = StudentTrainer(config_from_store(str(store), methods=methods, device="cpu", workers=0, limit=24,
                                          batch_size=4, out=str(tmp_path / "run"), **kw), show_progress=False)
    train_ds, val_ds = tr.build_datasets()
    pipe = tr.build_batches(train_ds, val_ds)[0].pipeline
    return tr, pipe


def _count_reads(monkeypatch) -> Counter:
    """Map arrays read, by path, through CacheStore's block reader."""
    reads: Counter = Counter()
    original = CacheStore._read_map

    def counted(self, path, rows, view=None):
        reads[path] += 1
        return original(self, path, rows, view)

    monkeypatch.setattr(CacheStore, "_read_map", counted)
    return reads


def _count_shard_reads(monkeypatch) -> Counter:
    """Reads of a shard file through kdcache's shard reader, by (array, shard)."""
    from kdcache.store.shards import ShardFile

    reads: Counter = Counter()
    original = ShardFile.read

    def counted(self, rows, view=None):
        reads[(str(self.dir).split(".zarr/", 1)[-1].removesuffix("/c"), rows[0] // self.per_shard)] += 1
        return original(self, rows, view)

    monkeypatch.setattr(ShardFile, "read", counted)
    return reads


def _count_blocks(monkeypatch) -> Counter:
    """Block reads through CacheStore, by shard."""
    blocks: Counter = Counter()
    original = CacheStore.read_block

    def counted(self, start, stop, rows=None, groups=None, view=None):
        blocks[start // self.samples_per_shard] += 1
        return original(self, start, stop, rows, groups, view)

    monkeypatch.setattr(CacheStore, "read_block", counted)
    return blocks


def test_only_the_arrays_the_methods_use_are_read(store, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    _, pipe = _pipeline(store, [{"name": "kl"}], tmp_path)
    item = pipe[3]
    assert set(reads) == {"logits/values", "logits/indices", "logits/tail"}
    assert "kd/values" in item and not any(k.startswith(("kd/features", "kd/attention")) for k in item)

    reads.clear()
    _, pipe = _pipeline(store, [{"name": "at", "student_tap": "stage3", "teacher_tap": "stage3"}], tmp_path)
    item = pipe[3]
    assert set(reads) == {"attention/stage3/values"} and "kd/attention/stage3" in item and "kd/values" not in item

    reads.clear()
    _, pipe = _pipeline(store, [{"name": "none"}], tmp_path)  # the CE-only baseline reads no cache at all
    item = pipe[3]
    assert not reads and not any(k.startswith("kd/") and k != "kd/skipped" for k in item)
    assert item["image"].shape == (3, 32, 48)


def test_streamed_items_equal_random_access_items(store, tmp_path):
    _, pipe = _pipeline(store, [{"name": "kl"}, {"name": "fitnet", "student_tap": "stage3",
                                                  "teacher_tap": "stage3"}], tmp_path)
    pipe.set_epoch(2)
    streamed = {int(item["index"]): item for item in pipe.stream()}
    assert sorted(streamed) == list(range(24))
    for i in (0, 7, 8, 23):
        direct = pipe[i]
        assert set(direct) == set(streamed[i])
        for key, v in direct.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, streamed[i][key]), key


def _assert_same_items(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got[key]), key
        else:
            assert v == got[key], key


def test_read_rows_reads_a_shuffled_batch_once_per_shard_in_its_order(store, monkeypatch):
    s = CacheStore(store)
    rows = [17, 3, 9, 3, 23, 0]  # three shards of 8, out of order, one row twice
    reads = _count_shard_reads(monkeypatch)
    got = s.read_rows(rows, groups=["logits", "features/stage3"])
    arrays = {"logits/values", "logits/indices", "logits/tail", "features/stage3/values"}
    assert dict(reads) == {(a, shard): 1 for a in arrays for shard in range(3)}  # each shard file once an array
    assert [item["row"] for item in got] == rows
    for r, item in zip(rows, got):
        want = s.read(r, groups=["logits", "features/stage3"])
        assert set(item) == set(want) and all(np.array_equal(item[k], want[k]) for k in want)
    with pytest.raises(IndexError, match="row 24 is outside the store's 24 samples"):
        s.read_rows([0, 24])


def test_a_random_access_batch_is_read_per_shard_and_equals_its_items(store, tmp_path, monkeypatch):
    tr, pipe = _pipeline(store, [{"name": "kl"}, {"name": "fitnet", "student_tap": "stage3",
                                                  "teacher_tap": "stage3"}], tmp_path, cache_read="random")
    batches = tr.build_batches(*tr.build_datasets())[0]
    assert not batches.stream
    reads = _count_shard_reads(monkeypatch)
    loaded = list(batches.loader(1))
    # the DataLoader asks for each batch at once (KDPipeline.__getitems__): a shard file is read once for
    # the batch's samples in it, where reading item by item read it once per sample (24 an array)
    touched = sum(len({int(i) // 8 for i in b["index"]}) for b in loaded)
    assert sum(n for (a, _), n in reads.items() if a == "logits/values") == touched < 24
    pipe.set_epoch(1)
    for b in loaded:  # the same items as random access one by one
        for j, i in enumerate(b["index"].tolist()):
            one = pipe[i]
            for key, v in one.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, b[key][j]), key


def test_a_batch_with_an_unreadable_sample_loses_that_samples_targets_alone(teacher, tmp_path):
    cache = _build(teacher, tmp_path / "bad.zarr", n=24)
    shard = cache / "logits" / "values" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40:60] = b"\xff" * 20  # the one chunk of shard 1, whose 8 samples (8..15) share it
    shard.write_bytes(bytes(data))
    _, pipe = _pipeline(cache, [{"name": "kl"}], tmp_path, cache_read="random", skip_bad=True)
    pipe.set_epoch(0)
    batch = [0, 9, 17, 10]
    got = pipe.__getitems__(batch)
    for i, item in zip(batch, got):
        bad = 8 <= i < 16
        assert bool(item["kd/skipped"]) == bad and bool(item["kd/ignore"].all()) == bad
        if not bad:
            _assert_same_items(item, pipe[i])
    _, strict = _pipeline(cache, [{"name": "kl"}], tmp_path, cache_read="random")
    strict.set_epoch(0)
    with pytest.raises(BadSampleError, match="train_000009") as err:
        strict.__getitems__(batch)
    assert "train_000000" not in str(err.value) and "train_000017" not in str(err.value)


def _epochs_of(pipe, epochs: int = 6, buffer_size: int = 1) -> list[list[int]]:
    orders = []
    for epoch in range(epochs):
        pipe.set_epoch(epoch)
        orders.append([int(item["index"]) for item in pipe.stream(buffer_size=buffer_size)])
    return orders


def test_stream_order_is_shuffled_by_shard_and_reads_each_shard_once(store, tmp_path, monkeypatch):
    blocks = _count_blocks(monkeypatch)
    _, pipe = _pipeline(store, [{"name": "kl"}], tmp_path)
    for epoch in range(3):
        pipe.set_epoch(epoch)
        blocks.clear()
        order = [int(item["index"]) for item in pipe.stream(buffer_size=4)]
        assert sorted(order) == list(range(24)) and dict(blocks) == {0: 1, 1: 1, 2: 1}
    # without a buffer the shards come whole: their order changes from epoch to epoch, and so does
    # the order of the samples within each shard
    orders = _epochs_of(pipe)
    assert len({shard_order(o, 8) for o in orders}) > 1
    assert len({tuple(i for i in o if i // 8 == 0) for o in orders}) > 1  # shard 0's samples, in order
    # the negative control: shards in a fixed order (samples still shuffled within) fail the check
    fix_shard_order(monkeypatch)
    orders = _epochs_of(pipe)
    assert len({tuple(o) for o in orders}) > 1 and len({shard_order(o, 8) for o in orders}) == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_take_contiguous_parts_and_equal_whole_batches(store, workers, monkeypatch):
    s = CacheStore(store)
    rows = np.arange(24)
    positions = [p for p in range(24) if p != 5]  # 23 samples: not a multiple of anything
    stream = CacheStream(s, rows, positions=positions, batch_size=4, num_workers=workers, seed=3)
    stream.set_epoch(1)
    blocks = _count_blocks(monkeypatch)
    parts = []
    for w in range(workers):
        info = type("Info", (), {"id": w, "num_workers": workers})
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        parts.append([int(item["index"]) for item in stream])
    quota = 23 // workers // 4 * 4
    assert [len(p) for p in parts] == [quota] * workers and len(stream) == workers * quota
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) and 5 not in flat
    # each shard is read by at most two workers (a part boundary inside it), once each
    assert max(blocks.values()) <= 2 and sum(blocks.values()) <= 3 + workers - 1
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    with pytest.raises(Exception, match=f"set up for {workers} DataLoader workers but runs in 1"):
        next(iter(stream))


@pytest.mark.slow  # trains over epochs
def test_train_student_streams_every_sample_once_per_epoch(store, tmp_path):
    for read, workers in (("stream", 0), ("stream", 2), ("random", 0)):
        out = tmp_path / f"{read}-{workers}"
        r = runner.invoke(app, ["train-student", "--cache", str(store), "--epochs", "2", "--limit", "24",
                                "--batch-size", "4", "--workers", str(workers), "--cache-read", read,
                                "--device", "cpu", "--out", str(out), "--quiet"])
        assert r.exit_code == 0, r.output
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = 24 // 4 // max(1, workers) * max(1, workers)
        for rec in recs:
            assert rec["train_samples_seen"] == rec["train_samples_distinct"] == steps * 4, (read, workers, rec)
        assert json.loads((out / "config.json").read_text())["cache_read"] == read


def test_remote_stream_makes_one_request_per_shard_and_array(teacher, tmp_path, monkeypatch):
    url = f"memory://{uuid.uuid4().hex}/c.zarr"
    _build(teacher, url)
    fs = fsspec.filesystem("memory")
    requests: Counter = Counter()
    for name in ("cat_file", "_cat_file", "open", "_open", "cat", "cat_ranges"):
        original = getattr(type(fs), name, None)
        if original is None:
            continue

        def counted(self, path, *a, _original=original, **kw):
            requests[str(path).split(".zarr/", 1)[-1]] += 1
            return _original(self, path, *a, **kw)

        monkeypatch.setattr(type(fs), name, counted)
    _, pipe = _pipeline(url, [{"name": "kl"}], tmp_path)
    pipe.set_epoch(0)
    requests.clear()
    assert sorted(int(item["index"]) for item in pipe.stream()) == list(range(24))
    shard_reads = {k: v for k, v in requests.items() if "/c/" in k and "/hw/" not in k}
    extents = {k: v for k, v in requests.items() if "/hw/" in k}
    assert extents and max(extents.values()) == 1  # the valid extents: read once, all of them
    for array in ("logits/values", "logits/indices", "logits/tail"):
        for shard in range(3):
            key = f"{array}/c/{shard}/0/0/0" if array != "logits/tail" else f"{array}/c/{shard}/0/0"
            assert shard_reads.pop(key, 0) == 1, (key, requests)
    assert not shard_reads, shard_reads  # nothing else: no features, no attention, no chunk-by-chunk reads


def test_a_remote_batch_fetches_no_more_than_its_samples_one_by_one(teacher, tmp_path, monkeypatch):
    url = f"memory://{uuid.uuid4().hex}/c.zarr"
    # one shard; images large enough for a chunk per sample of the values (4x24x32 fp16, not packed)
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=url, dataset_options={"resolution": [96, 128]},
                                         limit=24, topk=4, samples_per_shard=24, device="cpu", workers=0),
                        show_progress=False)
    fs = fsspec.filesystem("memory")
    fetched: Counter = Counter()
    original = type(fs).cat_file

    def counted(self, path, start=None, end=None, **kw):
        data = original(self, path, start=start, end=end, **kw)
        fetched[str(path).split(".zarr/", 1)[-1]] += len(data)
        return data

    monkeypatch.setattr(type(fs), "cat_file", counted)  # before the store is opened: zarr binds it then
    s = CacheStore(url)
    s.read(12, groups=["logits"])  # the metadata and the extents, read once
    batch = [23, 0]  # the first and the last sample: too few to fetch the shard whole

    def bytes_of(read) -> int:
        fetched.clear()
        got = read()
        assert fetched
        return sum(fetched.values()), got

    one_by_one, want = bytes_of(lambda: [s.read(r, groups=["logits"]) for r in batch])
    together, got = bytes_of(lambda: s.read_rows(batch, groups=["logits"]))
    assert together <= one_by_one  # the chunks between them are not fetched
    for a, b in zip(got, want):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b)


def test_a_remote_shard_read_in_one_request_equals_the_local_read(store, teacher):
    url = f"memory://{uuid.uuid4().hex}/c.zarr"
    fsspec.filesystem("memory").put(str(store), url[len("memory://"):], recursive=True)
    remote, local = CacheStore(url), CacheStore(store)
    whole = remote.read_block(8, 16)  # whole shard: the one-request path
    part = remote.read_block(8, 16, rows=[9])  # one sample: zarr's ranged reads
    assert remote._fast["logits/values"] is not None and remote._fast["logits/values"].fs is not None
    for got, want in ((whole, local.read_block(8, 16)), (part, local.read_block(8, 16, rows=[9]))):
        assert [g["id"] for g in got] == [w["id"] for w in want]
        for g, w in zip(got, want):
            for key, v in w.items():
                if isinstance(v, np.ndarray):
                    assert v.dtype == g[key].dtype and np.array_equal(v, g[key]), key
