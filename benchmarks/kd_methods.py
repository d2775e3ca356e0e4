"""Does distillation from the cache make a better student? A semi-supervised benchmark on the
built-in data: mean ± std over seeds of **test** mIoU, each run's checkpoint chosen on val.

    python benchmarks/kd_methods.py [--seeds 0,1,2] [--labelled 400] [--pool 1600] [--epochs 20]

The setting is the seeds' (`../shared/seeds/`): a teacher trained on the labelled images labels
a pool of unlabelled ones (``--pool`` images of the synthetic ``unlabeled`` split, at least 4x
the labelled set), and students train on both. `demo_student` is short of data, not capacity
(CE on 2000 labelled images reaches about 55 mIoU against 43 on 400), so the pool has something
to give.

One teacher (`demo_teacher`, ``--teacher-epochs``, seed 0) is trained on the ``--labelled``
first training images, chosen on val; its caches are built once: the labelled images (top-4 +
tail) and the pool (top-4 + tail); the ceiling's pool cache holds the pool's true masks. Every
student is `demo_student` with `train-student` defaults and about the same number of optimizer
steps, once per seed: ``--epochs`` x (labelled // 8) for the labelled-only runs (batch 8, whole
batches only), half the epochs x (labelled // 4) for the pool runs (4 labelled images a batch):

* CE baseline (`--method none`) on the labelled images;
* KL and DIST from the cache, and KL with the teacher run online, on the labelled images;
* KL, DIST and `pseudo` (hard labels at confidence 0.7) with the pool (`--unlabeled-cache`, half of
  each batch; half the epochs, since an epoch is one pass over the labelled images);
* the ceiling: CE on the labelled images and the pool with its true labels, the same batches.

Options and defaults are the methods' own (chosen earlier on val); nothing is chosen on test.
Writes benchmarks/results/kd-methods[-<N>-labelled]-<cpu or gpu>.md after each seed (so a cut-short run still
reports the seeds it finished).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kdcache.core.runs import device_name, resolve_device
from kdcache.report.evaluation import evaluate_run
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import config_from_store, train_student
from kdcache.train.student_batches import batch_split
from kdcache.train.trainer import TrainConfig, train

TEACHER = "teacher (demo_teacher, labelled only)"
BASELINE = "CE baseline (labelled only)"
#: name -> (methods, use the pool, extra options); "online": KL with the teacher run every step
RUNS = {
    BASELINE: ([{"name": "none"}], False, {}),
    "KL (cache)": ([{"name": "kl"}], False, {}),
    "DIST (cache)": ([{"name": "dist"}], False, {}),
    "KL (online teacher)": ([{"name": "kl"}], False, {"online": True}),
    "KL + pool": ([{"name": "kl"}], True, {}),
    "DIST + pool": ([{"name": "dist"}], True, {}),
    "pseudo-labels + pool": ([{"name": "pseudo", "confidence_threshold": 0.7}], True, {}),
    "ceiling: CE + pool with true labels": ([{"name": "none"}], "true", {}),
}


def test_miou(run: Path) -> float:
    return evaluate_run(run, split="test", latency=False, qualitative=0, show_progress=False)["miou"]


def build(teacher: Path, out: Path, split: str, limit: int, options: dict, device: str) -> Path:
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), split=split, limit=limit, topk=4,
                                         dataset_options=options, device=device), overwrite=True,
                        show_progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labelled", type=int, default=400)
    ap.add_argument("--pool", type=int, default=1600)
    ap.add_argument("--epochs", type=int, default=20, help="labelled-only epochs (pool runs take half)")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--share", type=float, default=0.5, help="share of each batch from the pool")
    ap.add_argument("--runs", default=",".join(RUNS), help="which students (comma-separated names)")
    ap.add_argument("--out", default="runs/kd-methods")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in RUNS if n in args.runs.split(",")]
    out = Path(args.out)
    dev = device_name(resolve_device(args.device))

    t0 = time.perf_counter()
    tdir = out / "teacher"
    train(TrainConfig(model="demo_teacher", epochs=args.teacher_epochs, limit=args.labelled, seed=0, out=str(tdir),
                      device=args.device), overwrite=True, show_progress=False)
    teacher_s = time.perf_counter() - t0
    miou: dict[str, list[float]] = {TEACHER: [test_miou(tdir)]}
    secs: dict[str, list[float]] = {TEACHER: [teacher_s]}
    print(f"teacher: test mIoU {100 * miou[TEACHER][0]:.2f} ({teacher_s:.0f} s)", flush=True)
    lab = build(tdir, out / "labelled.zarr", "train", args.labelled, {}, args.device)
    pool = build(tdir, out / "pool.zarr", "unlabeled", args.pool, {}, args.device)
    true_pool = build(tdir, out / "pool-true.zarr", "unlabeled", args.pool, {"unlabeled_masks": True}, args.device)

    for seed in seeds:
        for name in names:
            methods, with_pool, extra = RUNS[name]
            opts = dict(methods=methods, seed=seed, device=args.device, limit=args.labelled, batch_size=8,
                        out=str(out / f"{name.split(':')[0].split()[0].lower()}-{'pool-' if with_pool else ''}"
                                      f"{'online-' if extra.get('online') else ''}s{seed}"))
            if with_pool:
                opts.update(unlabeled_caches=[str(true_pool if with_pool == "true" else pool)],
                            unlabeled_share=args.share, epochs=max(1, round(args.epochs * (1 - args.share))))
            else:
                opts["epochs"] = args.epochs
            if extra.get("online"):
                opts.update(online_teacher="demo_teacher", teacher_weights=str(tdir))
            t1 = time.perf_counter()
            r = train_student(config_from_store(str(lab), **opts), overwrite=True, show_progress=False)
            secs.setdefault(name, []).append(time.perf_counter() - t1)
            miou.setdefault(name, []).append(test_miou(Path(r["run"])))
            print(f"seed {seed} {name}: test mIoU {100 * miou[name][-1]:.2f} (val {100 * r['best_miou']:.2f}, "
                  f"{secs[name][-1]:.0f} s)", flush=True)
        write(args, miou, secs, dev, seeds[:seeds.index(seed) + 1])


def steps(args) -> str:
    """The optimizer steps the runs take, as the trainer counts them (whole batches only)."""
    labelled_only = args.epochs * (args.labelled // 8)
    n_l, _ = batch_split(8, args.share)
    pool_epochs = max(1, round(args.epochs * (1 - args.share)))
    pooled = pool_epochs * (args.labelled // n_l)
    return (f"{labelled_only} optimizer steps for the labelled-only runs ({args.epochs} epochs of "
            f"{args.labelled // 8} batches), {pooled} for the pool runs ({args.share:.0%} pool per batch, "
            f"{pool_epochs} epochs of {args.labelled // n_l} batches)")


def write(args, miou, secs, dev, seeds_done) -> None:
    base = miou.get(BASELINE)

    def fmt(xs):
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"

    lines = [
        "# KD methods from the cache: labelled images and a pool of unlabelled ones (test split)\n",
        f"Seeds {seeds_done}; {args.labelled} labelled synthetic training images, a pool of {args.pool} unlabelled "
        f"ones (the `unlabeled` split); teacher `demo_teacher` ({args.teacher_epochs} epochs on the labelled images, "
        f"seed 0, one for all seeds); students `demo_student`, batch 8, {steps(args)}; "
        "`train-student` defaults otherwise. Each run's "
        "checkpoint is chosen on the val split (100 images); the table reports the **test** split (100 images). "
        f"Machine: {dev}. Made by `python benchmarks/kd_methods.py`.\n",
        "| run | test mIoU % (mean ± std) | Δ vs CE baseline | per seed | wall time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for name, xs in miou.items():
        delta = "—" if name == TEACHER or not base else f"{100 * (statistics.mean(xs) - statistics.mean(base)):+.2f}"
        lines.append(f"| {name} | {fmt(xs)} | {delta} | {', '.join(f'{100 * x:.2f}' for x in xs)} | "
                     f"{statistics.mean(secs[name]):.0f} |")
    if base:
        per_seed = {n: [x - b for x, b in zip(xs, base)] for n, xs in miou.items() if n not in (TEACHER, BASELINE)}
        lines += ["", "Gain over the CE baseline of the same seed (test mIoU points): " + "; ".join(
            f"{n}: {', '.join(f'{100 * d:+.2f}' for d in ds)}" for n, ds in per_seed.items())]
    tag = "" if args.labelled == 400 else f"-{args.labelled}-labelled"
    path = Path(args.results) / f"kd-methods{tag}-{'cpu' if 'cpu' in dev else 'gpu'}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
