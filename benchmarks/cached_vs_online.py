"""Does a student trained from the cache learn as much as one trained with the live teacher on
every crop? Paired by seed, on a budget where the CE baseline has levelled off (issue 27 §1).

    python benchmarks/cached_vs_online.py --task classification [--teacher RUN] [--seeds 0,1,2,3,4]
    python benchmarks/cached_vs_online.py --task segmentation [--teacher RUN] [--seeds 0,1,2,3,4]

Phases (``--phase``, comma-separated; the state file keeps what each one measured, so a cut-short
run goes on where it stopped). The state file lies beside the results file
(``benchmarks/results/cached-vs-online-<task>-<cpu|gpu>.json``) and is committed with it, and so
are the teacher's weights (``…-<cpu|gpu>-teacher/``: ``best.pt``, ``config.json`` and its
``metrics.jsonl``, 6.8 MB for segmentation). The working folder (``--out``: the stores, the runs) is lost with its machine
between sittings (three times so far), and two CPUs do not train the seeded teacher recipe to the
same bits, so a later sitting reads the kept teacher, rebuilds the stores it needs and trains only
the runs the state lacks. The state keeps the teacher's fingerprint and refuses another:

* ``teacher``: the task's teacher recipe, unless the kept teacher is there or ``--teacher RUN``
  (a run trained with it) is given;
* ``caches``: the teacher's fingerprint and test score, the kept copy, and the default cache
  (the teacher on the whole image, top-k + tail; a crop takes its cells). Each seed's schedule
  (``--schedule-epochs`` = the students' epochs, ``--first-schedule`` = the seed,
  ``--schedules 1``: the teacher on every crop that seed's student draws) is built when the first
  run that reads it starts. Build seconds and bytes per image, per store;
* ``tune``: each method's temperature, chosen on **val** (best epoch, mean of seeds 0 and 1)
  from the schedule (the live teacher's targets, so one choice serves every form); ties keep
  the lower T. A task whose settings fix the temperature (segmentation, from the second run's
  tune phase) skips it;
* ``students``: seed by seed, CE alone and, for KL and DIST at the chosen T, the student with
  the live teacher on each crop (``--online-teacher cache`` over the seed's schedule store: the
  same crops in the same order as the schedule's student, the same steps), from the schedule and
  from the default cache (segmentation: also read with ``--target-resample bilinear``, whose arms
  come after every seed's other arms).
  Checkpoints chosen on val; scored on a test split rendered larger than the default
  (``test_size`` images), every score kept in the results with the machine that trained it;
* ``weights``: each method's KD weight w (L = CE + w · KD, w in ``WEIGHTS``) chosen on **val** at
  the chosen T (best epoch, mean of seeds 0 and 1, from each seed's schedule), beside CE's val
  score of the same seeds; ties keep the weight nearest 1. Runs the students or tune phase
  trained with the same options (w = 1, CE) are read from the state, not trained again. It reads
  no test score. Added after the third segmentation run's students had started (its settings,
  commit and state are the students'), to choose the defaults' weight on val in both tasks
  (issue 27): a task whose kept teacher is gone (classification) measures it in a state of its
  own, ``--state benchmarks/results/kd-weight-classification-cpu.json --seeds 0,1 --phase
  teacher,caches,tune,weights``, which keeps its own teacher and writes its own results file;
* ``report``, alone: the results file written again from the state (after a change to the report),
  nothing trained and no commit recorded.

Several processes may share one state and working folder (``--phase tune,students`` once the
caches are built; ``--threads`` sets each one's torch threads): each run is claimed by an
exclusive lock on ``<out>/claims/<run>.lock`` (released when its process ends, however it
ends), every save merges the runs the file already holds under a lock, and the temperature is
chosen once every tune run is in the state. Each arm's training rate is then measured beside the
other process's work, so the rates compare only among runs made the same way. It is for machines
with cores to spare: on the 2-core CPU, two one-thread processes trained 24 images/s each against
99 for one two-thread process (the segmentation tune runs' first epochs, 2026-11-25).

Reported: mean ± sd over seeds of the test score for every arm; for each cached arm the paired
difference to the online student of its method (per seed, mean, sd and the 95% t interval);
each arm against CE; a form read differently from another's store (bilinear) against that
store's plain read; CE's validation curve at each quarter of the schedule (has it levelled
off?); the training rate of each arm (images/s, side by side in one run).

The settings below were fixed in a commit before the first recorded run; the results file names
the commit it ran at. Writes ``benchmarks/results/cached-vs-online-<task>-<cpu|gpu>.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kdcache.core.outputs import file_sha256
from kdcache.core.runs import checkout_commit, device_name, resolve_device
from kdcache.data import build_dataset
from kdcache.models.loading import open_weights
from kdcache.pipeline.loaders import make_loader
from kdcache.pipeline.transforms import SegPipeline
from kdcache.report.evaluation import evaluate_model
from kdcache.store import CacheStore
from kdcache.store.location import size_of
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

#: per task: the teacher recipe, the data options every run shares, the test split's size, the
#: students' recipe (CE and KD alike), the cache's k and the score's name
TASKS = {
    "classification": {
        # shapes: 1000 training images (the default), val rendered at 1000 (default 500) so the
        # temperature and checkpoints are chosen on less noise; test at 10000. 120 epochs: CE's val
        # top-1 (seed 0, a pilot on val) was still climbing at 60 epochs (best 61.6) and flat over
        # the last quarter of 120 (68-70)
        "teacher": {"model": "demo_cls_teacher", "dataset": "shapes", "epochs": 40, "batch_size": 32, "lr": 2e-3,
                    "crop_area": (0.5, 1.0), "workers": 0},
        "data_options": {"size": 1000},
        "test_size": 10000,
        "student": {"model": "demo_cls_student", "epochs": 120, "batch_size": 32, "lr": 3e-3,
                    "crop_area": (0.5, 1.0), "workers": 0},
        "topk": 5,
        "score": "top1",
        "forms": ("whole image", "schedule"),
    },
    "segmentation": {
        # the built-in road scenes: 400 training images, val 100, test rendered at 1000. 160 epochs
        # (8000 steps): CE's val mIoU (seed 0, pilots on val) was 49.1 best at 40 epochs, 53.8 at 80,
        # 57.1 at 160 (55.4 at three quarters of it, 56.9 at the end). About 7 h of the 2-core CPU
        # in all (the 5-schedule build, 12 tune runs, 45 students): the state file lets it run in parts
        "teacher": {"model": "demo_teacher", "dataset": "synthetic", "epochs": 24, "workers": 0},
        "data_options": {},
        "test_size": 1000,
        "student": {"model": "demo_student", "epochs": 160, "batch_size": 8, "workers": 0},
        "topk": 4,
        "score": "miou",
        # fixed in advance, not tuned again: the second run's choice on val (schedule targets, seeds 0
        # and 1, T in 1, 2, 4: kl 55.70 / 54.20 / 53.73, dist 57.15 / 56.59 / 55.57 mIoU; commit
        # fcd2d82, `cached-vs-online-segmentation-cpu-run2.md`), which is also the library's default
        "temperature": {"kl": 1.0, "dist": 1.0},
        # a crop's cells off the cached grid, sampled bilinearly (--target-resample bilinear). Not the
        # pyramid (--store-scales 0.75,1.25 --store-flips): on val, per crop, read bilinearly it is
        # only a little closer to the teacher than the bilinear default cache (KL 0.079 against 0.097,
        # crop-fidelity.md) at six teacher passes and six times the bytes
        "forms": ("whole image", "whole image, bilinear", "schedule"),
        # trained for every seed after the other arms of every seed: the question the benchmark
        # answers first is the default cache and the schedule against the live teacher
        "later_forms": ("whole image, bilinear",),
    },
}
METHODS = ("kl", "dist")
TEMPERATURES = (1.0, 2.0, 4.0)
TUNE_SEEDS = (0, 1)
#: the KD weight against the cross-entropy's 1 (L = CE + w · KD), chosen on val at the chosen T
WEIGHTS = (0.25, 0.5, 1.0, 2.0)
#: t quantiles (0.975) for the 95% interval of a paired mean, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
FORMS = {"whole image": "image.zarr", "schedule": "schedule-s{seed}.zarr"}
#: each form a student may read: (the cache of FORMS it reads, its own student options)
READS = {"whole image": ("whole image", {}), "whole image, bilinear": ("whole image", {"target_resample": "bilinear"}),
         "schedule": ("schedule", {})}


def weight_keys() -> dict[str, tuple[str | None, float, int]]:
    """The weights phase's runs: their state keys and (method or None for CE, weight, seed)."""
    keys = {f"CE seed {sd}": (None, 1.0, sd) for sd in TUNE_SEEDS}
    keys.update({f"{m} w={w:g} seed {sd}": (m, w, sd) for m in METHODS for w in WEIGHTS for sd in TUNE_SEEDS})
    return keys


def choose_weight(vals: dict[float, float]) -> float:
    """The weight of the best mean val score; a tie keeps the weight nearest the authors' 1."""
    return max(vals, key=lambda w: (vals[w], -abs(math.log(w))))


def tune_keys() -> dict[str, tuple[str, float, int]]:
    """The tune phase's runs: their state keys and (method, T, seed)."""
    return {f"{m} T={T:g} seed {sd}": (m, T, sd) for m in METHODS for T in TEMPERATURES for sd in TUNE_SEEDS}


def student_plan(task: dict) -> dict[str, tuple[str, str | None, bool, dict]]:
    """Each student arm, in the order a seed trains them: (the form of FORMS it reads, its method,
    whether the teacher runs live, its options)."""
    plan = {"CE": ("whole image", None, False, {})}
    for m in METHODS:
        plan[f"{m.upper()} online"] = ("schedule", m, True, {})
        for form in task["forms"]:
            store, extra = READS[form]
            plan[f"{m.upper()} {form}"] = (store, m, False, extra)
    return plan


def arm_names(task_name: str) -> list[str]:
    forms = TASKS[task_name]["forms"]
    return ["CE"] + [f"{m.upper()} {form}" for m in METHODS for form in (*forms, "online")]


def student(task: dict, cache: Path, out: Path, seed: int, method: str | None, temperature: float = 1.0,
            online: bool = False, extra: dict | None = None, weight: float | None = None) -> dict:
    methods = [{"name": "none"}] if method is None else [{"name": method, "temperature": temperature}]
    if weight is not None and method is not None:
        methods[0]["weight"] = weight
    cfg = config_from_store(str(cache), out=str(out), seed=seed, methods=methods,
                            online_teacher="cache" if online else None, **task["student"], **(extra or {}))
    t0 = time.perf_counter()
    train_student(cfg, overwrite=True, show_progress=False)
    return {**run_record(task, out), "seconds": time.perf_counter() - t0}


def run_record(task: dict, out: Path) -> dict:
    """A finished student run's best val score, val curve (the validated epochs: every one, or
    every ``--eval-every``), epochs trained and median training images/s."""
    trained = epoch_records(out / "metrics.jsonl")
    key = "val_top1" if task["score"] == "top1" else "val_miou"
    curve = [r.get(key, r["val_miou"]) for r in trained if "val_miou" in r]
    return {"val": max((v for v in curve if not math.isnan(v)), default=-1.0), "val_curve": curve,
            "epochs": len({r["epoch"] for r in trained}),
            "images_per_s": statistics.median(r["train_images_per_s"] for r in trained)}


def finished(task: dict, run: Path) -> bool:
    """Whether ``run`` trained all of the task's student epochs (a tune run may stand in for an arm)."""
    log = run / "metrics.jsonl"
    if not (log.exists() and (run / "best.pt").exists()):
        return False
    return len({r["epoch"] for r in epoch_records(log)}) == task["student"]["epochs"]


def epoch_records(log: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` records of trained epochs (validated or not)."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in records if "epoch" in r and "train_images_per_s" in r]


def test_score(task: dict, run: Path) -> dict:
    """The run's best-on-val checkpoint on the task's test split, rendered at ``test_size``."""
    dev = resolve_device("auto")
    weights = open_weights(str(run))
    cfg = weights.config
    # rendered at the task's test size (a data set of files: its own test split, test_size None)
    options = {**(cfg.get("dataset_options") or {}), **({"size": task["test_size"]} if task["test_size"] else {})}
    ds = build_dataset(cfg["dataset"], "test", cfg.get("data_root"), **options)
    model = weights.build(num_classes=ds.num_classes, device=dev)
    loader = make_loader(SegPipeline(ds, weights.preprocess), 32, 0, pin_memory=False)
    m = evaluate_model(model, loader, ds.num_classes, dev, show_progress=False).metrics
    return {"score": m[task["score"]], "num_samples": len(ds)}


def one_thread() -> None:
    """A worker process's initializer: torch (and the Numba loss, which takes torch's count) on one
    thread, so that N runs at once share N cores without oversubscribing them."""
    torch.set_num_threads(1)


def resumable_run(cfg, folder: Path) -> bool:
    """Whether ``folder`` holds an interrupted run of exactly ``cfg`` (a ``last.pt``, and a
    ``config.json`` whose every option ``cfg`` has is the same): one a later sitting may resume."""
    if not ((folder / "last.pt").exists() and (folder / "config.json").exists()):
        return False
    stored = json.loads((folder / "config.json").read_text())
    given = json.loads(json.dumps(cfg.to_dict()))  # as the run wrote it: tuples as lists
    return all(stored.get(k) == v for k, v in given.items())


def train_run(cfg, folder: Path, task: dict, score: bool) -> dict:
    """Train the student ``cfg`` into ``folder`` (resuming an interrupted run of exactly ``cfg``
    there, else from scratch: kdcache resumes to the uninterrupted result), check it ran every
    epoch of its own (``cfg.epochs``) and return its record: :func:`run_record`, the seconds, the
    machine and the threads it had (and how many epochs an earlier sitting trained: its seconds are
    then this sitting's alone); with ``score``, its test score too (:func:`test_score`). A top-level function,
    so that worker processes run it (``full_budget.py --jobs``)."""
    t0 = time.perf_counter()
    resume = resumable_run(cfg, folder)
    train_student(cfg, resume=resume, overwrite=not resume, show_progress=False)
    assert finished({"student": {"epochs": cfg.epochs}}, folder), folder
    r = {**run_record(task, folder), "seconds": time.perf_counter() - t0,
         "machine": device_name(resolve_device("auto")), "threads": torch.get_num_threads()}
    if resume:  # the epochs an earlier sitting trained (the run's resumed_from_epoch is the last one's index)
        r["resumed_after_epochs"] = json.loads((folder / "config.json").read_text())["resumed_from_epoch"] + 1
    if score:
        r.update(test_score(task, folder))
    return r


def build_store(cfg: CacheBuildConfig) -> dict:
    """Build the store ``cfg`` describes and say what it cost: its seconds, bytes per image, and the
    machine and threads that built it. A top-level function, so that worker processes run it
    (``full_budget.py --jobs`` builds a store in a slot with no run ready)."""
    t0 = time.perf_counter()
    build_teacher_cache(cfg, show_progress=False)
    n = CacheStore(cfg.out).schema.num_samples
    return {"seconds": time.perf_counter() - t0, "disk_bytes_per_image": size_of(Path(cfg.out)) / n,
            "machine": device_name(resolve_device("auto")), "threads": torch.get_num_threads()}


def keep_teacher(run: Path, kept: Path) -> Path:
    """A copy of the teacher run's ``best.pt``, ``config.json`` and ``metrics.jsonl`` at ``kept``
    (beside the state, committed with it), whole or not at all; returns ``kept``."""
    part = kept.with_name(kept.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    for name in ("best.pt", "config.json", "metrics.jsonl"):
        shutil.copyfile(run / name, part / name)
    part.replace(kept)
    return kept


def paired(xs: list[float]) -> dict:
    n = len(xs)
    mean = statistics.mean(xs)
    sd = statistics.stdev(xs) if n > 1 else float("nan")
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def merge_state(ours: dict, theirs: dict) -> dict:
    """``ours`` with the tune runs, student runs and built caches that ``theirs`` (the file as another
    process left it) holds and ours lacks: several processes may work from one state, each adding its
    own runs and stores."""
    merged = {**theirs, **ours}
    merged["tune"] = {**theirs.get("tune", {}), **ours.get("tune", {})}
    merged["caches"] = {**theirs.get("caches", {}), **ours.get("caches", {})}
    merged["weights"] = {**theirs.get("weights", {}), **ours.get("weights", {})}
    merged["students"] = {arm: {**theirs.get("students", {}).get(arm, {}), **ours.get("students", {}).get(arm, {})}
                          for arm in {*theirs.get("students", {}), *ours.get("students", {})}}
    merged["notes"] = list(dict.fromkeys([*theirs.get("notes", []), *ours.get("notes", [])]))
    merged["commits"] = list(dict.fromkeys([*theirs.get("commits", []), *ours.get("commits", [])]))
    for key in ("tune", "caches", "weights", "students", "notes"):
        if not merged[key]:
            del merged[key]
    return merged


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (a lock file beside the state), held for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim(claims: Path, key: str):
    """An open file holding an exclusive lock that marks the run ``key`` as this process's, or None
    where another process holds it. The lock goes with the process, so a run whose process died
    is free again."""
    claims.mkdir(parents=True, exist_ok=True)
    f = open(claims / (key.replace(" ", "-").replace("=", "").replace(",", "") + ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--phase", default="teacher,caches,tune,students,weights")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default=None, help="working folder (default runs/cached-vs-online-<task>)")
    ap.add_argument("--teacher", default=None, help="a teacher run trained with the task's recipe")
    ap.add_argument("--state", default=None, help="the state file (default: beside the results file); the results "
                    "file is written beside it, under its name")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="seconds between looks at the state while another process finishes the tune runs")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    seeds = [int(s) for s in args.seeds.split(",")]
    phases = set(args.phase.split(","))
    out = Path(args.out or f"runs/cached-vs-online-{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    results = Path(__file__).parent / "results" / f"cached-vs-online-{args.task}-{'gpu' if device.type == 'cuda' else 'cpu'}.md"
    state_path = Path(args.state) if args.state else results.with_suffix(".json")
    results = state_path.with_suffix(".md")  # a state of its own (--state) gets a results file of its own
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if phases == {"report"}:  # the results file written again from the state, nothing trained or recorded
        if not state:
            raise SystemExit(f"error: no state at {state_path} to report: run the benchmark first (without --phase report)")
        write_report(args.task, state, results)
        return
    state["machine"] = device_name(device)
    state.setdefault("commits", [])
    head = checkout_commit(Path(__file__).parent)
    if head and head not in state["commits"]:
        state["commits"].append(head)
    # the teacher's weights are kept beside the state (committed): a later sitting that lost the
    # working folder reads the same teacher instead of training another (the recipe is seeded, but
    # two CPUs do not train it to the same bits)
    kept = state_path.with_name(state_path.stem + "-teacher")
    if args.teacher:
        teacher = Path(args.teacher)
    elif (kept / "best.pt").exists():
        teacher = kept
    else:
        teacher = out / "teacher"

    lock = state_path.with_name(state_path.name + ".lock")
    claims = out / "claims"
    claims.mkdir(parents=True, exist_ok=True)

    def save():
        nonlocal state
        with locked(lock):
            if state_path.exists():
                state = merge_state(state, json.loads(state_path.read_text()))
            tmp = state_path.with_name(state_path.name + ".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(state_path)
            write_report(args.task, state, results)

    def refresh() -> dict:
        """Our state with what other processes have saved since."""
        nonlocal state
        with locked(lock):
            if state_path.exists():
                state = merge_state(state, json.loads(state_path.read_text()))
        return state

    def build(form: str, seed: int = 0) -> Path:
        """The store of ``form`` (a schedule: seed ``seed``'s alone), built unless it is there, by one
        process at a time (another process's runs of the same seed wait for it)."""
        path = out / FORMS[form].format(seed=seed)
        key = form if form != "schedule" else f"schedule seed {seed}"
        with locked(claims / f"build-{path.stem}.lock"):
            return build_locked(form, seed, path, key)

    def build_locked(form: str, seed: int, path: Path, key: str) -> Path:
        if (path / "zarr.json").exists():
            store = CacheStore(str(path))
            if store.schema.teacher.get("weights_sha256") != file_sha256(teacher / "best.pt"):
                shutil.rmtree(path)  # a store of another teacher (an earlier run's folder): built again
            elif store.done().all():
                return path  # built already
        epochs = task["student"]["epochs"]
        aug = {k: task["student"][k] for k in ("crop", "scale", "crop_area", "hflip") if k in task["student"]}
        extra = ({"schedule_epochs": epochs, "schedules": 1, "first_schedule": seed, **aug} if form == "schedule"
                 else {})
        started = (path / "zarr.json").exists()
        t0 = time.perf_counter()
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(path), split="train",
                                             dataset=task["teacher"]["dataset"], dataset_options=task["data_options"],
                                             topk=task["topk"], workers=0, **extra), show_progress=False)
        # a store a cut-short sitting left is resumed (the same identity, or the build refuses it)
        n = CacheStore(str(path)).schema.num_samples
        refresh().setdefault("caches", {})[key] = {
            "seconds": time.perf_counter() - t0, "disk_bytes_per_image": size_of(path) / n, "images": n,
            "machine": device_name(device), "resumed": started,
            **({"epochs": epochs, "schedules": 1} if extra else {})}
        save()
        return path

    def train_arm(arm: str, seed: int, store: Path, method: str | None, online: bool, extra: dict) -> dict:
        temps = state["temperature"]
        run = out / f"s{seed}-{arm.lower().replace(', ', '-').replace(' ', '-')}"
        tuned = out / f"tune-{method}-T{temps.get(method, 1.0):g}-s{seed}"
        if arm.endswith(" schedule") and f"{method} T={temps[method]:g} seed {seed}" in state.get("tune", {}) \
                and finished(task, tuned):
            # the tune run at the chosen T is this arm's run: the same store, seed, method and options
            run = tuned
            r = run_record(task, run)
        else:
            r = student(task, store, run, seed, method, temps.get(method, 1.0), online, extra)
        r.update(test_score(task, run))
        r["machine"] = device_name(device)
        state.setdefault("students", {}).setdefault(arm, {})[str(seed)] = r
        save()
        return r

    if "teacher" in phases and not args.teacher and teacher == out / "teacher":
        t0 = time.perf_counter()
        train(TrainConfig(out=str(teacher), **task["teacher"]), overwrite=True, show_progress=False)
        state["teacher_seconds"] = time.perf_counter() - t0
    if phases & {"caches", "tune", "students", "weights"}:  # every phase that reads the teacher checks it first
        fingerprint = open_weights(str(teacher)).weights_sha256()
        known = state.get("teacher", {}).get("weights_sha256")
        if known and known != fingerprint:
            raise SystemExit(f"error: the teacher in {teacher} is not the one {state_path} was measured with (its weights "
                             f"differ); give --teacher the run it was (or {kept}), or start a new state with --state")
    if "caches" in phases:
        if not (kept / "best.pt").exists():  # kept for later sittings, byte for byte
            teacher = keep_teacher(teacher, kept)
        if not known:
            state["teacher"] = {**test_score(task, teacher), "weights_sha256": fingerprint}
        build("whole image")  # CE reads it; small and quick. A schedule is built when its seed's runs need it
        save()
    if "temperature" in task:
        state["temperature"] = dict(task["temperature"])  # fixed in advance: no tune runs
    elif "tune" in phases:
        for key, (method, T, seed) in tune_keys().items():
            if key in refresh().get("tune", {}) or (held := claim(claims, key)) is None:
                continue  # measured, or being measured by another process
            with held:
                if key in refresh().get("tune", {}):
                    continue  # another process finished it meanwhile
                val = student(task, build("schedule", seed), out / f"tune-{method}-T{T:g}-s{seed}", seed, method, T)["val"]
                state.setdefault("tune", {})[key] = val
                save()
            print(key, val, flush=True)
        while any(k not in refresh().get("tune", {}) for k in tune_keys()):
            time.sleep(args.wait)  # another process is still measuring a temperature
        tune = state["tune"]
        state["temperature"] = {m: max(TEMPERATURES, key=lambda T: (statistics.mean(
            tune[f"{m} T={T:g} seed {s}"] for s in TUNE_SEEDS), -T)) for m in METHODS}
        save()
    if "students" in phases:
        plan = student_plan(task)
        later = {f"{m.upper()} {form}" for m in METHODS for form in task.get("later_forms", ())}
        # seed by seed, every arm of a seed before the next seed (the later forms' arms after every
        # seed's others): a sitting that ends early leaves whole pairs, and each seed's schedule
        # store is built once, when its first run needs it
        order = [(seed, arm) for first in (True, False) for seed in seeds for arm in plan if (arm in later) != first]
        for seed, arm in order:
            form, method, online, extra = plan[arm]
            key = f"{arm} seed {seed}"
            if str(seed) in refresh().get("students", {}).get(arm, {}) or (held := claim(claims, key)) is None:
                continue  # trained, or being trained by another process
            with held:
                if str(seed) in refresh().get("students", {}).get(arm, {}):
                    continue  # another process finished it meanwhile
                r = train_arm(arm, seed, build(form, seed), method, online, extra)
            print(arm, seed, {k: v for k, v in r.items() if k != "val_curve"}, flush=True)
    if "weights" in phases:
        # val only, at the chosen T, from each seed's schedule (the live teacher's targets): a run the
        # students phase (or the tune phase) trained with the same store, seed, method and options is
        # read, not trained again; no test score is read here
        if "temperature" not in state:
            raise SystemExit("error: the weights phase trains at the chosen temperature: run the tune phase first "
                             "(--phase tune,weights)")
        temps = state["temperature"]
        for key, (method, w, seed) in weight_keys().items():
            if key in refresh().get("weights", {}) or (held := claim(claims, "weights " + key)) is None:
                continue
            with held:
                if key in refresh().get("weights", {}):
                    continue
                arm = "CE" if method is None else f"{method.upper()} schedule"
                tuned = None if method is None else f"{method} T={temps[method]:g} seed {seed}"
                if w == 1.0 and str(seed) in state.get("students", {}).get(arm, {}):
                    r = {"val": state["students"][arm][str(seed)]["val"], "from": f"students: {arm}",
                         "machine": state["students"][arm][str(seed)].get("machine")}
                elif w == 1.0 and tuned in state.get("tune", {}):
                    r = {"val": state["tune"][tuned], "from": f"tune: {tuned}", "machine": state["machine"]}
                else:
                    name = "ce" if method is None else f"{method}-w{w:g}"
                    store = build("whole image") if method is None else build("schedule", seed)
                    run = student(task, store, out / f"weights-{name}-s{seed}", seed, method,
                                  temps.get(method, 1.0), weight=None if method is None else w)
                    r = {"val": run["val"], "seconds": run["seconds"], "images_per_s": run["images_per_s"],
                         "machine": device_name(device)}
                state.setdefault("weights", {})[key] = r
                save()
            print(key, r, flush=True)
        if all(k in refresh().get("weights", {}) for k in weight_keys()):
            state["weight"] = {m: choose_weight({w: statistics.mean(state["weights"][f"{m} w={w:g} seed {sd}"]["val"]
                                                                    for sd in TUNE_SEEDS) for w in WEIGHTS})
                               for m in METHODS}
    save()


def write_report(task_name: str, state: dict, path: Path) -> None:
    task = TASKS[task_name]
    s = task["student"]
    unit = "top-1 %" if task["score"] == "top1" else "mIoU %"
    runs = state.get("students", {})
    # each run records its machine (a sitting may get another CPU): the rates compare within one
    machines = list(dict.fromkeys([state["machine"], *(r["machine"] for arm in runs.values() for r in arm.values()
                                                        if "machine" in r)]))
    lines = [f"# Cached targets against the live teacher: {task_name}", "",
             f"Machine: {'; '.join(machines)}. Written by `benchmarks/cached_vs_online.py --task {task_name}` at commit(s) "
             f"{', '.join(state.get('commits', []))} (settings fixed before the first run). Students `{s['model']}`, "
             f"{s['epochs']} epochs, batch {s['batch_size']}, every arm with the same data, steps and crops; teacher "
             f"`{task['teacher']['model']}` ({task['teacher']['epochs']} epochs), top-{task['topk']} + tail caches. "
             f"Checkpoints chosen on val; scores on {task['test_size']} test images.", ""]
    for note in state.get("notes", []):  # what a reader must know of the run's history, kept in the state
        lines += [note, ""]
    if "teacher" in state:
        lines += [f"Teacher on test: {100 * state['teacher']['score']:.2f} {unit}.", ""]
    if "caches" in state:
        lines += ["| cache | build seconds | bytes per training image on disk |", "|---|---|---|"]
        for form, c in state["caches"].items():
            what = form + (f" ({c['epochs']} epochs x {c['schedules']} schedules)" if "epochs" in c else "")
            seconds = f"{c['seconds']:.0f}" + (" (resumed: the rest only)" if c.get("resumed") else "")
            lines.append(f"| {what} | {seconds} | {c['disk_bytes_per_image']:,.0f} |")
        lines.append("")
    if "tune" in state:
        lines += ["## Temperature, chosen on val (schedule targets, best epoch, seeds "
                  + ", ".join(map(str, TUNE_SEEDS)) + ")", "", "| method | " + " | ".join(f"T = {T:g}" for T in TEMPERATURES)
                  + " | chosen |", "|---|" + "---|" * (len(TEMPERATURES) + 1)]
        for m in METHODS:
            cells = []
            for T in TEMPERATURES:
                vals = [state["tune"].get(f"{m} T={T:g} seed {sd}") for sd in TUNE_SEEDS]
                cells.append(f"{100 * statistics.mean(vals):.2f}" if all(v is not None for v in vals) else "")
            chosen = state.get("temperature", {}).get(m)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'' if chosen is None else f'T = {chosen:g}'} |")
        lines.append("")
    if runs:
        lines += [f"## Students on test ({unit}, mean ± sd over seeds)", "",
                  "| arm | seeds | test | per seed | val (best epoch) | train images/s |", "|---|---|---|---|---|---|"]
        for arm in arm_names(task_name):
            r = runs.get(arm)
            if not r:
                continue
            r = {sd: r[sd] for sd in sorted(r, key=int)}
            xs = [100 * v["score"] for v in r.values()]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            lines.append(f"| {arm} | {len(xs)} | {statistics.mean(xs):.2f} ± {sd:.2f} | "
                         + ", ".join(f"{x:.2f}" for x in xs)
                         + f" | {100 * statistics.mean(v['val'] for v in r.values()):.2f} | "
                         f"{statistics.mean(v['images_per_s'] for v in r.values()):.0f} |")
        trained_on = {v.get("machine") for arm in runs.values() for v in arm.values()}
        if len(trained_on) > 1:
            lines += ["", f"The students were trained on {len(trained_on)} machines (each run's is in the state "
                      "file); a training rate compares only with the rates of runs on its own machine."]
        lines += ["", "## Paired differences (test, points; 95% t interval of the mean over seeds)", "",
                  "| comparison | seeds | mean | sd | 95% interval | per seed |", "|---|---|---|---|---|---|"]
        pairs = [(f"{m.upper()} {form}", f"{m.upper()} online") for m in METHODS for form in task["forms"]]
        # a form that reads another form's store differently (bilinear) against the plain read of that store
        pairs += [(f"{m.upper()} {form}", f"{m.upper()} {READS[form][0]}") for m in METHODS for form in task["forms"]
                  if READS[form][0] != form]
        pairs += [(arm, "CE") for arm in arm_names(task_name)[1:]]
        for a, b in pairs:
            common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})), key=int)
            if not common:
                continue
            d = [100 * (runs[a][sd]["score"] - runs[b][sd]["score"]) for sd in common]
            p = paired(d)
            ci = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if p["n"] > 1 else ""
            sd_txt = f"{p['sd']:.2f}" if p["n"] > 1 else ""
            lines.append(f"| {a} − {b} | {p['n']} | {p['mean']:+.2f} | {sd_txt} | {ci} | "
                         + ", ".join(f"{x:+.2f}" for x in d) + " |")
        ce = runs.get("CE", {})
        if ce:
            curves = [v["val_curve"] for v in ce.values()]
            n = min(len(c) for c in curves)
            marks = sorted({max(0, round(n * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})
            lines += ["", "CE's validation curve (mean over seeds, at each quarter of the schedule): "
                      + ", ".join(f"epoch {i + 1}: {100 * statistics.mean(c[i] for c in curves):.2f}" for i in marks)
                      + "."]
    # last, so that the tables above keep their numbers (the README shows them by number)
    if "weights" in state:
        seeds_txt = ", ".join(map(str, TUNE_SEEDS))
        if lines[-1]:
            lines.append("")
        lines += [f"## KD weight, chosen on val (L = CE + w · KD at the chosen T; schedule targets; best epoch; "
                  f"mean of seeds {seeds_txt}, each seed in brackets)", "",
                  "| method | " + " | ".join(f"w = {w:g}" for w in WEIGHTS) + " | CE | chosen | chosen − CE |",
                  "|---|" + "---|" * (len(WEIGHTS) + 3)]
        ce = [state["weights"].get(f"CE seed {sd}", {}).get("val") for sd in TUNE_SEEDS]

        def cell(vals: list) -> str:
            if any(v is None for v in vals):
                return ""
            return f"{100 * statistics.mean(vals):.2f} (" + ", ".join(f"{100 * v:.2f}" for v in vals) + ")"

        for m in METHODS:
            cells = [cell([state["weights"].get(f"{m} w={w:g} seed {sd}", {}).get("val") for sd in TUNE_SEEDS])
                     for w in WEIGHTS]
            chosen = state.get("weight", {}).get(m)
            gap = ""
            if chosen is not None and all(v is not None for v in ce):
                best = statistics.mean(state["weights"][f"{m} w={chosen:g} seed {sd}"]["val"] for sd in TUNE_SEEDS)
                gap = f"{100 * (best - statistics.mean(ce)):+.2f}"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {cell(ce)} | "
                         + ("" if chosen is None else f"w = {chosen:g}") + f" | {gap} |")
        reused = sorted({r["from"] for r in state["weights"].values() if "from" in r})
        machines_w = sorted({str(r.get("machine")) for r in state["weights"].values()})
        lines += ["", "Runs read from the other phases (the same store, seed, method and options): "
                  + (", ".join(reused) if reused else "none") + f". Trained on: {'; '.join(machines_w)}."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
