"""The ``kdcache`` command: thin typer commands that parse options and call the library.

The commands live by group — :mod:`~kdcache.cli.train` (train-teacher, train-student),
:mod:`~kdcache.cli.results` (evaluate, export, compare, demo), :mod:`~kdcache.cli.cache`
(build-teacher-cache, inspect-cache, verify-cache, export-pseudo-labels) and
:mod:`~kdcache.cli.tools` (bench-kernels, list-models, list-datasets, list-methods) — on the one app defined
here. :data:`COMMANDS` lists them (in the order ``--help`` lists them) with the module that defines
each and its one-line summary: ``kdcache --help`` and ``kdcache --version`` print from it without
importing any command module (and so without torch), and a command's module is imported when
that command is run or its help is asked for. The options of the commands that configure a run
or a cache are the fields declared on its config dataclass (:mod:`kdcache.core.options`, made into
options by :mod:`kdcache.cli.flags`); every other default ``--help`` shows is read from the
library, so the help cannot drift from what runs.
"""

from __future__ import annotations

import importlib
from typing import Annotated, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup

from kdcache import __version__


class Entry(NamedTuple):
    module: str  # the module of kdcache.cli that defines the command
    summary: str  # the first line of its docstring (tests/test_cli.py checks that they agree)


#: every command: name -> where it is defined and its summary, in the order --help lists them
COMMANDS = {
    "train-teacher": Entry("train", "Supervised (cross-entropy) training: a teacher, or the no-KD student baseline."),
    "build-teacher-cache": Entry("cache", "One teacher pass over a split into a Zarr v3 store (rerun the same command "
                                          "to resume)."),
    "train-student": Entry("train", "Student training from the teacher cache: L_seg + Σ w·L_KD with any of the "
                                    "methods."),
    "evaluate": Entry("results", "Metrics (mIoU, mAcc, aAcc, per class), #params, latency, and best/worst figures."),
    "compare": Entry("results", "One table for many runs (mIoU, mAcc, aAcc, per class, #params, ms, FPS, Δ mIoU), "
                                "figures and index.html to browse."),
    "export": Entry("results", "The model as a file for deployment: input 'image' [N, 3, H, W] (normalised RGB, "
                               "fixed HxW, any batch N), output 'logits' [N, C, h, w] at the head's native stride "
                               "(not upsampled: resize bilinearly, then argmax)."),
    "demo": Entry("results", "The whole workflow on the built-in data: teacher → caches (labelled images, a "
                             "schedule of the students' crops, an unlabelled pool) → students, the recommended "
                             "recipe first → compare on test."),
    "inspect-cache": Entry("cache", "Schema, counts, size on disk, bytes/pixel, provenance and top-k mass coverage."),
    "verify-cache": Entry("cache", "Read every chunk; check done flags, finiteness, class-id range, distinct ids and "
                                   "sort order."),
    "export-pseudo-labels": Entry("cache", "The teacher's labels as palette PNGs at each image's own size, from "
                                           "upsampled cached logits."),
    "bench-kernels": Entry("tools", "The fused top-k KL kernel vs eager PyTorch and torch.compile: times, GB/s, % of "
                                    "copy bandwidth."),
    "list-models": Entry("tools", "The registered model names by source (any package.module:callable works too)."),
    "list-datasets": Entry("tools", "The registered data set names, with their task."),
    "list-methods": Entry("tools", "The registered KD methods: what each distils, its weight and temperature per task, "
                                   "and how it stood against CE."),
}


class Commands(TyperGroup):
    """The app's commands, each imported when first needed: listing them (``--help``) shows
    :data:`COMMANDS`' summaries without importing any."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in self.commands and name in COMMANDS:
            if getattr(ctx, "kdcache_listing", False):  # --help: the summary alone
                return TyperCommand(name, help=COMMANDS[name].summary, short_help=COMMANDS[name].summary)
            load(name)
            self.commands[name] = _build(name)
        return super().get_command(ctx, name)

    def get_params(self, ctx):
        return without_bool_types(super().get_params(ctx))

    def format_help(self, ctx, formatter) -> None:
        ctx.kdcache_listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            ctx.kdcache_listing = False


class Command(TyperCommand):
    """A command of the app (what ``cli.base.command`` registers)."""

    def get_params(self, ctx):
        return without_bool_types(super().get_params(ctx))


def without_bool_types(params: list) -> list:
    """Flags (``--flip/--no-flip``, ``--help``) show no type in the help: typer would print ``<bool>``."""
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""
    return params


def load(name: str) -> None:
    """Import the module that defines command ``name`` (it registers its commands on :data:`app`)."""
    importlib.import_module(f"kdcache.cli.{COMMANDS[name].module}")


def _build(name: str):
    """Command ``name`` as typer builds it, alone (not the whole app again)."""
    info = next(c for c in app.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__)) == name)
    return typer.main.get_command_from_info(info, pretty_exceptions_short=app.pretty_exceptions_short,
                                            rich_markup_mode=app.rich_markup_mode)


def all_commands() -> dict:
    """Every command as typer builds it (name -> command), each module imported: what the tests and
    the generated reference read."""
    for name in COMMANDS:
        load(name)
    return dict(typer.main.get_command(app).commands)


app = typer.Typer(
    name="kdcache",
    help="Offline teacher caches and fused KD losses for semantic segmentation (and classification).",
    cls=Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"kdcache {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                  help="Print kdcache's version and exit.")] = False) -> None:
    """Offline teacher caches and fused KD losses for semantic segmentation (and classification)."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
