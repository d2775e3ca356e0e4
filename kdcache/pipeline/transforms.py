"""Preprocessing and the joint geometric transform of image and label.

A geometric augmentation is *sampled once* as a :class:`Geometry` (scale, crop window, flip)
and then applied to the image, the label and — in student training — every cached teacher map,
each at its own stride. Class ids are only ever resampled with nearest neighbour; images and
logit maps bilinearly. Regions of the crop outside the scaled image are padded (image with 0
after normalisation, i.e. the mean colour; labels with 255, so they are ignored).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.core.options import opt
from kdcache.core.shared import SharedInts
from kdcache.data.base import IGNORE_INDEX, SegmentationDataset
from kdcache.data.class_base import is_classification
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.mixing import MixOptions, mix_images, mix_partner

__all__ = ["Geometry"]  # the sampled transform lives in kdcache.pipeline.geometry (the store packs it too)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Deterministic preprocessing, recorded with every run and cache.

    ``resize``: (H, W) every image and mask is resized to first (bilinear / nearest), or None to
    keep the native size. ``mean``/``std``: per-channel normalisation of [0, 1] RGB.
    """

    resize: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"resize": list(self.resize) if self.resize else None, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            resize=tuple(d["resize"]) if d.get("resize") else None,
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
        )

    def image_to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> normalised float32 [3, H', W'] (resized if ``resize``)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        if self.resize and tuple(x.shape[-2:]) != tuple(self.resize):
            x = F.interpolate(x[None], size=self.resize, mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def mask_to_tensor(self, mask: np.ndarray) -> torch.Tensor:
        """uint8 [H, W] -> int64 [H', W'] (nearest-neighbour resize if ``resize``)."""
        y = torch.from_numpy(np.ascontiguousarray(mask)).long()
        if self.resize and tuple(y.shape) != tuple(self.resize):
            y = resize_labels(y, self.resize)
        return y

    def denormalize(self, x: torch.Tensor) -> np.ndarray:
        """Normalised [3, H, W] -> uint8 [H, W, 3] for figures."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        img = (x.float() * std + mean).clamp(0, 1).mul(255).round().byte()
        return img.permute(1, 2, 0).cpu().numpy()


def resize_labels(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer map [..., H, W] (ids are never interpolated)."""
    shape = y.shape
    z = y.reshape(-1, 1, *shape[-2:]).float()
    z = F.interpolate(z, size=size, mode="nearest-exact")
    return z.reshape(*shape[:-2], *size).to(y.dtype)


#: torchvision's RandomResizedCrop aspect ratios
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augment:
    """Random scale in ``scale`` (relative to the preprocessed size), a ``crop`` (H, W) window
    (None = the scaled image's own size, i.e. no crop), and a horizontal flip with p = 0.5.

    With ``resized_crop`` (lo, hi) it is a random-resized crop instead (classification, as
    torchvision's ``RandomResizedCrop``): a box of ``lo``–``hi`` of the image's area and an
    aspect ratio in ``ratio`` (log-uniform), stretched to ``crop``; ``scale`` is unused."""

    scale: tuple[float, float] = (0.5, 2.0)
    crop: tuple[int, int] | None = None
    hflip: bool = True
    resized_crop: tuple[float, float] | None = None
    ratio: tuple[float, float] = CROP_RATIO

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        d["scale"] = list(self.scale)
        d["resized_crop"] = list(self.resized_crop) if self.resized_crop else None
        d["ratio"] = list(self.ratio)
        return d


def augment_from_dict(d: dict) -> Augment:
    """The :class:`Augment` that :meth:`Augment.to_dict` wrote."""
    return Augment(scale=tuple(d["scale"]), crop=tuple(d["crop"]) if d.get("crop") else None, hflip=bool(d["hflip"]),
                   resized_crop=tuple(d["resized_crop"]) if d.get("resized_crop") else None,
                   ratio=tuple(d.get("ratio", CROP_RATIO)))


# -- the training augmentation's options: declared here once, for train-teacher/train-student
# (TrainConfig) and for a schedule cache's build (CacheBuildConfig), which draws the same crops


def crop_option():
    return opt(None, "Training crop HxW (default: the first training image's size).", names=("--crop-size",),
               shape="size", panel="Augmentation")


#: an image's scale (--scale, --view-scale, --tta-scales, --store-scales): a 1024-pixel side at 0.05 is 51
#: pixels, and a scale of 1e-6 left crops of one pixel with no KD cell in them (their KD term was 0); past 20,
#: an image is larger than any machine's memory holds
SCALE_BOUNDS = "[0.05, 20]"
#: a random-resized crop's share of the image area (--crop-area, --view-area): torchvision's default lower
#: end is 0.08; at 1e-300 every crop was one pixel stretched to the crop size
AREA_BOUNDS = "[0.01, 1]"


def scale_option():
    return opt((0.75, 1.25), "Random scale range 'lo,hi' (segmentation).", shape="pair", bounds=SCALE_BOUNDS,
               panel="Augmentation")


def crop_area_option():
    return opt((0.25, 1.0), "Classification: the random-resized crop's share of the image area 'lo,hi' (aspect 3/4 "
                            "to 4/3, stretched to --crop-size).", shape="pair", bounds=AREA_BOUNDS, panel="Augmentation")


def flip_option():
    return opt(True, "Random horizontal flips.", names=("--flip",), panel="Augmentation")


#: an :class:`Augment` field -> the option that sets it
AUGMENT_OPTIONS = {"crop": "--crop-size", "scale": "--scale", "resized_crop": "--crop-area", "hflip": "--flip"}


def training_augment(classification: bool, crop: tuple[int, int], scale: tuple[float, float],
                     crop_area: tuple[float, float], hflip: bool) -> Augment:
    """The augmentation a training run draws from its options: a random-resized crop onto
    ``crop`` for a classifier, a random scale, a ``crop`` window and a flip for segmentation."""
    if classification:
        return Augment(crop=tuple(crop), hflip=bool(hflip), resized_crop=tuple(crop_area))
    return Augment(scale=tuple(scale), crop=tuple(crop), hflip=bool(hflip))


def schedule_geometry(schedule: int, epoch: int, index: int, in_size: tuple[int, int], aug: Augment) -> Geometry:
    """The crop a training run with ``--seed schedule`` draws for sample ``index`` in ``epoch``
    (:meth:`SegPipeline.geometry`'s draw): what a schedule cache stores the teacher on."""
    return sample_geometry(np.random.default_rng((schedule, epoch, index)), in_size, aug)


def sample_resized_crop(rng: np.random.Generator, in_size: tuple[int, int], out_size: tuple[int, int],
                        area: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO,
                        hflip: bool = True) -> Geometry:
    """torchvision's ``RandomResizedCrop`` box (10 tries, then the whole image's largest
    centred box within ``ratio``) as a :class:`Geometry` onto ``out_size``, and a flip."""
    H, W = in_size
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = H * W * rng.uniform(area[0], area[1])
        r = math.exp(rng.uniform(*log_r))
        w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:
        r = W / H
        if r < ratio[0]:
            w, h = W, round(W / ratio[0])
        elif r > ratio[1]:
            h, w = H, round(H * ratio[1])
        else:
            h, w = H, W
        top, left = (H - h) // 2, (W - w) // 2
    flip = bool(hflip and rng.random() < 0.5)
    sy, sx = out_size[0] / h, out_size[1] / w
    return Geometry(tuple(in_size), sy, round(top * sy), round(left * sx), tuple(out_size), flip, sx / sy)


def sample_geometry(rng: np.random.Generator, in_size: tuple[int, int], aug: Augment) -> Geometry:
    if aug.resized_crop is not None:
        return sample_resized_crop(rng, in_size, aug.crop or tuple(in_size), aug.resized_crop, aug.ratio, aug.hflip)
    lo, hi = aug.scale
    scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)
    sh, sw = max(1, round(in_size[0] * scale)), max(1, round(in_size[1] * scale))
    ch, cw = aug.crop if aug.crop else (sh, sw)
    top = int(rng.integers(0, sh - ch + 1)) if sh > ch else 0
    left = int(rng.integers(0, sw - cw + 1)) if sw > cw else 0
    flip = bool(aug.hflip and rng.random() < 0.5)
    return Geometry(tuple(in_size), scale, top, left, (ch, cw), flip)


def apply_geometry(x: torch.Tensor, g: Geometry, *, kind: str, fill: float = 0.0) -> torch.Tensor:
    """Apply ``g`` to ``x`` [C, H, W] (or [H, W] for labels) given at the input resolution.

    ``kind``: ``"image"`` (bilinear, antialiased when shrinking) or ``"label"`` (nearest;
    padding with ``fill``, use 255).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x[None]
    sh, sw = g.scaled_size
    if (sh, sw) != tuple(x.shape[-2:]):
        if kind == "label":
            x = resize_labels(x, (sh, sw))
        else:
            x = F.interpolate(x[None].float(), size=(sh, sw), mode="bilinear", align_corners=False,
                              antialias=min(g.scale, g.scale * g.stretch) < 1)[0].to(x.dtype)
    oh, ow = g.out_size
    out = torch.full((x.shape[0], oh, ow), fill, dtype=x.dtype, device=x.device)
    h = min(oh, sh - g.top)
    w = min(ow, sw - g.left)
    out[:, :h, :w] = x[:, g.top:g.top + h, g.left:g.left + w]
    if g.flip:
        out = out.flip(-1)
    return out[0] if squeeze else out


class SegPipeline(torch.utils.data.Dataset):
    """A :class:`SegmentationDataset` as training/evaluation tensors.

    Each item is a dict: ``image`` float [3, H, W] (normalised), ``label`` int64 [H, W]
    (255 = ignore), ``id`` (str), ``index`` (int). With ``augment``, a fresh :class:`Geometry`
    is drawn per item from an RNG seeded by (seed, epoch, index): runs are reproducible
    whatever the number of DataLoader workers. Call :meth:`set_epoch` before each epoch.

    With ``mix`` (cutmix or mixup, :mod:`kdcache.pipeline.mixing`) an augmented item is mixed with
    a partner's crop drawn from its own stream of (seed, epoch, index): ``item["mix"]`` is the
    :class:`~kdcache.pipeline.mixing.Mix` (None when not mixed); a mixup or classification item
    also carries ``mix/label`` (the partner's label) and ``mix/lam`` (the first label's share).
    """

    def __init__(self, dataset: SegmentationDataset, preprocess: Preprocess, augment: Augment | None = None,
                 seed: int = 0, mix: MixOptions | None = None):
        self.dataset = dataset
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.mix = mix or MixOptions()
        # in shared memory: DataLoader workers started once for the run read each epoch's (core/shared)
        self._epoch = SharedInts(1)
        #: classification: the label is the image's class (a 1 x 1 map), untouched by any geometry
        self.classification = is_classification(dataset)

    @property
    def epoch(self) -> int:
        return self._epoch[0]

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transformed(index, self.geometry if self.augment is not None else None)

    def transformed(self, index: int, geometry: Callable[[int, tuple[int, int]], Geometry] | None) -> dict:
        """Item ``index`` with the transform ``geometry(index, image size)`` applied to the
        image and the label (recorded as ``item["geometry"]``); None: untransformed."""
        image, mask = self.dataset.load(index)
        x = self.preprocess.image_to_tensor(image)
        y = label_tensor(self.dataset, self.preprocess, mask)
        item = {"id": self.dataset.refs[index].id, "index": index}
        if geometry is not None:
            g = geometry(index, tuple(x.shape[-2:]))
            x = apply_geometry(x, g, kind="image", fill=0.0)
            if not self.classification:
                y = apply_geometry(y, g, kind="label", fill=IGNORE_INDEX)
            item["geometry"] = g
            if self.mix.enabled and self.augment is not None:
                x, y = self._mixed(index, x, y, item)
        item["image"], item["label"] = x, y
        return item

    def mix_partners(self, index: int) -> tuple[SegmentationDataset, int]:
        """Where item ``index`` finds its mixing partners: the data set whose samples they are, and
        the item's own position in it (the training set itself here; a cached pipeline's is the
        cache's, so that a run on part of it pairs its images as the cache's build did)."""
        return self.dataset, index

    def _mixed(self, index: int, x: torch.Tensor, y: torch.Tensor, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s crop ``x`` and label ``y`` mixed with its partner's (or not, as drawn)."""
        masks: dict = {}
        source, position = self.mix_partners(index)

        def load(j: int) -> torch.Tensor:
            image, masks["partner"] = source.load(j)
            return self.preprocess.image_to_tensor(image)

        drawn = mix_partner(self.mix, self.seed, self.epoch, position, len(source), load, tuple(x.shape[-2:]),
                            lambda rng, size: sample_geometry(rng, size, self.augment),
                            lambda image, g: apply_geometry(image, g, kind="image", fill=0.0))
        partner_y, lam = y, 1.0
        if drawn is not None:
            mix, partner_x = drawn
            x = mix_images(x, partner_x, mix)
            partner_y = label_tensor(source, self.preprocess, masks["partner"])
            if self.classification:
                lam = mix.lam
            else:
                partner_y = apply_geometry(partner_y, mix.geometry, kind="label", fill=IGNORE_INDEX)
                if mix.box is not None:  # cutmix: the box's labels are the partner's
                    y = partner_y = mix_images(y, partner_y, mix)
                else:
                    lam = mix.lam
        item["mix"] = drawn[0] if drawn is not None else None
        if self.mix.kind == "mixup" or self.classification:  # the cross-entropy weighs two labels
            item["mix/label"], item["mix/lam"] = partner_y, torch.tensor(lam, dtype=torch.float32)
        return x, y

    def geometry(self, index: int, in_size: tuple[int, int]) -> Geometry:
        """The transform item ``index`` gets this epoch (the same one for every map of it;
        drawn from (seed, epoch, index): :func:`schedule_geometry`)."""
        return schedule_geometry(self.seed, self.epoch, index, in_size, self.augment)


def label_tensor(dataset: SegmentationDataset, preprocess: Preprocess, mask: np.ndarray) -> torch.Tensor:
    """A loaded label as int64: a mask preprocessed like its image, or a class as its 1 x 1 map."""
    if is_classification(dataset):
        return torch.from_numpy(np.asarray(mask, dtype=np.int64).reshape(1, 1))
    return preprocess.mask_to_tensor(mask)


def collate(batch: list[dict]) -> dict:
    """Stack tensors of equal shape; keep lists otherwise.

    Items of different sizes (e.g. VOC at native size) keep ``image``/``label`` as lists, which
    the evaluator runs one by one. Keys beyond the standard ones (e.g. a :class:`Geometry`, or
    cached teacher maps added by a subclass) are stacked when they are tensors of one shape and
    passed through as lists otherwise.
    """
    out: dict = {"id": [b["id"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
    for key in batch[0]:
        if key in out:
            continue
        values = [b[key] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
