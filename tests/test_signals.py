"""Teacher signals as specs (kdcache/pipeline/signals.py): a new kind of teacher map is one
declaration, and the build, the store's schema and arrays, the reader, a crop's targets, the online
teacher and inspect-cache all carry it without naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd

from kdcache.core.checkpoint import load_weights
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.models import build_model
from kdcache.pipeline.signals import SIGNALS, Signal, signal_of
from kdcache.pipeline.transforms import Augment, Preprocess
from kdcache.store import CacheStore
from kdcache.teacher.online import OnlineTeacher
from kdcache.train.student_batches import KDPipeline

RES = {"resolution": [32, 48]}
N = 4
CLI = ("--dataset-option", "resolution=32x48", "--limit", str(N), "--topk", "4", "--device", "cpu",
       "--workers", "0", "--quiet")


def energy(feature: torch.Tensor) -> torch.Tensor:
    """The new signal's encoding, written out independently of the class below."""
    return feature.double().abs().mean(1)


@pytest.fixture
def with_energy():
    """A signal the package does not know, declared here as a user would in one file."""

    @SIGNALS.register("energy")
    class Energy(Signal):
        """Mean absolute activation over the channels: one map per tap."""

        channels = False

        def encode(self, feature):
            return feature.float().abs().mean(1)

    yield Energy
    SIGNALS.remove("energy")


def teacher_features(teacher, n: int) -> torch.Tensor:
    model = build_model("demo_teacher", 11, taps=("stage3",))
    load_weights(model, teacher)
    model.eval()
    ds = limit(build_dataset("synthetic", "train", **RES), n)
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(n)])
    with torch.no_grad():
        return model(x).features["stage3"]


def test_a_new_signal_is_one_declaration_end_to_end(tmp_path, teacher, with_energy):
    out = tmp_path / "e.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--features", "stage3",
           "--signals", "features,energy", *CLI)
    assert r.exit_code == 0, r.output

    # the arrays, through zarr's public API: the encoding applied to the teacher's own features
    g = zarr.open_group(str(out), mode="r")
    f = teacher_features(teacher, N)
    assert g["energy/stage3/values"].shape == (N, *f.shape[-2:])
    np.testing.assert_allclose(g["energy/stage3/values"][:].astype(np.float64), energy(f).numpy(), rtol=2e-3,
                               atol=2e-3)
    np.testing.assert_allclose(g["features/stage3/values"][:].astype(np.float32), f.numpy(), rtol=2e-3, atol=2e-3)
    assert "attention/stage3/values" not in {f"{a}/{b}" for a, sub in g.groups() for b, _ in sub.groups()}
    meta = g.attrs["kdcache"]
    assert meta["energy"] == {"stage3": {"map_size": list(f.shape[-2:]), "stride": [8.0, 8.0]}}

    # the schema and the reader
    store = CacheStore(out)
    assert store.schema.signal_groups() == ["features/stage3", "energy/stage3"]
    assert store.schema.strides["energy/stage3"] == (8.0, 8.0)
    item = store.read(2)
    np.testing.assert_array_equal(item["energy/stage3"], g["energy/stage3/values"][2])
    assert store.schema.placeholder_targets()["energy/stage3"].shape == (1, 1)

    # a crop's targets: the signal at its own stride, nearest cell, as the features are taken
    ds = limit(build_dataset("synthetic", "train", **RES), N)
    pipe = KDPipeline(ds, Preprocess(), Augment(scale=(1.0, 1.0), crop=(16, 24), hflip=True), 0, store,
                      np.arange(N))
    crop = pipe[2]
    assert crop["kd/energy/stage3"].shape == crop["kd/energy/stage3/ignore"].shape == (2, 3)
    ref = energy(crop["kd/features/stage3"][None].float())[0]
    np.testing.assert_allclose(crop["kd/energy/stage3"].double().numpy(), ref.numpy(), rtol=5e-3, atol=5e-3)

    # inspect-cache lists it
    r = kd("inspect-cache", out)
    assert r.exit_code == 0 and "energy" in r.output and "stage3 (4x6)" in r.output, r.output

    # the online teacher gives it too, as a cache stores it
    online = OnlineTeacher(str(teacher), None, 11, ("stage3",), k=4, device=torch.device("cpu"))
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(2)])
    t = online.targets({"image": x})
    np.testing.assert_allclose(t["kd/energy/stage3"].double().numpy(), energy(f[:2]).numpy(), rtol=2e-3, atol=2e-3)


def test_a_store_without_the_signal_keeps_its_identity_and_layout(tmp_path, teacher, with_energy):
    """Declaring a signal changes no store that does not use it: the same build resumes."""
    out = tmp_path / "plain.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--features", "stage3", *CLI)
    assert r.exit_code == 0, r.output
    store = CacheStore(out)
    assert "energy" not in store.schema.meta and store.schema.signal_groups() == ["features/stage3"]
    r = kd("build-teacher-cache", "--weights", teacher, "--out", out, "--features", "stage3", *CLI)
    assert r.exit_code == 0 and f"resumed ({N} were done)" in r.output, r.output


def test_signal_keys():
    assert signal_of("features/stage3").name == "features"
    assert signal_of("attention/x").name == "attention"
    assert signal_of("logits/values") is None and signal_of("views/params") is None
    assert signal_of("views/features/stage3") is None  # a stored view's maps are taken whole, not warped


def test_bad_signal_options_are_one_line_errors(tmp_path, teacher):
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "a.zarr", "--features", "stage3",
           "--signals", "gram", *CLI)
    assert r.exit_code == 2 and "unknown teacher signal 'gram'" in r.output and "attention, features" in r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "b.zarr", "--features", "stage3",
           "--signals", "attention", "--attention", *CLI)
    assert r.exit_code == 2 and "--signals names every signal to store" in r.output, r.output
    r = kd("build-teacher-cache", "--weights", teacher, "--out", tmp_path / "c.zarr", "--signals", "attention", *CLI)
    assert r.exit_code == 2 and "--signals needs --features" in r.output, r.output
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
