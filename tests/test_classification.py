"""Image classification through the same cache: data sets read from files the tests write
(ImageFolder, CIFAR pickles) and the built-in shapes, classifiers and their class maps against
the networks' own forward, random-resized crops, ReLabel region pooling against a float64
mixture, top-k metrics by hand, stored views and label maps against the teacher run on them,
and the whole workflow on the command line."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd
from PIL import Image
from zarr_readers import assert_every_array_plain_zarr

from kdcache.core.checkpoint import save_checkpoint
from kdcache.core.errors import KDCacheError
from kdcache.core.metrics import TopK
from kdcache.core.topk import topk_targets
from kdcache.data import build_dataset
from kdcache.data.class_base import NO_LABEL
from kdcache.models import build_model
from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import Geometry, Preprocess, apply_geometry, sample_resized_crop
from kdcache.pipeline.warp import pool_targets
from kdcache.store import CacheStore, to_tensors

SHAPES = ["--dataset", "shapes", "-o", "size=40", "-o", "resolution=24"]


# -- data -------------------------------------------------------------------------------------------
def write_image(path, rng, size=(20, 24), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def test_imagefolder_reads_classes_from_folders_and_labels_every_split(tmp_path):
    rng = np.random.default_rng(0)
    for split, per in (("train", 3), ("val", 2)):
        for name in ("cat", "dog", "emu"):
            for i in range(per if not (split == "val" and name == "emu") else 0):
                write_image(tmp_path / split / name / f"{i}.png", rng)
    write_image(tmp_path / "train" / "dog" / "sub" / "deep.jpg", rng)
    write_image(tmp_path / "unlabeled" / "x.png", rng)
    train = build_dataset("imagefolder", "train", tmp_path)
    val = build_dataset("imagefolder", "val", tmp_path)
    assert train.class_names == val.class_names == ("cat", "dog", "emu")
    assert len(train) == 10 and len(val) == 4
    assert "dog/sub/deep" in train.ids
    labels = {sid: train.label(i) for i, sid in enumerate(train.ids)}
    assert labels["cat/0"] == 0 and labels["dog/sub/deep"] == 1 and labels["emu/2"] == 2
    image, label = train.load(train.ids.index("emu/1"))
    assert image.shape == (20, 24, 3) and label.tolist() == [[2]] and label.dtype == np.int64
    np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / "train" / "emu" / "1.png")))
    unl = build_dataset("imagefolder", "unlabeled", tmp_path)
    assert not unl.labelled and unl.class_names == train.class_names
    assert unl.load(0)[1].tolist() == [[NO_LABEL]]
    # the content hash covers the class: the same image under another class is another sample
    h = train.content_hash(0)
    moved = tmp_path / "train" / "dog" / "0-moved.png"
    (tmp_path / "train" / "cat" / "0.png").rename(moved)
    again = build_dataset("imagefolder", "train", tmp_path)
    assert again.content_hash(again.ids.index("dog/0-moved")) != h


def test_imagefolder_bad_input_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    write_image(tmp_path / "train" / "a" / "0.png", rng)
    with pytest.raises(KDCacheError, match=r"imagefolder .*train has one class folder \(a\): a classifier needs two"):
        build_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(KDCacheError, match=r"class folder .*train/b holds no images"):
        build_dataset("imagefolder", "train", tmp_path)
    write_image(tmp_path / "train" / "b" / "0.png", rng)
    write_image(tmp_path / "val" / "zebra" / "0.png", rng)
    with pytest.raises(KDCacheError, match="class folders zebra that .*train lacks"):
        build_dataset("imagefolder", "val", tmp_path)
    with pytest.raises(KDCacheError, match="no split folder .*test"):
        build_dataset("imagefolder", "test", tmp_path)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset("imagefolder", "train", tmp_path)
    with pytest.raises(KDCacheError, match="cannot read image .*broken.jpg"):
        ds.load(ds.ids.index("a/broken"))


def write_cifar(root, variant: str, n_train: int, n_test: int, classes: int):
    rng = np.random.default_rng(2)
    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        names = {b"label_names": [f"c{i}".encode() for i in range(classes)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(names))
        parts = np.array_split(np.arange(n_train), 5)
        files = [(f"data_batch_{j + 1}", len(p)) for j, p in enumerate(parts)] + [("test_batch", n_test)]
        key = b"labels"
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(classes)]}))
        files, key = [("train", n_train), ("test", n_test)], b"fine_labels"
    written = {}
    for name, n in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, key: labels}))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("variant,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickles_round_trip_with_a_held_out_val(tmp_path, variant, classes):
    written = write_cifar(tmp_path, variant, 20, 6, classes)
    train_files = [k for k in written if k.startswith(("data_batch", "train"))]
    data = np.concatenate([written[k][0] for k in train_files])
    labels = sum((written[k][1] for k in train_files), [])
    train = build_dataset(variant, "train", tmp_path, val_size=5)
    val = build_dataset(variant, "val", tmp_path / ("cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"),
                        val_size=5)
    test = build_dataset(variant, "test", tmp_path)
    assert (len(train), len(val), len(test)) == (15, 5, 6) and train.num_classes == classes
    assert val.ids[0] == "train-00015" and test.ids[0] == "test-00000"
    image, label = val.load(2)
    expected = data[17].reshape(3, 32, 32).transpose(1, 2, 0)  # CIFAR rows: 1024 R, 1024 G, 1024 B
    np.testing.assert_array_equal(image, expected)
    assert int(label[0, 0]) == labels[17]
    test_name = "test_batch" if variant == "cifar10" else "test"
    assert test.label(5) == written[test_name][1][5]


def test_cifar_bad_input(tmp_path):
    with pytest.raises(KDCacheError, match="not an extracted cifar10 archive"):
        build_dataset("cifar10", "train", tmp_path)
    write_cifar(tmp_path, "cifar10", 10, 2, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(KDCacheError, match="cannot read CIFAR file .*data_batch_3"):
        build_dataset("cifar10", "train", tmp_path)


def test_cifar_reader_builds_no_foreign_objects(tmp_path):
    write_cifar(tmp_path, "cifar10", 10, 2, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}))
    with pytest.raises(KDCacheError, match="builtins.print is not part of a CIFAR file"):
        build_dataset("cifar10", "train", tmp_path)


def test_shapes_is_deterministic_and_balanced():
    from kdcache.data import shapes

    a = build_dataset("shapes", "train", size=200)
    b = build_dataset("shapes", "train", size=50)
    np.testing.assert_array_equal(a.load(7)[0], shapes.render(0, "train", 7, 32)[0])  # drawn again, not the kept one
    np.testing.assert_array_equal(a.load(7)[0], b.load(7)[0])
    assert a.label(7) == b.label(7) == shapes.render(0, "train", 7, 32)[1]
    assert not np.array_equal(a.load(7)[0], build_dataset("shapes", "train", size=10, seed=1).load(7)[0])
    assert a.class_counts().min() >= 10
    assert not build_dataset("shapes", "unlabeled", size=3).labelled


def test_shapes_images_are_drawn_once_per_process(monkeypatch):
    """A second data set object reads the images the first drew (kdcache.data.rendered), as copies."""
    from kdcache.data import shapes
    from kdcache.data.rendered import Rendered

    calls, real = [], shapes.render
    monkeypatch.setattr(shapes, "render", lambda *args: calls.append(args) or real(*args))
    monkeypatch.setattr(shapes, "RENDERED", Rendered(shapes.RENDERED.budget))
    ds = build_dataset("shapes", "val", size=3)
    first = [ds.load(i)[0] for i in range(3)]
    assert len(calls) == 3
    again = build_dataset("shapes", "val", size=3)
    assert all(np.array_equal(again.load(i)[0], first[i]) for i in range(3)) and len(calls) == 3
    again.load(0)[0][:] = 0  # a reader's copy
    assert np.array_equal(again.load(0)[0], first[0])
    build_dataset("shapes", "val", size=3, resolution=24).load(0)
    assert calls[-1] == (0, "val", 0, 24) and len(calls) == 4


# -- models ---------------------------------------------------------------------------------------
def lively(net: torch.nn.Module, x: torch.Tensor) -> None:
    """An untrained torchvision classifier gives logits of about 1e-10: its BatchNorm statistics
    set from ``x`` and its last layer's weights x100, so its outputs are of the order of one."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
        [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(100)
    net.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "demo_cls_teacher"])
def test_classifiers_give_one_cell_logits_and_a_class_map(name):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    assert model.task == "classification"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x).logits
        direct = model.net(x)
        cmap = model.class_map(x)
    assert out.shape == (2, 7, 1, 1)
    torch.testing.assert_close(out[:, :, 0, 0], direct)
    if name == "resnet18":  # the reference by hand: fc at every cell of layer4's map
        net = model.net
        with torch.no_grad():
            f = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
            ref = torch.einsum("bchw,kc->bkhw", f, net.fc.weight) + net.fc.bias[None, :, None, None]
        torch.testing.assert_close(cmap, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cmap.mean((2, 3)), direct, rtol=1e-5, atol=1e-5)
    if name == "mobilenet_v3_small":  # by hand: its whole non-linear classifier (Linear, Hardswish,
        net = model.net  # Dropout, Linear) applied to each cell of the last feature map on its own
        lively(net, x)
        with torch.no_grad():
            cmap, direct = model.class_map(x), net(x)
            assert cmap.std() > 0.3  # values a 1e-5 tolerance can tell apart
            f = net.features(x)
            ref = torch.stack([torch.stack([net.classifier(f[:, :, i, j]) for j in range(f.shape[3])], -1)
                               for i in range(f.shape[2])], -2)
        torch.testing.assert_close(cmap, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cmap.mean((2, 3)), direct, atol=1e-3)  # non-linear: the mean is not the logits
    assert cmap.shape[:2] == (2, 7) and cmap.shape[-1] > 1


def test_timm_models_by_name():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model("timm/resnet18", 5).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[:, :, 0, 0], model.net(x))
        assert model.class_map(x).shape[:2] == (1, 5)
    with pytest.raises(KDCacheError, match="timm has no model 'no_such_net'"):
        build_model("timm/no_such_net", 5)
    # a ViT takes one size: said in one line for another; at its size it runs (timm's own forward)
    assert build_model("timm/resnet18", 5).fixed_input_size is None
    vit = build_model("timm/deit_tiny_patch16_224", 5, img_size=32).eval()
    assert vit.fixed_input_size == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x).logits[:, :, 0, 0], vit.net(x))
        with pytest.raises(KDCacheError, match="takes 32x32 images only, and its images are 48x32; .* --resize 32x32"):
            vit(torch.randn(1, 3, 48, 32))


# -- geometry, pooling, metrics ---------------------------------------------------------------------
def test_random_resized_crops_keep_area_ratio_and_box():
    rng = np.random.default_rng(0)
    ramp = torch.arange(60.0).repeat(40, 1)[None]  # x coordinate of each pixel of a 40 x 60 image
    for _ in range(50):
        g = sample_resized_crop(rng, (40, 60), (32, 32), (0.3, 0.9))
        top, left, h, w = g.box()
        assert 0.3 * 0.9 <= h * w / 2400 <= 0.9 * 1.1
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
        assert top >= -0.5 and left >= -0.5 and top + h <= 40.5 and left + w <= 60.5
        assert Geometry.unpack((40, 60), g.pack()) == g
        out = apply_geometry(ramp, g, kind="image")[0]
        col = out[:, 0] if not g.flip else out[:, -1]
        assert abs(float(col.mean()) - (left + w / (2 * 32))) < 1.0  # the first column samples the box's left edge


def test_old_six_number_view_params_unpack():
    g = Geometry.unpack((32, 32), [1.5, 2, 3, 16, 16, 1.0])
    assert g.stretch == 1.0 and g.flip and g.out_size == (16, 16)


def test_region_pooling_averages_the_cells_logits():
    torch.manual_seed(1)
    C, h, w = 6, 4, 5
    z = torch.randn(1, C, h, w, dtype=torch.float64) * 3
    g = Geometry((32, 40), 1.0, 6, 9, (20, 24), True)  # a box of rows 6..26, columns 9..33
    wy = np.clip(np.minimum(np.arange(1, h + 1) * 8, 26) - np.maximum(np.arange(h) * 8, 6), 0, None)
    wx = np.clip(np.minimum(np.arange(1, w + 1) * 8, 33) - np.maximum(np.arange(w) * 8, 9), 0, None)
    weights = torch.tensor(np.outer(wy, wx) / np.outer(wy, wx).sum())
    # dense (k = C): exactly the area-weighted mean of the logits (float64 reference)
    pooled = (z[0] * weights).sum((1, 2))
    v, i, _ = topk_targets(z.float(), C)
    out = pool_targets({"logits/values": v[0], "logits/indices": i[0]}, g, C)
    assert out["kd/indices"].flatten().tolist() == pooled.argsort(descending=True).tolist()
    torch.testing.assert_close(out["kd/values"].flatten().double(), pooled.sort(descending=True).values,
                               rtol=1e-5, atol=1e-5)
    # top k: a cell's other classes take its tail in equal shares, tau - log(C - k); the tail is
    # the logsumexp of the pooled logits outside the top k
    k = 2
    v, i, t = topk_targets(z.float(), k)
    out = pool_targets({"logits/values": v[0], "logits/indices": i[0], "logits/tail": t[0]}, g, C)
    filled = (t[0].double() - np.log(C - k))[None].expand(C, h, w).clone()
    filled.scatter_(0, i[0].long(), v[0].double())
    ref = (filled * weights).sum((1, 2))
    order = ref.argsort(descending=True)
    assert out["kd/indices"].flatten().tolist() == order[:k].tolist()
    torch.testing.assert_close(out["kd/values"].flatten().double(), ref[order[:k]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(out["kd/tail"]), float(torch.logsumexp(ref[order[k:]], 0)), rtol=1e-5,
                               atol=1e-5)
    # a box inside one cell is that cell; a flip changes nothing
    one = pool_targets({"logits/values": v[0], "logits/indices": i[0], "logits/tail": t[0]},
                       Geometry((32, 40), 2.0, 18, 36, (10, 8), False), C)
    assert one["kd/indices"].flatten().tolist() == i[0, :, 1, 2].tolist()
    torch.testing.assert_close(one["kd/values"].flatten(), v[0, :, 1, 2])
    flipped = pool_targets({"logits/values": v[0], "logits/indices": i[0], "logits/tail": t[0]},
                           Geometry((32, 40), 1.0, 6, 9, (20, 24), False), C)
    torch.testing.assert_close(flipped["kd/values"], out["kd/values"])


def test_the_whole_image_pooled_is_the_classifier():
    """A linear head after global average pooling: the class map pooled over the whole image is
    the classifier's own logits."""
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        cmap, logits = model.class_map(x), model(x).logits.flatten()
    v, i, _ = topk_targets(cmap, 5)
    out = pool_targets({"logits/values": v[0], "logits/indices": i[0]}, Geometry.identity((96, 96)), 5)
    got = torch.zeros(5)
    got[out["kd/indices"].flatten().long()] = out["kd/values"].flatten()
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.1, 0.2, 0.4], [0.0, 0.1, 0.2, 0.3], [1, 0, 0, 0]])
    target = torch.tensor([1, 3, 0, -100])
    m = TopK((1, 2, 3), ignore_index=-100)
    m.update(logits, target)
    # sample 0: rank 1; sample 1: rank 2; sample 2: rank 4; sample 3 ignored
    assert m.compute() == {"top1": 1 / 3, "top2": 2 / 3, "top3": 2 / 3}


# -- the workflow -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    r = kd("train-teacher", "--model", "demo_cls_teacher", "-m", "width=8", *SHAPES, "--epochs", "2",
           "--batch-size", "8", "--lr", "0.003", "--out", d / "teacher", "--quiet")
    assert r.exit_code == 0, r.output
    assert "best val top-1" in r.output
    return d


def teacher_on(path, images: torch.Tensor, class_map: bool = False) -> torch.Tensor:
    model = open_weights(path).build().double()
    with torch.no_grad():
        return (model.class_map(images.double()) if class_map else model(images.double()).logits)


def test_views_and_label_maps_are_the_teacher_on_those_pixels(teacher):
    d = teacher
    for form, extra in (("views", ["--views", "3", "--view-area", "0.3,1"]), ("lmap", ["--label-map"])):
        r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", d / f"{form}.zarr", *SHAPES,
               "--topk", "4", "--quiet", *extra)
        assert r.exit_code == 0, r.output
    ds = build_dataset("shapes", "train", size=40, resolution=24)
    pre = Preprocess()
    x = torch.stack([pre.image_to_tensor(ds.load(i)[0]) for i in range(4)])
    views = CacheStore(d / "views.zarr")
    assert views.schema.classification == {"targets": "logits"} and views.schema.views["area"] == [0.3, 1.0]
    for i in range(4):
        s = to_tensors(views.read(i))
        full = teacher_on(d / "teacher", x[i:i + 1])
        v, idx, _ = topk_targets(full.float(), 4)
        assert s["logits/indices"].flatten().tolist() == idx.flatten().tolist()
        for j in range(3):
            g = Geometry.unpack((24, 24), s["views/params"][j])
            ref = teacher_on(d / "teacher", apply_geometry(x[i], g, kind="image")[None])
            v, idx, tail = topk_targets(ref.float(), 4)
            assert s["views/logits/indices"][j].flatten().tolist() == idx.flatten().tolist()
            torch.testing.assert_close(s["views/logits/values"][j].float().flatten(), v.flatten(), rtol=2e-3, atol=2e-3)
    lmap = CacheStore(d / "lmap.zarr")
    assert lmap.schema.label_map and lmap.schema.map_size == (6, 6)  # the teacher's stride-4 map before pooling
    full = teacher_on(d / "teacher", x, class_map=True)
    v, idx, tail = topk_targets(full.float(), 4)
    for i in range(4):
        s = to_tensors(lmap.read(i))
        assert s["logits/indices"].tolist() == idx[i].tolist()
        torch.testing.assert_close(s["logits/values"].float(), v[i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(s["logits/tail"].float(), tail[i], rtol=2e-3, atol=2e-3)
    # the recorded quality: the teacher's top-1 on these images (its class map's mean is its logits)
    everything = torch.stack([pre.image_to_tensor(ds.load(i)[0]) for i in range(len(ds))])
    pred = teacher_on(d / "teacher", everything)[:, :, 0, 0].argmax(1)
    labels = torch.tensor([ds.label(i) for i in range(len(ds))])
    q = lmap.quality()
    assert q["rows"]["combined"]["aacc"] == pytest.approx(float((pred == labels).double().mean()))


@pytest.mark.slow  # trains two students
def test_classification_students_take_kl_and_dist_at_their_classification_temperature(teacher, tmp_path):
    """kl and dist default to T = 4 and weight 2 for classification (chosen on val), and to T = 1 and
    weight 1 with --mix mixup, recorded in config.json; a temperature or weight given in the method
    spec or by --temperature/--kd-weight wins; segmentation keeps T = 1."""
    from kdcache.methods import option_default, with_task_defaults

    cache = tmp_path / "logits.zarr"
    r = kd("build-teacher-cache", "--weights", teacher / "teacher", "--out", cache, *SHAPES, "--topk", "4", "--quiet")
    assert r.exit_code == 0, r.output
    common = ["--cache", cache, "--model", "demo_cls_student", "--epochs", 1, "--batch-size", 16, "--device", "cpu",
              "--workers", 0, "--quiet"]
    for name, extra, want, weights in (
        ("default", ["--method", "kl", "--method", "dist"], {"kl": 4.0, "dist": 4.0}, {"kl": 2.0, "dist": 2.0}),
        ("spec", ["--method", "kl:temperature=2,weight=0.5", "--method", "dist"], {"kl": 2.0, "dist": 4.0},
         {"kl": 0.5, "dist": 2.0}),
        ("shorthand", ["--method", "kl", "--method", "dist", "--temperature", "1.5", "--kd-weight", "1"],
         {"kl": 1.5, "dist": 1.5}, {"kl": 1.0, "dist": 1.0}),
        # a student mixing its crops with mixup (function matching) takes T = 1 and weight 1; its own values win
        ("mixup", ["--method", "kl:weight=3", "--method", "dist", "--mix", "mixup", "--online-teacher", "cache"],
         {"kl": 1.0, "dist": 1.0}, {"kl": 3.0, "dist": 1.0}),
    ):
        r = kd("train-student", *common, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        methods = json.loads((tmp_path / name / "config.json").read_text())["methods"]
        assert {m["name"]: m["temperature"] for m in methods} == want, (name, methods)
        assert {m["name"]: m["weight"] for m in methods} == weights, (name, methods)
    # resuming with the same --method words: a run that recorded the default goes on at it, and one
    # recorded before the default changed ({"name": "kl"}, trained at T = 1) keeps what it trained with
    r = kd("train-student", *common, "--method", "kl", "--method", "dist", "--out", tmp_path / "default",
           "--resume", "--epochs", 2)
    assert r.exit_code == 0, r.output
    cfg_path = tmp_path / "default" / "config.json"
    assert [(m.get("temperature"), m.get("weight")) for m in json.loads(cfg_path.read_text())["methods"]] == [
        (4.0, 2.0), (4.0, 2.0)]
    cfg = json.loads(cfg_path.read_text())
    cfg["methods"] = [{"name": "kl"}, {"name": "dist"}]
    cfg_path.write_text(json.dumps(cfg))
    r = kd("train-student", *common, "--method", "kl", "--method", "dist", "--out", tmp_path / "default",
           "--resume", "--epochs", 3)
    assert r.exit_code == 0, r.output
    assert json.loads(cfg_path.read_text())["methods"] == [{"name": "kl"}, {"name": "dist"}]
    # the same specs for segmentation: T left to the constructor's default, 1; the weights chosen for
    # segmentation (kl 0.5, dist 2); cwd has no task defaults; a weight of the spec's own wins
    assert with_task_defaults([{"name": "kl"}, {"name": "dist"}, {"name": "cwd"}], "segmentation") == [
        {"name": "kl", "weight": 0.5}, {"name": "dist", "weight": 2.0}, {"name": "cwd"}]
    assert with_task_defaults([{"name": "dist", "weight": 1.0}], "segmentation") == [{"name": "dist", "weight": 1.0}]
    # mixing: mixup has classification defaults of its own; cutmix (not measured for classification), no
    # mixing and segmentation (whose weights were chosen on cutmixed crops) keep the task's
    mixed = {"name": "kl", "temperature": 1.0, "weight": 1.0}
    assert with_task_defaults([{"name": "kl"}], "classification", "mixup") == [mixed]
    for task, mix in (("classification", "cutmix"), ("classification", "none"), ("classification", None),
                      ("segmentation", "mixup"), ("segmentation", "cutmix")):
        assert with_task_defaults([{"name": "kl"}], task, mix) == with_task_defaults([{"name": "kl"}], task)
    assert with_task_defaults([{"name": "kl"}], "classification") == [{"name": "kl", "temperature": 4.0,
                                                                       "weight": 2.0}]
    assert option_default("kl", "temperature") == option_default("dist", "temperature") == 1.0


def test_classifier_stores_are_packed_and_plain_zarr_for_tensorstore(teacher, tmp_path):
    """A classifier's logits rows and its views pack many samples per chunk; tensorstore and
    zarr-python still read every array alike, and kdcache's reader gives the same rows."""
    out = tmp_path / "views.zarr"
    r = kd("build-teacher-cache", "--weights", teacher / "teacher", "--out", out, *SHAPES, "--topk", "4", "--quiet",
           "--views", "3")
    assert r.exit_code == 0, r.output
    store = CacheStore(out)
    assert store.meta["packing"] and all(n > 1 for n in store.meta["packing"].values()), store.meta["packing"]
    assert {"logits/values", "views/logits/values"} <= set(store.meta["packing"])
    assert_every_array_plain_zarr(out, {"logits/values", "views/logits/values", "views/params", "done", "sample_id"})
    g = zarr.open_group(str(out), mode="r")
    for i in (0, 17, store.num_samples - 1):  # inside packed chunks, the last one cut short
        item = store.read(i)
        np.testing.assert_array_equal(item["logits/values"], g["logits/values"][i])
        np.testing.assert_array_equal(item["views/logits/values"], g["views/logits/values"][i])


@pytest.mark.slow  # the five commands end to end
def test_the_workflow_on_the_command_line(teacher, tmp_path):
    d = teacher
    for form, extra in (("logits", []), ("views2", ["--views", "2"]), ("lmap2", ["--label-map"])):
        r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / f"{form}.zarr", *SHAPES,
               "--topk", "3", "--quiet", *extra)
        assert r.exit_code == 0, r.output
    r = kd("export-pseudo-labels", tmp_path / "logits.zarr", "--out", tmp_path / "pseudo")
    assert r.exit_code == 2 and "holds a classifier's targets; export-pseudo-labels writes segmentation masks" \
        in r.output, r.output
    r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / "feat.zarr", *SHAPES,
           "--topk", "3", "--features", "stage3", "--quiet")
    assert r.exit_code == 0, r.output
    r = kd("inspect-cache", tmp_path / "lmap2.zarr")
    assert r.exit_code == 0 and "label map" in r.output and "top-1" in r.output, r.output
    r = kd("verify-cache", tmp_path / "views2.zarr")
    assert r.exit_code == 0, r.output
    common = ["--model", "demo_cls_student", "-m", "width=4", "--epochs", "1", "--batch-size", "8", "--quiet"]
    runs = {"ce": ["--cache", tmp_path / "logits.zarr", "--method", "none"],
            "views": ["--cache", tmp_path / "views2.zarr", "--method", "kl", "--use-views"],
            "lmap": ["--cache", tmp_path / "lmap2.zarr", "--method", "kl"],
            "dist": ["--cache", tmp_path / "lmap2.zarr", "--method", "dist"],
            "online": ["--cache", tmp_path / "logits.zarr", "--method", "kl", "--online-teacher", "cache"],
            "fitnet": ["--cache", tmp_path / "feat.zarr", "--method", "kl", "--method",
                       "fitnet:student_tap=stage3,teacher_tap=stage3"]}
    for name, args in runs.items():
        r = kd("train-student", *args, *common, "--out", tmp_path / name)
        assert r.exit_code == 0, (name, r.output)
        assert "best val top-1" in r.output
    # evaluate: top-1/top-5 against the model run by hand on the test images
    r = kd("evaluate", tmp_path / "lmap", "--split", "test", "--no-latency", "--qualitative", "2")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "lmap" / "eval-test" / "eval.json").read_text())
    test = build_dataset("shapes", "test", size=40, resolution=24)
    model = open_weights(tmp_path / "lmap").build()
    x = torch.stack([Preprocess().image_to_tensor(test.load(i)[0]) for i in range(len(test))])
    with torch.no_grad():
        logits = model(x).logits[:, :, 0, 0]
    labels = torch.tensor([test.label(i) for i in range(len(test))])
    assert report["top1"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1)
    assert report["top5"] == pytest.approx(float(top5.double().mean()))
    assert report["task"] == "classification" and len(report["confusion_matrix"]) == 10
    for fig in ("confusion_matrix.png", "best.png", "worst.png"):
        assert (tmp_path / "lmap" / "eval-test" / fig).stat().st_size > 1000
    # compare: one table with top-1, top-5, Δ against the CE run, per-class accuracy, figures
    r = kd("compare", *(tmp_path / n for n in runs), "--split", "test", "--out", tmp_path / "cmp", "--quiet",
           "--no-latency")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| top-1 | Δ top-1 | top-5 | mAcc |" in md and "CE (baseline)" in md
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["lmap"]["top1"] == pytest.approx(report["top1"])
    assert rows["lmap"]["delta_top1"] == pytest.approx(rows["lmap"]["top1"] - rows["ce"]["top1"])
    for fig in ("per_class_acc.png", "confusion_ce.png", "examples/best.png", "examples/worst.png"):
        assert (tmp_path / "cmp" / fig).exists(), fig
    # the page: each run's confusion matrix and the test images it gets wrong, as many as its top-1 says
    page = (tmp_path / "cmp" / "index.html").read_text()
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert set(data["confusion"]) == set(rows) and data["images"] == []
    for name, row in rows.items():
        wrong = data["wrong"][name]
        assert len(wrong) == min(40, round((1 - row["top1"]) * result["num_samples"])), name
        assert all((tmp_path / "cmp" / w["file"]).exists() for w in wrong)


def test_classification_bad_input(teacher, tmp_path):
    d = teacher
    r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / "x.zarr", *SHAPES, "--label-map",
           "--views", "2")
    assert r.exit_code == 2 and "--label-map and --views are two forms" in r.output
    r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / "x.zarr", "--label-map",
           "--dataset", "synthetic", "--limit", "2", "-o", "resolution=32x32")
    assert r.exit_code == 2 and "--label-map is for classification data sets" in r.output, r.output
    # without --dataset the teacher run's (shapes), whose square images take one side or NxN
    r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / "x.zarr", "--limit", "2",
           "-o", "resolution=32x48")
    assert r.exit_code == 2 and "shapes images are square: give -o resolution=N (e.g. 32), got [32, 48]" in r.output
    r = kd("build-teacher-cache", "--weights", d / "teacher", "--out", tmp_path / "sq.zarr", "--limit", "2",
           "-o", "resolution=32x32", "--quiet")
    assert r.exit_code == 0 and CacheStore(tmp_path / "sq.zarr").schema.dataset["name"] == "shapes", r.output
    r = kd("train-teacher", "--model", "demo_student", *SHAPES, "--epochs", "1", "--out", tmp_path / "seg", "--quiet")
    assert r.exit_code == 2 and "model 'demo_student' is a segmentation network and shapes is a classification"         in r.output, r.output
    r = kd("train-teacher", "--model", "resnet18", "--limit", "4", "--batch-size", "2", "--epochs", "1", "--out", tmp_path / "cls",
           "--quiet")
    assert r.exit_code == 2 and "model 'resnet18' is a classification network and synthetic is a segmentation"         in r.output, r.output
    r = kd("train-teacher", "--model", "demo_cls_student", *SHAPES, "--crop-area", "0.5,1.5", "--out",
           tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "--crop-area must be a finite number in [0.01, 1], got 1.5" in r.output
    r = kd("train-teacher", "--model", "demo_cls_student", *SHAPES, "--crop-area", "0.9,0.5", "--out",
           tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "--crop-area must be 'lo,hi' with 0 < lo <= hi <= 1 (shares of the image), got " \
                                "(0.9, 0.5)" in r.output
    # an ImageFolder with other classes than the cache's
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "folder" / "train" / name / f"{i}.png", rng, size=(24, 24))
    model = build_model("demo_cls_teacher", 2, width=8)
    save_checkpoint(tmp_path / "t2.pt", model, config={"model": "demo_cls_teacher", "num_classes": 2,
                                                      "model_options": {"width": 8},
                                                      "class_names": ["a", "b"], "preprocess": Preprocess().to_dict()})
    r = kd("build-teacher-cache", "--weights", tmp_path / "t2.pt", "--out", tmp_path / "f.zarr", "--dataset",
           "imagefolder", "--data-root", tmp_path / "folder", "--topk", "2", "--quiet")
    assert r.exit_code == 0, r.output
    write_image(tmp_path / "folder" / "train" / "c" / "0.png", rng, size=(24, 24))
    r = kd("train-student", "--cache", tmp_path / "f.zarr", "--model", "demo_cls_student", "--out", tmp_path / "s",
           "--epochs", "1", "--batch-size", "2", "--val-split", "train", "--quiet")
    assert r.exit_code == 2 and "holds 2 classes but imagefolder has 3; use a cache built from" in r.output, r.output


def test_classifier_logits_of_the_wrong_shape():
    model = build_model("demo_teacher", 3)
    model.task = "classification"
    with pytest.raises(KDCacheError) as e:
        model(torch.zeros(1, 3, 16, 16))
    assert "returned logits of shape (1, 3, 4, 4); a classifier must return [N, 3]" in str(e.value)


def test_more_bad_input_one_line_each(tmp_path):
    written = write_cifar(tmp_path, "cifar10", 10, 2, 10)
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(KDCacheError, match="-o val_size must be in 0..9"):
        build_dataset("cifar10", "val", tmp_path, val_size=10)
    data, labels = written["test_batch"]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [10, 0]}))
    with pytest.raises(KDCacheError) as e:
        build_dataset("cifar10", "test", tmp_path).load(0)
    assert "is labelled class 10, outside the 10 classes 0..9 of cifar10; check the labels' file" in str(e.value)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data[:, :100], b"labels": labels}))
    with pytest.raises(KDCacheError) as e:
        build_dataset("cifar10", "test", tmp_path)
    assert "holds data of shape (2, 100), expected N x 3072" in str(e.value)
    (folder / "test_batch").unlink()
    with pytest.raises(KDCacheError) as e:
        build_dataset("cifar10", "test", tmp_path)
    assert "test_batch does not exist; --data-root must hold the extracted archive" in str(e.value)
    with pytest.raises(KDCacheError) as e:
        build_dataset("cifar10", "extra", tmp_path)
    assert "the cifar10 files make no split 'extra'" in str(e.value)
    for options, message in (({"split": "dev"}, "shapes data set has no split 'dev'"),
                             ({"size": -1}, "shapes data set size must be in [0, 1000000], got -1"),
                             ({"size": 10**20}, "shapes data set size must be in [0, 1000000], got 100000000000000000000"),
                             ({"resolution": 8}, "shapes resolution must be at least 16, got 8")):
        with pytest.raises(KDCacheError) as e:
            build_dataset("shapes", **{"split": "train", **options})
        assert message in str(e.value)


def test_models_without_a_class_map_say_so():
    pytest.importorskip("timm")
    with pytest.raises(KDCacheError) as e:
        build_model("timm/resnet18", 3, pretrained=True)
    assert "timm models are built without downloaded weights; give a local file" in str(e.value)
    with pytest.raises(KDCacheError) as e:
        build_model("timm/resnet18", 3, no_such_option=1)
    assert "timm could not build timm/resnet18 with options" in str(e.value)
    vit = build_model("torchvision.models.vision_transformer:VisionTransformer", 3, image_size=32, patch_size=16,
                      num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    with pytest.raises(KDCacheError) as e:
        vit.class_map(torch.zeros(1, 3, 32, 32))
    assert "has no global average pooling module to take a class map before" in str(e.value)

    class PoolsAVector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(x.mean(1))[..., 0].expand(-1, 3)  # pools a 3-D tensor

    from kdcache.models import SegModel

    model = SegModel(PoolsAVector(), "pools_a_vector", 3, task="classification")
    with pytest.raises(KDCacheError) as e:
        model.class_map(torch.zeros(1, 3, 8, 8))
    assert "pools a 3-D tensor, not a feature map; it has no class map" in str(e.value)


@pytest.mark.slow  # the whole demo
def test_the_classification_demo(classification_demo, tmp_path):
    from conftest import CLASSIFICATION_DEMO_ARGS

    out, _ = classification_demo  # the session's (conftest.py), shared with tests/test_compare_page.py
    args = ["demo", "--out", out, *CLASSIFICATION_DEMO_ARGS, "--device", "cpu", "--quiet"]
    result = json.loads((out / "compare" / "compare.json").read_text())
    assert result["task"] == "classification" and result["split"] == "test" and result["num_samples"] == 40
    assert [(r["name"], r["method"]) for r in result["rows"]] == [
        ("teacher", "CE"), ("student-ce", "CE (baseline)"), ("student-kd-logits", "kl"),
        ("student-kd-views", "kl (stored views)"), ("student-kd-label-map", "kl (label map)")]
    assert CacheStore(out / "views.zarr").schema.view_count == 8
    assert CacheStore(out / "label_map.zarr").schema.label_map
    assert len(CacheStore(out / "logits.zarr").ids) == 40  # --limit cuts the training images too
    # a rerun reprints the table it made (no new, noisy latencies)
    before = (out / "compare" / "compare.json").stat().st_mtime_ns
    r = kd(*args)
    assert r.exit_code == 0 and "compare: done already" in r.output and "student-kd-views" in r.output, r.output
    assert (out / "compare" / "compare.json").stat().st_mtime_ns == before
    r = kd("demo", "--task", "detection", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--task must be segmentation or classification, got 'detection'" in r.output


@pytest.mark.slow  # trains twice
def test_a_resumed_classification_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from kdcache.core.runs import RunDir

    args = ["--model", "demo_cls_student", "-m", "width=4", *SHAPES, "--batch-size", "8", "--epochs", "2", "--quiet"]
    assert kd("train-teacher", *args, "--out", tmp_path / "whole").exit_code == 0
    real_log = RunDir.log

    def crashing_log(self, record):  # interrupted while it logs epoch 2: its last.pt is epoch 1's
        if record.get("epoch") == 1:
            raise KeyboardInterrupt
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crashing_log)
    assert kd("train-teacher", *args, "--out", tmp_path / "parts").exit_code == 130
    monkeypatch.setattr(RunDir, "log", real_log)
    r = kd("train-teacher", "--resume", "--out", tmp_path / "parts", "--quiet")
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=False)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    metrics = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "val_top1" in m] == [0, 1]


def _colour_folder(root, rng):
    """An ImageFolder a small network learns in a few epochs: each class's images tinted by one
    colour channel, of mixed sizes (20-31 px)."""
    for split, n in (("train", 24), ("val", 10)):
        for c, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 32, 2)
                px = rng.integers(0, 120, (h, w, 3))
                px[..., c] += 100
                Image.fromarray(px.astype(np.uint8)).save(root / split / name / f"{i}.png")


def test_classification_learns_and_a_student_learns_from_the_cache(tmp_path):
    """The whole path trains: a classifier on an ImageFolder ends far above chance (1/3) on val, and
    so does a student trained from its top-2 cache with KL (T = 4) alone for its targets."""
    _colour_folder(tmp_path / "col", np.random.default_rng(0))
    data = ["--dataset", "imagefolder", "--data-root", tmp_path / "col", "--batch-size", 8, "--quiet"]
    r = kd("train-teacher", "--model", "demo_cls_student", "--resize", "24x24", "--epochs", 6, "--lr", 1e-2,
           *data, "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    top1 = [json.loads(x)["val_top1"] for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert max(top1) >= 0.9, top1  # chance: 1/3, balanced classes
    r = kd("build-teacher-cache", "--weights", tmp_path / "t", "--dataset", "imagefolder", "--data-root",
           tmp_path / "col", "--topk", 2, "--out", tmp_path / "c.zarr", "--quiet")
    assert r.exit_code == 0, r.output
    r = kd("train-student", "--cache", tmp_path / "c.zarr", "--model", "demo_cls_student", "--method",
           "kl:temperature=4", "--epochs", 6, "--lr", 1e-2, "--batch-size", 8, "--seed", 1, "--quiet", "--out",
           tmp_path / "s")
    assert r.exit_code == 0, r.output
    top1 = [json.loads(x)["val_top1"] for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert max(top1) >= 0.9, top1
