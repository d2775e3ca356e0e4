"""Train the built-in teacher and student with identical default settings; record the gap.

    python benchmarks/teacher_student_gap.py [--seeds 0] [--out runs/gap]

Both runs use `kdcache train-teacher`'s defaults on the built-in synthetic data set, one after
the other on the same machine, and are then evaluated with `kdcache evaluate`'s code. Writes a
Markdown table to benchmarks/results/teacher-student-gap-<device>.md: val mIoU, mAcc, aAcc,
#params, training wall time and ms/image, with the device named.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kdcache.core.runs import device_name, resolve_device
from kdcache.report.evaluation import evaluate_run
from kdcache.train.trainer import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--out", default="runs/gap")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    dev = resolve_device(args.device)
    rows = {}
    for model in ("demo_teacher", "demo_student"):
        for seed in seeds:
            out = Path(args.out) / f"{model}-s{seed}"
            t0 = time.perf_counter()
            train(TrainConfig(model=model, seed=seed, out=str(out), device=args.device), overwrite=True)
            wall = time.perf_counter() - t0
            rep = evaluate_run(out, device=args.device, qualitative=0)
            rows.setdefault(model, []).append((rep, wall))
            print(f"{model} seed {seed}: mIoU {100 * rep['miou']:.2f}  train {wall:.0f} s")

    def agg(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = [
        f"# Built-in teacher vs student on the synthetic data set ({device_name(dev)})",
        "",
        f"`python benchmarks/teacher_student_gap.py --seeds {args.seeds}` — `kdcache train-teacher` "
        "defaults for both models, evaluated on the synthetic val split. Mean ± std over seeds "
        f"{args.seeds}; training wall time includes per-epoch validation.",
        "",
        "| model | mIoU % | mAcc % | aAcc % | #params | train wall s | ms/image (batch 1) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, res in rows.items():
        m = agg([100 * r["miou"] for r, _ in res])
        a = agg([100 * r["macc"] for r, _ in res])
        aa = agg([100 * r["aacc"] for r, _ in res])
        w = agg([wall for _, wall in res])
        ms = agg([r["latency"]["ms_per_image"] for r, _ in res])
        lines.append(
            f"| {model} | {m[0]:.2f} ± {m[1]:.2f} | {a[0]:.2f} ± {a[1]:.2f} | {aa[0]:.2f} ± {aa[1]:.2f} "
            f"| {res[0][0]['params'] / 1e6:.3f}M | {w[0]:.0f} | {ms[0]:.2f} |"
        )
    gap = agg([100 * (t["miou"] - s["miou"]) for (t, _), (s, _) in zip(rows["demo_teacher"], rows["demo_student"])])
    lines += ["", f"Teacher − student mIoU: {gap[0]:.2f} ± {gap[1]:.2f} points.", ""]
    slug = "cpu" if dev.type == "cpu" else device_name(dev).lower().replace(" ", "-")
    path = Path(args.results) / f"teacher-student-gap-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
