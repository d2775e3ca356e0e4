"""Per-crop fidelity: how far each cache form's target for a training crop is from the teacher run
on exactly that crop, for each augmentation alone and for the training mix (issue 27 §1).

    python benchmarks/crop_fidelity.py --teacher runs/teacher --cls-teacher runs/cls-teacher [--images 100]

Segmentation (the synthetic road scenes' val split, a `demo_teacher` run; maps at its stride 4) —
augmentations, each drawn per image from a fixed seed:

* ``flip``: the whole image mirrored;
* ``scale``: a random scale in 0.75–1.25, the image-size window at a random offset (no flip);
* ``offset``: scale 1, a window 8 pixels smaller at a random offset of 0–8 pixels (off the
  stride-4 grid whenever the offset is not a multiple of 4);
* ``training mix``: what ``train-student`` draws by default (scale 0.75–1.25, the image-size
  crop, a flip with p = 0.5).

Forms: the dense cache (k = C: no top-k error, the geometry alone: the whole image's map taken
through the crop by nearest cell, as training does), the default top-4 + tail cache (the same
plus the top-k), both of these read with ``--target-resample bilinear`` (the rebuilt logits
interpolated at the crop's exact points, then top-k + tail again), the flip-averaged dense cache,
the pyramids (``--store-flips``: the teacher on the mirrored image too, which a flipped crop takes;
``--store-scales 0.75,1.25``: the teacher on the whole image at those scales as well, each crop
taking the level nearest its scale; both, read by nearest cell and bilinearly),
and the dense and top-4 + tail schedules
(``--schedule-epochs``, the training mix only: the teacher on the crop itself, which the student
replays). Each form's bytes on disk per image (a schedule's per image and epoch) stand beside it:
fidelity per byte.

Classification (the built-in shapes' val split, a `demo_cls_teacher` run): ``flip``;
``random-resized crop`` (0.5–1 of the area, aspect 3/4–4/3, no flip); the training mix (that
crop and a flip with p = 0.5). Forms: the whole image's logits (the default cache: the same target
for every crop), ReLabel's label map pooled over the crop (the class map of the image, and the finer
one of the image at twice its size: ``--label-map --tta-scales 2 --grid-stride`` half the map's
stride, as ReLabel runs its teacher on a larger input), and the schedule, dense and top-5 + tail
(training mix).

For every valid cell of every crop: KL(live ‖ cached) of the softmax at T = 1 and T = 4 (the
seeds' KD temperature; T² · KL, as the loss weighs it) and whether the top-1 classes agree. The
live teacher and the cached targets are compared in float64. Writes
benchmarks/results/crop-fidelity.md (float64 throughout, so the numbers do not depend on the
machine).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdcache.core.topk import implied_log_probs
from kdcache.models.loading import open_weights
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.transforms import (
    Augment,
    apply_geometry,
    sample_geometry,
    sample_resized_crop,
)
from kdcache.pipeline.warp import level_targets, pool_targets, view_targets, warp_targets
from kdcache.store import CacheStore, to_tensors
from kdcache.store.location import size_of
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

SEED = 2027
#: the caches also read with ``--target-resample bilinear``, and the name of that form
BILINEAR = {"dense cache (k = C)": "dense cache, bilinear", "top-4 + tail cache": "top-4 + tail cache, bilinear",
            "top-4 + tail, scales 0.75/1/1.25 + flips": "top-4 + tail, scales 0.75/1/1.25 + flips, bilinear"}
#: the pyramid forms (``--store-scales``, ``--store-flips``): name -> (k, build options)
PYRAMIDS = {
    "dense, stored flips": (11, {"store_flips": True}),
    "dense, scales 0.75/1/1.25 + flips": (11, {"store_scales": (0.75, 1.25), "store_flips": True}),
    "top-4 + tail, stored flips": (4, {"store_flips": True}),
    "top-4 + tail, scales 0.75/1/1.25": (4, {"store_scales": (0.75, 1.25)}),
    "top-4 + tail, scales 0.75/1/1.25 + flips": (4, {"store_scales": (0.75, 1.25), "store_flips": True}),
}


def cached_targets(store: CacheStore, i: int, g: Geometry, resample: str = "nearest") -> dict:
    """What a student reads for sample ``i``'s crop ``g`` from ``store`` (a pyramid: the nearest level)."""
    schema = store.schema
    cached = to_tensors(store.read(i, groups=schema.groups_for(["logits"])))
    if schema.levels:
        return level_targets(cached, g, schema.strides, schema.levels, resample, schema.num_classes)
    return warp_targets(cached, g, schema.strides, resample, schema.num_classes)


def seg_augmentations(size: tuple[int, int]) -> dict:
    H, W = size

    def flip(rng):
        return Geometry(size, 1.0, 0, 0, size, True)

    def scale(rng):
        return sample_geometry(rng, size, Augment(scale=(0.75, 1.25), crop=size, hflip=False))

    def offset(rng):
        return Geometry(size, 1.0, int(rng.integers(0, 9)), int(rng.integers(0, 9)), (H - 8, W - 8), False)

    def mix(rng):
        return sample_geometry(rng, size, Augment(scale=(0.75, 1.25), crop=size, hflip=True))

    return {"flip": flip, "scale": scale, "offset": offset, "training mix": mix}


def cls_augmentations(size: tuple[int, int]) -> dict:
    def flip(rng):
        return Geometry(size, 1.0, 0, 0, size, True)

    def rrc(rng):
        return sample_resized_crop(rng, size, size, (0.5, 1.0), hflip=False)

    def mix(rng):
        return sample_resized_crop(rng, size, size, (0.5, 1.0), hflip=True)

    return {"flip": flip, "random-resized crop": rrc, "training mix": mix}


def compare(live: torch.Tensor, target: dict, C: int) -> dict:
    """live logits [C, h, w] against a target (``kd/values``, ``kd/indices``, ``kd/tail``,
    ``kd/ignore``) on the same cells: sums of KL at T = 1 and T = 4 (T² · KL) and top-1 agreements."""
    values, indices = target["kd/values"][None], target["kd/indices"][None]
    tail = target.get("kd/tail")
    tail = tail[None] if tail is not None else None
    valid = ~target["kd/ignore"].bool()
    out = {"cells": int(valid.sum())}
    for T in (1.0, 4.0):
        logq = implied_log_probs(values, indices, tail, C, temperature=T)[0]
        logp = torch.log_softmax(live.double() / T, dim=0)
        kl = (logp.exp() * (logp - logq)).sum(0) * T * T
        out[f"kl{T:g}"] = float(kl[valid].sum())
    top_cached = torch.gather(indices[0].long(), 0, values[0].double().argmax(0, keepdim=True))[0]
    agree = live.argmax(0) == top_cached
    out["agree"] = int(agree[valid].sum())
    return out


def add(acc: dict, key: tuple, r: dict) -> None:
    a = acc.setdefault(key, {"cells": 0, "kl1": 0.0, "kl4": 0.0, "agree": 0})
    for k in a:
        a[k] += r[k]


def add_schedules(acc: dict, model, x: torch.Tensor, i: int, C: int, stores: dict) -> None:
    """Each schedule store's target for sample ``i``'s stored crop (view 0) against the teacher
    run on that crop (a classifier's logits as a 1 x 1 map)."""
    for name, store in stores.items():
        item = to_tensors(store.read(i, groups=["views/logits", "views/params"], view=0))
        g = Geometry.unpack(tuple(x.shape[-2:]), item["views/params"][0].numpy())
        target = view_targets(item, 0)
        live = model(apply_geometry(x, g, kind="image")[None].double()).logits[0]
        add(acc, ("training mix", name), compare(live.reshape(C, *target["kd/values"].shape[-2:]), target, C))


def build(weights: str, out: Path, **kw) -> CacheStore:
    build_teacher_cache(CacheBuildConfig(weights=weights, out=str(out), device="cpu", workers=0, **kw),
                        show_progress=False)
    return CacheStore(out)


@torch.inference_mode()
def segmentation(teacher: str, images: int, tmp: Path) -> dict:
    w = open_weights(teacher)
    common = dict(dataset="synthetic", split="val", limit=images)
    forms = {"dense cache (k = C)": build(teacher, tmp / "dense.zarr", topk=11, **common),
             "top-4 + tail cache": build(teacher, tmp / "k4.zarr", topk=4, **common),
             "flip-averaged dense cache": build(teacher, tmp / "fa.zarr", topk=11, flip_average=True, **common)}
    for j, (name, (k, opts)) in enumerate(PYRAMIDS.items()):
        forms[name] = build(teacher, tmp / f"pyramid{j}.zarr", topk=k, **opts, **common)
    schedule = build(teacher, tmp / "sched.zarr", topk=11, schedule_epochs=1, **common)
    schedule4 = build(teacher, tmp / "sched4.zarr", topk=4, schedule_epochs=1, **common)
    sizes = {name: size_of(store.path) / images for name, store in forms.items()}
    sizes.update({BILINEAR[name]: sizes[name] for name in BILINEAR})
    sizes["dense schedule (the crop itself)"] = size_of(schedule.path) / images
    sizes["top-4 + tail schedule (the crop itself)"] = size_of(schedule4.path) / images
    ds = schedule.dataset()
    model = w.build(num_classes=ds.num_classes).double().eval()
    pre = w.preprocess
    C = ds.num_classes
    acc: dict = {}
    for i in range(len(ds)):
        x = pre.image_to_tensor(ds.load(i)[0])
        size = tuple(x.shape[-2:])
        for a, (aug_name, draw) in enumerate(seg_augmentations(size).items()):
            g = draw(np.random.default_rng((SEED, a, i)))
            live = model(apply_geometry(x, g, kind="image")[None].double()).logits[0]
            for name, store in forms.items():
                add(acc, (aug_name, name), compare(live, cached_targets(store, i, g), C))
                if name in BILINEAR:  # the same cache, sampled at the crop's exact points
                    add(acc, (aug_name, BILINEAR[name]), compare(live, cached_targets(store, i, g, "bilinear"), C))
        # the schedule: its own training-mix crop, the teacher's outputs on it
        add_schedules(acc, model, x, i, C, {"dense schedule (the crop itself)": schedule,
                                            "top-4 + tail schedule (the crop itself)": schedule4})
    return acc, sizes


@torch.inference_mode()
def classification(teacher: str, images: int, tmp: Path) -> dict:
    w = open_weights(teacher)
    common = dict(dataset="shapes", split="val", limit=images)
    logits = build(teacher, tmp / "cls.zarr", topk=10, **common)
    lmap = build(teacher, tmp / "lmap.zarr", topk=10, label_map=True, **common)
    # ReLabel's finer map: the class map of the image at twice the size, on a grid of half the stride
    stride = lmap.schema.strides["logits"][0]
    fine = build(teacher, tmp / "lmap2.zarr", topk=10, label_map=True, tta_scales=(2.0,), grid_stride=stride / 2,
                 **common)
    fine_name = f"label map of the 2x input ({'x'.join(map(str, fine.schema.map_size))} cells) pooled over the crop"
    schedule = build(teacher, tmp / "csched.zarr", topk=10, schedule_epochs=1, crop_area=(0.5, 1.0), **common)
    schedule5 = build(teacher, tmp / "csched5.zarr", topk=5, schedule_epochs=1, crop_area=(0.5, 1.0), **common)
    sizes = {"whole-image logits (default cache)": size_of(logits.path) / images,
             "label map pooled over the crop": size_of(lmap.path) / images,
             fine_name: size_of(fine.path) / images,
             "schedule (the crop itself)": size_of(schedule.path) / images,
             "top-5 + tail schedule (the crop itself)": size_of(schedule5.path) / images}
    ds = logits.dataset()
    model = w.build(num_classes=ds.num_classes).double().eval()
    pre = w.preprocess
    C = ds.num_classes
    acc: dict = {}
    for i in range(len(ds)):
        x = pre.image_to_tensor(ds.load(i)[0])
        size = tuple(x.shape[-2:])
        whole = to_tensors(logits.read(i, groups=["logits"]))
        whole_target = {"kd/values": whole["logits/values"], "kd/indices": whole["logits/indices"],
                        "kd/ignore": torch.zeros(1, 1, dtype=torch.bool)}
        cmap = to_tensors(lmap.read(i, groups=["logits"]))
        fmap = to_tensors(fine.read(i, groups=["logits"]))
        for a, (aug_name, draw) in enumerate(cls_augmentations(size).items()):
            g = draw(np.random.default_rng((SEED, a, i)))
            live = model(apply_geometry(x, g, kind="image")[None].double()).logits.reshape(C, 1, 1)
            add(acc, (aug_name, "whole-image logits (default cache)"), compare(live, whole_target, C))
            add(acc, (aug_name, "label map pooled over the crop"), compare(live, pool_targets(cmap, g, C), C))
            add(acc, (aug_name, fine_name), compare(live, pool_targets(fmap, g, C), C))
        add_schedules(acc, model, x, i, C, {"schedule (the crop itself)": schedule,
                                            "top-5 + tail schedule (the crop itself)": schedule5})
    return acc, sizes


def passes(form: str) -> str:
    """Teacher forwards per image that a form's build runs."""
    if "schedule" in form:
        return "1 per epoch"
    if "2x input" in form:
        return "1 (4x the pixels)"
    n = (3 if "scales" in form else 1) * (2 if ("flips" in form or "flip-averaged" in form) else 1)
    return str(n)


def summary(acc: dict, sizes: dict) -> list[str]:
    """The training mix alone, each form with its build's teacher passes and bytes: fidelity per byte."""
    lines = ["| cache form (training mix) | KL at T = 1 (nats/cell) | T² · KL at T = 4 | top-1 agreement % | "
             "teacher passes per image | bytes on disk per image (schedule: per epoch) |", "|---|---|---|---|---|---|"]
    for (aug, form), a in acc.items():
        if aug == "training mix":
            n = max(a["cells"], 1)
            lines.append(f"| {form} | {a['kl1'] / n:.2e} | {a['kl4'] / n:.2e} | {100 * a['agree'] / n:.2f} | "
                         f"{passes(form)} | {sizes[form]:,.0f} |")
    return lines


def table(acc: dict, sizes: dict) -> list[str]:
    lines = ["| augmentation | cache form | KL at T = 1 (nats/cell) | T² · KL at T = 4 | top-1 agreement % | cells | "
             "bytes on disk per image (schedule: per epoch) |",
             "|---|---|---|---|---|---|---|"]
    for (aug, form), a in acc.items():
        n = max(a["cells"], 1)
        lines.append(f"| {aug} | {form} | {a['kl1'] / n:.2e} | {a['kl4'] / n:.2e} | {100 * a['agree'] / n:.2f} | "
                     f"{a['cells']} | {sizes[form]:,.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--cls-teacher", default="runs/cls-teacher")
    ap.add_argument("--images", type=int, default=100, help="val images of each task")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-crop-fidelity-"))
    try:
        seg, seg_sizes = segmentation(args.teacher, args.images, tmp)
        cls, cls_sizes = classification(args.cls_teacher, args.images, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "# Per-crop fidelity: each cache form's target against the teacher on the crop itself\n",
        f"Teachers `{args.teacher}` (segmentation, synthetic val, {args.images} images) and `{args.cls_teacher}` "
        f"(classification, shapes val, {args.images} images); every augmentation drawn per image from seed {SEED}. "
        "KL(live ‖ cached) per valid cell (T² · KL at T = 4, as the loss weighs it) and the share of cells whose "
        "top-1 classes agree; float64 throughout. Made by `python benchmarks/crop_fidelity.py`.\n",
        "## The training mix: fidelity per byte\n", "Segmentation:\n", *summary(seg, seg_sizes), "",
        "Classification:\n", *summary(cls, cls_sizes), "",
        "## Segmentation, each augmentation\n", *table(seg, seg_sizes), "",
        "## Classification, each augmentation\n", *table(cls, cls_sizes),
    ]
    out = Path(args.results) / "crop-fidelity.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
