"""A probe, not a kernel of the package: would a spatial kernel specialised on (C, k) beat the production one?

    python benchmarks/numba_register_probe.py [--repeats 40] [--markdown FILE]

``kernels/numba_kl.kl_spatial`` walks a block of pixels class by class through scratch buffers (the
student's block, its exponentials, the teacher's probabilities) because C and k are known only at run
time. This writes, for one (C, k), the source of a kernel with the classes and the k ids unrolled: the
whole column of a pixel's logits, exponentials and teacher probabilities lives in registers, and LLVM
vectorises the loop along pixels (the cache's own input: fp32 student, fp16 teacher values and tail,
uint8 ids, the tail bin, T = 2, no ignore mask or labels, no exact fallback). It checks its loss and
gradient against the production kernel, then times both on one thread, call after call, the order
alternating.

What it takes for LLVM to vectorise that loop at 16 lanes without touching its options: the kernel
works on one sample, its C gradient rows are separate arguments (views ``grad[n, c]`` that a second
compiled function passes it, sample by sample, in one call from Python), and they are declared ``noalias``
(Numba's compiler flag for it, which parfors set for their own kernels, has no ``@njit`` option: the
probe adds one to Numba's CPU target options, a private interface); a pixel's loss goes to a float32
buffer that a second loop sums in float64. With the rows as one array, LLVM needs a run-time overlap
check for every pair of rows (their distance P is known only at run time) and gives up past its
threshold (a scalar loop, about 5 times slower); with a float64 sum in the loop it takes 8 lanes. The
measured ratio is what such a kernel could gain, not a result of the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numba_variants import alternate, ratio_cells  # the sibling benchmark's side-by-side timing

from kdcache.core.runs import checkout_commit, device_name
from kdcache.kernels.bench import make_inputs

CASES = [(2, 19, (256, 512)), (2, 11, (128, 256)), (2, 21, (128, 256))]


def allow_noalias() -> None:
    """``@njit(noalias=True)``: Numba's ``noalias`` compiler flag (every pointer argument ``noalias``, as
    its parfors compile their kernels) as a CPU target option, which Numba does not offer."""
    from numba.core.cpu import CPUTargetOptions
    from numba.core.options import TargetOptions

    if not hasattr(CPUTargetOptions, "noalias"):
        CPUTargetOptions.noalias = TargetOptions.Mapping("noalias")


def source(C: int, k: int) -> str:
    """The probe kernel's Python source for C classes and k teacher ids (everything per class unrolled)."""
    lines = [
        "import math", "import numpy as np", "from numba import njit",
        "from kdcache.kernels.numba_kl import _F, _F0, _F1, _F_TAIL_MIN, _fmax, _select, _to_f32, _prefer_vector_width,"
        " exp2_32, exp32, log32",
        "",
        "@njit(nogil=True, error_model='numpy', fastmath={'reassoc', 'nsz', 'contract'}, noalias=True)",
        f"def kernel(s, v, idx, tail, T, kd_scale, n, {', '.join(f'g{c}' for c in range(C))}, out, block):",
        "    _prefer_vector_width()",
        "    N, C, P = s.shape",
        "    s1, vh, th = s.ravel(), v.view(np.int16), tail.view(np.int16)",
        f"    k = {k}",
        "    inv_t, inv_t2 = _F(1.0 / T), _F(1.4426950408889634 / T)",
        f"    log_rest = _F(math.log({C - k}))",
        "    kd_t, kd_tt = _F(kd_scale * T), _F(kd_scale * T * T)",
        "    nb = (P + block - 1) // block",
        "    klb = np.empty(block, np.float32)",
        "    for task in range(n * nb, (n + 1) * nb):",
        "        p0 = (task - n * nb) * block",
        "        L = min(block, P - p0)",
        "        sb, vb, tb = n * C * P + p0, n * k * P + p0, np.uint64(n * P + p0)",
    ]
    a = lines.append
    for c in range(C):
        a(f"        o{c} = np.uint64(sb + {c} * P)")
    for j in range(k):
        a(f"        w{j} = np.uint64(vb + {j} * P)")
    a("        q = np.uint64(p0)")
    a("        for jj in range(L):")
    a("            u = np.uint64(jj)")
    # the teacher's bins: logits / T, their maximum, Z, Σ_K p log p, the tail bin's log probability
    a("            at = log_rest + (_to_f32(th[tb + u]) - log_rest) * inv_t")
    a("            lz = at")
    for j in range(k):
        a(f"            a{j} = _to_f32(vh[w{j} + u]) * inv_t")
        a(f"            lz = _fmax(lz, a{j})")
        a(f"            d{j} = np.int32(idx[w{j} + u])")
    a("            et = exp32(at - lz)")
    a("            Z = et")
    a("            ez = _F0")
    for j in range(k):
        a(f"            y{j} = a{j} - lz")
        a(f"            t{j} = exp32(y{j})")
        a(f"            Z += t{j}")
        a(f"            ez += t{j} * y{j}")
    a("            lzp = log32(Z)")
    a("            iz = _F1 / Z")
    a("            ps = (Z - et) * iz")
    a("            kl = ez * iz - lzp * ps")
    a("            alt = at - lz - lzp")
    for j in range(k):
        a(f"            q{j} = t{j} * iz")
    # the student's column: its maximum, e, Σ e, the tail sum, Σ_K p (x − m)
    for c in range(C):
        a(f"            x{c} = s1[o{c} + u]")
    a("            m = " + "_fmax(" * (C - 1) + "x0" + "".join(f", x{c})" for c in range(1, C)))
    a("            acc = _F0")
    a("            st = _F0")
    a("            px = _F0")
    for c in range(C):
        p = "_F0"
        for j in reversed(range(k)):
            p = f"_select(d{j} == {c}, q{j}, {p})"
        a(f"            r{c} = x{c} - m")
        a(f"            e{c} = exp2_32(r{c} * inv_t2)")
        a(f"            acc += e{c}")
        a(f"            p{c} = {p}")
        a(f"            st += _select(p{c} > _F0, _F0, e{c})")
        a(f"            px += p{c} * r{c}")
    a("            la = log32(acc)")
    a("            kl += ps * la - px * inv_t")
    a("            pt = et * iz")
    a("            ok = st > _F_TAIL_MIN")
    a("            sts = _select(ok, st, _F1)")
    a("            kl += _select(ok, pt * (alt - (log32(sts) - la)), _F0)")
    a("            stc = _select(ok, kd_t * pt / sts, _F0)")
    a("            coef = kd_t / acc")
    for c in range(C):
        a(f"            g{c}[q + u] = (coef - _select(p{c} > _F0, _F0, stc)) * e{c} - kd_t * p{c}")
    a("            klb[jj] = kd_tt * kl")
    a("        tot = 0.0")
    a("        for jj in range(L):")
    a("            tot += np.float64(klb[jj])")
    a("        out[task] = tot")
    a("")
    a("@njit(nogil=True, error_model='numpy')")
    a("def kernel_call(s, v, idx, tail, T, kd_scale, grad, out, block):")
    a("    for n in range(s.shape[0]):  # each sample's rows as views, one argument each")
    a(f"        kernel(s, v, idx, tail, T, kd_scale, n, {', '.join(f'grad[n, {c}]' for c in range(C))}, out, block)")
    return "\n".join(lines) + "\n"


def load(C: int, k: int, folder: Path):
    path = folder / f"register_probe_{C}_{k}.py"
    path.write_text(source(C, k))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.kernel_call


def case(N: int, C: int, spatial: tuple[int, int], k: int, folder: Path, repeats: int) -> dict:
    """The probe against the production kernel on one map: their largest differences, then the times."""
    import numba

    from kdcache.kernels import numba_kl

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
    g_probe, out_probe = np.empty((N, C, P), np.float32), np.empty(ntask)
    t0 = time.perf_counter()
    kernel = load(C, k, folder)

    def probe():
        kernel(s32, vv, idx, tt, T, kd, g_probe, out_probe, block)

    probe()
    compile_s = time.perf_counter() - t0
    numba.set_num_threads(1)

    def production():
        numba_kl.kl_spatial(s32, vv, idx, tt, k, True, True, ign, lab, T, True, False, False, 255, kd, 0.0, g_prod,
                            out_prod, False, block, 1)

    production()
    loss_diff = abs(out_probe.sum() - out_prod.sum()) / abs(out_prod.sum())
    grad_diff = float(np.abs(g_probe - g_prod).max() / np.abs(g_prod).max())
    if not (loss_diff < 1e-5 and grad_diff < 1e-4):
        raise SystemExit(f"numba_register_probe: C={C} k={k} differs from the production kernel "
                         f"(loss {loss_diff:.2e}, gradient {grad_diff:.2e} relative)")
    kernels = {"production": production, "probe": probe}
    chosen = []  # numba_variants' alternation: each side's set-up picks the call that is timed
    times = alternate({name: (lambda f=f: chosen.append(f)) for name, f in kernels.items()}, lambda: chosen[-1](),
                      repeats)
    return {"label": f"{N}×{C}×{'×'.join(map(str, spatial))}", "k": k, "compile_s": compile_s,
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

    compile_numba(("spatial",))  # the production kernel, compiled (or loaded) first
    allow_noalias()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for N, C, spatial in cases:
            for k in (int(x) for x in args.ks.split(",")):
                r = case(N, C, spatial, k, Path(tmp), args.repeats)
                rows.append(f"| {r['label']} | {r['k']} | {r['cells']} | {r['loss_diff']:.1e} / {r['grad_diff']:.1e} "
                            f"| {r['compile_s']:.1f} |")
                print(rows[-1], flush=True)
    text = "\n".join([
        "# A spatial kernel specialised on (C, k), against the production one (a probe)", "",
        f"Machine: {device_name(torch.device('cpu'))}, one thread; commit {checkout_commit() or 'unknown'}; "
        "student float32, teacher fp16 values and tail, uint8 ids, T = 2. Made by "
        "`python benchmarks/numba_register_probe.py`, whose docstring says what the probe leaves out and what it "
        "takes (one sample at a time, each gradient row a `noalias` argument, one call from Python for the map): a "
        "bound, not a result of the package. "
        f"{args.repeats} rounds a case, the order alternating; ms: the median; production / probe: the median "
        "over rounds, with the interquartile range (above 1: the probe faster); diff: the loss's and the "
        "gradient's largest difference from the production kernel, relative; compile: the probe's, in seconds.",
        "", "| map | k | production ms | probe ms | production / probe | middle half | diff (loss / grad) | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
