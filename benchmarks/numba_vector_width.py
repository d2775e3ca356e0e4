"""The Numba kernels at two vector widths, side by side in one process: ``bench-kernels``' CPU cases.

    python benchmarks/numba_vector_width.py [--widths 256,512] [--repeats 30] [--markdown FILE]

``kernels/numba_kl.py`` asks LLVM for ``prefer-vector-width`` = ``VECTOR_WIDTH`` bits on its kernels'
functions (LLVM's own choice on CPUs with AVX-512 is 256). This script loads one copy of that module
per width (its source with ``VECTOR_WIDTH`` set, in a temporary folder whose ``__pycache__`` takes its compiled code), and times
the fused loss's forward + backward (``topk_kl`` on the CPU, as ``bench-kernels`` calls it) on each
case with the copies' kernels in turn, call after call, the order alternating: adjacent calls meet
the same machine, which on a shared CPU drifts by tens of percent between separate runs. Per case:
the median ms of each width and the median over pairs of (first width / second width), with its
interquartile range. A CPU without AVX-512 compiles both copies to the same 256-bit code: the
ratios then show the noise alone; so do the rows cases since c732f96 (the rows kernel no longer
asks for a width, so both copies run the same rows code).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdcache.core.runs import checkout_commit, device_name
from kdcache.kernels import numba_kl, topk_kl
from kdcache.kernels.bench import CPU_ROWS, CPU_SEG, make_inputs


def load_copy(width: int, folder: Path):
    """``kernels/numba_kl.py`` as a module of its own whose ``VECTOR_WIDTH`` is ``width``."""
    source = Path(numba_kl.__file__).read_text()
    source, n = re.subn(r"^VECTOR_WIDTH = \d+$", f"VECTOR_WIDTH = {width}", source, flags=re.M)
    if n != 1:
        raise SystemExit("numba_vector_width: VECTOR_WIDTH = <bits> not found once in kernels/numba_kl.py")
    path = folder / f"numba_kl_w{width}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"numba_kl_w{width}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def use(module) -> None:
    """The loss's CPU path (``kernels/api.py`` imports them at each call) takes ``module``'s kernels."""
    for name in ("kl_spatial", "kl_rows", "block_pixels"):
        setattr(numba_kl, name, getattr(module, name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,512")
    ap.add_argument("--repeats", type=int, default=30, help="timed pairs of calls per case")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    own = {name: getattr(numba_kl, name) for name in ("kl_spatial", "kl_rows", "block_pixels")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copies = {w: load_copy(w, Path(tmp)) for w in widths}
        try:
            for N, C, spatial in CPU_SEG + CPU_ROWS:
                for k in ks:
                    s, v, i, tail = make_inputs(N, C, spatial, k, torch.float32, torch.device("cpu"))

                    def fused(s=s, v=v, i=i, tail=tail):
                        x = s.detach().requires_grad_(True)
                        topk_kl(x, v, i, tail, temperature=2.0, check_inputs=False).backward()

                    for w in widths:  # compile (first case) and warm each copy
                        use(copies[w])
                        fused()
                        fused()
                    times = {w: [] for w in widths}
                    for r in range(args.repeats):
                        for w in (widths if r % 2 == 0 else widths[::-1]):
                            use(copies[w])
                            t0 = time.perf_counter()
                            fused()
                            times[w].append((time.perf_counter() - t0) * 1e3)
                    a, b = widths[0], widths[-1]
                    ratios = [x / y for x, y in zip(times[a], times[b])]
                    q = statistics.quantiles(ratios, n=4)
                    kind = "segmentation" if spatial else "rows"
                    shape = "×".join(map(str, (N, C, *spatial)))
                    rows.append(f"| {kind} {shape} | {k} | " + " | ".join(f"{statistics.median(times[w]):.2f}"
                                                                         for w in widths)
                                + f" | **{statistics.median(ratios):.2f}×** | {q[0]:.2f}–{q[2]:.2f} |")
                    print(rows[-1], flush=True)
        finally:
            for name, fn in own.items():
                setattr(numba_kl, name, fn)
    a, b = widths[0], widths[-1]
    lines = [f"# The Numba kernels at {' and '.join(map(str, widths))}-bit vectors", "",
             f"Machine: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads; commit "
             f"{checkout_commit() or 'unknown'}; student float32, teacher fp16 values, uint8/int32 ids, fp16 tail, "
             "T = 2, the bench-kernels CPU cases. One process holds a copy of `kernels/numba_kl.py` per width "
             "(`VECTOR_WIDTH`, LLVM's `prefer-vector-width`) and times `topk_kl`'s forward + backward with each in "
             f"turn, {args.repeats} pairs of calls a case, the order alternating. ms: the median; {a} / {b}: the median "
             f"over pairs of the {a}-bit call's time over the {b}-bit call's (above 1: {b} bits faster), with the "
             "interquartile range. Made by `python benchmarks/numba_vector_width.py`.", "",
             "| case | k | " + " | ".join(f"{w}-bit ms" for w in widths) + f" | {a} / {b} | middle half |",
             "|---|---|" + "---|" * len(widths) + "---|---|", *rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
