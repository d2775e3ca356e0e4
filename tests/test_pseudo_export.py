"""export-pseudo-labels: the teacher's labels from a cache as files, read back as a folder data set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd
from fake_data import make_teacher
from PIL import Image

from kdcache.core.checkpoint import load_weights
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.models import build_model
from kdcache.pipeline.transforms import Preprocess
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

RES = {"resolution": [32, 48]}
N = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("px")
    teacher = make_teacher(root / "t.pt")
    with torch.no_grad():  # a teacher with some confident and some unsure pixels
        ckpt = torch.load(teacher, weights_only=False)
        ckpt["state_dict"]["head.classifier.weight"] *= 3000
        torch.save(ckpt, teacher)
    caches = {}
    for k in (11, 2):
        caches[k] = root / f"k{k}.zarr"
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(caches[k]), split="unlabeled", limit=N,
                                             topk=k, dataset_options=RES, device="cpu", workers=0), show_progress=False)
    ds = limit(build_dataset("synthetic", "unlabeled", **RES), N)
    model = build_model("demo_teacher", 11)
    load_weights(model, teacher)
    model.eval()
    x = torch.stack([Preprocess().image_to_tensor(ds.load(i)[0]) for i in range(N)])
    with torch.no_grad():  # the teacher's own prediction: logits upsampled to the image, then softmax
        p = F.interpolate(model(x).logits, size=(32, 48), mode="bilinear", align_corners=False).softmax(1)
    return caches, ds, p


def test_dense_cache_labels_are_the_teacher_s_upsampled_prediction(setup, tmp_path):
    caches, ds, p = setup
    out = tmp_path / "px"
    r = kd("export-pseudo-labels", caches[11], "--out", out, "--confidence-threshold", 0.6, "--confidence-png",
           "--quiet")
    assert r.exit_code == 0, r.output
    conf, arg = p.max(1)
    want = arg.masked_fill(conf < 0.6, 255).numpy()
    back = build_dataset("folder", "all", out)  # the layout --dataset folder reads
    assert back.ids == ds.ids and back.class_names == ds.class_names
    masks = np.stack([back.load(i)[1] for i in range(N)])
    assert Image.open(out / "masks" / f"{ds.ids[0]}.png").mode == "P"
    assert (masks == want).mean() > 0.995  # fp16 values: a near-tie or a confidence at 0.6 may flip
    assert 0.05 < (want == 255).mean() < 0.95  # the threshold took effect somewhere, not everywhere
    for i in range(N):
        np.testing.assert_array_equal(back.load(i)[0], ds.load(i)[0])  # the image, lossless PNG
    q = np.stack([np.asarray(Image.open(out / "confidence" / f"{sid}.png")) for sid in ds.ids])
    assert q.dtype == np.uint16
    np.testing.assert_allclose(q / 65535, conf.numpy(), atol=5e-3)
    rep = json.loads((out / "pseudo_labels.json").read_text())
    for c, name in enumerate(ds.class_names):
        n = int((arg == c).sum())
        if n:
            assert rep["kept_share_per_class"][name] == pytest.approx(((masks == c).sum()) / n, abs=0.01)
    assert rep["pixels_kept"] == pytest.approx((masks != 255).mean(), abs=0.01)


def test_top_k_cache_and_class_balanced_thresholds(setup, tmp_path):
    """From a top-2 cache the argmax is nearly always the teacher's (only upsampling between
    cells sees the tail's shares); class-balanced thresholds keep every class's best share."""
    caches, ds, p = setup
    assert kd("export-pseudo-labels", caches[2], "--out", tmp_path / "a", "--confidence-threshold", 0,
              "--quiet").exit_code == 0
    masks = np.stack([np.asarray(Image.open(tmp_path / "a" / "masks" / f"{s}.png")) for s in ds.ids])
    # at the cache's own cells the class is the teacher's top 1 and the confidence its exact probability
    from kdcache.report.pseudo_labels import teacher_labels
    from kdcache.store import CacheStore

    store, dense = CacheStore(caches[2]), CacheStore(caches[11])
    for i in range(N):
        item = store.read(i, groups={"logits"})
        labels, conf = teacher_labels(item, 11, item["logits/values"].shape[-2:])
        assert np.array_equal(labels.numpy(), item["logits/indices"][0])
        v = dense.read(i, groups={"logits"})["logits/values"].astype(np.float64)
        exact = np.exp(v[0] - np.logaddexp.reduce(v, axis=0))
        np.testing.assert_allclose(conf.numpy(), exact, atol=2e-3)
    # between cells the tail's shares enter the interpolation: nearly always the teacher's class still
    assert (masks == p.argmax(1).numpy()).mean() > 0.9
    r = kd("export-pseudo-labels", caches[2], "--out", tmp_path / "b", "--confidence-threshold", 0.99,
           "--class-balanced", 0.5, "--quiet")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b" / "pseudo_labels.json").read_text())
    for name, share in rep["kept_share_per_class"].items():
        if share is not None and rep["pixels_per_class"][name] > 200:
            assert share >= 0.5 - 1e-9, (name, share)  # at least its most confident half
    # a rerun into the same folder needs --overwrite, and replaces only an export
    r = kd("export-pseudo-labels", caches[2], "--out", tmp_path / "b", "--quiet")
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert kd("export-pseudo-labels", caches[2], "--out", tmp_path / "b", "--overwrite", "--quiet").exit_code == 0


def test_a_two_class_export_reads_back_with_255_as_ignore(tmp_path):
    """A two-class teacher's export: the printed next step names -o binary_255=false (255 marks the
    pixels left out), and the folder reads back with it, where masks of background and 255 alone
    would otherwise stop at the binary-mask check."""
    root = tmp_path / "frames"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"f{i}.png")
    teacher = make_teacher(tmp_path / "t.pt", num_classes=2, class_names=["background", "lesion"])
    (tmp_path / "names.txt").write_text("background\nlesion\n")
    cache = tmp_path / "c.zarr"
    r = kd("build-teacher-cache", "--weights", teacher, "--dataset", "folder", "--data-root", root, "--split", "all",
           "-o", f"class_names_file={tmp_path / 'names.txt'}", "--out", cache, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    r = kd("export-pseudo-labels", cache, "--out", tmp_path / "px", "--confidence-threshold", 0.99)
    assert r.exit_code == 0, r.output
    assert "-o binary_255=false (255 marks the pixels left out)" in " ".join(r.output.split())
    ds = build_dataset("folder", "all", tmp_path / "px", binary_255=False)
    assert all(set(np.unique(ds.load(i)[1]).tolist()) <= {0, 1, 255} for i in range(len(ds)))
