"""A schedule cache (``build-teacher-cache --schedule-epochs E --schedules R``): the teacher on every
crop a student draws, replayed by the student, so its targets are the live teacher's on its own
pixels (issue 27: cached targets that teach as the online teacher does).

The reference is the teacher run here on the student's item image (the crop it trains on), in
float64: the cached top-k (dense, k = C) is those logits to fp16 rounding. The student's crops are
its own augmentation's (the draw of (seed, epoch, index) with its options), for both tasks; an epoch
reads its own view alone; zarr-python reads what kdcache writes; bad input is one line each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd
from fake_data import make_teacher

from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import SegPipeline
from kdcache.store import CacheStore
from kdcache.store.shards import ShardFile
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store

RES = {"resolution": [32, 48]}
E, R = 3, 2


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """(teacher, schedule store): a structured teacher's dense top-11 and stage3 features on the
    crops of 3 epochs x 2 schedules of 12 synthetic images, 4 per shard."""
    d = tmp_path_factory.mktemp("sched")
    teacher = make_teacher(d / "t.pt", structured=True)
    out = d / "s.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=12,
                                         topk=11, features=("stage3",), schedule_epochs=E, schedules=R,
                                         samples_per_shard=4, device="cpu", workers=0), show_progress=False)
    return teacher, out


def _trainer(store, out, **kw) -> StudentTrainer:
    base = dict(methods=[{"name": "kl"}, {"name": "fitnet", "student_tap": "stage3", "teacher_tap": "stage3"}],
                epochs=E, limit=12, batch_size=4, workers=0, device="cpu", out=str(out))
    base.update(kw)
    return StudentTrainer(config_from_store(str(store), **base))


def _teacher_on(teacher, images: torch.Tensor):
    model = open_weights(teacher).build(taps=("stage3",)).double().eval()
    with torch.no_grad():
        out = model(images.double())
    return out.logits, out.features["stage3"]


def _dense(item: dict, C: int) -> torch.Tensor:
    """The cached top-k of a dense cache (k = C) back as logits [C, h, w]."""
    out = torch.full((C, *item["kd/values"].shape[-2:]), float("nan"), dtype=torch.float64)
    out.scatter_(0, item["kd/indices"].long(), item["kd/values"].double())
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_targets_are_the_teacher_on_the_students_own_crops(seg, tmp_path, seed):
    teacher, store = seg
    trainer = _trainer(store, tmp_path / "r", seed=seed)
    train_ds, val_ds = trainer.build_datasets()
    pipe = trainer.build_batches(train_ds, val_ds)[0].pipeline
    # the crops the student would draw itself: a plain supervised pipeline with its seed and options
    own = SegPipeline(train_ds, pipe.preprocess, pipe.augment, seed=seed)
    for epoch in range(E):
        pipe.set_epoch(epoch)
        own.set_epoch(epoch)
        items = [pipe[i] for i in range(6)]
        for i, item in enumerate(items):
            assert torch.equal(item["image"], own[i]["image"]) and torch.equal(item["label"], own[i]["label"])
        logits, feats = _teacher_on(teacher, torch.stack([it["image"] for it in items]))
        assert logits.abs().amax() > 5  # structured: a wrong crop, scale or flip moves the logits by units
        for j, item in enumerate(items):
            assert not item["kd/ignore"].any()
            torch.testing.assert_close(_dense(item, 11), logits[j], rtol=2e-3, atol=2e-3)  # fp16 rounding
            torch.testing.assert_close(item["kd/features/stage3"].double(), feats[j], rtol=2e-3, atol=2e-3)
    # negative control: another epoch's (or schedule's) targets are not the teacher on this crop
    pipe.set_epoch(0)
    wrong = _dense(pipe[0], 11)
    pipe.set_epoch(1)
    right = _teacher_on(teacher, pipe[0]["image"][None])[0][0]
    assert (wrong - right).abs().amax() > 0.5


def test_a_stream_epoch_reads_its_own_view_alone_and_equals_random_access(seg, tmp_path, monkeypatch):
    _, store = seg
    trainer = _trainer(store, tmp_path / "r", seed=1)
    pipe = trainer.build_batches(*trainer.build_datasets())[0].pipeline
    views_read = []
    original = ShardFile.read

    def recording(self, rows, view=None):
        if self.per_view:
            views_read.append(view)
        return original(self, rows, view)

    monkeypatch.setattr(ShardFile, "read", recording)
    pipe.set_epoch(2)
    streamed = {int(it["index"]): it for it in pipe.stream(buffer_size=1)}
    assert sorted(streamed) == list(range(12))
    assert CacheStore(store).schema.schedule["chunks"] == "view"  # 3 KB a view: one chunk each
    assert set(views_read) == {CacheStore(store).schema.view_of(1, 2)} == {1 * E + 2}
    for i in (0, 5, 11):
        direct = pipe[i]
        for key in ("kd/values", "kd/indices", "kd/features/stage3", "image"):
            assert torch.equal(streamed[i][key], direct[key]), key


def test_zarr_reads_what_kdcache_wrote(seg):
    _, store = seg
    s = CacheStore(store)
    group = zarr.open_group(str(store), mode="r")
    for path in ("views/logits/values", "views/logits/indices", "views/features/stage3/values"):
        via_zarr = np.asarray(group[path][:])
        assert via_zarr.shape[:2] == (12, E * R)
        key = path.removesuffix("/values") if "features" in path else path
        ours = np.stack([s.read(i, groups=[path.rsplit("/", 1)[0]])[key] for i in range(12)])
        assert np.array_equal(via_zarr, ours)
        one = np.stack([s.read(i, groups=[path.rsplit("/", 1)[0]], view=4)[key][0] for i in range(12)])
        assert np.array_equal(via_zarr[:, 4], one)
    params = np.asarray(group["views/params"][:])
    assert params.shape == (12, E * R, 7) and np.isfinite(params).all()


def test_a_schedule_in_memory_store_reads_back(seg, tmp_path):
    """An fsspec store goes through zarr's own write and read path: the same arrays."""
    teacher, store = seg
    url = f"memory://sched-{tmp_path.name}/s.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=url, dataset_options=dict(RES), limit=12,
                                         topk=11, features=("stage3",), schedule_epochs=E, schedules=R,
                                         samples_per_shard=4, device="cpu", workers=0), show_progress=False)
    local, remote = CacheStore(store), CacheStore(url)
    for row in (0, 7):
        a = local.read(row, groups=["views/logits", "views/params"], view=5)
        b = remote.read(row, groups=["views/logits", "views/params"], view=5)
        for key in ("views/logits/values", "views/logits/indices", "views/params"):
            assert np.array_equal(a[key], b[key]), key


def test_a_store_of_later_schedules_holds_what_the_whole_store_holds_for_them(seg, tmp_path):
    """``--first-schedule 1 --schedules 1``: seed 1's crops alone (a machine that trains seed 1
    builds only its schedule). Its views are the whole store's views of schedule 1, byte for byte,
    and the student with seed 1 reads the same items from either; seed 0 is refused."""
    teacher, whole = seg
    part = tmp_path / "s1.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "-o", "resolution=32x48", "--limit", "12", "--topk", "11",
           "--features", "stage3", "--schedule-epochs", str(E), "--first-schedule", "1", "--samples-per-shard", "4",
           "--workers", "0", "--device", "cpu", "--quiet", "--out", part)
    assert r.exit_code == 0, r.output
    a, b = CacheStore(whole), CacheStore(part)
    assert list(b.schema.schedules_held) == [1] and b.schema.views["count"] == E
    assert [b.schema.view_of(1, e) for e in range(E)] == list(range(E))
    for row in (0, 5, 11):
        for e in range(E):
            x = a.read(row, groups=["views/logits", "views/params", "views/features/stage3"], view=a.schema.view_of(1, e))
            y = b.read(row, groups=["views/logits", "views/params", "views/features/stage3"], view=e)
            assert x.keys() == y.keys()
            for key in x:
                assert np.array_equal(x[key], y[key]), (row, e, key)
    assert "schedule 1 per image" in kd("inspect-cache", part).output
    pa = _trainer(whole, tmp_path / "a", seed=1)
    pb = _trainer(part, tmp_path / "b", seed=1)
    pipe_a = pa.build_batches(*pa.build_datasets())[0].pipeline
    pipe_b = pb.build_batches(*pb.build_datasets())[0].pipeline
    for epoch in range(E):
        pipe_a.set_epoch(epoch)
        pipe_b.set_epoch(epoch)
        for i in (0, 7):
            for key in ("image", "label", "kd/values", "kd/indices", "kd/tail", "kd/features/stage3"):
                if key in pipe_a[i]:
                    assert torch.equal(pipe_a[i][key], pipe_b[i][key]), (epoch, i, key)
    r = kd("train-student", "--cache", part, "--limit", "12", "--epochs", "2", "--seed", "0", "--batch-size", "4",
           "--out", tmp_path / "s")
    assert r.exit_code == 2 and (f"--seed 0: {part} holds schedule 1 (--schedules 1 --first-schedule 1), one per "
                                 "seed; train with --seed 1 or build a cache of it with --first-schedule 0 "
                                 "--schedules 1") in " ".join(r.output.split()), r.output
    r = kd("train-student", "--cache", part, "--limit", "12", "--epochs", "2", "--seed", "3", "--batch-size", "4",
           "--out", tmp_path / "s")
    assert r.exit_code == 2 and "--seed 3: " in r.output and (
        "or build a cache of it with --first-schedule 3 --schedules 1" in " ".join(r.output.split())), r.output
    r = kd("train-student", "--cache", part, "--limit", "12", "--epochs", "2", "--seed", "-1", "--batch-size", "4",
           "--out", tmp_path / "s")  # no seed is negative: refused by its bounds, before the cache is read
    assert r.exit_code == 2 and "--seed must be a finite number in [0, 4294967295], got -1" in r.output, r.output
    for schedule, epoch in ((0, 0), (2, 0), (1, E)):  # what the store does not hold has no view
        with pytest.raises(ValueError, match=f"holds schedules 1..1 of {E} epochs, not epoch {epoch} of schedule"):
            b.schema.view_of(schedule, epoch)


def test_classification_replays_its_random_resized_crops(tmp_path):
    """A classifier's schedule: the random-resized boxes (and flips) of each epoch, the teacher's
    top-k on exactly those pixels, which are the student's own draw."""
    from kdcache.core.checkpoint import save_checkpoint
    from kdcache.models import build_model
    from kdcache.pipeline.transforms import Preprocess

    torch.manual_seed(0)
    model = build_model("demo_cls_teacher", 10, width=8)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            with torch.no_grad():
                m.weight.mul_(30.0)  # logits of several units: a wrong box moves them
    teacher = save_checkpoint(tmp_path / "c.pt", model, config={"model": "demo_cls_teacher", "num_classes": 10,
                                                                 "model_options": {"width": 8},
                                                                 "preprocess": Preprocess().to_dict()})
    out = tmp_path / "c.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--dataset", "shapes", "-o", "size=12", "-o", "resolution=24",
           "--topk", "10", "--schedule-epochs", "2", "--crop-area", "0.3,1", "--crop-size", "20x20", "--quiet",
           "--out", out)
    assert r.exit_code == 0, r.output
    sched = CacheStore(out).schema.schedule
    assert sched["augment"]["resized_crop"] == [0.3, 1.0]
    assert sched["chunks"] == "sample"  # 30 B a view: every view of a sample in one chunk, each epoch slices its own
    trainer = StudentTrainer(config_from_store(str(out), model="demo_cls_student", methods=[{"name": "kl"}], epochs=2,
                                               crop=(20, 20), crop_area=(0.3, 1.0), batch_size=4, workers=0,
                                               device="cpu", out=str(tmp_path / "s")))
    train_ds, val_ds = trainer.build_datasets()
    pipe = trainer.build_batches(train_ds, val_ds)[0].pipeline
    own = SegPipeline(train_ds, pipe.preprocess, pipe.augment, seed=0)
    net = open_weights(teacher).build().double().eval()
    for epoch in range(2):
        pipe.set_epoch(epoch)
        own.set_epoch(epoch)
        items = [pipe[i] for i in range(8)]
        assert all(torch.equal(it["image"], own[i]["image"]) for i, it in enumerate(items))
        with torch.no_grad():
            logits = net(torch.stack([it["image"] for it in items]).double()).logits.flatten(1)
        assert logits.std() > 1
        for j, it in enumerate(items):
            torch.testing.assert_close(_dense(it, 10).flatten(), logits[j], rtol=2e-3, atol=2e-3)
        streamed = {int(it["index"]): it for it in pipe.stream(buffer_size=1)}
        assert all(torch.equal(streamed[i]["kd/values"], items[i]["kd/values"]) for i in range(8))
    r = kd("train-student", "--cache", out, "--model", "demo_cls_student", "--epochs", "2", "--crop-size", "20x20",
           "--crop-area", "0.3,1", "--batch-size", "4", "--quiet", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output


def test_bad_schedules_are_one_line_each(seg, tmp_path):
    teacher, store = seg
    build = ["build-teacher-cache", "--weights", teacher, *(x for kv in RES.items() for x in ("-o", f"{kv[0]}=32x48")),
             "--limit", "4", "--out", tmp_path / "x.zarr"]
    for extra, words in (
        (["--schedule-epochs", "-1"], "--schedule-epochs must be a finite number in [0, 65536], got -1"),
        (["--schedule-epochs", "2", "--schedules", "0"], "--schedules must be a finite number in [1, 65536], got 0"),
        (["--schedule-epochs", "2", "--first-schedule", "-1"], "--first-schedule must be a finite number in [0, 4294967295], got -1"),
        (["--first-schedule", "3"], "--first-schedule sets the crops of a schedule; add --schedule-epochs N"),
        (["--schedules", "2"], "--schedules sets the crops of a schedule; add --schedule-epochs N"),
        (["--scale", "0.5,2", "--no-flip"], "--scale, --flip set the crops of a schedule; add --schedule-epochs N"),
        (["--schedule-epochs", "2", "--views", "2"], "--schedule-epochs and --views are two forms of stored targets"),
        (["--schedule-epochs", "2", "--scale", "2,1"], "--scale must be 'lo,hi' with 0 < lo <= hi, got 2.0,1.0"),
    ):
        r = kd(*build, *extra)
        assert r.exit_code == 2 and words in r.output, (extra, r.output)
        assert not (tmp_path / "x.zarr").exists()
    student = ["train-student", "--cache", store, "--limit", "12", "--batch-size", "4", "--out", tmp_path / "s"]
    for extra, words in (
        (["--epochs", "4"], f"--epochs 4 is more than the 3 epochs the schedule of {store} holds; train --epochs 3 "
                            "or fewer, or rebuild it with --schedule-epochs 4"),
        (["--epochs", "2", "--seed", "2"], f"--seed 2: {store} holds schedules 0..1 (--schedules 2), one per seed; "
                                           "train with --seed in 0..1 or rebuild it with --schedules 3"),
        (["--epochs", "2", "--scale", "0.5,2"], "holds a schedule drawn with --scale 0.75,1.25, and this run draws "
                                                "with --scale 0.5,2; train with --scale 0.75,1.25"),
        (["--epochs", "2", "--no-flip"], "holds a schedule drawn with --flip, and this run draws with --no-flip"),
        (["--epochs", "2", "--crop-size", "24x24"], "holds a schedule drawn with --crop-size 32x48, and this run "
                                                    "draws with --crop-size 24x24"),
    ):
        r = kd(*student, *extra)
        assert r.exit_code == 2 and words in " ".join(r.output.split()), (extra, r.output)
    # a schedule cannot be an unlabelled cache: a pool's images are drawn across epochs
    lab = tmp_path / "lab.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(lab), dataset_options=dict(RES), limit=12,
                                         topk=11, device="cpu", workers=0), show_progress=False)
    r = kd("train-student", "--cache", lab, "--unlabeled-cache", store, "--limit", "12", "--epochs", "1",
           "--out", tmp_path / "u")
    assert r.exit_code == 2 and "holds a schedule (--schedule-epochs), which an unlabelled cache cannot replay" \
        in " ".join(r.output.split())


def test_a_batch_of_a_schedule_reads_its_epochs_view_as_each_sample_alone_does(seg, tmp_path):
    """read_rows (random access's batch) of rows in several shards, one view: the same arrays as reading
    each row alone, on local stores and on copies at memory://, where a few rows of a shard go through
    zarr's own selection of the rows and the view (a store of one shard of 12)."""
    import uuid

    import fsspec

    teacher, store = seg
    one = tmp_path / "one.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(one), dataset_options=dict(RES), limit=12,
                                         topk=4, features=("stage3",), schedule_epochs=2, samples_per_shard=12,
                                         device="cpu", workers=0), show_progress=False)
    where = []
    for local in (store, one):
        url = f"memory://{uuid.uuid4().hex}/s.zarr"
        fsspec.filesystem("memory").put(str(local), url[len("memory://"):], recursive=True)
        where += [str(local), url]
    rows = [9, 2, 10, 5]  # of 4 a shard: shards 2, 0, 2, 1; of 12: 4 rows of one shard, too few to fetch it whole
    for path in where:
        s = CacheStore(path)
        views = s.schema.view_count
        for view in (None, 1, views - 1):
            got = s.read_rows(rows, view=view)
            for r, item in zip(rows, got):
                want = s.read(r, view=view)
                assert set(item) == set(want), path
                for key, a in want.items():
                    a = np.asarray(a)
                    assert np.array_equal(item[key], a, equal_nan=a.dtype.kind == "f"), (path, view, r, key)
            if view is not None:
                assert got[0]["views/params"].shape[0] == 1 and got[0]["views/logits/values"].shape[0] == 1
