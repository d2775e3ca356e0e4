"""The Triton kernel on a CUDA GPU against the float64 reference, at the sizes it is used at, and the
guards for the ways a kernel that passes in Triton's CPU interpreter fails on hardware.

On a GPU (marker ``cuda``, skipped without one; ``bash benchmarks/gpu_check.sh`` runs them):

* segmentation 8×19×512×1024, k = 4, 30 % of the positions ignored, with and without labels (the
  cross-entropy fused in), tail policies ``bin`` and ``renormalize``, reductions ``mean`` and ``none``;
* rows [N, C] with C = 32000 and 131072 (many class tiles, the online softmax) at k = 8 and 64;
* student fp32, fp16 and bf16 throughout; teacher values fp16, ids uint8, int16 or int32;
* launch settings: the same inputs under several ``num_warps`` / ``num_stages`` (:data:`SETTINGS`)
  agree with each other and with the reference;
* int64 offsets: students of more than 2^31 elements (the class axis of one sample past 2^31, and
  rows past 2^31), whose positions are checked against the reference computed on those positions
  alone (a wrapped offset reads other memory, or faults);
* more than 65535 rows (a grid's second axis would refuse the launch).

Here too, without a GPU: the same comparison helpers on tiny shapes in the interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), the launch settings reaching the launch, and the
kernel compiled ahead of time for sm_90 (no GPU needed) with its IR checked: no 32-bit
multiplication, no 32-bit pointer offset, and every fp16/bf16 load widened before use.

Tolerances against the float64 reference, which runs on the inputs as the kernel sees them
(already rounded to their dtypes). Loss: |out - ref| <= rtol * max|ref| + 1e-6. Gradient:
|g - g_ref| <= atol * max|g_ref| + rtol * |g_ref|, with no absolute floor (a mean over 4 million
positions has gradients near 1e-7):

    student  loss rtol  grad atol  grad rtol
    fp32     1e-4       1e-5       1e-4       fp32 accumulation (131072-class sums included)
    fp16     1e-3       2e-3       2e-3       + the gradient rounded to fp16 (2^-11 relative)
    bf16     1e-2       1e-2       1e-2       + the gradient rounded to bf16 (2^-8 relative)

Launch settings must agree with each other more tightly, though not bitwise: ``num_warps`` changes
how a class tile is spread over lanes and warps, so the order of the fp32 additions in ``tl.sum``
(and with it the last bits of the log-sum-exp) may change; maxima are exact. Loss: 1e-5 relative;
gradient: two units in the last place of the student's dtype (a stored gradient whose fp32 value
sits at a rounding boundary, then multiplied by the incoming gradient) plus 1e-5 relative, plus
1e-6 * max|g|. A race or a layout bug moves results by far more. The tests print how many
gradient elements differ at all.

fp16 students with ``reduction="mean"`` over millions of positions are checked on the loss only:
the kernel stores the gradient already divided by the number of positions, in the student's
dtype, and at 8×512×1024 that is about 1e-7, inside fp16's subnormal range (3-4 significant bits).
Their ``none`` gradients are checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from kdcache.core.topk import topk_targets
from kdcache.kernels import topk_kl, topk_kl_reference

triton_kl = pytest.importorskip("kdcache.kernels.triton_kl")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cuda" if CUDA else "cpu")

TOL = {torch.float32: (1e-4, 1e-5, 1e-4), torch.float16: (1e-3, 2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2, 1e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (num_warps, num_stages) the same inputs run under; the first is the default (NUM_WARPS, NUM_STAGES)
SETTINGS = ((4, None), (8, None), (2, 1), (16, 4))
T = 2.0
CE_WEIGHT = 0.7

_gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bash benchmarks/gpu_check.sh runs these)")
interpreter_or_gpu = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")


def gpu(f):
    return pytest.mark.cuda(_gpu_only(f))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- helpers shared by the GPU tests and their tiny interpreter versions -----------------------------


@dataclass
class Case:
    s: torch.Tensor  # student logits [N, C, *spatial]
    v: torch.Tensor  # teacher top-k values [N, k, *spatial]
    i: torch.Tensor  # their class ids
    tail: torch.Tensor | None  # [N, *spatial]
    ign: torch.Tensor | None  # bool [N, *spatial]
    lab: torch.Tensor | None  # [N, *spatial]
    ignore_index: int

    def select(self, index: tuple) -> Case:
        """The positions ``index`` (a tuple over [N, *spatial]) alone, as a case of their own."""
        n, *sp = index
        full = (n, slice(None), *sp)

        def pick(t, idx):
            return t[idx] if t is not None else None

        return Case(self.s[full], self.v[full], self.i[full], pick(self.tail, index), pick(self.ign, index),
                    pick(self.lab, index), self.ignore_index)


def make_case(N, C, spatial, k, *, dtype, device=DEV, seed=0, ignored=0.3, labels=False, scale=3.0,
              value_dtype=torch.float16, index_dtype=None) -> Case:
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, C, *spatial, generator=g, device=device) * scale).to(dtype)
    t = torch.randn(N, C, *spatial, generator=g, device=device) * scale
    v, i, tail = topk_targets(t, k)
    del t
    if index_dtype is None:
        index_dtype = torch.uint8 if C <= 256 else torch.int16 if C <= 32767 else torch.int32
    ignore_index = 255 if C <= 255 else -100
    ign = torch.rand(N, *spatial, generator=g, device=device) < ignored if ignored else None
    lab = None
    if labels:
        lab = torch.randint(0, C, (N, *spatial), generator=g, device=device)
        lab[torch.rand(N, *spatial, generator=g, device=device) < 0.2] = ignore_index
    return Case(s, v.to(value_dtype), i.to(index_dtype), tail.to(value_dtype) if tail is not None else None,
                ign, lab, ignore_index)


def upstream_for(case: Case, reduction: str, seed: int = 1) -> torch.Tensor:
    """The incoming gradient (float64): random per position for ``none``, 1.7 otherwise."""
    if reduction == "none":
        g = torch.Generator(device=case.s.device).manual_seed(seed)
        shape = (case.s.shape[0], *case.s.shape[2:])
        return torch.randn(shape, generator=g, device=case.s.device, dtype=torch.float64)
    return torch.tensor(1.7, dtype=torch.float64, device=case.s.device)


def reference(case: Case, *, tail_policy: str, reduction: str, upstream: torch.Tensor, temperature: float = T):
    """float64 loss and autograd gradient of the torch reference."""
    s64 = case.s.double().requires_grad_(True)
    ref = topk_kl_reference(s64, case.v.double(), case.i, case.tail.double() if case.tail is not None else None,
                            temperature=temperature, ignore_mask=case.ign, reduction=reduction, tail=tail_policy,
                            labels=case.lab, ignore_index=case.ignore_index, ce_weight=CE_WEIGHT)
    (g,) = torch.autograd.grad(ref, s64, upstream)
    return ref.detach(), g


def fused(case: Case, *, tail_policy: str, reduction: str, upstream: torch.Tensor, temperature: float = T,
          channels_last: bool = False):
    """The Triton kernel's loss and gradient (loss.backward's, through the autograd function)."""
    x = case.s.detach()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_(True)
    out = topk_kl(x, case.v, case.i, case.tail, temperature=temperature, ignore_mask=case.ign, reduction=reduction,
                  tail=tail_policy, labels=case.lab, ignore_index=case.ignore_index, ce_weight=CE_WEIGHT,
                  backend="triton")
    (g,) = torch.autograd.grad(out, x, upstream.float())
    return out.detach(), g


def assert_matches_reference(out, g, ref, g_ref, dtype, *, check_grad=True, what=""):
    loss_rtol, g_atol, g_rtol = TOL[dtype]
    assert g.dtype == dtype and g.shape == g_ref.shape, (what, g.dtype, g.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite loss"
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= loss_rtol * max(scale, 1e-3) + 1e-6, f"{what}: loss error {err:.3g} (|ref| up to {scale:.3g})"
    if not check_grad:
        return
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    gmax = g_ref.abs().max()
    assert gmax > 0, f"{what}: the reference gradient is zero; the check would be empty"
    err = (g.double() - g_ref).abs()
    excess = err - (g_atol * gmax + g_rtol * g_ref.abs())
    worst = int(excess.argmax())
    assert excess.reshape(-1)[worst] <= 0, (
        f"{what}: gradient error {err.reshape(-1)[worst].item():.3g} at flat index {worst} "
        f"(g {g.reshape(-1)[worst].item():.6g}, reference {g_ref.reshape(-1)[worst].item():.6g}, "
        f"max |g_ref| {gmax.item():.3g})")


def compare(case: Case, *, tail_policy="bin", reduction="mean", check_grad=True, what=""):
    upstream = upstream_for(case, reduction)
    ref, g_ref = reference(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream)
    out, g = fused(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream)
    assert_matches_reference(out, g, ref, g_ref, case.s.dtype, check_grad=check_grad,
                             what=what or f"{reduction} {tail_policy}")
    return out, g


def check_positions(case: Case, index: tuple, out_map, g_full, upstream, *, tail_policy, what):
    """The loss map and gradient of a ``reduction="none"`` run at the positions ``index`` against the
    reference computed on those positions alone."""
    n, *sp = index
    ref, g_ref = reference(case.select(index), tail_policy=tail_policy, reduction="none",
                           upstream=upstream[index].double())
    assert_matches_reference(out_map[index], g_full[(n, slice(None), *sp)], ref, g_ref, case.s.dtype, what=what)


def run_settings(monkeypatch, case: Case, *, tail_policy, reduction, what=""):
    """The same inputs under every launch setting: each against the reference, and all against the first."""
    upstream = upstream_for(case, reduction)
    ref, g_ref = reference(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream)
    dtype = case.s.dtype
    runs = []
    for warps, stages in SETTINGS:
        monkeypatch.setattr(triton_kl, "NUM_WARPS", warps)
        monkeypatch.setattr(triton_kl, "NUM_STAGES", stages)
        out, g = fused(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream)
        assert_matches_reference(out, g, ref, g_ref, dtype, what=f"{what} num_warps={warps} num_stages={stages}")
        runs.append(((warps, stages), out, g))
    (first, out0, g0) = runs[0]
    g0d = g0.double()
    for setting, out, g in runs[1:]:
        lerr = (out.double() - out0.double()).abs().max().item()
        lscale = out0.double().abs().max().item()
        assert lerr <= 1e-5 * max(lscale, 1e-3), f"{what}: loss under {setting} differs from {first} by {lerr:.3g}"
        diff = (g.double() - g0d).abs()
        bound = (2 * torch.finfo(dtype).eps + 1e-5) * g0d.abs() + 1e-6 * g0d.abs().max()
        worst = int((diff - bound).argmax())
        assert diff.view(-1)[worst] <= bound.view(-1)[worst], (
            f"{what}: gradient under {setting} differs from {first} by {diff.view(-1)[worst].item():.3g} at flat "
            f"index {worst} ({g.reshape(-1)[worst].item():.6g} vs {g0.reshape(-1)[worst].item():.6g})")
        print(f"{what}: {setting} vs {first}: loss {'bitwise equal' if torch.equal(out, out0) else f'differs by {lerr:.3g}'}; "
              f"{int((g != g0).sum())} of {g.numel()} gradient elements differ, by at most {diff.max().item():.3g}")
    return runs


# -- everywhere: tiny shapes (interpreter on CPU), launch plumbing, compiled IR -------------------------


@interpreter_or_gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.slow  # the Triton interpreter
def test_helpers_on_tiny_shapes(dtype):
    """The comparisons the GPU tests make, on shapes the interpreter runs in a second."""
    case = make_case(2, 19, (6, 10), 4, dtype=dtype, labels=True)
    for tail_policy in ("bin", "renormalize"):
        for reduction in ("mean", "none"):
            compare(case, tail_policy=tail_policy, reduction=reduction)
    compare(make_case(3, 300, (), 8, dtype=dtype, labels=True), reduction="sum")


@interpreter_or_gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.slow  # the Triton interpreter, every launch setting
def test_launch_settings_tiny(monkeypatch):
    """Every setting runs and agrees (in the interpreter, trivially: it ignores num_warps)."""
    run_settings(monkeypatch, make_case(2, 19, (6, 10), 4, dtype=torch.float32, labels=True),
                 tail_policy="bin", reduction="none", what="seg 2×19×6×10 fp32")
    run_settings(monkeypatch, make_case(3, 5000, (), 8, dtype=torch.bfloat16), tail_policy="bin", reduction="sum",
                 what="rows 3×5000 bf16")


@interpreter_or_gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.slow  # the Triton interpreter
def test_launch_settings_reach_the_launch(monkeypatch):
    """NUM_WARPS / NUM_STAGES end up in both launches' options (forward, backward), each on a 1-D grid
    of N × pixel blocks; one launch each way."""
    seen = []

    def spy(name):
        real = getattr(triton_kl, name)

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    seen.append((name, grid, kw.get("num_warps"), kw.get("num_stages", "default")))
                    return real[grid](*args, **kw)

                return run

        monkeypatch.setattr(triton_kl, name, Spy())

    spy("_map_fwd")
    spy("_map_bwd")
    case = make_case(2, 19, (3, 5), 4, dtype=torch.float32)
    for warps, stages in SETTINGS:
        monkeypatch.setattr(triton_kl, "NUM_WARPS", warps)
        monkeypatch.setattr(triton_kl, "NUM_STAGES", stages)
        fused(case, tail_policy="bin", reduction="mean", upstream=upstream_for(case, "mean"))
    expected = [(name, w, "default" if st is None else st) for w, st in SETTINGS for name in ("_map_fwd", "_map_bwd")]
    assert [(name, w, st) for name, _, w, st in seen] == expected
    assert {grid for _, grid, _, _ in seen} == {(triton_kl.programs(2, 19, 15, 4, 4),)}


@interpreter_or_gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.slow  # the Triton interpreter
def test_position_slices_tiny(dtype):
    """The int64 tests' check (positions against the reference on those positions alone), tiny."""
    case = make_case(2, 37, (8, 12), 4, dtype=dtype, labels=True)
    upstream = upstream_for(case, "none")
    out, g = fused(case, tail_policy="bin", reduction="none", upstream=upstream)
    for index in [(slice(None), slice(-2, None)), (slice(1, 2), slice(0, 1)), (slice(None), slice(3, 4), slice(5, 9))]:
        check_positions(case, index, out, g, upstream, tail_policy="bin", what=f"positions {index}")
    rows = make_case(9, 300, (), 8, dtype=dtype, labels=True)
    upstream = upstream_for(rows, "none")
    out, g = fused(rows, tail_policy="renormalize", reduction="none", upstream=upstream)
    check_positions(rows, (slice(-3, None),), out, g, upstream, tail_policy="renormalize", what="last rows")


# The kernels compiled ahead of time for an H100 (sm_90), in a subprocess without TRITON_INTERPRET,
# and their Triton IR read: the interpreter computes offsets in NumPy and cannot show a 32-bit one.
# kdcache.kernels.build gives the signature a real launch has (i32 sizes and strides, those equal to 1
# specialised as constants, pointers marked 16-divisible).
IR_CONFIGS = {
    "map-fwd-fp16-labels": dict(kernel="map_fwd", dtype="float16", C=19, k=4, has_lab=True, lse1=True, reduction=2),
    "map-bwd-bf16": dict(kernel="map_bwd", dtype="bfloat16", C=150, k=8),
    "map-fwd-dense-k": dict(kernel="map_fwd", dtype="bfloat16", C=40, k=20),
    "rows-fwd-bf16": dict(kernel="row_fwd", dtype="bfloat16", C=32000, k=8, has_lab=True, lse1=True),
    "rows-bwd-bf16": dict(kernel="row_bwd", dtype="bfloat16", C=32000, k=64),
}


def compiled_ttir(config: str, num_warps: int | None = None) -> str:
    """The Triton IR of a kernel compiled for sm_90 (needs no GPU; not under TRITON_INTERPRET)."""
    from kdcache.kernels import build

    asm, _ = build.compile_asm(build.Variant(**IR_CONFIGS[config], num_warps=num_warps))
    return asm["ttir"]


_LOAD = re.compile(r"^\s*(%[\w.#]+) = tt\.load .*!tt\.ptr<(f16|bf16)>")
_ADDPTR = re.compile(r"tt\.addptr (%[\w.#]+), (%[\w.#]+) : [^,]+, (\S+?)(?: loc\(|$)")
_MULI32 = re.compile(r"arith\.muli .* : (i32|tensor<[^>]*xi32>)")


def ir_problems(ttir: str) -> list[str]:
    """32-bit multiplications, 32-bit pointer offsets (other than constants) and fp16/bf16 loads used
    by anything but an ``arith.extf`` (within the region that defines them), in a TTIR listing."""
    lines = [line.strip() for line in ttir.splitlines()]
    problems = [f"32-bit product: {line}" for line in lines if _MULI32.search(line)]
    # an i32 offset in tt.addptr is sign-extended to the pointer's width, so it cannot wrap by itself:
    # what wraps is a 32-bit product (a class id times a stride) made before it, flagged above
    addptrs = sum(1 for line in lines if _ADDPTR.search(line))
    if addptrs < 10:
        problems.append(f"only {addptrs} tt.addptr found: is this the kernel's TTIR?")
    for j, line in enumerate(lines):
        m = _LOAD.match(line)
        if not m:
            continue
        name, uses, depth = m.group(1), 0, 0
        use = re.compile(re.escape(name) + r"(?![\w.#])")
        for other in lines[j + 1:]:  # up to the end of the region (SSA names repeat in sibling regions)
            if other.startswith(f"{name} = "):
                break
            if use.search(other):
                uses += 1
                if not other.split(" = ", 1)[-1].startswith(f"arith.extf {name} "):
                    problems.append(f"{m.group(2)} load {name} used before widening: {other}")
            depth += other.count("{") - other.count("}")
            if depth < 0:
                break
        if not uses:
            problems.append(f"{m.group(2)} load {name} is never used: {line}")
    return problems


def test_ir_checker_flags_32_bit_products_and_narrow_math():
    bad = """
    %a = arith.muli %pid, %c16_i32 : i32 loc(#loc1)
    %b = tt.addptr %s_ptr, %offs : tensor<16x!tt.ptr<f16>>, tensor<16xi32> loc(#loc2)
    %x = tt.load %b, %mask : tensor<16x!tt.ptr<bf16>> loc(#loc3)
    %y = arith.mulf %x, %x : tensor<16xbf16> loc(#loc4)
    """
    problems = ir_problems(bad)
    assert any("32-bit product" in p for p in problems)
    assert any("bf16 load %x used before widening" in p for p in problems)
    good = "\n".join([f"%p{j} = tt.addptr %base, %o{j} : tensor<16x!tt.ptr<f16>>, tensor<16xi64> loc(#l)" for j in range(10)]
                     + ["%ce = tt.addptr %scale_ptr, %c1_i32 : !tt.ptr<f32>, i32 loc(#l)",
                        "%x = tt.load %p0, %m : tensor<16x!tt.ptr<f16>> loc(#l)",
                        "%y = arith.extf %x : tensor<16xf16> to tensor<16xf32> loc(#l)"])
    assert ir_problems(good) == []


@pytest.fixture(scope="module")
def compiled_ttirs() -> dict[str, str]:
    """Every IR_CONFIGS kernel's TTIR, compiled in one process without TRITON_INTERPRET (one import
    of torch and Triton for all of them)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__, "ttir-all"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", sorted(IR_CONFIGS))
@pytest.mark.slow  # compiles kernels for an H100, in a process of their own
def test_compiled_kernel_has_int64_offsets_and_widens_loads(config, compiled_ttirs):
    ttir = compiled_ttirs[config]
    assert len(re.findall(r"tt\.load .*!tt\.ptr<b?f16>", ttir)) >= 3, "fewer fp16/bf16 loads than the kernel has"
    problems = ir_problems(ttir)
    assert not problems, "\n".join(problems[:20])


# -- on a GPU: real shapes ----------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("tail_policy", ["bin", "renormalize"])
@pytest.mark.parametrize("labels", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_segmentation_8x19x512x1024(dtype, labels, tail_policy):
    case = make_case(8, 19, (512, 1024), 4, dtype=dtype, labels=labels, seed=2 * labels + (tail_policy == "bin"))
    compare(case, tail_policy=tail_policy, reduction="mean", check_grad=dtype != torch.float16, what="mean")
    compare(case, tail_policy=tail_policy, reduction="none", what="none")


ROW_CASES = [(32000, 8, "bin", False), (32000, 64, "renormalize", True), (131072, 8, "renormalize", True),
             (131072, 64, "bin", False)]


@gpu
@pytest.mark.parametrize("C,k,tail_policy,labels", ROW_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_up_to_131072_classes(dtype, C, k, tail_policy, labels):
    N = (1 << 23) // C  # 8M logits: 262 rows of 32000, 64 of 131072
    case = make_case(N, C, (), k, dtype=dtype, labels=labels, seed=C + k)
    compare(case, tail_policy=tail_policy, reduction="sum", what="sum")
    compare(case, tail_policy=tail_policy, reduction="none", what="none")


SETTING_CASES = {
    "seg 2×19×512×1024 fp32 kd+ce bin mean": (dict(N=2, C=19, spatial=(512, 1024), k=4, dtype=torch.float32, labels=True),
                                              "bin", "mean"),
    "seg 2×150×256×512 bf16 renormalize none": (dict(N=2, C=150, spatial=(256, 512), k=8, dtype=torch.bfloat16),
                                                "renormalize", "none"),
    "seg 1×300×128×256 fp16 kd+ce bin none (two class tiles)": (
        dict(N=1, C=300, spatial=(128, 256), k=4, dtype=torch.float16, labels=True), "bin", "none"),
    "rows 64×131072 bf16 kd+ce bin sum": (dict(N=64, C=131072, spatial=(), k=8, dtype=torch.bfloat16, labels=True),
                                          "bin", "sum"),
}


@gpu
@pytest.mark.parametrize("name", list(SETTING_CASES))
def test_launch_settings_agree(monkeypatch, name):
    shape, tail_policy, reduction = SETTING_CASES[name]
    case = make_case(**shape)
    run_settings(monkeypatch, case, tail_policy=tail_policy, reduction=reduction, what=name)


#: the maps kernels' class loops (``triton_kl`` settings): class after class, in chunks of UNROLL classes,
#: the lean loop with the top k's ids compared, and with them as bits (C <= 32)
LOOPS = {"classic": dict(LEAN=False, CHUNK=False), "chunked": dict(LEAN=False, CHUNK=True),
         "lean": dict(LEAN=True, BITS=False), "bits": dict(LEAN=True, BITS=True),
         "bits both passes": dict(LEAN=True, BITS=True, BWD_BITS=True)}


def run_loops(monkeypatch, case: Case, *, tail_policy, reduction, what="", temperature=T, channels_last=False):
    """Every class loop of the maps kernels (:data:`LOOPS`): each against the reference, and each against
    the class-by-class loop (the same sums in another order and base: within a few float32 roundings)."""
    upstream = upstream_for(case, reduction)
    ref, g_ref = reference(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream,
                           temperature=temperature)
    runs = {}
    C, k = case.s.shape[1], case.v.shape[1]
    for name, settings in LOOPS.items():
        for attr, value in ({"LEAN": False, "CHUNK": False, "BITS": False, "BWD_BITS": False} | settings).items():
            monkeypatch.setattr(triton_kl, attr, value)
        cfg = triton_kl.map_config(C, 64 * 64, k, 4)
        lean = settings.get("LEAN", False) and k <= triton_kl.CAPTURE_MAX_K
        bits = settings.get("BITS", False) and C <= 32 and lean
        assert (cfg["LEAN"], cfg["BITS"], cfg["BWD_BITS"], cfg["CHUNK"]) == (
            lean, bits, bits and settings.get("BWD_BITS", False), settings.get("CHUNK", False)), (name, cfg)
        runs[name] = fused(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream,
                           temperature=temperature, channels_last=channels_last)
        assert_matches_reference(*runs[name], ref, g_ref, case.s.dtype, what=f"{what} {name}")
    for name, run in runs.items():
        assert_agree(runs["classic"], run, case.s.dtype, what=f"{what}: {name}")


def assert_agree(first, second, dtype, *, what=""):
    """Two kernels' (loss, gradient) of the same sums in another order or base: within a few float32
    roundings and units in the last place of the gradient's dtype."""
    (out0, g0), (out1, g1) = first, second
    lerr = (out1.double() - out0.double()).abs().max().item()
    assert lerr <= 1e-5 * max(out0.double().abs().max().item(), 1e-3), f"{what} loss differs by {lerr:.3g}"
    g0d = g0.double()
    diff = (g1.double() - g0d).abs()
    bound = (4 * torch.finfo(dtype).eps + 1e-5) * g0d.abs() + 1e-6 * g0d.abs().max()
    assert (diff <= bound).all(), f"{what} gradient differs by up to {diff.max().item():.3g}"


@pytest.mark.skipif(not INTERPRET or CUDA, reason="the interpreter's check; on a GPU, test_class_loops_agree (this one "
                    "compiles 20 kernel pairs, past gpu_check.sh's time for the CUDA tests on an H200 at 865e091)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.slow  # the Triton interpreter
def test_class_loops_tiny(monkeypatch):
    """Every class loop on tiny maps. 11 classes (two blocks of four, then three one at a time) with the
    labels' third log-sum-exp at T = 2; logits 30 times the usual spread, so that the running maxima move
    far; labels at T = 1 (the cross-entropy folded into the lean backward's scales), channels_last; and
    40 classes (the lean loop without bits)."""
    run_loops(monkeypatch, make_case(2, 11, (6, 10), 4, dtype=torch.float32, labels=True), tail_policy="bin",
              reduction="mean", what="seg 2×11×6×10 fp32 kd+ce")
    run_loops(monkeypatch, make_case(1, 11, (5, 7), 3, dtype=torch.float16, scale=90.0), tail_policy="renormalize",
              reduction="none", what="seg 1×11×5×7 fp16 large logits")
    run_loops(monkeypatch, make_case(2, 11, (4, 6), 4, dtype=torch.bfloat16, labels=True, seed=3), tail_policy="bin",
              reduction="none", temperature=1.0, channels_last=True, what="seg 2×11×4×6 bf16 kd+ce T=1 channels_last")
    run_loops(monkeypatch, make_case(1, 40, (3, 5), 5, dtype=torch.float32, labels=True, seed=4), tail_policy="bin",
              reduction="sum", temperature=1.0, what="seg 1×40×3×5 fp32 kd+ce T=1")


LOOP_CASES = {
    "seg 2×19×256×512 bf16 kd+ce bin mean": (dict(N=2, C=19, spatial=(256, 512), k=4, dtype=torch.bfloat16,
                                                  labels=True), "bin", "mean", T),
    "seg 2×21×256×512 fp32 kd+ce T=1 bin none": (dict(N=2, C=21, spatial=(256, 512), k=4, dtype=torch.float32,
                                                      labels=True), "bin", "none", 1.0),
    "seg 2×150×256×512 fp16 renormalize none": (dict(N=2, C=150, spatial=(256, 512), k=8, dtype=torch.float16),
                                                "renormalize", "none", T),
}


@gpu
@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_class_loops_agree(monkeypatch, name):
    shape, tail_policy, reduction, temperature = LOOP_CASES[name]
    run_loops(monkeypatch, make_case(**shape), tail_policy=tail_policy, reduction=reduction, what=name,
              temperature=temperature)


def run_row_loops(monkeypatch, case: Case, *, tail_policy, reduction, what="", temperature=T):
    """The rows kernels' two loops (``triton_kl.ROW_LEAN``), each against the reference and the lean one
    against the other (the same sums in another order and base, the top k and the label rewritten)."""
    upstream = upstream_for(case, reduction)
    ref, g_ref = reference(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream,
                           temperature=temperature)
    runs = {}
    for lean in (False, True):
        monkeypatch.setattr(triton_kl, "ROW_LEAN", lean)
        assert triton_kl.row_config(case.s.shape[1], case.v.shape[1])["LEAN"] is lean
        runs[lean] = fused(case, tail_policy=tail_policy, reduction=reduction, upstream=upstream,
                           temperature=temperature)
        assert_matches_reference(*runs[lean], ref, g_ref, case.s.dtype, what=f"{what} ROW_LEAN={lean}")
    assert_agree(runs[False], runs[True], case.s.dtype, what=f"{what}: lean rows'")


@pytest.mark.slow  # every row loop through Triton's interpreter (4-5 s), as test_class_loops_tiny
@interpreter_or_gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_row_loops_tiny(monkeypatch):
    """Rows of 2500 classes (three class tiles, the last partial) with labels at T = 2 and at T = 1, a
    renormalised top 6 of 40 with logits 30 times the usual spread, and every class among the top k."""
    run_row_loops(monkeypatch, make_case(6, 2500, (), 4, dtype=torch.float32, labels=True), tail_policy="bin",
                  reduction="mean", what="rows 6×2500 fp32 kd+ce")
    run_row_loops(monkeypatch, make_case(5, 2500, (), 8, dtype=torch.bfloat16, labels=True, seed=2), tail_policy="bin",
                  reduction="none", temperature=1.0, what="rows 5×2500 bf16 kd+ce T=1")
    run_row_loops(monkeypatch, make_case(4, 40, (), 6, dtype=torch.float16, scale=90.0, seed=3),
                  tail_policy="renormalize", reduction="sum", what="rows 4×40 fp16 large logits")
    run_row_loops(monkeypatch, make_case(3, 5, (), 5, dtype=torch.float32, labels=True, seed=4), tail_policy="bin",
                  reduction="none", what="rows 3×5 fp32 k = C")


ROW_LOOP_CASES = {
    "rows 262×32000 bf16 kd+ce bin sum": (dict(N=262, C=32000, spatial=(), k=8, dtype=torch.bfloat16, labels=True),
                                          "bin", "sum", T),
    "rows 64×131072 fp32 kd+ce T=1 renormalize none": (dict(N=64, C=131072, spatial=(), k=4, dtype=torch.float32,
                                                            labels=True), "renormalize", "none", 1.0),
}


@gpu
@pytest.mark.parametrize("name", list(ROW_LOOP_CASES))
def test_row_loops_agree(monkeypatch, name):
    shape, tail_policy, reduction, temperature = ROW_LOOP_CASES[name]
    run_row_loops(monkeypatch, make_case(**shape), tail_policy=tail_policy, reduction=reduction, what=name,
                  temperature=temperature)


@gpu
def test_more_rows_than_a_grid_axis_holds():
    """70000 rows: a grid of (blocks, N) would exceed CUDA's 65535 on its second axis."""
    case = make_case(70000, 64, (), 4, dtype=torch.float32, labels=True)
    compare(case, reduction="sum", what="sum")
    compare(case, reduction="none", what="none")


# -- on a GPU: int64 offsets (last: a wrapped offset can fault and take the CUDA context with it) --------


def _need_gpu_memory(gib: float) -> None:
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gib:
        pytest.skip(f"needs about {gib:.0f} GiB of GPU memory, this GPU has {total:.0f}")


@gpu
def test_int64_offsets_class_axis_past_2_31():
    """One sample of 1024 classes × 1024×2100 positions, fp16: classes 999..1023 of every position
    lie past 2^31 elements (class stride P = 2,150,400). Most of the student's mass, all of the
    teacher's top 4 and the labels sit in classes 990..1023, so a wrapped offset changes every
    checked number. About 14 GB of GPU memory."""
    _need_gpu_memory(30)
    N, C, H, W, k = 1, 1024, 1024, 2100, 4
    assert C * H * W > 2**31 and 999 * H * W >= 2**31  # class 999 of position 0 is element 2^31 + ...
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(N, C, H, W, generator=g, device=dev, dtype=torch.float16).mul_(3.0)
    s[:, 1000:] += 6.0
    v = torch.empty(N, k, H, W, dtype=torch.float16, device=dev)
    i = torch.empty(N, k, H, W, dtype=torch.int16, device=dev)
    tail = torch.empty(N, H, W, dtype=torch.float16, device=dev)
    for h0 in range(0, H, 64):
        t = torch.randn(N, C, 64, W, generator=g, device=dev) * 3.0
        t[:, :1000].clamp_(max=19.0)
        t[:, 1000:] = t[:, 1000:].abs() + 20.0  # the teacher's top k: classes 1000..1023
        tv, ti, tt = topk_targets(t, k)
        v[:, :, h0:h0 + 64], i[:, :, h0:h0 + 64], tail[:, h0:h0 + 64] = tv, ti, tt
        del t, tv, ti, tt
    ign = torch.rand(N, H, W, generator=g, device=dev) < 0.3
    lab = torch.randint(990, C, (N, H, W), generator=g, device=dev)
    lab[torch.rand(N, H, W, generator=g, device=dev) < 0.2] = -100
    case = Case(s, v, i, tail, ign, lab, -100)
    assert int(i.min()) >= 1000  # the teacher's ids are all past 2^31 too
    upstream = torch.randn(N, H, W, generator=g, device=dev, dtype=torch.float64)
    out, grad = fused(case, tail_policy="bin", reduction="none", upstream=upstream)
    for index, what in [((slice(None), slice(H - 2, H)), "last two map rows"),
                        ((slice(None), slice(H // 2, H // 2 + 1)), "middle map row"),
                        ((slice(None), slice(0, 2)), "first two map rows")]:
        check_positions(case, index, out, grad, upstream, tail_policy="bin", what=what)


@gpu
def test_int64_offsets_rows_past_2_31():
    """[16400, 131072] fp16 rows = 2^31 + 2,097,152 elements: rows 16384.. start past 2^31 (the
    sample offset, n · row stride). About 13 GB of GPU memory."""
    _need_gpu_memory(30)
    N, C, k = 16400, 131072, 8
    assert (N - 16) * C >= 2**31
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    s = torch.randn(N, C, generator=g, device=dev, dtype=torch.float16).mul_(3.0)
    v = torch.empty(N, k, dtype=torch.float16, device=dev)
    i = torch.empty(N, k, dtype=torch.int32, device=dev)
    tail = torch.empty(N, dtype=torch.float16, device=dev)
    for r0 in range(0, N, 1024):
        t = torch.randn(min(1024, N - r0), C, generator=g, device=dev) * 3.0
        tv, ti, tt = topk_targets(t, k)
        v[r0:r0 + len(t)], i[r0:r0 + len(t)], tail[r0:r0 + len(t)] = tv, ti, tt
        del t, tv, ti, tt
    ign = torch.rand(N, generator=g, device=dev) < 0.3
    lab = torch.randint(0, C, (N,), generator=g, device=dev)
    lab[torch.rand(N, generator=g, device=dev) < 0.2] = -100
    case = Case(s, v, i, tail, ign, lab, -100)
    upstream = torch.randn(N, generator=g, device=dev, dtype=torch.float64)
    out, grad = fused(case, tail_policy="bin", reduction="none", upstream=upstream)
    check_positions(case, (slice(N - 16, N),), out, grad, upstream, tail_policy="bin", what="the 16 rows past 2^31")
    check_positions(case, (slice(0, 4),), out, grad, upstream, tail_policy="bin", what="the first 4 rows")


if __name__ == "__main__":  # python tests/test_kernels_cuda.py ttir CONFIG: the kernel's TTIR for sm_90
    if len(sys.argv) == 3 and sys.argv[1] == "ttir":
        print(compiled_ttir(sys.argv[2]))
    elif sys.argv[1:] == ["ttir-all"]:  # every config's, as one line of JSON
        print(json.dumps({config: compiled_ttir(config) for config in IR_CONFIGS}))
    else:
        sys.exit(f"usage: python {sys.argv[0]} ttir {{{','.join(IR_CONFIGS)}}} | ttir-all")
