"""What a schedule cache costs: its build against the teacher's inference over the same crops, and
its bytes per stored crop (next to a plain cache's per image, and FKD's record per crop).

    python benchmarks/schedule_cost.py --teacher runs/teacher --cls-teacher runs/cls-teacher [--epochs 8]

For each task (segmentation: the synthetic road scenes with a `demo_teacher` run; classification:
the built-in shapes with a `demo_cls_teacher` run), alternately, ``--repeats`` times:

* inference over the crops: every image loaded and preprocessed, its crops of ``--epochs`` epochs
  drawn and cut as the build does (``TeacherInputs``, ``crops_forward``), the teacher run on them
  in batches, waited for; and the same plus the teacher on each whole image (what the build also
  stores);
* ``build_teacher_cache --schedule-epochs E`` into a fresh store (fingerprint, both teacher passes,
  top-k, encoding, writing, done flags).

Target (issue 27): the build <= 1.10x the teacher's inference over the same crops. What the build
does once per image (fingerprint the data, the teacher on the whole image, its quality arrays) is
spread over ``--epochs`` crops, so the ratio falls as E grows: ``schedule-cost-cpu.md`` is E = 8 on
200 images, ``schedule-cost-160-epochs-cpu.md`` the cached-vs-online benchmark's E = 160 on 100
(``--out``). Bytes: the store
on disk over the crops it holds, the views' maps and geometry (``views/``) apart from the rest;
FKD's record for a classification crop (box 4 x fp16, flip, top-5 probabilities and ids as fp16)
is 30 B. Writes benchmarks/results/schedule-cost-<device>.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.core.runs import checkout_commit, device_name, resolve_device
from kdcache.data import build_dataset
from kdcache.data.class_base import is_classification
from kdcache.data.splits import limit
from kdcache.models.loading import open_weights
from kdcache.pipeline.loaders import default_workers, make_loader
from kdcache.pipeline.transforms import training_augment
from kdcache.store.forms.schedule import Schedule, crops_forward
from kdcache.store.schema import CacheSchema
from kdcache.teacher.cache_build import CacheBuildConfig, TeacherInputs, build_teacher_cache

#: FKD's stored record for one crop (Shen & Xing 2022): 4 box coordinates and a flip flag, the
#: top-5 soft label as fp16 probabilities and fp16 class ids (the paper's ImageNet setting)
FKD_BYTES_PER_CROP = 4 * 2 + 2 + 5 * 2 + 5 * 2


@torch.inference_mode()
def inference(cfg: CacheBuildConfig, whole_images: bool) -> float:
    """The teacher over the crops the build stores (and the whole images), nothing written."""
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    ds = limit(build_dataset(cfg.dataset, cfg.split, cfg.data_root, **cfg.dataset_options), cfg.limit)
    weights = open_weights(cfg.weights)
    model = weights.build(num_classes=ds.num_classes, device=device).eval()
    pre = weights.preprocess
    crop = tuple(cfg.crop) if cfg.crop else tuple(pre.image_to_tensor(ds.load(0)[0]).shape[-2:])
    aug = training_augment(is_classification(ds), crop, cfg.scale, cfg.crop_area, cfg.hflip)
    # the schedule form of a store that holds these crops: the build's own view geometries
    form = Schedule(CacheSchema({"views": {"schedule": {
        "epochs": cfg.schedule_epochs, "schedules": cfg.schedules, "first": cfg.first_schedule,
        "augment": aug.to_dict()}}}))
    inputs = TeacherInputs(ds, pre, form)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    loader = make_loader(inputs, cfg.batch_size, workers, collate_fn=list, pin_memory=device.type == "cuda")
    for items in loader:
        x = torch.stack([it["image"] for it in items]).to(device, non_blocking=True)
        if whole_images:
            model(x).logits.float().sum().item()
        logits, _ = crops_forward(model, x, np.stack([it["view_params"] for it in items]), cfg.batch_size)
        logits.float().sum().item()  # wait for the device
    return time.perf_counter() - t0


def store_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the views' arrays, bytes of everything else) on disk."""
    views = sum(f.stat().st_size for f in (path / "views").rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return views, total - views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--cls-teacher", default="runs/cls-teacher")
    ap.add_argument("--epochs", type=int, default=8, help="--schedule-epochs of the measured builds")
    ap.add_argument("--images", type=int, default=200, help="training images of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--out", default=None, help="the results file (default: <results>/schedule-cost-<device>.md)")
    args = ap.parse_args()

    commit = checkout_commit(Path(__file__).parent) or "unknown"
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-schedule-"))
    tasks = {
        "segmentation (synthetic, demo_teacher, k = 4)": dict(weights=args.teacher, dataset="synthetic", topk=4),
        "classification (shapes, demo_cls_teacher, k = 5)": dict(weights=args.cls_teacher, dataset="shapes", topk=5,
                                                                 crop_area=(0.5, 1.0)),
    }
    rows = []
    try:
        for name, opts in tasks.items():
            cfg = CacheBuildConfig(out=str(tmp / "s.zarr"), limit=args.images, schedule_epochs=args.epochs,
                                   batch_size=args.batch_size, device=args.device, **opts)
            inference(cfg, True)  # warm-up
            crops, both, build = [], [], []
            for _ in range(args.repeats):
                crops.append(inference(cfg, False))
                both.append(inference(cfg, True))
                shutil.rmtree(tmp / "s.zarr", ignore_errors=True)
                t0 = time.perf_counter()
                s = build_teacher_cache(cfg, show_progress=False)
                build.append(time.perf_counter() - t0)
            views, rest = store_bytes(tmp / "s.zarr")
            n = s["num_samples"]
            c, cb, b = statistics.median(crops), statistics.median(both), statistics.median(build)
            rows.append((name, n, args.epochs, c, cb, b, views / (n * args.epochs), rest / n))
            print(f"{name}: crops {c:.2f} s, crops + images {cb:.2f} s, build {b:.2f} s, ratio {b / c:.3f} / "
                  f"{b / cb:.3f}; {views / (n * args.epochs):.0f} B per crop", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = device_name(resolve_device(args.device))
    lines = [
        "# What a schedule cache costs: build time and bytes per stored crop\n",
        f"`build-teacher-cache --schedule-epochs {args.epochs}` (one schedule) over the first {args.images} training "
        f"images of each task, batch {args.batch_size}, default loader workers; the median of {args.repeats} "
        "alternating runs each. Inference = load and preprocess every image, draw and cut its crops as the build "
        "does, the teacher on them in batches, waited for (\"+ images\": and on each whole image too, which the "
        "build also stores). Build = the whole `build_teacher_cache` call into a fresh store. Bytes on disk: the "
        "views' arrays (maps and geometry) per stored crop, and the rest (the whole-image maps, ids, hashes, "
        f"quality) per image. FKD's record for a crop is {FKD_BYTES_PER_CROP} B (box, flip, top-5 fp16 "
        f"probabilities and ids). Machine: {dev}. Teachers: `{args.teacher}`, `{args.cls_teacher}`. Made by "
        f"`python benchmarks/schedule_cost.py --epochs {args.epochs} --images {args.images}` at commit {commit}.\n",
        "| task | images | epochs | inference, crops (s) | inference, crops + images (s) | build (s) | "
        "build / crops | build / (crops + images) | B per stored crop | B per image (the rest) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, e, c, cb, b, per_crop, per_image in rows:
        lines.append(f"| {name} | {n} | {e} | {c:.2f} | {cb:.2f} | {b:.2f} | {b / c:.3f} | {b / cb:.3f} | "
                     f"{per_crop:.0f} | {per_image:.0f} |")
    tag = "cpu" if "cpu" in dev else dev.replace(" ", "-").lower()
    out = Path(args.out) if args.out else Path(args.results) / f"schedule-cost-{tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
