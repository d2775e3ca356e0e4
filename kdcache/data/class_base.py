"""The common shape of every image-classification data set kdcache reads.

Classification runs through the same pipelines, caches and trainers as segmentation, as
segmentation with one cell: a sample loads as its image and a 1 x 1 label map holding its class
id (int64, so ids above 255 are fine), and classifiers' logits are [N, C, 1, 1] (see
:class:`~kdcache.models.wrapper.SegModel`). The ignore value is :data:`NO_LABEL` (-100, PyTorch's
default), not 255: class 255 of ImageNet is a class. An unlabelled split (a folder of images
without class folders) loads every label as ``NO_LABEL``.

Subclasses fill ``self.refs`` with :class:`ClassRef` (id, image file or None, class id) and set
``name`` and ``class_names``; generated data sets override :meth:`read_image`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import SampleRef, SegmentationDataset

#: the label of an image without one (PyTorch's cross-entropy default ignore index)
NO_LABEL = -100


@dataclass(frozen=True)
class ClassRef(SampleRef):
    """A sample of a classification data set: its id, its image file (None when generated or
    held in memory) and its class id (``NO_LABEL`` when unlabelled)."""

    label: int = NO_LABEL


class ClassificationDataset(SegmentationDataset):
    """Base class: one split of a classification data set (see the module docstring)."""

    task = "classification"
    ignore_index = NO_LABEL

    def describe(self, ref: SampleRef) -> str:
        return str(ref.image) if ref.image is not None else f"{self.name}:{ref.id}"

    def label(self, index: int) -> int:
        return int(self.refs[index].label)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] and its class as a 1 x 1 int64 label map (``NO_LABEL`` when
        the split is unlabelled)."""
        ref = self.refs[index]
        image = self.read_image(ref)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(f"image of {self.describe(ref)} has shape {image.shape}, expected H x W x 3")
        label = int(ref.label) if self.labelled else NO_LABEL
        if self.labelled and not 0 <= label < self.num_classes:
            raise DatasetError(f"sample {self.describe(ref)} is labelled class {label}, outside the {self.num_classes} "
                               f"classes 0..{self.num_classes - 1} of {self.name}; check the labels' file")
        return image, np.full((1, 1), label, dtype=np.int64)

    def content_hash(self, index: int) -> str:
        """SHA-256 over the sample's id, image bytes (the file as stored, or the decoded pixels)
        and class id."""
        ref = self.refs[index]
        h = hashlib.sha256(ref.id.encode())
        if ref.image is not None:
            h.update(Path(ref.image).read_bytes())
        else:
            h.update(np.ascontiguousarray(self.read_image(ref)).tobytes())
        h.update(str(int(ref.label) if self.labelled else NO_LABEL).encode())
        return h.hexdigest()

    def class_counts(self) -> np.ndarray:
        """Samples per class (labelled splits)."""
        labels = np.array([r.label for r in self.refs], dtype=np.int64)
        return np.bincount(labels[labels >= 0], minlength=self.num_classes)


def is_classification(dataset) -> bool:
    """True for a classification data set (class labels, not masks)."""
    return getattr(dataset, "task", "segmentation") == "classification"
