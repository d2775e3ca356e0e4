"""``export-pseudo-labels``: the teacher's labels from a cache, written as files any segmentation
tool trains on.

For every sample of a finished cache: the teacher's logits are rebuilt at the map's resolution
(the top k stored; every class outside a position's top k gets τ − log(C − k), an equal share of
the tail's mass, :func:`~kdcache.core.topk.dense_logits`), bilinearly upsampled to
the image's own size (as a model's prediction is), and only then turned into a class (argmax)
and a confidence (its softmax probability). Class ids are never interpolated. A pixel whose
confidence is below the threshold — the global ``threshold``, or with ``class_balanced=p`` the
lower of it and its class's CBST threshold (see :mod:`kdcache.methods.pseudo`), set in a first
pass over the labels at the images' own size so each class keeps its best share of the pixels
written — gets 255.

Written, in the layout ``--dataset folder --data-root OUT`` reads back (``all`` split)::

    OUT/classes.txt            the cache's class names, one per line
    OUT/images/<id>.<ext>      the image (the original file copied, or a PNG of a generated one)
    OUT/masks/<id>.png         palette PNG of class ids at the image's size, 255 = not confident
    OUT/confidence/<id>.png    with ``confidence_png``: 16-bit PNG, round(65535 × confidence)
    OUT/pseudo_labels.json     the thresholds and, per class, the share of its pixels kept

An id with folders (``seq01/000123`` of the ``images`` data set) becomes the file name
``seq01__000123``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdcache.core.errors import KDCacheError
from kdcache.core.options import check_number
from kdcache.core.outputs import OutputFolder
from kdcache.core.progress import progress_bar
from kdcache.core.topk import BINS, add_to_histogram, dense_logits, thresholds_from_histogram
from kdcache.data.base import IGNORE_INDEX
from kdcache.store import CacheStore, to_tensors

#: the kind of output folder ``export-pseudo-labels`` writes (:mod:`kdcache.core.outputs`), and its report
PSEUDO_LABELS = "pseudo-labels"
REPORT = "pseudo_labels.json"
#: the bounds of the export's thresholds: a probability, and a share of each class's pixels kept
BOUNDS = {"threshold": "[0, 1]", "class_balanced": "(0, 1]"}


def file_stem(sample_id: str) -> str:
    """A flat file name for a sample id (folders joined with ``__``)."""
    return sample_id.replace("/", "__")


def teacher_labels(item: dict, num_classes: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class ids [H, W] int64, confidence [H, W] float32) at ``size`` from one read sample's
    cached logits: rebuilt dense, upsampled as logits, then argmax and softmax."""
    t = to_tensors(dict(item))
    tail = t.get("logits/tail")
    logits = dense_logits(t["logits/values"][None], t["logits/indices"][None], None if tail is None else tail[None],
                          num_classes)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
    conf, labels = logits.softmax(0).max(0)
    return labels, conf


def export_pseudo_labels(cache: str, out: str | Path, *, threshold: float = 0.7, class_balanced: float | None = None,
                         confidence_png: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    check_number(threshold, "--confidence-threshold", BOUNDS["threshold"])
    check_number(class_balanced, "--class-balanced", BOUNDS["class_balanced"])  # the share of each class's pixels kept
    found = OutputFolder.check(out, PSEUDO_LABELS)  # a folder of anyone else's: refused before any work
    if found is not None and found.files and not overwrite:
        raise KDCacheError(f"{out} holds an earlier export of pseudo labels; give --overwrite to replace it (only "
                           "the files that export wrote), or a new or empty folder")
    store = CacheStore(cache)
    if store.schema.classification:
        raise KDCacheError(f"teacher cache {cache} holds a classifier's targets; export-pseudo-labels writes "
                           "segmentation masks (train a student from the cache itself)")
    done = store.done()
    if not done.all():
        raise KDCacheError(f"teacher cache {cache} is not finished ({int(done.sum())} of {len(done)} samples written); "
                           "rerun the same build-teacher-cache command to complete it")
    ds = store.dataset()
    rows = store.join(ds)
    C = store.num_classes
    t_class = None
    if class_balanced is not None:  # a first pass: each class's confidences at the images' own size
        hist = np.zeros((C, BINS), dtype=np.int64)
        with progress_bar("class-balanced thresholds", total=len(ds), enabled=show_progress, unit="image") as bar:
            for j, r in enumerate(rows):
                labels, conf = teacher_labels(store.read(int(r), groups={"logits"}), C, ds.image_size(j))
                add_to_histogram(hist, conf, labels)
                bar.advance(1)
        t_class = np.minimum(thresholds_from_histogram(hist, class_balanced), threshold)
    cut = torch.as_tensor(t_class, dtype=torch.float32) if t_class is not None else None

    folder = OutputFolder.claim(out, PSEUDO_LABELS)
    out = folder.path
    names = {j: _file_names(ref, confidence_png) for j, ref in enumerate(ds.refs)}
    written = ["classes.txt", REPORT, *(n for files in names.values() for n in files.values())]
    folder.paths(written)  # refused here if a file of anyone else's stands where one goes
    folder.remove(keep=written)  # the earlier export's other files (--overwrite), never anyone else's
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in store.class_names))
    palette = np.zeros((256, 3), np.uint8)
    palette[:C] = np.asarray(ds.palette)[:C]
    predicted = np.zeros(C, np.int64)
    kept = np.zeros(C, np.int64)
    with progress_bar("export pseudo labels", total=len(ds), enabled=show_progress, unit="image") as bar:
        for j, r in enumerate(rows):
            ref, files = ds.refs[j], names[j]
            labels, conf = teacher_labels(store.read(int(r), groups={"logits"}), C, ds.image_size(j))
            thr = cut[labels] if cut is not None else threshold
            mask = labels.masked_fill(conf < thr, IGNORE_INDEX).numpy().astype(np.uint8)
            predicted += np.bincount(labels.numpy().ravel(), minlength=C)
            kept += np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=C)
            im = Image.fromarray(mask, mode="P")
            im.putpalette(palette.ravel().tolist())
            im.save(out / files["mask"])
            if confidence_png:
                q = np.round(conf.numpy().astype(np.float64) * 65535).astype(np.uint16)
                Image.fromarray(q).save(out / files["confidence"])
            if ref.image is not None:
                shutil.copyfile(ref.image, out / files["image"])
            else:
                Image.fromarray(ds.load(j)[0]).save(out / files["image"])
            bar.advance(1)
    share = {n: (float(kept[c] / predicted[c]) if predicted[c] else None) for c, n in enumerate(store.class_names)}
    report = {
        "cache": str(cache), "out": str(out), "samples": len(ds), "threshold": threshold,
        "class_balanced": class_balanced,
        "class_thresholds": None if t_class is None else dict(zip(store.class_names, map(float, t_class))),
        "pixels_kept": float(kept.sum() / max(predicted.sum(), 1)),
        "kept_share_per_class": share,
        "pixels_per_class": dict(zip(store.class_names, map(int, predicted))),
        "top_k": store.k, "num_classes": C,
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _file_names(ref, confidence_png: bool) -> dict[str, str]:
    """The files of one sample in the export (relative to its folder): its mask, its image (a copy
    of the file, or a PNG for an image made in memory) and its confidence map."""
    stem = file_stem(ref.id)
    image = f"images/{stem}{Path(ref.image).suffix.lower() if ref.image is not None else '.png'}"
    return {"mask": f"masks/{stem}.png", "image": image,
            **({"confidence": f"confidence/{stem}.png"} if confidence_png else {})}


def kept_table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(class, pixels the teacher gives it, % of them kept) for printing."""
    rows = []
    for name, s in report["kept_share_per_class"].items():
        n = report["pixels_per_class"][name]
        rows.append((name, str(n), "—" if s is None or math.isnan(s) else f"{100 * s:.1f}"))
    return rows
