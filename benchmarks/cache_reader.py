"""Reader throughput of a teacher cache: samples/s and MB/s through a DataLoader.

    python benchmarks/cache_reader.py [--samples 2048] [--size 128] [--k 4] [--workers 2]

Writes a store of ``--samples`` samples with ``size``x``size`` top-k maps (values, uint8 ids,
tail; no features) in the default layout, with realistic content: the built-in teacher's
logits on synthetic images (``--teacher RUN`` for a trained one; a randomly initialised
demo_teacher otherwise), upsampled to the map size. Then reads it back for ``--epochs`` epochs:

* streaming: `CacheStream` (shuffled shard order, shuffle buffer) in a DataLoader with
  ``--workers`` workers and batches of ``--batch-size``, the training path;
* random access: `CachedTargets` with a shuffling sampler, the same loader otherwise.

Prints samples/s and MB/s (raw bytes delivered) per codec and writes
benchmarks/results/cache-reader-<device>.md. The first epoch (worker start-up, cold page
cache) is reported apart from the steady ones.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.core.runs import device_name, resolve_device
from kdcache.data import build_dataset
from kdcache.models import build_model
from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import Preprocess
from kdcache.store import CachedTargets, CacheSchema, CacheStore, CacheStream
from kdcache.store.location import size_of
from kdcache.store.writer import ShardWriter, encode_batch, open_for_writing, prepare_store


def teacher_logits(run: str | None, n_images: int, size: int) -> torch.Tensor:
    ds = build_dataset("synthetic", "val")
    if run:
        model = open_weights(run).build(num_classes=ds.num_classes)
    else:
        torch.manual_seed(0)
        model = build_model("demo_teacher", ds.num_classes).eval()
    pre = Preprocess()
    x = torch.stack([pre.image_to_tensor(ds.load(i)[0]) for i in range(n_images)])
    with torch.no_grad():
        logits = torch.cat([model(b).logits for b in x.split(16)])
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def write_store(path: Path, logits: torch.Tensor, n: int, k: int, codec: str) -> None:
    """A store of ``n`` samples (the ``logits`` repeated) written through kdcache's own writer."""
    C, size = logits.shape[1], logits.shape[-1]
    ids = [f"s{i:06d}" for i in range(n)]
    hashes = ["0" * 64] * n
    schema = CacheSchema.new(
        class_names=[f"c{i}" for i in range(C)], k=k, input_size=(4 * size, 4 * size), map_size=(size, size),
        teacher={"model": "demo_teacher", "weights": "", "weights_sha256": "", "model_options": {}, "params": 0},
        dataset={"name": "bench", "split": "train", "options": {}}, ids=ids, hashes=hashes, codec=codec)
    prepare_store(path, schema, ids, hashes, overwrite=False)
    group, schema = open_for_writing(path, schema)
    writer = ShardWriter(group, schema, path, queue_size=256)
    for start in range(0, n, 64):
        rows = list(range(start, min(n, start + 64)))
        batch = logits[[r % len(logits) for r in rows]]
        for r, sample in zip(rows, encode_batch(schema, batch, {}, [ids[r] for r in rows], (4 * size, 4 * size))):
            writer.put(r, sample)
    writer.close()


def epoch_rates(loader, epochs: int, set_epoch=None) -> list[tuple[float, float]]:
    out = []
    for e in range(epochs):
        if set_epoch:
            set_epoch(e)
        t0 = time.perf_counter()
        n = 0
        nbytes = 0
        for batch in loader:
            n += len(batch["row"])
            nbytes += sum(v.nbytes for key, v in batch.items() if key.startswith("logits/"))
        dt = time.perf_counter() - t0
        out.append((n / dt, nbytes / dt / 1e6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--codecs", default="blosc-lz4,blosc-zstd")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    logits = teacher_logits(args.teacher, 64, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-reader-"))
    rows = []
    try:
        for codec in args.codecs.split(","):
            path = tmp / f"{codec}.zarr"
            write_store(path, logits, args.samples, args.k, codec)
            store = CacheStore(path)
            stream = CacheStream(store, seed=0, buffer_size=256)
            loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                                                 persistent_workers=args.workers > 0)
            s = epoch_rates(loader, args.epochs, stream.set_epoch)
            del loader
            targets = CachedTargets(store)
            loader = torch.utils.data.DataLoader(targets, batch_size=args.batch_size, num_workers=args.workers,
                                                 shuffle=True, persistent_workers=args.workers > 0)
            r = epoch_rates(loader, max(2, args.epochs // 2))
            del loader
            steady_s = statistics.median(x[0] for x in s[1:])
            steady_r = statistics.median(x[0] for x in r[1:])
            mbs = statistics.median(x[1] for x in s[1:])
            rows.append((codec, size_of(path) / 1e6, s[0][0], steady_s, mbs, steady_r, steady_s / steady_r))
            print(f"{codec}: stream {steady_s:.0f} samples/s ({mbs:.0f} MB/s; first epoch {s[0][0]:.0f}), "
                  f"random access {steady_r:.0f} samples/s, stream/random {steady_s / steady_r:.2f}x", flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = device_name(resolve_device("cpu"))
    per_sample = args.k * args.size * args.size * 3 + args.size * args.size * 2
    lines = [
        "# Teacher-cache reader throughput\n",
        f"{args.samples} samples of {args.size}x{args.size} maps, k = {args.k} (values fp16 + uint8 ids + fp16 tail: "
        f"{per_sample / 1024:.0f} KiB raw per sample), default shards; DataLoader with {args.workers} workers, "
        f"batch {args.batch_size}; steady epochs are the median of epochs 2..{args.epochs}. Machine: {dev}. "
        "Made by `python benchmarks/cache_reader.py`.\n",
        "| codec | on disk (MB) | stream, first epoch (samples/s) | stream, steady (samples/s) | stream MB/s | "
        "random access (samples/s) | stream / random |",
        "|---|---|---|---|---|---|---|",
    ]
    for codec, mb, first, st, mbs, ra, ratio in rows:
        lines.append(f"| {codec} | {mb:.1f} | {first:.0f} | {st:.0f} | {mbs:.0f} | {ra:.0f} | {ratio:.2f}x |")
    out = Path(args.results) / f"cache-reader-{'cpu' if 'cpu' in dev else 'gpu'}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
