"""train-student under torchrun: DistributedDataParallel over 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import kd, torchrun
from fake_data import make_teacher

from kdcache.methods import METHODS
from kdcache.methods.base import method_options
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.batches import rank_indices
from kdcache.train.student import StudentTrainer, config_from_store


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


def test_every_method_gives_each_of_its_parameters_a_gradient_on_every_batch(teacher, tmp_path):
    """The methods' own parameters (an adapter, a projection head) are outside DDP: each rank
    all-reduces their gradients itself (``distributed.average_gradients``), skipping a parameter
    without one. A rank on which some batch left a parameter without a gradient would skip a
    collective the other ranks wait in, and the run would hang. So every registered method that has
    parameters gives each of them a gradient on every batch, including one where nothing is left to
    match (every target cell ignored, no pixel labelled); a new method that returns a loss not
    connected to its parameters there fails here, in one process, rather than hanging under torchrun."""
    cache = tmp_path / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), dataset_options={"resolution": [32, 48]},
                                         limit=4, topk=4, features=("stage3",), attention=True, samples_per_shard=4,
                                         device="cpu", workers=0), show_progress=False)
    covered = []
    for name in METHODS.names():
        taps = {k: "stage3" for k in ("student_tap", "teacher_tap") if k in method_options(name)}
        tr = StudentTrainer(config_from_store(str(cache), methods=[{"name": name, **taps}], limit=4, batch_size=2,
                                              epochs=1, workers=0, device="cpu", out=str(tmp_path / name)),
                            overwrite=True, show_progress=False)
        ready = tr.prepare()  # writes nothing
        params = [(f"{m.name}.{n}", p) for m in tr.methods for n, p in m.named_parameters()]
        if not params:
            continue
        batch = next(iter(ready.batches.loader(0)))
        nothing = {k: (torch.ones_like(v) if k.endswith("ignore") else torch.full_like(v, 255) if k == "label" else v)
                   for k, v in batch.items()}
        for what, b in (("a batch", batch), ("a batch with nothing to match", nothing)):
            for _, p in params:
                p.grad = None
            loss, _ = tr.compute_loss(ready.model, b)
            loss.backward()
            assert not [n for n, p in params if p.grad is None], (name, what)
        covered.append(name)
    assert {"afdcd", "cirkd", "fitnet"} <= set(covered), covered


def ddp_problems(two: list[dict], n: int, evaluated_miou: float) -> list[str]:
    """What is wrong with a 2-process run of ``n`` samples: each check exact, and each caught
    by one of the broken runs of ``ddp_control.py`` (see the test)."""
    problems = []
    for x in two:
        if x["train_samples_per_rank"] != [n // 2, n // 2]:
            problems.append(f"epoch {x['epoch']}: samples per rank {x['train_samples_per_rank']}")
        if x["train_samples_distinct"] != n or x["train_samples_seen"] != n:
            problems.append(f"epoch {x['epoch']}: {x['train_samples_distinct']} distinct of "
                            f"{x['train_samples_seen']} seen, want {n} of {n}")
        if not x["train_replicas_equal"]:  # the student's parameters and the FitNet adapter's
            problems.append(f"epoch {x['epoch']}: the ranks' replicas differ")
        # the reported loss is the ranks' mean (the ranks' own means gathered apart from the reduction)
        mean = sum(x["train_loss_per_rank"]) / len(x["train_loss_per_rank"])
        if abs(x["train_loss"] - mean) > 1e-9 * abs(mean):
            problems.append(f"epoch {x['epoch']}: train loss {x['train_loss']!r}, the ranks' mean {mean!r}")
    # the last validation covers every image with rank 0's model: what evaluate gives on its last.pt
    if abs(two[-1]["val_miou"] - evaluated_miou) > 1e-6:
        problems.append(f"val mIoU {two[-1]['val_miou']!r}, evaluate of last.pt {evaluated_miou!r}")
    return problems


def evaluated_miou(run: Path) -> float:
    """``kdcache evaluate RUN/last.pt`` on the run's validation images, in one process."""
    r = kd("evaluate", run / "last.pt", "--no-latency", "--qualitative", 0, "--quiet", "--out", run / "eval-last")
    assert r.exit_code == 0, r.output
    return json.loads((run / "eval-last" / "eval.json").read_text())["miou"]


@pytest.mark.slow  # torchrun
def test_two_process_training_is_one_model_trained_on_every_sample(tmp_path):
    """2 CPU processes (gloo), kl + FitNet (an adapter outside DDP): every sample once per epoch,
    half per rank; bit-equal replicas, adapter included; the loss is the ranks' mean; the
    validation is rank 0's model on the whole split. Each check has a negative control: a run
    broken that way (tests/ddp_control.py) that the check catches."""
    teacher = make_teacher(tmp_path / "t.pt", structured=True)
    cache = tmp_path / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), dataset_options={"resolution": [32, 48]},
                                         limit=32, topk=4, features=("stage3",), samples_per_shard=8, device="cpu",
                                         workers=0), show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train-student", "--cache", str(cache), "--limit", "32", "--device", "cpu", "--workers", "0", "--quiet",
            "--method", "kl", "--method", "fitnet", "--student-tap", "stage3", "--teacher-tap", "stage3",
            "--lr", "1e-2", "--batch-size", "4"]
    r = torchrun("-m", "kdcache", *args, "--epochs", "2", "--out", tmp_path / "two", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done: kl+fitnet") == 1  # rank 0 alone reports
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in two] == [0, 1]  # written once, by rank 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert two[-1]["val_miou"] > 0.02  # a student that predicts more than one class: its mIoU can tell
    assert ddp_problems(two, 32, evaluated_miou(tmp_path / "two")) == []

    # negative controls: the same run with DDP broken must fail these checks, each as named (one launch)
    control = Path(__file__).with_name("ddp_control.py")
    symptoms = {"no-averaging": "replicas differ", "duplicate-shards": "16 distinct of 32 seen",
                "no-adapter-averaging": "replicas differ", "unreduced-loss": "the ranks' mean",
                "unreduced-validation": "evaluate of last.pt", "unsynced-buffers": "evaluate of last.pt"}
    r = torchrun(control, tmp_path / "broken", *args, "--epochs", "1", env={**env, "DDP_CONTROL": ",".join(symptoms)})
    assert r.returncode == 0, r.stderr[-3000:]
    for broken, symptom in symptoms.items():
        out = tmp_path / "broken" / broken
        found = ddp_problems([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], 32,
                             evaluated_miou(out))
        assert any(symptom in p for p in found), (broken, found)


@pytest.mark.slow  # torchrun
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
    r = torchrun("-m", "kdcache", *args, "--batch-size", "4", "--out", tmp_path / "two", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = kd(*args, "--batch-size", "8", "--out", tmp_path / "one")  # in this process: only counts are compared
    assert r.exit_code == 0, r.output
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 2
    for a, b in zip(one, two):
        assert b["train_replicas_equal"], b
        assert b["train_unlabeled_seen"] == a["train_unlabeled_seen"] > 0, (a, b)
        assert b["train_unlabeled_distinct"] == a["train_unlabeled_distinct"] == a["train_unlabeled_seen"], (a, b)
        assert b["train_samples_seen"] == a["train_samples_seen"] and b["train_samples_distinct"] == a[
            "train_samples_distinct"], (a, b)
        assert abs(b["train_loss"] - sum(b["train_loss_per_rank"]) / 2) <= 1e-9 * b["train_loss"], b  # the ranks' mean
