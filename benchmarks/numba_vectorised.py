"""What LLVM made of the Numba spatial kernel: which of its loops run on vectors.

Compiles a fresh copy of ``kdcache.kernels.numba_kl._spatial_tasks`` (the per-thread body of
``kl_spatial``; the cached copy keeps no IR) for the cache's own types (fp32 student, fp16 teacher
bits, uint8 ids), then reads its optimised LLVM IR and its machine code:

* the vector types in the IR (``<8 x float>`` on AVX2, ``<4 x float>`` on SSE/NEON) and how many
  vector operations of each width there are;
* per loop of the machine code (a backward branch), its packed float instructions against its
  scalar float instructions, with the loop's leading instructions to tell it apart;
* whether any masked store (``vmaskmov``) or gather survived, and every call the machine code makes,
  by target: direct calls by name, and calls through a register resolved to the symbol last
  loaded into it (Numba calls libm's ``exp``/``log`` as ``movabsq $exp, %r12; callq *%r12``), per
  loop too; the optimised IR's calls to ``exp``/``log`` (libm or LLVM intrinsics) are counted apart.

    python benchmarks/numba_vectorised.py [--markdown benchmarks/results/numba-vectorised.md]

The compile takes about 15 s.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

import numpy as np
from numba import njit

from kdcache.core.runs import device_name
from kdcache.kernels import numba_kl

CALL = re.compile(r"^\s*call\w*\s+(\*?)(\S+)")
LOAD = re.compile(r"^\s*mov\w*\s+\$([A-Za-z_.][\w.$@]*),\s*(%\w+)")
IR_MATH_CALL = re.compile(r"\bcall\b[^@\n]*@((?:llvm\.)?(?:exp|log)\w*)")


def calls(lines: list[str]) -> Counter:
    """The targets of the call instructions in ``lines`` of machine code: a direct call by its
    symbol; a call through a register (``callq *%r12``) by the symbol last loaded into that
    register (``movabsq $exp, %r12``), else ``indirect (unresolved)``."""
    loaded: dict[str, str] = {}
    out: Counter = Counter()
    for line in lines:
        m = LOAD.match(line)
        if m:
            loaded[m.group(2)] = m.group(1)
            continue
        m = CALL.match(line)
        if m:
            star, target = m.groups()
            out[(loaded.get(target, "indirect (unresolved)") if star and target.startswith("%")
                 else "indirect (unresolved)" if star else target.split("@")[0])] += 1
            continue
        dest = line.split("#")[0].rsplit(",", 1)[-1].strip()  # AT&T: the last operand is written
        loaded.pop(dest, None)
    return out


MATH = re.compile(r"^(exp|log|pow|sqrt|tanh|sin|cos)\w*$")


def math_calls(c: Counter) -> Counter:
    """The calls to libm's functions among ``c``."""
    return Counter({k: v for k, v in c.items() if MATH.match(k)})


PACKED = re.compile(r"^\s*v?(mul|add|sub|fmadd\d*|fmsub\d*|fnmadd\d*|max|min|round|cvt\w*|and|blendv|cmp\w*)ps\b")
SCALAR = re.compile(r"^\s*v?(mul|add|sub|fmadd\d*|fmsub\d*|fnmadd\d*|max|min|round|cvt\w*|cmp\w*|div)ss\b")


def compile_body():
    body = njit(cache=False, nogil=True, error_model="numpy",
                fastmath={"reassoc", "nsz", "contract"})(numba_kl._spatial_tasks.py_func)
    N, C, k, P = 1, 19, 4, 512
    s = np.random.default_rng(0).standard_normal((N, C, P)).astype(np.float32)
    # the teacher as the kernel takes it: flat bytes of fp16 values and tail, uint8 ids
    v = np.zeros((N, k, P), np.float16).reshape(-1).view(np.uint8)
    idx = np.tile(np.arange(k, dtype=np.uint8)[None, :, None], (N, 1, P)).reshape(-1)
    tail = np.zeros((N, P), np.float16).reshape(-1).view(np.uint8)
    grad = np.empty_like(s)
    block = numba_kl.block_pixels(C)
    ntask = N * -(-P // block)  # every task of the map, and one loss slot each
    loss = np.empty(ntask)
    t0 = time.perf_counter()
    body(s, v, idx, tail, k, True, True, np.zeros((1, 1), bool), np.zeros((1, 1), np.int64), 2.0, True, False,
         False, 255, 1.0, 0.0, grad, loss, False, block, 0, ntask)
    return body, time.perf_counter() - t0


def loops(asm: str):
    """(first instructions, packed, scalar, calls) per innermost loop of the machine code: a label
    that a later branch jumps back to, with no other such loop inside it."""
    lines = [ln for ln in asm.splitlines() if ln.strip()]
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.LBB\d+_\d+:$", ln)}
    spans = []
    for i, ln in enumerate(lines):
        m = re.match(r"^\s*j\w+\s+(\.LBB\d+_\d+)$", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in spans if not any(a < a2 and b2 <= b for a2, b2 in spans if (a2, b2) != (a, b))]
    out = []
    for a, b in sorted(set(inner)):
        body = lines[a + 1:b]
        packed = sum(bool(PACKED.match(x)) for x in body)
        scalar = sum(bool(SCALAR.match(x)) for x in body)
        if packed or scalar:
            head = "; ".join(x.strip().split("#")[0].strip().replace("\t", " ") for x in body[:3]
                             if not x.strip().startswith("."))
            # a register loaded before the loop and called in it: resolve with what precedes the loop
            made = calls(lines[:b]) - calls(lines[:a + 1])
            out.append((head, packed, scalar, made))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the report to this Markdown file")
    args = ap.parse_args()
    body, seconds = compile_body()
    ir = "\n".join(body.inspect_llvm().values())
    asm = "\n".join(body.inspect_asm().values())
    widths = Counter(re.findall(r"<(\d+) x float>", ir))
    found = loops(asm)
    vec = [lp for lp in found if lp[1] > lp[2]]
    bad = {name: len(re.findall(pat, asm)) for name, pat in (("masked stores", r"vmaskmov"), ("gathers", r"vgather"))}
    made = calls(asm.splitlines())
    ir_math = Counter(IR_MATH_CALL.findall(ir))

    def listing(c: Counter) -> str:
        return ", ".join(f"{name} × {n}" for name, n in c.most_common()) or "none"

    lines = [
        "# What LLVM vectorised in the Numba spatial kernel",
        "",
        f"Machine: {device_name(__import__('torch').device('cpu'))}; made by `python benchmarks/numba_vectorised.py` "
        f"(compile {seconds:.0f} s).",
        "",
        "Vector float types in the optimised IR: " + (", ".join(f"<{w} x float> × {n}" for w, n in
                                                             sorted(widths.items(), key=lambda x: -int(x[0])))
                                                    or "none"),
        "",
        f"Loops with float arithmetic: {len(found)}; mostly packed (vectorised): {len(vec)}; "
        f"mostly scalar: {len(found) - len(vec)}; loops that call a function: "
        f"{sum(bool(c) for *_, c in found)} ({listing(sum((c for *_, c in found), Counter()))}).",
        "",
        f"Calls to libm in the machine code (a call through a register resolved to the symbol loaded into it): "
        f"{listing(math_calls(made))}; other calls: {sum(made.values()) - sum(math_calls(made).values())} (the "
        f"Python wrapper and Numba's runtime). Calls to exp/log in the optimised IR: {listing(ir_math)}.",
        "",
        "Survivors that would stop vectorisation: " + ", ".join(f"{k}: {v}" for k, v in bad.items()),
        "",
        "| loop starts with | packed float ops | scalar float ops | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{head[:90]}` | {p} | {s} | {listing(c) if c else ''} |" for head, p, s, c in found]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
