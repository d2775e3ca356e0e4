"""Cityscapes fine annotations, 19 train-id classes (``--dataset cityscapes``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import IGNORE_INDEX, SampleRef, SegmentationDataset
from kdcache.data.folder import empty_split, unknown_split
from kdcache.data.registry import DATASETS

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_SPLITS = ("train", "val", "test", "train_extra")
#: splits read without masks: the 19 998 extra frames (their coarse labels are not used)
UNLABELLED_SPLITS = ("train_extra",)
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip
# labelId -> trainId of cityscapesScripts' labels.py; every labelId not listed (unlabeled, ego
# vehicle, rectification border, out of roi, static, dynamic, ground, parking, rail track, guard
# rail, bridge, tunnel, polegroup, caravan, trailer, license plate) is ignored.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label, _train in LABEL_TO_TRAIN_ID.items():
    _LUT[_label] = _train

_IMAGE_SUFFIX = "_leftImg8bit.png"
_MASK_SUFFIXES = {"labelIds": "_gtFine_labelIds.png", "trainIds": "_gtFine_labelTrainIds.png"}
_LAYOUT = (
    "leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png and "
    "gtFine/{split}/<city>/<stem>_gtFine_labelIds.png"
)


def find_cityscapes(root: Path, masks: bool = True) -> Path:
    """``root`` itself or ``root/cityscapes``: the first holding ``leftImg8bit/`` and (when
    ``masks``) ``gtFine/``."""
    for candidate in (root, root / "cityscapes"):
        if (candidate / "leftImg8bit").is_dir() and (not masks or (candidate / "gtFine").is_dir()):
            return candidate
    raise DatasetError(f"expected {_LAYOUT} under {root} (or under {root / 'cityscapes'})")


@DATASETS.register("cityscapes")
class CityscapesDataset(SegmentationDataset):
    """Cityscapes with the 19 evaluation classes (train ids), everything else ignored (255).

    ``root`` holds ``leftImg8bit/`` and ``gtFine/`` (or ``root/cityscapes`` does). Sample
    ``<stem>`` (e.g. ``aachen_000000_000019``) of split ``S`` (train, val, test) is image
    ``leftImg8bit/S/<city>/<stem>_leftImg8bit.png`` with mask
    ``gtFine/S/<city>/<stem>_gtFine_labelIds.png``, whose labelIds are mapped to train ids with
    the official table. ``label_type="trainIds"`` reads the ``*_gtFine_labelTrainIds.png`` files
    made by cityscapesScripts' ``createTrainIdLabelImgs`` instead, unmapped. Split
    ``train_extra`` is ``leftImg8bit/train_extra/<city>/*`` alone, unlabelled (its coarse masks
    are not read): images for a teacher to label.
    """

    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train", label_type: str = "labelIds"):
        root = Path(root).expanduser()
        if label_type not in _MASK_SUFFIXES:
            raise DatasetError(
                f"unknown Cityscapes label_type '{label_type}'; valid: {', '.join(_MASK_SUFFIXES)}"
            )
        self.label_type = label_type
        self.labelled = split not in UNLABELLED_SPLITS
        base = find_cityscapes(root, masks=self.labelled)
        if split not in CITYSCAPES_SPLITS:
            raise unknown_split("Cityscapes", split, CITYSCAPES_SPLITS, base)
        image_root, mask_root = base / "leftImg8bit" / split, base / "gtFine" / split
        if not image_root.is_dir():
            raise DatasetError(
                f"Cityscapes split '{split}' needs {image_root}, which does not exist"
            )
        if self.labelled and not mask_root.is_dir():
            raise DatasetError(
                f"Cityscapes split '{split}' needs {mask_root}, which does not exist"
            )
        mask_suffix = _MASK_SUFFIXES[label_type]
        refs = []
        for city in sorted(e.name for e in os.scandir(image_root) if e.is_dir()):
            for entry in sorted(os.scandir(image_root / city), key=lambda e: e.name):
                if not entry.name.endswith(_IMAGE_SUFFIX) or not entry.is_file():
                    continue
                stem = entry.name[: -len(_IMAGE_SUFFIX)]
                if not self.labelled:
                    refs.append(SampleRef(id=stem, image=Path(entry.path)))
                    continue
                mask = mask_root / city / f"{stem}{mask_suffix}"
                if not mask.is_file():
                    raise DatasetError(
                        f"Cityscapes image {entry.path} has no mask: {mask} does not exist"
                    )
                refs.append(SampleRef(id=stem, image=Path(entry.path), mask=mask))
        if not refs:
            raise empty_split("Cityscapes", split, f"{image_root}/<city>/*{_IMAGE_SUFFIX}")
        refs.sort(key=lambda r: r.id)
        super().__init__(refs, split, root)

    @property
    def palette(self) -> np.ndarray:
        return CITYSCAPES_PALETTE.copy()

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        if self.label_type == "trainIds":
            return raw
        if raw.dtype == np.uint8:
            return _LUT[raw]
        # 16-bit or signed masks: values outside 0..255 are no label id, hence ignored.
        raw = np.asarray(raw, dtype=np.int64)
        inside = (raw >= 0) & (raw < 256)
        return np.where(inside, _LUT[np.clip(raw, 0, 255)], IGNORE_INDEX).astype(np.uint8)
