"""``bench-kernels``, ``list-models``, ``list-datasets`` and ``list-methods``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kdcache.cli.base import Device, command, default, output_file
from kdcache.cli.parse import parse_list
from kdcache.cli.report import kernel_table
from kdcache.core.options import Bounds
from kdcache.core.outputs import markdown_signature, signed
from kdcache.core.progress import console
from kdcache.core.runs import resolve_device, write_json
from kdcache.data import DATASETS
from kdcache.kernels import bench
from kdcache.methods import METHODS, settings_at_defaults
from kdcache.models import model_groups
from kdcache.models.registry import PREFIXES


@command("bench-kernels")
def bench_kernels(
    device: Device = default(resolve_device, "device"),
    quick: Annotated[bool, typer.Option(help="One segmentation and one row case at k = 4 only.")] = default(bench.run, "quick"),
    topk: Annotated[str, typer.Option(help="Comma-separated k values.")] = ",".join(map(str, default(bench.run, "ks"))),
    dtype: Annotated[str | None, typer.Option(help=f"Student dtype: {', '.join(bench.DTYPES)} (default: bfloat16 on CUDA, float32 on CPU).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats per backend (median reported)."), Bounds(">= 1")] = None,
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
    table = kernel_table(result)
    typer.echo(table)
    if json_path:
        write_json(json_path, signed(result, "bench-kernels"))
    if markdown_path:
        markdown_path.write_text(f"{markdown_signature('bench-kernels')}# bench-kernels\n\n{table}")


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


def method_summary(cls) -> str:
    """The first paragraph of a method's module docstring, on one line, without its leading name."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first


@command("list-methods")
def list_methods():
    """The registered KD methods: what each distils, its weight and temperature per task, and how it stood against CE."""
    for name, cls in METHODS.items():
        typer.echo(f"{name}  {method_summary(cls)}")
        for task in ("segmentation", "classification"):
            settings = settings_at_defaults(name, task)
            shown = ", ".join(f"{k} {settings[k]:g}" for k in ("weight", "temperature") if k in settings)
            mixed = settings_at_defaults(name, task, "mixup")
            if mixed != settings:  # a mixing student's own defaults (function matching)
                shown += " (with --mix mixup: " + ", ".join(f"{k} {mixed[k]:g}" for k in ("weight", "temperature")
                                                           if k in mixed) + ")"
            standing = cls.standing.get(task)
            if shown or standing:
                typer.echo(f"  {task}: {shown or 'no weight'}" + (f"; {standing}" if standing else ""))
