"""CIFAR-10 and CIFAR-100 from their python-pickle files on disk (``--dataset cifar10|cifar100``).

``--data-root`` is the extracted archive's folder (``cifar-10-batches-py`` with ``data_batch_1``
… ``data_batch_5``, ``test_batch``, ``batches.meta``; ``cifar-100-python`` with ``train``,
``test``, ``meta``) or the folder holding it. Nothing is downloaded. The pickles are read with
``pickle`` restricted to plain containers, bytes and numpy arrays (no other class is built).

Splits: ``test`` (the official 10,000), ``train`` (the official training images except the last
``val_size``), ``val`` (those last ``val_size``, 5,000 by default, for choosing checkpoints) and
``trainval`` (all 50,000). Sample ids are ``train-<n>`` / ``test-<n>`` by position in the
official files, so a cache stays valid whatever ``val_size`` a student uses.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.class_base import ClassificationDataset, ClassRef
from kdcache.data.registry import DATASETS

LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names": "label_names", "labels": "labels"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels"},
}
SPLITS = ("train", "val", "test", "trainval")


class _PlainUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, bytes and (in some re-saves) numpy arrays; nothing else is built."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR file")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _PlainUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DatasetError(f"CIFAR file {path} does not exist; --data-root must hold the extracted archive") from None
    except Exception as exc:  # a truncated or foreign file
        raise DatasetError(f"cannot read CIFAR file {path}: {exc}") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


class _Cifar(ClassificationDataset):
    variant = "cifar10"

    def __init__(self, root: str | Path, split: str = "train", val_size: int = 5000):
        if split not in SPLITS:
            raise DatasetError(f"the {self.variant} files make no split '{split}'; valid splits: {', '.join(SPLITS)}")
        lay = LAYOUTS[self.variant]
        root = Path(root).expanduser()
        folder = root / lay["folder"] if (root / lay["folder"]).is_dir() else root
        if not (folder / lay["meta"]).exists():
            raise DatasetError(f"{folder} is not an extracted {self.variant} archive (no {lay['meta']}); point "
                               f"--data-root at {lay['folder']} or its parent")
        names = _read_pickle(folder / lay["meta"])[lay["names"]]
        self.class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        part = "test" if split == "test" else "train"
        images, labels = [], []
        for fname in lay[part]:
            d = _read_pickle(folder / fname)
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DatasetError(f"CIFAR file {folder / fname} holds data of shape {data.shape}, expected N x 3072")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += [int(v) for v in d[lay["labels"]]]
        self._images = np.ascontiguousarray(np.concatenate(images))
        n = len(labels)
        idx = range(n)
        if part == "train":
            if not 0 <= val_size < n:
                raise DatasetError(f"-o val_size must be in 0..{n - 1} (the training images held out for val), got "
                                   f"{val_size}")
            cut = n - int(val_size)
            idx = {"train": range(cut), "val": range(cut, n), "trainval": range(n)}[split]
        refs = [ClassRef(id=f"{part}-{i:05d}", label=labels[i]) for i in idx]
        self._row = {f"{part}-{i:05d}": i for i in idx}
        super().__init__(refs, split, root)

    def read_image(self, ref: ClassRef) -> np.ndarray:
        return self._images[self._row[ref.id]].copy()

    def image_size(self, index: int) -> tuple[int, int]:
        return (32, 32)


@DATASETS.register("cifar10")
class Cifar10(_Cifar):
    variant = "cifar10"


@DATASETS.register("cifar100")
class Cifar100(_Cifar):
    variant = "cifar100"
