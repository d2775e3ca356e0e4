"""The training input pipeline, measured whole: decode, augment, the cached maps read and warped,
collate; samples/s through the DataLoader that `train-student` builds.

    python benchmarks/training_loader.py [--sets synthetic,voc,cityscapes] [--workers 0,1] [--epochs 3]

For each data set it builds a teacher cache with a randomly initialised `demo_teacher` (top-4
logits + tail, and stage3 features and attention that `kl` does not read), then times, through
the trainers' own `training_loader` and default augmentation:

* **CE only**: the supervised pipeline (image and label, no targets), as `train-teacher` loads;
* **KL, stream**: `train-student --method kl` reading whole shards (`--cache-read stream`);
* **KL, random**: the same, sample by sample (`--cache-read random`);

with each of ``--workers`` DataLoader workers, and the stream again on a copy of the store in
fsspec's `memory://` file system (an object store without the network). Data sets: the
built-in synthetic one, and folders of JPEG images with PNG masks written at VOC (500x375) and
Cityscapes (2048x1024) sizes. The first epoch is warm-up; the steady epochs are reported as
samples/s, samples/s per loading core (the main process with 0 workers, else the workers) and
the ratio to CE only. A second table gives one sample's cost, read in the main process: the
image alone (decode + augment) against image + cached targets (read + warp). Writes
benchmarks/results/training-loader-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch
from PIL import Image

from kdcache.core.checkpoint import save_checkpoint
from kdcache.core.runs import device_name
from kdcache.models import build_model
from kdcache.pipeline.transforms import Preprocess
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store
from kdcache.train.trainer import TrainConfig, Trainer

SIZES = {"voc": (375, 500), "cityscapes": (1024, 2048)}
COUNTS = {"synthetic": 384, "voc": 96, "cityscapes": 24}
CROPS = {"synthetic": None, "voc": [320, 320], "cityscapes": [512, 1024]}
NUM_CLASSES = 11


def write_folder(root: Path, size: tuple[int, int], n: int) -> None:
    """``n`` training and 2 validation JPEGs of ``size`` with blocky PNG masks."""
    rng = np.random.default_rng(0)
    h, w = size
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(NUM_CLASSES)) + "\n")
    for split, count in (("train", n), ("val", 2)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            blocks = rng.integers(0, NUM_CLASSES, size=(8, 8), dtype=np.uint8)
            mask = np.kron(blocks, np.ones((h // 8 + 1, w // 8 + 1), np.uint8))[:h, :w]
            noise = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            image = (mask[..., None] * 20 + noise).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{split}_{i:04d}.jpg", quality=90)
            Image.fromarray(mask).save(root / split / "masks" / f"{split}_{i:04d}.png")


def data_options(name: str, root: Path) -> dict:
    if name == "synthetic":
        return {"dataset": "synthetic", "dataset_options": {}, "limit": COUNTS[name]}
    return {"dataset": "folder", "data_root": str(root / name), "dataset_options": {}, "crop": CROPS[name]}


def build_cache(name: str, root: Path, teacher: Path) -> Path:
    opts = data_options(name, root)
    out = root / f"{name}.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset=opts["dataset"],
                                         data_root=opts.get("data_root"), dataset_options=opts["dataset_options"],
                                         limit=opts.get("limit"), topk=4, features=("stage3",), attention=True,
                                         device="cpu", workers=0),
                        show_progress=False)
    return out


def to_memory(store: Path, name: str) -> str:
    fs = fsspec.filesystem("memory")
    dest = f"/bench-{os.getpid()}/{name}.zarr"
    fs.put(str(store), dest, recursive=True)
    return f"memory://{dest}"


def make_trainer(kind: str, name: str, root: Path, store: str, workers: int, out: Path):
    opts = data_options(name, root)
    common = dict(device="cpu", workers=workers, batch_size=8, out=str(out), crop=opts.get("crop"))
    if kind == "CE only":
        cfg = TrainConfig(model="demo_student", dataset=opts["dataset"], data_root=opts.get("data_root"),
                          dataset_options=opts["dataset_options"], limit=opts.get("limit"), **common)
        return Trainer(cfg, show_progress=False)
    read = "random" if "random" in kind else "stream"
    cfg = config_from_store(store, methods=[{"name": "kl"}], cache_read=read, limit=opts.get("limit"),
                            **{k: v for k, v in common.items() if v is not None})
    return StudentTrainer(cfg, show_progress=False)


def epoch_rates(trainer, epochs: int) -> tuple[list[float], int]:
    train_ds, val_ds = trainer.build_datasets()
    batches, _ = trainer.build_batches(train_ds, val_ds)
    for i in range(len(train_ds)):
        # the synthetic set renders each image once and keeps it in memory; render them here, in
        # the process the workers are forked from, so no case pays for the rendering (the files
        # of the folder sets are decoded every time, as in training)
        train_ds.load(i)
    rates = []
    for epoch in range(epochs):
        loader = batches.loader(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch["index"]) for batch in loader)
        rates.append(n / (time.perf_counter() - t0))
    return rates, n


def per_sample_ms(trainer, repeats: int = 3) -> float:
    train_ds, val_ds = trainer.build_datasets()
    pipe = trainer.build_batches(train_ds, val_ds)[0].pipeline
    pipe.set_epoch(0)
    n = min(len(pipe), 24)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            pipe[i]
        times.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="synthetic,voc,cityscapes")
    ap.add_argument("--workers", default="0,1", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per case; the first is warm-up")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    sets = args.sets.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # the loader's own work; the model is not run here

    rows, cost_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher = save_checkpoint(root / "teacher.pt", build_model("demo_teacher", NUM_CLASSES),
                                  config={"model": "demo_teacher", "num_classes": NUM_CLASSES,
                                          "preprocess": Preprocess().to_dict()})
        for name in sets:
            if name in SIZES:
                write_folder(root / name, SIZES[name], COUNTS[name])
            t0 = time.perf_counter()
            store = build_cache(name, root, teacher)
            print(f"{name}: cache built in {time.perf_counter() - t0:.1f} s")
            remote = to_memory(store, name)
            cases = [("CE only", str(store)), ("KL, stream", str(store)), ("KL, random", str(store)),
                     ("KL, stream, memory://", remote)]
            for workers in worker_counts:
                results = {}
                for kind, where in cases:
                    if where.startswith("memory://") and workers > 0:
                        continue  # forked workers would read a copy of the in-process file system
                    tr = make_trainer(kind, name, root, where, workers, root / "run")
                    rates, n = epoch_rates(tr, args.epochs)
                    results[kind] = statistics.median(rates[1:] or rates)
                    print(f"{name} workers={workers} {kind}: {results[kind]:.1f} samples/s ({n} per epoch)")
                base = results["CE only"]
                for kind, rate in results.items():
                    cores = max(1, workers)
                    rows.append(f"| {name} | {workers} | {kind} | {rate:.1f} | {rate / cores:.1f} | "
                                f"{rate / base:.2f} |")
            ce = per_sample_ms(make_trainer("CE only", name, root, str(store), 0, root / "run"))
            kd = per_sample_ms(make_trainer("KL, random", name, root, str(store), 0, root / "run"))
            cost_rows.append(f"| {name} | {ce:.2f} | {kd:.2f} | {kd - ce:.2f} | {(kd - ce) / ce:.0%} |")

    lines = [
        "# Training input pipeline: samples/s with and without cached targets\n",
        f"Machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} cores (noisy: shared, CPU steal seen). "
        "Batch 8, the trainers' default augmentation (random scale 0.75-1.25, crop, flip), demo_teacher cache with "
        f"top-4 + tail and stage3 features/attention (not read by `kl`). Sets: synthetic ({COUNTS['synthetic']} "
        f"samples, native size), VOC-size JPEGs ({COUNTS['voc']} at 500x375, crop 320x320), Cityscapes-size JPEGs "
        f"({COUNTS['cityscapes']} at 2048x1024, crop 512x1024). Median of the steady epochs ({args.epochs - 1} after "
        "one warm-up), all cases of a set measured one after another in one run. "
        "Made by `python benchmarks/training_loader.py`.\n",
        "| data | workers | loader | samples/s | per loading core | vs CE only |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "One sample in the main process (median ms over 3 passes of up to 24 samples): the image alone "
        "(decode, augment) against the image plus its cached `kl` targets read sample by sample and warped.\n",
        "| data | image alone ms | image + targets ms | targets ms | targets / image |",
        "|---|---|---|---|---|",
        *cost_rows,
    ]
    path = Path(args.results) / "training-loader-cpu.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
