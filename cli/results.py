"""``evaluate``, ``export``, ``compare`` and ``demo``: what a run is worth, and the whole workflow."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcache.cli.base import (
    DataRoot,
    Device,
    Limit,
    Quiet,
    Seed,
    Workers,
    check_backend,
    command,
    command_line_options,
    default,
    pair_text,
)
from kdcache.cli.parse import parse_size
from kdcache.cli.report import (
    compare_per_class_table,
    compare_table,
    per_class_table,
    summary_table,
)
from kdcache.core.errors import KDCacheError
from kdcache.core.options import Bounds
from kdcache.core.progress import console
from kdcache.demo.classification import run_classification_demo
from kdcache.demo.segmentation import recommendation, run_demo
from kdcache.report.compare import compare_runs
from kdcache.report.evaluation import evaluate_run
from kdcache.report.export import DEFAULT_OPSET, FORMATS, export_run


@command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder (uses best.pt) or a checkpoint file.")],
    dataset: Annotated[str | None, typer.Option(help="Data set (default: the run's own).")] = None,
    data_root: DataRoot = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the run's validation split or fold).")] = None,
    limit: Limit = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass."), Bounds(">= 1")] = default(evaluate_run, "batch_size"),
    workers: Workers = default(evaluate_run, "workers"),
    device: Device = default(evaluate_run, "device"),
    qualitative: Annotated[int, typer.Option(help="Write the N best and N worst images as 4-panel PNGs (0: none)."), Bounds(">= 0")] = default(evaluate_run, "qualitative"),
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
    examples: Annotated[int, typer.Option(help="Images shown side by side: the N best and N worst."), Bounds(">= 0")] = default(compare_runs, "examples"),
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure ms/image at batch 1.")] = default(compare_runs, "latency"),
    device: Device = default(compare_runs, "device"),
    per_class: Annotated[bool, typer.Option("--per-class/--no-per-class", help="Also print where KD helps and hurts per class: the teacher, the baseline and each run's Δ, for the classes that differ by more than a point.")] = True,
    backend: Annotated[str, typer.Option(help="torch, or onnxruntime: each run exported to RUN/export/model.onnx and measured (metrics, ms/image) as deployed.")] = "torch",
    page_images: Annotated[int, typer.Option(help="Test images index.html browses (all when there are no more; else those where the runs differ most; 0: none)."), Bounds(">= 0")] = default(compare_runs, "page_images"),
    data_root: Annotated[str | None, typer.Option(help="Evaluate every run on the data under DIR (default: each run's own, which must be the same for all).")] = None,
    quiet: Quiet = False,
):
    """One table for many runs (mIoU, mAcc, aAcc, per class, #params, ms, FPS, Δ mIoU), figures and index.html to browse."""
    check_backend(backend)
    onnx = [export_run(r, "onnx")["path"] for r in runs] if backend == "onnxruntime" else None
    result = compare_runs(runs, baseline=baseline, out=out, split=split, examples=examples, latency=latency,
                          device=device, show_progress=not quiet, onnx=onnx, page_images=page_images,
                          data_root=data_root)
    console.print(compare_table(result, width=console.width))
    if per_class:
        console.print(compare_per_class_table(result))
    bars = "per_class_acc.png, confusion_<run>.png" if result.get("task") == "classification" else "per_class_iou.png"
    console.print(f"wrote {out}/index.html (open it in a browser), compare.md, compare.csv, compare.json, {bars} and "
                  f"{len(result['figures'])} example figures")


@command()
def demo(
    ctx: typer.Context,
    out: Annotated[str, typer.Option(help="Folder for every step's output (the default shown is segmentation's; "
                                          f"classification: {default(run_classification_demo, 'out')}).")
                   ] = default(run_demo, "out"),
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs (the default shown is segmentation's; "
                                                     "classification: "
                                                     f"{default(run_classification_demo, 'teacher_epochs')})."),
                              Bounds(">= 1")] = default(run_demo, "teacher_epochs"),
    student_epochs: Annotated[int, typer.Option(help="Epochs of each student (the default shown is segmentation's; "
                                                     "classification: "
                                                     f"{default(run_classification_demo, 'student_epochs')})."),
                              Bounds(">= 1")] = default(run_demo, "student_epochs"),
    device: Device = default(run_demo, "device"),
    seed: Seed = default(run_demo, "seed"),
    limit: Annotated[int | None, typer.Option(help=f"The first N images of each split: training, val and test (segmentation: the pool is 4x N; default {default(run_demo, 'limit')}, which cuts the training images alone; classification: default all)."), Bounds(">= 1")] = None,
    task: Annotated[str, typer.Option(help="segmentation (the synthetic scenes) or classification (the shapes: teacher → logits, FKD views and ReLabel label-map caches → students → compare).")] = "segmentation",
    quiet: Quiet = False,
):
    """The whole workflow on the built-in data: teacher → caches (labelled images, a schedule of the students' crops, an unlabelled pool) → students, the recommended recipe first → compare on test."""
    if task == "classification":
        given = command_line_options(ctx)
        result = run_classification_demo(
            out if "out" in given else default(run_classification_demo, "out"),
            teacher_epochs=teacher_epochs if "teacher_epochs" in given else default(run_classification_demo, "teacher_epochs"),
            student_epochs=student_epochs if "student_epochs" in given else default(run_classification_demo, "student_epochs"),
            device=device, seed=seed, limit=limit, show_progress=not quiet)
        console.print(compare_table(result, width=console.width))
        console.print(f"figures and tables in {result['out_dir']}; open {result['out_dir']}/index.html to browse them")
        return
    if task != "segmentation":
        raise KDCacheError(f"--task must be segmentation or classification, got {task!r}")
    result = run_demo(out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, device=device, seed=seed,
                      limit=default(run_demo, "limit") if limit is None else limit, show_progress=not quiet)
    console.print(compare_table(result, width=console.width))
    line = recommendation(result)
    if line:
        console.print(f"[bold]{line}[/bold]")
    console.print(f"figures and tables in {result['out_dir']}; open {result['out_dir']}/index.html to browse them")
