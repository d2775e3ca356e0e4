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

import torch
from numba_variants import compare_copies, emit

from kdcache.core.runs import checkout_commit, device_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,512")
    ap.add_argument("--repeats", type=int, default=30, help="timed pairs of calls per case")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    rows = compare_copies([("VECTOR_WIDTH", str(w)) for w in widths], ks, args.repeats)
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
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
