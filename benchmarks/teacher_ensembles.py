"""Stronger teachers at no training cost: an ensemble and multi-scale + flip TTA in the cache,
against the single teacher, on the built-in data (test split, checkpoints chosen on val).

    python benchmarks/teacher_ensembles.py [--seeds 0,1,2] [--labelled 100] [--members 3]
    python benchmarks/teacher_ensembles.py --phase timing   # with nothing else running

Phases (each writes benchmarks/results/teacher-ensembles-<cpu or gpu>.md, keeping the others):

* ``teachers``: ``--members`` demo_teachers (width 48, as the demo's), trained on the
  ``--labelled`` first training images with seeds 0, 1, …, each chosen on val.
* ``quality``: caches of the val and test splits for the single teacher (seed 0), the ensemble
  and the single teacher with TTA (``--scales`` and flips), each combined by the mean of
  probabilities and by the mean of logits; their recorded quality (mIoU, NLL per pixel, each
  member's and the combination's) is the teachers' measurement. The combination rule with the
  lower **val** NLL of the ensemble is the one the students use (and kdcache's default).
* ``students``: `demo_student` with DIST (the best labelled-only method of kd-methods-cpu.md,
  its defaults) from the labelled caches of the single teacher, the ensemble and the TTA
  teacher, and the CE baseline; the same steps and seeds for all.
* ``timing``: over ``--pool`` unlabelled images, each member's inference alone (the build's
  loader and batches, the teacher forward only) against building the ensemble's cache, and
  the bytes of the single and the ensemble caches (same k).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kdcache.core.runs import device_name, resolve_device
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.demo.segmentation import TEACHER_OPTIONS
from kdcache.models.loading import open_weights
from kdcache.pipeline.loaders import make_loader
from kdcache.report.evaluation import evaluate_run
from kdcache.store import CacheStore
from kdcache.store.location import size_of
from kdcache.teacher.cache_build import CacheBuildConfig, TeacherInputs, build_teacher_cache
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

PHASES = ("teachers", "quality", "students", "timing")


def teacher_dirs(out: Path, members: int) -> list[Path]:
    return [out / f"teacher-s{s}" for s in range(members)]


def caches(args, out: Path, rule: str) -> dict[str, dict]:
    """name -> build options, for the three teachers compared."""
    members = [str(t) for t in teacher_dirs(out, args.members)]
    scales = tuple(float(s) for s in args.scales.split(","))
    return {"single": {"weights": members[0]},
            "ensemble": {"weights": members, "combine": rule},
            "tta": {"weights": members[0], "tta_scales": scales, "flip_average": True, "combine": rule}}


def build(path: Path, split: str, n: int | None, options: dict, device: str, **kw) -> Path:
    build_teacher_cache(CacheBuildConfig(out=str(path), split=split, limit=n, topk=4, device=device, **options, **kw),
                        overwrite=True, show_progress=False)
    return path


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default=",".join(PHASES[:3]), help=f"comma-separated: {', '.join(PHASES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labelled", type=int, default=100)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--scales", default="0.75,1,1.25")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--pool", type=int, default=400, help="unlabelled images of the timing phase")
    ap.add_argument("--out", default="runs/teacher-ensembles")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "state.json"
    state = load_state(state_file)
    state["device"] = device_name(resolve_device(args.device))
    state["args"] = vars(args)
    phases = args.phase.split(",")

    def save():
        state_file.write_text(json.dumps(state, indent=1))
        write(args, state)

    if "teachers" in phases:
        for seed, tdir in enumerate(teacher_dirs(out, args.members)):
            t0 = time.perf_counter()
            train(TrainConfig(model="demo_teacher", model_options=TEACHER_OPTIONS, epochs=args.teacher_epochs,
                              limit=args.labelled, seed=seed, out=str(tdir), device=args.device, eval_every=4),
                  overwrite=True, show_progress=False)
            miou = evaluate_run(tdir, split="test", latency=False, qualitative=0, show_progress=False)["miou"]
            state.setdefault("teachers", {})[tdir.name] = {"test_miou": miou, "seconds": time.perf_counter() - t0}
            print(f"{tdir.name}: test mIoU {100 * miou:.2f}", flush=True)
            save()

    if "quality" in phases:
        quality = state["quality"] = {}
        for rule in ("prob", "logit"):
            for name, opts in caches(args, out, rule).items():
                if name == "single" and rule == "logit":
                    continue  # nothing to combine
                for split in ("val", "test"):
                    path = build(out / f"q-{name}-{rule}-{split}.zarr", split, None, opts, args.device)
                    q = CacheStore(path).quality()["rows"]
                    quality[f"{name}/{rule}/{split}"] = q
                    print(f"{name} {rule} {split}: " + ", ".join(f"{r}: {100 * v['miou']:.2f} (NLL {v['nll']:.4f})"
                                                                for r, v in q.items()), flush=True)
        ens = {rule: quality[f"ensemble/{rule}/val"]["combined"]["nll"] for rule in ("prob", "logit")}
        state["rule"] = min(ens, key=ens.get)
        print(f"combination rule chosen on val (ensemble NLL): {state['rule']} {ens}", flush=True)
        save()

    if "students" in phases:
        rule = state.get("rule", "prob")
        runs = state.setdefault("students", {})
        built = {name: build(out / f"train-{name}.zarr", "train", args.labelled, opts, args.device)
                 for name, opts in caches(args, out, rule).items()}
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, cache, method in (("CE baseline", built["single"], "none"), ("DIST, single teacher", built["single"], "dist"),
                                        (f"DIST, ensemble of {args.members}", built["ensemble"], "dist"),
                                        ("DIST, single teacher + TTA", built["tta"], "dist")):
                t0 = time.perf_counter()
                r = train_student(config_from_store(str(cache), methods=[{"name": method}], seed=seed,
                                                    device=args.device, limit=args.labelled, batch_size=8,
                                                    epochs=args.epochs, eval_every=4,
                                                    out=str(out / f"{name.split(',')[0].split()[0].lower()}-"
                                                                  f"{cache.stem}-s{seed}")),
                                  overwrite=True, show_progress=False)
                miou = evaluate_run(Path(r["run"]), split="test", latency=False, qualitative=0,
                                    show_progress=False)["miou"]
                runs.setdefault(name, {})[str(seed)] = {"test_miou": miou, "val_miou": r["best_miou"],
                                                        "seconds": time.perf_counter() - t0}
                print(f"seed {seed} {name}: test mIoU {100 * miou:.2f}", flush=True)
                save()

    if "timing" in phases:
        state["timing"] = timing(args, out)
        save()


def timing(args, out: Path) -> dict:
    """Each member's inference over the pool as a user runs it alone (a fresh data set: images
    loaded and preprocessed, the teacher forward), then once more on the loaded images (the
    forward alone, images in memory); then the single teacher's and the ensemble's cache builds.
    Two rounds."""
    device = resolve_device(args.device)
    members = teacher_dirs(out, args.members)
    result = {"images": args.pool, "rounds": []}

    def infer(model, preprocess, ds) -> float:
        loader = make_loader(TeacherInputs(ds, preprocess), 8, 0, collate_fn=list)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for items in loader:
                model(torch.stack([it["image"] for it in items]).to(device))
        return time.perf_counter() - t0

    for _ in range(2):
        r = {}
        for t in members:
            w = open_weights(t)
            ds = limit(build_dataset("synthetic", "unlabeled"), args.pool)
            model = w.build(num_classes=ds.num_classes, device=device)
            r[f"infer {t.name}"] = infer(model, w.preprocess, ds)
            r[f"forward {t.name}"] = infer(model, w.preprocess, ds)  # images now in memory
        for name, opts in caches(args, out, "logit").items():
            if name == "tta":
                continue
            t0 = time.perf_counter()
            build(out / f"time-{name}.zarr", "unlabeled", args.pool, opts, args.device, workers=0)
            r[f"build {name}"] = time.perf_counter() - t0
            r[f"bytes {name}"] = size_of(out / f"time-{name}.zarr", "logits")
        result["rounds"].append(r)
        print(r, flush=True)
    return result


def fmt(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.2f}"


def delta(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):+.2f}" if xs else "—"


def write(args, state: dict) -> None:
    dev = state["device"]
    kind = "gpu" if "cuda" in dev.lower() else "cpu"
    lines = ["# Stronger teachers in the cache: an ensemble and test-time augmentation (test split)", "",
             f"Built-in synthetic data; {args.labelled} labelled training images; teachers `demo_teacher` (width 48, "
             f"{args.teacher_epochs} epochs on the labelled images, seeds 0..{args.members - 1}, each chosen on val); "
             f"TTA: scales {args.scales} and flips. Machine: {dev}. Made by `python benchmarks/teacher_ensembles.py`.", ""]
    if state.get("teachers"):
        lines += ["## The members", "", "(train times are not comparable: other work shared the CPU during "
                  "teacher-s0's training)", "", "| member | test mIoU % (evaluate) | train time (s) |", "|---|---|---|"]
        for name, t in state["teachers"].items():
            lines.append(f"| {name} | {100 * t['test_miou']:.2f} | {t['seconds']:.0f} |")
        lines.append("")
    q = state.get("quality")
    if q:
        lines += ["## Teacher quality, as the caches record it (`inspect-cache`)", "",
                  "mIoU % and NLL per labelled pixel at the labels' resolution; `prob`: mean of probabilities "
                  "(T = 1), `logit`: mean of logits.", "",
                  "| teacher | rule | val mIoU | val NLL | test mIoU | test NLL |", "|---|---|---|---|---|---|"]
        for key in sorted({k.rsplit("/", 1)[0] for k in q}):
            name, rule = key.split("/")
            for row in q[f"{key}/val"]:
                v, t = q[f"{key}/val"][row], q[f"{key}/test"][row]
                label = name if row == "combined" else f"{name}: {row}"
                lines.append(f"| {label} | {'—' if name == 'single' else rule} | "
                             f"{100 * v['miou']:.2f} | {v['nll']:.4f} | {100 * t['miou']:.2f} | {t['nll']:.4f} |")
        lines += ["", f"Rule chosen on val (the ensemble's lower NLL): **{state.get('rule')}**.", ""]
    s = state.get("students")
    if s:
        base = s.get("CE baseline", {})
        single = s.get("DIST, single teacher", {})
        lines += ["## Students (`demo_student`, DIST from each cache)", "",
                  f"{args.epochs} epochs of {args.labelled} images, batch 8 ({args.epochs * (args.labelled // 8)} optimizer steps: whole batches only), "
                  f"validation every 4 epochs, best-on-val checkpoint evaluated on test; combination rule "
                  f"{state.get('rule')}.", "",
                  "| run | test mIoU % (mean ± std) | Δ vs CE | Δ vs single-teacher DIST | per seed | s per run |",
                  "|---|---|---|---|---|---|"]
        for name, per in s.items():
            seeds = sorted(per)
            xs = [per[k]["test_miou"] for k in seeds]
            d_ce = [per[k]["test_miou"] - base[k]["test_miou"] for k in seeds if k in base]
            d_single = [per[k]["test_miou"] - single[k]["test_miou"] for k in seeds if k in single]
            lines.append(f"| {name} | {fmt(xs)} | {delta(d_ce)} | {delta(d_single)} | "
                         f"{', '.join(f'{100 * x:.2f}' for x in xs)} | "
                         f"{statistics.mean(per[k]['seconds'] for k in seeds):.0f} |")
        lines.append("")
    t = state.get("timing")
    if t:
        lines += ["## Build time and bytes", "",
                  f"{t['images']} unlabelled images, batch 8, the loader in the main process, two rounds in one run "
                  "with nothing else running. *Inference*: each member run alone over a fresh data set (images "
                  "loaded and preprocessed, the forward), as a user would run it; *forward*: the same again on the "
                  "images already in memory. *Build*: the whole `build_teacher_cache` call (content fingerprint of "
                  "every image, the members' forwards, the combination, top-k, the quality counts, encoding and "
                  "writing).", "",
                  "| round | Σ members' inference (s) | ensemble build (s) | ratio | single build (s) | "
                  "ensemble − single build (s) | Σ other members' forward (s) | logits bytes on disk single / "
                  "ensemble |", "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(t["rounds"]):
            infer = [v for k, v in r.items() if k.startswith("infer ")]
            forwards = [v for k, v in r.items() if k.startswith("forward ")]
            lines.append(f"| {i + 1} | {sum(infer):.1f} | {r['build ensemble']:.1f} | "
                         f"{r['build ensemble'] / sum(infer):.2f} | {r['build single']:.1f} | "
                         f"{r['build ensemble'] - r['build single']:.1f} | {sum(forwards[1:]):.1f} | "
                         f"{r['bytes single']} / {r['bytes ensemble']} |")
        lines.append("")
    Path(args.results, f"teacher-ensembles-{kind}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
