"""Cache forms as a registry (kdcache/store/forms/): each form is one class, a store's form is chosen
once from its schema, and a new form is one declaration that the build, a student's crops, a run's
record and inspect-cache all follow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd

from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.transforms import Augment, Preprocess
from kdcache.pipeline.warp import view_targets
from kdcache.store import CacheStore
from kdcache.store.forms import FORMS, CacheForm, form_of
from kdcache.store.schema import CacheSchema
from kdcache.train.student_batches import KDPipeline

RES = {"resolution": [32, 48]}
N = 4
CLI = ("--dataset-option", "resolution=32x48", "--limit", str(N), "--topk", "4", "--device", "cpu",
       "--workers", "0", "--quiet")


@pytest.fixture
def with_mirror():
    """A form the package does not know, declared here as a user would in one file: the teacher on
    the mirrored image, which every crop takes its targets from, mirrored back."""

    @FORMS.register("mirror")
    class Mirror(CacheForm):
        targets_name = "mirror"
        reads_views = True

        @classmethod
        def plan(cls, ctx):
            size = ctx.sizes[0]
            map_size, feats = ctx.teacher.probe(size, ctx.device)
            return {"count": 1, "scale": (1.0, 1.0), "crop": size, "seed": 0, "map_size": map_size,
                    "feature_shapes": feats, "area": None}

        def teacher_input(self, item, image, index):
            g = Geometry(tuple(image.shape[-2:]), 1.0, 0, 0, tuple(image.shape[-2:]), True)
            item["view_params"] = np.array([g.pack()], dtype=np.float32)

        def teacher_views(self, teacher, x, items, batch):
            out = teacher(x.flip(-1))
            return out.logits, out.features, np.stack([it["view_params"] for it in items])

        def item(self, pipe, index, cached):
            params = cached["views/params"]
            item = pipe.transformed(index, lambda _i, size: Geometry.unpack(size, params[0]))
            item.update(view_targets(cached, 0))
            return item

        def describe(self):
            return "the teacher on the mirrored image"

    yield Mirror
    FORMS.remove("mirror")


def test_a_new_form_is_one_declaration_end_to_end(tmp_path, teacher, with_mirror):
    out = tmp_path / "m.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--form", "mirror", *CLI)
    assert r.exit_code == 0, r.output

    # what the build stored: the teacher's logits on the mirror image are the base map mirrored
    # (the demo teacher is convolutional, so a mirror in equals a mirror out, up to fp noise)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["kdcache"]["form"] == "mirror"
    base, mirrored = g["logits/values"][:].astype(np.float32), g["views/logits/values"][:, 0].astype(np.float32)
    assert mirrored.shape == base.shape
    np.testing.assert_allclose(mirrored[..., 1:-1], base[..., ::-1][..., 1:-1], atol=0.05)
    flips = g["views/params"][:, 0, 5]
    assert (flips == 1).all()

    # chosen once, from the schema
    store = CacheStore(out)
    assert type(form_of(store.schema)) is with_mirror

    # a student's items come through the form: the mirrored image and its targets
    ds = limit(build_dataset("synthetic", "train", **RES), N)
    pipe = KDPipeline(ds, Preprocess(), Augment(crop=(16, 24)), 0, store, np.arange(N))
    item = pipe[1]
    x = Preprocess().image_to_tensor(ds.load(1)[0])
    assert torch.equal(item["image"], x.flip(-1))
    np.testing.assert_array_equal(item["kd/values"].numpy(), store.read(1)["views/logits/values"][0])

    # inspect-cache says what it holds
    r = kd("inspect-cache", out)
    assert r.exit_code == 0 and "the teacher on the mirrored image" in r.output, r.output

    # a run records the form's targets
    r = kd("train-student", "--cache", out, "--limit", str(N), "--epochs", "1", "--batch-size", "2",
           "--out", tmp_path / "s", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["cache_targets"] == "mirror"


@pytest.mark.parametrize("options, name", [((), "plain"), (("--views", "2", "--view-crop", "16x24"), "views"),
                                           (("--schedule-epochs", "2", "--crop-size", "16x24"), "schedule"),
                                           (("--store-flips",), "pyramid")])
def test_each_builtin_form_is_recorded_and_found_again(tmp_path, teacher, options, name):
    out = tmp_path / "c.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, *options, *CLI)
    assert r.exit_code == 0, r.output
    schema = CacheStore(out).schema
    assert schema.meta["form"] == name and form_of(schema).name == name
    # a store written before forms were recorded: the same form, from its arrays
    old = CacheSchema({k: v for k, v in schema.meta.items() if k != "form"})
    assert form_of(old).name == name


def test_form_errors_are_one_line(tmp_path, teacher):
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "a.zarr", "--form", "crops", *CLI)
    assert r.exit_code == 2 and "unknown cache form 'crops'" in r.output and "schedule" in r.output, r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "b.zarr", "--form", "plain",
           "--views", "2", *CLI)
    assert r.exit_code == 2 and "--form plain and the options of the views form are two forms" in r.output, r.output
    for form, needs in (("views", "--views N"), ("schedule", "--schedule-epochs N"),
                        ("pyramid", "--store-scales S,... or --store-flips"), ("label_map", "--label-map")):
        r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "c.zarr", "--form", form, *CLI)
        assert r.exit_code == 2 and f"--form {form} is made from its options: give {needs}" in r.output, r.output
    assert not any((tmp_path / f"{n}.zarr").exists() for n in "abc")
    meta = {"form": "crops", "num_classes": 11}
    with pytest.raises(Exception, match="the store's form 'crops' is not one this kdcache knows"):
        form_of(CacheSchema(meta))
