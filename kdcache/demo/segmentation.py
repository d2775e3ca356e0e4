"""``kdcache demo``: the whole workflow on the built-in synthetic data set, on a CPU in minutes.

The semi-supervised workflow (a few labelled images and a pool of unlabelled ones): a teacher
trained on the few labelled images (``limit``, default 100) → teacher caches over the labelled
images (the teacher on each whole image, and a schedule: the teacher on every crop the students
will draw) and over a pool of unlabelled ones (the ``unlabeled`` split, 4x the labelled count) →
students: the CE baseline (``none``), then :data:`RECOMMENDED`, the recipe
``benchmarks/demo_recipe.py`` chose on val for this setting (DIST at weight 1 from the schedule,
its teacher trained 80 epochs: ``benchmarks/results/demo-recipe-cpu.md``), then the same DIST
from the default cache and with the pool, ``kl`` at its defaults and ``pseudo`` labels with the
pool, every one with the same number of optimizer steps (a pool run's epoch is a pass over the
labelled images at half of each batch, so it trains half the epochs) → ``compare`` on the test
split (each run's checkpoint chosen on the validation split). To fit the 2-core CPU's 10 minutes,
the teacher is ``demo_teacher`` at width 48 (about half the compute of the default 64) and runs
validate every 4th epoch (a checkpoint is chosen among those). Every step writes into ``out``; a
rerun skips the steps that finished (a run whose last epoch is done, a cache whose samples are all
done) and resumes one that was interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from kdcache.core.errors import KDCacheError
from kdcache.core.outputs import OutputFolder
from kdcache.core.progress import console
from kdcache.demo.steps import DEMO, cache_once, compare_once, run_finished, run_started
from kdcache.store import CacheStore
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train


class DemoStudent(NamedTuple):
    """One of the demo's students: its methods and where its targets come from. ``form``: ``image``
    (the teacher's top-4 on each whole labelled image, a crop takes its cells), ``pool`` (the same
    and the unlabelled pool, half of each batch, for half the epochs: the same steps) or
    ``schedule`` (the teacher on every crop this seed's student draws, so its targets are the
    teacher's on its own pixels); ``mix``: cutmix on the student's crops (a schedule then holds
    the teacher on the mixed crops: function matching)."""

    methods: list[dict]
    form: str = "image"
    mix: bool = False

    def describe(self) -> str:
        """The student in words: "DIST at weight 1 from a schedule cache: the teacher on every
        crop the student draws"."""
        names = " + ".join(m["name"].upper() + (f" at weight {m['weight']:g}" if "weight" in m else "")
                           for m in self.methods)
        if self.methods == [{"name": "none"}]:
            names = "CE on the labels alone"
        elif self.form != "image" or self.mix:
            names += " " + FORM_WORDS[self.form]
        return names + (", with cutmix (a schedule holds the teacher on the mixed crops)" if self.mix else "")


#: how a student's targets are described (``image``: the default, left unsaid)
FORM_WORDS = {"image": "from the default cache (the teacher on each whole image)",
              "pool": "from the default cache and the unlabelled pool",
              "schedule": "from a schedule cache: the teacher on every crop the student draws"}
#: DIST at the weight the full-budget grid and the demo's own study chose on val
DIST_W1 = [{"name": "dist", "weight": 1.0}]
#: student name -> what it trains with, the baseline first and the recommended recipe next
STUDENTS = {
    "none": DemoStudent([{"name": "none"}]),
    "dist-schedule": DemoStudent(DIST_W1, "schedule"),
    "dist": DemoStudent(DIST_W1),
    "dist-pool": DemoStudent(DIST_W1, "pool"),
    "kl": DemoStudent([{"name": "kl"}]),
    "pseudo-pool": DemoStudent([{"name": "pseudo"}], "pool"),
}
#: the student the demo recommends (``benchmarks/results/demo-recipe-cpu.md``: chosen on val over 3 seeds)
RECOMMENDED = "dist-schedule"
FORMS = ("image", "pool", "schedule")
CUTMIX = {"mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 1.0}  # a pair's box of area 1 − λ, λ ~ Beta(1, 1), each step
POOL_SHARE = 0.5  # of each batch, for the students with the pool
POOL_FACTOR = 4  # pool images per labelled image
TEACHER_OPTIONS = {"width": 48}  # demo_teacher's: about half the compute of the default width 64
EVAL_EVERY = 4  # epochs between validations (and checkpoint choices)
BATCH_SIZE = 8  # every run's (fewer with fewer labelled images: --limit 4 takes batches of 4)


def run_demo(out: str | Path = "runs/demo", *, teacher_epochs: int = 80, student_epochs: int = 40,
             students=tuple(STUDENTS), device: str = "auto", seed: int = 0, limit: int = 100,
             show_progress: bool = True, compare: bool = True) -> dict:
    """``limit``: the first N images of each split (training, val and test: the synthetic data
    has 100 val and 100 test images, so the default cuts the training images alone); the pool
    is 4x N unlabelled images. ``students``: names of :data:`STUDENTS`, or a mapping of names to
    :class:`DemoStudent`. ``compare=False`` stops before the test split is read (the runs'
    folders are returned): what a benchmark that chooses on val takes."""
    if limit < 2:
        raise KDCacheError(f"--limit must be at least 2 (a batch of the pool students holds a labelled and an "
                           f"unlabelled image), got {limit}")
    lineup = students if isinstance(students, dict) else {name: STUDENTS[name] for name in students}
    for name, student in lineup.items():
        if student.form not in FORMS:
            raise ValueError(f"demo student {name}: form must be one of {', '.join(FORMS)}, got {student.form!r}")
    out = OutputFolder.claim(out, DEMO).path  # a folder of anyone else's is refused
    common = {"device": device, "seed": seed, "limit": limit, "eval_every": min(EVAL_EVERY, teacher_epochs),
              "batch_size": min(BATCH_SIZE, limit)}
    teacher = out / "teacher"
    if run_finished(teacher, teacher_epochs):
        console.print(f"[dim]teacher: done already ({teacher})[/dim]")
    else:
        console.print("[bold]1/4 teacher[/bold] (demo_teacher, cross-entropy on the labelled images)")
        train(TrainConfig(model="demo_teacher", model_options=TEACHER_OPTIONS, epochs=teacher_epochs, out=str(teacher),
                          **common),
              resume=run_started(teacher), show_progress=show_progress)
    cache = cache_once(out / "cache.zarr", teacher, "the labelled images: top-4 logits", show_progress, device=device,
                       limit=limit)
    pool = None
    if any(s.form == "pool" for s in lineup.values()):
        pool_size = POOL_FACTOR * len(CacheStore(cache).ids)
        pool = cache_once(out / "pool.zarr", teacher, f"a pool of {pool_size} unlabelled images: top-4 logits",
                          show_progress, device=device, split="unlabeled", limit=pool_size)
    runs = [teacher]
    for name, student in lineup.items():
        run = out / f"student-{name}"
        runs.append(run)
        with_pool = student.form == "pool"
        epochs = max(1, round(student_epochs * (1 - POOL_SHARE))) if with_pool else student_epochs
        common["eval_every"] = min(EVAL_EVERY, epochs)
        if run_finished(run, epochs):
            console.print(f"[dim]student {name}: done already ({run})[/dim]")
            continue
        mix = CUTMIX if student.mix else {}
        store = cache
        if student.form == "schedule":  # one per seed, epochs and mixing: the crops this student draws
            kind = "schedule-cutmix" if student.mix else "schedule"
            store = cache_once(out / f"{kind}-{epochs}-epochs-seed{seed}.zarr", teacher,
                               f"the teacher on every crop of the {epochs} epochs seed {seed} draws"
                               f"{' (cutmix)' if student.mix else ''}: top-4 logits", show_progress, device=device,
                               limit=limit, schedule_epochs=epochs, schedules=1, first_schedule=seed, **mix)
        console.print(f"[bold]3/4 student[/bold] demo_student with {name}")
        extra = {"unlabeled_caches": [str(pool)], "unlabeled_share": POOL_SHARE} if with_pool else {}
        cfg = config_from_store(str(store), methods=student.methods, epochs=epochs, out=str(run), **extra, **mix,
                                **common)
        train_student(cfg, resume=run_started(run), show_progress=show_progress)
    if not compare:
        return {"runs": [str(r) for r in runs]}
    result = compare_once(runs, out / "student-none" if "none" in lineup else None, out / "compare", device,
                          show_progress)
    OutputFolder.claim(out, DEMO).file("demo.json").write_text(json.dumps({"runs": [str(r) for r in runs], "compare": str(out / "compare")}, indent=2))
    return result


def recommendation(result: dict) -> str | None:
    """The line the demo ends with: the recommended student's Δ mIoU over the baseline on the test
    split (None when the comparison has no such row or no baseline)."""
    row = next((r for r in result.get("rows", []) if Path(r["run"]).name == f"student-{RECOMMENDED}"), None)
    if row is None or row.get("delta_miou") is None:
        return None
    return (f"recommended: {RECOMMENDED} ({STUDENTS[RECOMMENDED].describe()}), {100 * row['delta_miou']:+.2f} mIoU "
            f"over the CE baseline on the {result['split']} split")
