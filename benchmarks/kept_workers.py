"""Training epochs whose DataLoader workers are spawned, as a cache on an object store's are: the
workers started every epoch (kdcache before it kept them) against the workers kept for the run,
beside a CE-only epoch with forked workers.

    python benchmarks/kept_workers.py [--cache runs/demo/cache.zarr] [--limit 160] [--workers 2] [--rounds 5]

Without ``--cache`` (or when it does not exist) it builds the cache `kdcache demo` builds (as
``benchmarks/epoch_time.py`` does) over the first ``--limit`` synthetic training images. One
process builds three trainers as their commands do, each with ``--workers`` DataLoader workers:
``CE only`` (`train-teacher --model demo_student`: forked workers), and `train-student --method kl`
streaming the cache through spawned workers, the start method kdcache gives an object store's
workers (``spawn``; here on the local cache, so that what differs is the workers' start, not the
network), once with the workers started every epoch and once kept for the run. It trains one epoch
of each in turn (``train_one_epoch``: the loader and the steps), ``--rounds`` rounds in an order
rotating from round to round, after each trainer's first epoch, which is reported apart (the kept
workers start in it). Writes ``benchmarks/results/kept-workers-cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdcache.train.student_batches as student_batches
from kdcache.core.runs import checkout_commit, device_name
from kdcache.store import CacheStore
from kdcache.train.student import StudentTrainer, config_from_store
from kdcache.train.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_time import build_cache  # noqa: E402  (the cache `kdcache demo` builds)

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("CE only, forked workers", "kl, spawned workers started every epoch", "kl, spawned workers kept")


def trainer_of(variant: str, cache: str, limit: int, workers: int, out: Path):
    """The variant's trainer, prepared as its command prepares it, and a function that trains one
    more epoch of it and returns the epoch's wall seconds (the loader's included)."""
    common = dict(model="demo_student", epochs=10_000, limit=limit, workers=workers, device="cpu", out=str(out))
    if variant.startswith("CE only"):
        ds = CacheStore(cache).schema.dataset
        tr = Trainer(TrainConfig(dataset=ds["name"], data_root=ds.get("root"), dataset_options=ds.get("options") or {},
                                 **common), overwrite=True, show_progress=False)
    else:
        tr = StudentTrainer(config_from_store(cache, methods=[{"name": "kl"}], **common), overwrite=True,
                            show_progress=False)
    ready = tr.prepare()
    if variant.endswith("every epoch"):
        ready.batches.persistent = lambda: False  # what kdcache did before it kept spawned workers
    train_model = tr.parallel(ready.model)
    epoch = iter(range(10_000))

    def one() -> float:
        t0 = time.perf_counter()
        tr.train_one_epoch(train_model, ready.state, ready.batches, next(epoch))
        return time.perf_counter() - t0

    return one, ready.batches


def commit() -> str:
    """The checkout's commit, and whether it had uncommitted changes."""
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (checkout_commit(REPO) or "unknown") + (" + uncommitted changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kept-workers-cpu.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kept-workers-"))
    cache = args.cache
    if cache is None or not Path(cache).exists():
        cache = str(build_cache(Path(cache) if cache else tmp / "cache.zarr", args.limit))
    # the start method of an object store's workers, for the student trainers (CE's stay forked)
    student_batches.worker_start_method = lambda path: "spawn"
    runs = {v: trainer_of(v, cache, args.limit, args.workers, tmp / f"run{i}") for i, v in enumerate(VARIANTS)}
    first = {v: runs[v][0]() for v in VARIANTS}
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            secs[v].append(runs[v][0]())
        print(f"round {r}: " + ", ".join(f"{v} {secs[v][-1]:.3f} s" for v in VARIANTS), flush=True)
    for _, batches in runs.values():
        batches.close()
    ce = secs[VARIANTS[0]]
    ratio = {v: statistics.median(a / b for a, b in zip(secs[v], ce)) for v in VARIANTS}
    rows = [f"| {v} | {first[v]:.2f} | {statistics.median(secs[v]):.2f} | {min(secs[v]):.2f}–{max(secs[v]):.2f} | "
            f"{ratio[v]:.2f} |" for v in VARIANTS]
    kept, every = VARIANTS[2], VARIANTS[1]
    lines = [
        "# Spawned DataLoader workers (an object store's): started every epoch, or kept for the run\n",
        f"Machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} cores. `demo_student`, batch 8, "
        f"{args.limit} synthetic training images, {args.workers} DataLoader workers; `kl` streams a cache of a "
        "`demo_teacher` (top-4 + tail) through spawned workers, the start method of an object store's, on the local "
        "disk. One process trains one epoch of each trainer in turn (the loader and the steps), "
        f"{args.rounds} rounds in a rotating order, after each trainer's first epoch (its own column). "
        "× CE: the median over rounds of each round's own ratio. Made by "
        f"`python benchmarks/kept_workers.py --limit {args.limit} --workers {args.workers} --rounds {args.rounds}` "
        f"at {commit()}.\n",
        "| epoch of | first epoch (s) | later epochs, median (s) | min–max (s) | × CE |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Kept workers: later epochs **{ratio[kept]:.2f}×** a CE epoch with forked workers, against "
        f"{ratio[every]:.2f}× when the spawned workers start every epoch; the first epoch, in which they start, "
        f"{first[kept]:.2f} s.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
