"""The ``kdcache`` command: thin typer commands that parse options and call the library.

Every default ``--help`` shows is read from the library (the config dataclasses, the functions'
signatures, the methods' constructors), so the help cannot drift from what runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kdcache import distributed
from kdcache.cache_build import DEFAULT_TOPK, CacheBuildConfig
from kdcache.cache_build import build_teacher_cache as build_cache
from kdcache.compare import compare_runs
from kdcache.config_files import Option, read_config_file
from kdcache.data import DATASETS
from kdcache.demo import run_demo
from kdcache.demo_classification import run_classification_demo
from kdcache.distill import StudentConfig, student_config
from kdcache.distill import train_student as run_student
from kdcache.errors import KDCacheError, make_folder
from kdcache.evaluation import evaluate_run
from kdcache.export import DEFAULT_OPSET, FORMATS, export_run
from kdcache.kernels import bench
from kdcache.loggers import DEFAULT_PROJECT
from kdcache.methods import METHODS, fill_in, methods_taking, option_default
from kdcache.models import model_groups
from kdcache.models.registry import PREFIXES
from kdcache.progress import console
from kdcache.pseudo_export import export_pseudo_labels as export_labels
from kdcache.pseudo_export import kept_table_rows
from kdcache.report import (
    cache_report,
    compare_per_class_table,
    compare_table,
    per_class_table,
    summary_table,
)
from kdcache.runs import resolve_device, write_json
from kdcache.store.check import inspect_store, verify_store
from kdcache.store.schema import CODECS, TARGET_SHARD_BYTES
from kdcache.training import TrainConfig, train

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
                # escaped: a message may hold text in brackets, e.g. pip install "kdcache[onnx]"
                console.print(f"[bold red]error:[/bold red] {escape(error_text(exc))}", soft_wrap=True, highlight=False)
                raise typer.Exit(2) from None
            except OSError as exc:
                if os.environ.get(TRACEBACK_ENV):
                    raise
                console.print(f"[bold red]error:[/bold red] {escape(os_error_text(exc))}", soft_wrap=True,
                              highlight=False)
                raise typer.Exit(2) from None

        return app.command(name)(wrapper)

    return deco


#: set to see the traceback of a file-system error instead of its one line
TRACEBACK_ENV = "KDCACHE_TRACEBACK"


def os_error_text(exc: OSError) -> str:
    """A file-system error (a path that cannot be read or written, a full disk) as one line that
    names the path (the paths of a command's options are checked by the library first; this is
    what is left, e.g. a file that vanished mid-run)."""
    where = f" {exc.filename}" if exc.filename else ""
    also = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return (f"{exc.strerror or type(exc).__name__}:{where}{also} ({exc}); check the path, its permissions and the "
            f"free space (set {TRACEBACK_ENV}=1 to see where it happened)")


def error_text(exc: KDCacheError) -> str:
    """The message alone: an error re-raised from a DataLoader worker carries the worker's
    traceback in its text; keep only its last line, without the exception's type name."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def output_file(text: str | None, option: str) -> Path | None:
    """The file an option names for a command to write, its folder created first (before any
    work is done, so a path that cannot be written fails at once, not after a long run)."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        raise KDCacheError(f"{option} {text} is a folder; give a file name, e.g. {option} {Path(text) / 'out.json'}")
    make_folder(path.parent, f"{option} {text}: its folder")
    return path


# -- defaults, read from the library ------------------------------------------------------------


def default(owner, name: str):
    """The default of field ``name`` of a config dataclass, or of parameter ``name`` of a function."""
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return inspect.signature(owner).parameters[name].default


def pair_text(pair) -> str:
    return ",".join(f"{x:g}" for x in pair)


def defaults_text(option: str) -> str:
    """'kl 1, cwd 4': each method taking ``option`` with its default."""
    def show(v):
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return ", ".join(f"{m} {show(option_default(m, option))}" for m in methods_taking(option))


# -- parsing -----------------------------------------------------------------------------------

# CLI parameter -> config field, where the names differ
_CLI_TO_CONFIG = {"crop_size": "crop", "flip": "hflip", "dataset_option": "dataset_options",
                  "model_option": "model_options",
                  "resolution": "dataset_options", "method": "methods", "kd_weight": "methods",
                  "temperature": "methods", "student_tap": "methods", "teacher_tap": "methods",
                  "confidence_threshold": "methods", "student": "model", "unlabeled_cache": "unlabeled_caches"}
CONFIG_FILE = "kdcache.config_file"  # ctx.meta: the command's --config file (a config_files.ConfigFile)


def command_line_options(ctx: typer.Context) -> set[str]:
    """Parameters the user set on the command line (not left at their defaults)."""
    return {name for name in ctx.params
            if (source := ctx.get_parameter_source(name)) is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")}


def given_options(ctx: typer.Context) -> set[str]:
    """Config fields the user set, on the command line or in its --config file (not left at their defaults)."""
    names = command_line_options(ctx)
    if (file := ctx.meta.get(CONFIG_FILE)) is not None:
        names |= set(file.options) | set(file.fields)
    return {_CLI_TO_CONFIG.get(name, name) for name in names}


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
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "x" in text and all(p.isdigit() for p in text.split("x")):
        return [int(p) for p in text.split("x")]
    return text


def check_backend(backend: str) -> None:
    if backend not in ("torch", "onnxruntime"):
        raise KDCacheError(f"--backend must be torch or onnxruntime, got {backend!r}")


def parse_key_values(items: list[str] | dict | None, option: str) -> dict:
    """['size=200', 'encoder-name=resnet18'] -> {'size': 200, 'encoder_name': 'resnet18'}; a mapping
    (from a --config file) as it is."""
    opts = dict(items) if isinstance(items, dict) else {}
    for item in [] if isinstance(items, dict) else items or []:
        if "=" not in item:
            raise KDCacheError(f"{option} takes KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = _value(v.strip())
    return opts


def parse_dataset_options(items: list[str] | dict | None, resolution: str | None) -> dict:
    opts = parse_key_values(items, "--dataset-option")
    if resolution is not None:
        opts["resolution"] = list(parse_size(resolution, "--resolution"))
    return opts


def parse_method(spec: str | dict) -> dict:
    """'kl' or 'kl:weight=0.5,temperature=2' -> {"name": "kl", "weight": 0.5, "temperature": 2}."""
    if isinstance(spec, dict):  # from a --config file (a run's config.json)
        return dict(spec)
    name, _, rest = spec.partition(":")
    out: dict = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in item:
            raise KDCacheError(f"--method takes NAME or NAME:key=value,..., got '{spec}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _value(v.strip())
    return out


def parse_list(text: str | None, option: str, cast=str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise KDCacheError(f"{option} takes comma-separated values, got '{text}'") from None


# -- options shared between commands ---------------------------------------------------------------

Dataset = Annotated[str, typer.Option(help=f"Data set: {', '.join(DATASETS.names())}.")]
DataRoot = Annotated[str | None, typer.Option(help="Root folder of the data set (not for synthetic).")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N samples of each split (quick runs).")]
DatasetOption = Annotated[
    list[str] | None,
    typer.Option("--dataset-option", "-o", help="KEY=VALUE passed to the data set, e.g. size=200 (synthetic split size)."),
]
Resolution = Annotated[str | None, typer.Option(help="Synthetic data: image size HxW, e.g. 96x128.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda, cuda:1 ...")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]

# training options: train-teacher and train-student take all of these
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Images per step.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate.")]
Optimizer = Annotated[str, typer.Option(help=f"sgd (momentum {TrainConfig.momentum:g}) or adamw.")]
WeightDecay = Annotated[float, typer.Option(help="Weight decay.")]
Schedule = Annotated[str, typer.Option(help=f"poly (power {TrainConfig.poly_power:g}), cosine or constant, per iteration.")]
WarmupIters = Annotated[int, typer.Option(help="Linear warm-up iterations.")]
ClassWeights = Annotated[bool, typer.Option("--class-weights/--no-class-weights", help="Median-frequency class weights from the training labels.")]
CropSize = Annotated[str | None, typer.Option(help="Training crop HxW (default: the first training image's size).")]
Scale = Annotated[str, typer.Option(help="Random scale range 'lo,hi' (segmentation).")]
CropArea = Annotated[str, typer.Option(help="Classification: the random-resized crop's share of the image area 'lo,hi' (aspect 3/4 to 4/3, stretched to --crop-size).")]
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.")]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 mixed precision (CUDA only).")]
TrainWorkers = Annotated[int | None, typer.Option(help="DataLoader worker processes (default: 0 on CPU, up to 8 on CUDA).")]
Seed = Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")]
SplitSeed = Annotated[int, typer.Option(help="Seed of the K-fold assignment (keep it fixed across runs).")]
ValSplit = Annotated[str, typer.Option(help="Split to validate on (ignored with --folds).")]
Folds = Annotated[int | None, typer.Option(help="K-fold cross-validation over the training split.")]
Fold = Annotated[int, typer.Option(help="Which fold (0-based) is held out for validation.")]
InitWeights = Annotated[str | None, typer.Option(help="Initial weights: a run folder or kdcache checkpoint, a state dict (.pt/.pth/.safetensors), a Hugging Face SegFormer folder or an mmseg SegFormer checkpoint.")]
BackboneWeights = Annotated[str | None, typer.Option(help="Load this file into the encoder only (torchvision ImageNet .pth, timm/smp encoder, MiT/SegFormer): prints what matched, was missing and left over.")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="torchvision models: their ImageNet backbone weights from the local torch hub cache (never downloaded).")]
ModelOption = Annotated[list[str] | None, typer.Option("--model-option", "-m", help="KEY=VALUE passed to the model builder, e.g. encoder_name=resnet18 (smp) or head=mmseg (SegFormer).")]
EvalEvery = Annotated[int, typer.Option(help="Validate every N epochs.")]
Resize = Annotated[str | None, typer.Option(help="Resize every image/mask to HxW first (e.g. 256x256); a student takes its cache's.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt (its options come from its config.json).")]
Overwrite = Annotated[bool, typer.Option(help="Start the run in --out again from scratch.")]
TensorBoard = Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Log metrics.jsonl's numbers, per-class IoU and validation pictures to RUN/tensorboard/ (pip install \"kdcache\\[tensorboard]\").")]
Wandb = Annotated[bool, typer.Option("--wandb/--no-wandb", help="Log the same to Weights & Biases, files in RUN/wandb/; WANDB_MODE=offline sends nothing (pip install \"kdcache\\[wandb]\").")]
WandbProject = Annotated[str | None, typer.Option(help=f"W&B project of --wandb (default: {DEFAULT_PROJECT}).")]

T = TrainConfig  # the defaults of the training options


def _options(**specs) -> list[inspect.Parameter]:
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=value)
            for name, (kind, value) in specs.items()]


#: the options every training command takes (train-teacher and train-student), with the config's defaults
TRAINING_OPTIONS = _options(
    data_root=(DataRoot, None), val_split=(ValSplit, T.val_split), epochs=(Epochs, T.epochs),
    batch_size=(BatchSize, T.batch_size), lr=(Lr, T.lr), optimizer=(Optimizer, T.optimizer),
    weight_decay=(WeightDecay, T.weight_decay), schedule=(Schedule, T.schedule),
    warmup_iters=(WarmupIters, T.warmup_iters), class_weights=(ClassWeights, T.class_weights),
    resize=(Resize, None), crop_size=(CropSize, None), scale=(Scale, pair_text(T.scale)),
    crop_area=(CropArea, pair_text(T.crop_area)), flip=(Flip, T.hflip),
    amp=(Amp, T.amp), device=(Device, T.device), workers=(TrainWorkers, None), seed=(Seed, T.seed),
    split_seed=(SplitSeed, T.split_seed), folds=(Folds, None), fold=(Fold, T.fold), limit=(Limit, None),
    weights=(InitWeights, None), backbone_weights=(BackboneWeights, None), pretrained=(Pretrained, T.pretrained),
    model_option=(ModelOption, None), eval_every=(EvalEvery, T.eval_every), resolution=(Resolution, None),
    dataset_option=(DatasetOption, None), resume=(Resume, False), overwrite=(Overwrite, False), quiet=(Quiet, False),
    tensorboard=(TensorBoard, T.tensorboard), wandb=(Wandb, T.wandb), wandb_project=(WandbProject, None),
)
_RUN_CONTROL = ("resume", "overwrite", "quiet")


def training_fields(**values) -> dict:
    """The shared training options, parsed, as config fields (None: left to the config)."""
    out = dict(values)
    out["resize"] = parse_size(out.pop("resize", None), "--resize")
    out["crop"] = parse_size(out.pop("crop_size", None), "--crop-size")
    out["scale"] = parse_pair(out.get("scale"), "--scale")
    out["crop_area"] = parse_pair(out.get("crop_area"), "--crop-area")
    out["hflip"] = out.pop("flip")
    out["dataset_options"] = parse_dataset_options(out.pop("dataset_option", None), out.pop("resolution", None))
    out["model_options"] = parse_key_values(out.pop("model_option", None), "--model-option")
    return {k: v for k, v in out.items() if v is not None}


def with_training_options(fn: Callable) -> Callable:
    """Give command ``fn`` every option of :data:`TRAINING_OPTIONS`; it receives them parsed, as
    ``fields`` (config fields) and ``control`` (resume, overwrite, quiet)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("fields", "control")]
    names = [p.name for p in TRAINING_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {n: kwargs.pop(n) for n in names}
        control = {n: given.pop(n) for n in _RUN_CONTROL}
        return fn(*args, fields=training_fields(**given), control=control, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + TRAINING_OPTIONS)
    return wrapper


ConfigFileOption = Annotated[str | None, typer.Option(
    "--config", help="YAML or JSON file of option values (option names, or a run's config.json to repeat the run); "
                     "the command line overrides it.")]


def with_config_file(config_class: type) -> Callable:
    """Give a command ``--config FILE``: the file's values (read by kdcache.config_files) for the
    options not given on the command line, so defaults < file < command line. The file's config
    fields that no option sets are applied to the config by :func:`run_training` (and build-teacher-cache)."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        ctx_name = next(p.name for p in sig.parameters.values() if p.annotation is typer.Context)

        @functools.wraps(fn)
        def wrapper(*args, config_file=None, **kwargs):
            if config_file is not None:
                ctx = kwargs[ctx_name]
                names = {p.name: tuple(o[2:] for o in p.opts if o.startswith("--")) for p in ctx.command.params}
                options = [Option.from_parameter(p, names[p.name]) for p in sig.parameters.values() if p.name in names]
                file = read_config_file(config_file, options, config_class, command=ctx.command.name)
                on_line = command_line_options(ctx)
                kwargs.update({k: v for k, v in file.options.items() if k not in on_line})
                file.fields = {k: v for k, v in file.fields.items()
                               if k not in {_CLI_TO_CONFIG.get(n, n) for n in on_line}}
                ctx.meta[CONFIG_FILE] = file
            return fn(*args, **kwargs)

        config_param = inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=ConfigFileOption,
                                         default=None)
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), config_param])
        return wrapper

    return deco


def run_training(fn, config, control: dict, ctx: typer.Context) -> dict:
    if (file := ctx.meta.get(CONFIG_FILE)) is not None:
        config = file.apply(config)
    try:
        return fn(config, resume=control["resume"], overwrite=control["overwrite"], show_progress=not control["quiet"],
                  explicit=given_options(ctx))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: the last finished epoch is in {config.out}/last.pt; "
                      "continue with --resume")
        raise typer.Exit(130) from None


@command("train-teacher")
@with_config_file(TrainConfig)
@with_training_options
def train_teacher(
    ctx: typer.Context,
    fields: dict,
    control: dict,
    model: Annotated[str, typer.Option(help="Registry name (demo_teacher, demo_student, deeplabv3_resnet50, ...; see list-models) or package.module:callable.")] = T.model,
    dataset: Dataset = T.dataset,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<model>).")] = None,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = T.train_split,
):
    """Supervised (cross-entropy) training: a teacher, or the no-KD student baseline."""
    config = TrainConfig(model=model, dataset=dataset, train_split=train_split,
                         out=out or f"runs/{model.replace(':', '_')}", **fields)
    result = run_training(train, config, control, ctx)
    if distributed.env_dist().is_main:  # under torchrun, rank 0 reports
        console.print(f"[green]done[/green]: best {result.get('best_metric', 'val mIoU')} {100 * result['best_miou']:.2f} — run folder {result['run']}")


@command("train-student")
@with_config_file(StudentConfig)
@with_training_options
def train_student(
    ctx: typer.Context,
    fields: dict,
    control: dict,
    cache: Annotated[str | None, typer.Option(help="The teacher cache (from build-teacher-cache).")] = None,
    student: Annotated[str, typer.Option("--student", "--model", help="Student architecture.")] = default(StudentConfig, "model"),
    method: Annotated[list[str] | None, typer.Option(help=f"KD method, repeatable: {', '.join(METHODS.names())}; options as NAME:key=value,... (e.g. kl:weight=0.5,temperature=2). Default: {default(StudentConfig, 'methods')[0]['name']}.")] = None,
    kd_weight: Annotated[float | None, typer.Option(help=f"Weight of every method that has none of its own (defaults: {defaults_text('weight')}).")] = None,
    temperature: Annotated[float | None, typer.Option(help=f"Temperature of every method that has one (defaults: {defaults_text('temperature')}).")] = None,
    student_tap: Annotated[str | None, typer.Option(help=f"Student module of {', '.join(methods_taking('student_tap'))} (e.g. stage3).")] = None,
    teacher_tap: Annotated[str | None, typer.Option(help=f"Cached teacher tap of {', '.join(methods_taking('teacher_tap'))}.")] = None,
    confidence_threshold: Annotated[float | None, typer.Option(help=f"Keep teacher labels at least this confident (defaults: {defaults_text('confidence_threshold')}).")] = None,
    use_views: Annotated[bool, typer.Option(help="Train on the cache's stored views (one drawn per item and epoch).")] = default(StudentConfig, "use_views"),
    check_content: Annotated[bool, typer.Option("--check-content/--no-check-content", help="Re-hash the data set's files against the cache's fingerprints.")] = default(StudentConfig, "check_content"),
    skip_bad: Annotated[bool, typer.Option(help="Train on without the targets of samples whose cached chunks cannot be read (counted and reported).")] = default(StudentConfig, "skip_bad"),
    cache_read: Annotated[str, typer.Option(help="How training reads the cache: stream (whole shards in a shuffled order through a shuffle buffer: one read per shard and array) or random (sample by sample).")] = default(StudentConfig, "cache_read"),
    shuffle_buffer: Annotated[int, typer.Option(help="Samples in each streaming worker's shuffle buffer.")] = default(StudentConfig, "shuffle_buffer"),
    unlabeled_cache: Annotated[list[str] | None, typer.Option(help="A teacher cache of unlabelled images (same teacher as --cache), repeatable: the KD terms train on them, the cross-entropy on the labelled images only. An epoch is one pass over the labelled images.")] = None,
    unlabeled_share: Annotated[float, typer.Option(help="Share of each batch drawn from the --unlabeled-cache images, in (0, 1).")] = default(StudentConfig, "unlabeled_share"),
    unlabeled_limit: Annotated[int | None, typer.Option(help="Only the first N images of each --unlabeled-cache.")] = None,
    online_teacher: Annotated[str | None, typer.Option(help="Run this teacher architecture every step instead of reading the cache (parity checks only); 'cache': the teacher the --cache records, with its ensemble members and test-time augmentation.")] = None,
    teacher_weights: Annotated[str | None, typer.Option(help="Weights of --online-teacher.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the cache's).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/student-<methods>).")] = None,
):
    """Student training from the teacher cache: L_seg + Σ w·L_KD with any of the methods."""
    specs = [parse_method(m) for m in method] if method else default(StudentConfig, "methods")
    methods = fill_in(specs, weight=kd_weight, temperature=temperature, student_tap=student_tap,
                      teacher_tap=teacher_tap, confidence_threshold=confidence_threshold)
    label = "+".join(m["name"] for m in methods)
    if not fields["dataset_options"]:
        fields.pop("dataset_options")  # the cache's
    config = student_config(cache=cache, resume=control["resume"], model=student, methods=methods, use_views=use_views,
                            check_content=check_content, skip_bad=skip_bad, cache_read=cache_read,
                            shuffle_buffer=shuffle_buffer, unlabeled_caches=unlabeled_cache or [],
                            unlabeled_share=unlabeled_share, unlabeled_limit=unlabeled_limit,
                            online_teacher=online_teacher,
                            teacher_weights=teacher_weights, dataset=dataset, out=out or f"runs/student-{label}",
                            **fields)
    result = run_training(run_student, config, control, ctx)
    if not distributed.env_dist().is_main:  # under torchrun, rank 0 reports
        return
    skipped = result["last"].get("train_kd_skipped", 0.0)
    if skipped:
        console.print(f"[yellow]--skip-bad[/yellow]: {100 * skipped:.1f}% of the last epoch's samples had unreadable "
                      "targets and trained on cross-entropy alone; see train_kd_skipped in metrics.jsonl and run "
                      "verify-cache")
    console.print(f"[green]done[/green]: {label}: best {result.get('best_metric', 'val mIoU')} {100 * result['best_miou']:.2f} — run folder {result['run']}")


@command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder (uses best.pt) or a checkpoint file.")],
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the run's own).")] = None,
    data_root: DataRoot = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the run's validation split or fold).")] = None,
    limit: Limit = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = default(evaluate_run, "batch_size"),
    workers: Workers = default(evaluate_run, "workers"),
    device: Device = default(evaluate_run, "device"),
    qualitative: Annotated[int, typer.Option(help="Write the N best and N worst images as 4-panel PNGs (0: none).")] = default(evaluate_run, "qualitative"),
    out: Annotated[str | None, typer.Option(help="Output folder (default RUN/eval for the run's validation part, RUN/eval-SPLIT for --split, RUN/eval-CHECKPOINT for a checkpoint other than best.pt).")] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure ms/image at batch 1.")] = default(evaluate_run, "latency"),
    backend: Annotated[str, typer.Option(help="torch, or onnxruntime: metrics and latency of the exported ONNX graph (exported to RUN/export/model.onnx first, unless --onnx).")] = "torch",
    onnx: Annotated[str | None, typer.Option(help="With --backend onnxruntime: this exported ONNX file (from kdcache export).")] = None,
    quiet: Quiet = False,
):
    """Metrics (mIoU, mAcc, aAcc, per class), #params, latency, and best/worst figures."""
    check_backend(backend)
    if onnx is not None and backend != "onnxruntime":
        raise KDCacheError("--onnx FILE goes with --backend onnxruntime")
    if backend == "onnxruntime" and onnx is None:
        onnx = export_run(target, "onnx")["path"]
        if not quiet:
            console.print(f"exported {onnx} for onnxruntime")
    report = evaluate_run(
        target, dataset=dataset, data_root=data_root, split=split, limit_n=limit,
        batch_size=batch_size, workers=workers, device=device, qualitative=qualitative, out=out,
        latency=latency, show_progress=not quiet, onnx=onnx,
    )
    console.print(per_class_table(report))
    console.print(summary_table(report))
    replaced = " (replacing the earlier evaluation there)" if report.get("replaced") else ""
    console.print(f"wrote {report['out_dir']}/eval.json" + (" and figures" if qualitative else "") + replaced)


@command()
def export(
    target: Annotated[str, typer.Argument(help="A run folder (uses best.pt) or a checkpoint file.")],
    format: Annotated[str, typer.Option("--format", help=f"{', '.join(FORMATS)}.")] = default(export_run, "fmt"),
    out: Annotated[str | None, typer.Option(help="The file to write (default RUN/export/model.onnx, model.safetensors or model.torchscript.pt); a JSON sidecar FILE.json goes beside it.")] = None,
    input_size: Annotated[str | None, typer.Option(help="HxW the exported graph takes (default: the run's input size: its --resize, else its images').")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = DEFAULT_OPSET,
):
    """The model as a file for deployment: input 'image' [N, 3, H, W] (normalised RGB, fixed HxW, any batch N), output 'logits' [N, C, h, w] at the head's native stride (not upsampled: resize bilinearly, then argmax).

    Each export is loaded back (ONNX Runtime, torch.jit.load, or safetensors into a fresh model) and run at batch 1 and 2; its logits must match PyTorch's within 1e-4 x max(1, max |logit|). The sidecar FILE.json records model, classes, input size, output stride, preprocessing (mean, std), opset and the measured difference."""
    info = export_run(target, format, out=out, input_size=parse_size(input_size, "--input-size"), opset=opset)
    check = info["check"]
    console.print(f"[green]exported[/green] {info['model']} ({info['num_classes']} classes) as {format} to {info['path']}: "
                  f"input image [N, 3, {info['input_size'][0]}, {info['input_size'][1]}], output logits at stride "
                  f"{pair_text(info['output_stride'])}; max abs diff {check['max_abs_diff']:.3g} vs PyTorch at batch "
                  f"{', '.join(map(str, check['batch_sizes']))} (tolerance {check['tolerance']:.3g}); sidecar {info['path']}.json",
                  soft_wrap=True, highlight=False)


@command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run folders (teacher, baseline and students).")],
    baseline: Annotated[str | None, typer.Option(help="The run Δ mIoU is measured against (default: the CE-only student run, if any).")] = None,
    out: Annotated[str, typer.Option(help="Folder for compare.md/.csv/.json and the figures.")] = default(compare_runs, "out"),
    split: Annotated[str | None, typer.Option(help="Report on this split (e.g. test), with each run's best-on-validation checkpoint (default: each run's own validation part).")] = default(compare_runs, "split"),
    examples: Annotated[int, typer.Option(help="Images shown side by side: the N best and N worst.")] = default(compare_runs, "examples"),
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure ms/image at batch 1.")] = default(compare_runs, "latency"),
    device: Device = default(compare_runs, "device"),
    per_class: Annotated[bool, typer.Option("--per-class/--no-per-class", help="Also print the per-class IoU table (a row per class).")] = True,
    backend: Annotated[str, typer.Option(help="torch, or onnxruntime: each run exported to RUN/export/model.onnx and measured (metrics, ms/image) as deployed.")] = "torch",
    quiet: Quiet = False,
):
    """One table for many runs (mIoU, mAcc, aAcc, per class, #params, ms, FPS, Δ mIoU) plus figures."""
    check_backend(backend)
    onnx = [export_run(r, "onnx")["path"] for r in runs] if backend == "onnxruntime" else None
    result = compare_runs(runs, baseline=baseline, out=out, split=split, examples=examples, latency=latency,
                          device=device, show_progress=not quiet, onnx=onnx)
    console.print(compare_table(result, width=console.width))
    if per_class:
        console.print(compare_per_class_table(result))
    bars = "per_class_acc.png, confusion_<run>.png" if result.get("task") == "classification" else "per_class_iou.png"
    console.print(f"wrote {out}/compare.md, compare.csv, compare.json, {bars} and {len(result['figures'])} example figures")


@command()
def demo(
    ctx: typer.Context,
    out: Annotated[str, typer.Option(help="Folder for every step's output.")] = default(run_demo, "out"),
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = default(run_demo, "teacher_epochs"),
    student_epochs: Annotated[int, typer.Option(help="Epochs of each student.")] = default(run_demo, "student_epochs"),
    device: Device = default(run_demo, "device"),
    seed: Seed = default(run_demo, "seed"),
    limit: Annotated[int | None, typer.Option(help=f"The first N images of each split: training, val and test (segmentation: the pool is 4x N; default {default(run_demo, 'limit')}, which cuts the training images alone; classification: default all).")] = None,
    task: Annotated[str, typer.Option(help="segmentation (the synthetic scenes) or classification (the shapes: teacher → logits, FKD views and ReLabel label-map caches → students → compare).")] = "segmentation",
    quiet: Quiet = False,
):
    """The whole workflow on the built-in data: teacher → caches (labelled, unlabelled pool) → students → compare on test."""
    if task == "classification":
        given = command_line_options(ctx)
        result = run_classification_demo(
            out if "out" in given else default(run_classification_demo, "out"),
            teacher_epochs=teacher_epochs if "teacher_epochs" in given else default(run_classification_demo, "teacher_epochs"),
            student_epochs=student_epochs if "student_epochs" in given else default(run_classification_demo, "student_epochs"),
            device=device, seed=seed, limit=limit, show_progress=not quiet)
        console.print(compare_table(result, width=console.width))
        console.print(f"figures and tables in {result['out_dir']}")
        return
    if task != "segmentation":
        raise KDCacheError(f"--task must be segmentation or classification, got {task!r}")
    result = run_demo(out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, device=device, seed=seed,
                      limit=default(run_demo, "limit") if limit is None else limit, show_progress=not quiet)
    console.print(compare_table(result, width=console.width))
    console.print(f"figures and tables in {result['out_dir']}")


B = CacheBuildConfig  # the defaults of build-teacher-cache


@command("build-teacher-cache")
@with_config_file(CacheBuildConfig)
def build_teacher_cache(
    ctx: typer.Context,
    weights: Annotated[list[str] | None, typer.Option(help="Teacher weights: a run folder (uses best.pt), a kdcache checkpoint or a state dict (required). Repeat it for an ensemble: the members' outputs are combined per pixel (see --combine).")] = None,
    out: Annotated[str | None, typer.Option(help="The store to write, e.g. caches/teacher-train.zarr, or an fsspec URL (required).")] = None,
    teacher: Annotated[list[str] | None, typer.Option(help="Teacher architecture (default: the one named in the checkpoint); once for every member, or once per --weights.")] = None,
    dataset: Dataset = B.dataset,
    data_root: DataRoot = None,
    split: Annotated[str, typer.Option(help="Split to run the teacher over.")] = B.split,
    topk: Annotated[int | None, typer.Option(help=f"Logits kept per position (default {DEFAULT_TOPK}, or every class when there are fewer; k = number of classes: a dense cache).")] = B.topk,
    features: Annotated[str | None, typer.Option(help="Teacher modules whose outputs to store, NAME[,NAME] (e.g. stage3).")] = None,
    attention: Annotated[bool, typer.Option(help="Also store attention-transfer maps of the --features taps.")] = B.attention,
    attention_only: Annotated[bool, typer.Option(help="Store the attention maps of the --features taps instead of the features.")] = B.attention_only,
    flip_average: Annotated[bool, typer.Option(help="Store the mean of the teacher on the image and on its mirror (flips become exact); with --tta-scales, at every scale.")] = B.flip_average,
    tta_scales: Annotated[str, typer.Option(help="Test-time augmentation: run the teacher at these input scales, e.g. 0.5,0.75,1,1.25,1.5; each output is resized to the cache's grid and combined.")] = ",".join(f"{x:g}" for x in B.tta_scales),
    combine: Annotated[str, typer.Option(help="How members, scales and flips are combined: prob (mean of probabilities at --combine-temperature) or logit (mean of logits).")] = B.combine,
    combine_temperature: Annotated[float, typer.Option(help="Temperature of --combine prob (the stored logits are T·log of the mean probability).")] = B.combine_temperature,
    grid_stride: Annotated[float | None, typer.Option(help="Stride of an ensemble's common grid (default: the finest member's map).")] = None,
    features_from: Annotated[str | None, typer.Option(help="The ensemble member whose --features are stored: its name (run folder or file name) or position (default: the first).")] = None,
    label_map: Annotated[bool, typer.Option(help="Classification: store the teacher's class map before global pooling (ReLabel); students pool it over each random crop.")] = B.label_map,
    views: Annotated[int, typer.Option(help="Also store N random scale/crop views per image with their parameters (FKD-style; classification: random-resized crops, see --view-area).")] = B.views,
    view_area: Annotated[str, typer.Option(help="Classification views: the random-resized crops' share of the image area 'lo,hi'.")] = pair_text(B.view_area),
    view_scale: Annotated[str, typer.Option(help="Scale range 'lo,hi' of the stored views.")] = pair_text(B.view_scale),
    view_crop: Annotated[str | None, typer.Option(help="Crop HxW of the stored views (default: the image size).")] = None,
    view_seed: Annotated[int, typer.Option(help="Seed of the stored views.")] = B.view_seed,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward.")] = B.batch_size,
    device: Device = B.device,
    workers: TrainWorkers = None,
    limit: Limit = None,
    samples_per_shard: Annotated[int | None, typer.Option(help=f"Samples per shard, the unit of writing (default: shards of about {TARGET_SHARD_BYTES >> 20} MB).")] = None,
    codec: Annotated[str, typer.Option(help=f"Chunk compression: {', '.join(CODECS)} (blosc-lz4 decodes 2x faster than blosc-zstd and stores 25% more).")] = B.codec,
    amp: Annotated[bool, typer.Option(help="Run the teacher under fp16 autocast (CUDA only).")] = B.amp,
    resolution: Resolution = None,
    dataset_option: DatasetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out and build it again.")] = False,
    quiet: Quiet = False,
):
    """One teacher pass over a split into a Zarr v3 store (rerun the same command to resume)."""
    if not weights or out is None:
        raise KDCacheError("build-teacher-cache needs --weights and --out (on the command line or in its --config file)")
    config = CacheBuildConfig(
        weights=list(weights or []), out=out, teacher=list(teacher or []) or None, dataset=dataset, data_root=data_root,
        dataset_options=parse_dataset_options(dataset_option, resolution), split=split, topk=topk,
        features=parse_list(features, "--features"), attention=attention, attention_only=attention_only,
        flip_average=flip_average, tta_scales=parse_list(tta_scales, "--tta-scales", float), combine=combine,
        combine_temperature=combine_temperature, grid_stride=grid_stride, features_from=features_from,
        label_map=label_map, views=views, view_scale=parse_pair(view_scale, "--view-scale"),
        view_area=parse_pair(view_area, "--view-area"),
        view_crop=parse_size(view_crop, "--view-crop"), view_seed=view_seed, batch_size=batch_size, device=device,
        workers=workers, limit=limit, samples_per_shard=samples_per_shard, codec=codec, amp=amp,
    )
    if (file := ctx.meta.get(CONFIG_FILE)) is not None:
        config = file.apply(config)
    try:
        summary = build_cache(config, overwrite=overwrite, show_progress=not quiet)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: finished shards of {out} are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    if summary["rank"] == 0:
        done, n = summary["done"], summary["num_samples"]
        how = f"resumed ({summary['already_done']} were done)" if summary["resumed"] else "built"
        console.print(f"[green]{how}[/green]: {done}/{n} samples in {out}")


@command("inspect-cache")
def inspect_cache(
    store: Annotated[str, typer.Argument(help="A teacher cache (.zarr or an fsspec URL).")],
    samples: Annotated[int, typer.Option(help="Samples read to measure the top-k mass coverage.")] = default(inspect_store, "samples"),
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
):
    """Schema, counts, size on disk, bytes/pixel, provenance and top-k mass coverage."""
    json_path = output_file(json_out, "--json")
    report = inspect_store(store, samples=samples)
    for renderable in cache_report(report):
        console.print(renderable)
    if json_path:
        write_json(json_path, report)


@command("verify-cache")
def verify_cache(
    store: Annotated[str, typer.Argument(help="A teacher cache (.zarr or an fsspec URL).")],
    reset_bad: Annotated[bool, typer.Option(help="Mark the shards of bad samples not done, so rerunning the build rewrites them.")] = False,
    quiet: Quiet = False,
):
    """Read every chunk; check done flags, finiteness, class-id range, distinct ids and sort order."""
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
        n_bad = len(result.bad)
        console.print(f"[bold red]{n_bad} bad sample{'s' if n_bad != 1 else ''}[/bold red]; {hint}")
    if result.ok:
        console.print(f"[green]ok[/green]: all {result.num_samples} samples are complete and valid")
    else:
        raise typer.Exit(1)


@command("export-pseudo-labels")
def export_pseudo_labels(
    cache: Annotated[str, typer.Argument(help="A finished teacher cache (.zarr or an fsspec URL).")],
    out: Annotated[str, typer.Option(help="Folder to write: classes.txt, images/, masks/ (and confidence/), pseudo_labels.json; --dataset folder reads it back.")],
    confidence_threshold: Annotated[float, typer.Option(help="Pixels whose teacher probability is below this get 255.")] = default(export_labels, "threshold"),
    class_balanced: Annotated[float | None, typer.Option(help="Also CBST class-balanced thresholds: each class keeps at least its most confident share P of pixels (the lower of the two thresholds applies).")] = None,
    confidence_png: Annotated[bool, typer.Option(help="Also write each pixel's confidence as a 16-bit PNG (round(65535 x p)).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    quiet: Quiet = False,
):
    """The teacher's labels as palette PNGs at each image's own size, from upsampled cached logits.

    Labels come from the teacher's logits rebuilt from the cache and bilinearly upsampled to each image's size, never from interpolated class ids. The top-k limit: a class outside a position's top k enters at an equal share of the tail's probability (exact in total), so the argmax at a cache position is always the teacher's and its confidence exact; between positions the interpolation sees those shares. With a dense cache (--topk C) the labels are exactly the teacher's upsampled prediction."""
    report = export_labels(cache, out, threshold=confidence_threshold, class_balanced=class_balanced,
                           confidence_png=confidence_png, overwrite=overwrite, show_progress=not quiet)
    table = Table(title=f"pixels kept per class (threshold {confidence_threshold}"
                        + (f", class-balanced {class_balanced}" if class_balanced else "") + ")")
    for col, justify in (("class", "left"), ("teacher pixels", "right"), ("kept %", "right")):
        table.add_column(col, justify=justify)
    for row in kept_table_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {report['samples']} masks to {out} ({100 * report['pixels_kept']:.1f}% of pixels kept); "
                  f"train on them with --dataset folder --data-root {out} --train-split all --val-split all (or validate on labelled data: kdcache evaluate RUN --dataset …)")


@command("bench-kernels")
def bench_kernels(
    device: Device = default(resolve_device, "device"),
    quick: Annotated[bool, typer.Option(help="One segmentation and one row case at k = 4 only.")] = default(bench.run, "quick"),
    topk: Annotated[str, typer.Option(help="Comma-separated k values.")] = ",".join(map(str, default(bench.run, "ks"))),
    dtype: Annotated[str | None, typer.Option(help=f"Student dtype: {', '.join(bench.DTYPES)} (default: bfloat16 on CUDA, float32 on CPU).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats per backend (median reported).")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time torch.compile of the eager code (slow to compile).")] = default(bench.run, "compile_backend"),
    json_out: Annotated[str | None, typer.Option("--json", help="Write the numbers to this JSON file.")] = None,
    markdown_out: Annotated[str | None, typer.Option("--markdown", help="Write the table to this Markdown file.")] = None,
):
    """The fused top-k KL kernel vs eager PyTorch and torch.compile: times, GB/s, % of copy bandwidth."""

    def show(r):
        times = "  ".join(f"{b} {ms:.2f} ms" for b, ms in r.ms.items())
        console.print(f"{r.kind} {'x'.join(map(str, r.shape))} k={r.k}: {times}", highlight=False)

    json_path, markdown_path = output_file(json_out, "--json"), output_file(markdown_out, "--markdown")
    result = bench.run(resolve_device(device), quick=quick, ks=parse_list(topk, "--topk", int), dtype=dtype,
                       repeats=repeats, compile_backend=compile, progress=show)
    table = bench.markdown(result)
    typer.echo(table)
    if json_path:
        write_json(json_path, result)
    if markdown_path:
        markdown_path.write_text(f"# bench-kernels\n\n{table}")


@command("list-models")
def list_models():
    """The registered model names by source (any package.module:callable works too)."""
    for source, names in model_groups().items():
        typer.echo(f"{source}:")
        for name in names:
            typer.echo(f"  {name}")
    for _prefix, (_factory, shown) in sorted(PREFIXES.items()):
        typer.echo(shown)


@command("list-datasets")
def list_datasets():
    """The registered data set names, with their task."""
    for name, cls in DATASETS.items():
        typer.echo(f"{name}  ({getattr(cls, 'task', 'segmentation')})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
