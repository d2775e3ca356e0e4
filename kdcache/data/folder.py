"""A plain folder of images and masks matched by file stem (``--dataset folder``).

Also holds the small file-listing helpers the other loaders share (pairing images with masks by
stem, reading split lists).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import SampleRef, SegmentationDataset
from kdcache.data.registry import DATASETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png",)


def _shown(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def files_by_stem(directory: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``directory`` whose suffix (any case) is in ``suffixes``.

    Two files with the same stem (``a.jpg`` and ``a.png``) are an error: the pairing by stem
    would be ambiguous.
    """
    found: dict[str, Path] = {}
    clashes: set[str] = set()
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise DatasetError(f"cannot list {what} folder {directory}: {exc}") from None
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        path = Path(entry.path)
        if path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            clashes.add(path.stem)
        found[path.stem] = path
    if clashes:
        raise DatasetError(
            f"{what} folder {directory} has several files with the same stem: {_shown(clashes)}; "
            "keep one file per sample"
        )
    return found


def pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path
) -> list[SampleRef]:
    """Sample refs for the stems present in both, sorted by stem; any unpaired stem is an error."""
    no_mask = images.keys() - masks.keys()
    no_image = masks.keys() - images.keys()
    problems = []
    if no_mask:
        other = sorted({p.suffix for p in mask_dir.iterdir() if p.stem in no_mask and p.is_file()}) \
            if mask_dir.is_dir() else []
        hint = (f" (masks are read from {', '.join(MASK_SUFFIXES)} files, and theirs are {', '.join(other)}: save "
                "them as PNG, which keeps class ids exact where JPEG's compression changes them)") if other else ""
        problems.append(f"images in {image_dir} without a mask in {mask_dir}: {_shown(no_mask)}{hint}")
    if no_image:
        problems.append(f"masks in {mask_dir} without an image in {image_dir}: {_shown(no_image)}")
    if problems:
        raise DatasetError("; ".join(problems) + " (images and masks are matched by file stem)")
    return [SampleRef(id=s, image=images[s], mask=masks[s]) for s in sorted(images)]


def read_id_list(path: Path) -> list[str]:
    """The entries of a split list: one per line, the whole line trimmed (a file name may hold
    spaces; a line of two paths, image and label, is resolved by the data set); blank lines and
    ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of an id
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split list {path}: {exc}") from None
    ids = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def listed_stem(entry: str, images: dict[str, Path]) -> str:
    """The image stem a split list's line names: the whole line (a name may hold spaces, and carry
    its image suffix), else its first word (lists of "image label" pairs)."""
    for candidate in (entry, entry.split()[0]):
        stem = Path(candidate).stem if Path(candidate).suffix.lower() in IMAGE_SUFFIXES else candidate
        if stem in images:
            return stem
    return entry


def unknown_split(name: str, split: str, valid: Iterable[str], where: Path) -> DatasetError:
    valid = sorted(set(valid))
    known = ", ".join(valid) if valid else "none found"
    return DatasetError(f"{name} has no split '{split}' under {where}; valid splits: {known}")


def empty_split(name: str, split: str, where: Path | str) -> DatasetError:
    return DatasetError(f"{name} split '{split}' is empty: no samples found in {where}")


@DATASETS.register("folder")
class FolderDataset(SegmentationDataset):
    """Images and masks in plain folders, matched by file stem.

    Layout::

        ROOT/classes.txt              one class name per line (line i = class id i)
        ROOT/images/<stem>.{jpg,jpeg,png,bmp,tif,tiff}
        ROOT/masks/<stem>.png         palette or grayscale PNG of class ids, 255 = ignore

    ``class_names_file`` (``-o class_names_file=FILE``) replaces ``ROOT/classes.txt``.
    ``binary_255`` (``-o binary_255=true``): binary masks of 0 and 255, where 255 marks class 1
    rather than "ignore". Left unset, a mask of a two-class data set that holds only 0 and 255 is
    an error naming both ways out: read with 255 as "ignore" (VOC's convention), every foreground
    pixel would be left out of training without a word. ``-o binary_255=false`` says 255 is
    "ignore" (a background-only image with a void region) and skips the check.

    Which files make split ``S``, the first rule that applies:

    1. ``ROOT/splits/S.txt`` exists: the stems it lists (one per line; blank lines and ``#``
       comments skipped; a listed name may carry its image suffix), from ``ROOT/images`` and
       ``ROOT/masks``. Every listed stem must have both an image and a mask.
    2. ``ROOT/S/images`` exists: every image in it, paired with ``ROOT/S/masks``.
    3. ``S`` is ``all`` and ``ROOT/images`` exists: every image in it. ``S`` is ``train`` and the root defines
       no splits at all (no ``splits/*.txt``, no ``*/images`` sub-folders): likewise every
       image, so an unsplit folder can be used as the training set. Once splits are defined,
       ``train`` must be one of them, so no validation image leaks into training by default.

    In rules 2 and 3 every image needs a mask and every mask an image; a stray one is an error
    naming its stem. Where the ``masks`` folder is missing altogether, the split is unlabelled:
    its images load with masks of 255, for a teacher cache (an error only where labels are
    needed). Sample ids are file stems, in sorted order.
    """


    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        class_names_file: str | Path | None = None,
        binary_255: bool | None = None,
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"folder data set root {root} does not exist or is not a directory")
        self.class_names = self._read_class_names(root, class_names_file)
        if binary_255 not in (None, True, False):
            raise DatasetError(f"-o binary_255 takes true or false, got {binary_255!r}")
        if binary_255 and len(self.class_names) != 2:
            raise DatasetError(f"-o binary_255=true reads 255 as class 1 of two, but the class names list "
                               f"{len(self.class_names)} classes; list two (background and the foreground)")
        self.binary_255 = binary_255
        refs = self._refs(root, split)
        super().__init__(refs, split, root)

    def read_mask(self, ref: SampleRef) -> np.ndarray:
        raw = super().read_mask(ref)
        if self.binary_255:
            return np.where(raw == 255, 1, raw).astype(raw.dtype, copy=False)
        if (self.binary_255 is None and len(self.class_names) == 2 and raw.size and raw.max() == 255
                and not np.isin(raw, (0, 255), invert=True).any()):
            raise DatasetError(
                f"mask {ref.mask} holds only 0 and 255, and the data set has two classes: is 255 class 1 or "
                "'ignore'? Read as 'ignore', every foreground pixel of a binary mask would be left out; give "
                "-o binary_255=true if 255 marks class 1, -o binary_255=false if it marks pixels to ignore")
        return raw

    # -- class names ---------------------------------------------------------------------------
    @staticmethod
    def _read_class_names(root: Path, class_names_file: str | Path | None) -> tuple[str, ...]:
        if class_names_file is not None:
            path = Path(class_names_file).expanduser()
            if not path.is_file():
                raise DatasetError(f"class names file {path} does not exist")
        else:
            path = root / "classes.txt"
            if not path.is_file():
                raise DatasetError(
                    f"folder data set needs {path} (one class name per line, line i = class id "
                    "i) or -o class_names_file=FILE; expected layout: ROOT/classes.txt, ROOT/images/*, "
                    "ROOT/masks/*.png"
                )
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # without a byte-order mark
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read class names file {path}: {exc}") from None
        names = tuple(line.strip() for line in lines if line.strip())
        if not names:
            raise DatasetError(f"class names file {path} lists no classes")
        if len(names) > 255:
            raise DatasetError(
                f"class names file {path} lists {len(names)} classes; at most 255 fit in a uint8 "
                "mask next to the ignore label 255"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DatasetError(f"class names file {path} repeats {', '.join(dup)}")
        return names

    # -- splits --------------------------------------------------------------------------------
    @staticmethod
    def _defined_splits(root: Path) -> tuple[list[str], list[str]]:
        listed = (
            sorted(p.stem for p in (root / "splits").glob("*.txt"))
            if (root / "splits").is_dir()
            else []
        )
        subdirs = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and p.name != "splits" and os.path.isdir(p / "images")  # unreadable: False, no error
        )
        return listed, subdirs

    def _refs(self, root: Path, split: str) -> list[SampleRef]:
        list_file = root / "splits" / f"{split}.txt"
        if list_file.is_file():
            return self._listed_refs(root, split, list_file)
        sub = root / split
        if (sub / "images").is_dir():
            return self._folder_refs(sub, split)
        listed, subdirs = self._defined_splits(root)
        has_flat = (root / "images").is_dir()
        if not has_flat and not listed and not subdirs:
            raise DatasetError(
                f"folder data set expected {root / 'images'} and {root / 'masks'} (or "
                f"{root}/<split>/images and masks, or ROOT/splits/<split>.txt lists); "
                f"none exists under {root}"
            )
        if has_flat and (split == "all" or (split == "train" and not listed and not subdirs)):
            return self._folder_refs(root, split)
        if has_flat and not listed and not subdirs:
            raise DatasetError(
                f"folder data set has no split '{split}' under {root}: it defines no splits, so its one split is "
                f"'all' (also read as 'train'); use 'all', or hold images out as '{split}' with "
                f"{root / 'splits' / split}.txt (their stems, one per line) or {root / split}/images and masks"
            )
        valid = set(listed) | set(subdirs)
        if has_flat:
            valid.add("all")
        raise unknown_split("folder data set", split, valid, root)

    def _listed_refs(self, root: Path, split: str, list_file: Path) -> list[SampleRef]:
        image_dir, mask_dir = root / "images", root / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DatasetError(
                    f"split list {list_file} needs the folder {d}, which does not exist (expected "
                    "ROOT/images/* and ROOT/masks/*.png next to ROOT/splits/)"
                )
        images = files_by_stem(image_dir, IMAGE_SUFFIXES, "image")
        masks = files_by_stem(mask_dir, MASK_SUFFIXES, "mask")
        refs = []
        for entry in read_id_list(list_file):
            stem = listed_stem(entry, images)
            if stem not in images:
                raise DatasetError(
                    f"split list {list_file} names '{entry}' but there is no image "
                    f"{image_dir / stem}.{{{','.join(s[1:] for s in IMAGE_SUFFIXES)}}}"
                )
            if stem not in masks:
                raise DatasetError(
                    f"split list {list_file} names '{entry}' but its mask {mask_dir / stem}.png "
                    "does not exist"
                )
            refs.append(SampleRef(id=stem, image=images[stem], mask=masks[stem]))
        if not refs:
            raise empty_split("folder data set", split, list_file)
        return sorted(refs, key=lambda r: r.id)

    def _folder_refs(self, base: Path, split: str) -> list[SampleRef]:
        image_dir, mask_dir = base / "images", base / "masks"
        if not mask_dir.is_dir():  # images without masks: an unlabelled split
            self.labelled = False
            images = files_by_stem(image_dir, IMAGE_SUFFIXES, "image")
            if not images:
                raise empty_split("folder data set", split, f"{image_dir} (images: {', '.join(IMAGE_SUFFIXES)})")
            return [SampleRef(id=s, image=images[s]) for s in sorted(images)]
        images = files_by_stem(image_dir, IMAGE_SUFFIXES, "image")
        masks = files_by_stem(mask_dir, MASK_SUFFIXES, "mask")
        refs = pair_by_stem(images, masks, image_dir, mask_dir)
        if not refs:
            raise empty_split("folder data set", split, f"{image_dir} (images: {', '.join(IMAGE_SUFFIXES)})")
        return refs
