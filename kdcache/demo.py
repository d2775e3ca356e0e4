"""``kdcache demo``: the whole workflow on the built-in synthetic data set, on a CPU in minutes.

Teacher training → teacher cache (top-4 logits + stage3 features and attention maps) → students
with ``none`` (the CE baseline), ``kl``, ``at`` and ``sp`` → ``compare`` on the test split (each
run's checkpoint chosen on the validation split). Every step writes
into ``out``; a rerun skips the steps that finished (a run whose last epoch is done, a cache
whose samples are all done) and resumes one that was interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.compare import compare_runs
from kdcache.distill import config_from_store, train_student
from kdcache.progress import console
from kdcache.runs import RunDir
from kdcache.store import CacheStore, StoreError
from kdcache.training import TrainConfig, train

STUDENTS = {
    "none": [{"name": "none"}],
    "kl": [{"name": "kl"}],
    "at": [{"name": "at", "student_tap": "stage3", "teacher_tap": "stage3"}],
    "sp": [{"name": "sp", "student_tap": "stage3", "teacher_tap": "stage3"}],
}


def _finished(run: Path, epochs: int) -> bool:
    r = RunDir(run)
    if not (r.exists() and r.last.exists()):
        return False
    records = [x for x in r.read_metrics() if "epoch" in x]
    return bool(records) and records[-1]["epoch"] + 1 >= epochs


def _started(run: Path) -> bool:
    return RunDir(run).last.exists()


def run_demo(out: str | Path = "runs/demo", *, teacher_epochs: int = 20, student_epochs: int = 20,
             students=("none", "kl", "at", "sp"), device: str = "auto", seed: int = 0, limit: int | None = None,
             show_progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"device": device, "seed": seed, "limit": limit}
    teacher = out / "teacher"
    if _finished(teacher, teacher_epochs):
        console.print(f"[dim]teacher: done already ({teacher})[/dim]")
    else:
        console.print("[bold]1/4 teacher[/bold] (demo_teacher, cross-entropy)")
        train(TrainConfig(model="demo_teacher", epochs=teacher_epochs, out=str(teacher), **common),
              resume=_started(teacher), show_progress=show_progress)
    cache = out / "cache.zarr"
    done = False
    try:
        s = CacheStore(cache)
        done = bool(s.done().all())
    except StoreError:
        pass
    if done:
        console.print(f"[dim]cache: done already ({cache})[/dim]")
    else:
        console.print("[bold]2/4 teacher cache[/bold] (top-4 logits, stage3 features and attention)")
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), topk=4, features=("stage3",),
                                             attention=True, device=device, limit=limit), show_progress=show_progress)
    runs = [teacher]
    for name in students:
        run = out / f"student-{name}"
        runs.append(run)
        if _finished(run, student_epochs):
            console.print(f"[dim]student {name}: done already ({run})[/dim]")
            continue
        console.print(f"[bold]3/4 student[/bold] demo_student with {name}")
        cfg = config_from_store(str(cache), methods=STUDENTS[name], epochs=student_epochs, out=str(run), **common)
        train_student(cfg, resume=_started(run), show_progress=show_progress)
    console.print("[bold]4/4 compare[/bold]")
    result = compare_runs(runs, baseline=out / "student-none" if "none" in students else None, out=out / "compare",
                          split="test", device=device, show_progress=show_progress)
    (out / "demo.json").write_text(json.dumps({"runs": [str(r) for r in runs], "compare": str(out / "compare")}, indent=2))
    return result
