"""Image classification through the cache: does a cached teacher make a better student, is a
cached teacher as good as a live one, and what does each cache form cost in bytes and reading?

    python benchmarks/classification.py [--phase teacher,caches,tune,students,reader] [--seeds 0,1,2]

On the built-in ``shapes`` data (1000 labelled training images, 500 val, 1000 test; 32 x 32):

* ``teacher``: ``demo_cls_teacher`` (width 32), trained on the training split, chosen on val
  (skipped when ``--teacher RUN`` names one already trained with the same recipe).
* ``caches``: its top-5 cache of the training split in three forms: ``logits`` (its logits on
  the whole image), ``views`` (FKD: ``--views`` random-resized crops per image, each with its
  own top-5), ``label_map`` (ReLabel: its 8 x 8 class map before pooling, pooled over each
  random crop a student draws); bytes per image on disk and raw, against FKD's layout.
* ``tune``: the KD temperature (1 or 4) chosen on **val** with seed 0 (the label-map form);
  the CE baseline has no KD option to tune. Every run shares lr, schedule, epochs, batch and crops.
* ``students``: ``demo_cls_student`` for every seed: CE only, KD (``kl``) from each form, and KD
  from the live teacher run on every training crop (``--online-teacher cache``, what FKD's
  views approximate); top-1/top-5 on **test** with each run's best-on-val checkpoint.
* ``fidelity``: for the students' own training crops, how close the logits and label-map
  targets are to the teacher run on each crop (top class, KL, accuracy).
* ``reader``: samples/s through the training DataLoader (the cached targets read and taken
  through each crop), each form against the same loader without a cache, interleaved in rounds.

Writes ``benchmarks/results/classification-cpu.md`` (or ``-gpu``) and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.core.runs import device_name, resolve_device
from kdcache.models.loading import open_weights
from kdcache.report.evaluation import evaluate_run
from kdcache.store import CacheStore
from kdcache.store.location import size_of
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

#: the stored views are drawn as the students' own crops are (the same share of the area)
FORMS = {"logits": {}, "views": {"views": 8, "view_area": (0.5, 1.0)}, "label_map": {"label_map": True}}
TEACHER = {"model": "demo_cls_teacher", "dataset": "shapes", "epochs": 40, "batch_size": 32, "lr": 2e-3,
           "crop_area": (0.5, 1.0), "workers": 0}
STUDENT = {"model": "demo_cls_student", "epochs": 30, "batch_size": 32, "lr": 3e-3, "crop_area": (0.5, 1.0),
           "workers": 0}
K = 5
#: FKD's per-crop record as published (region coordinates, flip, top-k probabilities and class
#: ids), each value stored as fp16 (which is why FKD loses class ids above 2048): 4 + 1 + k + k
FKD_VALUES_PER_CROP = 4 + 1 + 2 * K


def student(cache: Path, out: Path, seed: int, kd: dict | None, use_views: bool = False,
            online: bool = False) -> dict:
    methods = [{"name": "none"}] if kd is None else [{"name": "kl", **kd}]
    cfg = config_from_store(str(cache), out=str(out), seed=seed, methods=methods, use_views=use_views,
                            online_teacher="cache" if online else None, **STUDENT)
    t0 = time.perf_counter()
    result = train_student(cfg, overwrite=True, show_progress=False)
    return {"val_top1": result["best_miou"], "seconds": time.perf_counter() - t0}


def test_scores(run: Path) -> dict:
    rep = evaluate_run(run, split="test", qualitative=0, latency=False, show_progress=False)
    return {"top1": rep["top1"], "top5": rep["top5"], "macc": rep["macc"]}


def reader_rate(cache: Path, use_views: bool, kd: bool, rounds: int) -> list[float]:
    """Samples/s through one epoch of the training DataLoader (no model), ``rounds`` times."""
    cfg = config_from_store(str(cache), out="/tmp/kdcache-reader-bench", use_views=use_views,
                            methods=[{"name": "kl"}] if kd else [{"name": "none"}], **STUDENT)
    trainer = StudentTrainer(cfg, overwrite=True, show_progress=False)
    train_ds, val_ds = trainer.build_datasets()
    batches, _ = trainer.build_batches(train_ds, val_ds)
    rates = []
    for r in range(rounds):
        t0 = time.perf_counter()
        n = sum(len(b["id"]) for b in batches.loader(r))
        rates.append(n / (time.perf_counter() - t0))
    return rates


def fidelity(out: Path, teacher: Path, n: int, temperature: float) -> dict:
    """How close each cached form's target for a training crop is to the teacher run on that
    crop (what ``--online-teacher`` gives): over the first ``n`` training items of epoch 0 (the
    crops the students draw), the share whose top class agrees, the KL divergence from the live
    teacher's (k + 1)-bin distribution at ``temperature``, and the top class's accuracy."""
    model = open_weights(str(teacher)).build().eval()
    pipes = {}
    for form in ("logits", "label_map"):
        cfg = config_from_store(str(out / f"{form}.zarr"), out="/tmp/kdcache-fidelity-bench", **STUDENT)
        trainer = StudentTrainer(cfg, overwrite=True, show_progress=False)
        train_ds, val_ds = trainer.build_datasets()
        pipes[form] = trainer.build_batches(train_ds, val_ds)[0].pipeline
    T = temperature
    stats = {form: {"agree": [], "kl": [], "correct": []} for form in pipes}
    stats["live teacher on the crop"] = {"agree": [], "kl": [], "correct": []}
    for i in range(n):
        items = {form: pipe[i] for form, pipe in pipes.items()}
        x = items["logits"]["image"]
        with torch.no_grad():
            z = model(x[None]).logits.flatten().double()
        label = int(items["logits"]["label"].reshape(-1)[0])
        stats["live teacher on the crop"]["agree"].append(1.0)
        stats["live teacher on the crop"]["kl"].append(0.0)
        stats["live teacher on the crop"]["correct"].append(float(int(z.argmax()) == label))
        for form, item in items.items():
            ids = item["kd/indices"].flatten().long()
            v = item["kd/values"].flatten().double()
            tail = item["kd/tail"].double().flatten()[0]
            C, k = len(z), len(ids)
            target = torch.log_softmax(torch.cat([v / T, (np.log(C - k) + (tail - np.log(C - k)) / T)[None]]), 0)
            p = torch.softmax(z / T, 0)
            rest = torch.ones(C, dtype=torch.bool)
            rest[ids] = False
            live = torch.cat([p[ids], p[rest].sum()[None]]).clamp_min(1e-30)
            stats[form]["agree"].append(float(int(ids[0]) == int(z.argmax())))
            stats[form]["kl"].append(float((live * (live.log() - target)).sum()))
            stats[form]["correct"].append(float(int(ids[0]) == label))
    return {form: {key: statistics.mean(vals) for key, vals in st.items()} for form, st in stats.items()}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="teacher,caches,tune,students,fidelity,reader")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/bench-classification")
    ap.add_argument("--teacher", default=None, help="a teacher run trained with this script's recipe")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forms", default="", help="caches: build only these forms (comma-separated)")
    ap.add_argument("--keep", action="store_true", help="students: keep the (student, seed) results already in the "
                                                         "state file, except those of --redo")
    ap.add_argument("--redo", default="", help="students: comma-separated student names to run again with --keep")
    args = ap.parse_args()
    phases = set(args.phase.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    device = resolve_device("auto")
    state["machine"] = device_name(device)
    teacher = Path(args.teacher) if args.teacher else out / "teacher"

    def save():
        state_path.write_text(json.dumps(state, indent=2))

    if "teacher" in phases and not args.teacher:
        cfg = TrainConfig(out=str(teacher), **TEACHER)
        t0 = time.perf_counter()
        train(cfg, overwrite=True, show_progress=False)
        state["teacher_seconds"] = time.perf_counter() - t0
    if "caches" in phases:
        state["teacher"] = {**test_scores(teacher), "run": str(teacher)}
        state.setdefault("caches", {})
        only = set(filter(None, args.forms.split(",")))
        for form, opts in FORMS.items():
            if only and form not in only:
                continue
            path = out / f"{form}.zarr"
            t0 = time.perf_counter()
            build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(path), dataset="shapes", split="train",
                                                 topk=K, workers=0, **opts), overwrite=True, show_progress=False)
            store = CacheStore(str(path))
            n = store.schema.num_samples
            raw = sum(a.nbytes for a in (store.array(s.path) for s in store.schema.map_specs))
            if store.schema.views:
                raw += store.array("views/params").nbytes
            state["caches"][form] = {"seconds": time.perf_counter() - t0, "disk_bytes_per_image": size_of(path) / n,
                                     "raw_target_bytes_per_image": raw / n,
                                     "views": store.schema.view_count, "map_size": list(store.schema.map_size)}
        save()
    kd = {"temperature": state.get("temperature", 4.0)}
    if "tune" in phases:
        tune = {}
        for T in (1.0, 4.0):
            tune[str(T)] = student(out / "label_map.zarr", out / f"tune-T{T:g}", 0, {"temperature": T})["val_top1"]
        state["tune"] = tune
        state["temperature"] = float(max(tune, key=tune.get))
        kd = {"temperature": state["temperature"]}
        save()
    if "students" in phases:
        runs = state.setdefault("students", {})
        plan = {"CE": ("logits", None, False, False), "KD logits (whole image)": ("logits", kd, False, False),
                "KD views (FKD)": ("views", kd, True, False), "KD label map (ReLabel)": ("label_map", kd, False, False),
                "KD online teacher on each crop": ("logits", kd, False, True)}
        redo = set(filter(None, args.redo.split(",")))
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, (form, method, views, online) in plan.items():
                if args.keep and name not in redo and str(seed) in runs.get(name, {}):
                    continue
                run = out / f"s{seed}-{form}-{'ce' if method is None else ('online' if online else 'kd')}"
                r = student(out / f"{form}.zarr", run, seed, method, views, online)
                r.update(test_scores(run))
                runs.setdefault(name, {})[str(seed)] = r
                save()
                print(name, seed, r, flush=True)
    if "fidelity" in phases:
        state["fidelity"] = fidelity(out, teacher, 500, state.get("temperature", 4.0))
        save()
    if "reader" in phases:
        rates: dict[str, list[float]] = {"no cache (CE)": [], "logits": [], "views": [], "label_map": []}
        for _ in range(args.rounds):  # interleaved: a slow spell falls on every form
            rates["no cache (CE)"] += reader_rate(out / "logits.zarr", False, False, 1)
            rates["logits"] += reader_rate(out / "logits.zarr", False, True, 1)
            rates["views"] += reader_rate(out / "views.zarr", True, True, 1)
            rates["label_map"] += reader_rate(out / "label_map.zarr", False, True, 1)
        state["reader"] = {k: statistics.median(v) for k, v in rates.items()}
        save()
    write_report(state, Path(__file__).parent / "results" / f"classification-{'gpu' if device.type == 'cuda' else 'cpu'}")


def write_report(state: dict, base: Path) -> None:
    lines = ["# Image classification through the cache (built-in shapes data)", "",
             f"Machine: {state['machine']}. Written by `benchmarks/classification.py`; teacher "
             f"`demo_cls_teacher` (width 32, {TEACHER['epochs']} epochs), students `demo_cls_student` "
             f"({STUDENT['epochs']} epochs, AdamW lr {STUDENT['lr']:g}, batch {STUDENT['batch_size']}, random-resized "
             f"crops of {STUDENT['crop_area'][0]:g}–{STUDENT['crop_area'][1]:g} of the area + flips), top-{K} caches; "
             "checkpoints chosen on val, scores on the 1000 test images.", ""]
    if "teacher" in state:
        t = state["teacher"]
        lines += [f"Teacher on test: top-1 {100 * t['top1']:.2f}, top-5 {100 * t['top5']:.2f}.", ""]
    if "tune" in state:
        lines += ["KD temperature chosen on val (seed 0, label-map form): "
                  + ", ".join(f"T = {float(k):g}: {100 * v:.2f}" for k, v in state["tune"].items())
                  + f" → T = {state['temperature']:g}.", ""]
    if "students" in state:
        runs = state["students"]
        ce = runs.get("CE", {})
        lines += ["## Students (test, mean ± sd over seeds)", "",
                  "| student | top-1 | Δ top-1 vs CE (per seed) | top-5 | mAcc | seconds/run |", "|---|---|---|---|---|---|"]
        for name, per in runs.items():
            seeds = sorted(per)
            t1 = mean_sd([per[s]["top1"] for s in seeds])
            t5 = mean_sd([per[s]["top5"] for s in seeds])
            ma = mean_sd([per[s]["macc"] for s in seeds])
            deltas = [per[s]["top1"] - ce[s]["top1"] for s in seeds if s in ce]
            d = (f"{100 * statistics.mean(deltas):+.2f} ({', '.join(f'{100 * x:+.1f}' for x in deltas)})"
                 if deltas and name != "CE" else "—")
            secs = statistics.mean(per[s]["seconds"] for s in seeds)
            lines.append(f"| {name} | {100 * t1[0]:.2f} ± {100 * t1[1]:.2f} | {d} | {100 * t5[0]:.2f} ± "
                         f"{100 * t5[1]:.2f} | {100 * ma[0]:.2f} ± {100 * ma[1]:.2f} | {secs:.0f} |")
        lines += ["", "The seconds are wall time on a shared machine, not a benchmark of speed.", ""]
    if "caches" in state:
        lines += ["## Bytes per image", "",
                  f"FKD's published per-crop record (crop box, flip, top-{K} probabilities and ids; "
                  f"{FKD_VALUES_PER_CROP} values, taken as fp16 each): {2 * FKD_VALUES_PER_CROP} B per crop.", "",
                  "| form | targets | raw B / image | on disk B / image | FKD layout, same crops |", "|---|---|---|---|---|"]
        for form, c in state["caches"].items():
            what = {"logits": "top-5 logits + tail on the whole image", "views": f"{c['views']} views: box + flip "
                    f"(7 fp32) + top-5 + tail each, and the whole image's", "label_map":
                    f"{c['map_size'][0]}x{c['map_size'][1]} cells x (top-5 + tail)"}[form]
            fkd = 2 * FKD_VALUES_PER_CROP * max(1, c["views"])
            lines.append(f"| {form} | {what} | {c['raw_target_bytes_per_image']:.0f} | "
                         f"{c['disk_bytes_per_image']:.0f} | {fkd} ({max(1, c['views'])} crop(s)) |")
        lines += ["", "Raw: the target arrays' bytes (values fp16, ids uint8 for 10 classes, tail fp16, view "
                  "geometry fp32). On disk: the whole store (per-sample chunks with their compression header and "
                  "crc32c, shard indices, ids, hashes, the teacher's quality arrays) divided by the images.", ""]
    if "fidelity" in state:
        lines += ["## How close each form's target for a training crop is to the teacher on that crop", "",
                  f"The first 500 training items of epoch 0 (the students' own crops), T = {state.get('temperature', 4):g}; "
                  "the stored-views form is the teacher on its crops by construction (tested).", "",
                  "| target | top class = the live teacher's | KL(live ‖ target), (k+1) bins | top class correct |",
                  "|---|---|---|---|"]
        for form, f in state["fidelity"].items():
            lines.append(f"| {form} | {100 * f['agree']:.1f} % | {f['kl']:.4f} | {100 * f['correct']:.1f} % |")
        lines.append("")
    if "reader" in state:
        r = state["reader"]
        base_rate = r["no cache (CE)"]
        lines += ["## Reader throughput (training DataLoader, one process, no model)", "",
                  "| targets read | samples/s (median of rounds) | vs no cache |", "|---|---|---|"]
        for k, v in r.items():
            lines.append(f"| {k} | {v:.0f} | {v / base_rate:.2f}x |")
        lines.append("")
    base.with_suffix(".md").write_text("\n".join(lines))
    base.with_suffix(".json").write_text(json.dumps(state, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
