"""train-student under torchrun: DistributedDataParallel over 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_data import make_teacher

from kdcache.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.training import rank_indices


def test_rank_shares_are_disjoint_equal_and_keep_shards_whole():
    groups = np.repeat(np.arange(6), 8)  # 6 shards of 8 samples
    for epoch in range(3):
        parts = [rank_indices(48, (0, epoch), r, 2, groups, min_size=4) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == 24
        assert not set(parts[0]) & set(parts[1])
        for p in parts:  # whole shards per rank
            assert {int(g) for g in groups[p]} and all((groups[p] == g).sum() == 8 for g in set(groups[p]))
    a = rank_indices(48, (0, 0), 0, 2, groups)
    b = rank_indices(48, (0, 1), 0, 2, groups)
    assert a != b  # a new draw each epoch
    # too few shards for the ranks: dealt sample by sample
    parts = [rank_indices(10, 0, r, 3, np.zeros(10, int), min_size=2) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and len(set().union(*parts)) == 9


def ddp_problems(two: list[dict], one: list[dict], n: int) -> list[str]:
    """What is wrong with a 2-process run against the 1-process run with the same global batch."""
    problems = []
    for x in two:
        if x["train_samples_per_rank"] != [n // 2, n // 2]:
            problems.append(f"epoch {x['epoch']}: samples per rank {x['train_samples_per_rank']}")
        if x["train_samples_distinct"] != n or x["train_samples_seen"] != n:
            problems.append(f"epoch {x['epoch']}: {x['train_samples_distinct']} distinct of "
                            f"{x['train_samples_seen']} seen, want {n} of {n}")
        if not x["train_replicas_equal"]:
            problems.append(f"epoch {x['epoch']}: the ranks' replicas differ")
    for a, b in zip(one, two):  # 2 x batch 4 vs 1 x batch 8 (BatchNorm statistics are per rank)
        if b["train_loss"] != pytest.approx(a["train_loss"], rel=0.03):
            problems.append(f"epoch {a['epoch']}: train loss {b['train_loss']:.4f} vs {a['train_loss']:.4f}")
        if abs(b["val_miou"] - a["val_miou"]) >= 0.03:
            problems.append(f"epoch {a['epoch']}: val mIoU {b['val_miou']:.4f} vs {a['val_miou']:.4f}")
    return problems


def test_two_process_training_matches_one_process(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = tmp_path / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), dataset_options={"resolution": [32, 48]},
                                         limit=32, topk=4, features=("stage3",), samples_per_shard=8, device="cpu",
                                         workers=0), show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train-student", "--cache", str(cache), "--epochs", "2", "--limit", "32", "--device", "cpu",
            "--workers", "0", "--quiet", "--method", "kl", "--method", "fitnet", "--student-tap", "stage3",
            "--teacher-tap", "stage3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, "-m", "kdcache", *args, "--batch-size", "4", "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done: kl+fitnet") == 1  # rank 0 alone reports
    subprocess.run([sys.executable, "-m", "kdcache", *args, "--batch-size", "8", "--out", str(tmp_path / "one")],
                   env=env, check=True, capture_output=True)
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in two] == [0, 1]  # written once, by rank 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert ddp_problems(two, one, 32) == []

    # negative controls: the same run with DDP broken must fail these checks
    control = Path(__file__).with_name("ddp_control.py")
    for broken, symptom in (("no-averaging", "replicas differ"), ("duplicate-shards", "16 distinct of 32 seen")):
        out = tmp_path / broken
        r = subprocess.run([*torchrun, str(control), *args, "--epochs", "1", "--batch-size", "4", "--out", str(out)],
                           env={**env, "DDP_CONTROL": broken}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        found = ddp_problems([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], one, 32)
        assert any(symptom in p for p in found), (broken, found)


def test_two_processes_with_an_unlabelled_cache(tmp_path):
    """--unlabeled-cache under torchrun: the ranks keep equal replicas, together see every labelled
    sample once per epoch and as many pool samples as one process with the same global batch."""
    teacher = make_teacher(tmp_path / "t.pt")
    common = dict(weights=str(teacher), dataset_options={"resolution": [32, 48]}, topk=4, samples_per_shard=8,
                  device="cpu", workers=0)
    build_teacher_cache(CacheBuildConfig(out=str(tmp_path / "c.zarr"), limit=32, **common), show_progress=False)
    build_teacher_cache(CacheBuildConfig(out=str(tmp_path / "pool.zarr"), split="unlabeled", limit=64, **common),
                        show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train-student", "--cache", str(tmp_path / "c.zarr"), "--unlabeled-cache", str(tmp_path / "pool.zarr"),
            "--epochs", "2", "--limit", "32", "--device", "cpu", "--workers", "0", "--quiet", "--method", "kl"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, "-m", "kdcache", *args, "--batch-size", "4", "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "kdcache", *args, "--batch-size", "8", "--out", str(tmp_path / "one")],
                   env=env, check=True, capture_output=True)
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 2
    for a, b in zip(one, two):
        assert b["train_replicas_equal"], b
        assert b["train_unlabeled_seen"] == a["train_unlabeled_seen"] > 0, (a, b)
        assert b["train_unlabeled_distinct"] == a["train_unlabeled_distinct"] == a["train_unlabeled_seen"], (a, b)
        assert b["train_samples_seen"] == a["train_samples_seen"] and b["train_samples_distinct"] == a[
            "train_samples_distinct"], (a, b)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05), (a["train_loss"], b["train_loss"])
