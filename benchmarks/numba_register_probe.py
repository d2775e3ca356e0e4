"""The CPU maps kernel generated per (C, k) against ``kl_spatial``, the two kernels alone, on one thread.

    python benchmarks/numba_register_probe.py [--repeats 40] [--markdown FILE]

``kernels/numba_kl.kl_spatial`` walks a block of pixels class by class through scratch buffers (the
student's block, its exponentials, the teacher's probabilities) because C and k are known only at run
time; up to ``api.COLUMN_MAX_CLASSES`` classes the package runs instead a kernel generated for the map's
(C, k) (``kernels/numba_columns.py``: the classes and the k ids unrolled, a pixel's whole column in
registers, the pixel loop vectorised). This calls both kernels directly, without ``topk_kl``'s host side
(which ``benchmarks/numba_variants.py api.COLUMN_MAX_CLASSES=0 api.COLUMN_MAX_CLASSES=24`` includes), on
the cache's own input (fp32 student, fp16 teacher values and tail, uint8 ids, the tail bin, T = 2, no
ignore mask or labels), on one thread, call after call, the order alternating, after checking that their
losses and gradients agree.

Until 46bdd81 this script was a probe with a kernel of its own, written before the package had one, to
bound what such a kernel could gain (``numba-register-probe-cpu.md`` and its two earlier forms): that
probe is the generated kernel's first draft.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from numba_variants import alternate, ratio_cells  # the sibling benchmark's side-by-side timing

from kdcache.core.runs import checkout_commit, device_name
from kdcache.kernels.bench import make_inputs

CASES = [(2, 19, (256, 512)), (2, 11, (128, 256)), (2, 21, (128, 256))]


def case(N: int, C: int, spatial: tuple[int, int], k: int, repeats: int) -> dict:
    """The generated kernel against ``kl_spatial`` on one map: their largest differences, then the times."""
    import numba

    from kdcache.kernels import numba_kl
    from kdcache.kernels.numba_columns import column_kernel

    s, v, i, tail = make_inputs(N, C, spatial, k, torch.float32, torch.device("cpu"))
    P = int(np.prod(spatial))
    s32 = s.reshape(N, C, P).contiguous().numpy()
    vv = v.reshape(N, k, P).contiguous().numpy().reshape(-1).view(np.uint8)
    idx = i.reshape(N, k, P).to(torch.uint8).contiguous().numpy().reshape(-1)
    tt = tail.reshape(N, P).contiguous().numpy().reshape(-1).view(np.uint8)
    T, kd = 2.0, 1.0 / (N * P)
    block = numba_kl.block_pixels(C)
    ntask = N * -(-P // block)
    ign, lab = np.zeros((1, 1), np.bool_), np.zeros((1, 1), np.int64)
    g_prod, out_prod = np.empty((N, C, P), np.float32), np.empty(ntask)
    g_gen, out_gen = np.empty((N, C, P), np.float32), np.empty(ntask)
    t0 = time.perf_counter()
    kernel = column_kernel(C, k, True, False, False, False)
    if kernel is None:
        raise SystemExit("numba_register_probe: this Numba has no noalias flag, so the package runs no generated kernel")
    vh, th = vv.view(np.int16), tt.view(np.int16)

    def generated():
        kernel(s32, vh, idx, th, ign.reshape(-1), lab.reshape(-1), T, kd, 0.0, 255, g_gen, out_gen, False,
               block, 1)

    generated()
    compile_s = time.perf_counter() - t0
    numba.set_num_threads(1)

    def production():
        numba_kl.kl_spatial(s32, vv, idx, tt, k, True, True, ign, lab, T, True, False, False, 255, kd, 0.0, g_prod,
                            out_prod, False, block, 1)

    production()
    loss_diff = abs(out_gen.sum() - out_prod.sum()) / abs(out_prod.sum())
    grad_diff = float(np.abs(g_gen - g_prod).max() / np.abs(g_prod).max())
    if not (loss_diff < 1e-5 and grad_diff < 1e-4):
        raise SystemExit(f"numba_register_probe: C={C} k={k} the generated kernel differs from kl_spatial "
                         f"(loss {loss_diff:.2e}, gradient {grad_diff:.2e} relative)")
    kernels = {"kl_spatial": production, "generated": generated}
    chosen = []  # numba_variants' alternation: each side's set-up picks the call that is timed
    times = alternate({name: (lambda f=f: chosen.append(f)) for name, f in kernels.items()}, lambda: chosen[-1](),
                      repeats)
    return {"label": f"{N}×{C}×{'×'.join(map(str, spatial))}", "k": k, "first_s": compile_s,
            "cells": ratio_cells(times), "loss_diff": loss_diff, "grad_diff": grad_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40, help="timed rounds per case")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--cases", default=None, help="N:C:HxW;... (default: bench-kernels' CPU maps up to 21 classes)")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    cases = CASES
    if args.cases:
        cases = [(int(n), int(c), tuple(int(x) for x in hw.split("x")))
                 for n, c, hw in (part.split(":") for part in args.cases.split(";"))]
    from kdcache.kernels.api import compile_numba

    compile_numba(("spatial",))  # kl_spatial, compiled (or loaded) first
    rows = []
    for N, C, spatial in cases:
        for k in (int(x) for x in args.ks.split(",")):
            r = case(N, C, spatial, k, args.repeats)
            rows.append(f"| {r['label']} | {r['k']} | {r['cells']} | {r['loss_diff']:.1e} / {r['grad_diff']:.1e} "
                        f"| {r['first_s']:.1f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# The CPU maps kernel generated per (C, k) against kl_spatial, the kernels alone", "",
        f"Machine: {device_name(torch.device('cpu'))}, one thread; commit {checkout_commit() or 'unknown'}; "
        "student float32, teacher fp16 values and tail, uint8 ids, the tail bin, T = 2, no ignore mask or labels. "
        "Made by `python benchmarks/numba_register_probe.py`: both kernels called directly (no `topk_kl` host side), "
        f"{args.repeats} rounds a case, the order alternating; ms: the median; kl_spatial / generated: the median "
        "over rounds, with the interquartile range (above 1: the generated kernel faster); diff: the loss's and "
        "the gradient's largest difference between the two, relative; first call: the generated kernel's "
        "compile, or its load from Numba's disk cache, in seconds.",
        "", "| map | k | kl_spatial ms | generated ms | kl_spatial / generated | middle half | diff (loss / grad) "
        "| first call s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
