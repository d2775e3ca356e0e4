"""The Triton kernels compiled ahead of time for an H100 (sm_90), with no GPU, and what the compiler says.

Triton lowers a kernel to PTX on any machine, and ``ptxas`` (shipped with Triton) assembles it and
reports registers and spills. This is how CI checks, on a CPU, what the interpreter cannot show:

* ``registers`` and ``spill_bytes`` of every kernel variant (≤ 128 registers and no spills keep
  enough warps resident to hide memory latency);
* ``shared_in_loops``: shared-memory accesses and barriers inside any loop of the PTX (the class
  loop must be per-thread arithmetic: a cross-warp reduction there costs a barrier per class);
* ``vector_loads_in_loops``: widened global loads in a loop (the student's values of consecutive
  pixels, or of consecutive classes for rows, as one 32-, 64- or 128-bit load: two 16-bit values in
  one 32-bit word count, as a v2/v4/v8 vector does).

The signature mirrors a real launch: pointers and sizes divisible by 16 carry Triton's
``tt.divisibility`` hint, and strides equal to 1 are compile-time constants, as Triton's
specialisation makes them. ``benchmarks/gpu_check.sh`` prints the same report from the GPU's own
compilation next to it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

from kdcache.kernels import triton_kl

KERNELS = {"map_fwd": "_map_fwd", "map_bwd": "_map_bwd", "row_fwd": "_row_fwd", "row_bwd": "_row_bwd"}
_FLOATS = {"inv_t", "T", "log_rest", "kd_weight", "ce_weight"}
_STUDENT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}
#: pointer types other than the student's and the gradient's (which take the student's dtype)
_POINTERS = {"v_ptr": "*fp16", "i_ptr": "*u8", "t_ptr": "*fp16", "ign_ptr": "*u8", "lab_ptr": "*i64",
             "stat_ptr": "*fp32", "part_ptr": "*fp32", "ticket_ptr": "*i32", "out_ptr": "*fp32",
             "scale_ptr": "*fp32", "go_ptr": "*fp32"}


@dataclass
class Variant:
    """One compiled configuration: which kernel and the launch that picks it."""

    kernel: str
    dtype: str = "bfloat16"
    C: int = 19
    k: int = 4
    with_tail: bool = True
    has_ign: bool = True
    has_lab: bool = False
    lse1: bool = False
    reduction: int = 0
    channels_last: bool = False
    num_warps: int | None = None
    #: the maps forward's chunked log-sum-exps (None: the launch's default, ``triton_kl.CHUNK``)
    chunk: bool | None = None
    #: the maps kernels' lean class loop (None: the launch's default, ``triton_kl.LEAN``)
    lean: bool | None = None
    #: the backward's top k as bits (``triton_kl.BWD_BITS``; None: the default)
    bwd_bits: bool | None = None

    @property
    def name(self) -> str:
        parts = [self.kernel, self.dtype, f"C{self.C}", f"k{self.k}"]
        parts += [flag for flag, on in (("tail", self.with_tail), ("ignore", self.has_ign), ("labels", self.has_lab),
                                        ("lse1", self.lse1), ("channels_last", self.channels_last),
                                        ("chunk", bool(self.chunk)), ("classic", self.lean is False and self.kernel.startswith("map")),
                                        ("lean", self.lean is True and self.kernel.startswith("row")),
                                        ("default", self.lean is False and self.kernel.startswith("row")), ("bits", bool(self.bwd_bits))) if on]
        parts.append(("mean", "sum", "none")[self.reduction])
        return "-".join(parts)


@dataclass
class Report:
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    shared_in_loops: list[str] = field(default_factory=list)
    vector_loads_in_loops: int = 0
    loops: int = 0
    #: SASS instructions of the class loop per student element a thread (None: no cuobjdump)
    instructions_per_element: float | None = None


def _config(v: Variant) -> tuple[dict, int]:
    if v.kernel.startswith("row"):
        saved = triton_kl.ROW_TUNING
        triton_kl.ROW_TUNING = {**(saved or {}), "LEAN": v.lean} if v.lean is not None else saved
        try:
            cfg = triton_kl.row_config(v.C, v.k)
        finally:
            triton_kl.ROW_TUNING = saved
        return {"BLOCK_C": cfg["BLOCK_C"], "CAPTURE": cfg["CAPTURE"], "LEAN": cfg["LEAN"]}, cfg["num_warps"]
    chosen = {name: value for name, value in (("LEAN", v.lean), ("BWD_BITS", v.bwd_bits), ("CHUNK", v.chunk))
              if value is not None}
    saved = triton_kl.MAP_TUNING
    triton_kl.MAP_TUNING = {**(saved or {}), **chosen} or None  # the variant's loop with its own launch settings
    try:
        cfg = triton_kl.map_config(v.C, 512 * 1024, v.k, _ELEMENT[v.dtype], v.C if v.channels_last else 1, v.lse1)
    finally:
        triton_kl.MAP_TUNING = saved
    tiles = {"BLOCK_P": cfg["BLOCK_P"], "CAPTURE": cfg["CAPTURE"], "UNROLL": cfg["UNROLL"], "LEAN": cfg["LEAN"],
             "BITS": cfg["BITS"] if v.kernel == "map_fwd" else cfg["BWD_BITS"]}
    if v.kernel == "map_fwd":
        tiles["CHUNK"] = cfg["CHUNK"]
    return tiles, cfg["num_warps"]


def compile_ptx(v: Variant) -> tuple[str, int]:
    """(PTX, num_warps) of the variant compiled for sm_90 (no GPU needed; not under TRITON_INTERPRET)."""
    asm, num_warps = compile_asm(v)
    return asm["ptx"], num_warps


def compile_asm(v: Variant) -> tuple[dict, int]:
    """(every stage's text: ``ttir``, ``ttgir``, ``ptx``…, num_warps) of the variant compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_kl, KERNELS[v.kernel])
    fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.jit.JITFunction) else fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = triton.runtime.jit.JITFunction(fn)
    tiles, num_warps = _config(v)
    num_warps = v.num_warps or num_warps
    constexpr = dict(K=v.k, WITH_TAIL=v.with_tail, HAS_IGN=v.has_ign, HAS_LAB=v.has_lab, LSE1=v.lse1,
                     REDUCTION=v.reduction, RBLOCK=triton_kl.RBLOCK, **tiles)
    if v.kernel.endswith("bwd"):
        constexpr.pop("RBLOCK")
    ones = {"v_sk", "i_sk"} if v.kernel.startswith("row") else set()
    if not v.kernel.startswith("row"):
        ones |= {"s_sc", "g_sc"} if v.channels_last else {"s_sp", "g_sp"}
    student = "*" + _STUDENT[v.dtype]
    sig, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexpr or name in ones:
            sig[name] = "constexpr"
            constants[(index,)] = constexpr.get(name, 1)
            continue
        if name in ("s_ptr", "g_ptr"):
            sig[name] = student
        elif name in _POINTERS:
            sig[name] = _POINTERS[name]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # pointers from torch's allocator, and P and the strides of a 512×1024 map, are multiples of 16
        divisible = name.endswith("_ptr") or (name == "C" and v.C % 16 == 0) or name in ("P", "s_sn", "v_sn", "i_sn", "t_sn", "ign_sn", "lab_sn",
                                                      "stat_s", "g_sn") or (name in ("s_sc", "g_sc", "v_sk", "i_sk")
                                                                            and not v.kernel.startswith("row"))
        if divisible and not (v.channels_last and name in ("s_sp", "g_sp")):
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps} | triton_kl.register_cap(num_warps)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm, num_warps


def ptxas_path() -> str:
    """The ptxas Triton itself assembles sm_90 code with (its PTX version needs that one)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(90).path
    except TypeError:  # Triton releases whose get_ptxas takes no architecture
        return compiler.get_ptxas().path


def _target(ptx: str) -> str:
    m = re.search(r"^\.target (\w+)", ptx, re.M)
    return m.group(1) if m else "sm_90a"


def ptxas_info(ptx: str) -> tuple[int, int, int]:
    """(registers, spill bytes stored + loaded, shared bytes) that ptxas reports for sm_90."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), f"--gpu-name={_target(ptx)}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    smem = re.search(r"(\d+) bytes smem", text)
    return regs, spills, int(smem.group(1)) if smem else 0


_LABEL = re.compile(r"^(\$L__\w+):")
#: a global load of several elements: a vector (v2, v4, v8), or one 32-bit word holding two 16-bit values
_WIDE = re.compile(r"(@%p\d+\s+)?ld\.global(\.\w+)*\.v[248]")
_PAIR = re.compile(r"(@%p\d+\s+)?ld\.global(\.\w+)*\.b32\b")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def is_wide_load(line: str, element_size: int) -> bool:
    """Whether a PTX line loads several elements of ``element_size`` bytes from global memory at once."""
    return bool(_WIDE.match(line) or (element_size == 2 and _PAIR.match(line)))


def loops(ptx: str) -> list[tuple[int, int]]:
    """Line ranges [label, backward branch] of the PTX's loops."""
    lines = ptx.splitlines()
    labels = {}
    out = []
    for n, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = n
        b = _BRANCH.search(line)
        if b and b.group(1) in labels and labels[b.group(1)] < n:
            out.append((labels[b.group(1)], n))
    return out


def cubin_sass(ptx: str) -> str | None:
    """The SASS ptxas makes of ``ptx`` for its target, as ``cuobjdump -sass`` prints it (None without
    a cuobjdump next to Triton's ptxas)."""
    tool = os.path.join(os.path.dirname(ptxas_path()), "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        subprocess.run([ptxas_path(), f"--gpu-name={_target(ptx)}", path, "-o", cubin], capture_output=True,
                       check=True)
        return subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout


_SASS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")


def class_loop_instructions(sass: str) -> int | None:
    """Instructions in one trip of the class loop: of the SASS's loops (a branch back to a lower
    address), the one with the most ``MUFU`` (the exponentials: one a student element); None if none has one."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS.match, sass.splitlines()) if m]
    where = {addr: n for n, (addr, _) in enumerate(code)}
    best = None
    for n, (addr, text) in enumerate(code):
        b = _SASS_BRANCH.search(text)
        if not b or int(b.group(1), 16) >= addr or int(b.group(1), 16) not in where:
            continue
        body = code[where[int(b.group(1), 16)]:n + 1]
        mufu = sum(" MUFU" in " " + t.split("@")[-1] or t.lstrip().startswith("MUFU") for _, t in body)
        if mufu and (best is None or mufu > best[0]):
            best = (mufu, len(body))
    return best[1] if best else None


def inspect(v: Variant) -> Report:
    ptx, num_warps = compile_ptx(v)
    regs, spills, smem = ptxas_info(ptx)
    lines = ptx.splitlines()
    bad, vector = [], 0
    found = loops(ptx)
    for a, b in found:
        for line in lines[a:b + 1]:
            t = line.strip()
            if "bar.sync" in t or "barrier" in t or ".shared" in t:
                bad.append(t)
            vector += is_wide_load(t, _ELEMENT[v.dtype])
    per_element = None
    sass = cubin_sass(ptx)
    trip = class_loop_instructions(sass) if sass else None
    if trip:
        tiles, _ = _config(v)
        if v.kernel.startswith("map"):  # SPT pixels × UNROLL classes a thread a trip
            elements = max(tiles["BLOCK_P"] // (32 * num_warps), 1) * tiles["UNROLL"]
        else:  # BLOCK_C classes over the block's threads
            elements = max(tiles["BLOCK_C"] // (32 * num_warps), 1)
        per_element = round(trip / elements, 1)
    return Report(v.name, regs, spills, smem, num_warps, sorted(set(bad)), vector, len(found), per_element)


def variants() -> list[Variant]:
    """What CI compiles: the training configurations (bf16/fp16/fp32 students, k = 4 and 8, with and
    without ignore masks), the labels and T ≠ 1 statistics, channels_last, sum and map reductions (the
    lean class loops, with the top k as bits at C = 19), the class-by-class loops and the forward's
    chunked log-sum-exps, and rows of 1000, 32000 and 128000 classes."""
    out = []
    for kernel in ("map_fwd", "map_bwd"):
        for dtype in ("bfloat16", "float16", "float32"):
            out.append(Variant(kernel, dtype, C=19, k=4))
        out += [Variant(kernel, "bfloat16", C=150, k=8), Variant(kernel, "bfloat16", C=19, k=16),
                Variant(kernel, "float16", C=19, k=4, has_lab=True, lse1=True),
                Variant(kernel, "bfloat16", C=19, k=4, with_tail=False, has_ign=False, reduction=2),
                Variant(kernel, "bfloat16", C=19, k=4, channels_last=True, reduction=1)]
    # the class-by-class loops (triton_kl.LEAN off) and the forward's chunked log-sum-exps (CHUNK), which a
    # GPU sweep chooses between
    for kernel in ("map_fwd", "map_bwd"):
        out += [Variant(kernel, "bfloat16", C=19, k=4, lean=False), Variant(kernel, "bfloat16", C=150, k=8, lean=False)]
    out.append(Variant("map_bwd", "bfloat16", C=19, k=4, bwd_bits=True))  # the backward's bits (BWD_BITS)
    out += [Variant("map_fwd", dtype, C=19, k=4, chunk=True, lean=False) for dtype in ("bfloat16", "float32")]
    out += [Variant("map_fwd", "bfloat16", C=150, k=8, chunk=True, lean=False),
            Variant("map_fwd", "float16", C=19, k=4, has_lab=True, lse1=True, chunk=True, lean=False)]
    for kernel in ("row_fwd", "row_bwd"):
        out += [Variant(kernel, "bfloat16", C=1000, k=4), Variant(kernel, "float32", C=32000, k=8, has_lab=True,
                                                                   lse1=True),
                Variant(kernel, "bfloat16", C=128000, k=4, reduction=2)]
        # the rows' lean loop (triton_kl.ROW_LEAN), which a GPU sweep chooses, beside the default loop
        out += [Variant(kernel, "bfloat16", C=32000, k=4, lean=False), Variant(kernel, "bfloat16", C=32000, k=4, lean=True),
                Variant(kernel, "float32", C=32000, k=8, has_lab=True, lse1=True, lean=True)]
    return out


def report_markdown(reports: list[Report], title: str) -> str:
    lines = [f"# {title}\n", "| variant | registers | spill bytes | warps | loops | shared / barriers in loops | "
                              "vector loads in loops | class loop: SASS instructions an element |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        per = "" if r.instructions_per_element is None else f"{r.instructions_per_element:g}"
        lines.append(f"| {r.variant} | {r.registers} | {r.spill_bytes} | {r.num_warps} | {r.loops} | "
                     f"{len(r.shared_in_loops)} | {r.vector_loads_in_loops} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcache.kernels.build [--markdown FILE]``: every CI variant compiled for sm_90 with
    this machine's Triton, as a table; exit 1 when one breaks the budget (> 128 registers, spills,
    shared memory or barriers in a loop)."""
    import argparse

    import triton

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    reports = [inspect(v) for v in variants()]
    text = report_markdown(reports, f"Triton kernels compiled for sm_90 (Triton {triton.__version__})")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    bad = [r for r in reports if r.registers > 128 or r.spill_bytes or r.shared_in_loops]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
