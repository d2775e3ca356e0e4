"""Pascal VOC 2012 semantic segmentation (``--dataset voc``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import SampleRef, SegmentationDataset, default_palette
from kdcache.data.folder import empty_split, files_by_stem, read_id_list, unknown_split
from kdcache.data.registry import DATASETS

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
VOC_SPLITS = ("train", "val", "trainval")
_SUBDIRS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
_LAYOUT = "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}"


def find_voc2012(root: Path) -> Path:
    """The ``VOC2012`` folder for ``root`` = its parent's parent, ``VOCdevkit/`` or itself."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            missing = [d for d in _SUBDIRS if not (candidate / d).is_dir()]
            if missing:
                raise DatasetError(
                    f"Pascal VOC folder {candidate} has JPEGImages but lacks "
                    f"{', '.join(missing)}; expected {_LAYOUT} under {root}"
                )
            return candidate
    raise DatasetError(
        f"expected {_LAYOUT} under {root} (--data-root may also be the VOCdevkit/ or VOC2012/ "
        "folder itself)"
    )


@DATASETS.register("voc")
class VOCDataset(SegmentationDataset):
    """Pascal VOC 2012 segmentation: 21 classes (background + 20), 255 on object borders.

    ``root`` is the folder holding ``VOCdevkit/``, the ``VOCdevkit/`` folder, or ``VOC2012/``
    itself. Split ``S`` (train, val, trainval) is the id list
    ``ImageSets/Segmentation/S.txt``; image ``JPEGImages/<id>.jpg``, mask
    ``SegmentationClass/<id>.png`` (a palette PNG whose indices are the class ids).
    """

    class_names = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root).expanduser()
        voc = find_voc2012(root)
        if split not in VOC_SPLITS:
            raise unknown_split("Pascal VOC", split, VOC_SPLITS, voc)
        list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetError(f"Pascal VOC split list {list_file} does not exist")
        image_dir, mask_dir = voc / "JPEGImages", voc / "SegmentationClass"
        images = files_by_stem(image_dir, (".jpg", ".jpeg"), "image")
        masks = files_by_stem(mask_dir, (".png",), "mask")
        refs = []
        for sid in (line.split()[0] for line in read_id_list(list_file)):  # VOC's lists: an id, maybe a flag
            if sid not in images:
                raise DatasetError(
                    f"split list {list_file} names '{sid}' but image {image_dir / sid}.jpg "
                    "does not exist"
                )
            if sid not in masks:
                raise DatasetError(
                    f"split list {list_file} names '{sid}' but mask {mask_dir / sid}.png "
                    "does not exist"
                )
            refs.append(SampleRef(id=sid, image=images[sid], mask=masks[sid]))
        if not refs:
            raise empty_split("Pascal VOC", split, list_file)
        refs.sort(key=lambda r: r.id)
        super().__init__(refs, split, root)

    @property
    def palette(self) -> np.ndarray:
        return default_palette(len(VOC_CLASSES))
