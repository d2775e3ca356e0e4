"""``train-teacher`` and ``train-student``: their options are the fields declared on TrainConfig and
StudentConfig (:mod:`kdcache.cli.flags`), plus what runs them (``--resume``, ``--overwrite``,
``--quiet``) and a few shorthands: ``--resolution`` (a data set option) and, for students, one
value for every method that takes it (``--kd-weight``, ``--temperature``, …)."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcache.cli.base import command, defaults_text
from kdcache.cli.flags import config_options
from kdcache.cli.parse import parse_size
from kdcache.core import distributed
from kdcache.core.options import Bounds
from kdcache.core.progress import console
from kdcache.data import DATASETS
from kdcache.methods import METHODS, check_spec, fill_in, methods_taking, option_bounds
from kdcache.train.loggers import DEFAULT_PROJECT
from kdcache.train.student import (
    DEFAULT_METHOD_WHY,
    StudentConfig,
    default_methods,
    student_config,
    task_of,
)
from kdcache.train.student import train_student as run_student
from kdcache.train.trainer import TrainConfig, train

Resolution = Annotated[str | None, typer.Option(help="Synthetic data: image size HxW, e.g. 96x128.",
                                                rich_help_panel="Data")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt (its options come from its "
                                           "config.json).", rich_help_panel="Inputs and outputs")]
Overwrite = Annotated[bool, typer.Option(help="Start the run in --out again from scratch (only the files the run "
                                              "wrote are replaced).", rich_help_panel="Inputs and outputs")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.", rich_help_panel="Logging")]


def help_context() -> dict:
    """What the declared helps of the training options name."""
    return {"datasets": ", ".join(DATASETS.names()), "wandb_default": DEFAULT_PROJECT,
            "methods": ", ".join(METHODS.names()), "default_method": DEFAULT_METHOD_WHY}


def with_resolution(fields: dict, given: set[str], resolution: str | None) -> None:
    """``--resolution HxW``: the synthetic data set's option, beside any ``-o``."""
    if resolution is not None:
        fields["dataset_options"] = {**fields.get("dataset_options", {}),
                                     "resolution": list(parse_size(resolution, "--resolution"))}
        given.add("dataset_options")


def run_training(fn, config, *, resume: bool, overwrite: bool, quiet: bool, given: set[str]) -> dict:
    try:
        return fn(config, resume=resume, overwrite=overwrite, show_progress=not quiet, explicit=given)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: the last finished epoch is in {config.out}/last.pt; "
                      "continue with --resume")
        raise typer.Exit(130) from None


@command("train-teacher")
@config_options(TrainConfig, help_context, extra={"resolution": "size"})
def train_teacher(ctx: typer.Context, fields: dict, given: set[str], resolution: Resolution = None,
                  resume: Resume = False, overwrite: Overwrite = False, quiet: Quiet = False):
    """Supervised (cross-entropy) training: a teacher, or the no-KD student baseline."""
    with_resolution(fields, given, resolution)
    model = fields.get("model", TrainConfig.model)
    out = fields.pop("out", None) or f"runs/{model.replace(':', '_')}"
    config = TrainConfig(out=out, **fields)
    result = run_training(train, config, resume=resume, overwrite=overwrite, quiet=quiet, given=given)
    if distributed.env_dist().is_main:  # under torchrun, rank 0 reports
        console.print(f"[green]done[/green]: best {result.get('best_metric', 'val mIoU')} "
                      f"{100 * result['best_miou']:.2f} — run folder {result['run']}")


def shorthand_bounds(option: str) -> Bounds:
    """The bounds of a shorthand: those every method taking ``option`` declares for it (one text)."""
    (text,) = {option_bounds(m)[option] for m in methods_taking(option)}
    return Bounds(text)


#: the shorthands of train-student: one value for every method whose constructor takes it
SHORTHANDS = ("kd_weight", "temperature", "student_tap", "teacher_tap", "confidence_threshold")


@command("train-student")
@config_options(StudentConfig, help_context, extra={"resolution": "size"})
def train_student(
    ctx: typer.Context,
    fields: dict,
    given: set[str],
    kd_weight: Annotated[float | None, typer.Option(help=f"Weight of every method that has none of its own (defaults: {defaults_text('weight')}).", rich_help_panel="Method"), shorthand_bounds("weight")] = None,
    temperature: Annotated[float | None, typer.Option(help=f"Temperature of every method that has one (defaults: {defaults_text('temperature')}).", rich_help_panel="Method"), shorthand_bounds("temperature")] = None,
    student_tap: Annotated[str | None, typer.Option(help=f"Student module of {', '.join(methods_taking('student_tap'))} (e.g. stage3).", rich_help_panel="Method")] = None,
    teacher_tap: Annotated[str | None, typer.Option(help=f"Cached teacher tap of {', '.join(methods_taking('teacher_tap'))}.", rich_help_panel="Method")] = None,
    confidence_threshold: Annotated[float | None, typer.Option(help=f"Keep teacher labels at least this confident (defaults: {defaults_text('confidence_threshold')}).", rich_help_panel="Method"), shorthand_bounds("confidence_threshold")] = None,
    resolution: Resolution = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Student training from the teacher cache: L_seg + Σ w·L_KD with any of the methods."""
    with_resolution(fields, given, resolution)
    shorthands = dict(weight=kd_weight, temperature=temperature, student_tap=student_tap, teacher_tap=teacher_tap,
                      confidence_threshold=confidence_threshold)
    methods = fill_in(fields.get("methods") or default_methods(task_of(fields.get("cache"), fields.get("dataset"))),
                      **shorthands)
    for m in methods:  # names and options (every number finite and within bounds), before the cache is read
        check_spec(m)
    if "methods" in given or any(v is not None for v in shorthands.values()):
        fields["methods"] = methods
        given.add("methods")
    label = "+".join(m["name"] for m in methods)
    fields["out"] = fields.get("out") or f"runs/student-{label}"
    config = student_config(resume=resume, **fields)
    result = run_training(run_student, config, resume=resume, overwrite=overwrite, quiet=quiet, given=given)
    if not distributed.env_dist().is_main:  # under torchrun, rank 0 reports
        return
    skipped = result["last"].get("train_kd_skipped", 0.0)
    if skipped:
        console.print(f"[yellow]--skip-bad[/yellow]: {100 * skipped:.1f}% of the last epoch's samples had unreadable "
                      "targets and trained on cross-entropy alone; see train_kd_skipped in metrics.jsonl and run "
                      "verify-cache")
    console.print(f"[green]done[/green]: {label}: best {result.get('best_metric', 'val mIoU')} "
                  f"{100 * result['best_miou']:.2f} — run folder {result['run']}")
