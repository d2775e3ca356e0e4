"""build-teacher-cache, the store it writes, and the read side: round trips through real
files, interrupted and multi-process builds, bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd, kd_on_one_thread, torchrun
from fake_data import make_teacher, make_voc_sizes
from PIL import Image
from stream_order import fix_shard_order, shard_order
from zarr_readers import assert_every_array_plain_zarr

from kdcache.core.checkpoint import load_weights
from kdcache.core.topk import attention_map
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.models import build_model
from kdcache.pipeline.transforms import Augment, Preprocess, apply_geometry, sample_geometry
from kdcache.store import BadSampleError, CachedTargets, CacheStore, CacheStream, StoreError
from kdcache.store.writer import ShardWriter
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

RES = {"resolution": [32, 48]}
N = 10  # samples; 4 per shard -> shards of 4, 4, 2


def config(teacher, out, **kw) -> CacheBuildConfig:
    base = dict(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=N, topk=4,
                samples_per_shard=4, batch_size=3, device="cpu", workers=0)
    base.update(kw)
    return CacheBuildConfig(**base)


def arrays_of(path) -> dict[str, np.ndarray]:
    """Every array of a store, read with zarr's public API alone."""
    g = zarr.open_group(str(path), mode="r")
    return {name: a[:] for name, a in g.arrays()} | {
        f"{gname}/{name}": a[:] for gname, sub in g.groups() for name, a in _walk(sub)}


def _walk(group, prefix=""):
    for name, a in group.arrays():
        yield prefix + name, a
    for name, sub in group.groups():
        yield from _walk(sub, f"{prefix}{name}/")


def assert_same_store(a, b):
    A, B = arrays_of(a), arrays_of(b)
    assert sorted(A) == sorted(B)
    for name in A:
        np.testing.assert_array_equal(A[name], B[name], err_msg=name)


def teacher_forward(teacher_path, x, taps=()):
    model = build_model("demo_teacher", 11, taps=taps)
    load_weights(model, teacher_path)
    model.eval()
    with torch.no_grad():
        return model(x)


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_equals_a_teacher_forward(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    s = build_teacher_cache(config(teacher, out, features=("stage3",), attention=True), show_progress=False)
    assert s["done"] == N and not s["resumed"]
    ds = limit(build_dataset("synthetic", "train", **RES), N)
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(N)])
    ref = teacher_forward(teacher, x, taps=("stage3",))
    logits = ref.logits.double()
    top_v, top_i = logits.topk(4, dim=1)
    rest = logits.scatter(1, top_i, float("-inf")).logsumexp(1)

    # through zarr's public API alone
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["kdcache"]["k"] == 4 and g.attrs["kdcache"]["stride"] == [4.0, 4.0]
    assert g["logits/values"].dtype == np.float16 and g["logits/indices"].dtype == np.uint8
    assert g["logits/values"].shape == (N, 4, 8, 12) and g["logits/values"].shards == (4, 4, 8, 12)
    v = torch.from_numpy(g["logits/values"][:].astype(np.float64))
    idx = torch.from_numpy(g["logits/indices"][:].astype(np.int64))
    tail = torch.from_numpy(g["logits/tail"][:].astype(np.float64))
    np.testing.assert_allclose(v, top_v, rtol=2e-3, atol=2e-3)
    agree = (idx == top_i).float().mean().item()
    assert agree > 0.999  # ids can only differ where two logits tie within fp32 noise
    np.testing.assert_allclose(tail, rest, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(g["features/stage3/values"][:].astype(np.float32), ref.features["stage3"].numpy(),
                               rtol=2e-3, atol=2e-3)
    att = attention_map(ref.features["stage3"]).numpy()
    np.testing.assert_allclose(g["attention/stage3/values"][:].astype(np.float32), att, atol=1e-3)
    assert np.all(g["done"][:]) and [bytes(r).rstrip(b"\0").decode() for r in g["sample_id"][:]] == ds.ids
    assert (np.diff(g["logits/values"][:].astype(np.float32), axis=1) <= 0).all()

    # the reader gives the same arrays
    store = CacheStore(out)
    item = store.read(3)
    assert item["id"] == ds.ids[3]
    np.testing.assert_array_equal(item["logits/values"], g["logits/values"][3])
    np.testing.assert_array_equal(item["attention/stage3"], g["attention/stage3/values"][3])
    rows = store.join(ds)
    np.testing.assert_array_equal(rows, np.arange(N))


def test_packed_chunks_round_trip_and_are_plain_zarr_for_zarr_python_and_tensorstore(tmp_path, teacher):
    """Small maps pack several samples per chunk; big ones keep one. kdcache's shard files, zarr-python
    and tensorstore read the same numbers, and a store written through zarr (memory://) equals it."""
    ts = pytest.importorskip("tensorstore", reason='tensorstore is not installed: pip install "kdcache[dev]"')
    out = tmp_path / "c.zarr"  # 10 samples, 4 a shard: the last shard is short
    build_teacher_cache(config(teacher, out, features=("stage3",)), show_progress=False)
    store = CacheStore(out)
    packing = store.meta["packing"]
    assert packing == {"logits/values": 4, "logits/indices": 4, "logits/tail": 4}  # features: 8 KB a sample
    g = zarr.open_group(str(out), mode="r")
    assert g["logits/values"].chunks == (4, 4, 8, 12) and g["features/stage3/values"].chunks[0] == 1
    ours = store.read_block(0, N)  # through kdcache's own shard reader
    assert all(store._fast[p] is not None for p in packing)
    for spec in store.schema.map_specs:
        plain = g[spec.path][:]
        other = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / spec.path)}}).result()
        np.testing.assert_array_equal(other.read().result(), plain, err_msg=spec.path)
        for r, item in enumerate(ours):
            h, w = item["logits/values"].shape[-2:] if spec.spatial else (None, None)
            key = spec.key
            np.testing.assert_array_equal(item[key], plain[r][..., :h, :w].astype(item[key].dtype), err_msg=key)
    # every other array as well (done flags, ids, hashes, extents, quality counts): plain Zarr v3 too
    assert_every_array_plain_zarr(out, {"done", "sample_id", "content_hash", "image_hw", "logits/hw", "quality/counts"})
    # random access inside a packed chunk, and the same store written through zarr
    assert store.read(6)["id"] == "train_000006"
    np.testing.assert_array_equal(store.read(6)["logits/tail"], ours[6]["logits/tail"])
    url = f"memory://{tmp_path.name}/c.zarr"
    build_teacher_cache(config(teacher, url, features=("stage3",)), show_progress=False)
    assert_same_store(url, out)
    assert zarr.open_group(url, mode="r")["logits/values"].chunks == (4, 4, 8, 12)
    # a store large enough for bigger shards packs up to 64 KiB of samples, never past a shard
    from kdcache.store.schema import PACK_CHUNK_BYTES, CacheSchema

    wide = CacheSchema({**store.meta, "samples_per_shard": 256})
    packed = wide._packing()
    assert packed == {"logits/values": 64, "logits/indices": 128, "logits/tail": 256}
    for spec in wide.map_specs:
        one = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        p = packed.get(spec.path, 1)  # the largest divisor of 256 within 64 KiB (powers of 2: the next is 2p)
        assert p * one <= PACK_CHUNK_BYTES and (p == 256 or 2 * p * one > PACK_CHUNK_BYTES or p == 1)


def test_a_shard_written_again_is_read_afresh_not_through_its_kept_index(tmp_path, teacher):
    """Random access keeps each shard's checked index (a sample's read then opens one file and reads its
    chunk): a shard renamed over (as a rebuild or --reset-bad writes it) is read through its new index,
    and a chunk damaged in place is still caught by its checksum."""
    out, other = tmp_path / "c.zarr", tmp_path / "other.zarr"  # 8 samples a shard: one row reads its chunk alone
    build_teacher_cache(config(teacher, out, samples_per_shard=8), show_progress=False)
    second = make_teacher(tmp_path / "second.pt", seed=1)
    build_teacher_cache(config(second, other, samples_per_shard=8), show_progress=False)
    store, theirs = CacheStore(out), CacheStore(other)
    first = store.read(1)
    fast = store._fast["logits/values"]
    shard = Path(fast.shard_path(0))
    assert not fast.reads_whole([1]) and str(shard) in fast._indices  # the chunk path, its index kept
    assert not np.array_equal(first["logits/values"], theirs.read(1)["logits/values"])
    tmp = shard.with_name("incoming")
    tmp.write_bytes(Path(theirs._fast["logits/values"].shard_path(0)).read_bytes())
    os.replace(tmp, shard)  # another teacher's shard, renamed over: other chunk sizes and offsets
    again = store.read(1)
    np.testing.assert_array_equal(again["logits/values"], theirs.read(1)["logits/values"])
    np.testing.assert_array_equal(store.read(5)["logits/values"], theirs.read(5)["logits/values"])
    off, nbytes = (int(x) for x in fast._indices[str(shard)][1][1 // fast.per_chunk])  # row 1's chunk
    with open(shard, "r+b") as f:  # row 1's chunk damaged in place, the index left as it was
        f.seek(off + nbytes // 2)
        byte = f.read(1)
        f.seek(off + nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BadSampleError, match="damaged or truncated"):
        store.read(1)


def test_dense_cache_has_no_tail_and_keeps_every_logit(tmp_path, teacher):
    out = tmp_path / "dense.zarr"
    build_teacher_cache(config(teacher, out, topk=11, limit=3), show_progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert "tail" not in g["logits"] and g.attrs["kdcache"]["tail"] is None
    ds = limit(build_dataset("synthetic", "train", **RES), 3)
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(3)])
    logits = teacher_forward(teacher, x).logits
    dense = np.zeros(logits.shape, dtype=np.float32)
    np.put_along_axis(dense, g["logits/indices"][:].astype(np.int64), g["logits/values"][:].astype(np.float32), axis=1)
    np.testing.assert_allclose(dense, logits.numpy(), rtol=2e-3, atol=2e-3)
    assert CacheStore(out).read(0).get("logits/tail") is None


def test_images_of_different_sizes_record_their_extent(tmp_path):
    root = make_voc_sizes(tmp_path / "voc")
    teacher = make_teacher(tmp_path / "t.pt", num_classes=21)
    out = tmp_path / "voc.zarr"
    build_teacher_cache(config(teacher, out, dataset="voc", data_root=str(root), dataset_options={}, limit=None,
                               samples_per_shard=2), show_progress=False)
    store = CacheStore(out)
    ds = build_dataset("voc", "train", root)
    assert store.meta["map_size"] == [8, 7]  # the largest image is 32 high, 28 wide; stride 4
    for i in range(len(ds)):
        x = Preprocess().image_to_tensor(ds.load(i)[0])[None]
        logits = teacher_forward_voc(teacher, x)
        item = store.read(i)
        assert item["logits/values"].shape == (4, *logits.shape[-2:])
        np.testing.assert_allclose(item["logits/values"].astype(np.float32), logits.topk(4, 1).values[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
        assert tuple(zarr.open_group(str(out))["image_hw"][i]) == tuple(x.shape[-2:])


def teacher_forward_voc(path, x):
    model = build_model("demo_teacher", 21)
    load_weights(model, path)
    model.eval()
    with torch.no_grad():
        return model(x).logits


# -- the command line ------------------------------------------------------------------------------

CLI = ["--dataset", "synthetic", "--resolution", "32x48", "--limit", N, "--samples-per-shard", 4,
       "--batch-size", 3, "--device", "cpu", "--workers", 0, "--quiet"]


def test_cli_build_inspect_verify(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--topk", 2, *CLI)
    assert r.exit_code == 0, r.output
    assert f"built: {N}/{N} samples" in r.output
    r = kd("inspect-cache", out, "--json", tmp_path / "reports" / "i.json")  # its folder is created
    assert r.exit_code == 0, r.output
    assert "done / 10" in r.output and "demo_teacher" in r.output and "5th percentile" in r.output
    import json

    rep = json.loads((tmp_path / "reports" / "i.json").read_text())
    assert rep["done"] == N and rep["dense_fp32_bytes_per_pixel"] == 44
    assert rep["bytes_per_pixel_uncompressed"] == 2 * (2 + 1) + 2
    cov = rep["coverage"]
    assert 0 < cov["T=4"]["mean"] < cov["T=2"]["mean"] < cov["T=1"]["mean"] <= 1
    r = kd("verify-cache", out, "--quiet")
    assert r.exit_code == 0 and "ok: all 10 samples" in r.output
    # rerunning the finished build does nothing and says so
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--topk", 2, *CLI)
    assert r.exit_code == 0 and "resumed (10 were done)" in r.output


def test_coverage_at_t1_is_the_exact_top_k_mass(tmp_path, teacher):
    from kdcache.core.topk import topk_mass

    out = tmp_path / "c.zarr"
    build_teacher_cache(config(teacher, out, limit=2, topk=3), show_progress=False)
    item = CacheStore(out).read(0)
    ds = build_dataset("synthetic", "train", **RES)
    logits = teacher_forward(teacher, Preprocess().image_to_tensor(ds.load(0)[0])[None]).logits.double()
    exact = logits.softmax(1).topk(3, 1).values.sum(1)[0].numpy()
    got = topk_mass(item["logits/values"], item["logits/tail"], 11, 1.0)
    np.testing.assert_allclose(got, exact, atol=2e-3)


def test_verify_finds_a_truncated_shard_and_reset_bad_lets_the_build_repair_it(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    ref = tmp_path / "ref.zarr"
    build_teacher_cache(config(teacher, ref), show_progress=False)
    build_teacher_cache(config(teacher, out), show_progress=False)
    shard = out / "logits" / "values" / "c" / "1" / "0" / "0" / "0"
    data = shard.read_bytes()
    assert_packed(out)
    shard.write_bytes(data[: len(data) // 2])  # a truncated shard: samples 4..7
    r = kd("verify-cache", out, "--quiet")
    assert r.exit_code == 1, r.output
    for sid in ("train_000004", "train_000007"):
        assert f"bad train_{sid[-6:]}" in r.output
    assert "train_000003" not in r.output and "4 bad samples" in r.output
    with pytest.raises(StoreError, match="damaged or truncated"):
        CacheStore(out).read(5)
    r = kd("verify-cache", out, "--reset-bad", "--quiet")
    assert r.exit_code == 1 and "marked not done" in r.output
    assert list(zarr.open_group(str(out))["done"][:]) == [True] * 4 + [False] * 4 + [True] * 2
    s = build_teacher_cache(config(teacher, out), show_progress=False)
    assert s["resumed"] and s["samples_written"] == 4
    assert kd("verify-cache", out, "--quiet").exit_code == 0
    assert_same_store(out, ref)


# -- interrupted, failing and multi-process builds ------------------------------------------------


def assert_packed(path) -> None:
    """These tests mean packed stores: their 32x48 maps pack 4 samples a chunk (if the packing rule
    changed, they would quietly test one chunk per sample)."""
    assert CacheStore(path).meta["packing"] == {"logits/values": 4, "logits/indices": 4, "logits/tail": 4}


def _cli_args(teacher, out, n=N, per_shard=4):
    return ["build-teacher-cache", "--weights", str(teacher), "--out", str(out), "--dataset", "synthetic",
            "--resolution", "32x48", "--limit", str(n), "--samples-per-shard", str(per_shard), "--batch-size", "3",
            "--device", "cpu", "--workers", "0", "--quiet"]


@pytest.mark.slow  # kill -9
def test_killed_build_resumes_to_the_same_store(tmp_path, teacher):
    n = 64
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert kd_on_one_thread(*_cli_args(teacher, ref, n)).exit_code == 0  # the killed build's threads: one
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *_cli_args(teacher, out, n)], env=env)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            done = zarr.open_group(str(out), mode="r")["done"][:]
        except Exception:
            done = np.zeros(0, bool)
        if done.sum() >= 4:
            proc.send_signal(signal.SIGKILL)  # no clean-up at all
            killed_at = int(done.sum())
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < n, "the build finished before it could be killed"
    r = subprocess.run([sys.executable, "-m", "kdcache", *_cli_args(teacher, out, n)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr
    assert_packed(out)
    assert_same_store(out, ref)


def test_write_failure_stops_cleanly_and_a_rerun_completes(tmp_path, teacher, monkeypatch):
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    build_teacher_cache(config(teacher, ref), show_progress=False)
    real = ShardWriter.write_shard
    calls = []

    def failing(self, shard, start, stop, samples):
        calls.append(shard)
        if len(calls) == 2:
            # half the arrays of this shard reach the disk, then the disk is full
            self.arrays["logits/values"][start:stop] = np.zeros((stop - start, 4, 8, 12), np.float16)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, shard, start, stop, samples)

    monkeypatch.setattr(ShardWriter, "write_shard", failing)
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, *CLI)
    assert r.exit_code == 2
    assert "the disk is full" in r.output and "rerun the same command to resume" in r.output
    done = zarr.open_group(str(out))["done"][:]
    assert list(done) == [True] * 4 + [False] * 6  # nothing of the failed shard is marked done
    monkeypatch.setattr(ShardWriter, "write_shard", real)
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, *CLI)
    assert r.exit_code == 0 and "resumed (4 were done)" in r.output
    assert_packed(out)
    assert_same_store(out, ref)


@pytest.mark.slow  # torchrun
def test_two_process_torchrun_build_equals_one_process(tmp_path, teacher):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert kd_on_one_thread(*_cli_args(teacher, one)).exit_code == 0  # one process of one thread, as each rank
    r = torchrun("-m", "kdcache", *_cli_args(teacher, two), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_packed(two)
    assert_same_store(one, two)
    assert r.stderr.count("built: 10/10") == 1  # rank 0 alone reports


# -- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors_and_destroy_nothing(tmp_path, teacher):
    t5 = make_teacher(tmp_path / "t5.pt", num_classes=5)
    r = kd("build-teacher-cache", "--weights", t5, "--out", tmp_path / "a.zarr", *CLI)
    assert r.exit_code == 2 and "predicts 5 classes but the data set has 11" in r.output

    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "b.zarr", "--topk", 12, *CLI)
    assert r.exit_code == 2 and "--topk 12 is more than the 11 classes" in r.output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    r = kd("build-teacher-cache", "--weights", teacher, "--out", mine, *CLI)
    assert r.exit_code == 2 and "is not a kdcache teacher cache" in r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", mine, "--overwrite", *CLI)
    assert r.exit_code == 2 and (mine / "thesis.tex").read_text() == "precious"

    nan = make_teacher(tmp_path / "nan.pt", name="tiny_models:NaNLogits")
    r = kd("build-teacher-cache", "--weights", nan, "--out", tmp_path / "n.zarr", *CLI)
    assert r.exit_code == 2 and "non-finite logits" in r.output and "train_000000" in r.output
    assert not zarr.open_group(str(tmp_path / "n.zarr"), mode="r")["done"][:].any()

    r = kd("build-teacher-cache", "--weights", tmp_path / "missing.pt", "--out", tmp_path / "m.zarr", *CLI)
    assert r.exit_code == 2 and "does not exist" in r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "f.zarr", "--features", "stage9", *CLI)
    assert r.exit_code == 2 and "no module 'stage9'" in r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "f.zarr", "--attention", *CLI)
    assert r.exit_code == 2 and "--attention needs --features" in r.output
    for cmd in ("inspect-cache", "verify-cache"):
        r = kd(cmd, tmp_path / "nowhere.zarr")
        assert r.exit_code == 2 and "does not exist" in r.output
        r = kd(cmd, mine)
        assert r.exit_code == 2 and ("not a kdcache teacher cache" in r.output or "not a Zarr" in r.output)


def test_resume_with_other_options_is_refused_and_overwrite_rebuilds(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    assert kd("build-teacher-cache", "--weights", teacher, "--out", out, *CLI).exit_code == 0
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--topk", 2, *CLI)
    assert r.exit_code == 2 and "k: store has 4, this build wants 2" in r.output and "--overwrite" in r.output
    other = make_teacher(tmp_path / "other.pt", seed=1)
    r = kd("build-teacher-cache", "--weights", other, "--out", out, *CLI)
    assert r.exit_code == 2 and "teacher.weights_sha256" in r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, *CLI[:3], "40x48", *CLI[4:])
    assert r.exit_code == 2 and "dataset.fingerprint" in r.output
    assert zarr.open_group(str(out), mode="r")["done"][:].all()  # still intact
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--topk", 2, "--overwrite", *CLI)
    assert r.exit_code == 0 and CacheStore(out).k == 2


# -- the read side ---------------------------------------------------------------------------------


def test_join_refuses_a_store_from_other_data(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    build_teacher_cache(config(teacher, out), show_progress=False)
    assert_packed(out)
    store = CacheStore(out)
    with pytest.raises(StoreError, match="not in teacher cache .* split 'train'"):
        store.join(limit(build_dataset("synthetic", "val", **RES), 3))
    with pytest.raises(StoreError, match="differ from the images/labels"):
        store.join(limit(build_dataset("synthetic", "train", resolution=[32, 48], seed=7), 3))
    root = make_voc_sizes(tmp_path / "voc")
    with pytest.raises(StoreError, match="holds 11 classes but voc has 21"):
        store.join(build_dataset("voc", "train", root))
    subset = build_dataset("synthetic", "train", **RES).select([7, 2, 5])  # a fold, in any order
    np.testing.assert_array_equal(store.join(subset), [7, 2, 5])
    zarr.open_group(str(out), mode="r+")["done"][4:8] = False
    with pytest.raises(StoreError, match="not written yet .* rerun the same build-teacher-cache"):
        CacheStore(out).join(subset)


def test_changed_image_file_is_detected(tmp_path):
    root = make_voc_sizes(tmp_path / "voc")
    teacher = make_teacher(tmp_path / "t.pt", num_classes=21)
    out = tmp_path / "voc.zarr"
    build_teacher_cache(config(teacher, out, dataset="voc", data_root=str(root), dataset_options={}, limit=None),
                        show_progress=False)
    ds = build_dataset("voc", "train", root)
    CacheStore(out).join(ds)
    mask = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "t2.png"
    mask.write_bytes(mask.read_bytes() + b"\0")
    with pytest.raises(StoreError, match=r"1 samples of voc \(e.g. t2\) differ"):
        CacheStore(out).join(ds)


def test_stream_reads_each_sample_once_in_shuffled_shard_order(tmp_path, teacher, monkeypatch):
    out = tmp_path / "c.zarr"
    build_teacher_cache(config(teacher, out, limit=12), show_progress=False)
    store = CacheStore(out)
    rows = np.arange(12)
    stream = CacheStream(store, rows, buffer_size=3, seed=1)

    def epochs(s):
        orders = []
        for epoch in range(6):
            s.set_epoch(epoch)
            orders.append([int(item["row"]) for item in s])
        return orders

    assert all(sorted(o) == list(range(12)) for o in epochs(stream))
    # without a buffer the 3 shards of 4 come whole, in an order that changes from epoch to epoch
    unbuffered = CacheStream(store, rows, buffer_size=1, seed=1)
    assert len({shard_order(o, 4) for o in epochs(unbuffered)}) > 1
    with monkeypatch.context() as m:  # the negative control: a fixed shard order fails that check
        fix_shard_order(m)
        orders = epochs(unbuffered)
        assert len({tuple(o) for o in orders}) > 1 and len({shard_order(o, 4) for o in orders}) == 1
    # two DataLoader workers each take whole shards: together every sample exactly once
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    seen = torch.cat([b["row"] for b in loader]).tolist()
    assert sorted(seen) == list(range(12))
    batch = next(iter(torch.utils.data.DataLoader(stream, batch_size=4)))
    assert batch["logits/values"].dtype == torch.float16 and batch["logits/values"].shape == (4, 4, 8, 12)
    assert batch["logits/indices"].dtype == torch.uint8
    # two processes split the shards between them
    parts = [set(CacheStream(store, rows, rank=r, world_size=2).shards_of_this_rank()[1]) for r in (0, 1)]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(12))
    # random access, joined with the data set's images and labels
    ds = limit(build_dataset("synthetic", "train", **RES), 12)
    from kdcache.pipeline.transforms import SegPipeline

    pipe = SegPipeline(ds, Preprocess())
    targets = CachedTargets(store, store.join(ds), item_fn=pipe.__getitem__)
    item = targets[5]
    assert item["id"] == ds.ids[5] and item["image"].shape == (3, 32, 48) and item["label"].shape == (32, 48)
    assert torch.equal(item["logits/values"], torch.from_numpy(store.read(5)["logits/values"]))
    # a DataLoader asks for a batch at once: its rows read together (read_rows), the same items
    read_rows, calls = store.read_rows, []
    store.read_rows = lambda rows, **kw: calls.append(list(rows)) or read_rows(rows, **kw)
    batch = next(iter(torch.utils.data.DataLoader(targets, batch_size=4, sampler=[9, 2, 5, 11])))
    assert calls == [[9, 2, 5, 11]] and batch["index"].tolist() == [9, 2, 5, 11]
    for j, i in enumerate((9, 2, 5, 11)):
        one = targets[i]
        assert all(torch.equal(batch[k][j], v) for k, v in one.items() if isinstance(v, torch.Tensor)) and one["id"] == batch["id"][j]


# -- flip average and stored views -------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["logit", "prob"])
def test_flip_average_is_exactly_flip_equivariant(tmp_path, teacher, combine):
    """The stored logits are the mean of the logits on the image and its mirror (mirrored back),
    or T·log of the mean of their probabilities at T (here 2), by the formula in float64."""
    out = tmp_path / "f.zarr"
    build_teacher_cache(config(teacher, out, limit=2, topk=11, flip_average=True, features=("stage1",),
                               combine=combine, combine_temperature=2.0), show_progress=False)
    ds = build_dataset("synthetic", "train", **RES)
    x = Preprocess().image_to_tensor(ds.load(1)[0])[None]
    a = teacher_forward(teacher, x, taps=("stage1",))
    b = teacher_forward(teacher, x.flip(-1), taps=("stage1",))
    za, zb = a.logits.double(), b.logits.double().flip(-1)
    if combine == "logit":
        want = ((za + zb) / 2).float()
    else:
        mean_p = (torch.softmax(za / 2, 1) + torch.softmax(zb / 2, 1)) / 2
        want = (2 * mean_p.log()).float()
    assert CacheStore(out).meta["ensemble"]["combine"] == combine
    item = CacheStore(out).read(1)
    dense = np.zeros(want.shape[1:], dtype=np.float32)
    np.put_along_axis(dense, item["logits/indices"].astype(np.int64), item["logits/values"].astype(np.float32), axis=0)
    np.testing.assert_allclose(dense, want[0].numpy(), rtol=2e-3, atol=2e-3)
    feat = (a.features["stage1"] + b.features["stage1"].flip(-1)) / 2
    np.testing.assert_allclose(item["features/stage1"].astype(np.float32), feat[0].numpy(), rtol=2e-3, atol=2e-3)


def test_stored_views_are_the_teacher_on_those_crops(tmp_path, teacher):
    out = tmp_path / "v.zarr"
    build_teacher_cache(config(teacher, out, limit=3, views=2, view_crop=(16, 24), view_scale=(0.5, 1.5)),
                        show_progress=False)
    store = CacheStore(out)
    assert store.meta["views"]["map_size"] == [4, 6]
    ds = build_dataset("synthetic", "train", **RES)
    x = Preprocess().image_to_tensor(ds.load(2)[0])
    item = store.read(2)
    assert item["views/logits/values"].shape == (2, 4, 4, 6) and item["views/params"].shape == (2, 7)
    rng = np.random.default_rng((0, 2))
    aug = Augment(scale=(0.5, 1.5), crop=(16, 24), hflip=True)
    for v in range(2):
        g = sample_geometry(rng, (32, 48), aug)
        np.testing.assert_allclose(item["views/params"][v], [g.scale, g.top, g.left, 16, 24, float(g.flip), 1.0], rtol=1e-6)
        logits = teacher_forward(teacher, apply_geometry(x, g, kind="image")[None]).logits
        np.testing.assert_allclose(item["views/logits/values"][v].astype(np.float32),
                                   logits.topk(4, 1).values[0].numpy(), rtol=2e-3, atol=2e-3)
    assert kd("verify-cache", out, "--quiet").exit_code == 0


@pytest.mark.parametrize("codec", ["blosc-zstd", "blosc-lz4", "zstd", "none"])
def test_fast_shard_files_and_zarr_agree_both_ways(tmp_path, teacher, monkeypatch, codec):
    """kdcache writes and reads local shards itself (numcodecs + crc32c); zarr must read what it
    writes, and its own reader must give what zarr gives."""
    fast, slow = tmp_path / "fast.zarr", tmp_path / "slow.zarr"
    build_teacher_cache(config(teacher, fast, limit=6, codec=codec, features=("stage2",)), show_progress=False)
    import kdcache.store.writer as writer

    monkeypatch.setattr(writer, "fast_reader", lambda *a: None)
    build_teacher_cache(config(teacher, slow, limit=6, codec=codec, features=("stage2",)), show_progress=False)
    assert_same_store(fast, slow)  # both decoded by zarr
    a, b = CacheStore(fast), CacheStore(fast)
    b._fast = dict.fromkeys(b.map_paths)  # force zarr's read path
    for rows in ([0, 1, 2, 3], [5], [4, 5]):
        for x, y in zip(a.read_block(min(rows), max(rows) + 1, rows), b.read_block(min(rows), max(rows) + 1, rows)):
            for key, value in x.items():
                if isinstance(value, np.ndarray):
                    assert value.dtype == y[key].dtype
                    np.testing.assert_array_equal(value, y[key], err_msg=key)
    assert all(a._fast[p] is not None for p in a.map_paths)


def test_non_finite_logits_name_exactly_the_bad_samples(tmp_path):
    from kdcache.core.checkpoint import save_checkpoint

    ds = limit(build_dataset("synthetic", "train", **RES), N)
    means = [Preprocess().image_to_tensor(ds.load(j)[0]).mean().item() for j in range(3)]
    lo, mid, hi = sorted(means)
    threshold = (mid + hi) / 2  # the first batch (3 images) gets one bright image
    torch.manual_seed(0)
    model = build_model("tiny_models:NaNForBrightImages", 11, threshold=threshold)
    ckpt = save_checkpoint(tmp_path / "nan.pt", model, config={"preprocess": Preprocess().to_dict(),
                                                               "model_options": {"threshold": threshold}})
    bright = [ds.ids[j] for j in range(3) if means[j] > threshold]
    dark = [ds.ids[j] for j in range(3) if ds.ids[j] not in bright]
    assert bright and dark  # the first batch (3 images) has both kinds
    r = kd("build-teacher-cache", "--weights", ckpt, "--out", tmp_path / "n.zarr", *CLI)
    assert r.exit_code == 2 and f"non-finite logits (NaN/inf) for {len(bright)} samples" in r.output
    assert all(b in r.output for b in bright) and not any(d in r.output for d in dark)


def test_a_non_finite_view_names_its_image_once(tmp_path, teacher):
    """A view's non-finite logits name the image it is a view of, once, however many of its views
    are bad (the views of a batch are encoded together, V rows per image)."""
    from kdcache.store.writer import NonFiniteTeacher, encode_batch

    out = tmp_path / "v.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=2,
                                         topk=4, views=3, device="cpu", workers=0), show_progress=False)
    schema = CacheStore(str(out)).schema
    C, (h, w), (vh, vw) = schema.num_classes, schema.map_size, schema.views["map_size"]
    logits, views = torch.randn(2, C, h, w), torch.randn(2 * 3, C, vh, vw)
    params = np.zeros((2, 3, 7), dtype=np.float32)
    samples = encode_batch(schema, logits, {}, ["a", "b"], (32, 48), (views, {}, params))
    assert samples[1]["views/logits/values"].shape == (3, schema.k, vh, vw)
    assert np.array_equal(samples[1]["views/logits/values"][2], torch.topk(views[5], schema.k, 0).values.half().numpy())
    views[4, 0, 0, 0] = float("nan")
    views[5, 1, 0, 0] = float("inf")  # two bad views of image "b"
    with pytest.raises(NonFiniteTeacher, match=r"non-finite logits \(NaN/inf\) for 1 samples: b;"):
        encode_batch(schema, logits, {}, ["a", "b"], (32, 48), (views, {}, params))


def test_one_stored_view_keeps_its_view_axis(tmp_path, teacher):
    """A store of one view (--views 1, one pyramid level, one schedule epoch) holds [1, k, h, w] per
    sample, k above the map's height included (a missing view axis once broadcast or failed)."""
    out = tmp_path / "one.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=2,
                                         topk=11, views=1, device="cpu", workers=0), show_progress=False)
    s = CacheStore(str(out))
    vh, vw = s.schema.views["map_size"]
    assert 11 > vh
    got = s.read(1, groups=["views/logits"])["views/logits/values"]
    assert got.shape == (1, 11, vh, vw) and np.isfinite(got.astype(np.float32)).all()


def test_plain_state_dict_needs_the_architecture(tmp_path, teacher):
    from kdcache.core.checkpoint import read_checkpoint

    sd = tmp_path / "plain.pth"
    torch.save(read_checkpoint(teacher)["state_dict"], sd)
    r = kd("build-teacher-cache", "--weights", sd, "--out", tmp_path / "p.zarr", *CLI)
    assert r.exit_code == 2 and "say which architecture it is with --teacher" in r.output
    r = kd("build-teacher-cache", "--weights", sd, "--teacher", "demo_teacher", "--out", tmp_path / "p.zarr", *CLI)
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.zarr"
    build_teacher_cache(config(teacher, ref), show_progress=False)
    A, B = arrays_of(ref), arrays_of(tmp_path / "p.zarr")
    np.testing.assert_array_equal(A["logits/values"], B["logits/values"])
    r = kd("build-teacher-cache", "--weights", teacher, "--teacher", "demo_student", "--out", tmp_path / "q.zarr", *CLI)
    assert r.exit_code == 2 and "holds a 'demo_teacher'" in r.output


def test_features_of_images_of_different_sizes_keep_their_own_extent(tmp_path):
    root = make_voc_sizes(tmp_path / "voc")
    teacher = make_teacher(tmp_path / "t.pt", num_classes=21)
    out = tmp_path / "voc.zarr"
    build_teacher_cache(config(teacher, out, dataset="voc", data_root=str(root), dataset_options={}, limit=None,
                               features=("stage3",), attention=True), show_progress=False)
    store = CacheStore(out)
    ds = build_dataset("voc", "train", root)
    model = build_model("demo_teacher", 21, taps=("stage3",))
    load_weights(model, teacher)
    model.eval()
    for i in range(len(ds)):
        with torch.no_grad():
            f = model(Preprocess().image_to_tensor(ds.load(i)[0])[None]).features["stage3"]
        item = store.read(i)
        assert item["features/stage3"].shape == f.shape[1:] and item["attention/stage3"].shape == f.shape[2:]
        np.testing.assert_allclose(item["features/stage3"].astype(np.float32), f[0].numpy(), rtol=2e-3, atol=2e-3)
    assert kd("verify-cache", out, "--quiet").exit_code == 0
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "v.zarr", "--dataset", "voc",
           "--data-root", root, "--views", 2, "--quiet")
    assert r.exit_code == 2 and "give --view-crop HxW" in r.output


def test_caches_of_unlabelled_images(tmp_path, teacher):
    """build-teacher-cache over the synthetic unlabeled split and over a plain image folder (its
    class names from the teacher run): the teacher's outputs on those images, content hashes
    over the image bytes, joined back by the same data set."""
    out = tmp_path / "u.zarr"
    build_teacher_cache(config(teacher, out, split="unlabeled"), show_progress=False)
    ds = limit(build_dataset("synthetic", "unlabeled", **RES), N)
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(N)])
    top_v = teacher_forward(teacher, x).logits.topk(4, dim=1).values
    store = CacheStore(out)
    assert store.schema.dataset["split"] == "unlabeled" and store.ids == ds.ids
    np.testing.assert_allclose(np.stack([store.read(i)["logits/values"] for i in range(N)]).astype(np.float32),
                               top_v, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(store.join(ds), np.arange(N))

    # a folder of frames that lists no classes: the teacher run's class names
    frames = tmp_path / "frames"
    for i in range(3):
        (frames / f"seq{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.load(i)[0]).save(frames / f"seq{i % 2}" / f"{i:04d}.png")
    ckpt = torch.load(teacher, weights_only=False)
    names = [f"class{c}" for c in range(11)]
    ckpt["config"]["class_names"] = names
    named = tmp_path / "named.pt"
    torch.save(ckpt, named)
    r = kd("build-teacher-cache", "--weights", named, "--out", tmp_path / "f.zarr", "--dataset", "images",
           "--data-root", frames, "--device", "cpu", "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    f = CacheStore(tmp_path / "f.zarr")
    assert f.class_names == names and f.ids == ["seq0/0000", "seq0/0002", "seq1/0001"]
    np.testing.assert_allclose(f.read(2)["logits/values"].astype(np.float32), top_v[1], rtol=2e-3, atol=2e-3)
    folder_ds = build_dataset("images", "all", frames).with_class_names(names)
    assert f.content_hashes()[0] == folder_ds.content_hash(0)


def test_the_default_top_k_keeps_every_class_when_there_are_fewer(tmp_path):
    """A data set of 3 classes with the default --topk (4) builds a dense cache, as the 11-class one
    keeps its top 4; an explicit --topk above the class count stays an error."""
    from fake_data import make_mixed_size_folders

    lab, _ = make_mixed_size_folders(tmp_path, labelled=2, unlabelled=0)
    teacher = make_teacher(tmp_path / "t3.pt", num_classes=3)
    r = kd("build-teacher-cache", "--weights", teacher, "--dataset", "folder", "--data-root", lab, "--split", "all",
           "--out", tmp_path / "three.zarr", "--quiet")
    assert r.exit_code == 0, r.output
    store = CacheStore(tmp_path / "three.zarr")
    assert store.k == 3 and "logits/tail" not in store.map_paths  # dense: no tail
    r = kd("build-teacher-cache", "--weights", teacher, "--dataset", "folder", "--data-root", lab, "--split", "all",
           "--topk", 4, "--out", tmp_path / "four.zarr", "--quiet")
    assert r.exit_code == 2 and "--topk 4 is more than the 3 classes of folder; use --topk 3" in r.output
    eleven = tmp_path / "eleven.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(make_teacher(tmp_path / "t11.pt")), out=str(eleven), limit=2,
                                         dataset_options={"resolution": [32, 48]}, device="cpu", workers=0),
                        show_progress=False)
    assert CacheStore(eleven).k == 4


@pytest.mark.slow  # trains a teacher, then builds
def test_a_build_without_dataset_takes_the_teacher_runs(tmp_path):
    """``build-teacher-cache --weights RUN`` without ``--dataset`` builds over the run's data set,
    root and options (it built the synthetic data before, silently, for an 11-class teacher of
    CamVid); ``--dataset`` still chooses, and a plain state dict still defaults to synthetic."""
    from fake_data import make_mixed_size_folders

    lab, _ = make_mixed_size_folders(tmp_path)
    (lab / "classes.txt").write_text("road\ncar\nsky\n")
    run = tmp_path / "teacher"
    r = kd("train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "folder", "--data-root", lab,
           "--train-split", "all", "--val-split", "all", "--epochs", 1, "--batch-size", 2, "--crop-size", "32x32",
           "--device", "cpu", "--quiet", "--out", run)
    assert r.exit_code == 0, r.output
    r = kd("build-teacher-cache", "--weights", run, "--split", "all", "--topk", 2, "--out", tmp_path / "c.zarr")
    assert r.exit_code == 0, r.output
    assert f"data set: folder at {lab} (the teacher run's" in " ".join(r.output.split())
    schema = CacheStore(tmp_path / "c.zarr").schema
    assert schema.dataset["name"] == "folder" and schema.dataset["root"] == str(lab)
    assert schema.class_names == ["road", "car", "sky"] and schema.num_samples == 6
    # --dataset chooses: the synthetic data's 11 classes are not this teacher's 3
    r = kd("build-teacher-cache", "--weights", run, "--dataset", "synthetic", "--out", tmp_path / "s.zarr")
    assert r.exit_code == 2 and "predicts 3 classes but the data set has 11" in r.output
    # a plain state dict names no data set: synthetic, as before
    torch.save(torch.load(run / "best.pt", weights_only=False)["state_dict"], tmp_path / "plain.pt")
    r = kd("build-teacher-cache", "--weights", tmp_path / "plain.pt", "--teacher", "tiny_models:TinyNet",
           "--topk", 2, "--limit", 2, "--quiet", "--out", tmp_path / "p.zarr")
    assert r.exit_code == 2 and "head.bias: checkpoint (3,) vs model (11,)" in r.output  # built for synthetic
    # a copy of the data whose classes.txt lists the same classes in another order: its ids would be
    # scored and cached as other classes; refused by build-teacher-cache and evaluate, nothing written
    import shutil

    other = tmp_path / "reordered"
    shutil.copytree(lab, other)
    (other / "classes.txt").write_text("car\nroad\nsky\n")
    for args in (["build-teacher-cache", "--weights", run, "--data-root", other, "--split", "all", "--topk", 2,
                  "--out", tmp_path / "r.zarr"],
                 ["evaluate", run, "--data-root", other, "--split", "all", "--out", tmp_path / "r-eval"]):
        r = kd(*args)
        assert r.exit_code == 2 and "was trained on classes named otherwise than the data's (class 0: 'road' / " \
            "'car', class 1: 'car' / 'road'; theirs / the data's)" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "r.zarr").exists() and not (tmp_path / "r-eval").exists()
    (other / "classes.txt").write_text("Road\ncar \nsky\n")  # case and spaces are not other names
    r = kd("evaluate", run, "--data-root", other, "--split", "all", "--out", tmp_path / "r-eval")
    assert r.exit_code == 0, r.output


# -- Ctrl-C and a store with nothing done ---------------------------------------------------------------------


def interrupt_after(monkeypatch, batches: int) -> None:
    """Ctrl-C while the teacher runs its batch number ``batches + 1`` (the earlier ones are written)."""
    import kdcache.teacher.cache_build as cb

    real, calls = cb.encode_batch, {"n": 0}

    def encode(*args, **kw):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(cb, "encode_batch", encode)


def test_an_interrupted_build_says_what_it_kept(tmp_path, teacher, monkeypatch):
    """Ctrl-C: exit 130 and how many samples the finished shards hold; none when no shard was finished."""
    out = tmp_path / "none.zarr"
    interrupt_after(monkeypatch, 2)  # 6 of the 16 samples of one shard through the teacher: none finished
    r = kd(*_cli_args(teacher, out, 16, per_shard=16))
    assert r.exit_code == 130, r.output
    assert ("interrupted: no sample of " in r.output and "was finished (a shard of 16 samples is kept once all of it "
            "is written), so nothing is kept; rerun the same command to build it" in " ".join(r.output.split()))
    assert not CacheStore(out).done().any()
    monkeypatch.undo()
    out = tmp_path / "some.zarr"
    interrupt_after(monkeypatch, 4)  # batches of 3 within shards of 4 (3 + 1, 3 + 1): two shards finished
    r = kd(*_cli_args(teacher, out, 16))
    assert r.exit_code == 130, r.output
    assert "8 of 16 samples of" in r.output and "are finished and kept (whole shards of 4); rerun the same command to " \
                                                "resume" in " ".join(r.output.split())
    assert CacheStore(out).done().sum() == 8
    monkeypatch.undo()
    r = kd(*_cli_args(teacher, out, 16))
    assert r.exit_code == 0 and "resumed (8 were done)" in r.output


def test_a_store_with_nothing_done_is_built_again_without_asking(tmp_path, teacher, monkeypatch):
    """A build stopped before its first shard (say by a corrupt image, since replaced: the data's
    fingerprint differs) has nothing to keep: the rerun builds it again instead of asking for
    --overwrite. One that finished a shard still asks."""
    out = tmp_path / "c.zarr"
    interrupt_after(monkeypatch, 0)
    assert kd(*_cli_args(teacher, out, 8)).exit_code == 130
    monkeypatch.undo()
    assert CacheStore(out).meta["dataset"]["limit"] == 8 and not CacheStore(out).done().any()
    r = kd(*_cli_args(teacher, out, 12))  # other data: the store as it stands was built differently
    assert r.exit_code == 0 and "built: 12/12 samples" in " ".join(r.output.split()), r.output
    r = kd(*_cli_args(teacher, out, 8))
    assert r.exit_code == 2 and "holds a teacher cache built differently, so it cannot be resumed" in r.output
    assert CacheStore(out).done().sum() == 12


def test_overwrite_deletes_a_stores_own_files_and_never_a_users(tmp_path, teacher):
    out = tmp_path / "c.zarr"
    assert kd(*_cli_args(teacher, out, 8)).exit_code == 0
    mine = out / "logits" / "values" / "notes.txt"
    mine.write_text("mine")
    r = kd(*_cli_args(teacher, out, 8), "--overwrite")
    assert r.exit_code == 2 and "is a teacher cache with a file kdcache did not write in it: logits/values/notes.txt; " \
                                "kdcache never deletes your files: move them out of the store, then rerun" in r.output
    assert mine.read_text() == "mine" and CacheStore(out).done().all()
    mine.unlink()
    r = kd(*_cli_args(teacher, out, 8), "--overwrite")
    assert r.exit_code == 0 and "built: 8/8" in r.output
