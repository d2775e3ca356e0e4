"""The ``kdcache`` command: thin typer commands that parse options and call the library."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated

import typer

from kdcache.errors import KDCacheError
from kdcache.progress import console

app = typer.Typer(
    name="kdcache",
    help="Offline teacher caches and fused KD losses for semantic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str | None = None) -> Callable:
    """``app.command`` that turns a :class:`KDCacheError` into one red line and exit status 2."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KDCacheError as exc:
                console.print(f"[bold red]error:[/bold red] {error_text(exc)}", soft_wrap=True, highlight=False)
                raise typer.Exit(2) from None

        return app.command(name)(wrapper)

    return deco


def error_text(exc: KDCacheError) -> str:
    """The message alone: an error re-raised from a DataLoader worker carries the worker's
    traceback in its text; keep only its last line, without the exception's type name."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


# CLI parameter -> TrainConfig field, where the names differ
_CLI_TO_CONFIG = {"crop_size": "crop", "flip": "hflip", "dataset_option": "dataset_options",
                  "resolution": "dataset_options", "method": "methods", "kd_weight": "methods",
                  "temperature": "methods", "student_tap": "methods", "teacher_tap": "methods",
                  "confidence_threshold": "methods"}


def given_options(ctx: typer.Context) -> set[str]:
    """TrainConfig fields the user set on the command line (not left at their defaults)."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(_CLI_TO_CONFIG.get(name, name))
    return given


def parse_size(text: str | None, option: str) -> tuple[int, int] | None:
    """'96x128' -> (96, 128) (H x W); '256' -> (256, 256)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise KDCacheError(f"{option} takes HxW (e.g. 96x128) or one number, got '{text}'")
    return parts[0], parts[1]


def parse_pair(text: str | None, option: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise KDCacheError(f"{option} takes 'lo,hi' (e.g. 0.5,2.0), got '{text}'") from None
    return lo, hi


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "x" in text and all(p.isdigit() for p in text.split("x")):
        return [int(p) for p in text.split("x")]
    return text


def parse_dataset_options(items: list[str] | None, resolution: str | None) -> dict:
    opts = {}
    for item in items or []:
        if "=" not in item:
            raise KDCacheError(f"--dataset-option takes KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = _value(v.strip())
    if resolution is not None:
        opts["resolution"] = list(parse_size(resolution, "--resolution"))
    return opts


# Shared option types -------------------------------------------------------------------
Dataset = Annotated[str, typer.Option(help="synthetic (built in), voc, camvid, cityscapes or folder.")]
DataRoot = Annotated[str | None, typer.Option(help="Root folder of the data set (not for synthetic).")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N samples of each split (quick runs).")]
DatasetOption = Annotated[
    list[str] | None,
    typer.Option("--dataset-option", "-o", help="KEY=VALUE passed to the data set, e.g. size=200 (synthetic split size)."),
]
Resolution = Annotated[str | None, typer.Option(help="Synthetic data: image size HxW, e.g. 96x128.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda, cuda:1 ...")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes.")]


Epochs = Annotated[int | None, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int | None, typer.Option(help="Images per step.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate.")]
Optimizer = Annotated[str | None, typer.Option(help="sgd (momentum 0.9) or adamw.")]
WeightDecay = Annotated[float | None, typer.Option(help="Weight decay.")]
Schedule = Annotated[str | None, typer.Option(help="poly (power 0.9), cosine or constant, per iteration.")]
WarmupIters = Annotated[int | None, typer.Option(help="Linear warm-up iterations.")]
ClassWeights = Annotated[bool, typer.Option("--class-weights/--no-class-weights", help="Median-frequency class weights from the training labels.")]
CropSize = Annotated[str | None, typer.Option(help="Training crop HxW (default: the first training image's size).")]
Scale = Annotated[str | None, typer.Option(help="Random scale range 'lo,hi'.")]
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.")]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 mixed precision (CUDA only).")]
TrainWorkers = Annotated[int | None, typer.Option(help="DataLoader worker processes (default: 0 on CPU, up to 8 on CUDA).")]
Seed = Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")]
SplitSeed = Annotated[int, typer.Option(help="Seed of the K-fold assignment (keep it fixed across runs).")]
Folds = Annotated[int | None, typer.Option(help="K-fold cross-validation over the training split.")]
Fold = Annotated[int, typer.Option(help="Which fold (0-based) is held out for validation.")]
InitWeights = Annotated[str | None, typer.Option(help="Initial weights: a kdcache checkpoint or a state dict.")]
EvalEvery = Annotated[int | None, typer.Option(help="Validate every N epochs.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")]
Overwrite = Annotated[bool, typer.Option(help="Start the run in --out again from scratch.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]


def optional_train_options(**values) -> dict:
    """The optional training options the user gave, parsed, as config fields."""
    out = dict(values)
    out["resize"] = parse_size(out.pop("resize", None), "--resize")
    out["crop"] = parse_size(out.pop("crop_size", None), "--crop-size")
    out["scale"] = parse_pair(out.get("scale"), "--scale")
    return {k: v for k, v in out.items() if v is not None}


def run_training(fn, config, *, resume: bool, overwrite: bool, quiet: bool, ctx: typer.Context) -> dict:
    try:
        return fn(config, resume=resume, overwrite=overwrite, show_progress=not quiet, explicit=given_options(ctx))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: the last finished epoch is in {config.out}/last.pt; "
                      "continue with --resume")
        raise typer.Exit(130) from None


@command("train-teacher")
def train_teacher(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Registry name (demo_teacher, demo_student, deeplabv3_resnet50, ...) or package.module:callable.")] = "demo_teacher",
    dataset: Dataset = "synthetic",
    data_root: DataRoot = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<model>).")] = None,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split to validate on (ignored with --folds).")] = "val",
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None, optimizer: Optimizer = None,
    weight_decay: WeightDecay = None, schedule: Schedule = None, warmup_iters: WarmupIters = None,
    class_weights: ClassWeights = False,
    resize: Annotated[str | None, typer.Option(help="Resize every image/mask to HxW first (e.g. 256x256).")] = None,
    crop_size: CropSize = None, scale: Scale = None, flip: Flip = True, amp: Amp = True, device: Device = "auto",
    workers: TrainWorkers = None, seed: Seed = 0, split_seed: SplitSeed = 0, folds: Folds = None, fold: Fold = 0,
    limit: Limit = None, weights: InitWeights = None, eval_every: EvalEvery = None,
    resolution: Resolution = None, dataset_option: DatasetOption = None,
    resume: Resume = False, overwrite: Overwrite = False, quiet: Quiet = False,
):
    """Supervised (cross-entropy) training: a teacher, or the no-KD student baseline."""
    from kdcache.training import TrainConfig, train

    config = TrainConfig(
        model=model, dataset=dataset, data_root=data_root, train_split=train_split, val_split=val_split,
        out=out or f"runs/{model.replace(':', '_')}", class_weights=class_weights, hflip=flip, amp=amp,
        device=device, workers=workers, seed=seed, split_seed=split_seed, fold=fold,
        dataset_options=parse_dataset_options(dataset_option, resolution),
        **optional_train_options(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                 weight_decay=weight_decay, schedule=schedule, warmup_iters=warmup_iters,
                                 resize=resize, crop_size=crop_size, scale=scale, folds=folds, limit=limit,
                                 weights=weights, eval_every=eval_every),
    )
    result = run_training(train, config, resume=resume, overwrite=overwrite, quiet=quiet, ctx=ctx)
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(f"[green]done[/green]: best val mIoU {100 * result['best_miou']:.2f} — run folder {result['run']}")


def parse_method(spec: str) -> dict:
    """'kl' or 'kl:weight=0.5,temperature=2' -> {"name": "kl", "weight": 0.5, "temperature": 2}."""
    name, _, rest = spec.partition(":")
    out: dict = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in item:
            raise KDCacheError(f"--method takes NAME or NAME:key=value,..., got '{spec}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _value(v.strip())
    return out


# shorthand options -> the method options they fill in where a method takes them
_SHORTHANDS = {"kd_weight": ("weight", None), "temperature": ("temperature", {"kl", "cwd"}),
               "student_tap": ("student_tap", {"at", "sp", "fitnet"}),
               "teacher_tap": ("teacher_tap", {"at", "sp", "fitnet"}),
               "confidence_threshold": ("confidence_threshold", {"pseudo"})}


@command("train-student")
def train_student(
    ctx: typer.Context,
    cache: Annotated[str | None, typer.Option(help="The teacher cache (from build-teacher-cache).")] = None,
    model: Annotated[str, typer.Option("--student", "--model", help="Student architecture.")] = "demo_student",
    method: Annotated[list[str] | None, typer.Option(help="KD method, repeatable: none, kl, at, sp, fitnet, cwd, pseudo; options as NAME:key=value,... (e.g. kl:weight=0.5,temperature=2).")] = None,
    kd_weight: Annotated[float | None, typer.Option(help="Weight of every method that has none of its own.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Temperature of kl and cwd (default 4).")] = None,
    student_tap: Annotated[str | None, typer.Option(help="Student module for at/sp/fitnet (e.g. stage3).")] = None,
    teacher_tap: Annotated[str | None, typer.Option(help="Cached teacher tap for at/sp/fitnet.")] = None,
    confidence_threshold: Annotated[float | None, typer.Option(help="pseudo: keep teacher labels at least this confident (default 0.7).")] = None,
    use_views: Annotated[bool, typer.Option(help="Train on the cache's stored views (one drawn per item and epoch).")] = False,
    check_content: Annotated[bool, typer.Option("--check-content/--no-check-content", help="Re-hash the data set's files against the cache's fingerprints.")] = True,
    skip_bad: Annotated[bool, typer.Option(help="Train on without the targets of samples whose cached chunks cannot be read (counted and reported).")] = False,
    online_teacher: Annotated[str | None, typer.Option(help="Run this teacher every step instead of reading the cache (parity checks only).")] = None,
    teacher_weights: Annotated[str | None, typer.Option(help="Weights of --online-teacher.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the cache's).")] = None,
    data_root: DataRoot = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/student-<methods>).")] = None,
    val_split: Annotated[str, typer.Option(help="Split to validate on (ignored with --folds).")] = "val",
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None, optimizer: Optimizer = None,
    weight_decay: WeightDecay = None, schedule: Schedule = None, warmup_iters: WarmupIters = None,
    class_weights: ClassWeights = False, crop_size: CropSize = None, scale: Scale = None, flip: Flip = True,
    amp: Amp = True, device: Device = "auto", workers: TrainWorkers = None, seed: Seed = 0,
    split_seed: SplitSeed = 0, folds: Folds = None, fold: Fold = 0, limit: Limit = None,
    weights: InitWeights = None, eval_every: EvalEvery = None,
    resume: Resume = False, overwrite: Overwrite = False, quiet: Quiet = False,
):
    """Student training from the teacher cache: L_seg + Σ w·L_KD with any of the methods."""
    from kdcache.distill import StudentConfig, config_from_store
    from kdcache.distill import train_student as run

    methods = [parse_method(m) for m in (method or ["kl"])]
    shorthands = {"kd_weight": kd_weight, "temperature": temperature, "student_tap": student_tap,
                  "teacher_tap": teacher_tap, "confidence_threshold": confidence_threshold}
    for opt, value in shorthands.items():
        key, applies = _SHORTHANDS[opt]
        for m in methods:
            if value is not None and key not in m and (applies is None or m["name"] in applies):
                if not (opt == "kd_weight" and m["name"] == "none"):
                    m[key] = value
    label = "+".join(m["name"] for m in methods)
    fields = dict(
        model=model, methods=methods, use_views=use_views, check_content=check_content, skip_bad=skip_bad,
        online_teacher=online_teacher, teacher_weights=teacher_weights, val_split=val_split,
        out=out or f"runs/student-{label}", class_weights=class_weights, hflip=flip, amp=amp, device=device,
        workers=workers, seed=seed, split_seed=split_seed, fold=fold, dataset=dataset, data_root=data_root,
        **optional_train_options(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                 weight_decay=weight_decay, schedule=schedule, warmup_iters=warmup_iters,
                                 crop_size=crop_size, scale=scale, folds=folds, limit=limit, weights=weights,
                                 eval_every=eval_every),
    )
    if cache is None and resume and out:
        from kdcache.runs import RunDir

        cache = RunDir(out).read_config().get("cache") if RunDir(out).exists() else None
    if cache is not None:
        config = config_from_store(cache, **fields)
    elif online_teacher is not None:
        config = StudentConfig(**{k: v for k, v in fields.items() if v is not None})
    else:
        raise KDCacheError("--cache STORE is required (build one with build-teacher-cache)")
    result = run_training(run, config, resume=resume, overwrite=overwrite, quiet=quiet, ctx=ctx)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    skipped = result["last"].get("train_kd_skipped", 0.0)
    if skipped:
        console.print(f"[yellow]--skip-bad[/yellow]: {100 * skipped:.1f}% of the last epoch's samples had unreadable "
                      "targets and trained on cross-entropy alone; see train_kd_skipped in metrics.jsonl and run "
                      "verify-cache")
    console.print(f"[green]done[/green]: {label}: best val mIoU {100 * result['best_miou']:.2f} — run folder {result['run']}")


@command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder (uses best.pt) or a checkpoint file.")],
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the run's own).")] = None,
    data_root: DataRoot = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the run's validation split or fold).")] = None,
    limit: Limit = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    workers: Workers = 0,
    device: Device = "auto",
    qualitative: Annotated[int, typer.Option(help="Write the N best and N worst images as 4-panel PNGs (0: none).")] = 8,
    out: Annotated[str | None, typer.Option(help="Output folder (default RUN/eval).")] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure ms/image at batch 1.")] = True,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
):
    """Metrics (mIoU, mAcc, aAcc, per class), #params, latency, and best/worst figures."""
    from kdcache.evaluation import evaluate_run
    from kdcache.report import per_class_table, summary_table

    report = evaluate_run(
        target, dataset=dataset, data_root=data_root, split=split, limit_n=limit,
        batch_size=batch_size, workers=workers, device=device, qualitative=qualitative, out=out,
        latency=latency, show_progress=not quiet,
    )
    console.print(per_class_table(report))
    console.print(summary_table(report))
    console.print(f"wrote {report['out_dir']}/eval.json" + (" and figures" if qualitative else ""))


@command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run folders (teacher, baseline and students).")],
    baseline: Annotated[str | None, typer.Option(help="The run Δ mIoU is measured against (default: the CE-only student run, if any).")] = None,
    out: Annotated[str, typer.Option(help="Folder for compare.md/.csv/.json and the figures.")] = "runs/compare",
    examples: Annotated[int, typer.Option(help="Validation images shown side by side: the N best and N worst.")] = 3,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure ms/image at batch 1.")] = True,
    device: Device = "auto",
    per_class: Annotated[bool, typer.Option("--per-class/--no-per-class", help="Per-class IoU columns in the printed table.")] = True,
    quiet: Quiet = False,
):
    """One table for many runs (mIoU, mAcc, aAcc, per class, #params, ms, FPS, Δ mIoU) plus figures."""
    from kdcache.compare import compare_runs
    from kdcache.report import compare_table

    result = compare_runs(runs, baseline=baseline, out=out, examples=examples, latency=latency, device=device,
                          show_progress=not quiet)
    console.print(compare_table(result, per_class=per_class))
    console.print(f"wrote {out}/compare.md, compare.csv, compare.json, per_class_iou.png and {len(result['figures'])} example figures")


@command()
def demo(
    out: Annotated[str, typer.Option(help="Folder for every step's output.")] = "runs/demo",
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 20,
    student_epochs: Annotated[int, typer.Option(help="Epochs of each student.")] = 20,
    device: Device = "auto",
    seed: Seed = 0,
    limit: Limit = None,
    quiet: Quiet = False,
):
    """The whole workflow on the built-in data: teacher → cache → students (none, kl, at, sp) → compare."""
    from kdcache.demo import run_demo
    from kdcache.report import compare_table

    result = run_demo(out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, device=device, seed=seed,
                      limit=limit, show_progress=not quiet)
    console.print(compare_table(result, per_class=False))
    console.print(f"figures and tables in {result['out_dir']}")


@command("build-teacher-cache")
def build_teacher_cache(
    weights: Annotated[str, typer.Option(help="Teacher weights: a run folder (uses best.pt), a kdcache checkpoint or a state dict.")],
    out: Annotated[str, typer.Option(help="The store to write, e.g. caches/teacher-train.zarr.")],
    teacher: Annotated[str | None, typer.Option(help="Teacher architecture (default: the one named in the checkpoint).")] = None,
    dataset: Dataset = "synthetic",
    data_root: DataRoot = None,
    split: Annotated[str, typer.Option(help="Split to run the teacher over.")] = "train",
    topk: Annotated[int, typer.Option(help="Logits kept per position (k = number of classes: a dense cache).")] = 4,
    features: Annotated[str | None, typer.Option(help="Teacher modules whose outputs to store, NAME[,NAME] (e.g. stage3).")] = None,
    attention: Annotated[bool, typer.Option(help="Also store attention-transfer maps of the --features taps.")] = False,
    attention_only: Annotated[bool, typer.Option(help="Store the attention maps of the --features taps instead of the features.")] = False,
    flip_average: Annotated[bool, typer.Option(help="Store the mean of the teacher on the image and on its mirror (flips become exact).")] = False,
    views: Annotated[int, typer.Option(help="Also store N random scale/crop views per image with their parameters (FKD-style).")] = 0,
    view_scale: Annotated[str, typer.Option(help="Scale range 'lo,hi' of the stored views.")] = "0.5,2.0",
    view_crop: Annotated[str | None, typer.Option(help="Crop HxW of the stored views (default: the image size).")] = None,
    view_seed: Annotated[int, typer.Option(help="Seed of the stored views.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward.")] = 8,
    device: Device = "auto",
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes (default: 0 on CPU, up to 8 on CUDA).")] = None,
    limit: Limit = None,
    samples_per_shard: Annotated[int | None, typer.Option(help="Samples per shard, the unit of writing (default: about 32 MB shards).")] = None,
    codec: Annotated[str, typer.Option(help="Chunk compression: blosc-zstd (default), blosc-lz4 (decodes 2x faster, 25% larger), zstd or none.")] = "blosc-zstd",
    amp: Annotated[bool, typer.Option(help="Run the teacher under fp16 autocast (CUDA only).")] = False,
    resolution: Resolution = None,
    dataset_option: DatasetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out and build it again.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
):
    """One teacher pass over a split into a Zarr v3 store (rerun the same command to resume)."""
    from kdcache.cache_build import CacheBuildConfig
    from kdcache.cache_build import build_teacher_cache as build

    config = CacheBuildConfig(
        weights=weights, out=out, teacher=teacher, dataset=dataset, data_root=data_root,
        dataset_options=parse_dataset_options(dataset_option, resolution), split=split, topk=topk,
        features=tuple(f.strip() for f in features.split(",") if f.strip()) if features else (),
        attention=attention, attention_only=attention_only, flip_average=flip_average, views=views,
        view_scale=parse_pair(view_scale, "--view-scale"), view_crop=parse_size(view_crop, "--view-crop"),
        view_seed=view_seed, batch_size=batch_size, device=device, workers=workers, limit=limit,
        samples_per_shard=samples_per_shard, codec=codec, amp=amp,
    )
    try:
        summary = build(config, overwrite=overwrite, show_progress=not quiet)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: finished shards of {out} are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    if summary["rank"] == 0:
        done, n = summary["done"], summary["num_samples"]
        how = f"resumed ({summary['already_done']} were done)" if summary["resumed"] else "built"
        console.print(f"[green]{how}[/green]: {done}/{n} samples in {out}")


@command("inspect-cache")
def inspect_cache(
    store: Annotated[str, typer.Argument(help="A teacher cache (.zarr).")],
    samples: Annotated[int, typer.Option(help="Samples read to measure the top-k mass coverage.")] = 64,
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
):
    """Schema, counts, size on disk, bytes/pixel, provenance and top-k mass coverage."""
    from kdcache.report import cache_report
    from kdcache.runs import write_json
    from kdcache.store.check import inspect_store

    report = inspect_store(store, samples=samples)
    for renderable in cache_report(report):
        console.print(renderable)
    if json_out:
        from pathlib import Path

        write_json(Path(json_out), report)


@command("verify-cache")
def verify_cache(
    store: Annotated[str, typer.Argument(help="A teacher cache (.zarr).")],
    reset_bad: Annotated[bool, typer.Option(help="Mark the shards of bad samples not done, so rerunning the build rewrites them.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Read every chunk; check done flags, finiteness, class-id range and sort order."""
    from kdcache.store.check import verify_store

    result = verify_store(store, show_progress=not quiet, reset_bad=reset_bad)
    if result.not_done:
        console.print(f"[yellow]{len(result.not_done)} of {result.num_samples} samples are not done[/yellow] "
                      f"(e.g. {', '.join(result.not_done[:5])}): rerun build-teacher-cache to finish the store")
    for sid, problems in list(result.bad.items())[:50]:
        console.print(f"[red]bad[/red] {sid}: {'; '.join(problems)}", highlight=False, soft_wrap=True)
    if len(result.bad) > 50:
        console.print(f"… and {len(result.bad) - 50} more bad samples")
    if result.bad:
        hint = ("their shards are marked not done: rerun build-teacher-cache to rewrite them" if reset_bad
                else "rerun with --reset-bad, then rerun build-teacher-cache to rewrite them")
        console.print(f"[bold red]{len(result.bad)} bad samples[/bold red]; {hint}")
    if result.ok:
        console.print(f"[green]ok[/green]: all {result.num_samples} samples are complete and valid")
    else:
        raise typer.Exit(1)


@command("bench-kernels")
def bench_kernels(
    device: Device = "auto",
    quick: Annotated[bool, typer.Option(help="One segmentation and one row case at k = 4 only.")] = False,
    topk: Annotated[str, typer.Option(help="Comma-separated k values.")] = "4,8",
    dtype: Annotated[str | None, typer.Option(help="Student dtype: float32, float16, bfloat16 (default: bf16 on CUDA, fp32 on CPU).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats per backend (median reported).")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time torch.compile of the eager code (slow to compile).")] = True,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the numbers to this JSON file.")] = None,
    markdown_out: Annotated[str | None, typer.Option("--markdown", help="Write the table to this Markdown file.")] = None,
):
    """The fused top-k KL kernel vs eager PyTorch and torch.compile: times, GB/s, % of copy bandwidth."""
    import torch

    from kdcache.kernels.bench import markdown, run
    from kdcache.runs import resolve_device, write_json

    dev = resolve_device(device)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise KDCacheError(f"--dtype must be float32, float16 or bfloat16, got {dtype}")
    try:
        ks = tuple(int(x) for x in topk.split(","))
    except ValueError:
        raise KDCacheError(f"--topk takes comma-separated integers, got '{topk}'") from None

    def show(r):
        times = "  ".join(f"{b} {ms:.2f} ms" for b, ms in r.ms.items())
        console.print(f"{r.kind} {'x'.join(map(str, r.shape))} k={r.k}: {times}", highlight=False)

    result = run(dev, quick=quick, ks=ks, dtype=dtypes.get(dtype) if dtype else None, repeats=repeats,
                 compile_backend=compile, progress=show)
    table = markdown(result)
    typer.echo(table)
    if json_out:
        from pathlib import Path

        write_json(Path(json_out), result)
    if markdown_out:
        from pathlib import Path

        Path(markdown_out).write_text(f"# bench-kernels\n\n{table}")


@command("list-models")
def list_models():
    """The registered model names (any package.module:callable works too)."""
    from kdcache.models import MODELS

    for name in MODELS.names():
        typer.echo(name)


@command("list-datasets")
def list_datasets():
    """The registered data set names."""
    from kdcache.data import DATASETS

    for name in DATASETS.names():
        typer.echo(name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
