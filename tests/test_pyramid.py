"""A pyramid cache (``build-teacher-cache --store-scales S,… --store-flips``): the teacher's logits on
the whole image at other scales and on its mirror, each training crop taking the level nearest its
own scale and flip (issue 27 §3: cheaper forms than a schedule, measured against it).

The reference is the teacher run here, in float64, on the whole image scaled (and mirrored) as a
training pipeline scales it: for a crop aligned to the stride at a stored level's scale, the
target is a slice of that map to fp16 rounding — on a mirrored level, the slice the mirror image
puts under the crop, which a mirrored base map does not give (the teacher is not flip-equivariant).
"""

from __future__ import annotations

import pytest
import torch
from cli_runner import kd
from fake_data import make_teacher

from kdcache.models.loading import open_weights
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.transforms import apply_geometry
from kdcache.pipeline.warp import choose_level, level_targets, warp_targets
from kdcache.store import CacheStore, to_tensors
from kdcache.store.forms.pyramid import level_geometry
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store

RES = {"resolution": [32, 48]}
SCALES = (0.75, 1.25)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """(teacher, pyramid store, plain store): a structured teacher's dense top-11 on 6 synthetic
    images, with levels at 0.75 and 1.25 and the mirror at every scale; and the plain cache."""
    d = tmp_path_factory.mktemp("pyramid")
    teacher = make_teacher(d / "t.pt", structured=True)
    common = dict(weights=str(teacher), dataset_options=dict(RES), limit=6, topk=11, samples_per_shard=3,
                  device="cpu", workers=0)
    build_teacher_cache(CacheBuildConfig(out=str(d / "p.zarr"), store_scales=SCALES, store_flips=True, **common),
                        show_progress=False)
    build_teacher_cache(CacheBuildConfig(out=str(d / "b.zarr"), **common), show_progress=False)
    return teacher, CacheStore(d / "p.zarr"), CacheStore(d / "b.zarr")


def _dense(t: dict, C: int = 11) -> torch.Tensor:
    out = torch.full((C, *t["kd/values"].shape[-2:]), float("nan"), dtype=torch.float64)
    out.scatter_(0, t["kd/indices"].long(), t["kd/values"].double())
    return out


def _teacher(teacher):
    return open_weights(teacher).build(num_classes=11).double().eval()


def test_the_store_records_each_level_and_the_teacher_on_it(pyramid):
    teacher, store, _ = pyramid
    levels = store.schema.levels
    assert [(lv["scale"], lv["flip"]) for lv in levels] == [(0.75, False), (1.25, False), (1.0, True),
                                                            (0.75, True), (1.25, True)]
    # stride 4 on 32 x 48: 6 x 9, 10 x 15, 8 x 12 maps; the view arrays padded to the largest
    assert [lv["map_size"] for lv in levels] == [[6, 9], [10, 15], [8, 12], [6, 9], [10, 15]]
    assert store.schema.views["map_size"] == [10, 15]
    model = _teacher(teacher)
    ds = store.dataset()
    item = to_tensors(store.read(2, groups=["logits", "views/logits"]))
    image = open_weights(teacher).preprocess.image_to_tensor(ds.load(2)[0])
    for v, lv in enumerate(levels):
        g = level_geometry((32, 48), lv["scale"], lv["flip"])
        with torch.no_grad():
            live = model(apply_geometry(image, g, kind="image")[None].double()).logits[0]
        h, w = lv["map_size"]
        got = _dense({"kd/values": item["views/logits/values"][v][..., :h, :w],
                      "kd/indices": item["views/logits/indices"][v][..., :h, :w]})
        torch.testing.assert_close(got, live, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("scale,flip,top,left", [(1.0, True, 8, 4), (1.25, False, 4, 8), (1.25, True, 12, 20),
                                                 (0.75, True, 0, 4), (0.75, False, 8, 0)])
def test_an_aligned_crop_takes_the_teacher_on_its_level(pyramid, scale, flip, top, left):
    """The crop's target equals the slice of the teacher's map on the scaled (mirrored) whole
    image that lies under the crop, computed here from that map alone."""
    teacher, store, _ = pyramid
    model = _teacher(teacher)
    image = open_weights(teacher).preprocess.image_to_tensor(store.dataset().load(1)[0])
    g = Geometry((32, 48), scale, top, left, (16, 24), flip)
    level = level_geometry((32, 48), scale, flip)
    with torch.no_grad():
        m = model(apply_geometry(image, level, kind="image")[None].double()).logits[0]
    r0, c0, nh, nw, w = top // 4, left // 4, 4, 6, m.shape[-1]
    # the mirror image holds the crop's columns counted from the right; unmirrored, the crop's own
    expected = m[:, r0:r0 + nh, w - c0 - nw:w - c0] if flip else m[:, r0:r0 + nh, c0:c0 + nw]
    item = to_tensors(store.read(1, groups=store.schema.groups_for(["logits"])))
    t = level_targets(item, g, store.schema.strides, store.schema.levels)
    assert not t["kd/ignore"].any()
    torch.testing.assert_close(_dense(t), expected, rtol=2e-3, atol=2e-3)
    # the same crop from the base map alone (nearest cell, mirrored indexing) is further off
    plain = warp_targets({k: v for k, v in item.items() if not k.startswith("views/")}, g, store.schema.strides)
    if (scale, flip) != (1.0, False):
        assert (_dense(plain) - expected).abs().amax() > 0.2


def test_bilinear_on_a_level_is_exact_on_its_cell_centres(pyramid):
    """--target-resample bilinear on a mirrored level: at an aligned crop the points are cell
    centres, so it gives the nearest level's slice back (top-k of a dense cache: exact)."""
    _, store, _ = pyramid
    item = to_tensors(store.read(0, groups=store.schema.groups_for(["logits"])))
    g = Geometry((32, 48), 1.25, 4, 8, (16, 24), True)
    near = level_targets(item, g, store.schema.strides, store.schema.levels)
    bil = level_targets(item, g, store.schema.strides, store.schema.levels, "bilinear", 11)
    torch.testing.assert_close(_dense(bil), _dense(near), rtol=2e-3, atol=2e-3)


def test_the_level_is_the_nearest_scale_of_the_crops_flip():
    levels = [{"scale": 0.75, "flip": False}, {"scale": 1.25, "flip": False}, {"scale": 1.0, "flip": True},
              {"scale": 0.75, "flip": True}, {"scale": 1.25, "flip": True}]

    def pick(scale, flip, lv=levels, stretch=1.0):
        return choose_level(Geometry((32, 48), scale, 0, 0, (32, 48), flip, stretch), lv)

    assert pick(1.0, False) == 0 and pick(1.0, True) == 3
    assert pick(0.8, False) == 1 and pick(1.2, False) == 2 and pick(0.8, True) == 4 and pick(1.3, True) == 5
    # |log 0.86 - log 0.75| = 0.137 < |log 0.86 - log 1| = 0.151: 0.75; at 0.88, 0.159 > 0.128: 1
    assert pick(0.86, False) == 1 and pick(0.88, False) == 0
    # the geometric mean of a stretched crop's two scales: 1.0 x sqrt(1.6) = 1.26
    assert pick(1.0, False, stretch=1.6) == 2
    # scales alone (no mirrored level): a flipped crop takes an unmirrored level and mirrors its indexing
    assert pick(1.2, True, lv=levels[:2]) == 2 and pick(1.0, True, lv=levels[:2]) == 0


def test_a_student_trains_from_a_pyramid_and_reads_the_levels(pyramid, tmp_path):
    teacher, store, _ = pyramid
    r = kd("train-student", "--cache", store.path, "--limit", "6", "--epochs", "1", "--batch-size", "3",
           "--out", tmp_path / "s", "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    cfg = __import__("json").loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["cache_targets"] == "levels"
    # each item's targets are level_targets of its own geometry, and the crops take several levels
    trainer = StudentTrainer(config_from_store(str(store.path), limit=6, epochs=2, batch_size=3, workers=0,
                                               device="cpu", out=str(tmp_path / "t")))
    pipe = trainer.build_batches(*trainer.build_datasets())[0].pipeline
    chosen = set()
    for epoch in range(2):
        pipe.set_epoch(epoch)
        for i in range(6):
            g = pipe.geometry(i, (32, 48))
            chosen.add(choose_level(g, store.schema.levels))
            want = level_targets(to_tensors(store.read(i, groups=pipe.groups)), g, store.schema.strides,
                                 store.schema.levels)
            got = pipe[i]
            for key in ("kd/values", "kd/indices", "kd/ignore"):
                assert torch.equal(got[key], want[key]), (epoch, i, key)
    assert len(chosen) >= 3, chosen


def test_bad_pyramids_are_one_line_each(pyramid, tmp_path):
    teacher, store, _ = pyramid
    build = ["build-teacher-cache", "--weights", teacher, "-o", "resolution=32x48", "--limit", "4",
             "--out", tmp_path / "x.zarr"]
    for extra, words in (
        (["--store-scales", "1,1.25"], "--store-scales takes the scales other than 1 (the base map), each > 0; got 1"),
        (["--store-scales", "-0.5"], "--store-scales must be a finite number in [0.05, 20], got -0.5"),
        (["--store-scales", "1.25,1.25"], "--store-scales has a scale twice: 1.25,1.25"),
        (["--store-scales", "1.25", "--views", "2"], "--store-scales and --views are two forms of stored targets"),
        (["--store-flips", "--schedule-epochs", "2"], "--store-flips and --schedule-epochs are two forms"),
        (["--store-flips", "--flip-average"], "--store-flips and --flip-average both make flips exact"),
    ):
        r = kd(*build, *extra)
        assert r.exit_code == 2 and words in " ".join(r.output.split()), (extra, r.output)
        assert not (tmp_path / "x.zarr").exists()
    r = kd("train-student", "--cache", store.path, "--use-views", "--limit", "6", "--epochs", "1",
           "--out", tmp_path / "s")
    assert r.exit_code == 2 and "drop --use-views" in " ".join(r.output.split()), r.output


def test_a_pyramid_refuses_a_classifier_and_images_of_several_sizes(tmp_path):
    from fake_data import make_mixed_size_folders

    from kdcache.core.checkpoint import save_checkpoint
    from kdcache.models import build_model
    from kdcache.pipeline.transforms import Preprocess

    cls = save_checkpoint(tmp_path / "c.pt", build_model("demo_cls_teacher", 10, width=8),
                          config={"model": "demo_cls_teacher", "num_classes": 10, "model_options": {"width": 8},
                                  "preprocess": Preprocess().to_dict()})
    r = kd("build-teacher-cache", "--weights", cls, "--dataset", "shapes", "-o", "size=4", "-o", "resolution=24",
           "--store-flips", "--out", tmp_path / "c.zarr")
    assert r.exit_code == 2 and "--store-flips is for segmentation caches; a classifier's crops take --label-map" \
        in " ".join(r.output.split()), r.output
    lab, _ = make_mixed_size_folders(tmp_path, labelled=3, unlabelled=0)
    seg = make_teacher(tmp_path / "t.pt", num_classes=3, class_names=["road", "car", "sky"])
    r = kd("build-teacher-cache", "--weights", seg, "--dataset", "folder", "--data-root", lab, "--split", "all",
           "--store-scales", "1.25", "--out", tmp_path / "f.zarr")
    assert r.exit_code == 2 and "the images have different sizes: --store-scales needs images of one size" \
        in " ".join(r.output.split()), r.output
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "f.zarr").exists()
