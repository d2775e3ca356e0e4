"""A plain folder of images, searched recursively, without masks (``--dataset images``).

Images for a teacher to label: every file under ``ROOT`` (sub-folders included) whose suffix is
an image's, in sorted order of its path. The sample id is the path below ``ROOT`` without the
suffix, with ``/`` between folders (``seq01/000123``), so frames of different sequences keep
apart. The split is always unlabelled (each image loads with a mask of 255); ``split`` names it
(``all`` by default) and selects nothing.

Class names come from ``-o class_names_file=FILE`` (one per line, as ``folder``'s
``classes.txt``) or, when none is given, from the teacher when a cache is built
(``build-teacher-cache`` takes them from the teacher run's ``config.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.data.base import SampleRef, SegmentationDataset
from kdcache.data.folder import IMAGE_SUFFIXES, FolderDataset, empty_split
from kdcache.data.registry import DATASETS


@DATASETS.register("images")
class ImageFolderDataset(SegmentationDataset):
    labelled = False

    def __init__(self, root: str | Path, split: str = "all", class_names_file: str | Path | None = None):
        root = Path(root).expanduser()  # build_dataset has checked that it is a folder
        self.class_names = (FolderDataset._read_class_names(root, class_names_file)
                            if class_names_file is not None else ())
        refs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                refs.append(SampleRef(id=path.relative_to(root).with_suffix("").as_posix(), image=path))
        if not refs:
            raise empty_split("image folder", split, f"{root} (searched recursively for "
                              f"{', '.join(IMAGE_SUFFIXES)})")
        refs.sort(key=lambda r: r.id)
        super().__init__(refs, split, root)
