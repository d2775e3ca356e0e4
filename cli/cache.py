"""``build-teacher-cache`` (its options are CacheBuildConfig's declared fields, see
:mod:`kdcache.cli.flags`), ``inspect-cache``, ``verify-cache`` and ``export-pseudo-labels``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kdcache.cli.base import Quiet, command, default, output_file
from kdcache.cli.flags import config_options
from kdcache.cli.report import cache_report
from kdcache.cli.train import Quiet as TrainQuiet
from kdcache.cli.train import Resolution, with_resolution
from kdcache.core.errors import KDCacheError
from kdcache.core.options import Bounds
from kdcache.core.outputs import signed
from kdcache.core.progress import console
from kdcache.core.runs import write_json
from kdcache.data import DATASETS
from kdcache.report.pseudo_labels import BOUNDS as PSEUDO_BOUNDS
from kdcache.report.pseudo_labels import export_pseudo_labels as export_labels
from kdcache.report.pseudo_labels import kept_table_rows
from kdcache.store.check import inspect_store, verify_store
from kdcache.store.schema import CODECS, TARGET_SHARD_BYTES
from kdcache.teacher.cache_build import DEFAULT_TOPK, BuildInterrupted, CacheBuildConfig
from kdcache.teacher.cache_build import build_teacher_cache as build_cache


def help_context() -> dict:
    """What the declared helps of build-teacher-cache's options name."""
    return {"datasets": ", ".join(DATASETS.names()), "default_topk": DEFAULT_TOPK, "codecs": ", ".join(CODECS),
            "shard_mb": TARGET_SHARD_BYTES >> 20}


@command("build-teacher-cache")
@config_options(CacheBuildConfig, help_context, extra={"resolution": "size"})
def build_teacher_cache(
    ctx: typer.Context,
    fields: dict,
    given: set[str],
    resolution: Resolution = None,
    overwrite: Annotated[bool, typer.Option(help="Delete the teacher cache at --out and build it again (never a "
                                                 "file kdcache did not write).",
                                            rich_help_panel="Inputs and outputs")] = False,
    quiet: TrainQuiet = False,
):
    """One teacher pass over a split into a Zarr v3 store (rerun the same command to resume)."""
    if not fields.get("weights") or not fields.get("out"):
        raise KDCacheError("build-teacher-cache needs --weights and --out (on the command line or in its --config file)")
    with_resolution(fields, given, resolution)
    if not fields.get("teacher"):
        fields.pop("teacher", None)
    config = CacheBuildConfig(**fields)
    try:
        summary = build_cache(config, overwrite=overwrite, show_progress=not quiet)
    except KeyboardInterrupt as exc:
        kept = exc.kept() if isinstance(exc, BuildInterrupted) else (
            f"the finished shards of {config.out} (if any) are kept; rerun the same command to resume")
        console.print(f"[yellow]interrupted[/yellow]: {kept}", soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    if summary["rank"] == 0:
        done, n = summary["done"], summary["num_samples"]
        how = f"resumed ({summary['already_done']} were done)" if summary["resumed"] else "built"
        console.print(f"[green]{how}[/green]: {done}/{n} samples in {config.out}")


@command("inspect-cache")
def inspect_cache(
    store: Annotated[str, typer.Argument(help="A teacher cache (.zarr or an fsspec URL).")],
    samples: Annotated[int, typer.Option(help="Samples read to measure the top-k mass coverage."), Bounds(">= 1")] = default(inspect_store, "samples"),
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
):
    """Schema, counts, size on disk, bytes/pixel, provenance and top-k mass coverage."""
    json_path = output_file(json_out, "--json")
    report = inspect_store(store, samples=samples)
    for renderable in cache_report(report):
        console.print(renderable)
    if json_path:
        write_json(json_path, signed(report, "inspect-cache"))


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
    confidence_threshold: Annotated[float, typer.Option(help="Pixels whose teacher probability is below this get 255."), Bounds(PSEUDO_BOUNDS["threshold"])] = default(export_labels, "threshold"),
    class_balanced: Annotated[float | None, typer.Option(help="Also CBST class-balanced thresholds: each class keeps at least its most confident share P of pixels (the lower of the two thresholds applies)."), Bounds(PSEUDO_BOUNDS["class_balanced"])] = None,
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
                  f"train on them with --dataset folder --data-root {out} --train-split all --val-split all"
                  + (" -o binary_255=false (255 marks the pixels left out)" if len(report["pixels_per_class"]) == 2 else "")
                  + " (or validate on labelled data: kdcache evaluate RUN --dataset …)")
