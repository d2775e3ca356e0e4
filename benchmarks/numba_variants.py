"""Copies of the Numba kernels with module constants changed (or as a commit had them), timed side by side in one process.

    python benchmarks/numba_variants.py STREAM_STORES=False STREAM_STORES=True [--repeats 30] [--markdown FILE]
    python benchmarks/numba_variants.py SCRATCH_ALIGN=32,api.GRAD_ALIGN=16 SCRATCH_ALIGN=64,api.GRAD_ALIGN=64
    python benchmarks/numba_variants.py @94f5bec DENSE_MAX_CLASSES=32

Numba freezes a module's constants into the compiled kernels, so the two settings of a constant in
``kernels/numba_kl.py`` (``VECTOR_WIDTH``, ``STREAM_STORES``…) cannot take turns in one module. This
loads one copy of the module per setting (its source with the constant's line replaced, in a temporary
folder whose ``__pycache__`` takes its compiled code) and times the fused loss's forward + backward
(``topk_kl`` on the CPU, as ``bench-kernels`` calls it) on each case with the copies' kernels in turn,
call after call, the order alternating: adjacent calls meet the same machine, which on a shared CPU
drifts by tens of percent between separate runs. A setting may change several constants at once, comma
separated; a name ``api.NAME`` is a constant of ``kernels/api.py`` (the loss's host side), set on that
module while the setting's copy runs. ``@COMMIT`` is the module as that commit has it (its kernels
called as this checkout's ``kernels/api.py`` calls them). Per case: the median ms of each setting and the median
over pairs of (first setting / last setting), with its interquartile range.
``benchmarks/numba_vector_width.py`` and ``benchmarks/grad_pool.py`` time the same way through
:func:`alternate`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdcache.core.runs import checkout_commit, device_name
from kdcache.kernels import api, numba_kl, topk_kl
from kdcache.kernels.bench import CPU_ROWS, CPU_SEG, make_inputs

KERNELS = ("kl_spatial", "kl_rows", "block_pixels")


def load_copy(name: str, value: str, folder: Path, more: tuple[tuple[str, str], ...] = ()):
    """``kernels/numba_kl.py`` as a module of its own whose constant ``name`` is ``value`` (Python source),
    and each further (name, value) of ``more`` too. The name '@' takes the file as commit ``value`` has it."""
    changes = ((name, value), *more)
    source = Path(numba_kl.__file__).read_text()
    if name == "@":
        done = subprocess.run(["git", "show", f"{value}:kernels/numba_kl.py"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"numba_variants: no kernels/numba_kl.py at '{value}': {done.stderr.strip()}")
        source, changes = done.stdout, more
    for nm, val in changes:
        source, n = re.subn(rf"^{nm} = .+$", f"{nm} = {val}", source, flags=re.M)
        if n != 1:
            raise SystemExit(f"numba_variants: '{nm} = ...' not found once in kernels/numba_kl.py")
    return _module(source, folder, re.sub(r"\W", "_", "_".join(f"{nm}_{val}" for nm, val in ((name, value), *more))))


def _module(source: str, folder: Path, tag: str):
    """``source`` loaded as the module ``numba_kl_{tag}`` from a file in ``folder``."""
    path = folder / f"numba_kl_{tag}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"numba_kl_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def use(module, api_values: dict | None = None) -> None:
    """The loss's CPU path (``kernels/api.py`` imports them at each call) takes ``module``'s kernels, and
    ``kernels/api.py`` the constants ``api_values``."""
    for name in KERNELS:
        setattr(numba_kl, name, getattr(module, name))
    for name, value in (api_values or {}).items():
        setattr(api, name, value)


def parse_setting(text: str) -> tuple[list[tuple[str, str]], dict]:
    """'A=1,api.B=2' -> ([('A', '1')], {'B': 2}): the kernels' constants (as source) and the host's."""
    kernel, host = [], {}
    for part in text.split(","):
        if part.startswith("@"):  # the file at a commit
            kernel.insert(0, ("@", part[1:]))
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"numba_variants: '{part}' is not NAME=VALUE")
        name, value = name.strip(), value.strip()
        if name.startswith("api."):
            if not hasattr(api, name[4:]):
                raise SystemExit(f"numba_variants: kernels/api.py has no constant '{name[4:]}'")
            host[name[4:]] = ast.literal_eval(value)
        else:
            kernel.append((name, value))
    if not kernel:  # a copy all the same, so that every side runs kernels compiled the same way
        kernel.append(("VECTOR_WIDTH", repr(numba_kl.VECTOR_WIDTH)))
    return kernel, host


def alternate(sides: dict[str, Callable[[], None]], call: Callable[[], None], repeats: int) -> dict[str, list[float]]:
    """ms of ``call`` after each side's set-up, ``repeats`` rounds taking the sides in turn (the order
    reversed every other round), after two warm calls a side."""
    names = list(sides)
    for name in names:
        sides[name]()
        call()
        call()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sides[name]()
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def ratio_cells(times: dict[str, list[float]]) -> str:
    """'ms | ms | … | **first / last** | middle half' of one case's table row."""
    names = list(times)
    ratios = [x / y for x, y in zip(times[names[0]], times[names[-1]])]
    q = statistics.quantiles(ratios, n=4)
    return (" | ".join(f"{statistics.median(times[n]):.2f}" for n in names)
            + f" | **{statistics.median(ratios):.2f}×** | {q[0]:.2f}–{q[2]:.2f}")


def cases(ks: list[int], kinds: str = "all"):
    """(label, k, the fused forward + backward) for bench-kernels' CPU cases: ``kinds`` 'all', 'maps' or 'rows'."""
    for N, C, spatial in {"all": CPU_SEG + CPU_ROWS, "maps": CPU_SEG, "rows": CPU_ROWS}[kinds]:
        for k in ks:
            s, v, i, tail = make_inputs(N, C, spatial, k, torch.float32, torch.device("cpu"))

            def fused(s=s, v=v, i=i, tail=tail):
                x = s.detach().requires_grad_(True)
                topk_kl(x, v, i, tail, temperature=2.0, check_inputs=False).backward()

            kind = "segmentation" if spatial else "rows"
            yield f"{kind} {'×'.join(map(str, (N, C, *spatial)))}", k, fused


def compare_copies(settings: list[tuple[str, str]] | list[str], ks: list[int], repeats: int,
                   kinds: str = "all") -> list[str]:
    """Table rows: every case timed with one module copy per setting: a (constant, value) pair, or a
    'NAME=VALUE,api.NAME=VALUE' text (:func:`parse_setting`)."""
    own = {name: getattr(numba_kl, name) for name in KERNELS}
    own_api = {name: getattr(api, name) for name in dir(api) if name.isupper() and not name.startswith("__")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copies = {}
        for setting in settings:
            if isinstance(setting, str):
                kernel, host = parse_setting(setting)
            else:
                kernel, host = [tuple(setting)], {}
                setting = "=".join(setting)
            # each side its own gradient pool: a buffer one side allocated (aligned as its constants say)
            # is never handed to the other
            copies[setting] = (load_copy(*kernel[0], Path(tmp), tuple(kernel[1:])), {"_GRAD_POOL": [], **host})
        try:
            for label, k, fused in cases(ks, kinds):
                sides = {name: (lambda m=m, h=h: use(m, {**own_api, **h})) for name, (m, h) in copies.items()}
                times = alternate(sides, fused, repeats)
                rows.append(f"| {label} | {k} | {ratio_cells(times)} |")
                print(rows[-1], flush=True)
        finally:
            for name, fn in own.items():
                setattr(numba_kl, name, fn)
            for name, value in own_api.items():
                setattr(api, name, value)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="NAME=VALUE, one per copy (two or more)")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds of calls per case")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--cases", choices=("all", "maps", "rows"), default="all",
                    help="bench-kernels' CPU cases to time (a commit's kernels whose calls differ: the others)")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    if len(args.settings) < 2:
        raise SystemExit("numba_variants: give two or more NAME=VALUE settings")
    for setting in args.settings:
        parse_setting(setting)  # a bad one stops here, before any compiling
    rows = compare_copies(args.settings, [int(k) for k in args.ks.split(",")], args.repeats, args.cases)
    names = list(args.settings)
    lines = [f"# The Numba kernels with {' and '.join(f'`{n}`' for n in names)}", "",
             f"Machine: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads; commit "
             f"{checkout_commit() or 'unknown'}; student float32, teacher fp16 values, uint8/int32 ids, fp16 tail, "
             "T = 2, the bench-kernels CPU cases. One process holds a copy of `kernels/numba_kl.py` per setting "
             "(`api.` names: constants of `kernels/api.py`, set while that copy runs) and "
             f"times `topk_kl`'s forward + backward with each in turn, {args.repeats} rounds a case, the order "
             f"alternating. ms: the median; first / last: the median over rounds of `{names[0]}`'s time over "
             f"`{names[-1]}`'s (above 1: the last faster), with the interquartile range. Made by "
             "`python benchmarks/numba_variants.py " + " ".join(args.settings)
             + (f" --cases {args.cases}" if args.cases != "all" else "") + "`.", "",
             "| case | k | " + " | ".join(f"`{n}` ms" for n in names) + " | first / last | middle half |",
             "|---|---|" + "---|" * len(names) + "---|---|", *rows]
    emit(lines, args.markdown)


def emit(lines: list[str], markdown: str | None) -> None:
    """The table printed, and written to ``markdown`` when given."""
    table = "\n".join(lines) + "\n"
    print(table)
    if markdown:
        Path(markdown).write_text(table)


if __name__ == "__main__":
    main()
