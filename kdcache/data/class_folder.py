"""Image classification from class folders, torchvision's ``ImageFolder`` layout (``--dataset imagefolder``).

Layout::

    ROOT/train/<class>/*.{jpg,jpeg,png,bmp,tif,tiff,webp}
    ROOT/val/<class>/...
    ROOT/test/<class>/...
    ROOT/unlabeled/*.jpg            (optional: a split of images directly in its folder is unlabelled)

The classes are the sub-folders of ``ROOT/<classes_from>`` (``train`` by default; the split's
own when there is no such folder), sorted by name, as torchvision does; every split uses that
list, so class ids agree between splits. A split's class folder missing from the list, an empty
class folder or a split without images is an error; images are searched recursively inside each
class folder. Sample ids are ``<class>/<path below it without the suffix>``.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.core.errors import DatasetError
from kdcache.data.class_base import ClassificationDataset, ClassRef
from kdcache.data.folder import IMAGE_SUFFIXES, empty_split
from kdcache.data.registry import DATASETS

SUFFIXES = IMAGE_SUFFIXES


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.suffix.lower() in SUFFIXES:
                found.append(p)
    return found


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


@DATASETS.register("imagefolder")
class ClassFolderDataset(ClassificationDataset):
    def __init__(self, root: str | Path, split: str = "train", classes_from: str = "train"):
        root = Path(root).expanduser()
        folder = root / split
        if not folder.is_dir():
            have = ", ".join(_subfolders(root)) or "none"
            raise DatasetError(f"imagefolder has no split folder {folder} (splits there: {have}); "
                               "lay images out as ROOT/<split>/<class>/*.jpg")
        own = _subfolders(folder)
        if not own:  # images straight in the split's folder: an unlabelled split
            self.labelled = False
            ref_folder = root / classes_from
            self.class_names = tuple(_subfolders(ref_folder)) if ref_folder.is_dir() else ()
            refs = [ClassRef(id=p.relative_to(folder).with_suffix("").as_posix(), image=p)
                    for p in _images_under(folder)]
            if not refs:
                raise empty_split("imagefolder", split, f"{folder} (no class folders and no images)")
            super().__init__(refs, split, root)
            return
        ref_folder = root / classes_from
        names = _subfolders(ref_folder) if ref_folder.is_dir() else own
        unknown = sorted(set(own) - set(names))
        if unknown:
            raise DatasetError(f"imagefolder split '{split}' has class folders {', '.join(unknown[:5])} that "
                               f"{ref_folder} lacks; every split must use the classes of '{classes_from}'")
        if len(names) < 2:
            raise DatasetError(f"imagefolder {ref_folder} has one class folder ({names[0]}): a classifier needs two "
                               "or more (with one, every prediction is right and nothing is learnt); add a folder "
                               "per class")
        self.class_names = tuple(names)
        refs = []
        for c, name in enumerate(names):
            cdir = folder / name
            if not cdir.is_dir():
                continue  # a class without images in this split (e.g. a small test split)
            files = _images_under(cdir)
            if not files:
                raise DatasetError(f"class folder {cdir} holds no images ({', '.join(SUFFIXES)}); remove it or "
                                   "add its images")
            refs += [ClassRef(id=f"{name}/{p.relative_to(cdir).with_suffix('').as_posix()}", image=p, label=c)
                     for p in files]
        super().__init__(refs, split, root)
