"""Which chunk codec a teacher cache should use: compression ratio and decode speed, measured.

    python benchmarks/cache_compression.py SOURCE.zarr [--k 4]

SOURCE is any teacher cache (e.g. `kdcache build-teacher-cache --weights runs/teacher
--out caches/train.zarr --topk 8 --features stage3`). Its arrays are rewritten with each codec kdcache
offers (same shards, same chunks: one sample per chunk), then every shard is read back through
`kdcache.store.CacheStore.read_block` in one thread. Prints and writes
benchmarks/results/cache-compression-<device>.md: bytes on disk, ratio against the raw bytes,
encode and decode MB/s (of raw bytes) per codec and per array kind.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import zarr

from kdcache.core.runs import device_name, resolve_device
from kdcache.store import CacheSchema, CacheStore
from kdcache.store.location import size_of
from kdcache.store.schema import ATTR, CODECS


def recompress(src: Path, dst: Path, codec: str) -> float:
    """Copy ``src`` into a new store ``dst`` with ``codec``; returns the encode+write seconds."""
    g = zarr.open_group(str(src), mode="r")
    schema = CacheSchema({**g.attrs[ATTR], "codec": codec})
    out = zarr.open_group(str(dst), mode="w-")
    n = schema.num_samples
    schema.create_arrays(out, g["sample_id"].shape[1])
    for name in ("done", "sample_id", "content_hash", "image_hw"):
        out[name][:] = g[name][:]
    for group in schema.extent_groups:
        out[f"{group}/hw"][:] = g[f"{group}/hw"][:]
    if schema.views:
        out["views/params"][:] = g["views/params"][:]
    out.attrs[ATTR] = schema.meta
    data = {s.path: g[s.path][:] for s in schema.map_specs}
    S = schema.samples_per_shard
    t0 = time.perf_counter()
    for start in range(0, n, S):
        for path, a in data.items():
            out[path][start:start + S] = a[start:start + S]
    return time.perf_counter() - t0


def decode_seconds(path: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        store = CacheStore(path)  # fresh handles each time
        S, n = store.samples_per_shard, store.num_samples
        t0 = time.perf_counter()
        for start in range(0, n, S):
            store.read_block(start, min(n, start + S))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    src = Path(args.source)
    store = CacheStore(src)
    specs = store.schema.map_specs
    raw = {s.path: store.array(s.path).nbytes for s in specs}
    raw_total = sum(raw.values())
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-codecs-"))
    rows = []
    try:
        for codec in CODECS:
            dst = tmp / f"{codec}.zarr"
            enc = recompress(src, dst, codec)
            dec = decode_seconds(dst)
            per_kind = {s.path: size_of(dst, s.path) for s in specs}
            total = sum(per_kind.values())
            rows.append((codec, total, raw_total / total, raw_total / enc / 1e6, raw_total / dec / 1e6, per_kind))
            print(f"{codec:>10}: {total / 1e6:8.2f} MB  ratio {raw_total / total:5.2f}  encode {raw_total / enc / 1e6:7.0f} MB/s"
                  f"  decode {raw_total / dec / 1e6:7.0f} MB/s", flush=True)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = store.meta
    dev = device_name(resolve_device("cpu"))
    lines = [
        "# Teacher-cache codecs: ratio and speed\n",
        f"Source: a cache of `{meta['teacher']['model']}` on {meta['dataset']['name']} `{meta['dataset']['split']}` "
        f"({store.num_samples} samples, k = {meta['k']}, maps {meta['map_size'][0]}x{meta['map_size'][1]}, "
        f"features {list(meta['features']) or 'none'}; {raw_total / 1e6:.1f} MB raw). Machine: {dev}. "
        "Encode = compress + write every shard; decode = `CacheStore.read_block` over every shard, one "
        "thread, median of 3; MB/s of raw bytes. Every codec is followed by crc32c. Made by "
        "`python benchmarks/cache_compression.py`.\n",
        "| codec | on disk (MB) | ratio | encode MB/s | decode MB/s |",
        "|---|---|---|---|---|",
    ]
    for codec, total, ratio, enc, dec, _ in rows:
        lines.append(f"| {codec} | {total / 1e6:.2f} | {ratio:.2f} | {enc:.0f} | {dec:.0f} |")
    lines += ["", "Ratio per array (raw / on disk):", "",
              "| array | raw MB | " + " | ".join(r[0] for r in rows) + " |",
              "|---|---|" + "---|" * len(rows)]
    for s in specs:
        lines.append(f"| {s.path} | {raw[s.path] / 1e6:.2f} | " +
                     " | ".join(f"{raw[s.path] / max(r[5][s.path], 1):.2f}" for r in rows) + " |")
    out = Path(args.results) / f"cache-compression-{'cpu' if 'cpu' in dev else 'gpu'}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
