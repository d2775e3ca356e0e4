"""Does writing the cache slow the teacher down? Build time / pure teacher inference time.

    python benchmarks/cache_build_overhead.py --teacher runs/teacher [--repeats 3]

On the same data with the same loader and batch size, alternately:

* pure inference: load + preprocess every image, teacher forward, wait for the result;
* `build_teacher_cache` into a fresh store (fingerprinting, top-k, encoding, writing, done flags).

Target: ratio <= 1.10 (encoding and writing run in a background thread behind a bounded
queue). Cases: k = 4 logits only, and k = 4 plus the stage3 features. Writes
benchmarks/results/cache-build-overhead-<device>.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcache.core.runs import device_name, resolve_device
from kdcache.data import build_dataset
from kdcache.models.loading import open_weights
from kdcache.pipeline.loaders import default_workers, make_loader
from kdcache.teacher.cache_build import CacheBuildConfig, TeacherInputs, build_teacher_cache


@torch.inference_mode()
def pure_inference(cfg: CacheBuildConfig) -> float:
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    ds = build_dataset(cfg.dataset, cfg.split, cfg.data_root, **cfg.dataset_options)
    weights = open_weights(cfg.weights)
    model = weights.build(num_classes=ds.num_classes, taps=cfg.features, device=device)
    inputs = TeacherInputs(ds, weights.preprocess)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    loader = make_loader(inputs, cfg.batch_size, workers, collate_fn=list, pin_memory=device.type == "cuda")
    for items in loader:
        x = torch.stack([it["image"] for it in items]).to(device, non_blocking=True)
        out = model(x)
        out.logits.float().sum().item()  # wait for the device
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-build-"))
    cases = {"k=4": (), "k=4 + stage3 features": ("stage3",)}
    rows = []
    try:
        for name, feats in cases.items():
            cfg = CacheBuildConfig(weights=args.teacher, out=str(tmp / "c.zarr"), split=args.split, topk=4,
                                   features=feats, batch_size=args.batch_size, device=args.device)
            pure_inference(cfg)  # warm-up (allocator, caches)
            pure, build = [], []
            for _ in range(args.repeats):
                pure.append(pure_inference(cfg))
                shutil.rmtree(tmp / "c.zarr", ignore_errors=True)
                t0 = time.perf_counter()
                s = build_teacher_cache(cfg, show_progress=False)
                build.append(time.perf_counter() - t0)
            p, b = statistics.median(pure), statistics.median(build)
            rows.append((name, s["num_samples"], p, b, b / p, s["bytes_written"]))
            print(f"{name}: pure inference {p:.2f} s, build {b:.2f} s, ratio {b / p:.3f} "
                  f"({s['bytes_written'] / 1e6:.1f} MB written)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = device_name(resolve_device(args.device))
    lines = [
        "# Cache build overhead: build time / pure teacher inference time\n",
        f"Teacher `{args.teacher}` on synthetic `{args.split}`, batch {args.batch_size}, default loader workers; "
        f"median of {args.repeats} alternating runs each. Pure inference = load and preprocess every image, "
        "forward, wait. Build = the whole `build_teacher_cache` call (fingerprint, forward, top-k, encode, "
        f"write, done flags) into a fresh store. Machine: {dev}. Target: <= 1.10. "
        "Made by `python benchmarks/cache_build_overhead.py`.\n",
        "| case | samples | pure inference (s) | build (s) | ratio | written (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, n, p, b, r, w in rows:
        lines.append(f"| {name} | {n} | {p:.2f} | {b:.2f} | {r:.3f} | {w / 1e6:.1f} |")
    tag = "cpu" if "cpu" in dev else dev.replace(" ", "-").lower()
    out = Path(args.results) / f"cache-build-overhead-{tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
