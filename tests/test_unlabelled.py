"""Students trained on labelled images plus caches of unlabelled ones (--unlabeled-cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_runner import kd
from fake_data import make_mixed_size_folders, make_teacher

from kdcache.core.errors import KDCacheError
from kdcache.store import CacheStore, to_tensors
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store
from kdcache.train.student_batches import MixedPipeline, mixed_batches

RES = {"resolution": [32, 48]}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("u")
    teacher = make_teacher(root / "t.pt")
    out = {}
    for name, split, n in (("lab", "train", 8), ("pool", "unlabeled", 12)):
        out[name] = root / f"{name}.zarr"
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out[name]), split=split, limit=n, topk=4,
                                             dataset_options=RES, samples_per_shard=4, device="cpu", workers=0),
                            show_progress=False)
    return out


def test_mixed_batches_cover_labelled_once_and_the_pool_pass_by_pass():
    L, U, B = 10, 7, 4
    seen_u = []
    for epoch in range(3):
        batches = mixed_batches(L, U, B, 0.5, seed=3, epoch=epoch)
        assert batches == mixed_batches(L, U, B, 0.5, seed=3, epoch=epoch)  # (seed, epoch) alone: resumable
        assert len(batches) == L // 2 and all(len(b) == B for b in batches)
        lab = [i for b in batches for i in b[:2]]
        assert sorted(lab) == sorted(set(lab)) and all(i < L for i in lab)
        seen_u += [i - L for b in batches for i in b[2:]]
    # 15 unlabelled draws over 3 epochs: pass 1 (7), pass 2 (7), the start of pass 3; no image twice in a pass
    assert all(0 <= i < U for i in seen_u)
    for p in range(2):
        assert sorted(seen_u[p * U:(p + 1) * U]) == list(range(U))
    assert mixed_batches(L, U, B, 0.5, seed=4, epoch=0) != mixed_batches(L, U, B, 0.5, seed=3, epoch=0)
    assert [len(b) for b in mixed_batches(L, U, 8, 0.25, 0, 0)] == [8]  # 6 labelled + 2 unlabelled a batch


def test_unlabelled_items_carry_their_own_targets_and_no_labels(caches, tmp_path):
    cfg = config_from_store(str(caches["lab"]), methods=[{"name": "kl"}], unlabeled_caches=[str(caches["pool"])],
                            out=str(tmp_path / "r"), device="cpu", workers=0, batch_size=4, hflip=False, limit=8,
                            scale=(1.0, 1.0))
    tr = StudentTrainer(cfg, show_progress=False)
    train_ds, val_ds = tr.build_datasets()
    pipe = tr.build_batches(train_ds, val_ds)[0].pipeline
    assert isinstance(pipe, MixedPipeline) and len(pipe) == 8 + 12 and pipe.num_labelled == 8
    pipe.set_epoch(0)
    lab, unl = pipe[3], pipe[8 + 5]
    assert lab["index"] == 3 and (lab["label"] != 255).any()
    assert unl["index"] == 13 and unl["id"] == "unlabeled_000005" and (unl["label"] == 255).all()
    want = to_tensors(CacheStore(caches["pool"]).read(5))  # scale 1, whole image, no flip: the cached maps
    assert torch.equal(unl["kd/values"], want["logits/values"]) and torch.equal(unl["kd/indices"],
                                                                                want["logits/indices"])


def test_a_mixed_batch_is_read_cache_by_cache_and_equals_its_items(caches, tmp_path, monkeypatch):
    cfg = config_from_store(str(caches["lab"]), methods=[{"name": "kl"}], unlabeled_caches=[str(caches["pool"])],
                            out=str(tmp_path / "r"), device="cpu", workers=0, batch_size=4, limit=8)
    tr = StudentTrainer(cfg, show_progress=False)
    batches = tr.build_batches(*tr.build_datasets())[0]
    pipe = batches.pipeline
    reads = []
    original = CacheStore.read_rows
    monkeypatch.setattr(CacheStore, "read_rows", lambda self, rows, **kw: reads.append(len(rows))
                        or original(self, rows, **kw))
    loaded = list(batches.loader(2))
    assert len(loaded) == 4 and reads == [2, 2] * 4  # each batch: its 2 labelled samples, then its 2 of the pool
    for b in loaded:
        index = b["index"].tolist()
        assert [i < 8 for i in index] == [True, True, False, False]
        for j, i in enumerate(index):  # the same items as reading them one by one
            one = pipe[i]
            assert one["index"] == i
            for key, v in one.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, b[key][j]), key


@pytest.mark.slow  # trains a student
def test_train_student_with_an_unlabelled_cache(caches, tmp_path, monkeypatch):
    """Every labelled image once an epoch, the pool's images half of each batch, a run that resumes
    to the same weights, and a compare of it that works."""
    args = ["train-student", "--cache", caches["lab"], "--unlabeled-cache", caches["pool"], "--method", "kl",
            "--batch-size", 4, "--limit", 8, "--device", "cpu", "--workers", 0, "--quiet"]
    r = kd(*args, "--epochs", 3, "--out", tmp_path / "full")
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    recs = [x for x in recs if "train_samples_seen" in x]
    assert [x["train_samples_seen"] for x in recs] == [8, 8, 8] and [x["train_samples_distinct"] for x in recs] == [8] * 3
    assert [x["train_unlabeled_seen"] for x in recs] == [8, 8, 8]  # 4 steps x 2 a batch, from a pool of 12
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["unlabeled_caches"] == [str(caches["pool"])] and cfg["unlabeled_share"] == 0.5
    # interrupted while logging epoch 3 (last.pt is epoch 2's), resumed: the uninterrupted run's weights
    from kdcache.core.runs import RunDir
    from kdcache.train.student import train_student

    real_log = RunDir.log

    def crashing_log(self, record):
        if record.get("epoch") == 2:
            raise KeyboardInterrupt
        real_log(self, record)

    cfg = config_from_store(str(caches["lab"]), methods=[{"name": "kl"}], unlabeled_caches=[str(caches["pool"])],
                            batch_size=4, limit=8, device="cpu", workers=0, epochs=3)
    train_student(cfg.__class__(**{**cfg.to_dict(), "out": str(tmp_path / "a")}), show_progress=False)
    monkeypatch.setattr(RunDir, "log", crashing_log)
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg.__class__(**{**cfg.to_dict(), "out": str(tmp_path / "b")}), show_progress=False)
    monkeypatch.setattr(RunDir, "log", real_log)
    r = kd("train-student", "--resume", "--out", tmp_path / "b", "--quiet")  # options from config.json
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_an_unlabelled_cache_of_another_teacher_or_classes_is_refused(caches, tmp_path):
    other = make_teacher(tmp_path / "other.pt", seed=1)
    build_teacher_cache(CacheBuildConfig(weights=str(other), out=str(tmp_path / "o.zarr"), split="unlabeled", limit=4,
                                         topk=4, dataset_options=RES, device="cpu", workers=0), show_progress=False)
    cfg = config_from_store(str(caches["lab"]), unlabeled_caches=[str(tmp_path / "o.zarr")], out=str(tmp_path / "r"),
                            device="cpu", workers=0, batch_size=4, limit=8)
    tr = StudentTrainer(cfg, show_progress=False)
    with pytest.raises(KDCacheError, match=r"differs from --cache .* in its teacher weights \(sha256\); build both"):
        tr.build_batches(*tr.build_datasets())
    np.testing.assert_equal(len(CacheStore(tmp_path / "o.zarr").ids), 4)  # nothing destroyed


def test_unlabelled_images_of_other_sizes_train_in_mixed_batches(tmp_path):
    """A labelled folder and an unlabelled one whose images differ in size from each other and from
    the crop, not multiples of the stride (their caches' strides are 3.86 x 4 and 4 x 3.94), one
    of them grayscale: every item of a mixed batch gets the crop's size and targets of one grid."""
    lab, unl = make_mixed_size_folders(tmp_path)
    teacher = make_teacher(tmp_path / "t.pt", num_classes=3, class_names=["road", "car", "sky"])
    for args in (["--dataset", "folder", "--data-root", lab, "--split", "all", "--out", tmp_path / "lab.zarr"],
                 ["--dataset", "images", "--data-root", unl, "--out", tmp_path / "unl.zarr"]):
        r = kd("build-teacher-cache", "--weights", teacher, "--topk", 2, "--quiet", *args)
        assert r.exit_code == 0, r.output
    strides = [CacheStore(tmp_path / f"{n}.zarr").schema.strides["logits"] for n in ("lab", "unl")]
    assert strides[0] != strides[1] and not all(float(s).is_integer() for s in strides[0] + strides[1])
    for crop, method, resample in ((None, "kl", "nearest"), ("40x56", "dist", "nearest"), ("40x56", "kl", "bilinear")):
        out = tmp_path / f"s-{method}-{resample}"
        r = kd("train-student", "--cache", tmp_path / "lab.zarr", "--unlabeled-cache", tmp_path / "unl.zarr",
               "--method", method, "--val-split", "all", "--epochs", 1, "--batch-size", 4, "--quiet", "--out", out,
               "--target-resample", resample, *(["--crop-size", crop] if crop else []))
        assert r.exit_code == 0, r.output
        rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
        assert rec["train_samples_seen"] == 6 and rec["train_unlabeled_seen"] == 6 and rec[f"train_{method}"] > 0
    # the items themselves: the crop's size, one target grid, the unlabelled maps through their own extent
    for resample in ("nearest", "bilinear"):
        cfg = config_from_store(str(tmp_path / "lab.zarr"), methods=[{"name": "kl"}], crop=(40, 56), val_split="all",
                                out=str(tmp_path / "r"), unlabeled_caches=[str(tmp_path / "unl.zarr")], device="cpu",
                                workers=0, batch_size=4, target_resample=resample)
        tr = StudentTrainer(cfg, show_progress=False)
        pipe = tr.build_batches(*tr.build_datasets())[0].pipeline
        items = [pipe[i] for i in range(len(pipe))]
        assert {tuple(it["image"].shape) for it in items} == {(3, 40, 56)}
        assert {tuple(it["label"].shape) for it in items} == {(40, 56)}
        assert {tuple(it["kd/values"].shape) for it in items} == {(2, 11, 14)}  # ceil(40 / 3.857), ceil(56 / 4)
        assert {tuple(it["kd/tail"].shape) for it in items} == {(11, 14)}
    assert all((it["label"] == 255).all() for it in items[6:]) and not all((it["label"] == 255).all() for it in items[:6])
