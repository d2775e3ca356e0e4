"""The fused top-k KL kernels against the float64 PyTorch reference.

Tolerances (loss: relative; gradient: |g - g_ref| <= atol * max|g_ref| + rtol * |g_ref|):
fp32 student 1e-4 / (1e-5, 1e-4); fp16 student 1e-3 / (2e-3, 2e-3); bf16 student 1e-2 / (1e-2, 1e-2).
The reference runs in float64 on the inputs as the kernel sees them (already rounded to the
student's and teacher's dtypes), so the tolerances measure the kernels' own arithmetic: fp32
accumulation and the rounding of the gradient to the student's dtype.

The Triton kernel runs on the CPU under TRITON_INTERPRET=1 (set in conftest.py when there is no
GPU) on tiny shapes; the Numba kernel takes the full matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdcache.core.outputs import markdown_signature
from kdcache.core.topk import topk_targets
from kdcache.kernels import KernelInputError, topk_kl, topk_kl_reference

TOL = {torch.float32: (1e-4, 1e-5, 1e-4), torch.float16: (1e-3, 2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2, 1e-2)}
TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def make_case(N, C, k, spatial, *, seed=0, scale=3.0, student_dtype=torch.float32, value_dtype=torch.float16,
              index_dtype=None, ignored=0.3, labels=False):
    """Random student logits and the top-k targets of random teacher logits; ids as uint8 where C
    allows (the store's own choice), else int16."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, C, *spatial, generator=g) * scale).to(student_dtype)
    t = torch.randn(N, C, *spatial, generator=g) * scale
    v, i, tail = topk_targets(t, k)
    v = v.to(value_dtype)
    tail = tail.to(value_dtype) if tail is not None else None
    i = i.to(index_dtype or (torch.uint8 if C <= 256 else torch.int16))
    ign = torch.rand(N, *spatial, generator=g) < ignored
    lab = None
    if labels:
        lab = torch.randint(0, C, (N, *spatial), generator=g)
        lab[torch.rand(N, *spatial, generator=g) < 0.2] = 255
    return s, v, i, tail, ign, lab


def check(backend, s, v, i, tail, ign, lab=None, *, T=2.0, tail_policy="bin", reduction="mean", ce_weight=0.7):
    s64 = s.double().requires_grad_(True)
    ref = topk_kl_reference(s64, v.double(), i, tail.double() if tail is not None else None, temperature=T,
                            ignore_mask=ign, reduction=reduction, tail=tail_policy, labels=lab, ce_weight=ce_weight)
    upstream = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, s64, upstream)
    x = s.clone().requires_grad_(True)
    out = topk_kl(x, v, i, tail, temperature=T, ignore_mask=ign, reduction=reduction, tail=tail_policy,
                  labels=lab, ce_weight=ce_weight, backend=backend)
    (g,) = torch.autograd.grad(out, x, upstream.float())
    assert g.dtype == s.dtype and g.shape == s.shape
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    loss_rtol, g_atol, g_rtol = TOL[s.dtype]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert (out.double() - ref.detach()).abs().max().item() <= loss_rtol * max(scale, 1e-3) + 1e-6, (out, ref)
    err = (g.double() - g_ref).abs()
    bound = g_atol * g_ref.abs().max() + g_rtol * g_ref.abs() + 1e-7
    assert (err <= bound).all(), f"max gradient error {err.max().item():.3g}"
    return out, g


# -- Numba: the full matrix, through both kernels ----------------------------------------------------------
# ``kl_spatial`` (float32, pixels innermost, blocks of pixels) takes maps of 64 positions or more and
# ``kl_rows`` (float32, classes innermost) the rest; ``layout`` forces one of them on every shape, so
# both kernels meet every case, including blocks cut short and maps of several blocks. (Maps of up to
# ``api.COLUMN_MAX_CLASSES`` classes take a kernel generated per (C, k) in a user's run: off here, by
# tests/conftest.py, and checked in tests/test_numba_columns.py.)


@pytest.fixture(params=["spatial", "rows"])
def layout(request, monkeypatch):
    import kdcache.kernels.api as api

    monkeypatch.setattr(api, "numba_layout", lambda C, P: request.param)
    return request.param


CASES = [(C, k) for C in (2, 11, 19, 21, 150, 1000) for k in sorted({1, 2, 4, 8, C}) if k <= C]


@pytest.mark.parametrize("C,k", CASES)
@pytest.mark.parametrize("tail_policy", ["bin", "renormalize"])
def test_numba_matches_reference_spatial_and_rows(C, k, tail_policy, layout):
    N = 1 + (C + k) % 3
    spatial = (3, 5) if C >= 150 else (5, 7)
    s, v, i, tail, ign, _ = make_case(N, C, k, spatial, seed=C * 10 + k, index_dtype=torch.int16)
    check("numba", s, v, i, tail, ign, tail_policy=tail_policy, reduction="mean")
    check("numba", s, v, i, tail, ign, tail_policy=tail_policy, reduction="none")
    s, v, i, tail, ign, _ = make_case(N + 3, C, k, (), seed=C + k, index_dtype=torch.int16)  # rows [N, C]
    check("numba", s, v, i, tail, ign, tail_policy=tail_policy, reduction="sum")


@pytest.mark.parametrize("C,k", [(19, 4), (21, 8), (150, 4)])
def test_numba_maps_of_several_blocks(C, k, layout):
    """Maps longer than one block of ``kl_spatial`` (and a last block cut short), several samples
    shared by the threads' chunks, cache-typed targets (fp16 values, uint8 ids) and labels."""
    from kdcache.kernels.numba_kl import block_pixels

    P = 2 * block_pixels(C) + 37
    s, v, i, tail, ign, lab = make_case(3, C, k, (1, P), seed=C + 3 * k, labels=True)
    for T in (1.0, 2.0):
        check("numba", s, v, i, tail, ign, lab, T=T, reduction="mean")
        check("numba", s, v, i, tail, ign, lab, T=T, reduction="none")


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_numba_every_dtype_combination(student_dtype, value_dtype, index_dtype, layout):
    s, v, i, tail, ign, lab = make_case(2, 21, 4, (7, 9), student_dtype=student_dtype, value_dtype=value_dtype,
                                        index_dtype=index_dtype, labels=True)
    check("numba", s, v, i, tail, ign, lab)


def test_numba_large_logits_and_temperatures(layout):
    s, v, i, tail, ign, lab = make_case(2, 19, 4, (5, 7), scale=1e4, value_dtype=torch.float32, labels=True)
    for T in (1.0, 4.0):
        check("numba", s, v, i, tail, ign, lab, T=T)
    # near fp16's maximum
    s, v, i, tail, ign, _ = make_case(1, 11, 2, (3, 5), scale=1.0, student_dtype=torch.float16)
    s = (s.float() * 6e4 / s.float().abs().max()).half()
    v = (v.float() * 6e4 / v.float().abs().max()).half()
    tail = torch.minimum(tail.float() * 6e4 / 3, v[:, -1].float()).half()
    check("numba", s, v, i, tail, ign)


def test_numba_student_tail_underflow_beside_ordinary_positions(layout):
    """Positions whose student puts all its mass on the top k (the tail sum underflows, so the
    kernels take their exact log-sum-exp fallback) mixed with ordinary ones in the same block."""
    s, v, i, tail, ign, lab = make_case(2, 19, 4, (6, 20), labels=True)
    confident = torch.rand(2, 6, 20, generator=torch.Generator().manual_seed(1)) < 0.4
    ids = i.long()
    boost = torch.zeros_like(s).scatter(1, ids, 400.0)  # the top-k classes 400 above the rest
    s = torch.where(confident.unsqueeze(1), s + boost, s)
    for T in (1.0, 3.0):
        check("numba", s, v, i, tail, ign, lab, T=T, reduction="none")
        check("numba", s, v, i, tail, ign, lab, T=T)


def test_numba_all_ignored_is_zero_not_nan(layout):
    s, v, i, tail, _, _ = make_case(2, 19, 4, (3, 5))
    v[0, :, 0, 0] = float("nan")  # ignored positions may hold anything
    x = s.clone().requires_grad_(True)
    out = topk_kl(x, v, i, tail, ignore_mask=torch.ones(2, 3, 5, dtype=torch.bool), backend="numba")
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_float16_bits_widen_exactly():
    """The spatial kernel reads fp16 teacher values as their int16 bits: every one of the 65536
    bit patterns widens to numpy's float32 (NaNs to NaNs)."""
    import numpy as np
    from numba import njit

    from kdcache.kernels.numba_kl import _to_f32

    @njit
    def widen(bits, out):
        for j in range(bits.shape[0]):
            out[j] = _to_f32(bits[j])

    bits = np.arange(65536, dtype=np.uint16).view(np.int16)
    out = np.empty(65536, np.float32)
    widen(bits, out)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert (np.isnan(out) == nan).all()
    assert (out[~nan].view(np.int32) == want[~nan].view(np.int32)).all()


def test_float32_exp_and_log_against_float64():
    import numpy as np
    from numba import njit

    from kdcache.kernels.numba_kl import exp2_32, exp32, log32

    @njit
    def run(x, e, e2, lg):
        for j in range(x.shape[0]):
            e[j] = exp32(x[j])
            e2[j] = exp2_32(x[j])
            lg[j] = log32(-x[j] + np.float32(1e-30))

    x = -np.concatenate([np.linspace(0, 1, 10001), np.linspace(1, 86, 100001)]).astype(np.float32)
    e, e2, lg = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    run(x, e, e2, lg)
    x64 = x.astype(np.float64)
    assert np.abs(e2 / np.exp2(x64) - 1).max() < 3e-7  # the polynomial itself: ~2 ulp
    # exp(x) = 2**(x log2 e): the product's rounding adds |x| × 1.4 × 2**-24 relative
    assert (np.abs(e / np.exp(x64) - 1) <= 3e-7 + np.abs(x64) * 1.5 * 2.0 ** -24).all()
    assert np.abs(lg - np.log(-x64 + 1e-30)).max() < 1e-5
    run(np.array([-1e4, -np.inf], np.float32), e[:2], e2[:2], lg[:2])
    assert (e[:2] > 0).all() and (e[:2] < 3e-38).all()  # clamped, never 0 or NaN



def test_the_kernels_ask_llvm_for_their_vector_width():
    """``_prefer_vector_width()`` marks the function that calls it with LLVM's
    ``prefer-vector-width`` (the kernels' VECTOR_WIDTH), on any CPU, and leaves its arithmetic
    alone; a function without the call carries no such attribute."""
    import re

    import numpy as np
    from numba import njit

    from kdcache.kernels import numba_kl

    def body(x):
        t = np.float32(0.0)
        for j in range(x.shape[0]):
            t += x[j] * x[j]
        return t

    def marked_body(x):
        numba_kl._prefer_vector_width()
        t = np.float32(0.0)
        for j in range(x.shape[0]):
            t += x[j] * x[j]
        return t

    marked = njit(marked_body)
    plain = njit(body)
    x = np.arange(100, dtype=np.float32)
    assert marked(x) == plain(x) == np.float32((x.astype(np.float64) ** 2).sum())
    want = f'"prefer-vector-width"="{numba_kl.VECTOR_WIDTH}"'
    ir_marked = "".join(marked.inspect_llvm().values())
    ir_plain = "".join(plain.inspect_llvm().values())
    # on the function defined from marked_body: its "define" line, or the attribute group it names (#N)
    defs = [line for line in ir_marked.splitlines() if line.startswith("define") and "marked_body" in line]
    groups = {m.group(1): m.group(2) for m in re.finditer(r"^attributes #(\d+) = \{(.*)\}$", ir_marked, re.M)}

    def attributes(line):
        return line + " ".join(groups.get(g, "") for g in re.findall(r"#(\d+)", line.split("(")[-1]))

    assert defs and any(want in attributes(line) for line in defs), (defs, groups)
    assert not re.search(r"prefer-vector-width", ir_plain)



@pytest.mark.parametrize("C,spatial", [(11, (6, 10)), (19, (6, 10)), (21, ()), (150, (3, 7)), (19, (16, 32)),
                                       (3, (1, 200)), (1000, (8, 8))])
def test_the_cpu_kernels_give_the_same_bits_every_call(C, spatial, monkeypatch):
    """A run is reproducible from its seed on a CPU: the same inputs give bit-identical losses and
    gradients call after call, whatever memory the kernels' scratch and output arrays get (the
    rows kernel at 512-bit vectors did not). Fresh gradient buffers, no pool."""
    from kdcache.kernels import api

    monkeypatch.setattr(api, "GRAD_POOL_SIZE", 0)
    s, v, i, tail, ign, _ = make_case(3, C, min(4, C - 1), spatial, seed=C)
    keep = []  # the earlier results stay alive: each call's arrays land elsewhere
    for _ in range(6):
        x = s.detach().requires_grad_(True)
        loss = topk_kl(x, v, i, tail, ignore_mask=ign, backend="numba", check_inputs=False)
        loss.backward()
        keep.append((loss.detach(), x.grad))
    for loss, grad in keep[1:]:
        assert torch.equal(loss, keep[0][0]) and torch.equal(grad, keep[0][1])

def test_the_cpu_gradient_buffer_is_reused_only_once_nothing_holds_it(monkeypatch):
    """Large gradients of the CPU path come from a pool: a call reuses the buffer of an earlier one
    whose gradient is gone, never one whose gradient a tensor still holds (that gradient keeps its
    values), and small ones are not pooled."""
    from kdcache.kernels import api

    monkeypatch.setattr(api, "_GRAD_POOL", [])
    monkeypatch.setattr(api, "GRAD_POOL_MIN_BYTES", 4096)
    s, v, i, tail, ign, _ = make_case(2, 19, 4, (6, 10))  # 9120 bytes of float32 gradient
    s2 = s.flip(-1).contiguous()

    def grad_of(x):
        x = x.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, ignore_mask=ign, backend="numba", check_inputs=False).backward()
        return x.grad

    want = grad_of(s).clone()
    held = grad_of(s)
    first = held.data_ptr()
    other = grad_of(s2)  # the first gradient is still held: a new buffer
    assert other.data_ptr() != first
    torch.testing.assert_close(held, want, rtol=0, atol=0)  # untouched by the second call
    del held
    assert grad_of(s2).data_ptr() == first  # free again: reused
    again = grad_of(s)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert len(api._GRAD_POOL) <= api.GRAD_POOL_SIZE
    monkeypatch.setattr(api, "GRAD_POOL_MIN_BYTES", 1 << 30)  # below the size: never pooled
    api._GRAD_POOL.clear()
    grad_of(s)
    assert api._GRAD_POOL == []

def test_the_cpu_gradient_and_the_kernels_scratch_start_on_a_cache_line(monkeypatch):
    """The CPU path's gradient (pooled or not) and the spatial kernel's scratch start at a 64-byte
    address: numpy and Numba start arrays at 16 and 32 bytes, where every 512-bit access of the
    kernels would cross two cache lines."""
    from kdcache.kernels import api, numba_kl

    monkeypatch.setattr(api, "_GRAD_POOL", [])
    monkeypatch.setattr(api, "GRAD_POOL_MIN_BYTES", 4096)
    for C, spatial in ((19, (6, 10)), (19, (2, 3)), (3, (1, 5))):  # pooled, then two small ones
        s, v, i, tail, ign, _ = make_case(2, C, 2, spatial, seed=C)
        x = s.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, ignore_mask=ign, backend="numba", check_inputs=False).backward()
        assert x.grad.data_ptr() % 64 == 0
    addresses = {numba_kl._scratch(n).ctypes.data % 64 for n in (1, 15, 16, 17, 512, 19 * 512) for _ in range(8)}
    assert addresses == {0}
    assert numba_kl._scratch(33).shape == (33,)


def test_backward_only_scales_the_stored_gradient(monkeypatch):
    import kdcache.kernels.api as api

    calls = []
    real = api._run_numba
    monkeypatch.setattr(api, "_run_numba", lambda *a: calls.append(1) or real(*a))
    s, v, i, tail, ign, _ = make_case(2, 11, 4, (5, 5))
    x = s.clone().requires_grad_(True)
    out = topk_kl(x, v, i, tail, ignore_mask=ign, backend="numba")
    assert len(calls) == 1
    (3.0 * out).backward()
    assert len(calls) == 1  # no recomputation in backward
    y = s.clone().requires_grad_(True)
    topk_kl(y, v, i, tail, ignore_mask=ign, backend="numba").backward()
    assert torch.allclose(x.grad, 3.0 * y.grad)


def test_auto_picks_numba_on_cpu(monkeypatch):
    import kdcache.kernels.api as api

    used = []
    real = api._run_numba
    monkeypatch.setattr(api, "_run_numba", lambda *a: used.append(1) or real(*a))
    s, v, i, tail, ign, _ = make_case(1, 11, 2, (3, 3))
    topk_kl(s, v, i, tail)
    assert used


# -- the reference itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_policy", ["bin", "renormalize"])
def test_reference_gradient_agrees_with_finite_differences(tail_policy):
    s, v, i, tail, ign, lab = make_case(2, 7, 3, (2, 3), value_dtype=torch.float64, labels=True)
    s = s.double().requires_grad_(True)

    def f(x):
        return topk_kl_reference(x, v, i, tail, temperature=2.5, ignore_mask=ign, tail=tail_policy, labels=lab,
                                 ce_weight=0.3, reduction="mean")

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)


def test_reference_dense_and_k_equals_c_agree_with_kl_div():
    s, _, _, _, _, _ = make_case(2, 9, 9, (4, 4))
    t = torch.randn(2, 9, 4, 4, dtype=torch.float64)
    v, i, _ = topk_targets(t, 9)
    T = 3.0
    got = topk_kl_reference(s.double(), v, i, None, temperature=T, reduction="mean")
    want = torch.nn.functional.kl_div(torch.log_softmax(s.double() / T, 1), torch.log_softmax(t / T, 1),
                                      log_target=True, reduction="none").sum(1).mean() * T * T
    assert torch.allclose(got, want)


# -- Triton (interpreter on CPU, tiny shapes) -------------------------------------------------------------

triton_only = pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")


@triton_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("C,k", [(2, 1), *(pytest.param(c, k, marks=pytest.mark.slow)  # the interpreter
                                    for c, k in [(19, 4), (19, 19), (150, 8), (300, 4)])])
@pytest.mark.parametrize("tail_policy", ["bin", "renormalize"])
def test_triton_matches_reference(C, k, tail_policy):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s, v, i, tail, ign, lab = make_case(2, C, k, (3, 5), seed=C + k, labels=C != 300)

    def to(x):
        return x.to(dev) if x is not None else None

    # the map kernel loops over the classes one at a time, which the interpreter runs at about 20 ms a class:
    # the long class loops (C of 150 and 300, ids above 255 at 300) take one reduction each, the rest both
    for reduction in ("mean", "none") if C < 150 else ("mean",) if C == 150 else ("none",):
        check("triton", *(to(x) for x in (s, v, i, tail, ign, lab)), tail_policy=tail_policy, reduction=reduction)
    s, v, i, tail, ign, _ = make_case(3, C, k, (), seed=C * k)  # rows
    check("triton", *(to(x) for x in (s, v, i, tail, ign)), tail_policy=tail_policy, reduction="sum")


@triton_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("student_dtype,index_dtype", [(torch.float16, torch.uint8), *(
    pytest.param(s, i, marks=pytest.mark.slow) for s, i in [(torch.bfloat16, torch.int64), (torch.float32, torch.int32)])])
def test_triton_dtypes_rows_with_several_class_tiles_and_all_ignored(student_dtype, index_dtype):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s, v, i, tail, ign, _ = make_case(2, 5000, 8, (), student_dtype=student_dtype, index_dtype=index_dtype
                                      if index_dtype != torch.uint8 else torch.int16)
    check("triton", s.to(dev), v.to(dev), i.to(dev), tail.to(dev), ign.to(dev))
    s, v, i, tail, ign, lab = make_case(1, 21, 4, (5, 3), student_dtype=student_dtype, index_dtype=index_dtype, labels=True)
    check("triton", s.to(dev), v.to(dev), i.to(dev), tail.to(dev), ign.to(dev), lab.to(dev))
    x = s.to(dev).requires_grad_(True)
    out = topk_kl(x, v.to(dev), i.to(dev), tail.to(dev), ignore_mask=torch.ones_like(ign).to(dev), backend="triton")
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@triton_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_eager_triton_call_keeps_its_views_for_the_backward_but_never_a_copy_of_the_student():
    """The eager path saves the [N, C, P] views its forward made for its backward (not made again), each
    a view of the tensor it came from: for NCHW and channels_last students the student's own memory. A
    student of another layout is read through a copy, which the forward does not keep: no [N, C, P]
    tensor lives between the launches beyond the student itself. Gradients match the float64 reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s, v, i, tail, ign, _ = make_case(2, 5, 2, (3, 4), seed=3)
    s, v, i, tail, ign = (x.to(dev) for x in (s, v, i, tail, ign))
    wide = torch.randn(2, 5, 3, 8, device=dev)
    layouts = {"nchw": s.clone(), "channels_last": s.contiguous(memory_format=torch.channels_last),
               "strided": wide[..., ::2].copy_(s)}  # neither pixels nor classes contiguous: read through a copy
    for name, x in layouts.items():
        x = x.detach().requires_grad_(True)
        out = topk_kl(x, v, i, tail, ignore_mask=ign, backend="triton", check_inputs=False)
        saved = out.grad_fn.saved_tensors
        big = [t for t in saved if t is not None and t.numel() == x.numel()]
        if name == "strided":
            assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), name  # the student alone, no copy
        else:
            assert len(big) == 2 and all(t.data_ptr() == x.data_ptr() for t in big), name  # the student and its view
        out.backward()
        s64 = s.double().requires_grad_(True)
        ref = topk_kl_reference(s64, v.double(), i, tail.double(), ignore_mask=ign)
        (g_ref,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(x.grad.double(), g_ref, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-6, msg=name)


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    s, v, i, tail, ign, _ = make_case(2, 11, 4, (3, 5))
    with pytest.raises(KernelInputError, match="temperature must be a positive"):
        topk_kl(s, v, i, tail, temperature=0.0)
    with pytest.raises(KernelInputError, match="teacher_values must be"):
        topk_kl(s, v[:, :, :2], i, tail)
    with pytest.raises(KernelInputError, match="shape of teacher_values"):
        topk_kl(s, v, i[:, :3], tail)
    big = make_case(1, 300, 4, (2, 2))  # ids up to 299, as a store of 300 classes holds them (uint16 -> int32)
    with pytest.raises(KernelInputError, match="uint8, which hold class ids up to 255, but the student has C = 300"):
        topk_kl(big[0], big[1], big[2].to(torch.uint8), big[3])
    assert torch.isfinite(topk_kl(*big[:4]))
    with pytest.raises(KernelInputError, match="k = 12 .* C = 11"):
        topk_kl(s, torch.zeros(2, 12, 3, 5), torch.zeros(2, 12, 3, 5, dtype=torch.int64), tail)
    bad = i.clone()
    bad[0, 0, 0, 0] = 11
    with pytest.raises(KernelInputError, match=r"class ids in \[0, 11\], outside \[0, 11\)"):
        topk_kl(s, v, bad, tail, check_inputs=True)
    with pytest.raises(KernelInputError, match="uint8, int16, int32 or int64"):
        topk_kl(s, v, i.float(), tail)
    with pytest.raises(KernelInputError, match="needs teacher_tail"):
        topk_kl(s, v, i, None)
    with pytest.raises(KernelInputError, match="ignore_mask must be bool"):
        topk_kl(s, v, i, tail, ignore_mask=ign.float())
    with pytest.raises(KernelInputError, match="reduction must be"):
        topk_kl(s, v, i, tail, reduction="batchmean")
    with pytest.raises(KernelInputError, match="student logits must be float32"):
        topk_kl(s.long(), v, i, tail)
    with pytest.raises(KernelInputError, match="float64 student logits run on the torch backend"):
        topk_kl(s.double(), v, i, tail)
    assert torch.isfinite(topk_kl(s.double(), v, i, tail, backend="torch"))


def test_bench_kernels_command_prints_the_table_and_writes_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from kdcache.cli.app import app

    out = tmp_path / "new" / "k.json"  # folders that do not exist yet are created
    md = tmp_path / "results" / "k.md"
    r = CliRunner().invoke(app, ["bench-kernels", "--device", "cpu", "--quick", "--no-compile", "--repeats", "1",
                                 "--json", str(out), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    assert "| segmentation 2×19×256×512 | 4 |" in r.output and "× eager" in r.output and "copy bandwidth" in r.output
    data = json.loads(out.read_text())
    assert data["scaled_down"] and data["copy_gbps"] > 0
    case = data["cases"][0]
    assert set(case["ms"]) == {"fused", "eager"} and case["floor_bytes"] == 2 * 2 * 19 * 256 * 512 * 4 + 2 * 256 * 512 * (4 * 3 + 2)
    # its first line says kdcache wrote it (so a rerun may replace it: kdcache/core/outputs.py), then the table
    assert md.read_text().splitlines()[:2] == [markdown_signature("bench-kernels").strip(), "# bench-kernels"]
    r = CliRunner().invoke(app, ["bench-kernels", "--device", "cpu", "--dtype", "float8"])
    assert r.exit_code == 2 and "--dtype must be" in r.output
    # a folder given as the file, or a folder that cannot be made: one line, before the benchmark runs
    (tmp_path / "plain").write_text("")
    for option, path, message in (("--json", tmp_path, "is a folder; give a file name"),
                                  ("--markdown", tmp_path / "plain" / "k.md", "cannot create the folder")):
        r = CliRunner().invoke(app, ["bench-kernels", "--device", "cpu", option, str(path)])
        assert r.exit_code == 2 and r.output.startswith("error: ") and message in r.output, r.output


def test_kernel_table_of_a_cuda_run_shows_device_times_the_idle_call_and_the_host():
    """A CUDA run's table (made up here: the CPU has no GPU): the device times lead every ratio, the
    fused call from an idle GPU and the host's time to queue it stand beside them, and a case whose host
    outran the spin says so."""
    from kdcache.cli.report import kernel_table

    case = {"kind": "segmentation", "shape": [8, 19, 512, 1024], "k": 4, "dtype": "bfloat16",
            "floor_bytes": 377_500_000, "moved_bytes": 662_700_000,
            "ms": {"fused": 0.5, "fused_fwd": 0.3, "fused_bwd": 0.2, "fused_call": 0.9, "eager": 3.5, "compile": 2.0},
            "host_ms": {"fused": 0.25, "eager": 0.4, "compile": 0.6}, "errors": {},
            "notes": ["the host took longer than the 10 ms spin to queue compile: part of its time is in the device time"]}
    case["gbps"] = {b: (case["moved_bytes"] if b == "fused" else case["floor_bytes"]) / (ms * 1e-3) / 1e9
                    for b, ms in case["ms"].items()}
    table = kernel_table({"device": "NVIDIA H200", "dtype": "bfloat16", "copy_gbps": 3800.0, "scaled_down": False,
                          "cases": [case]})
    assert "| fused ms | fused one call ms | fused host ms | eager ms |" in table
    # 662.7 MB in 0.5 ms at 3800 GB/s: 35%; compile 2.0 / 0.5: 4.00 (the device times, not the idle call)
    assert "| segmentation 8×19×512×1024 | 4 | 377.5 | 662.7 | 0.30 | 0.20 | 0.50 | 0.90 | 0.25 | 3.50 | 2.00 | 35% |" in table
    assert "| 7.00 | 4.00 |" in table and "queued behind a GPU spin" in table
    assert "Notes: 8×19×512×1024 k=4: the host took longer than the 10 ms spin" in table
    cpu = kernel_table({"device": "cpu", "dtype": "float32", "copy_gbps": 20.0, "scaled_down": True,
                        "cases": [{**case, "ms": {"fused": 1.0, "eager": 2.0}, "moved_bytes": 377_500_000,
                                   "host_ms": {}, "notes": [], "gbps": {"fused": 377.5}}]})
    assert "one call" not in cpu and "spin" not in cpu and "Notes" not in cpu


@pytest.mark.slow  # compiles every Numba kernel
def test_compile_numba_leaves_every_kernel_in_numbas_disk_cache():
    """``compile_numba`` (which CI runs before the tests) compiles the two loss kernels and the
    bilinear resampling or loads them; the next process finds all three in Numba's on-disk cache
    and compiles nothing."""
    from kdcache.kernels.api import compile_numba

    compile_numba()  # here: compiled, or loaded from the disk cache, and written there if compiled
    code = "import json; from kdcache.kernels.api import compile_numba; print(json.dumps(compile_numba()))"
    after = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                       .stdout.splitlines()[-1])
    assert after == {"spatial": "cached", "rows": "cached", "resample": "cached"}, after
    with pytest.raises(KernelInputError, match="compile_numba takes kernels spatial, rows, resample, got dense"):
        compile_numba(("rows", "dense"))


def test_each_numba_loss_kernel_compiles_one_signature_for_every_reduction():
    """A summed loss and a per-position map go through one compiled signature of each loss kernel (the
    spatial kernel's loss is flat either way), so a first run compiles it once, not twice."""
    from kdcache.kernels.api import compile_numba
    from kdcache.kernels.numba_kl import kl_rows, kl_spatial

    compile_numba(("spatial", "rows"))  # a summed loss and a map each
    assert len(kl_spatial.signatures) == 1 and len(kl_rows.signatures) == 1, (kl_spatial.signatures,
                                                                              kl_rows.signatures)


@pytest.mark.slow  # a new Python process
def test_the_numba_kernel_keeps_torchs_thread_budget():
    """A process limited to one thread (OMP_NUM_THREADS=1, as each torchrun process on a CPU is)
    stays at one after a Numba loss, and the kernel runs on that budget: Numba's OpenMP layer used
    to set the process's threads, torch's too, to every core, so a run's arithmetic changed under it
    after its first step. With two threads, the kernel takes two. (30 classes: ``kl_spatial``, which
    CI compiles before the tests, not a kernel generated for the classes on its first use; the
    budget is kept around either.)"""
    code = """
import json, torch, numba
from kdcache.kernels import topk_kl
from kdcache.kernels.api import COLUMN_MAX_CLASSES
assert COLUMN_MAX_CLASSES < 30
s = torch.randn(2, 30, 16, 16)
v, i = torch.randn(2, 30, 16, 16).topk(4, 1)
seen = [torch.get_num_threads()]
topk_kl(s, v, i, None, tail="renormalize", backend="numba")
seen += [torch.get_num_threads(), numba.get_num_threads()]
torch.set_num_threads(2)
topk_kl(s, v, i, None, tail="renormalize", backend="numba")
seen += [torch.get_num_threads(), numba.get_num_threads()]
print(json.dumps(seen))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == [1, 1, 1, 2, 2]


def test_triton_36_interpreter_with_numpy_24_is_one_line():
    """Triton 3.6's interpreter fails on runtime-bounded loops with numpy >= 2.4 (seen: 3.6 + numpy
    2.4.6 fails, 3.6 + 2.2.6 / 2.3.5 and 3.9 + 2.4.6 run): the check says so before any launch."""
    from kdcache.kernels.api import check_interpreter

    with pytest.raises(KernelInputError, match=r"numpy<2.4"):
        check_interpreter("3.6.0", "2.4.6")
    check_interpreter("3.6.0", "2.3.5")
    check_interpreter("3.9.0", "2.4.6")
    check_interpreter("3.10.1", "2.5.0")
