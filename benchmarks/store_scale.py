"""How the store behaves as it grows: ImageNet-like and Cityscapes-like stores built from a seeded
generator of teacher outputs (no teacher, no network: the store alone is measured).

    python benchmarks/store_scale.py --shape imagenet --samples 10000,100000,1000000
    python benchmarks/store_scale.py --shape imagenet --samples 10000,100000 --views 10
    python benchmarks/store_scale.py --shape cityscapes --samples 2975,23473
    python benchmarks/store_scale.py --shape cityscapes --samples 2975 --codec blosc-zstd,blosc-lz4
    python benchmarks/store_scale.py --report          # the tables, from every JSON written

* **imagenet**: C = 1000, k = 10, the classifier's logits (1 x 1 map), optionally V stored
  views per sample; its data: JPEGs of 500 x 375, random-resized-cropped to 224 and flipped.
* **cityscapes**: C = 19, k = 4, 128 x 256 logit maps (smooth: drawn at 16 x 32 and upsampled,
  so they compress like a network's) plus one feature tap of 64 x 32 x 64; its data: JPEGs of
  2048 x 1024, cropped to 1024 x 512 and flipped.

For each size, each phase runs in a process of its own, so that its peak memory is its own:
the build (kdcache's writer: ``prepare_store``, ``encode_batch``, ``ShardWriter``), opening the
store for training (the store, its ids and done flags), ``inspect-cache``, ``verify-cache``, and
the training loader (``CacheStream`` through a DataLoader with 0, 1 and 2 workers, targets
only, with a JPEG decode + augment of the data set's size, and that JPEG alone with no targets).
``--codec`` names the stores' codec (default: kdcache's, ``blosc-zstd``); with several, each size is
measured with each codec in turn, side by side in one run. Writes one JSON per shape, size, views
and codec under ``benchmarks/results/store-scale/`` and, with ``--report``, the tables of
``benchmarks/results/store-scale-cpu.md``: each measure per sample at every size (is it flat, linear
or worse?), and the cost of a full ImageNet-1k store with 100 views and of Cityscapes with
train_extra, from the measured per-sample costs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kdcache.core.runs import checkout_commit

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "store-scale"
SHAPES = {
    "imagenet": {"C": 1000, "k": 10, "map": (1, 1), "input": (224, 224), "features": {}, "jpeg": (375, 500),
                 "crop": (224, 224), "batch": 2048},
    "cityscapes": {"C": 19, "k": 4, "map": (128, 256), "input": (1024, 2048), "features": {"stage4": (64, 32, 64)},
                   "jpeg": (1024, 2048), "crop": (512, 1024), "batch": 16},
}
#: samples each loader measurement reads (the first eighth is warm-up), in batches as training collates them
LOADER_SAMPLES = {"imagenet": 20480, "cityscapes": 512}
LOADER_BATCH = {"imagenet": 64, "cityscapes": 8}
#: what the largest store is extrapolated to: samples, and views per sample for a store with views
FULL = {"imagenet": (1_281_167, 100, "ImageNet-1k (1,281,167 images)"),
        "cityscapes": (2975 + 19998, 0, "Cityscapes train + train_extra (22,973 images)")}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def schema_for(shape: str, n: int, views: int, codec: str | None = None):
    from kdcache.store.schema import DEFAULT_CODEC, CacheSchema

    s = SHAPES[shape]
    ids = [f"img_{i:08d}" for i in range(n)]
    hashes = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    view_meta = None
    if views:
        view_meta = {"count": views, "scale": [1.0, 1.0], "crop": list(s["crop"]), "seed": 0, "map_size": list(s["map"]),
                     "area": [0.08, 1.0]}
    schema = CacheSchema.new(
        class_names=[f"c{i}" for i in range(s["C"])], k=s["k"], input_size=s["input"], map_size=s["map"],
        feature_shapes=s["features"], features=tuple(s["features"]), views=view_meta,
        teacher={"model": "synthetic", "params": 0, "weights_sha256": "0" * 64}, dataset={"name": f"{shape}-like", "split": "train"},
        ids=ids, hashes=hashes, classification={"targets": "logits"} if shape == "imagenet" else None,
        codec=codec or DEFAULT_CODEC)
    return schema, ids, hashes


def teacher_batch(shape: str, rng, rows: list[int], views: int):
    """Seeded float32 teacher outputs for ``rows``: (logits, features, view outputs or None)."""
    import torch

    s = SHAPES[shape]
    B, C = len(rows), s["C"]
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if shape == "imagenet":
        logits = torch.randn(B, C, 1, 1, generator=g) * 3
        feats = {}
    else:
        low = torch.randn(B, C, 16, 32, generator=g) * 4
        logits = torch.nn.functional.interpolate(low, size=s["map"], mode="bilinear", align_corners=False)
        feats = {t: torch.nn.functional.interpolate(torch.randn(B, c, h // 4, w // 4, generator=g), size=(h, w),
                                                    mode="bilinear", align_corners=False)
                 for t, (c, h, w) in s["features"].items()}
    view_out = None
    if views:
        vl = torch.randn(B * views, C, 1, 1, generator=g) * 3
        params = np.tile(np.array([0, 0, 1, 1, 0, 1, 1], np.float32), (B, views, 1))
        view_out = (vl, {}, params)
    return logits, feats, view_out


# -- phases, each in its own process ------------------------------------------------------------


def phase_write(shape: str, n: int, views: int, path: Path, codec: str | None = None) -> dict:
    from kdcache.store import location
    from kdcache.store.writer import ShardWriter, encode_batch, open_for_writing, prepare_store

    schema, ids, hashes = schema_for(shape, n, views, codec)
    location.remove_tree(path)
    t0 = time.perf_counter()
    prepare_store(path, schema, ids, hashes, overwrite=False)
    group, schema = open_for_writing(path, schema)
    writer = ShardWriter(group, schema, path, queue_size=4 * SHAPES[shape]["batch"])
    rng = np.random.default_rng(0)
    B = SHAPES[shape]["batch"]
    gen = 0.0
    for start in range(0, n, B):
        rows = list(range(start, min(n, start + B)))
        g0 = time.perf_counter()
        logits, feats, view_out = teacher_batch(shape, rng, rows, views)
        gen += time.perf_counter() - g0
        for r, sample in zip(rows, encode_batch(schema, logits, feats, [ids[r] for r in rows], SHAPES[shape]["input"],
                                                views=view_out)):
            writer.put(r, sample)
    writer.close()
    seconds = time.perf_counter() - t0
    files = sum(len(fs) for _, _, fs in os.walk(path))
    size = location.size_of(path)
    maps = sum(location.size_of(path, sp.path) for sp in schema.map_specs)
    return {"seconds": seconds, "generator_seconds": gen, "write_seconds": seconds - gen,
            "samples_per_s": n / (seconds - gen), "mb_per_s": size / 1e6 / (seconds - gen),
            "bytes": size, "map_bytes": maps, "bytes_per_sample": size / n, "map_bytes_per_sample": maps / n,
            "bytes_per_view": (location.size_of(path, "views") / (n * views)) if views else None,
            "files": files, "peak_mb": peak_mb(), "shards": schema.num_shards, "packing": schema.meta["packing"]}


def phase_open(path: Path) -> dict:
    from kdcache.store import CacheStore

    t0 = time.perf_counter()
    store = CacheStore(path)
    ids, done = store.ids, store.done()
    first = store.read_block(0, min(store.samples_per_shard, store.num_samples))  # the first block a loader reads
    return {"seconds": time.perf_counter() - t0, "samples": len(ids), "done": int(done.sum()), "read": len(first),
            "peak_mb": peak_mb()}


def phase_inspect(path: Path) -> dict:
    from kdcache.store.check import inspect_store

    t0 = time.perf_counter()
    rep = inspect_store(path)
    return {"seconds": time.perf_counter() - t0, "done": rep["done"], "peak_mb": peak_mb()}


def phase_verify(path: Path) -> dict:
    from kdcache.store.check import verify_store

    t0 = time.perf_counter()
    res = verify_store(path, show_progress=False)
    return {"seconds": time.perf_counter() - t0, "ok": res.ok, "peak_mb": peak_mb()}


class JpegTargets:
    """A transform for CacheStream: the item's targets, plus (``decode``) one JPEG of the data
    set's size decoded and augmented as training does (random-resized crop or crop, flip)."""

    def __init__(self, shape: str, decode: bool):
        from PIL import Image

        self.shape, self.decode = shape, decode
        h, w = SHAPES[shape]["jpeg"]
        rng = np.random.default_rng(0)
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # photo-like: smooth, compressible
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        self.jpeg = buf.getvalue()

    def __call__(self, index: int, targets: dict) -> dict:
        if not self.decode:
            return targets
        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(self.jpeg)).convert("RGB")
        rng = np.random.default_rng(index)
        ch, cw = SHAPES[self.shape]["crop"]
        if self.shape == "imagenet":  # random-resized crop (area 0.08..1, ratio 3/4..4/3), then 224
            W, H = img.size
            area = W * H * rng.uniform(0.08, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = min(W, int(round((area * ratio) ** 0.5))), min(H, int(round((area / ratio) ** 0.5)))
            x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            img = img.resize((cw, ch), Image.BILINEAR, box=(x, y, x + w, y + h))
        else:
            W, H = img.size
            x, y = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
            img = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        targets["image"] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        return targets


class JpegAlone:
    """The same rows' JPEGs decoded and augmented with no targets read: the comparator that says what
    the targets add to a sample's time in the same loader."""

    def __init__(self, shape: str, rows: list[int]):
        self.rows, self.jpeg = rows, JpegTargets(shape, True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        import torch

        return self.jpeg(self.rows[i], {"row": torch.tensor(self.rows[i])})


def phase_loader(shape: str, path: Path, workers: int, decode: bool, alone: bool = False) -> dict:
    import torch

    from kdcache.store import CacheStore, CacheStream

    store = CacheStore(path)
    want = min(LOADER_SAMPLES[shape], store.num_samples)
    s = store.samples_per_shard
    shards = list(range(store.num_shards))
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(shards, size=min(len(shards), -(-(want + s) // s)), replace=False))
    rows = [r for j in pick for r in range(j * s, min((j + 1) * s, store.num_samples))]
    B = LOADER_BATCH[shape]
    groups = ["views/logits", "views/params"] if store.schema.views else ["logits"]  # what training reads
    stream = CacheStream(store, rows, groups=groups, transform=JpegTargets(shape, decode), buffer_size=64,
                         num_workers=workers, batch_size=B)
    if alone:  # as many samples as the stream yields (whole batches per worker)
        stream = JpegAlone(shape, rows[:len(stream)])
    loader = torch.utils.data.DataLoader(stream, batch_size=B, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None)
    t0, count, warm = None, 0, max(1, len(stream) // B // 8)  # batches of warm-up (workers starting)
    for batch in loader:
        count += 1
        if count == warm:
            t0, n0 = time.perf_counter(), 0
        elif t0 is not None:
            n0 += len(batch["row"])
    seconds = time.perf_counter() - t0
    n = n0
    return {"workers": workers, "decode": decode, "alone": alone, "samples": n, "samples_per_s": n / seconds,
            "per_core": n / seconds / max(1, workers), "peak_mb": peak_mb()}


#: glibc's malloc with its mmap threshold fixed (64 MiB) and no trimming below 256 MiB. By default glibc
#: serves a large block (a decoded 2048 x 1024 JPEG is 6 MB) with a fresh mmap, faulting its pages in
#: again for every image, until a large free raises its threshold: a DataLoader worker that has read
#: targets has usually freed such a block, one that decodes JPEGs alone may not have. Measured on
#: this machine with 1 worker: the JPEG alone at 65-73 samples/s by default and 100-106 so, next to
#: 89-101 with the targets. Loader phases run with it, so that the loaders compared differ only in
#: what they read; the JPEG alone is measured with glibc's default too.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def run_phase(*args: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if r.returncode:
        raise SystemExit(f"phase {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def codec_of(run: dict) -> str:
    """A run's codec (runs written before ``--codec`` existed used the default)."""
    from kdcache.store.schema import DEFAULT_CODEC

    return run.get("codec", DEFAULT_CODEC)


def result_name(shape: str, n: int, views: int, codec: str, side_by_side: bool = False) -> str:
    """The JSON of one measurement; several codecs measured in one run are named apart from the growth
    runs, so that each comparison keeps its own (one run, one machine state) numbers."""
    from kdcache.store.schema import DEFAULT_CODEC

    if side_by_side:
        return f"{shape}-{n}-v{views}-codecs-{codec}.json"
    return f"{shape}-{n}-v{views}" + ("" if codec == DEFAULT_CODEC else f"-{codec}") + ".json"


def measure(shape: str, n: int, views: int, root: Path, codec: str, side_by_side: list[str] | None = None) -> dict:
    path = root / f"{shape}-{n}-v{views}-{codec}.zarr"
    res = {"shape": shape, "samples": n, "views": views, "codec": codec, "side_by_side": side_by_side,
           "machine": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "commit": checkout_commit(REPO)}
    print(f"{shape} n={n} views={views} codec={codec}: write", flush=True)
    res["write"] = run_phase("write", shape, str(n), str(views), str(path), codec)
    for phase in ("open", "inspect", "verify"):
        print(f"  {phase}", flush=True)
        res[phase] = run_phase(phase, shape, str(n), str(views), str(path))
    res["loader"] = []
    for decode, alone, malloc in ((False, False, "fixed"), (True, False, "fixed"), (True, True, "fixed"),
                                  (True, True, "default")):
        for w in (0, 1, 2):
            print(f"  loader workers={w} decode={decode} alone={alone} malloc={malloc}", flush=True)
            r = run_phase("loader", shape, str(n), str(views), str(path), str(w), str(int(decode)), str(int(alone)),
                          env=FIXED_MALLOC if malloc == "fixed" else None)
            res["loader"].append({**r, "malloc": malloc})
    shutil.rmtree(path)
    return res


# -- the report ---------------------------------------------------------------------------------


def growth(xs: list[float], ns: list[int]) -> str:
    """flat / linear / worse, from the per-sample value at the smallest and largest size."""
    if len(xs) < 2 or xs[0] <= 0:
        return "—"
    r = xs[-1] / xs[0]
    span = ns[-1] / ns[0]
    if r < 1.5:
        return f"flat ({r:.2f}x over {span:g}x samples)"
    if r < 0.5 * span:
        return f"sublinear ({r:.2f}x over {span:g}x samples)"
    return f"linear or worse ({r:.2f}x over {span:g}x samples)"


def report(out: Path) -> None:
    every = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    runs = [r for r in every if not r.get("side_by_side")]
    lines = ["# The store as it grows", "",
             "Written by `benchmarks/store_scale.py` (settings fixed before its first run; each run names its commit "
             "below). Stores built from seeded teacher outputs by kdcache's own writer; each phase in a process of "
             "its own, one thread (`OMP_NUM_THREADS=1`), with kdcache's default codec (blosc-zstd) where a heading names no other. Loader: `CacheStream` reading the logits (a store with views: the views) through a "
             "DataLoader in batches; 'targets + JPEG' adds one JPEG of the data set's size decoded and augmented per sample.", ""]
    from kdcache.store.schema import DEFAULT_CODEC

    full = []  # one row per part: its largest store's per-sample costs at the data set's full size
    for shape in SHAPES:
        groups = sorted({(r["views"], codec_of(r)) for r in runs if r["shape"] == shape},
                        key=lambda g: (g[0], g[1] != DEFAULT_CODEC, g[1]))
        for views, codec in groups:
            rs = sorted((r for r in runs if r["shape"] == shape and r["views"] == views and codec_of(r) == codec),
                        key=lambda r: r["samples"])
            head = (f"## {shape}-like" + (f", {views} stored views per sample" if views else "")
                    + ("" if codec == DEFAULT_CODEC else f", codec {codec}"))
            lines += [head, "", f"Machine: {rs[0]['machine']}, {rs[0]['cores']} cores; commit(s) "
                      f"{', '.join(sorted({r['commit'] for r in rs}))}.", ""]
            cols = ["samples", "write samples/s", "write MB/s", "B / sample on disk", "map B / sample"]
            cols += ["B / view"] if views else []
            cols += ["files", "writer peak MB", "open for training s", "open peak MB", "inspect-cache s",
                     "verify-cache s", "verify peak MB"]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rs:
                w = r["write"]
                row = [f"{r['samples']:,}", f"{w['samples_per_s']:,.0f}", f"{w['mb_per_s']:.1f}",
                       f"{w['bytes_per_sample']:,.1f}", f"{w['map_bytes_per_sample']:,.1f}"]
                row += [f"{w['bytes_per_view']:.1f}"] if views else []
                row += [f"{w['files']:,}", f"{w['peak_mb']:.0f}", f"{r['open']['seconds']:.2f}",
                        f"{r['open']['peak_mb']:.0f}", f"{r['inspect']['seconds']:.2f}", f"{r['verify']['seconds']:.1f}",
                        f"{r['verify']['peak_mb']:.0f}"]
                lines.append("| " + " | ".join(row) + " |")
            ns = [r["samples"] for r in rs]
            lines += ["", "Per sample, from the smallest to the largest store: write time "
                      + growth([1 / r["write"]["samples_per_s"] for r in rs], ns) + "; bytes "
                      + growth([r["write"]["bytes_per_sample"] for r in rs], ns) + "; files "
                      + growth([r["write"]["files"] / r["samples"] for r in rs], ns) + "; verify time "
                      + growth([r["verify"]["seconds"] / r["samples"] for r in rs], ns) + ". Whole-store times: open "
                      + growth([r["open"]["seconds"] for r in rs], ns) + "; inspect "
                      + growth([r["inspect"]["seconds"] for r in rs], ns) + ".", ""]
            cols = ["samples", "workers", "targets samples/s", "per core", "targets + JPEG samples/s", "per core",
                    "JPEG alone samples/s", "JPEG alone, glibc's default malloc", "targets' share of a sample's time",
                    "time the targets add"]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

            def rate(x: dict | None) -> str:
                return "—" if x is None else f"{x['samples_per_s']:,.0f}"

            for r in rs:
                fixed = any(x.get("malloc") == "fixed" for x in r["loader"])
                for w in (0, 1, 2):
                    mine = [x for x in r["loader"] if x["workers"] == w
                            and x.get("malloc", "default") == ("fixed" if fixed else "default")]
                    t = next(x for x in mine if not x["decode"])
                    j = next(x for x in mine if x["decode"] and not x.get("alone"))
                    a = next((x for x in mine if x.get("alone")), None)
                    d = next((x for x in r["loader"] if x["workers"] == w and x.get("alone")
                              and x.get("malloc", "default") == "default"), None)
                    share = j["samples_per_s"] / t["samples_per_s"]  # (1/t) / (1/j)
                    added = "—" if a is None else f"{100 * (1 - j['samples_per_s'] / a['samples_per_s']):.1f}%"
                    lines.append(f"| {r['samples']:,} | {w} | {t['samples_per_s']:,.0f} | {t['per_core']:,.0f} | "
                                 f"{j['samples_per_s']:,.0f} | {j['per_core']:,.0f} | {rate(a)} | {rate(d)} | "
                                 f"{100 * share:.1f}% | {added} |")
            lines += ["", "Targets' share: a sample's time reading targets alone over its time with the JPEG too (an "
                      "upper bound: with workers it counts the DataLoader's passing of every batch, which the JPEG "
                      "pays too). Time the targets add: 1 − (JPEG alone / targets + JPEG), both in samples/s, the same "
                      "rows in the same loader (runs without a JPEG-alone measure show —). Runs with a column for "
                      "glibc's default time every other loader with glibc's mmap threshold fixed (`FIXED_MALLOC` in the script: with glibc's "
                      "default, a worker decoding JPEGs alone faults a fresh 6 MB block in for every image, and "
                      "came out slower than one that also reads targets); the column beside it is the JPEG alone "
                      "with glibc's default."]
            big = rs[-1]
            n_full, v_full, what = FULL[shape]
            w = big["write"]
            if views:
                per_sample = w["bytes_per_sample"] - w["bytes_per_view"] * views
                total = n_full * (per_sample + w["bytes_per_view"] * v_full)
                rows_full = n_full * (1 + v_full)
                rate = big["samples"] * (1 + views) / w["write_seconds"]
                what = f"{what} with {v_full} views each"
            else:
                total = n_full * w["bytes_per_sample"]
                rows_full = n_full
                rate = w["samples_per_s"]
            t0 = next(x for x in big["loader"] if x["workers"] == 0 and not x["decode"])
            lines += ["", f"Extrapolated from the {big['samples']:,}-sample store to {what}: about "
                      f"{total / 1e9:,.1f} GB on disk, {rows_full / rate / 3600:,.2f} h of writing on one core "
                      f"(the store's share; the teacher's forwards come on top), and targets read at "
                      f"{t0['samples_per_s']:,.0f} samples/s per core.", ""]
            full.append(extrapolate(big, shape, views, total, rows_full / rate))
    lines += extrapolation_table(full)
    lines += codec_comparison([r for r in every if r.get("side_by_side")])
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def extrapolate(big: dict, shape: str, views: int, total_bytes: float, write_seconds: float) -> dict:
    """A part's largest store scaled to its data set's full size (``FULL``), from the per-sample costs it
    measured (each of them flat as the store grew; the growth lines above say so): bytes, files and
    verify time per sample, and the loader's rates with 0 and 2 workers."""
    n_full, v_full, what = FULL[shape]
    n = big["samples"]
    # files and verify time per stored row (a sample's own row and each view's): with views, most of
    # both are the views' arrays, which grow with the views per sample
    rows, rows_full = n * (1 + views), n_full * (1 + (v_full if views else 0))
    fixed = any(x.get("malloc") == "fixed" for x in big["loader"])

    def loader(workers: int, decode: bool) -> float:
        return next(x for x in big["loader"] if x["workers"] == workers and x["decode"] == decode
                    and not x.get("alone") and x.get("malloc", "default") == ("fixed" if fixed else "default"))["samples_per_s"]

    return {"what": what, "views": v_full if views else 0, "from": f"{n:,}" + (f" x {views} views" if views else ""),
            "gb": total_bytes / 1e9, "files": big["write"]["files"] / rows * rows_full, "write_h": write_seconds / 3600,
            "verify_h": big["verify"]["seconds"] / rows * rows_full / 3600,
            "epoch_targets_h": n_full / loader(0, False) / 3600, "with_jpeg_2": loader(2, True),
            "share_2": loader(2, True) / loader(2, False)}


def extrapolation_table(rows: list[dict]) -> list[str]:
    """The full-size costs of every part, one row each (what the scaling-out guide quotes)."""
    if not rows:
        return []
    lines = ["## Extrapolated to the full data sets", "",
             "Each part's largest store, its measured per-sample costs times the data set's size (files and "
             "`verify-cache` per stored row, a sample's own and each of its views'): bytes on disk, "
             "files, hours of writing and of `verify-cache` on one core (the store's share: the teacher's "
             "forwards come on top), the hours one core takes to read an epoch's targets (no workers), and the "
             "loader with 2 workers and a JPEG of the data set's size decoded per sample, with the targets' share "
             "of its time (the upper bound above).", "",
             "| data set | views per image | from a store of | GB on disk | files | write h (1 core) | "
             "verify-cache h (1 core) | an epoch's targets, h (1 core) | targets + JPEG, 2 workers, samples/s | "
             "targets' share, 2 workers |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['what']} | {r['views'] or '—'} | {r['from']} | {r['gb']:,.1f} | "
                     f"{r['files']:,.0f} | {r['write_h']:,.2f} | {r['verify_h']:,.2f} | {r['epoch_targets_h']:,.3f} | "
                     f"{r['with_jpeg_2']:,.0f} | {100 * r['share_2']:.1f}% |")
    return lines + [""]


def loader_rate(run: dict, workers: int, decode: bool) -> float:
    """A run's loader samples/s with glibc's mmap threshold fixed: targets alone, or targets + JPEG."""
    return next(x for x in run["loader"] if x["workers"] == workers and x.get("malloc") == "fixed"
                and x["decode"] == decode and not x.get("alone"))["samples_per_s"]


def codec_comparison(runs: list[dict]) -> list[str]:
    """Codecs measured side by side in one run (``--codec a,b``): per store size, each codec's bytes,
    write rate and the training loader's rate and share."""
    lines = []
    for key in sorted({(r["shape"], r["views"], r["samples"]) for r in runs}):
        rs = [r for r in runs if (r["shape"], r["views"], r["samples"]) == key]
        rs.sort(key=lambda r: r["side_by_side"].index(codec_of(r)))
        shape, views, n = key
        lines += [f"## Codecs side by side: {shape}-like, {n:,} samples" + (f", {views} views" if views else ""), "",
                  f"Machine: {rs[0]['machine']}, {rs[0]['cores']} cores; commit(s) "
                  f"{', '.join(sorted({r['commit'] for r in rs}))}; the codecs measured one after the other in one "
                  "run, each with every phase above. Loaders with glibc's mmap threshold fixed.", ""]
        cols = ["codec", "B / sample on disk", "write samples/s", "verify-cache s"]
        for w in (0, 1, 2):
            cols += [f"targets samples/s, {w} workers", f"targets' share, {w} workers"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rs:
            row = [codec_of(r), f"{r['write']['bytes_per_sample']:,.0f}", f"{r['write']['samples_per_s']:,.0f}",
                   f"{r['verify']['seconds']:.1f}"]
            for w in (0, 1, 2):
                t, j = loader_rate(r, w, False), loader_rate(r, w, True)
                row += [f"{t:,.0f}", f"{100 * j / t:.1f}%"]
            lines.append("| " + " | ".join(row) + " |")
        first = rs[0]
        for r in rs[1:]:
            t0 = [loader_rate(first, w, False) for w in (0, 1, 2)]
            t1 = [loader_rate(r, w, False) for w in (0, 1, 2)]
            lines += ["", f"{codec_of(r)} against {codec_of(first)}: "
                      f"{r['write']['bytes_per_sample'] / first['write']['bytes_per_sample']:.2f}x the bytes, targets "
                      "read " + ", ".join(f"{b / a:.2f}x" for a, b in zip(t0, t1)) + " as fast (0, 1, 2 workers)."]
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--samples", default="10000")
    ap.add_argument("--views", type=int, default=0)
    ap.add_argument("--codec", default=None, help="the stores' codec, or several separated by commas "
                    "(default: kdcache's default codec)")
    ap.add_argument("--root", default=None, help="where the stores are built (default: a temporary folder)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "store-scale-cpu.md"))
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase, shape, n, views, path, *rest = args.phase
        path = Path(path)
        result = {"write": lambda: phase_write(shape, int(n), int(views), path, *rest),
                  "open": lambda: phase_open(path),
                  "inspect": lambda: phase_inspect(path), "verify": lambda: phase_verify(path),
                  "loader": lambda: phase_loader(shape, path, int(rest[0]), bool(int(rest[1])),
                                                 bool(int(rest[2])))}[phase]()
        print(json.dumps(result))
        return
    if args.report:
        report(Path(args.out))
        return
    if not args.shape:
        ap.error("give --shape (or --report)")
    root = Path(args.root) if args.root else Path(__import__("tempfile").mkdtemp(prefix="store-scale-"))
    OUT.mkdir(parents=True, exist_ok=True)
    from kdcache.store.schema import CODECS, DEFAULT_CODEC

    codecs = args.codec.split(",") if args.codec else [DEFAULT_CODEC]
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        ap.error(f"unknown codec {unknown[0]!r}; choose from {', '.join(CODECS)}")
    for n in (int(x) for x in args.samples.split(",")):
        for codec in codecs:
            together = codecs if len(codecs) > 1 else None
            res = measure(args.shape, n, args.views, root, codec, together)
            (OUT / result_name(args.shape, n, args.views, codec, bool(together))).write_text(json.dumps(res, indent=1))
    report(Path(args.out))


if __name__ == "__main__":
    main()
