"""Random access (`--cache-read random`, the unlabelled pools) read item by item against a batch at once.

    python benchmarks/random_access_batches.py [--cache /tmp/et/cache.zarr] [--rounds 15]

The DataLoader hands `KDPipeline.__getitems__` a batch's indices, and `CacheStore.read_rows`
reads them with one block read per store shard the batch touches; before, each sample was read
alone (`KDPipeline.__getitem__`: its shard file opened and its chunks decoded per sample and
array, a packed chunk once for each of its samples). Both run here in one process, through the
loader `train-student --cache-read random --method kl` builds (the item-by-item one with its
`__getitems__` turned off, which the DataLoader then skips), beside `--method none` (the same
pipeline, no targets read), in rounds that take the three in turn; one loader epoch each, no
training steps. Two caches of a randomly initialised `demo_teacher` (top-4 + tail, stage3
features and attention, which `kl` does not read): ``--cache`` (built over 160 synthetic
images when it does not exist: one shard of 256), and 320 images at 32 samples a shard, where
a batch of 8 falls in about 7 shards. Reports the median loader epoch and, per round, what
reading the targets adds to `none`'s epoch. Writes benchmarks/results/random-access-batches-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdcache.core.runs import checkout_commit, device_name
from kdcache.store import CacheStore
from kdcache.train.student import StudentTrainer, config_from_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_time import build_cache  # noqa: E402  (the cache `kdcache demo` builds)

VARIANTS = ("none", "kl, item by item", "kl, batch at once")


def loader_epochs(cache: str, limit: int, tmp: Path):
    """Per variant, a function that runs one more loader epoch and returns its seconds."""
    runs = {}
    for j, v in enumerate(VARIANTS):
        method = v.split(",")[0]
        tr = StudentTrainer(config_from_store(cache, methods=[{"name": method}], cache_read="random", model="demo_student",
                                              epochs=10_000, limit=limit, workers=0, device="cpu", batch_size=8,
                                              out=str(tmp / f"run{j}")), overwrite=True, show_progress=False)
        batches = tr.prepare().batches
        if v == "kl, item by item":
            batches.pipeline.__getitems__ = None  # the DataLoader's fetcher then asks item by item

        def epoch(b=batches, count=iter(range(10_000))):
            t = time.perf_counter()
            for _ in b.loader(next(count)):
                pass
            return time.perf_counter() - t

        runs[v] = epoch
    return runs


def measure(cache: str, limit: int, rounds: int, tmp: Path) -> dict[str, list[float]]:
    runs = loader_epochs(cache, limit, tmp)
    for v in VARIANTS:
        runs[v]()  # warm-up
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            secs[v].append(runs[v]())
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/et/cache.zarr")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--small-limit", type=int, default=160, help="images of --cache read (its first N)")
    ap.add_argument("--many", type=int, default=320, help="images of the cache of many shards")
    ap.add_argument("--per-shard", type=int, default=32, help="its samples a shard")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = Path(args.cache)
        if not small.exists():
            small = build_cache(tmp / "small.zarr", args.small_limit)
        many = build_cache(tmp / "many.zarr", args.many, samples_per_shard=args.per_shard)  # the same build, sharded
        for k, (cache, limit) in enumerate(((str(small), args.small_limit), (str(many), args.many))):
            store = CacheStore(cache)
            shards = -(-min(limit, store.num_samples) // store.samples_per_shard)
            label = f"{limit} images, {shards} shard{'s' if shards > 1 else ''} of {store.samples_per_shard}"
            secs = measure(cache, limit, args.rounds, tmp / f"runs{k}")
            added = {v: [1e3 * (a - b) for a, b in zip(secs[v], secs["none"])] for v in VARIANTS[1:]}
            rows.append((label, {v: 1e3 * statistics.median(secs[v]) for v in VARIANTS},
                         {v: statistics.median(x) for v, x in added.items()},
                         {v: statistics.quantiles(x, n=4) if len(x) > 1 else x * 3 for v, x in added.items()}))
            print(label, rows[-1][1], rows[-1][2])
    lines = [
        "# Random access: a batch read at once against item by item\n",
        f"Machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} cores. Commit {checkout_commit()}. "
        f"The loader `train-student --cache-read random` builds (batch 8, 0 workers, `demo_student`'s default "
        f"augmentation), one epoch each in turn, {args.rounds} rounds after a warm-up epoch; no training steps. "
        "`none`: the same pipeline reading no targets; `kl`: top-4 + tail read and warped, item by item "
        "(`KDPipeline.__getitem__`, the DataLoader's fetcher per sample) or the batch at once "
        "(`KDPipeline.__getitems__` → `CacheStore.read_rows`). Made by `python benchmarks/random_access_batches.py`.\n",
        "| cache | none epoch ms | kl item by item ms | kl batch at once ms | targets add, item by item (ms, median; middle half) | targets add, batch at once |",
        "|---|---|---|---|---|---|",
    ]
    for label, med, add, quart in rows:
        lines.append(f"| {label} | {med['none']:.1f} | {med['kl, item by item']:.1f} | {med['kl, batch at once']:.1f} | "
                     f"{add['kl, item by item']:.1f} ({quart['kl, item by item'][0]:.1f}–{quart['kl, item by item'][2]:.1f}) | "
                     f"{add['kl, batch at once']:.1f} ({quart['kl, batch at once'][0]:.1f}–{quart['kl, batch at once'][2]:.1f}) |")
    path = Path(args.results) / "random-access-batches-cpu.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
