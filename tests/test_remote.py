"""Caches at fsspec URLs, tested on fsspec's in-memory file system."""

from __future__ import annotations

import errno
import types
import uuid

import fsspec
import numpy as np
import pytest
import zarr
from cli_runner import kd
from fake_data import make_teacher

from kdcache.store import CacheStore, location
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache


def _cfg(teacher, out, **kw):
    base = dict(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]}, limit=10,
                samples_per_shard=4, device="cpu", workers=0, features=("stage3",))
    base.update(kw)
    return CacheBuildConfig(**base)


def test_build_and_read_a_store_in_memory(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    url = f"memory://{uuid.uuid4().hex}/c.zarr"
    build_teacher_cache(_cfg(teacher, url), show_progress=False)
    build_teacher_cache(_cfg(teacher, tmp_path / "local.zarr"), show_progress=False)
    remote, local = zarr.open_group(url, mode="r"), zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    for name in ("logits/values", "logits/indices", "logits/tail", "features/stage3/values", "done", "sample_id"):
        np.testing.assert_array_equal(remote[name][:], local[name][:], err_msg=name)
    store = CacheStore(url)
    assert store._fast == {} and store.read(3)["id"] == "train_000003"
    assert store.read(3)["logits/values"].shape == (4, 8, 12)
    # rerun: resumes; another k: refused with the difference
    assert build_teacher_cache(_cfg(teacher, url), show_progress=False)["resumed"]
    r = kd("build-teacher-cache", "--weights", teacher, "--out", url, "--topk", 2, "--dataset", "synthetic",
           "--resolution", "32x48", "--limit", 10, "--samples-per-shard", 4, "--features", "stage3", "--quiet")
    assert r.exit_code == 2 and "k: store has 4, this build wants 2" in r.output
    r = kd("verify-cache", url, "--quiet")
    assert r.exit_code == 0 and "ok: all 10 samples" in r.output
    from kdcache.store.check import inspect_store

    rep = inspect_store(url)
    assert rep["done"] == 10 and rep["bytes_on_disk"] > 0 and rep["bytes_per_pixel"] > 0
    # and a student trains from it, with a forked DataLoader worker
    r = kd("train-student", "--cache", url, "--epochs", 1, "--limit", 8, "--batch-size", 4, "--workers", 1,
           "--device", "cpu", "--out", tmp_path / "s", "--quiet")
    assert r.exit_code == 0, r.output


def test_remote_out_that_is_not_a_store_is_refused_and_a_partial_one_is_redone(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    base = f"memory://{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base[len('memory://'):]}/other/notes.txt", b"precious")
    r = kd("build-teacher-cache", "--weights", teacher, "--out", f"{base}/other", "--dataset", "synthetic",
           "--resolution", "32x48", "--limit", 4, "--quiet")
    assert r.exit_code == 2 and "is not a kdcache teacher cache" in r.output
    assert fs.cat(f"{base[len('memory://'):]}/other/notes.txt") == b"precious"
    g = zarr.open_group(f"{base}/partial.zarr", mode="w")  # a creation that was interrupted
    g.attrs["kdcache-creating"] = True
    s = build_teacher_cache(_cfg(teacher, f"{base}/partial.zarr", limit=4), show_progress=False)
    assert s["done"] == 4 and not s["resumed"]


def test_object_stores_spawn_their_workers():
    from kdcache.train.student_batches import CachedBatches

    class Stub:
        def __init__(self, path):
            self.pipeline = type("P", (), {"store": type("S", (), {"path": path})()})()

    assert CachedBatches.context(Stub("s3://bucket/c.zarr")) == "spawn"
    assert CachedBatches.context(Stub("gs://bucket/c.zarr")) == "spawn"
    assert CachedBatches.context(Stub("memory://c.zarr")) is None
    assert CachedBatches.context(Stub("/data/c.zarr")) is None


def test_a_url_whose_file_system_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import sys

    teacher = make_teacher(tmp_path / "t.pt")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    r = kd("build-teacher-cache", "--weights", teacher, "--out", "s3://bucket/c.zarr", "--dataset", "synthetic",
           "--resolution", "32x48", "--limit", 4, "--device", "cpu", "--quiet")
    assert r.exit_code == 2 and 'a teacher cache at s3://bucket/c.zarr needs s3fs: pip install "kdcache[s3]"' in r.output
    r = kd("verify-cache", "s3://bucket/c.zarr", "--quiet")
    assert r.exit_code == 2 and 'pip install "kdcache[s3]"' in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = kd("inspect-cache", "nosuch://bucket/c.zarr")
    assert r.exit_code == 2 and "nosuch://bucket/c.zarr: fsspec cannot open nosuch:// URLs" in r.output, r.output


def test_retries_back_off_exponentially_and_end_in_one_line(monkeypatch):
    """``retrying``: a transient failure is retried after base x 2^(n-1) x [0.5, 1.5) seconds; one
    that keeps failing ends, after KDCACHE_REMOTE_ATTEMPTS tries, in one line naming the URL; an
    error that is not transient, and a local path, are not retried."""
    slept = []
    monkeypatch.setattr(location, "time", types.SimpleNamespace(sleep=slept.append))
    monkeypatch.setenv("KDCACHE_REMOTE_BACKOFF", "0.5")
    monkeypatch.setenv("KDCACHE_REMOTE_ATTEMPTS", "4")
    failures = iter([ConnectionError("reset by peer"), TimeoutError("read timed out"), OSError(errno.EIO, "I/O")])

    def flaky():
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return "read"

    assert location.retrying(flaky, "s3://bucket/c.zarr", "reading shard 3") == "read"
    assert len(slept) == 3
    for n, delay in enumerate(slept):
        assert 0.5 * 2 ** n * 0.5 <= delay < 0.5 * 2 ** n * 1.5, slept

    slept.clear()

    def down():
        raise ConnectionError("connection refused")

    with pytest.raises(location.RemoteError) as err:
        location.retrying(down, "s3://bucket/c.zarr", "reading shard 3", "; then rerun")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("reading shard 3 s3://bucket/c.zarr failed 4 times (ConnectionError")
    assert "KDCACHE_REMOTE_ATTEMPTS" in msg and "; then rerun" in msg
    assert len(slept) == 3  # no sleep after the last try

    slept.clear()  # one retrying() inside another: the outer one names the inner's object and does not retry it
    with pytest.raises(location.RemoteError) as err:
        location.retrying(lambda: location.retrying(down, "s3://bucket/c.zarr/k", "deleting"), "s3://bucket/c.zarr",
                          "writing shard 2 of")
    assert str(err.value).startswith("writing shard 2 of s3://bucket/c.zarr failed 4 times (deleting "
                                     "s3://bucket/c.zarr/k: ConnectionError") and len(slept) == 3

    slept.clear()
    for url, exc in (("s3://bucket/c.zarr", FileNotFoundError("no such key")),
                     ("s3://bucket/c.zarr", OSError(errno.ENOSPC, "full")),
                     ("/local/c.zarr", ConnectionError("a local path is not retried"))):
        def once(exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            location.retrying(once, url, "writing")
    assert slept == []


class _Flaky(zarr.storage.WrapperStore):
    """A memory store whose every request fails with 503's OSError (EBUSY, as s3fs raises it) the
    first ``fails`` times it is made, counted per (request, key)."""

    def __init__(self, store, fails: int):
        super().__init__(store)
        self.fails, self.tries = fails, {}

    def _with_store(self, store):
        other = _Flaky(store, self.fails)
        other.tries = self.tries
        return other

    def _fail(self, what, key):
        n = self.tries[what, key] = self.tries.get((what, key), 0) + 1
        if n <= self.fails:
            raise OSError(errno.EBUSY, "Service Unavailable")

    async def get(self, key, prototype, byte_range=None):
        self._fail("get", key)
        return await self._store.get(key, prototype, byte_range)

    async def set(self, key, value):
        self._fail("set", key)
        await self._store.set(key, value)

    async def exists(self, key):
        self._fail("exists", key)
        return await self._store.exists(key)

    def list_dir(self, prefix):
        self._fail("list_dir", prefix)
        return self._store.list_dir(prefix)


def test_the_retrying_store_retries_every_request_and_names_the_object(monkeypatch):
    """Every request through ``RetryingStore`` (metadata, listings, chunks) is retried while it fails
    transiently; one that keeps failing ends in a RemoteError naming the object, which ``retrying``
    passes on in its own words without trying again; a missing key is no failure."""
    slept = []

    async def nap(s):
        slept.append(s)

    monkeypatch.setattr(location.asyncio, "sleep", nap)
    monkeypatch.setenv("KDCACHE_REMOTE_ATTEMPTS", "3")
    flaky = _Flaky(zarr.storage.MemoryStore(), fails=2)
    group = zarr.open_group(location.RetryingStore(flaky, "s3://b/c.zarr"), mode="w")
    group.create_array("x", shape=(4, 3), chunks=(2, 3), dtype="int32")[:] = np.arange(12).reshape(4, 3)
    group.attrs["k"] = 1
    again = zarr.open_group(location.RetryingStore(flaky, "s3://b/c.zarr"), mode="r")
    assert again.attrs["k"] == 1 and (again["x"][:] == np.arange(12).reshape(4, 3)).all()
    assert sorted(again.array_keys()) == ["x"]  # a listing
    assert min(flaky.tries.values()) >= 3 and ("list_dir", "") in flaky.tries  # each failed twice, then went
    assert len(slept) == 2 * len(flaky.tries)  # two waits for each, on the first request of its key only
    assert again.get("missing") is None  # a missing key (None from the store) is not an error

    down = _Flaky(zarr.storage.MemoryStore(), fails=10)
    with pytest.raises(location.RemoteError) as err:
        zarr.open_group(location.RetryingStore(down, "s3://b/d.zarr"), mode="w")
    msg = str(err.value)
    assert "\n" not in msg and " s3://b/d.zarr/" in msg and "failed 3 times (OSError" in msg, msg
    with pytest.raises(location.RemoteError) as err:
        location.retrying(lambda: zarr.open_group(location.RetryingStore(down, "s3://b/d.zarr"), mode="w"),
                          "s3://b/d.zarr", "creating the teacher cache")
    msg = str(err.value)
    assert msg.startswith("creating the teacher cache s3://b/d.zarr failed 3 times (") and "s3://b/d.zarr/" in msg
    assert max(down.tries.values()) == 6  # two opens of 3 tries each: retrying() did not multiply them
