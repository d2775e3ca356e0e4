"""Whole training epochs, data loading included: a CE-only student against the same student
through the cache (`--method none`, `--method kl`).

    python benchmarks/epoch_time.py [--cache runs/demo/cache.zarr] [--limit 160] [--epochs 3] [--rounds 2]

Without ``--cache`` (or when it does not exist) it builds one first, as `kdcache demo` does
(a randomly initialised `demo_teacher`, top-4 + tail, stage3 features and attention) over the
first ``--limit`` synthetic training images. Each round trains, one after another, `demo_student`
CE only (`train-teacher --model demo_student`), `train-student --method none` and
`train-student --method kl` (default `--cache-read stream`, and `kl` once more with
`--cache-read random`, and `kl` from a schedule cache: ``--schedule-epochs`` = ``--epochs``, the
teacher on every crop the student draws, replayed; `kl` with ``--target-resample bilinear``; `kl` from
a pyramid cache, ``--store-scales 0.75,1.25 --store-flips``), each for ``--epochs`` epochs with ``--workers`` DataLoader workers, in an
order that rotates from round to round. The first epoch of each run is warm-up; the others give
images/s from the run's own `metrics.jsonl`. Reports the median images/s and, for the epoch time
against CE only, the median of each round's own ratio (a noisy machine drifts between rounds).
Writes benchmarks/results/epoch-time-cpu.md (``-workers<N>`` before ``.md`` with workers).

``--interleave R`` measures the same epochs paired instead: one process builds the CE-only trainer,
a second CE-only trainer (``CE only, again``: what two identical trainers read against each other, the
pairing's own spread) and the cached ones (``none``, ``kl`` streamed and by random access) as their commands do, and runs
each trainer's own ``train_one_epoch`` (loader and steps, what a run's ``train_images_per_s``
times) in turn, R rounds in an order rotating from round to round, so each cached epoch is paired
with a CE epoch seconds away rather than minutes: on a shared machine whose speed drifts by tens of
percent between processes, the paired ratio is what can be read. The first epoch of each trainer is
warm-up. Writes ``epoch-time-interleaved-cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from kdcache.core.checkpoint import save_checkpoint
from kdcache.core.runs import device_name
from kdcache.models import build_model
from kdcache.pipeline.transforms import Preprocess
from kdcache.store import CacheStore
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store, train_student
from kdcache.train.trainer import TrainConfig, Trainer, train

VARIANTS = ("CE only", "none, stream", "kl, stream", "kl, random", "kl, schedule", "kl, bilinear", "kl, pyramid")


def build_cache(out: Path, limit: int, schedule_epochs: int = 0, dataset_options: dict | None = None,
                **pyramid) -> Path:
    """The cache as `kdcache demo` builds it (a schedule of ``schedule_epochs`` epochs when > 0;
    ``pyramid``: ``store_scales``/``store_flips``)."""
    teacher = out.parent / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        save_checkpoint(teacher, build_model("demo_teacher", 11),
                        config={"model": "demo_teacher", "num_classes": 11, "preprocess": Preprocess().to_dict()})
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), limit=limit, topk=4,
                                         features=("stage3",), attention=True, device="cpu",
                                         dataset_options=dataset_options or {}, schedule_epochs=schedule_epochs,
                                         **pyramid),
                        show_progress=False)
    return out


def run(variant: str, cache: str, schedule: str, pyramid: str, limit: int, epochs: int, workers: int,
        out: Path) -> list[float]:
    common = dict(model="demo_student", epochs=epochs, limit=limit, workers=workers, device="cpu", out=str(out),
                  eval_every=epochs)
    if variant == "CE only":
        ds = CacheStore(cache).schema.dataset
        train(TrainConfig(dataset=ds["name"], data_root=ds.get("root"), dataset_options=ds.get("options") or {},
                          **common), overwrite=True, show_progress=False)
    else:
        method, read = variant.split(", ")
        resample = "bilinear" if read == "bilinear" else "nearest"
        cache = {"schedule": schedule, "pyramid": pyramid}.get(read, cache)
        read = read if read in ("stream", "random") else "stream"
        train_student(config_from_store(cache, methods=[{"name": method}], cache_read=read, target_resample=resample,
                                        **common),
                      overwrite=True, show_progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_images_per_s"] for r in recs if "epoch" in r and r["epoch"] > 0]


INTERLEAVED = ("CE only", "none, stream", "kl, stream", "kl, random", "CE only, again")


def trainer_of(variant: str, cache: str, limit: int, workers: int, out: Path):
    """A variant's trainer, set up by its command's own :meth:`~kdcache.train.trainer.Trainer.prepare`
    (data, batches, model, optimizer and schedule), and a function that trains one more epoch of it and returns that
    epoch's seconds (``train_time_s``: the loader and the steps, as ``train_images_per_s`` counts
    them)."""
    common = dict(model="demo_student", epochs=10_000, limit=limit, workers=workers, device="cpu", out=str(out))
    if variant.startswith("CE only"):  # "CE only, again": a second trainer of the same run
        ds = CacheStore(cache).schema.dataset
        tr = Trainer(TrainConfig(dataset=ds["name"], data_root=ds.get("root"), dataset_options=ds.get("options") or {},
                                 **common), overwrite=True, show_progress=False)
    else:
        method, read = variant.split(", ")
        tr = StudentTrainer(config_from_store(cache, methods=[{"name": method}], cache_read=read, **common),
                            overwrite=True, show_progress=False)
    ready = tr.prepare()
    train_model = tr.parallel(ready.model)
    epoch = iter(range(10_000))
    return lambda: tr.train_one_epoch(train_model, ready.state, ready.batches, next(epoch))["train_time_s"]


def interleaved(args, cache: str, tmp: Path) -> list[str]:
    """``--interleave``: the variants' epochs in turn in one process (see the module docstring)."""
    runs = {v: trainer_of(v, cache, args.limit, args.workers, tmp / f"run{i}") for i, v in enumerate(INTERLEAVED)}
    for v in INTERLEAVED:
        runs[v]()  # warm-up: the first epoch of each
    secs: dict[str, list[float]] = {v: [] for v in INTERLEAVED}
    for r in range(args.interleave):
        for v in INTERLEAVED[r % len(INTERLEAVED):] + INTERLEAVED[:r % len(INTERLEAVED)]:
            secs[v].append(runs[v]())
        print(f"round {r}: " + ", ".join(f"{v} {secs[v][-1]:.4f} s" for v in INTERLEAVED))
    ce = secs["CE only"]
    ratio = {v: [a / b for a, b in zip(secs[v], ce)] for v in INTERLEAVED}
    n = args.limit // 8 * 8
    med = {v: statistics.median(x) for v, x in ratio.items()}

    def quart(x):
        q = statistics.quantiles(x, n=4)
        return f"{q[0]:.3f}–{q[2]:.3f}"

    return [
        "# Training epochs, data loading included, interleaved: CE only against the cache\n",
        f"Machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} cores (noisy: shared, CPU steal seen). "
        f"`demo_student`, batch 8, {args.limit} synthetic training images, {args.workers} DataLoader workers, cache "
        "of a `demo_teacher` with top-4 + tail, stage3 features and attention. One process builds each trainer as "
        "its command does and trains one epoch of each in turn (its own `train_one_epoch`: the loader and the "
        f"steps), {args.interleave} rounds in an order rotating from round to round, after one warm-up epoch each. "
        "epoch time / CE only: the median over rounds of each round's own ratio, with the interquartile range and "
        "the min–max. Made by `python benchmarks/epoch_time.py --interleave "
        f"{args.interleave}`.\n",
        "| run | images/s (median) | epoch time / CE only | middle half | min–max |",
        "|---|---|---|---|---|",
        *[f"| {v} | {n / statistics.median(secs[v]):.1f} | {med[v]:.3f} | {quart(ratio[v])} | "
          f"{min(ratio[v]):.3f}–{max(ratio[v]):.3f} |" for v in INTERLEAVED],
        "",
        f"Target (issue 50): a cached `kl` epoch ≤ 1.05× a CE-only epoch; measured **{med['kl, stream']:.3f}** "
        f"(stream) and {med['kl, random']:.3f} (random access); `none` (the student's pipeline, no targets read, "
        f"no KD term): {med['none, stream']:.3f}; a second CE-only trainer, the same run built again: "
        f"{med['CE only, again']:.3f}.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/demo/cache.zarr")
    ap.add_argument("--limit", type=int, default=160, help="training samples (the cache's first N)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="R rounds of paired epochs in one process (see the module docstring)")
    args = ap.parse_args()
    if args.interleave:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(args.cache)
            if not cache.exists():
                cache = build_cache(Path(tmp) / "cache.zarr", args.limit)
            lines = interleaved(args, str(cache), Path(tmp))
        name = "epoch-time-interleaved-cpu.md" if args.workers == 0 else f"epoch-time-interleaved-cpu-workers{args.workers}.md"
        path = Path(args.results) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per round: epoch time / CE only's
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache)
        if not cache.exists():
            cache = build_cache(Path(tmp) / "cache.zarr", args.limit)
        options = CacheStore(str(cache)).schema.dataset.get("options") or {}
        schedule = build_cache(Path(tmp) / "schedule.zarr", args.limit, args.epochs, options)
        pyramid = build_cache(Path(tmp) / "pyramid.zarr", args.limit, 0, options, store_scales=(0.75, 1.25),
                              store_flips=True)
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # no variant always first
            got = {}
            for v in order:
                got[v] = run(v, str(cache), str(schedule), str(pyramid), args.limit, args.epochs, args.workers,
                             Path(tmp) / "run")
                rates[v] += got[v]
                print(f"round {r}: {v}: {', '.join(f'{x:.1f}' for x in got[v])} images/s")
            for v in VARIANTS:
                ratios[v].append(statistics.median(got["CE only"]) / statistics.median(got[v]))
    med = {v: statistics.median(x) for v, x in rates.items()}
    rat = {v: statistics.median(x) for v, x in ratios.items()}
    lines = [
        "# Training epochs, data loading included: CE only against the cache\n",
        f"Machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} cores (noisy: shared, CPU steal seen). "
        f"`demo_student`, batch 8, {args.limit} synthetic training images, {args.workers} DataLoader workers, "
        f"cache of a `demo_teacher` with top-4 + tail, stage3 features and attention. {args.rounds} rounds, each "
        f"training every variant one after another for {args.epochs} epochs (the order rotating from round to "
        "round); the first epoch of each run is left out. images/s: the median over all rounds; epoch time / CE "
        "only: the median over rounds of each round's own ratio (min–max in brackets). Made by "
        "`python benchmarks/epoch_time.py`.\n",
        "| run | images/s | epoch time / CE only |",
        "|---|---|---|",
        *[f"| {v} | {med[v]:.1f} | {rat[v]:.3f} ({min(ratios[v]):.3f}–{max(ratios[v]):.3f}) |" for v in VARIANTS],
        "",
        f"Target (issue 50): a cached `kl` epoch ≤ 1.05× a CE-only epoch; measured **{rat['kl, stream']:.3f}** "
        f"(stream), {rat['kl, random']:.3f} (random access), {rat['kl, schedule']:.3f} (a schedule cache, "
        f"replayed), {rat['kl, bilinear']:.3f} (`--target-resample bilinear`) and {rat['kl, pyramid']:.3f} (a pyramid: "
        "`--store-scales 0.75,1.25 --store-flips`, each crop reading its nearest level).",
    ]
    name = "epoch-time-cpu.md" if args.workers == 0 else f"epoch-time-cpu-workers{args.workers}.md"
    path = Path(args.results) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
