"""The CPU production path: Numba kernels that compute the loss and its gradient in one call.

Math per position (the loss contract of docs/design.md), arranged so that each student logit costs one
exponential:

1. m = max_c s_c; e_c = exp((s_c − m)/T), kept, and S = Σ_c e_c; log Σ exp(s/T) = m/T + log S.
2. The teacher's k (+1 tail) bins: log_softmax of [v / T, a_tail].
3. The student's tail mass is the sum of e_c over the classes *outside* the top k, never
   1 − Σ_K q, which cancels when the student is confident. If every tail term underflows, an
   exact float64 log-sum-exp over the tail is used instead.
4. The gradient: q_c = e_c / S; T·(q_c − p_c) inside the top k, T·(q_c − p_tail·e_c/S_tail)
   outside, times the reduction scale; plus ce_scale·(softmax(s)_c − [c = y]) with labels.

Two kernels of the same math. :func:`kl_spatial` (maps: NCHW read in place) works in float32 on
blocks of contiguous pixels, with every inner loop running along pixels so that LLVM vectorises
it (8 lanes on AVX2, 4 on NEON/SSE); its exponential and logarithm are polynomials with the power
of two put into the exponent bits (:func:`exp2_32`, :func:`log32`), because LLVM cannot vectorise
calls to libm. The teacher's probabilities go into a class-major block by vector compares of each
class with the k ids up to :data:`DENSE_MAX_CLASSES` classes, above it by one scalar store per
top-k entry (the only access by class id).
:func:`kl_rows` (rows [N, C] and maps of few positions) takes one position at a time with the
classes innermost, in the same float32 arithmetic vectorised along the classes (the teacher's k
bins and the per-id steps scalar, in float64). benchmarks/results/kernels-cpu.md has the speeds,
and benchmarks/numba_vectorised.py shows what LLVM vectorised.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

_LOG2E = 1.4426950408889634


def _bitcast(src, dst, ir_type):
    """An intrinsic reinterpreting a ``src`` value's bits as ``dst`` (``ir_type`` in LLVM)."""
    @intrinsic
    def cast(typingctx, x):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir_type)

        return dst(src), codegen

    return cast


_f32_as_int = _bitcast(types.float32, types.int32, ir.IntType(32))
_int_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())


# -- the spatial kernel: float32, pixels innermost -----------------------------------------------------
#
# Every loop over a block's pixels is written so that LLVM vectorises it: straight-line float32
# arithmetic, ``llvm.maxnum`` for maxima and ``select`` for choices (a Python ``max`` or a
# conditional expression that may store the old value becomes a masked store, slow on AMD), 1-D
# slices, no per-element branches, no division checks (``error_model="numpy"``), and the classes
# unrolled by four so that the per-pixel sums are loaded and stored once per four classes.

_F = np.float32
_F0, _F1, _FHALF = _F(0.0), _F(1.0), _F(0.5)
_F_LOG2E = _F(1.4426950408889634)
_F_LN2 = _F(0.6931471805599453)
_F_TAIL_MIN = _F(1e-30)  # a student tail sum below this takes the exact (float64) fallback
_F_SQRT2 = _F(1.4142135623730951)
_F_NEG_INF = _F(-np.inf)


@intrinsic
def _f32_ldexp(typingctx, p, n):  # pragma: no cover - compiled
    """p · 2**n for float32 p and a whole float32 n whose result is a normal number: n is added to
    the exponent bits (vectorises, unlike a call)."""
    sig = types.float32(types.float32, types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        shifted = builder.shl(builder.fptosi(args[1], i32), ir.Constant(i32, 23))
        return builder.bitcast(builder.add(builder.bitcast(args[0], i32), shifted), ir.FloatType())

    return sig, codegen


@intrinsic
def _fmax(typingctx, a, b):  # pragma: no cover - compiled
    """``llvm.maxnum`` (vmaxps), never a branch or a masked store."""
    sig = a(a, a)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _fmax_reduce(typingctx, a, b):  # pragma: no cover - compiled
    """``llvm.maxnum`` with the ``nnan nsz`` flags, which LLVM needs to run a loop's running maximum
    on vectors (without them it stays one scalar at a time). maxnum already returns the other
    operand of a NaN, so the flag changes no result: a NaN logit still turns the sums it enters
    into NaN."""
    sig = a(a, a)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return sig, codegen


@intrinsic
def _select(typingctx, cond, a, b):  # pragma: no cover - compiled
    """cond ? a : b as one LLVM select of two values already computed."""
    sig = a(types.boolean, a, a)

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return sig, codegen


#: the vector width LLVM's loop vectoriser may use in the spatial kernel, in bits: LLVM's own choice for the
#: CPUs with AVX-512 since Skylake-X is 256 (the ``prefer-256-bit`` tuning, against the clock drop of
#: 512-bit instructions on the first of them); the kernels' inner loops are long float32 loops along
#: pixels or classes, which 512 bits run in half the instructions. Side by side on an Emerald Rapids
#: Xeon (benchmarks/results/numba-vector-width-cpu.md) 512 bits took 0.87-1.05x the time of 256 on
#: bench-kernels' CPU maps (the maps of 11 and 19 classes gain most, 150 classes at k = 4 lose 5%), a
#: small gain: the maps kernel is not bound by its vector arithmetic alone. The rows
#: kernel stays at LLVM's choice (see :func:`_row`). A CPU without AVX-512 vectorises at its own
#: widest (AVX2: 256), whatever this says
VECTOR_WIDTH = 512


@intrinsic
def _prefer_vector_width(typingctx):  # pragma: no cover - compiled
    """Marks the function it is called in with LLVM's ``prefer-vector-width`` attribute
    (:data:`VECTOR_WIDTH`), as clang's ``-mprefer-vector-width`` does; no instruction of its own.
    llvmlite's attribute set knows only flag attributes, so the string attribute is put in as
    ``set.add`` would (it prints as written)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, f'"prefer-vector-width"="{VECTOR_WIDTH}"')
        return context.get_dummy_value()

    return sig, codegen


#: the spatial kernel's scratch buffers start at a 64-byte address, a cache line: Numba's arrays start at 32
#: bytes, where a 512-bit load or store that crosses two lines every time is slower (see
#: benchmarks/results/numba-aligned-scratch-cpu.md for the measured difference)
SCRATCH_ALIGN = 64


@intrinsic
def _address(typingctx, a):  # pragma: no cover - compiled
    """The address of an array's first element, as an integer."""
    sig = types.int64(a)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return sig, codegen


@njit(inline="always", cache=True)
def _scratch(n):  # pragma: no cover - compiled
    """An uninitialised float32 array of ``n`` whose first element is at a multiple of
    :data:`SCRATCH_ALIGN` bytes (a view into a slightly larger allocation)."""
    raw = np.empty(n + SCRATCH_ALIGN // 4, _F)
    off = ((SCRATCH_ALIGN - _address(raw) % SCRATCH_ALIGN) % SCRATCH_ALIGN) // 4
    return raw[off:off + n]


def _to_f32(x):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@intrinsic
def _half_bits_to_f32(typingctx, h):  # pragma: no cover - compiled
    """The float16 whose bits an int16 holds, as float32, exactly, in 32-bit integer operations (16 lanes
    to a 512-bit vector; Numba's own integer arithmetic widens int16 to int64, 8 lanes): the magnitude's
    bits shifted into float32 position and scaled by 2**112 (normal and subnormal halves), inf and NaN
    rebuilt, the sign put back."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        x = builder.zext(args[0], i32)
        mag = builder.shl(builder.and_(x, ir.Constant(i32, 0x7FFF)), ir.Constant(i32, 13))
        f = builder.fmul(builder.bitcast(mag, f32), ir.Constant(f32, 2.0 ** 112))
        special = builder.icmp_signed(">=", mag, ir.Constant(i32, 0x0F800000))
        bits = builder.select(special, builder.or_(mag, ir.Constant(i32, 0x7F800000)), builder.bitcast(f, i32))
        sign = builder.shl(builder.and_(x, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        return builder.bitcast(builder.or_(bits, sign), f32)

    return sig, codegen


@overload(_to_f32, inline="always")
def _to_f32_impl(x):  # pragma: no cover - compiled
    """A teacher value as float32: float32 as is; int16 (the only integer the kernels pass) holds the bits
    of a float16 (Numba has no float16 on the CPU), widened exactly by :func:`_half_bits_to_f32`."""
    if isinstance(x, types.Integer):
        return lambda x: _half_bits_to_f32(x)
    return lambda x: np.float32(x)


@njit(inline="always", cache=True)
def _rows4(a, start, stride, L):  # pragma: no cover - compiled
    """Four rows of ``L`` values ``stride`` apart from ``start`` of the flat array ``a`` (views)."""
    return (a[start:start + L], a[start + stride:start + stride + L], a[start + 2 * stride:start + 2 * stride + L],
            a[start + 3 * stride:start + 3 * stride + L])


@njit(inline="always", cache=True, fastmath={"reassoc", "nsz", "contract"})
def exp2_32(y):  # pragma: no cover - compiled
    """2**y in float32 for y <= 0 (clamped at -125: 2.4e-38, still a normal number): n = round(y),
    2**(y - n) on [-1/2, 1/2] by a degree-5 near-minimax polynomial (relative error 2.3e-7 as
    evaluated in float32, about 2 ulp; degree 6 halves that at more kernel time), 2**n put
    into the exponent bits. Callers fold log2(e) into their scale factors."""
    y = _fmax(y, _F(-125.0))
    n = np.floor(y + _FHALF)
    f = y - n
    p = _F(0.001327647129073739)
    p = p * f + _F(0.009675540961325169)
    p = p * f + _F(0.05550713092088699)
    p = p * f + _F(0.24022120237350464)
    p = p * f + _F(0.6931469440460205)
    p = p * f + _F(1.0000001192092896)
    return _f32_ldexp(p, n)


@njit(inline="always", cache=True, fastmath={"reassoc", "nsz", "contract"})
def exp32(x):  # pragma: no cover - compiled
    """exp(x) in float32 for x <= 0 (2 ulp near 0, plus |x| · 1.4 · 2**-24 from rounding x · log2(e);
    2.4e-38 below -86.6)."""
    return exp2_32(x * _F_LOG2E)


@njit(inline="always", cache=True, fastmath={"reassoc", "nsz", "contract"})
def log32(x):  # pragma: no cover - compiled
    """log(x) in float32 for a normal x > 0: the exponent from the bits, the mantissa folded into
    [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)) by its series to t^9 (error < 1e-9)."""
    bits = _f32_as_int(x)
    e = _F((bits >> np.int32(23)) - np.int32(127))
    m = _int_as_f32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F800000))
    big = m > _F_SQRT2
    m = _select(big, m * _FHALF, m)
    e = _select(big, e + _F1, e)
    t = (m - _F1) / (m + _F1)
    t2 = t * t
    poly = t * (_F(2.0) + t2 * (_F(2.0 / 3) + t2 * (_F(2.0 / 5) + t2 * (_F(2.0 / 7) + t2 * _F(2.0 / 9)))))
    return e * _F_LN2 + poly


def block_pixels(C: int) -> int:
    """Pixels per task of :func:`kl_spatial`: 512, fewer for more than 256 classes so that the block's
    three class-major float32 buffers (logits, exponentials, teacher probabilities) stay near 1.5 MB;
    a multiple of 16, at least 64. Chosen side by side on a 2-core CPU: 512 over 256 at 19 and 150
    classes, and 64-128 pixels over 16 at 1000 classes."""
    return int(max(64, min(512, (131072 // max(C, 1)) // 16 * 16)))


@njit(parallel=True, cache=True, nogil=True)
def kl_spatial(s, v, idx, tail, k, half, ids8, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale,
               ce_scale, grad, loss, per_position, block, threads):  # pragma: no cover - compiled
    """[N, C, P] float32 with P contiguous, in tasks of ``block`` pixels of one sample.

    The teacher comes as raw bytes so that one compiled variant takes every input: ``v`` (values
    [N, k, P]) and ``tail`` ([N, P]) are fp16 (``half``) or fp32, ``idx`` ([N, k, P]) uint8
    (``ids8``) or int32, each a flat uint8 view.

    Per task: (teacher) its k (+ 1) bins, vectorised along pixels, and its part of the KL,
    Σ_K p log p; the top-k probabilities, negated, into a class-major block ``pd`` that is zero
    elsewhere, so a negative entry marks a top-k class: up to :data:`DENSE_MAX_CLASSES` classes each
    row built along pixels by comparing the class with the k ids (vector compares and selects, no
    store by id), above it stored by id into zeros (scalar, the per-id step) and put back to zeros
    once the gradient is written. (A) The student's block copied in contiguously (the map's class rows lie P apart, a
    stride that puts a block's rows into the same cache sets) and its raw maximum m. (B)
    e = exp((s − m)/T), Σe, the tail sum Σ_{c∉K} e (a sum, never 1 − Σ_K q) and Σ_K p (s − m), which
    give the student's part of the KL. (C) The gradient of every class in one vectorised pass,
    written straight to ``grad``: e (kd + ce)/Σe − kd p, minus kd (p_tail / Σ_tail e) e outside
    the top k (the cross-entropy's softmax at T = 1 when T ≠ 1).
    Positions whose whole student tail underflows (sum < 1e-30) take an exact float64 fallback.
    ``loss`` (flat, float64) is the [N, P] map when ``per_position``, else one partial sum per task
    (N × ceil(P / block)). ``threads``: how many Numba threads share the tasks.
    """
    N, P = s.shape[0], s.shape[2]
    ntask = N * ((P + block - 1) // block)
    nchunk = min(ntask, 4 * threads)  # numba.get_num_threads() in here would stop caching
    # the parallel loop stays small: Numba's parfor passes are slow on big bodies. Even so, this wrapper
    # takes about 17 s of a first compile (LLVM optimises the linked task body again); Python threads
    # running _spatial_tasks (nogil) would skip that, but on threads of their own they met torch's
    # OpenMP threads still spinning after its last op and ran 0.57-0.93x as fast (2-core Xeon, side
    # by side; the same speed under OMP_WAIT_POLICY=PASSIVE), where a prange runs on that OpenMP pool
    for chunk in prange(nchunk):
        _spatial_tasks(s, v, idx, tail, k, half, ids8, ign, lab, T, with_tail, use_ign, use_lab, ignore_index,
                       kd_scale, ce_scale, grad, loss, per_position, block, chunk * ntask // nchunk,
                       (chunk + 1) * ntask // nchunk)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _spatial_tasks(s, v, idx, tail, k, half, ids8, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale,
                   ce_scale, grad, loss, per_position, block, first, last):  # pragma: no cover - compiled
    """Tasks [first, last) of :func:`kl_spatial` (one thread's share), scratch allocated once."""
    _prefer_vector_width()
    N, C, P = s.shape
    inv_t = _F(1.0 / T)
    inv_t2 = _F(1.4426950408889634 / T)  # exp(x / T) = 2 ** (x · log2(e) / T)
    inv_t64 = 1.0 / T
    log_rest = _F(math.log(C - k) if C > k else 0.0)
    sep_ce = use_lab and T != 1.0
    nb = (P + block - 1) // block
    s1, g1 = s.ravel(), grad.ravel()
    ig1, lb1, out1 = ign.ravel(), lab.ravel(), loss.ravel()
    kd_t = _F(kd_scale * T)
    kd_tt = _F(kd_scale * T * T)
    ce_s = _F(ce_scale)
    # scratch, once per chunk of consecutive tasks
    xb = _scratch(C * block)  # the block's logits, class-major
    eb = _scratch(C * block)  # e = exp((x − m) / T)
    pd = _scratch(C * block)  # −p at the top-k classes, 0 elsewhere (rebuilt for each task)
    m = _scratch(block)
    acc = _scratch(block)  # Σ e, then 1 / Σ e
    acc1 = _scratch(block)  # Σ exp(x − m) at T = 1 for a separate cross-entropy, then 1 / it
    st = _scratch(block)  # Σ_tail e, then kd × the tail coefficient p_tail / Σ_tail e
    px = _scratch(block)  # −Σ_K p (x − m)
    ps = _scratch(block)  # Σ_K p
    lacc = _scratch(block)
    coef = _scratch(block)
    kdw = _scratch(block)
    cew = _scratch(block)
    lz = _scratch(block)  # the teacher's maximum a*, then log Z
    zt = _scratch(block)  # Z = Σ exp(a − a*), then 1 / Z
    ez = _scratch(block)  # Σ_K exp(a − a*) (a − a*)
    a_t = _scratch(block)  # the tail bin's logit, then its log probability
    e_t = _scratch(block)
    kl = _scratch(block)
    tk = _scratch(k * block)  # the teacher's top-k logits / T, then exp(those − a*)
    kq = (k + 3) // 4 * 4 if C <= DENSE_MAX_CLASSES else 0  # the dense build's ids and −p, k padded to fours
    ib = _scratch(kq * block).view(np.int32)
    pk = _scratch(kq * block)
    pd[:] = _F0  # the scattered block's zeros (a task puts back those it overwrote)
    exact = np.empty(block, np.int64)
    topk = np.empty((block, C), np.bool_)  # per fallback position: which classes are its top k
    for task in range(first, last):
        n = task // nb
        p0 = (task - n * nb) * block
        L = min(block, P - p0)
        sb = n * C * P + p0  # class c of this block starts at s1[sb + c * P]
        pb = n * P + p0  # its positions are [pb, pb + L) of the [N, P] arrays
        for j in range(L):
            m[j] = _F_NEG_INF
            acc[j] = _F0
            acc1[j] = _F0
            st[j] = _F0
            px[j] = _F0
            ez[j] = _F0
            kdw[j] = kd_t
            cew[j] = _F0
            zt[j] = _F0
            lz[j] = _F_NEG_INF
        if use_ign:
            gs = ig1[pb:pb + L]
            for j in range(L):
                kdw[j] = _select(gs[j], _F0, kd_t)
        if use_lab:
            ls = lb1[pb:pb + L]
            for j in range(L):
                cew[j] = _select(ls[j] == ignore_index, _F0, ce_s)
        # the teacher's bins: logits a / T, their maximum a*, Z, log Z and Σ_K p log p
        if half:  # fp16 values and tail, as their int16 bits
            _teacher_logits(v.view(np.int16), tail.view(np.int16), tk, a_t, lz, n, k, P, p0, L, block, inv_t,
                            log_rest, with_tail)
        else:
            _teacher_logits(v.view(np.float32), tail.view(np.float32), tk, a_t, lz, n, k, P, p0, L, block, inv_t,
                            log_rest, with_tail)
        if with_tail:
            for j in range(L):
                a = exp32(a_t[j] - lz[j])
                e_t[j] = a
                zt[j] = a
        for jj in range(k):
            tj = tk[jj * block:jj * block + L]
            for j in range(L):
                d = tj[j] - lz[j]
                a = exp32(d)
                tj[j] = a
                zt[j] += a
                ez[j] += a * d
        for j in range(L):
            lzp = log32(zt[j])  # log Z − a*
            iz = _F1 / zt[j]
            on = kdw[j] != _F0
            ps[j] = _select(on, _select(with_tail, zt[j] - e_t[j], zt[j]) * iz, _F0)
            kl[j] = _select(on, ez[j] * iz - lzp * ps[j], _F0)  # Σ_K p log p (0 where ignored:
            zt[j] = _select(on, iz, _F0)  # ignored positions may hold NaN targets)
            a_t[j] = a_t[j] - lz[j] - lzp  # the tail bin's log probability
            lz[j] = lz[j] + lzp
        # −p into the class-major block at each top-k id, 0 elsewhere: built along pixels by compares up to
        # DENSE_MAX_CLASSES classes, else stored by id into the zeros left by the task before (the per-id steps)
        dense = C <= DENSE_MAX_CLASSES
        if dense and ids8:
            _dense_probs(idx, pd, ib, pk, tk, zt, kdw, n, k, C, P, p0, L, block)
        elif dense:
            _dense_probs(idx.view(np.int32), pd, ib, pk, tk, zt, kdw, n, k, C, P, p0, L, block)
        elif ids8:
            _scatter_probs(idx, pd, tk, zt, kdw, n, k, C, P, p0, L, block, False)
        else:
            _scatter_probs(idx.view(np.int32), pd, tk, zt, kdw, n, k, C, P, p0, L, block, False)
        # (A) copy in, the maximum
        c4 = C - C % 4
        for c in range(0, c4, 4):
            r0, r1, r2, r3 = _rows4(s1, sb + c * P, P, L)
            w0, w1, w2, w3 = _rows4(xb, c * block, block, L)
            for j in range(L):
                a0 = r0[j]
                a1 = r1[j]
                a2 = r2[j]
                a3 = r3[j]
                w0[j] = a0
                w1[j] = a1
                w2[j] = a2
                w3[j] = a3
                m[j] = _fmax(m[j], _fmax(_fmax(a0, a1), _fmax(a2, a3)))
        for c in range(c4, C):
            src = s1[sb + c * P:sb + c * P + L]
            xc = xb[c * block:c * block + L]
            for j in range(L):
                x = src[j]
                xc[j] = x
                m[j] = _fmax(m[j], x)
        # (B) e, Σ e, the tail sum, Σ_K p (x − m) (and Σ exp(x − m) for a separate cross-entropy)
        for c in range(0, c4, 4):
            w0, w1, w2, w3 = _rows4(xb, c * block, block, L)
            f0, f1, f2, f3 = _rows4(eb, c * block, block, L)
            q0, q1, q2, q3 = _rows4(pd, c * block, block, L)
            for j in range(L):
                mj = m[j]
                d0 = w0[j] - mj
                d1 = w1[j] - mj
                d2 = w2[j] - mj
                d3 = w3[j] - mj
                e0 = exp2_32(d0 * inv_t2)
                e1 = exp2_32(d1 * inv_t2)
                e2 = exp2_32(d2 * inv_t2)
                e3 = exp2_32(d3 * inv_t2)
                f0[j] = e0
                f1[j] = e1
                f2[j] = e2
                f3[j] = e3
                p0_ = q0[j]
                p1_ = q1[j]
                p2_ = q2[j]
                p3_ = q3[j]
                acc[j] += (e0 + e1) + (e2 + e3)
                st[j] += ((_select(p0_ < _F0, _F0, e0) + _select(p1_ < _F0, _F0, e1))
                          + (_select(p2_ < _F0, _F0, e2) + _select(p3_ < _F0, _F0, e3)))
                px[j] += (p0_ * d0 + p1_ * d1) + (p2_ * d2 + p3_ * d3)
        for c in range(C):
            xc = xb[c * block:c * block + L]
            if c >= c4:
                ec = eb[c * block:c * block + L]
                dc = pd[c * block:c * block + L]
                for j in range(L):
                    d = xc[j] - m[j]
                    e = exp2_32(d * inv_t2)
                    ec[j] = e
                    acc[j] += e
                    st[j] += _select(dc[j] < _F0, _F0, e)
                    px[j] += dc[j] * d
            if sep_ce:
                for j in range(L):
                    acc1[j] += exp32(xc[j] - m[j])
        # the student's part of the KL, − Σ_K p log q = − Σ_K p (x − m) / T + Σ_K p log Σe; the tail bin,
        # p_tail (log p_tail − log q_tail) with q_tail = Σ_tail e / Σ e; the gradient's coefficients
        # (a loop-invariant test inside a loop becomes masked loads and stores: branch outside)
        for j in range(L):
            la = log32(acc[j])
            lacc[j] = la
            acc[j] = _F1 / acc[j]
            kl[j] += ps[j] * la + px[j] * inv_t
        n_bad = _F0
        if with_tail:
            for j in range(L):
                on = kdw[j] != _F0
                pt = e_t[j] * zt[j]
                ok = st[j] > _F_TAIL_MIN
                sts = _select(ok, st[j], _F1)
                kl[j] += _select(ok, pt * (a_t[j] - (log32(sts) - lacc[j])), _F0)
                st[j] = _select(ok & on, kdw[j] * pt / sts, _F0)
                e_t[j] = _select(on & (not ok), _F1, _F0)  # needs the exact fallback
                n_bad += e_t[j]
        else:
            for j in range(L):
                st[j] = _F0
        for j in range(L):
            kl[j] = _select(kdw[j] != _F0, kd_tt * kl[j], _F0)
        n_exact = 0
        if n_bad > _F0:  # (which classes are the top k: pd < 0, read before pass C zeroes it)
            for j in range(L):
                if e_t[j] != _F0:
                    exact[n_exact] = j
                    for c in range(C):
                        topk[n_exact, c] = pd[c * block + j] < _F0
                    n_exact += 1
        # (C) the gradient, written out
        if sep_ce:
            for j in range(L):
                acc1[j] = _F1 / acc1[j]
            for c in range(C):
                xc = xb[c * block:c * block + L]
                ec = eb[c * block:c * block + L]
                dc = pd[c * block:c * block + L]
                dst = g1[sb + c * P:sb + c * P + L]
                for j in range(L):
                    e = ec[j]
                    d = dc[j]
                    dst[j] = (kdw[j] * (e * acc[j] + d) - _select(d < _F0, _F0, st[j] * e)
                              + cew[j] * exp32(xc[j] - m[j]) * acc1[j])
        else:
            for j in range(L):
                coef[j] = (kdw[j] + cew[j]) * acc[j]
            for c in range(0, c4, 4):
                f0, f1, f2, f3 = _rows4(eb, c * block, block, L)
                q0, q1, q2, q3 = _rows4(pd, c * block, block, L)
                o0, o1, o2, o3 = _rows4(g1, sb + c * P, P, L)
                for j in range(L):
                    cf = coef[j]
                    tcj = st[j]
                    kw = kdw[j]
                    p0_ = q0[j]
                    p1_ = q1[j]
                    p2_ = q2[j]
                    p3_ = q3[j]
                    o0[j] = (cf - _select(p0_ < _F0, _F0, tcj)) * f0[j] + kw * p0_
                    o1[j] = (cf - _select(p1_ < _F0, _F0, tcj)) * f1[j] + kw * p1_
                    o2[j] = (cf - _select(p2_ < _F0, _F0, tcj)) * f2[j] + kw * p2_
                    o3[j] = (cf - _select(p3_ < _F0, _F0, tcj)) * f3[j] + kw * p3_
            for c in range(c4, C):
                ec = eb[c * block:c * block + L]
                dc = pd[c * block:c * block + L]
                dst = g1[sb + c * P:sb + c * P + L]
                for j in range(L):
                    e = ec[j]
                    d = dc[j]
                    dst[j] = (coef[j] - _select(d < _F0, _F0, st[j])) * e + kdw[j] * d
        if not dense:  # the block back to zeros at the k ids
            if ids8:
                _scatter_probs(idx, pd, tk, zt, kdw, n, k, C, P, p0, L, block, True)
            else:
                _scatter_probs(idx.view(np.int32), pd, tk, zt, kdw, n, k, C, P, p0, L, block, True)
        # positions whose student tail underflowed: log-sum-exp over the tail classes in float64
        for q_ in range(n_exact):
            j = exact[q_]
            mt = -np.inf
            for c in range(C):
                if not topk[q_, c]:
                    mt = max(mt, np.float64(xb[c * block + j]) * inv_t64)
            sm = 0.0
            for c in range(C):
                if not topk[q_, c]:
                    sm += math.exp(np.float64(xb[c * block + j]) * inv_t64 - mt)
            l_tail = mt + math.log(sm)
            lse = np.float64(m[j]) * inv_t64 + np.float64(lacc[j])
            lpt = np.float64(a_t[j])
            pt = math.exp(lpt)
            kl[j] += _F(np.float64(kd_tt) * pt * (lpt - (l_tail - lse)))
            w = np.float64(kdw[j]) * pt
            for c in range(C):
                if not topk[q_, c]:
                    x = np.float64(xb[c * block + j])
                    g1[sb + c * P + j] -= _F(w * math.exp(x * inv_t64 - l_tail))
        # the cross-entropy at T = 1 at labelled positions
        if use_lab:
            ls = lb1[pb:pb + L]
            for j in range(L):
                if cew[j] != _F0:
                    o = _slot(ls[j], C, block, j)
                    g1[np.uint64(sb) + _slot(ls[j], C, P, j)] -= cew[j]
                    lse1 = m[j] + (-log32(acc1[j]) if sep_ce else lacc[j])  # acc1 holds 1 / Σ e at T = 1
                    kl[j] += cew[j] * (lse1 - xb[o])
        if per_position:
            for j in range(L):
                out1[pb + j] = kl[j]
        else:
            tot = 0.0
            for j in range(L):
                tot += np.float64(kl[j])
            out1[task] = tot


@njit(inline="always", cache=True)
def _slot(c, C, block, j):  # pragma: no cover - compiled
    """The offset of (class c, pixel j) in a class-major block buffer, as an unsigned integer (no
    negative-index wraparound code in the scalar loops); c clamped into [0, C) for memory safety
    only (ids are checked by the caller, ``check_inputs``)."""
    cc = np.uint64(min(max(np.int64(c), 0), C - 1))
    return cc * np.uint64(block) + np.uint64(j)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _teacher_logits(v1, t1, tk, a_t, lz, n, k, P, p0, L, block, inv_t, log_rest, with_tail):  # pragma: no cover
    """The teacher's bins of a block, / T, as float32 (``tk`` [k, block], the tail bin's logit ``a_t``)
    and their maximum (``lz``) from flat values [N, k, P] and tail [N, P] of either dtype."""
    _prefer_vector_width()
    if with_tail:
        ts = t1[n * P + p0:n * P + p0 + L]
        for j in range(L):
            a = log_rest + (_to_f32(ts[j]) - log_rest) * inv_t
            a_t[j] = a
            lz[j] = a
    for jj in range(k):
        vs = v1[(n * k + jj) * P + p0:(n * k + jj) * P + p0 + L]
        tj = tk[jj * block:jj * block + L]
        for j in range(L):
            a = _to_f32(vs[j]) * inv_t
            tj[j] = a
            lz[j] = _fmax(lz[j], a)


#: up to this many classes the spatial kernel builds its block of the teacher's probabilities by comparing
#: each class with the k ids along pixels (C × k/4 vector passes of four compares and selects), above it by
#: storing each of a pixel's k probabilities at its id into a block of zeros, and zeros there again once the
#: gradient is written (2k scalar stores a pixel, whose cost does not grow with C). benchmarks/results/numba-dense-probs-cpu.md compares the two
DENSE_MAX_CLASSES = 32


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _dense_probs(i1, pd, ib, pk, tk, zt, kdw, n, k, C, P, p0, L, block):  # pragma: no cover - compiled
    """−p (the teacher's probability, ``tk`` × 1/Z; 0 where ignored) at each top-k id of flat ids
    [N, k, P] of either integer dtype, 0 at the other classes, into every row of the class-major
    block ``pd``, by compares along pixels: the ids widened to int32 and the −p into ``ib`` and ``pk``
    ([k rounded up to a multiple of 4, block], the padding ids −1, which no class matches), then four
    class rows at a time from four ids at a time. A pixel's ids are distinct, so at most one matches."""
    _prefer_vector_width()
    kq = (k + 3) // 4 * 4
    for jj in range(kq):
        di = ib[jj * block:jj * block + L]
        dp = pk[jj * block:jj * block + L]
        if jj < k:
            ids = i1[(n * k + jj) * P + p0:(n * k + jj) * P + p0 + L]
            tj = tk[jj * block:jj * block + L]
            for j in range(L):
                di[j] = np.int32(ids[j])
                dp[j] = -_select(kdw[j] != _F0, tj[j] * zt[j], _F0)
        else:
            for j in range(L):
                di[j] = np.int32(-1)
                dp[j] = _F0
    c4 = C - C % 4
    for c in range(0, c4, 4):  # four class rows from one load of four ids and their −p
        r0, r1, r2, r3 = _rows4(pd, c * block, block, L)
        c0, c1, c2, c3 = np.int32(c), np.int32(c + 1), np.int32(c + 2), np.int32(c + 3)
        for g in range(0, kq, 4):
            a0, a1, a2, a3 = _rows4(ib, g * block, block, L)
            b0, b1, b2, b3 = _rows4(pk, g * block, block, L)
            first = g == 0
            for j in range(L):
                i0, i1_, i2, i3 = a0[j], a1[j], a2[j], a3[j]
                q0, q1, q2, q3 = b0[j], b1[j], b2[j], b3[j]
                r0[j] = _select(i0 == c0, q0, _select(i1_ == c0, q1, _select(i2 == c0, q2, _select(
                    i3 == c0, q3, _select(first, _F0, r0[j])))))
                r1[j] = _select(i0 == c1, q0, _select(i1_ == c1, q1, _select(i2 == c1, q2, _select(
                    i3 == c1, q3, _select(first, _F0, r1[j])))))
                r2[j] = _select(i0 == c2, q0, _select(i1_ == c2, q1, _select(i2 == c2, q2, _select(
                    i3 == c2, q3, _select(first, _F0, r2[j])))))
                r3[j] = _select(i0 == c3, q0, _select(i1_ == c3, q1, _select(i2 == c3, q2, _select(
                    i3 == c3, q3, _select(first, _F0, r3[j])))))
    for c in range(c4, C):
        row = pd[c * block:c * block + L]
        cc = np.int32(c)
        for g in range(0, kq, 4):
            a0, a1, a2, a3 = _rows4(ib, g * block, block, L)
            b0, b1, b2, b3 = _rows4(pk, g * block, block, L)
            first = g == 0
            for j in range(L):
                row[j] = _select(a0[j] == cc, b0[j], _select(a1[j] == cc, b1[j], _select(a2[j] == cc, b2[j],
                                 _select(a3[j] == cc, b3[j], _select(first, _F0, row[j])))))


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _scatter_probs(i1, pd, tk, zt, kdw, n, k, C, P, p0, L, block, clear):  # pragma: no cover - compiled
    """The per-id step: −p (the teacher's probability, ``tk`` × 1/Z; 0 where ignored) into the
    class-major block ``pd`` at each top-k id of flat ids [N, k, P] of either integer dtype; with
    ``clear``, 0 there instead (the block as it was before)."""
    _prefer_vector_width()
    for jj in range(k):
        ids = i1[(n * k + jj) * P + p0:(n * k + jj) * P + p0 + L]
        tj = tk[jj * block:jj * block + L]
        if clear:
            for j in range(L):
                pd[_slot(ids[j], C, block, j)] = _F0
        else:
            for j in range(L):
                pd[_slot(ids[j], C, block, j)] = -_select(kdw[j] != _F0, tj[j] * zt[j], _F0)


@njit(parallel=True, cache=True, nogil=True)
def kl_rows(s, v, idx, tail, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale, ce_scale,
            grad, loss, threads):  # pragma: no cover - compiled
    """Any [N, C, P], one position at a time with the classes innermost, in float32 vectorised along
    the classes (the teacher's k bins in float64): rows [N, C] read and written in place, a map's
    position gathered into a contiguous buffer and its gradient scattered back. ``loss``: [N, P]
    float32. ``threads``: how many Numba threads share the positions."""
    N, P = s.shape[0], s.shape[2]
    nq = N * P
    nchunk = min(nq, 4 * threads)
    for chunk in prange(nchunk):
        _rows_tasks(s, v, idx, tail, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale, ce_scale,
                    grad, loss, chunk * nq // nchunk, (chunk + 1) * nq // nchunk)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _rows_tasks(s, v, idx, tail, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale, ce_scale,
                grad, loss, first, last):  # pragma: no cover - compiled
    """Positions [first, last) of :func:`kl_rows` (one thread's share), scratch allocated once."""
    N, C, P = s.shape
    k = v.shape[1]
    s1, g1 = s.ravel(), grad.ravel()
    xb = np.empty(C, _F)  # a map position's logits, gathered
    gb = np.empty(C, _F)  # its gradient, scattered back
    eb = np.empty(C, _F)  # e = exp((x − m) / T)
    pd = np.zeros(C, _F)  # −p at the top-k classes, 0 elsewhere (zeroed again behind the gradient)
    log_rest = math.log(C - k) if with_tail else 0.0  # the tail bin's share of the C − k classes
    sep_ce = use_lab and T != 1.0  # the cross-entropy's own softmax at T = 1
    for q in range(first, last):
        n = q // P
        p = q - n * P
        base = n * C * P + p
        kd_on = not (use_ign and ign[n, p])
        y = np.int64(lab[n, p]) if use_lab else np.int64(-1)
        if y == ignore_index:
            y = -1
        a_tail = log_rest + (np.float64(tail[n, p]) - log_rest) / T if with_tail else 0.0
        if P == 1:
            loss[n, p] = _row(s1[base:base + C], g1[base:base + C], eb, pd, v[n, :, p], idx[n, :, p], a_tail, kd_on,
                              y, T, with_tail, sep_ce, kd_scale, ce_scale)
        else:
            for c in range(C):
                xb[c] = s1[base + c * P]
            loss[n, p] = _row(xb, gb, eb, pd, v[n, :, p], idx[n, :, p], a_tail, kd_on, y, T, with_tail,
                              sep_ce, kd_scale, ce_scale)
            for c in range(C):
                g1[base + c * P] = gb[c]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz", "contract"})
def _row(x, out, eb, pd, tv, ti, a_tail, kd_on, y, T, with_tail, sep_ce, kd_scale, ce_scale):  # pragma: no cover
    """One position's loss, its gradient written to ``out``: logits ``x`` [C] (float32, contiguous),
    the teacher's k values ``tv`` and ids ``ti``, its tail bin's logit ``a_tail`` (already / T), the
    label ``y`` (−1: none). Three vectorised passes over the classes (the maximum; e, Σe and the tail
    sum Σ_{c∉K} e; the gradient), the teacher's bins and every per-id step scalar, in float64.
    Left at LLVM's own vector width: at 512 bits its gradients came out different from call to call in
    the last bits (most likely LLVM's runtime overlap checks between the scratch arrays sending a sum to
    its vector or its scalar loop by where they lay), where a run must be reproducible from its seed."""
    C = x.shape[0]
    k = tv.shape[0]
    inv_t64 = 1.0 / T
    inv_t2 = _F(_LOG2E / T)  # exp(d / T) = 2 ** (d · log2(e) / T)
    # (A) the maximum (a vector reduction: see _fmax_reduce)
    m = _F_NEG_INF
    for c in range(C):
        m = _fmax_reduce(m, x[c])
    m64 = np.float64(m)
    # the teacher's bins: log Z, Σ_K p log p, Σ_K p (x − m); −p scattered at its ids
    kw = kd_scale * T if kd_on else 0.0
    kl = 0.0
    pt = lpt = 0.0
    if kd_on:
        amax = a_tail if with_tail else -np.inf
        for j in range(k):
            amax = max(amax, np.float64(tv[j]) / T)
        zt = math.exp(a_tail - amax) if with_tail else 0.0
        for j in range(k):
            zt += math.exp(np.float64(tv[j]) / T - amax)
        log_z = amax + math.log(zt)
        for j in range(k):
            lp = np.float64(tv[j]) / T - log_z
            pj = math.exp(lp)
            c = min(max(np.int64(ti[j]), 0), C - 1)  # clamped for memory safety only (ids: check_inputs)
            kl += pj * (lp - (np.float64(x[c]) - m64) * inv_t64)  # Σ_K p log p − Σ_K p (x − m) / T
            pd[c] = _F(-pj)
        if with_tail:
            lpt = a_tail - log_z
            pt = math.exp(lpt)
    ps = 1.0 - pt if with_tail else 1.0  # Σ_K p
    # (B) e, Σ e and the tail sum Σ_{c∉K} e (a sum, never Σ e − Σ_K e, which cancels)
    acc = _F0
    st = _F0
    for c in range(C):
        e = exp2_32((x[c] - m) * inv_t2)
        eb[c] = e
        acc += e
        st += _select(pd[c] < _F0, _F0, e)
    la = math.log(np.float64(acc))  # log Σ exp((x − m) / T)
    acc1 = 1.0
    if sep_ce and y >= 0:  # the cross-entropy's softmax at T = 1
        a1 = _F0
        for c in range(C):
            a1 += exp32(x[c] - m)
        acc1 = np.float64(a1)
    exact = False
    tc = 0.0
    l_tail = 0.0
    if kd_on:
        kl += ps * la
        if with_tail:
            if st > _F_TAIL_MIN:
                l_tail = math.log(np.float64(st)) - la  # log q_tail
                kl += pt * (lpt - l_tail)
                tc = kw * pt / np.float64(st)
            else:
                exact = True
    total = kd_scale * T * T * kl
    # (C) the gradient, written out; pd zeroed behind
    cew = ce_scale if y >= 0 else 0.0
    inv_acc = 1.0 / np.float64(acc)
    kw32 = _F(kw)
    tc32 = _F(tc)
    if sep_ce and y >= 0:
        coef = _F(kw * inv_acc)
        ce1 = _F(cew / acc1)
        for c in range(C):
            d = pd[c]
            out[c] = (coef - _select(d < _F0, _F0, tc32)) * eb[c] + kw32 * d + ce1 * exp32(x[c] - m)
            pd[c] = _F0
    else:
        coef = _F((kw + cew) * inv_acc)
        for c in range(C):
            d = pd[c]
            out[c] = (coef - _select(d < _F0, _F0, tc32)) * eb[c] + kw32 * d
            pd[c] = _F0
    if exact:  # the student's tail underflowed: log-sum-exp over the tail classes in float64
        mt = -np.inf
        for c in range(C):
            if not _in(ti, c):
                mt = max(mt, np.float64(x[c]) * inv_t64)
        sm = 0.0
        for c in range(C):
            if not _in(ti, c):
                sm += math.exp(np.float64(x[c]) * inv_t64 - mt)
        lse_tail = mt + math.log(sm)
        lse = m64 * inv_t64 + la
        total += kd_scale * T * T * pt * (lpt - (lse_tail - lse))
        w = kw * pt
        for c in range(C):
            if not _in(ti, c):
                out[c] -= _F(w * math.exp(np.float64(x[c]) * inv_t64 - lse_tail))
    if y >= 0:
        y = min(y, C - 1)  # for memory safety only: labels are checked by the caller
        out[y] -= _F(ce_scale)
        lse1 = m64 + (math.log(acc1) if sep_ce else la)
        total += ce_scale * (lse1 - np.float64(x[y]))
    return total


@njit(inline="always", cache=True)
def _in(ids, c):  # pragma: no cover - compiled
    """Whether class ``c`` is among the teacher's ``ids``."""
    for j in range(ids.shape[0]):
        if ids[j] == c:
            return True
    return False
