"""The common shape of every segmentation data set kdcache reads.

A data set is an ordered list of samples of one split. Each sample has a stable string id (its
file stem, or the synthetic index), an RGB image and a mask of class ids with 255 as the ignore
label. A split of unlabelled images (``labelled`` False: a folder without masks, a plain image
folder, Cityscapes ``train_extra``, the synthetic ``unlabeled`` split) loads each image with a
mask of 255 everywhere, so pipelines, caches and KD terms treat it like any other; commands that
need labels check :attr:`SegmentationDataset.labelled` (:meth:`require_labels`). Loaders only say where the files are and how to decode them; validation (mask values,
image/mask size) lives here once, so every loader reports bad files the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdcache.core.errors import DatasetError

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SampleRef:
    """Where one sample comes from: its id and the files behind it (None for generated data)."""

    id: str
    image: Path | None = None
    mask: Path | None = None


def default_palette(num_classes: int) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved), good for any class count up to 256."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        cid = c
        for j in range(8):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        palette[c] = (r, g, b)
    return palette


#: 16-bit grayscale modes: read at their high byte, as Pillow reads 16-bit colour PNGs (a 16-bit
#: sample spans the full 0-65535 range, so v >> 8 keeps its brightness; Pillow's own convert to RGB
#: would clip every value above 255 to white)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; grayscale and RGBA are converted, 16-bit
    grayscale at its high byte (a 32-bit integer image whose values fit 16 bits too); other 32-bit
    integer and floating-point images are refused (their value range is the user's to choose)."""
    try:
        with Image.open(path) as im:
            im.load()
            deep = np.asarray(im) if im.mode in (*SIXTEEN_BIT_MODES, "I") else None
            # mode I: a 32-bit image, or a 16-bit PNG as older Pillow opens it; its values tell which
            if deep is not None and (im.mode != "I" or (deep.size and deep.min() >= 0 and deep.max() <= 65535)):
                gray = (deep.astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            if im.mode in ("I", "F"):
                raise DatasetError(
                    f"image {path} holds {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels; "
                    "kdcache reads 8- and 16-bit images: convert it to 8 bits with the value range your data "
                    "needs (e.g. numpy: np.clip((a - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8))")
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist") from None
    except DatasetError:
        raise
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def read_index_mask(path: Path) -> np.ndarray:
    """Decode a mask file to its raw integer values [H, W] (palette indices, not colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L"):
                arr = np.asarray(im)
            elif im.mode == "1":  # a 1-bit PNG (a saved bool array): classes 0 and 1, not 0 and 255
                arr = np.asarray(im).astype(np.uint8)
            elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im).astype(np.int64)
            elif im.mode in ("RGB", "RGBA"):
                raise DatasetError(
                    f"mask {path} is an {im.mode} colour image; kdcache expects one class id per "
                    "pixel (a palette 'P' or grayscale 'L' PNG). Convert colour masks to class ids first."
                )
            else:
                arr = np.asarray(im.convert("L"))
            return np.array(arr, copy=True)
    except FileNotFoundError:
        raise DatasetError(f"mask file {path} does not exist") from None
    except DatasetError:
        raise
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from None


def _exif_hint(path: Path | None, image_hw: tuple, mask_hw: tuple) -> str:
    """Where an image file's EXIF orientation turns it a quarter (a phone photo) and its mask is
    the turned size: the reason and the fix, for the size-mismatch error; else ''."""
    if path is None or tuple(image_hw) != tuple(mask_hw)[::-1]:
        return ""
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112)
    except (OSError, ValueError):
        return ""
    if orientation not in (5, 6, 7, 8):
        return ""
    return (f" (the image file's EXIF orientation {orientation} shows it turned a quarter, the mask's way; kdcache "
            "reads pixels as stored: save the images turned, e.g. PIL.ImageOps.exif_transpose)")


class SegmentationDataset:
    """Base class: one split of a segmentation data set.

    Subclasses fill ``self.refs`` (a list of :class:`SampleRef`), set ``name``,
    ``class_names`` and optionally ``palette``, and may override :meth:`read_image` and
    :meth:`read_mask` (the defaults decode the files in the ref). ``read_mask`` returns raw
    values; :meth:`map_mask` turns them into class ids (e.g. Cityscapes labelIds -> train ids).
    """

    name: str = "dataset"
    class_names: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX
    #: False for a split of images without masks (each loads with a mask of ``ignore_index``)
    labelled: bool = True

    def __init__(self, refs: Sequence[SampleRef], split: str, root: Path | None = None):
        self.refs = list(refs)
        self.split = split
        self.root = Path(root) if root is not None else None
        ids = [r.id for r in self.refs]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DatasetError(f"{self.name} split '{split}' has duplicate sample ids: {dup}; list each sample once")

    # -- what subclasses may override -------------------------------------------------------
    @property
    def palette(self) -> np.ndarray:
        return default_palette(max(len(self.class_names), 1))

    def read_image(self, ref: SampleRef) -> np.ndarray:
        assert ref.image is not None
        return read_rgb(ref.image)

    def read_mask(self, ref: SampleRef) -> np.ndarray:
        assert ref.mask is not None
        return read_index_mask(ref.mask)

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values -> class ids (uint8, 255 = ignore). Identity by default."""
        return raw

    def describe(self, ref: SampleRef) -> str:
        """How to name this sample in an error message."""
        return str(ref.mask) if ref.mask is not None else f"{self.name}:{ref.id}"

    # -- the common API ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.refs]

    def __len__(self) -> int:
        return len(self.refs)

    def require_labels(self, what: str) -> None:
        """A one-line error if this split has no masks: ``what`` (e.g. "train-teacher") needs them."""
        if not self.labelled:
            raise DatasetError(
                f"{self.name} split '{self.split}' holds unlabelled images (no masks); {what} needs labelled "
                "images: give a split with masks (unlabelled images go into a teacher cache and "
                "train-student --unlabeled-cache)"
            )

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] and mask uint8 [H, W] of sample ``index``, validated (for an
        unlabelled split, a mask of ``ignore_index`` everywhere)."""
        ref = self.refs[index]
        image = self.read_image(ref)
        if not self.labelled:
            if image.ndim != 3 or image.shape[2] != 3:
                raise DatasetError(f"image of {self.describe(ref)} has shape {image.shape}, expected H x W x 3")
            return image, np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        raw = self.read_mask(ref)
        mask = self.map_mask(raw)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(f"image of {self.describe(ref)} has shape {image.shape}, expected H x W x 3")
        if mask.ndim != 2:
            raise DatasetError(f"mask {self.describe(ref)} has shape {mask.shape}, expected H x W")
        if image.shape[:2] != mask.shape:
            where = ref.image if ref.image is not None else self.describe(ref)
            raise DatasetError(
                f"image {where} is {image.shape[1]}x{image.shape[0]} (WxH) but its mask "
                f"{self.describe(ref)} is {mask.shape[1]}x{mask.shape[0]}; image and mask must "
                "have the same size" + _exif_hint(ref.image, image.shape[:2], mask.shape)
            )
        mask = np.asarray(mask)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = sorted(int(v) for v in np.unique(mask[bad]))
            shown = ", ".join(map(str, values[:10])) + (" ..." if len(values) > 10 else "")
            raise DatasetError(
                f"mask {self.describe(ref)} has values {{{shown}}} outside the {self.num_classes} "
                f"classes 0..{self.num_classes - 1} of {self.name} (255 = ignore); check --dataset "
                "and that masks hold class ids, not colours"
            )
        return image, mask.astype(np.uint8, copy=False)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of sample ``index``'s image, from the file header when there is a file."""
        ref = self.refs[index]
        if ref.image is not None:
            try:
                with Image.open(ref.image) as im:
                    return im.size[1], im.size[0]
            except FileNotFoundError:
                raise DatasetError(f"image file {ref.image} does not exist") from None
            except (OSError, ValueError) as exc:
                raise DatasetError(f"cannot read image {ref.image}: {exc}") from None
        return tuple(self.read_image(ref).shape[:2])

    def content_hash(self, index: int) -> str:
        """SHA-256 over the sample's image and mask bytes (files as stored, or generated arrays;
        the image file alone for an unlabelled split)."""
        ref = self.refs[index]
        h = hashlib.sha256(ref.id.encode())
        if ref.image is not None and (ref.mask is not None or not self.labelled):
            h.update(Path(ref.image).read_bytes())
            if ref.mask is not None:
                h.update(Path(ref.mask).read_bytes())
        else:
            image, mask = self.load(index)
            h.update(np.ascontiguousarray(image).tobytes())
            h.update(np.ascontiguousarray(mask).tobytes())
        return h.hexdigest()

    def prepare_for_workers(self) -> None:
        """Work worth doing once in the main process before DataLoader workers start: forked
        workers inherit what it leaves in memory, while each epoch's new workers would
        otherwise redo it. Default: nothing (files are read where they are used)."""

    def with_class_names(self, names: Sequence[str]) -> SegmentationDataset:
        """A view of this data set with ``names`` as its classes (for a folder of images that
        lists none: the teacher's)."""
        view = self.select(range(len(self)))
        view.class_names = tuple(names)
        return view

    def select(self, indices: Sequence[int]) -> SegmentationDataset:
        """A view of this data set holding only ``indices`` (in that order)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.refs = [self.refs[i] for i in indices]
        return view

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, classes={self.num_classes})"
