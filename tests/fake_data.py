"""Small data sets and teachers that tests write themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.core.checkpoint import save_checkpoint
from kdcache.data import build_dataset
from kdcache.models import build_model
from kdcache.pipeline.transforms import Preprocess
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache


def make_voc_sizes(base: Path, ids: dict[str, list[str]] | None = None) -> Path:
    """A VOC layout under ``base`` where every image has its own size; returns ``base``."""
    ids = ids or {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1", "v2"]}
    voc = base / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    for k, sid in enumerate(ids["train"] + ids["val"]):
        h, w = 20 + 4 * k, 28 - 2 * k  # every image its own size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{sid}.jpg")
        mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
        mask[0] = 255  # VOC's ignore border
        im = Image.fromarray(mask, mode="P")
        im.putpalette(list(range(256)) * 3)
        im.save(voc / "SegmentationClass" / f"{sid}.png")
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
    return base


def make_mixed_size_folders(base: Path, labelled: int = 6, unlabelled: int = 6,
                            classes: tuple[str, ...] = ("road", "car", "sky")) -> tuple[Path, Path]:
    """Data shaped like a user's: a labelled ``folder`` data set (``base/lab``, flat layout) of
    images of 42-54 x 50-66 and a plain folder of unlabelled JPEGs (``base/unl``) of 39-49 x
    57-67, one of them grayscale; no side is a multiple of 4 or 8 in general, and the two sets'
    largest sizes give their caches different (non-integer) strides. Returns (lab, unl)."""
    rng = np.random.default_rng(0)
    lab, unl = base / "lab", base / "unl"
    (lab / "images").mkdir(parents=True)
    (lab / "masks").mkdir()
    unl.mkdir(parents=True)
    (lab / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(labelled):
        h, w = 42 + (5 * i) % 13, 50 + (7 * i) % 17
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(lab / "images" / f"l{i:02d}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2:] = 1
        mask[:, : w // 3] = 2
        mask[0] = 255
        Image.fromarray(mask).save(lab / "masks" / f"l{i:02d}.png")
    for i in range(unlabelled):
        h, w = 39 + (3 * i) % 11, 57 + (5 * i) % 11
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0], mode="L") if i == 1 else Image.fromarray(pixels)
        image.save(unl / f"u{i:02d}.jpg", quality=90)
    return lab, unl


class Stride8Net(torch.nn.Module):
    """A small segmentation net with stride-8 logits (``ceil(H/8)``), unlike the built-in stride-4 pair."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers, c = [], 3
        for _ in range(3):
            layers += [torch.nn.Conv2d(c, width, 3, stride=2, padding=1), torch.nn.ReLU()]
            c = width
        self.body = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


def stride8_net(num_classes: int, width: int = 16) -> torch.nn.Module:
    """``fake_data:stride8_net``: :class:`Stride8Net` as a model callable."""
    return Stride8Net(num_classes, width)


def make_teacher(path: Path, num_classes: int = 11, name: str = "demo_teacher", seed: int = 0,
                 preprocess: Preprocess | None = None, poison: bool = False,
                 class_names: list[str] | None = None, structured: bool = False) -> Path:
    """A randomly initialised teacher saved as a kdcache checkpoint (``poison``: NaN weights;
    ``class_names`` recorded as a trained run's are).

    An untrained network's logits are about 0.1 and nearly constant over the image, so a test
    tolerance of 1e-3 cannot tell a mirrored map from an unmirrored one. ``structured`` gives it
    logits that follow the image, as a trained teacher's do (a few units, varying as much over
    the image as their size): its BatchNorm statistics are those of synthetic images and its
    last convolution's weights are multiplied by 10."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    if structured:
        pre = preprocess or Preprocess()
        ds = build_dataset("synthetic", "train", resolution=[32, 48])
        x = torch.stack([pre.image_to_tensor(ds.load(i)[0]) for i in range(16)])
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batch seen
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
        for m in norms:
            m.momentum = 0.1
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.mul_(10.0)
    if poison:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    config = {"model": name, "num_classes": num_classes, "preprocess": (preprocess or Preprocess()).to_dict()}
    if class_names is not None:
        config["class_names"] = list(class_names)
    return save_checkpoint(path, model, config=config)


def make_small_store(tmp_path_factory, teacher: Path | None = None) -> tuple[Path, Path]:
    """(teacher checkpoint, top-4 store of 16 synthetic 32x48 training images, 8 per shard); the
    teacher is :func:`make_teacher`'s default one unless given."""
    teacher = teacher or make_teacher(tmp_path_factory.mktemp("t") / "teacher.pt")
    out = tmp_path_factory.mktemp("c") / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=16, topk=4, samples_per_shard=8, device="cpu", workers=0),
                        show_progress=False)
    return teacher, out
