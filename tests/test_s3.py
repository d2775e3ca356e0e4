"""Caches in a real S3 API: moto's server over HTTP, behind a proxy that counts requests and
injects faults (``tests/s3_server.py``), talked to through s3fs as a user's cluster talks to S3.
Skips in one line where moto[server] or s3fs is missing (``pip install "kdcache[s3]"``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from cli_runner import kd, kd_on_one_thread, torchrun
from s3_server import S3Server
from test_cache import arrays_of, assert_same_store

pytestmark = pytest.mark.slow  # an S3 server in a process of its own, retries with back-off, torchrun

N = 16


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.make_bucket("caches")
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    """The same build on the local disk."""
    out = tmp_path_factory.mktemp("local") / "ref.zarr"
    r = kd(*_build(teacher, out))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(autouse=True)
def _no_faults(s3, monkeypatch):
    s3.faults()
    s3.reset_counts()
    monkeypatch.setenv("KDCACHE_REMOTE_BACKOFF", "0.05")
    yield
    s3.faults()
    S3Server._clear_instances()


def _build(teacher, out, n=N):
    return ["build-teacher-cache", "--weights", teacher, "--out", out, "--dataset", "synthetic", "--resolution",
            "32x48", "--limit", n, "--samples-per-shard", 4, "--batch-size", 4, "--features", "stage3",
            "--device", "cpu", "--workers", 0, "--quiet"]


def _student(cache, out, *extra):
    return ["train-student", "--cache", cache, "--out", out, "--epochs", 1, "--limit", N, "--batch-size", 4,
            "--device", "cpu", "--workers", 0, "--quiet", *extra]


def test_build_verify_inspect_and_stream_with_spawned_workers(s3, teacher, reference, tmp_path):
    url = "s3://caches/a.zarr"
    r = kd(*_build(teacher, url))
    assert r.exit_code == 0, r.output
    built = list(s3.requests)
    assert_same_store(url, reference)  # array by array, read back over HTTP
    puts = Counter(p for m, p, _ in s3.requests if m == "PUT" and "/logits/values/c/" in p)
    assert len(puts) == N // 4 and set(puts.values()) == {1}  # one request per shard file
    # and nothing else: no read of the shard it replaces (zarr's sharding codec reads one first) and no delete
    shard_requests = Counter((m, p) for m, p, _ in built
                             if re.search(r"/(logits/(values|indices|tail)|features/stage3/values)/c/", p))
    assert {m for m, _ in shard_requests} == {"PUT"} and len(shard_requests) == 4 * N // 4, shard_requests
    r = kd("verify-cache", url, "--quiet")
    assert r.exit_code == 0 and f"ok: all {N} samples" in r.output, r.output
    r = kd("inspect-cache", url, "--json", tmp_path / "inspect.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "inspect.json").read_text())["done"] == N

    # streaming: every shard file fetched once per epoch, by whichever spawned worker reads it
    s3.reset_counts()
    epochs, workers = 2, 2
    r = kd("train-student", "--cache", url, "--out", tmp_path / "s", "--epochs", epochs, "--limit", N,
           "--batch-size", 4, "--device", "cpu", "--workers", workers, "--quiet")
    assert r.exit_code == 0, r.output
    gets = Counter(p.split("?")[0] for m, p, _ in s3.requests if m == "GET")
    shard_files = {p for p in gets if re.search(r"/(values|indices|tail)/c/\d", p)}
    assert len(shard_files) == 3 * N // 4  # values, indices, tail: one file per shard each
    assert all(gets[p] == epochs for p in shard_files), {p: gets[p] for p in shard_files}
    extents = {p for p in gets if "/hw/c/" in p}
    assert extents and all(gets[p] <= epochs for p in extents)  # a shard's extents with its shard
    per_run = {p for p in gets if re.search(r"/(sample_id|done|content_hash)/c/", p)}
    assert per_run and all(gets[p] == 1 for p in per_run)  # read once, when the store is joined
    # the rest is metadata: zarr.json documents and listings, a fixed number per process opened: the
    # main process and each spawned worker, which is started once for the run (not every epoch)
    metadata = sum(n for p, n in gets.items() if p not in shard_files | extents | per_run)
    opened = 1 + workers
    assert metadata <= 12 * opened, gets
    # each spawned worker opened the arrays it reads once in the two epochs: kept, not started again
    arrays = {p for p in gets if re.search(r"/logits/(values|indices|tail|hw)/zarr\.json$", p)}
    assert len(arrays) == 4 and all(gets[p] == workers for p in arrays), {p: gets[p] for p in arrays}


def test_slow_failing_and_dropped_requests_are_retried(s3, teacher, reference, tmp_path, monkeypatch):
    import s3fs

    # botocore and s3fs try each request once: kdcache's own retries must carry every request
    # (metadata and listings too, not only shards and blocks)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    S3Server._clear_instances()
    s3.faults(error_share=0.1, error_status=503, drop_share=0.05, delay_s=0.01)
    url = "s3://caches/faulty.zarr"
    r = kd(*_build(teacher, url))
    assert r.exit_code == 0, r.output
    s3.faults(error_share=0.1, error_status=500, drop_share=0.05, delay_s=0.01)
    r = kd(*_student(url, tmp_path / "s"))
    assert r.exit_code == 0, r.output
    statuses = Counter(status for _, _, status in s3.requests)
    assert statuses[503] and statuses[500] and statuses["dropped"], statuses  # the faults happened
    s3.faults()
    assert_same_store(url, reference)


def test_a_request_that_keeps_failing_ends_in_one_line_and_the_build_resumes(s3, teacher, reference, tmp_path,
                                                                              monkeypatch):
    import s3fs

    # fail fast: botocore and s3fs each try once (their own retries stack under kdcache's)
    monkeypatch.setenv("KDCACHE_REMOTE_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    S3Server._clear_instances()
    url = "s3://caches/stuck.zarr"
    # shard 2's logits fail every time they are written
    s3.faults(error_share=1.0, only="/stuck.zarr/logits/values/c/2/", methods=("PUT",))
    r = kd(*_build(teacher, url))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: writing shard 2 of the teacher cache s3://caches/stuck.zarr"
                                                    " failed 2 times"), r.output
    assert "rerun the same command to resume" in lines[0]
    done = arrays_of(url)["done"]
    assert not done[8:12].any() and done[:8].all()  # the failed shard is not marked done; the rest is kept
    s3.faults()
    r = kd(*_build(teacher, url))  # the same command again
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    assert_same_store(url, reference)

    # reads: the shard files of the logits keep failing while a student streams them
    s3.faults(error_share=1.0, only="/stuck.zarr/logits/values/c/", methods=("GET",))
    r = kd(*_student(url, tmp_path / "s"))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "s3://caches/stuck.zarr/logits/values failed 2 times" in lines[0], r.output
    assert "--skip-bad" not in lines[0]  # a failing server is not a damaged sample

    # metadata: an array's zarr.json keeps failing when the student opens the store
    s3.faults(error_share=1.0, only="/stuck.zarr/logits/values/zarr.json", methods=("GET", "HEAD"))
    r = kd(*_student(url, tmp_path / "m"))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "failed 2 times" in lines[0], r.output
    assert "(reading s3://caches/stuck.zarr/logits/values/zarr.json: OSError" in lines[0], r.output  # the object


def test_a_lost_shard_is_never_trained_on(s3, teacher, tmp_path):
    import s3fs

    url = "s3://caches/lost.zarr"
    assert kd(*_build(teacher, url)).exit_code == 0
    s3fs.S3FileSystem(skip_instance_cache=True).rm("caches/lost.zarr/logits/indices/c/1/0/0/0")  # samples 4..7
    r = kd(*_student(url, tmp_path / "a"))
    assert r.exit_code == 2 and "train_000004" in r.output and "--skip-bad" in r.output, r.output
    r = kd(*_student(url, tmp_path / "b", "--skip-bad"))
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["train_kd_skipped"] == pytest.approx(4 / N)
    r = kd("verify-cache", url, "--quiet")
    assert r.exit_code == 1 and all(f"train_00000{i}" in r.output for i in range(4, 8)), r.output


def _subprocess_env(s3):
    return {**os.environ, **s3.env, "OMP_NUM_THREADS": "1", "KDCACHE_REMOTE_BACKOFF": "0.05"}


def test_a_build_killed_mid_way_resumes_to_the_uninterrupted_store(s3, teacher, tmp_path):
    n = 32
    ref = tmp_path / "ref.zarr"
    env = _subprocess_env(s3)
    r = kd_on_one_thread(*_build(teacher, ref, n))  # on one thread, as the killed build runs: the same numbers
    assert r.exit_code == 0, r.output
    url = "s3://caches/killed.zarr"
    s3.faults(delay_s=0.03)  # slow enough to be caught mid-way
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *map(str, _build(teacher, url, n))], env=env)
    deadline, killed = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        marked = {p for m, p, status in list(s3.requests) if m == "PUT" and "/killed.zarr/done/c/" in p}
        if len(marked) >= 2:
            proc.send_signal(signal.SIGKILL)  # no clean-up at all
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, "the build finished before it could be killed"
    s3.faults()
    done = arrays_of(url)["done"]
    assert 0 < done.sum() < n
    r = subprocess.run([sys.executable, "-m", "kdcache", *map(str, _build(teacher, url, n))], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr
    assert_same_store(url, ref)


def test_two_torchrun_processes_build_one_s3_store(s3, teacher, tmp_path):
    env = _subprocess_env(s3)
    one = tmp_path / "one.zarr"  # one process, one thread, as each torchrun process runs
    r = kd_on_one_thread(*_build(teacher, one))
    assert r.exit_code == 0, r.output
    url = "s3://caches/two.zarr"
    r = torchrun("-m", "kdcache", *_build(teacher, url), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(url, one)
    assert np.asarray(arrays_of(url)["done"]).all()
