"""What distillation costs per training step: cached-KD step / CE-only step (target <= 1.05)
and online-teacher step / cached-KD step, measured side by side in one run.

    python benchmarks/kd_step_time.py --cache runs/demo/cache.zarr --teacher runs/demo/teacher

The three trainers (`none`, `kl` from the cache, `kl` with the online teacher) see the same
batches from the cache pipeline; each step (forward, loss, backward, optimizer step) is timed
after warm-up, in rounds that alternate the three, and the medians are compared. Data loading
is excluded (the batches are prepared beforehand and, on a GPU, copied to it before the timing),
so the ratio is the compute the KD term adds; CUDA is synchronised after every step.
Writes benchmarks/results/kd-step-time-<tag>.md: ``cpu`` on a CPU, the GPU's name as a slug on
CUDA (e.g. ``nvidia-h100-80gb-hbm3``), or ``--tag``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdcache.core.runs import checkout_commit, device_name, device_slug
from kdcache.pipeline.transforms import collate
from kdcache.train.student import StudentTrainer, config_from_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/demo/cache.zarr")
    ap.add_argument("--teacher", default="runs/demo/teacher")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="the first N training samples (a cache built with --limit)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="results file suffix (default: cpu, or the GPU's name as a slug)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS steps of each of CE only and KL, cache (cProfile) and list the functions "
                         "whose own time a KD step adds most (a small step is bound by its host)")
    args = ap.parse_args()

    variants = {"CE only": dict(methods=[{"name": "none"}]), "KL, cache": dict(methods=[{"name": "kl"}]),
                "KL, online teacher": dict(methods=[{"name": "kl"}], online_teacher="demo_teacher",
                                           teacher_weights=args.teacher)}
    trainers, states, pipes = {}, {}, {}
    for name, kw in variants.items():
        cfg = config_from_store(args.cache, device=args.device, out="/tmp/kd-step", batch_size=args.batch_size,
                                limit=args.limit, **kw)
        tr = StudentTrainer(cfg)
        ready = tr.prepare()  # as the run sets itself up (the same seed: the same initial student)
        pipe, model = ready.batches.pipeline, ready.model
        tr.class_weight = None
        opt = torch.optim.AdamW(list(model.parameters()) + tr.extra_parameters(), lr=1e-3)
        trainers[name] = tr
        states[name] = (model, opt)
        pipes[name] = pipe
    # every trainer sees the same batches, from the pipeline that reads the cached logits (the CE-only
    # trainer's reads no cache: --method none needs none)
    pipe = pipes["KL, cache"]
    pipe.set_epoch(0)
    items = [pipe[i] for i in range(args.batch_size * args.steps)]
    batches = [collate(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
    dev = trainers["CE only"].device
    # on the device before any timing (a no-op on the CPU): host-to-device copies are data loading
    batches = [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()} for batch in batches]

    def step(name, batch):
        tr = trainers[name]
        model, opt = states[name]
        b = batch
        if tr.teacher is not None:
            b = {k: v for k, v in b.items() if not k.startswith("kd/")}
        with torch.autocast(dev.type, dtype=torch.float16, enabled=tr.amp):  # as training does (CUDA only)
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
        + ("Forward under fp16 autocast, as `kdcache train-student` runs on CUDA. " if trainers["CE only"].amp else "")
        + f"Commit {checkout_commit() or 'unknown'}. Made by `python benchmarks/kd_step_time.py`.\n",
        "| step | median ms |", "|---|---|",
        *[f"| {n} | {m:.2f} |" for n, m in med.items()],
        "",
        f"cached-KD step / CE-only step = **{r1:.3f}** (target ≤ 1.05); online-teacher step / cached-KD step = "
        f"**{r2:.2f}**.",
    ]
    if args.profile:
        lines += ["", *host_added(lambda name: [step(name, batches[i % len(batches)]) for i in range(args.profile)],
                                  args.profile)]
    tag = args.tag or device_slug(dev)
    path = Path(args.results) / f"kd-step-time-{tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def host_added(run, steps: int, top: int = 25) -> list[str]:
    """Markdown: the functions whose own time (cProfile's tottime) per step is larger in ``run("KL, cache")``
    than in ``run("CE only")``, ``steps`` steps each, the ``top`` largest differences first."""
    import cProfile
    import pstats

    own = {}
    for name in ("CE only", "KL, cache"):
        prof = cProfile.Profile()
        prof.enable()
        run(name)
        prof.disable()
        own[name] = {f"{Path(f).name}:{line}({fn})": (nc, tt) for (f, line, fn), (_, nc, tt, _, _)
                     in pstats.Stats(prof).stats.items()}
    total = {name: sum(tt for _, tt in fs.values()) / steps * 1e3 for name, fs in own.items()}
    rows = []
    for key, (nc, tt) in own["KL, cache"].items():
        nc0, tt0 = own["CE only"].get(key, (0, 0.0))
        rows.append(((tt - tt0) / steps * 1e6, (nc - nc0) / steps, key))
    rows.sort(reverse=True)
    return [f"## Host time a KD step adds (cProfile, {steps} steps of each)", "",
            f"Profiled host time a step: CE only {total['CE only']:.2f} ms, KL from the cache {total['KL, cache']:.2f} ms "
            "(the profiler inflates both). The functions whose own time a step grows most:", "",
            "| function | µs more a step | calls more a step |", "|---|---|---|",
            *[f"| `{key}` | {us:.1f} | {calls:g} |" for us, calls, key in rows[:top]]]


if __name__ == "__main__":
    main()
