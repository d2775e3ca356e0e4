"""What distillation costs per training step: cached-KD step / CE-only step (target <= 1.05)
and online-teacher step / cached-KD step, measured side by side in one run.

    python benchmarks/kd_step_time.py --cache runs/demo/cache.zarr --teacher runs/demo/teacher

The three trainers (`none`, `kl` from the cache, `kl` with the online teacher) see the same
batches from the cache pipeline; each step (forward, loss, backward, optimizer step) is timed
after warm-up, in rounds that alternate the three, and the medians are compared. Data loading
is excluded (the batches are prepared beforehand), so the ratio is the compute the KD term adds.
Writes benchmarks/results/kd-step-time-<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdcache.distill import StudentTrainer, config_from_store
from kdcache.runs import device_name
from kdcache.transforms import collate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/demo/cache.zarr")
    ap.add_argument("--teacher", default="runs/demo/teacher")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    variants = {"CE only": dict(methods=[{"name": "none"}]), "KL, cache": dict(methods=[{"name": "kl"}]),
                "KL, online teacher": dict(methods=[{"name": "kl"}], online_teacher="demo_teacher",
                                           teacher_weights=args.teacher)}
    trainers, states = {}, {}
    batches = None
    for name, kw in variants.items():
        cfg = config_from_store(args.cache, device=args.device, out="/tmp/kd-step", batch_size=args.batch_size, **kw)
        tr = StudentTrainer(cfg)
        train_ds, val_ds = tr.build_datasets()
        pipe, _ = tr.build_pipelines(train_ds, val_ds)
        torch.manual_seed(0)
        model = tr.build_model(train_ds.num_classes).to(tr.device)
        tr.class_weight = None
        opt = torch.optim.AdamW(list(model.parameters()) + tr.extra_parameters(), lr=1e-3)
        if batches is None:
            pipe.set_epoch(0)
            items = [pipe[i] for i in range(args.batch_size * args.steps)]
            batches = [collate(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
        trainers[name] = tr
        states[name] = (model, opt)
    dev = trainers["CE only"].device

    def step(name, batch):
        tr = trainers[name]
        model, opt = states[name]
        b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if tr.teacher is not None:
            b = {k: v for k, v in b.items() if not k.startswith("kd/")}
        loss, _ = tr.compute_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = {n: [] for n in variants}
    for name in variants:  # warm-up (kernel compilation, allocator)
        for b in batches[:3]:
            step(name, b)
    for _ in range(args.rounds):
        for name in variants:
            for b in batches:
                t0 = time.perf_counter()
                step(name, b)
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    r1 = med["KL, cache"] / med["CE only"]
    r2 = med["KL, online teacher"] / med["KL, cache"]
    lines = [
        "# Training step time: what the KD term costs\n",
        f"`demo_student`, batch {args.batch_size}, batches from `{args.cache}` prepared beforehand (no data loading in "
        f"the timing); median of {args.rounds} alternating rounds × {args.steps} steps. Machine: {device_name(dev)}. "
        "Made by `python benchmarks/kd_step_time.py`.\n",
        "| step | median ms |", "|---|---|",
        *[f"| {n} | {m:.2f} |" for n, m in med.items()],
        "",
        f"cached-KD step / CE-only step = **{r1:.3f}** (target ≤ 1.05); online-teacher step / cached-KD step = "
        f"**{r2:.2f}**.",
    ]
    tag = "cpu" if dev.type == "cpu" else "gpu"
    path = Path(args.results) / f"kd-step-time-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
