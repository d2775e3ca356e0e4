"""``kdcache demo --task classification``: image classification through the cache, on the
built-in ``shapes`` data, on a CPU in minutes.

A ``demo_cls_teacher`` (width 24) trained on the training split → its top-5 cache in the three
forms (the logits on the whole image, 8 FKD-style stored views per image, a ReLabel-style label
map) → ``demo_cls_student`` runs with the same recipe: the CE baseline and KL at T = 4 (the
temperature ``benchmarks/classification.py`` chose on val) from each form → ``compare`` on the
test split (checkpoints chosen on val). A rerun skips the steps that finished and resumes one
that was interrupted, as ``kdcache demo`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.core.outputs import OutputFolder
from kdcache.core.progress import console
from kdcache.demo.steps import (
    CLASSIFICATION_DEMO,
    cache_once,
    compare_once,
    run_finished,
    run_started,
)
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

#: student name -> (cache form, methods, draws stored views)
STUDENTS = {
    "ce": ("logits", [{"name": "none"}], False),
    "kd-logits": ("logits", [{"name": "kl", "temperature": 4.0}], False),
    "kd-views": ("views", [{"name": "kl", "temperature": 4.0}], True),
    "kd-label-map": ("label_map", [{"name": "kl", "temperature": 4.0}], False),
}
FORMS = {"logits": ("top-5 logits on the whole image", {}),
         "views": ("8 stored random-resized views per image (FKD)", {"views": 8, "view_area": (0.5, 1.0)}),
         "label_map": ("the class map before pooling (ReLabel)", {"label_map": True})}
RECIPE = {"batch_size": 32, "crop_area": (0.5, 1.0)}  # the stored views are drawn with the same area


def run_classification_demo(out: str | Path = "runs/demo-classification", *, teacher_epochs: int = 20,
                            student_epochs: int = 30, device: str = "auto", seed: int = 0, limit: int | None = None,
                            show_progress: bool = True) -> dict:
    """``limit``: the first N images of each split (training, val and test), as ``kdcache demo``'s;
    default: all of them (1000, 500, 1000)."""
    out = OutputFolder.claim(out, CLASSIFICATION_DEMO).path  # a folder of anyone else's is refused
    data = {"dataset": "shapes", "limit": limit}
    recipe = {**RECIPE, "batch_size": min(RECIPE["batch_size"], limit or RECIPE["batch_size"])}
    teacher = out / "teacher"
    if run_finished(teacher, teacher_epochs):
        console.print(f"[dim]teacher: done already ({teacher})[/dim]")
    else:
        console.print("[bold]1/4 teacher[/bold] (demo_cls_teacher on the shapes training split)")
        train(TrainConfig(model="demo_cls_teacher", model_options={"width": 24}, epochs=teacher_epochs, lr=2e-3,
                          out=str(teacher), device=device, seed=seed, **data, **recipe),
              resume=run_started(teacher), show_progress=show_progress)
    caches = {form: cache_once(out / f"{form}.zarr", teacher, what, show_progress, topk=5, device=device, **data, **opts)
              for form, (what, opts) in FORMS.items()}
    runs = [teacher]
    for name, (form, methods, views) in STUDENTS.items():
        run = out / f"student-{name}"
        runs.append(run)
        if run_finished(run, student_epochs):
            console.print(f"[dim]student {name}: done already ({run})[/dim]")
            continue
        console.print(f"[bold]3/4 student[/bold] demo_cls_student, {name}")
        cfg = config_from_store(str(caches[form]), model="demo_cls_student", methods=methods, use_views=views,
                                epochs=student_epochs, lr=3e-3, out=str(run), device=device, seed=seed, limit=limit,
                                **recipe)
        train_student(cfg, resume=run_started(run), show_progress=show_progress)
    result = compare_once(runs, out / "student-ce", out / "compare", device, show_progress)
    OutputFolder.claim(out, CLASSIFICATION_DEMO).file("demo.json").write_text(json.dumps({"runs": [str(r) for r in runs], "compare": str(out / "compare")},
                                              indent=2))
    return result
