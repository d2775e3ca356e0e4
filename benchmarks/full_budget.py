"""Does distillation pay at a full training budget? Two students of one patient teacher, every
recipe chosen on val, then five seeds on test (issue 49 §4).

    python benchmarks/full_budget.py [--phase teacher,caches,grid,students] [--pairs demo,compact]

The study the issue asks for, on the built-in road scenes (400 training images, val 100, test
rendered at 1000):

* **The teacher** is patient (Beyer et al., CVPR 2022): `demo_teacher` trained for the students'
  own 160 epochs, not the 24 of the earlier benchmarks (whose teacher stood 6.4 points above
  `demo_student`). Kept beside the state (``full-budget-segmentation-cpu-teacher/``), as
  ``cached_vs_online.py`` keeps its own, so a later sitting reads the same weights.
* **Two pairs**: ``demo`` (`demo_student`, 0.039 M parameters, 43x smaller) and ``compact``
  (`compact_student`, 0.247 M, 6.8x smaller: the literature's size ratio).
* **The budget**: 160 epochs, batch 8, the library's student recipe (AdamW 2e-3, poly), the same
  for CE and every KD arm. CE's val curve is reported at each quarter (has it levelled off?).
* **The grid** (``grid``): every arm of :data:`GRID` on seed 0, scored on **val** only (best
  epoch), in the order listed, pair after pair; no test score is read. The CE baseline's grid
  is its augmentation (with and without cutmix), as much tuning as a method's. Forms: ``image``
  (the default cache: the teacher on the whole image, top-4 + tail, a crop takes its cells),
  ``schedule`` (the teacher on every crop the seed's student draws; equal to the live teacher
  to the bit, tested, so the online arm is not trained again) and ``schedule cutmix`` (the same
  with ``--mix cutmix``: function matching).
* **The choice** (fixed here, before any run): per pair, the CE arm of the best val score is the
  baseline; the KD arms are ranked by val and the best :data:`FINALISTS` go to the students phase,
  and, on the best of them, its teacher-aware row (``mask=teacher_correct``).
* **The students** (``students``): the baseline and the finalists for seeds 0-4 (seed 0's grid
  run stands in), each scored on test once with its best-on-val checkpoint; paired differences
  against the baseline and between the finalists; the share of the teacher-student gap
  recovered.

The state (``benchmarks/results/full-budget-segmentation-cpu.json``) keeps every finished run, so
a sitting cut short goes on where it stopped; the results file is written from it after each run.
The settings below were fixed in a commit before the first run; the results file names it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from cached_vs_online import finished, paired, run_record, test_score

from kdcache.core.outputs import file_sha256
from kdcache.core.runs import checkout_commit, device_name, resolve_device
from kdcache.models import build_model, count_parameters
from kdcache.models.loading import open_weights
from kdcache.store import CacheStore
from kdcache.store.location import size_of
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

TEACHER = {"model": "demo_teacher", "dataset": "synthetic", "epochs": 160, "workers": 0}
PAIRS = {"demo": "demo_student", "compact": "compact_student"}
#: every arm's recipe (CE and KD alike), and what cached_vs_online's helpers read of a task
TASK = {"student": {"epochs": 160, "batch_size": 8, "workers": 0}, "test_size": 1000, "score": "miou"}
TOPK = 4
#: the synthetic data's options (the defaults: 400 training images of 96 x 128, val 100)
DATA_OPTIONS: dict = {}
CUTMIX = {"mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 1.0}
SEEDS = (0, 1, 2, 3, 4)
GRID_SEED = 0
FINALISTS = 3

#: the grid, in the order it trains: arm -> (method spec or None for CE, form, mixed). The
#: methods' settings: kl and dist at the library's defaults (T = 1; weights 0.5 and 0.25, chosen on
#: val at this budget with the 24-epoch teacher) and at weight 1 (function matching lets the
#: teacher's term lead); cwd at its paper's segmentation settings (T = 4, weight 3); dist with logit
#: standardisation; bpkd at its paper's settings
GRID: dict[str, tuple[dict | None, str, bool]] = {
    "CE": (None, "image", False),
    "CE cutmix": (None, "image", True),
    "DIST schedule": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "schedule", False),
    "DIST schedule cutmix": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "schedule cutmix", True),
    "DIST w=1 schedule cutmix": ({"name": "dist", "weight": 1.0, "temperature": 1.0}, "schedule cutmix", True),
    "KL schedule": ({"name": "kl", "weight": 0.5, "temperature": 1.0}, "schedule", False),
    "KL w=1 schedule cutmix": ({"name": "kl", "weight": 1.0, "temperature": 1.0}, "schedule cutmix", True),
    "DIST image": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "image", False),
    "DIST w=1 schedule": ({"name": "dist", "weight": 1.0, "temperature": 1.0}, "schedule", False),
    "CWD schedule": ({"name": "cwd", "weight": 3.0, "temperature": 4.0}, "schedule", False),
    "DIST standardize schedule cutmix": ({"name": "dist", "weight": 1.0, "temperature": 1.0, "standardize": True},
                                         "schedule cutmix", True),
    "BPKD schedule": ({"name": "bpkd"}, "schedule", False),
    "CWD schedule cutmix": ({"name": "cwd", "weight": 3.0, "temperature": 4.0}, "schedule cutmix", True),
}
#: each form's store in the working folder (a schedule's: one seed's crops)
STORES = {"image": "image.zarr", "schedule": "schedule-s{seed}.zarr", "schedule cutmix": "schedule-cutmix-s{seed}.zarr"}
TEACHER_AWARE = {"mask": "teacher_correct"}


def arm_key(pair: str, arm: str, seed: int) -> str:
    return f"{pair} | {arm} | seed {seed}"


def run_folder(out: Path, pair: str, arm: str, seed: int) -> Path:
    return out / f"{pair}-{arm.lower().replace('=', '').replace(' ', '-')}-s{seed}"


def finalists(state: dict, pair: str) -> tuple[str | None, list[str]]:
    """The pair's baseline (the CE arm of the best val) and its finalists (the best KD arms by
    val, then the best one's teacher-aware row), once every grid arm of the pair is in."""
    grid = state.get("runs", {})
    vals = {arm: grid[arm_key(pair, arm, GRID_SEED)]["val"] for arm in GRID if arm_key(pair, arm, GRID_SEED) in grid}
    if len(vals) < len(GRID):
        return None, []
    ce = max((a for a in GRID if GRID[a][0] is None), key=vals.get)
    kd = sorted((a for a in GRID if GRID[a][0] is not None), key=lambda a: -vals[a])[:FINALISTS]
    return ce, [*kd, f"{kd[0]} + teacher-aware"]


def recipe(arm: str) -> tuple[dict | None, str, bool]:
    """An arm's (method, form, mixed): a grid arm's, or a finalist's teacher-aware row."""
    if arm.endswith(" + teacher-aware"):
        method, form, mixed = GRID[arm[:-len(" + teacher-aware")]]
        return {**method, **TEACHER_AWARE}, form, mixed
    return GRID[arm]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="teacher,caches,grid,students")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--out", default="runs/full-budget", help="working folder (stores and runs)")
    ap.add_argument("--state", default=str(Path(__file__).parent / "results" / "full-budget-segmentation-cpu.json"))
    args = ap.parse_args()
    phases, pairs = set(args.phase.split(",")), args.pairs.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = Path(args.state)
    results = state_path.with_suffix(".md")
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if phases == {"report"}:
        write_report(state, results)
        return
    device = resolve_device("auto")
    state["machine"] = device_name(device)
    head = checkout_commit(Path(__file__).parent)
    state.setdefault("commits", [])
    if head and head not in state["commits"]:
        state["commits"].append(head)
    kept = state_path.with_name(state_path.stem + "-teacher")

    def save() -> None:
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)
        write_report(state, results)

    if "teacher" in phases and not (kept / "best.pt").exists():
        work = out / "teacher"
        t0 = time.perf_counter()
        train(TrainConfig(out=str(work), dataset_options=dict(DATA_OPTIONS), **TEACHER), overwrite=True,
              show_progress=False)
        part = kept.with_name(kept.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for name in ("best.pt", "config.json", "metrics.jsonl"):
            shutil.copyfile(work / name, part / name)
        part.replace(kept)  # whole or not at all
        state["teacher_seconds"] = time.perf_counter() - t0
        state["teacher_machine"] = device_name(device)
        save()
    if not (kept / "best.pt").exists():
        raise SystemExit(f"error: no teacher at {kept}: run the teacher phase first")
    fingerprint = open_weights(str(kept)).weights_sha256()
    if state.get("teacher", {}).get("weights_sha256", fingerprint) != fingerprint:
        raise SystemExit(f"error: the teacher in {kept} is not the one {state_path} was measured with")
    if "teacher" not in state:
        log = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()]
        state["teacher"] = {**test_score(TASK, kept), "weights_sha256": fingerprint,
                            "val_curve": [r["val_miou"] for r in log if "val_miou" in r]}
        state["params"] = {name: count_parameters(build_model(model, 11)) for name, model
                           in {"teacher": TEACHER["model"], **PAIRS}.items()}
        save()

    def store(form: str, seed: int) -> Path:
        path = out / STORES[form].format(seed=seed)
        if (path / "zarr.json").exists():
            s = CacheStore(str(path))
            if s.schema.teacher.get("weights_sha256") != file_sha256(kept / "best.pt"):
                shutil.rmtree(path)  # another teacher's store (an earlier working folder)
            elif s.done().all():
                return path
        extra = {} if form == "image" else {"schedule_epochs": TASK["student"]["epochs"], "schedules": 1,
                                            "first_schedule": seed, **(CUTMIX if form == "schedule cutmix" else {})}
        t0 = time.perf_counter()
        build_teacher_cache(CacheBuildConfig(weights=str(kept), out=str(path), split="train", dataset="synthetic",
                                             dataset_options=dict(DATA_OPTIONS), topk=TOPK, workers=0, **extra),
                            show_progress=False)
        n = CacheStore(str(path)).schema.num_samples
        state.setdefault("caches", {})[f"{form} seed {seed}" if extra else form] = {
            "seconds": time.perf_counter() - t0, "disk_bytes_per_image": size_of(path) / n,
            "machine": device_name(device)}
        save()
        return path

    def run(pair: str, arm: str, seed: int) -> dict:
        key = arm_key(pair, arm, seed)
        if key in state.get("runs", {}):
            return state["runs"][key]
        method, form, mixed = recipe(arm)
        cache = store(form, seed)
        folder = run_folder(out, pair, arm, seed)
        cfg = config_from_store(str(cache), out=str(folder), seed=seed, model=PAIRS[pair],
                                methods=[method or {"name": "none"}], **TASK["student"], **(CUTMIX if mixed else {}))
        t0 = time.perf_counter()
        train_student(cfg, overwrite=True, show_progress=False)
        assert finished(TASK, folder)
        r = {**run_record(TASK, folder), "seconds": time.perf_counter() - t0, "machine": device_name(device)}
        state.setdefault("runs", {})[key] = r
        save()
        return r

    if "caches" in phases:
        store("image", 0)
    if "grid" in phases:
        for arm in GRID:
            for pair in pairs:
                run(pair, arm, GRID_SEED)
    if "students" in phases:
        for pair in pairs:
            ce, kd = finalists(state, pair)
            if ce is None:
                raise SystemExit(f"error: the grid of pair {pair} is not complete: run the grid phase first")
            for seed in SEEDS:
                for arm in (ce, *kd):
                    r = run(pair, arm, seed)
                    if "score" not in r:  # scored on test once, with its best-on-val checkpoint
                        r.update(test_score(TASK, run_folder(out, pair, arm, seed)))
                        save()
    save()


def write_report(state: dict, path: Path) -> None:
    runs = state.get("runs", {})
    lines = ["# Distillation at a full budget: two students of a patient teacher", "",
             f"Machine: {state.get('machine', '?')}. Written by `benchmarks/full_budget.py` at commit(s) "
             f"{', '.join(state.get('commits', []))} (settings fixed before the first run). Teacher `{TEACHER['model']}`, "
             f"{TEACHER['epochs']} epochs; students {TASK['student']['epochs']} epochs, batch "
             f"{TASK['student']['batch_size']}, every arm with the same data, steps and crops. Grid on seed {GRID_SEED}, "
             f"val only; the finalists on seeds {', '.join(map(str, SEEDS))}, checkpoints on val, scores on "
             f"{TASK['test_size']} test images (mIoU %).", ""]
    for note in state.get("notes", []):
        lines += [note, ""]
    t = state.get("teacher")
    if t:
        curve = t["val_curve"]
        lines += [f"Teacher on test: {100 * t['score']:.2f}; its val curve at each quarter: "
                  + ", ".join(f"epoch {i + 1}: {100 * curve[i]:.2f}" for i in quarters(len(curve))) + ".", ""]
    if "params" in state:
        lines += ["Parameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in state["params"].items()) + ".", ""]
    if "caches" in state:
        lines += ["| cache | build seconds | bytes per training image |", "|---|---|---|"]
        lines += [f"| {k} | {c['seconds']:.0f} | {c['disk_bytes_per_image']:,.0f} |" for k, c in state["caches"].items()]
        lines.append("")
    for pair in PAIRS:
        grid = {arm: runs.get(arm_key(pair, arm, GRID_SEED)) for arm in GRID}
        if not any(grid.values()):
            continue
        lines += [f"## Pair {pair}: `{PAIRS[pair]}`, the grid (seed {GRID_SEED}, val mIoU, best epoch)", "",
                  "| arm | method | form | val | val at each quarter | train images/s |", "|---|---|---|---|---|---|"]
        for arm, r in grid.items():
            if r is None:
                continue
            method, form, mixed = GRID[arm]
            spec = "none" if method is None else ",".join(f"{k}={v}" for k, v in method.items())
            curve = r["val_curve"]
            lines.append(f"| {arm} | {spec} | {form}{' (cutmix)' if mixed and form == 'image' else ''} | "
                         f"{100 * r['val']:.2f} | " + ", ".join(f"{100 * curve[i]:.1f}" for i in quarters(len(curve)))
                         + f" | {r['images_per_s']:.0f} |")
        ce, kd = finalists(state, pair)
        lines.append("")
        if ce is None:
            lines += [f"{sum(r is not None for r in grid.values())} of {len(GRID)} grid arms trained; the finalists "
                      "are chosen once all are in.", ""]
            continue
        lines += [f"Chosen on val: baseline {ce}; finalists {', '.join(kd)}.", ""]
        scored = {arm: {sd: runs[arm_key(pair, arm, sd)] for sd in SEEDS
                        if "score" in runs.get(arm_key(pair, arm, sd), {})} for arm in (ce, *kd)}
        if not any(scored.values()):
            continue
        lines += [f"### Pair {pair} on test", "", "| arm | seeds | test | per seed |", "|---|---|---|---|"]
        for arm, r in scored.items():
            xs = [100 * v["score"] for v in r.values()]
            if xs:
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                lines.append(f"| {arm} | {len(xs)} | {statistics.mean(xs):.2f} ± {sd:.2f} | "
                             + ", ".join(f"{x:.2f}" for x in xs) + " |")
        lines += ["", "| comparison | seeds | mean | 95% interval | share of the teacher–CE gap |", "|---|---|---|---|---|"]
        base = scored[ce]
        gap = 100 * t["score"] - statistics.mean(100 * v["score"] for v in base.values()) if base else float("nan")
        for i, a in enumerate(kd):
            for b in (ce, *kd[:i]):
                common = sorted(set(scored[a]) & set(scored[b]))
                if not common:
                    continue
                p = paired([100 * (scored[a][sd]["score"] - scored[b][sd]["score"]) for sd in common])
                ci = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if p["n"] > 1 else ""
                share = f"{100 * p['mean'] / gap:.0f}%" if b == ce and gap > 0 else ""
                lines.append(f"| {a} − {b} | {p['n']} | {p['mean']:+.2f} | {ci} | {share} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def quarters(n: int) -> list[int]:
    return sorted({max(0, round(n * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})


if __name__ == "__main__":
    main()
