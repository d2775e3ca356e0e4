"""Small data sets and teachers that tests write themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.checkpoint import save_checkpoint
from kdcache.models import build_model
from kdcache.transforms import Preprocess


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
                 preprocess: Preprocess | None = None, poison: bool = False) -> Path:
    """A randomly initialised teacher saved as a kdcache checkpoint (``poison``: NaN weights)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    if poison:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    config = {"model": name, "num_classes": num_classes, "preprocess": (preprocess or Preprocess()).to_dict()}
    return save_checkpoint(path, model, config=config)


def make_small_store(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher checkpoint, top-4 store of 16 synthetic 32x48 training images, 8 per shard)."""
    teacher = make_teacher(tmp_path_factory.mktemp("t") / "teacher.pt")
    out = tmp_path_factory.mktemp("c") / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=16, topk=4, samples_per_shard=8, device="cpu", workers=0),
                        show_progress=False)
    return teacher, out
