"""What every command of the ``kdcache`` app shares: the ``command`` decorator that registers a
command on the app (:mod:`kdcache.cli.app`), checks its numbers (declared :class:`Bounds`) and
turns a user error (and any file-system error) into one ``error:`` line; output paths checked
before any work; defaults read from the library; and the option types of the commands that have
no config dataclass."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import select
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kdcache.cli.app import Command, app
from kdcache.core.errors import KDCacheError
from kdcache.core.options import SEED_BOUNDS, WORKER_BOUNDS, Bounds, check_number
from kdcache.core.outputs import output_file as checked_output_file
from kdcache.core.progress import console
from kdcache.methods import methods_taking, option_default, task_defaults


def command(name: str | None = None) -> Callable:
    """``app.command`` that turns a :class:`KDCacheError` into one red line and exit status 2."""

    def deco(fn: Callable) -> Callable:
        bounded = bounded_parameters(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                for param, (flag, bounds) in bounded.items():  # before the command does anything
                    check_number(kwargs.get(param), flag, bounds)
                return fn(*args, **kwargs)
            except KDCacheError as exc:
                # escaped: a message may hold text in brackets, e.g. pip install "kdcache[onnx]"
                console.print(f"[bold red]error:[/bold red] {escape(error_text(exc))}", soft_wrap=True, highlight=False)
                raise typer.Exit(2) from None
            except (MemoryError, RuntimeError) as exc:
                if not out_of_memory(exc) or os.environ.get(TRACEBACK_ENV):
                    raise
                console.print(f"[bold red]error:[/bold red] {escape(memory_error_text(exc))}", soft_wrap=True,
                              highlight=False)
                raise typer.Exit(2) from None
            except OSError as exc:
                if isinstance(exc, BrokenPipeError) and stdout_is_gone():
                    # `kdcache list-models | head -1`: the reader has what it wanted. Quiet, as the
                    # help's own output is (click: exit status 1), not a file-system error
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one at exit's flush
                    raise typer.Exit(1) from None
                if os.environ.get(TRACEBACK_ENV):
                    raise
                console.print(f"[bold red]error:[/bold red] {escape(os_error_text(exc))}", soft_wrap=True,
                              highlight=False)
                raise typer.Exit(2) from None

        return app.command(name, cls=Command)(wrapper)

    return deco


def bounded_parameters(fn: Callable) -> dict[str, tuple[str, Bounds]]:
    """The number parameters of a command declared with :class:`~kdcache.core.options.Bounds` in their
    annotation (``Annotated[float, typer.Option(...), Bounds("> 0")]``): param -> (flag, bounds)."""
    out = {}
    for name, p in inspect.signature(fn, eval_str=True).parameters.items():
        meta = typing.get_args(p.annotation)[1:] if typing.get_origin(p.annotation) is Annotated else ()
        bounds = next((m for m in meta if isinstance(m, Bounds)), None)
        if bounds is not None:
            info = next((m for m in meta if isinstance(m, typer.models.OptionInfo)), None)
            decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")]
            out[name] = ((decls[0].split("/")[0] if decls else f"--{name.replace('_', '-')}"), bounds)
    return out


def stdout_is_gone() -> bool:
    """Whether standard output is a pipe whose reading end has been closed (poll(2) reports
    POLLERR for it); False where it cannot tell (not a file descriptor, no poll)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


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


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation the machine refused: numpy's and Python's ``MemoryError``, torch's
    CPU allocator (a ``RuntimeError``) or a GPU's ``OutOfMemoryError``, raised here or in a DataLoader worker."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()
            or "Storage size calculation overflowed" in text  # a tensor too large for any machine
            or "MemoryError" in text.split("\n", 1)[0])


def memory_error_text(exc: BaseException) -> str:
    """An allocation the machine refused, as one line: what was asked for (the allocator's own words,
    without torch's C++ frames) and what makes a run smaller."""
    lines = [line.strip() for line in error_text(exc).splitlines() if line.strip()]  # (a worker's: its last line)
    what = lines[0] if lines else type(exc).__name__
    if "DefaultCPUAllocator: " in what:  # torch's "[enforce fail at alloc_cpu.cpp:…] err == 0. DefaultCPUAllocator: …"
        what = what[what.index("DefaultCPUAllocator: "):]
    return (f"out of memory: {what[:300]}; the images, crops, batch or model this asked for are too large for this "
            f"machine: give a smaller --batch-size, --crop-size, --scale, --resize or data set option (set {TRACEBACK_ENV}=1 "
            "to see where it happened)")


def error_text(exc: BaseException) -> str:
    """The message alone: an error re-raised from a DataLoader worker carries the worker's
    traceback in its text; keep only its last line, without the exception's type name."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def output_file(text: str | None, option: str) -> Path | None:
    """The file an option names for a command to write, checked before any work
    (:func:`kdcache.core.outputs.output_file`: never a folder, nor a file kdcache did not write), its
    folder created first, so a path that cannot be written fails at once, not after a long run."""
    return None if text is None else checked_output_file(text, option)


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
    """'kl 1 (segmentation 0.5, classification 4, classification with mixup 1), cwd 4': each method
    taking ``option`` with its default, and where a task's own default (or a mixing classifier's)
    differs from it, that task's."""
    def show(v):
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    def text(m):
        base = option_default(m, option)
        tasks = []
        for label, task, mix in (("segmentation", "segmentation", None), ("classification", "classification", None),
                                 ("classification with mixup", "classification", "mixup")):
            v = task_defaults(m, task, mix).get(option, base)
            if v != (task_defaults(m, task).get(option, base) if mix else base):  # a mixing student's against its task's
                tasks.append(f"{label} {show(v)}")
        return f"{m} {show(base)}" + (f" ({', '.join(tasks)})" if tasks else "")

    return ", ".join(text(m) for m in methods_taking(option))


def check_backend(backend: str) -> None:
    if backend not in ("torch", "onnxruntime"):
        raise KDCacheError(f"--backend must be torch or onnxruntime, got {backend!r}")


def command_line_options(ctx: typer.Context) -> set[str]:
    """Parameters the user set on the command line (not left at their defaults)."""
    return {name for name in ctx.params
            if (source := ctx.get_parameter_source(name)) is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")}


# -- the options of the commands without a config dataclass ------------------------------------------

DataRoot = Annotated[str | None, typer.Option(help="Root folder of the data set (not for synthetic).")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N samples of each split (quick runs)."), Bounds(">= 1")]
Device = Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda, cuda:1 ...")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes."), Bounds(WORKER_BOUNDS)]
Seed = Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation."), Bounds(SEED_BOUNDS)]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option(help="Start again from scratch where the output exists.")]
