"""Does distillation from the cache help? Teacher, CE baseline, KL (cache), KL (online teacher),
AT and SP on the built-in data, over several seeds: mean ± std of val mIoU.

    python benchmarks/kd_methods.py [--seeds 0,1,2] [--epochs 20] [--out runs/kd-methods]

The teacher is trained once per seed (`train-teacher` defaults, ``--teacher-epochs``); its cache
(top-4 logits, stage3 features and attention) is built once per seed; every student is
`demo_student` trained for ``--epochs`` with `train-student` defaults and one method. The
online-teacher KL run uses the same loss code with a live teacher: it must match cached KL
within the seed spread. Writes benchmarks/results/kd-methods-<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kdcache.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.distill import config_from_store, train_student
from kdcache.runs import device_name, resolve_device
from kdcache.training import TrainConfig, train

METHODS = {
    "CE baseline (none)": [{"name": "none"}],
    "KL (cache)": [{"name": "kl"}],
    "KL (online teacher)": "online",
    "AT": [{"name": "at", "student_tap": "stage3", "teacher_tap": "stage3"}],
    "SP": [{"name": "sp", "student_tap": "stage3", "teacher_tap": "stage3"}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--out", default="runs/kd-methods")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    miou: dict[str, list[float]] = {"teacher (demo_teacher)": []}
    secs: dict[str, list[float]] = {"teacher (demo_teacher)": []}
    for seed in seeds:
        tdir = out / f"teacher-s{seed}"
        t0 = time.perf_counter()
        r = train(TrainConfig(model="demo_teacher", epochs=args.teacher_epochs, seed=seed, out=str(tdir),
                              device=args.device), overwrite=True, show_progress=False)
        secs["teacher (demo_teacher)"].append(time.perf_counter() - t0)
        miou["teacher (demo_teacher)"].append(r["best_miou"])
        cache = out / f"cache-s{seed}.zarr"
        build_teacher_cache(CacheBuildConfig(weights=str(tdir), out=str(cache), topk=4, features=("stage3",),
                                             attention=True, device=args.device), overwrite=True, show_progress=False)
        for name, methods in METHODS.items():
            extra = {}
            if methods == "online":
                methods = [{"name": "kl"}]
                extra = {"online_teacher": "demo_teacher", "teacher_weights": str(tdir)}
            cfg = config_from_store(str(cache), methods=methods, epochs=args.epochs, seed=seed, device=args.device,
                                    out=str(out / f"{name.split()[0].lower()}-{'online-' if extra else ''}s{seed}"),
                                    **extra)
            t0 = time.perf_counter()
            r = train_student(cfg, overwrite=True, show_progress=False)
            secs.setdefault(name, []).append(time.perf_counter() - t0)
            miou.setdefault(name, []).append(r["best_miou"])
            print(f"seed {seed} {name}: best val mIoU {100 * r['best_miou']:.2f} ({secs[name][-1]:.0f} s)", flush=True)

    dev = device_name(resolve_device(args.device))
    base = statistics.mean(miou["CE baseline (none)"])

    def fmt(xs):
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"

    lines = [
        "# KD methods from the cache, built-in data (mean ± std over seeds)\n",
        f"Seeds {seeds}; teacher `demo_teacher` ({args.teacher_epochs} epochs), students `demo_student` "
        f"({args.epochs} epochs), `train-teacher`/`train-student` defaults otherwise; best val mIoU on the "
        f"synthetic val split (100 images). Machine: {dev}. Made by `python benchmarks/kd_methods.py`.\n",
        "| run | val mIoU % (mean ± std) | Δ vs CE baseline | per-seed | wall time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for name, xs in miou.items():
        delta = "—" if name.startswith("teacher") else f"{100 * (statistics.mean(xs) - base):+.2f}"
        lines.append(f"| {name} | {fmt(xs)} | {delta} | {', '.join(f'{100 * x:.2f}' for x in xs)} | "
                     f"{statistics.mean(secs[name]):.0f} |")
    path = Path(args.results) / f"kd-methods-{'cpu' if 'cpu' in dev else 'gpu'}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
