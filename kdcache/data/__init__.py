"""Data sets: the built-in synthetic one and loaders for VOC, CamVid, Cityscapes and folders.

``build_dataset(name, split, root=None, **options)`` is the one entry point; every loader is a
:class:`~kdcache.data.base.SegmentationDataset` registered under its name. Add one: a new module
here with a ``SegmentationDataset`` subclass decorated ``@DATASETS.register("mine")``; every
module of this package is imported, so nothing else needs editing.
"""

from kdcache.core.registry import import_submodules
from kdcache.data.base import IGNORE_INDEX, SampleRef, SegmentationDataset
from kdcache.data.registry import DATASETS, build_dataset

import_submodules(__name__, __path__)

__all__ = ["DATASETS", "IGNORE_INDEX", "SampleRef", "SegmentationDataset", "build_dataset"]
