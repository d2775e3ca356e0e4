"""What one training item's cached targets cost to take through its crop, per way of taking them:
the nearest cell (the default) and ``--target-resample bilinear``, and the same from an older
commit's ``kdcache/pipeline/warp.py`` beside them, both ways (``--against REF``), so that a change to
the resampling is measured side by side in one process.

    python benchmarks/target_cost.py [--limit 64] [--rounds 10] [--against cce35fa~1]

It builds a top-4 + tail cache of a randomly initialised `demo_teacher` over the first ``--limit``
synthetic training images (stride 4: 24 x 32 cells of 11 classes for the default 96 x 128
images), reads every sample's logits once, and draws each item's crop as `train-student` does
(its default scale range and crop size). Then, in rounds, each way takes every item's targets
(:func:`kdcache.pipeline.warp.warp_targets`), one way after another in an order that rotates
from round to round. Reported: per item, the minimum and the median over rounds of each round's
mean, and each way's median against the nearest cell's of the same round. One thread (a
DataLoader worker's share). Writes benchmarks/results/target-cost-cpu.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdcache.core.checkpoint import save_checkpoint
from kdcache.core.runs import checkout_commit, device_name
from kdcache.models import build_model
from kdcache.pipeline.transforms import Augment, Preprocess, schedule_geometry
from kdcache.pipeline.warp import out_map_size, prepare_resample, warp_targets
from kdcache.store import CacheStore, to_tensors
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache


def older_module(ref: str):
    """``kdcache/pipeline/warp.py`` as it was at git ``ref`` (``kdcache/target_geometry.py`` before the
    package had folders), imported beside the current one."""
    root = Path(__file__).resolve().parent.parent
    for where in ("kdcache/pipeline/warp.py", "kdcache/target_geometry.py"):
        shown = subprocess.run(["git", "show", f"{ref}:{where}"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    text = shown.stdout
    for old, new in (("kdcache.targets", "kdcache.core.topk"), ("kdcache.transforms", "kdcache.pipeline.transforms")):
        text = text.replace(f"from {old} import", f"from {new} import")  # the modules it imports, where they live now
    path = Path(tempfile.mkdtemp()) / "target_geometry_at_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("target_geometry_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--against", default=None, help="a git ref whose target_geometry.py is timed beside this one")
    ap.add_argument("--data-options", default=None, help="synthetic data options as key=value,... (tests: a tiny size)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    options = {}
    for pair in (args.data_options or "").split(","):
        if pair:
            key, value = pair.split("=")
            options[key] = [int(x) for x in value.split("x")] if "x" in value else int(value)
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    save_checkpoint(work / "teacher.pt", build_model("demo_teacher", 11),
                    config={"model": "demo_teacher", "num_classes": 11, "preprocess": Preprocess().to_dict()})
    build_teacher_cache(CacheBuildConfig(weights=str(work / "teacher.pt"), out=str(work / "cache.zarr"),
                                         dataset="synthetic", dataset_options=options, limit=args.limit, topk=4,
                                         workers=0), show_progress=False)
    store = CacheStore(str(work / "cache.zarr"))
    schema = store.schema
    groups = schema.groups_for(["logits"], False)
    items = [to_tensors(store.read(i, groups=groups)) for i in range(schema.num_samples)]
    in_size = tuple(int(x) for x in items[0]["logits/values"].shape[-2:])
    stride = schema.strides["logits"]
    in_size = (round(in_size[0] * stride[0]), round(in_size[1] * stride[1]))
    augment = Augment(scale=(0.75, 1.25), crop=in_size)  # train-student's defaults: its scale range, the image's size
    geometries = [schedule_geometry(0, 0, i, in_size, augment) for i in range(len(items))]
    C = schema.num_classes
    prepare_resample("bilinear")
    prepare_resample("nearest")
    ways = {"nearest cell": (warp_targets, "nearest"), "bilinear": (warp_targets, "bilinear")}
    if args.against:
        older = older_module(args.against)
        ways[f"nearest cell at {args.against}"] = (older.warp_targets, "nearest")
        ways[f"bilinear at {args.against}"] = (older.warp_targets, "bilinear")
    for f, mode in ways.values():  # warm-up: compile, caches
        f(items[0], geometries[0], schema.strides, mode, C)
    per_item: dict[str, list[float]] = {w: [] for w in ways}
    ratio: dict[str, list[float]] = {w: [] for w in ways}
    names = list(ways)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        this = {}
        for name in order:
            f, mode = ways[name]
            t0 = time.perf_counter()
            for item, g in zip(items, geometries):
                f(item, g, schema.strides, mode, C)
            this[name] = (time.perf_counter() - t0) / len(items) * 1e3
        for name in names:
            per_item[name].append(this[name])
            ratio[name].append(this[name] / this["nearest cell"])
    out_hw = out_map_size(geometries[0].out_size, stride)
    head = checkout_commit(Path(__file__).parent)
    lines = ["# One item's cached targets through its crop", "",
             f"Machine: {device_name(torch.device('cpu'))}. `python benchmarks/target_cost.py"
             + (f" --against {args.against}" if args.against else "") + f"` at commit {head or 'unknown'}: "
             f"{len(items)} synthetic training images, a top-4 + tail cache of a randomly initialised "
             f"`demo_teacher` ({C} classes, stride {stride[0]:g}: targets of about {out_hw[0]} x {out_hw[1]} cells), "
             f"`train-student`'s default crops; {args.rounds} rounds, the ways in an order rotating from round to "
             "round. ms per item: the minimum and the median over rounds of each round's mean; against nearest: the "
             "median of each round's own ratio.", "",
             "| way | ms per item (min) | ms per item (median) | against the nearest cell |", "|---|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {min(per_item[name]):.3f} | {statistics.median(per_item[name]):.3f} | "
                     f"{statistics.median(ratio[name]):.2f} |")
    out = Path(args.results) / "target-cost-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
