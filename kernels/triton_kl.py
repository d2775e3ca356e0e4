"""The GPU path: Triton kernels for the top-k softmax-KL loss, a forward and a backward launch.

The design sits at the memory floor rather than on the tensor cores: the loss reads the student
once per pass and does a few dozen arithmetic instructions per element, so what matters is how
many bytes move and whether anything waits on shared memory. Two layouts:

* **maps** ([N, C, P], classes strided by ``s_sc``, pixels by ``s_sp``; NCHW has ``s_sp = 1`` and
  ``channels_last`` has ``s_sc = 1``, both read in place): each program owns ``BLOCK_P`` pixels of one
  sample (``SPT`` consecutive pixels a thread, so a class's values load as one vector) and walks
  the classes one at a time with per-thread arithmetic. Nothing is reduced across threads inside
  the class loop: no shared memory, no barriers, no power-of-two padding of C.
* **rows** ([N, C], classes contiguous): one program per row, ``BLOCK_C`` classes a step with
  per-lane accumulators, and one cross-warp reduction at the end; ``num_warps`` grows with C.

Per pass, per element, one exponential:

* forward: an online log-sum-exp kept in two groups (the teacher's top k, the rest), so that the
  student's tail log-mass is a sum of positives and never 1 − Σ_K q; the teacher's k ids and
  probabilities are loaded once per pixel into registers (``K`` is a compile-time constant, the
  compare-and-select against the class id unrolls), and Σ_K p·z accumulates in the same loop.
  With ``CHUNK`` (:func:`_fwd_chunk`) the maps forward takes the ``UNROLL`` loaded classes at once:
  their maximum, one rescale of each running sum, then exponentials that do not wait on each other.
  Written: the loss and, per pixel, two or three fp32 statistics (the student's log-sum-exp and
  tail log-sum-exp; the T = 1 log-sum-exp when labels come with T ≠ 1);
* backward: the gradient from those statistics, the student read once more and the gradient written
  once in the logits' dtype, scaled by the incoming gradient read by pointer.

No [N, C, P] tensor lives between the two launches. A summed or averaged loss is reduced inside
the forward launch: each program writes its partial sums, and the last program to finish (an
atomic ticket) adds them in program order, so the result is deterministic without a second launch
or a host synchronisation; it also leaves the 1/count scales that the backward reads.

What the CPU interpreter cannot show, and how the kernels guard against it on a GPU:

* every pointer offset is int64 (the program id and the aranges are widened before they meet a
  stride; the class loop advances pointers instead of multiplying a 32-bit class id by a stride);
* every load is widened (fp16/bf16 to fp32, ids to int32) before any arithmetic;
* the grid is 1-D, so more than 65535 samples or rows still launch;
* ``num_warps`` is a launch setting that must not change results; tests/test_kernels_cuda.py runs
  the same inputs under several, and tests/test_kernel_build.py compiles every variant for sm_90 and
  reads ptxas's register and spill counts and the PTX for shared memory in the class loop.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

#: a running maximum's start: finite, so that a masked lane's −inf never meets −inf (a NaN)
_NEG = tl.constexpr(-3.0e38)
#: teachers with up to this many logits per position keep their ids and probabilities in registers;
#: more (a dense cache of many classes) reload them from L1 inside the class loop
CAPTURE_MAX_K = 16


@triton.jit
def _lse_step(m, a, z):
    """One online log-sum-exp step with one exponential: (max, Σ exp(· − max)) after seeing z."""
    e = tl.exp(-tl.abs(z - m))
    return tl.maximum(m, z), tl.where(z > m, a * e + 1.0, a + e)


@triton.jit
def _lse(m, a):
    return m + tl.log(a)


@triton.jit
def _logaddexp(x, y):
    hi = tl.maximum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi_safe + tl.log(tl.exp(x - hi_safe) + tl.exp(y - hi_safe))


@triton.jit
def _lse2_step(m, a, z2):
    """:func:`_lse_step` in base 2 (``z2`` = z · log2 e): one ``ex2`` and no multiply. A lane whose
    z2 is −inf (a class outside the group) adds nothing: −inf − m is −inf for the finite start m."""
    e = tl.exp2(-tl.abs(z2 - m))
    return tl.maximum(m, z2), tl.where(z2 > m, a * e + 1.0, a + e)


# -- maps: [N, C, P] --------------------------------------------------------------------------------


@triton.jit
def _load_classes(s_base, off, s_sc, mask_p, UNROLL: tl.constexpr):
    """``UNROLL`` classes' logits of a block of pixels, loaded before any is used (bytes in flight), and
    the class offset after them."""
    xs = ()
    for _u in tl.static_range(UNROLL):
        xs = xs + (tl.load(s_base + off, mask=mask_p, other=0.0),)
        off += s_sc
    return xs, off


@triton.jit
def _map_teacher(v_base, t_block, mask_p, inv_t, log_rest, v_sk, K: tl.constexpr, WITH_TAIL: tl.constexpr):
    """A block of pixels' teacher at T: (log Z over the k bins and the tail bin, the tail bin's logit)."""
    mz = tl.full(mask_p.shape, _NEG, tl.float32)
    sz = tl.zeros(mask_p.shape, tl.float32)
    a_tail = tl.zeros(mask_p.shape, tl.float32)
    if WITH_TAIL:
        a_tail = log_rest + (tl.load(t_block, mask=mask_p, other=0.0).to(tl.float32) - log_rest) * inv_t
        mz, sz = _lse_step(mz, sz, a_tail)
    v_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
    for _jt in range(K):
        mz, sz = _lse_step(mz, sz, tl.load(v_base + v_off, mask=mask_p, other=0.0).to(tl.float32) * inv_t)
        v_off += v_sk
    return _lse(mz, sz), a_tail


@triton.jit
def _map_capture(v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K: tl.constexpr, CAPTURE: tl.constexpr):
    """The teacher's k ids and probabilities of a block of pixels, held in registers (k ≤ CAPTURE_MAX_K),
    and from the same exponentials Σ_K p log p and Σ_K p (zeros without ``CAPTURE``: the caller's loop)."""
    ids = ()
    ps = ()
    plogp = tl.zeros(mask_p.shape, tl.float32)
    p_k = tl.zeros(mask_p.shape, tl.float32)
    if CAPTURE:
        v_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
        i_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
        for _j in tl.static_range(K):
            ids = ids + (tl.load(i_base + i_off, mask=mask_p, other=-1).to(tl.int32),)
            lpj = tl.load(v_base + v_off, mask=mask_p, other=0.0).to(tl.float32) * inv_t - log_z
            pj = tl.exp(lpj)
            ps = ps + (pj,)
            plogp += pj * lpj
            p_k += pj
            v_off += v_sk
            i_off += i_sk
    return ids, ps, plogp, p_k


@triton.jit
def _class_hits(c, ids, ps, v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K: tl.constexpr,
                CAPTURE: tl.constexpr):
    """Whether class c is among each pixel's top k, and the teacher's probability of it there (else 0)."""
    hit = tl.zeros(mask_p.shape, tl.int1)
    pc = tl.zeros(mask_p.shape, tl.float32)
    if CAPTURE:
        for j in tl.static_range(K):
            h = ids[j] == c
            hit = hit | h
            pc = tl.where(h, ps[j], pc)
    else:
        v_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
        i_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
        for _jd in range(K):
            h = tl.load(i_base + i_off, mask=mask_p, other=-1).to(tl.int32) == c
            lpj = tl.load(v_base + v_off, mask=mask_p, other=0.0).to(tl.float32) * inv_t - log_z
            v_off += v_sk
            i_off += i_sk
            hit = hit | h
            pc = tl.where(h, tl.exp(lpj), pc)
    return hit, pc


@triton.jit
def _fwd_class(x, c, ids, ps, y, mk, ak, mt, at, dot, m1, a1, x_y, v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk,
               K: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_LAB: tl.constexpr,
               LSE1: tl.constexpr):
    """The forward's running statistics after class c (x: the student's logits of the block's pixels)."""
    z = x * inv_t
    hit, pc = _class_hits(c, ids, ps, v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE)
    return _stats_step(x, x, z, z, hit, pc, y == c, mk, ak, mt, at, dot, m1, a1, x_y, WITH_TAIL, HAS_LAB, LSE1)


@triton.jit
def _fwd_chunk(xs, c0, ids, ps, y, mk, ak, mt, at, dot, m1, a1, x_y, v_base, i_base, mask_p, inv_t, log_z, v_sk,
               i_sk, K: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_LAB: tl.constexpr,
               LSE1: tl.constexpr, UNROLL: tl.constexpr):
    """The forward's running statistics after the ``UNROLL`` classes c0, c0 + 1, … at once (``xs``: their
    logits), the same sums as :func:`_fwd_class` class after class. Each group's maximum over the chunk
    comes first, then one rescale of each running sum and ``UNROLL`` exponentials that depend on nothing
    but that maximum: one class at a time, every exponential waits on the maximum of the class before
    it, a chain of ~C dependent steps per pixel (``CHUNK`` in :func:`map_config`)."""
    zs = ()
    hits = ()
    nk = mk
    nt = mt
    n1 = m1
    for u in tl.static_range(UNROLL):
        x = xs[u].to(tl.float32)
        z = x * inv_t
        hit, pc = _class_hits(c0 + u, ids, ps, v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE)
        dot += pc * z
        if WITH_TAIL:
            nk = tl.maximum(nk, tl.where(hit, z, _NEG))
            nt = tl.maximum(nt, tl.where(hit, _NEG, z))
        else:
            nk = tl.maximum(nk, z)
        if HAS_LAB:
            x_y = tl.where(y == c0 + u, x, x_y)
            if LSE1:
                n1 = tl.maximum(n1, x)
        zs = zs + (z,)
        hits = hits + (hit,)
    ak = ak * tl.exp(mk - nk)  # both finite (the maxima start at _NEG): 0 · exp(0) where a group is still empty
    if WITH_TAIL:
        at = at * tl.exp(mt - nt)
    if LSE1:
        a1 = a1 * tl.exp(m1 - n1)
    for u in tl.static_range(UNROLL):
        if WITH_TAIL:
            e = tl.exp(zs[u] - tl.where(hits[u], nk, nt))
            ak += tl.where(hits[u], e, 0.0)
            at += tl.where(hits[u], 0.0, e)
        else:
            ak += tl.exp(zs[u] - nk)
        if HAS_LAB:
            if LSE1:
                a1 += tl.exp(xs[u].to(tl.float32) - n1)
    return nk, ak, nt, at, dot, n1, a1, x_y


@triton.jit
def _fwd_lean(x, c, ids, xk, y, mt, at, m1, a1, x_y, scale2, K: tl.constexpr, HAS_LAB: tl.constexpr,
              LSE1: tl.constexpr):
    """The lean forward's step for class c (``LEAN`` in :func:`map_config`): the tail's online
    log-sum-exp alone, in base 2 (``scale2`` = log2 e / T), and the student's logits at the teacher's
    k ids kept in ``xk`` (one select per id), from which the top-k group's log-sum-exp and Σ_K p·z
    follow after the loop. Per element: k compares, k selects and one base-2 step: 27 SASS
    instructions on sm_90 at k = 4 where :func:`_fwd_class` (two groups' running sums, the
    probability selected and multiplied in) takes 35 (``python -m kdcache.kernels.build``)."""
    hit = ids[0] == c
    xk_new = (tl.where(hit, x, xk[0]),)
    for j in tl.static_range(1, K):
        h = ids[j] == c
        hit = hit | h
        xk_new = xk_new + (tl.where(h, x, xk[j]),)
    mt, at = _lse2_step(mt, at, tl.where(hit, float("-inf"), x * scale2))
    if HAS_LAB:
        x_y = tl.where(y == c, x, x_y)
        if LSE1:
            m1, a1 = _lse_step(m1, a1, x)
    return xk_new, mt, at, m1, a1, x_y


@triton.jit
def _grad_lean(x, c, ids, pf, y, l2_hit, l2_tail, f_hit, f_tail, q_tail, lse1, f_ce, scale2, WITH_TAIL: tl.constexpr,
               HAS_LAB: tl.constexpr, LSE1: tl.constexpr, K: tl.constexpr):
    """The lean backward's gradient of class c: exp2(x · log2 e / T − L) · f − p·f, L and f chosen by
    whether c is among the top k (``l2_*`` the statistics in base 2, ``pf`` the teacher's k
    probabilities times the KD scale). The same values as :func:`_grad_step` in 24 SASS instructions an
    element on sm_90 at k = 4 against 30."""
    hit = ids[0] == c
    pcf = tl.where(hit, pf[0], 0.0)
    for j in tl.static_range(1, K):
        h = ids[j] == c
        hit = hit | h
        pcf = tl.where(h, pf[j], pcf)
    e = tl.exp2(x * scale2 - tl.where(hit, l2_hit, l2_tail))
    g = e * tl.where(hit, f_hit, f_tail) - pcf
    if HAS_LAB:
        g += _ce_grad(x, e, hit, y == c, q_tail, lse1, f_ce, WITH_TAIL, LSE1)
    return g


@triton.jit
def _top_bits(ids, K: tl.constexpr):
    """Each pixel's top-k classes as bits of an int32 (C ≤ 32: ``BITS`` in :func:`map_config`)."""
    bits = tl.where(ids[0] >= 0, 1 << (ids[0] & 31), 0)
    for j in tl.static_range(1, K):
        bits = bits | tl.where(ids[j] >= 0, 1 << (ids[j] & 31), 0)
    return bits


@triton.jit
def _fwd_bits(x, c, bits, y, mt, at, m1, a1, x_y, scale2, HAS_LAB: tl.constexpr, LSE1: tl.constexpr):
    """The lean forward's step for class c with the top k as bits: one test says whether c is among
    them, and the top k's logits are gathered after the loop (14 SASS instructions an element at k = 4)."""
    hit = (bits & (1 << c)) != 0
    mt, at = _lse2_step(mt, at, tl.where(hit, float("-inf"), x * scale2))
    if HAS_LAB:
        x_y = tl.where(y == c, x, x_y)
        if LSE1:
            m1, a1 = _lse_step(m1, a1, x)
    return mt, at, m1, a1, x_y


@triton.jit
def _lean_scales(inv_t, lse, lt, f_kd, ct, f_ce, q_tail, WITH_TAIL: tl.constexpr, HAS_LAB: tl.constexpr,
                 LSE1: tl.constexpr):
    """The lean backward's per-position constants: log2 e / T, the statistics in base 2 (a top-k class's,
    a tail class's), the KD scale of a tail class, and the scales of a class's exponential that fold the
    cross-entropy in at T = 1 (a top-k class's, a tail class's; without labels, or at T ≠ 1, the KD's)."""
    scale2 = inv_t * 1.4426950408889634
    l2_hit = lse * 1.4426950408889634
    l2_tail = l2_hit
    f_tail = f_kd
    if WITH_TAIL:
        l2_tail = lt * 1.4426950408889634
        f_tail = f_kd * ct
    g_hit = f_kd
    g_tail = f_tail
    if HAS_LAB:
        if not LSE1:  # T = 1: the cross-entropy's softmax is the same exponential
            g_hit = f_kd + f_ce
            if WITH_TAIL:
                g_tail = f_tail + f_ce * q_tail
            else:
                g_tail = f_tail + f_ce
    return scale2, l2_hit, l2_tail, f_tail, g_hit, g_tail


@triton.jit
def _grad_bits(x, c, bits, l2_hit, l2_tail, g_hit, g_tail, lse1, f_ce, scale2, LSE1: tl.constexpr):
    """The lean backward's value for class c with the top k as bits: exact for a class neither among
    the top k nor the label (``g_hit``/``g_tail`` fold the KD and cross-entropy scales); those k + 1
    classes a pixel are written again after the loop (14 SASS instructions an element at k = 4)."""
    hit = (bits & (1 << c)) != 0
    g = tl.exp2(x * scale2 - tl.where(hit, l2_hit, l2_tail)) * tl.where(hit, g_hit, g_tail)
    if LSE1:
        g += f_ce * tl.exp(x - lse1)
    return g


@triton.jit
def _grad_again(cls, s_base, g_base, s_sc, g_sc, mask_p, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail, lse1, f_ce,
                scale2, WITH_TAIL: tl.constexpr, HAS_LAB: tl.constexpr, LSE1: tl.constexpr, K: tl.constexpr):
    """Class ``cls`` of each pixel (−1: none) read and its gradient written in full, over what
    :func:`_grad_bits` wrote there."""
    on = mask_p & (cls >= 0)
    cls64 = cls.to(tl.int64)
    x = tl.load(s_base + cls64 * s_sc, mask=on, other=0.0).to(tl.float32)
    g = _grad_lean(x, cls, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail, lse1, f_ce, scale2, WITH_TAIL, HAS_LAB,
                   LSE1, K)
    tl.store(g_base + cls64 * g_sc, g.to(g_base.dtype.element_ty), mask=on)


@triton.jit
def _stats_step(x, x_lse, z, z_lse, hit, pc, is_label, mk, ak, mt, at, dot, m1, a1, x_y, WITH_TAIL: tl.constexpr,
                HAS_LAB: tl.constexpr, LSE1: tl.constexpr):
    """The forward's running statistics after one class, maps and rows alike: x its logits, z = x / T,
    ``x_lse``/``z_lse`` the same with −inf where a lane holds no class (rows' last step), ``hit`` whether
    it is among the top k and ``pc`` the teacher's probability of it, ``is_label`` whether it is the label."""
    dot += pc * z
    if WITH_TAIL:
        mg, ag = _lse_step(tl.where(hit, mk, mt), tl.where(hit, ak, at), z_lse)
        mk = tl.where(hit, mg, mk)
        ak = tl.where(hit, ag, ak)
        mt = tl.where(hit, mt, mg)
        at = tl.where(hit, at, ag)
    else:
        mk, ak = _lse_step(mk, ak, z_lse)
    if HAS_LAB:
        x_y = tl.where(is_label, x, x_y)
        if LSE1:
            m1, a1 = _lse_step(m1, a1, x_lse)
    return mk, ak, mt, at, dot, m1, a1, x_y


@triton.jit
def _bwd_class(x, c, ids, ps, y, lse, lt, ct, q_tail, lse1, f_kd, f_ce, v_base, i_base, mask_p, inv_t, log_z, v_sk,
               i_sk, K: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_LAB: tl.constexpr,
               LSE1: tl.constexpr):
    """The gradient of class c."""
    z = x * inv_t
    hit, pc = _class_hits(c, ids, ps, v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE)
    return _grad_step(x, z, hit, pc, y == c, lse, lt, ct, q_tail, lse1, f_kd, f_ce, WITH_TAIL, HAS_LAB, LSE1)


@triton.jit
def _grad_step(x, z, hit, pc, is_label, lse, lt, ct, q_tail, lse1, f_kd, f_ce, WITH_TAIL: tl.constexpr,
               HAS_LAB: tl.constexpr, LSE1: tl.constexpr):
    """One class's gradient from the forward's statistics, maps and rows alike (arguments as
    :func:`_stats_step`'s; ``f_kd``/``f_ce`` the scales of the two terms)."""
    if WITH_TAIL:
        e = tl.exp(z - tl.where(hit, lse, lt))
        g = tl.where(hit, e - pc, e * ct) * f_kd
    else:
        e = tl.exp(z - lse)
        g = (e - pc) * f_kd
    if HAS_LAB:
        g += _ce_grad(x, e, hit, is_label, q_tail, lse1, f_ce, WITH_TAIL, LSE1)
    return g


@triton.jit
def _ce_grad(x, e, hit, is_label, q_tail, lse1, f_ce, WITH_TAIL: tl.constexpr, LSE1: tl.constexpr):
    """The fused cross-entropy's gradient of a class: f_ce · (softmax at T = 1 − [label]); at T = 1 the
    softmax is the KD term's exponential ``e`` (relative to the log-sum-exp of the class's group: a tail
    class's is q_tail times it), else its own exponential against the T = 1 log-sum-exp ``lse1``."""
    if LSE1:
        q1 = tl.exp(x - lse1)
    elif WITH_TAIL:
        q1 = tl.where(hit, e, e * q_tail)
    else:
        q1 = e
    return f_ce * (q1 - tl.where(is_label, 1.0, 0.0))


@triton.jit
def _map_fwd(
    s_ptr, v_ptr, i_ptr, t_ptr, ign_ptr, lab_ptr, stat_ptr, part_ptr, ticket_ptr, out_ptr, scale_ptr,
    C, P, inv_t, T, log_rest, ignore_index, kd_weight, ce_weight, num_programs,
    s_sn, s_sc, s_sp, v_sn, v_sk, i_sn, i_sk, t_sn, ign_sn, lab_sn, stat_s,
    K: tl.constexpr, BLOCK_P: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr,
    HAS_IGN: tl.constexpr, HAS_LAB: tl.constexpr, LSE1: tl.constexpr, REDUCTION: tl.constexpr,
    RBLOCK: tl.constexpr, UNROLL: tl.constexpr, CHUNK: tl.constexpr, LEAN: tl.constexpr, BITS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_p = (P + BLOCK_P - 1) // BLOCK_P
    n = pid // num_p
    offs_p = (pid - n * num_p) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < P
    v_base = v_ptr + n * v_sn + offs_p
    i_base = i_ptr + n * i_sn + offs_p

    # the teacher at T: log Z over the k bins (+ the tail bin), then p_j, Σ p_j log p_j and Σ p_j
    log_z, a_tail = _map_teacher(v_base, t_ptr + n * t_sn + offs_p, mask_p, inv_t, log_rest, v_sk, K, WITH_TAIL)
    ids, ps, plogp, p_k = _map_capture(v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE)
    if not CAPTURE:  # a dense cache of many classes: the sums from a loop over the values
        v_off = tl.program_id(0).to(tl.int64) * 0  # a scalar offset: a carried pointer tensor costs a layout conversion
        for _jt in range(K):
            lpj = tl.load(v_base + v_off, mask=mask_p, other=0.0).to(tl.float32) * inv_t - log_z
            v_off += v_sk
            plogp += tl.exp(lpj) * lpj
            p_k += tl.exp(lpj)

    y = tl.full([BLOCK_P], -1, tl.int32)
    if HAS_LAB:
        y = tl.load(lab_ptr + n * lab_sn + offs_p, mask=mask_p, other=ignore_index).to(tl.int32)
        y = tl.where(y == ignore_index, -1, y)

    # the student, one class at a time: online log-sum-exp over the top-k classes and over the rest
    mk = tl.full([BLOCK_P], _NEG, tl.float32)
    ak = tl.zeros([BLOCK_P], tl.float32)
    mt = tl.full([BLOCK_P], _NEG, tl.float32)
    at = tl.zeros([BLOCK_P], tl.float32)
    dot = tl.zeros([BLOCK_P], tl.float32)  # Σ_K p_j · z_j
    m1 = tl.full([BLOCK_P], _NEG, tl.float32)
    a1 = tl.zeros([BLOCK_P], tl.float32)
    x_y = tl.zeros([BLOCK_P], tl.float32)
    s_base = s_ptr + n * s_sn + offs_p * s_sp
    off = n * 0  # the class offset: a scalar, never a carried pointer tensor (a layout conversion a step)
    c_full = C - C % UNROLL
    if LEAN:  # the tail's log-sum-exp in the loop; the top k's from their logits, afterwards
        scale2 = inv_t * 1.4426950408889634  # log2 e / T
        if BITS:  # C ≤ 32: the top k as bits; their logits gathered after the loop (the block is in cache)
            bits = _top_bits(ids, K)
            for c0 in range(0, c_full, UNROLL):
                xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
                for u in tl.static_range(UNROLL):
                    mt, at, m1, a1, x_y = _fwd_bits(xs[u].to(tl.float32), c0 + u, bits, y, mt, at, m1, a1, x_y,
                                                    scale2, HAS_LAB, LSE1)
            for c in range(c_full, C):
                x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
                off += s_sc
                mt, at, m1, a1, x_y = _fwd_bits(x, c, bits, y, mt, at, m1, a1, x_y, scale2, HAS_LAB, LSE1)
            xk = ()
            for j in tl.static_range(K):
                xk = xk + (tl.load(s_base + ids[j].to(tl.int64) * s_sc, mask=mask_p & (ids[j] >= 0),
                                   other=0.0).to(tl.float32),)
        else:  # the top k's logits kept in registers, one select an id
            xk = ()
            for _j in tl.static_range(K):
                xk = xk + (tl.zeros([BLOCK_P], tl.float32),)
            for c0 in range(0, c_full, UNROLL):
                xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
                for u in tl.static_range(UNROLL):
                    xk, mt, at, m1, a1, x_y = _fwd_lean(xs[u].to(tl.float32), c0 + u, ids, xk, y, mt, at, m1, a1,
                                                        x_y, scale2, K, HAS_LAB, LSE1)
            for c in range(c_full, C):
                x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
                off += s_sc
                xk, mt, at, m1, a1, x_y = _fwd_lean(x, c, ids, xk, y, mt, at, m1, a1, x_y, scale2, K, HAS_LAB, LSE1)
        lt = (mt + tl.log2(at)) * 0.6931471805599453  # −inf when every class is among the top k
        for j in tl.static_range(K):
            zj = xk[j] * inv_t
            mk, ak = _lse_step(mk, ak, zj)
            dot += ps[j] * zj
        lk = _lse(mk, ak)
        lse = _logaddexp(lk, lt)
    else:
        for c0 in range(0, c_full, UNROLL):  # UNROLL classes' loads in flight before any arithmetic
            xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
            if CHUNK:
                mk, ak, mt, at, dot, m1, a1, x_y = _fwd_chunk(
                    xs, c0, ids, ps, y, mk, ak, mt, at, dot, m1, a1, x_y, v_base, i_base, mask_p, inv_t, log_z, v_sk,
                    i_sk, K, CAPTURE, WITH_TAIL, HAS_LAB, LSE1, UNROLL)
            else:
                for u in tl.static_range(UNROLL):
                    mk, ak, mt, at, dot, m1, a1, x_y = _fwd_class(
                        xs[u].to(tl.float32), c0 + u, ids, ps, y, mk, ak, mt, at, dot, m1, a1, x_y, v_base, i_base,
                        mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE, WITH_TAIL, HAS_LAB, LSE1)
        for c in range(c_full, C):
            x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
            off += s_sc
            mk, ak, mt, at, dot, m1, a1, x_y = _fwd_class(
                x, c, ids, ps, y, mk, ak, mt, at, dot, m1, a1, x_y, v_base, i_base, mask_p,
                inv_t, log_z, v_sk, i_sk, K, CAPTURE, WITH_TAIL, HAS_LAB, LSE1)
        lk = _lse(mk, ak)
        lt = lk
        lse = lk
        if WITH_TAIL:
            lt = _lse(mt, at)
            lse = _logaddexp(lk, lt)
    kl = plogp - dot + p_k * lse
    if WITH_TAIL:
        lp_tail = a_tail - log_z
        kl += tl.exp(lp_tail) * (lp_tail - (lt - lse))
    kd_on = mask_p
    if HAS_IGN:
        kd_on = kd_on & (tl.load(ign_ptr + n * ign_sn + offs_p, mask=mask_p, other=1) == 0)
    kd = tl.where(kd_on, T * T * kl, 0.0)  # where, not a product: an ignored pixel may hold NaN
    ce = tl.zeros([BLOCK_P], tl.float32)
    ce_on = mask_p & (y >= 0)
    if HAS_LAB:
        lse1 = lse
        if LSE1:
            lse1 = _lse(m1, a1)
            tl.store(stat_ptr + stat_s + stat_s + n * P + offs_p, lse1, mask=mask_p)
        ce = tl.where(ce_on, lse1 - x_y, 0.0)
    tl.store(stat_ptr + n * P + offs_p, lse, mask=mask_p)
    if WITH_TAIL:
        tl.store(stat_ptr + stat_s + n * P + offs_p, lt, mask=mask_p)

    if REDUCTION == 2:  # none: the map
        tl.store(out_ptr + n * P + offs_p, kd_weight * kd + ce_weight * ce, mask=mask_p)
    else:
        _finish(part_ptr, ticket_ptr, out_ptr, scale_ptr, pid, num_programs, kd_weight, ce_weight,
                tl.sum(kd, axis=0), tl.sum(kd_on.to(tl.float32), axis=0),
                tl.sum(ce, axis=0), tl.sum(ce_on.to(tl.float32), axis=0), REDUCTION, RBLOCK)


@triton.jit
def _finish(part_ptr, ticket_ptr, out_ptr, scale_ptr, pid, num_programs, kd_weight, ce_weight,
            kd_sum, kd_count, ce_sum, ce_count, REDUCTION: tl.constexpr, RBLOCK: tl.constexpr):
    """This program's partial sums; the last program to arrive adds everyone's in program order and
    writes the loss and the scales the backward reads (kd_weight / count, ce_weight / count)."""
    tl.store(part_ptr + pid * 4, kd_sum)
    tl.store(part_ptr + pid * 4 + 1, kd_count)
    tl.store(part_ptr + pid * 4 + 2, ce_sum)
    tl.store(part_ptr + pid * 4 + 3, ce_count)
    tl.debug_barrier()  # every thread's stores before the ticket (its release orders them for the GPU)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        acc_kd = tl.zeros([RBLOCK], tl.float32)
        acc_nk = tl.zeros([RBLOCK], tl.float32)
        acc_ce = tl.zeros([RBLOCK], tl.float32)
        acc_nc = tl.zeros([RBLOCK], tl.float32)
        for b in range(0, num_programs, RBLOCK):
            offs = b + tl.arange(0, RBLOCK).to(tl.int64)
            m = offs < num_programs
            # .cg: from L2, never a line this SM's L1 kept from an earlier call on the same memory
            acc_kd += tl.load(part_ptr + offs * 4, mask=m, other=0.0, cache_modifier=".cg")
            acc_nk += tl.load(part_ptr + offs * 4 + 1, mask=m, other=0.0, cache_modifier=".cg")
            acc_ce += tl.load(part_ptr + offs * 4 + 2, mask=m, other=0.0, cache_modifier=".cg")
            acc_nc += tl.load(part_ptr + offs * 4 + 3, mask=m, other=0.0, cache_modifier=".cg")
        f_kd = kd_weight
        f_ce = ce_weight
        if REDUCTION == 0:  # mean over the positions each term counts
            f_kd = kd_weight / tl.maximum(tl.sum(acc_nk, axis=0), 1.0)
            f_ce = ce_weight / tl.maximum(tl.sum(acc_nc, axis=0), 1.0)
        tl.store(out_ptr, f_kd * tl.sum(acc_kd, axis=0) + f_ce * tl.sum(acc_ce, axis=0))
        tl.store(scale_ptr, f_kd)
        tl.store(scale_ptr + 1, f_ce)
        tl.store(ticket_ptr, 0)  # ready for the next call


@triton.jit
def _map_bwd(
    go_ptr, s_ptr, v_ptr, i_ptr, t_ptr, ign_ptr, lab_ptr, stat_ptr, scale_ptr, g_ptr,
    C, P, inv_t, T, log_rest, ignore_index, kd_weight, ce_weight,
    s_sn, s_sc, s_sp, v_sn, v_sk, i_sn, i_sk, t_sn, ign_sn, lab_sn, stat_s, g_sn, g_sc, g_sp,
    K: tl.constexpr, BLOCK_P: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr,
    HAS_IGN: tl.constexpr, HAS_LAB: tl.constexpr, LSE1: tl.constexpr, REDUCTION: tl.constexpr,
    UNROLL: tl.constexpr, LEAN: tl.constexpr, BITS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_p = (P + BLOCK_P - 1) // BLOCK_P
    n = pid // num_p
    offs_p = (pid - n * num_p) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < P
    v_base = v_ptr + n * v_sn + offs_p
    i_base = i_ptr + n * i_sn + offs_p

    log_z, a_tail = _map_teacher(v_base, t_ptr + n * t_sn + offs_p, mask_p, inv_t, log_rest, v_sk, K, WITH_TAIL)
    ids, ps, _plogp, _p_k = _map_capture(v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE)

    lse = tl.load(stat_ptr + n * P + offs_p, mask=mask_p, other=0.0)
    lt = lse
    ct = tl.zeros([BLOCK_P], tl.float32)
    q_tail = tl.zeros([BLOCK_P], tl.float32)
    if WITH_TAIL:
        lt = tl.load(stat_ptr + stat_s + n * P + offs_p, mask=mask_p, other=0.0)
        q_tail = tl.exp(lt - lse)
        ct = q_tail - tl.exp(a_tail - log_z)  # a tail class c: dKL/dz_c = exp(z_c − lt) · (q_tail − p_tail)

    if REDUCTION == 2:  # a map: the weights are the scales
        go = tl.load(go_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        w_kd = kd_weight
        w_ce = ce_weight
    else:  # the forward's last program left weight / count (mean) or the weight (sum)
        go = tl.load(go_ptr).to(tl.float32)
        w_kd = tl.load(scale_ptr)
        w_ce = tl.load(scale_ptr + 1)
    kd_on = mask_p
    if HAS_IGN:
        kd_on = kd_on & (tl.load(ign_ptr + n * ign_sn + offs_p, mask=mask_p, other=1) == 0)
    f_kd = tl.where(kd_on, go * w_kd * T, 0.0)  # T² · dKL/dz · dz/ds = T · (q − p)
    y = tl.full([BLOCK_P], -1, tl.int32)
    f_ce = tl.zeros([BLOCK_P], tl.float32)
    lse1 = lse
    if HAS_LAB:
        y = tl.load(lab_ptr + n * lab_sn + offs_p, mask=mask_p, other=ignore_index).to(tl.int32)
        y = tl.where(y == ignore_index, -1, y)
        f_ce = tl.where(mask_p & (y >= 0), go * w_ce, 0.0)
        if LSE1:
            lse1 = tl.load(stat_ptr + stat_s + stat_s + n * P + offs_p, mask=mask_p, other=0.0)

    s_base = s_ptr + n * s_sn + offs_p * s_sp
    off = n * 0  # the class offset: a scalar, never a carried pointer tensor (a layout conversion a step)
    g_base = g_ptr + n * g_sn + offs_p * g_sp
    g_off = n * 0
    c_full = C - C % UNROLL
    if LEAN:  # base-2 statistics and the KD scale folded in per pixel, once
        scale2, l2_hit, l2_tail, f_tail, g_hit, g_tail = _lean_scales(inv_t, lse, lt, f_kd, ct, f_ce, q_tail,
                                                                      WITH_TAIL, HAS_LAB, LSE1)
        pf = ()
        for j in tl.static_range(K):
            pf = pf + (ps[j] * f_kd,)
        if BITS:  # C ≤ 32: every class as if neither top k nor label, then those k + 1 written again
            bits = _top_bits(ids, K)
            for c0 in range(0, c_full, UNROLL):
                xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
                for u in tl.static_range(UNROLL):
                    g = _grad_bits(xs[u].to(tl.float32), c0 + u, bits, l2_hit, l2_tail, g_hit, g_tail, lse1, f_ce,
                                   scale2, LSE1)
                    tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
                    g_off += g_sc
            for c in range(c_full, C):
                x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
                off += s_sc
                g = _grad_bits(x, c, bits, l2_hit, l2_tail, g_hit, g_tail, lse1, f_ce, scale2, LSE1)
                tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
                g_off += g_sc
            # the top k and the label again, each in full (the same thread wrote them above: program order)
            for j in tl.static_range(K):
                _grad_again(ids[j], s_base, g_base, s_sc, g_sc, mask_p, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail,
                            q_tail, lse1, f_ce, scale2, WITH_TAIL, HAS_LAB, LSE1, K)
            if HAS_LAB:
                _grad_again(y, s_base, g_base, s_sc, g_sc, mask_p, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail,
                            q_tail, lse1, f_ce, scale2, WITH_TAIL, HAS_LAB, LSE1, K)
        else:
            for c0 in range(0, c_full, UNROLL):
                xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
                for u in tl.static_range(UNROLL):
                    g = _grad_lean(xs[u].to(tl.float32), c0 + u, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail,
                                   lse1, f_ce, scale2, WITH_TAIL, HAS_LAB, LSE1, K)
                    tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
                    g_off += g_sc
            for c in range(c_full, C):
                x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
                off += s_sc
                g = _grad_lean(x, c, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail, lse1, f_ce, scale2, WITH_TAIL,
                               HAS_LAB, LSE1, K)
                tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
                g_off += g_sc
    else:
        for c0 in range(0, c_full, UNROLL):
            xs, off = _load_classes(s_base, off, s_sc, mask_p, UNROLL)
            for u in tl.static_range(UNROLL):
                g = _bwd_class(xs[u].to(tl.float32), c0 + u, ids, ps, y, lse, lt, ct, q_tail, lse1, f_kd, f_ce,
                               v_base, i_base, mask_p, inv_t, log_z, v_sk, i_sk, K, CAPTURE, WITH_TAIL, HAS_LAB,
                               LSE1)
                tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
                g_off += g_sc
        for c in range(c_full, C):
            x = tl.load(s_base + off, mask=mask_p, other=0.0).to(tl.float32)
            off += s_sc
            g = _bwd_class(x, c, ids, ps, y, lse, lt, ct, q_tail, lse1, f_kd, f_ce, v_base, i_base, mask_p, inv_t,
                           log_z, v_sk, i_sk, K, CAPTURE, WITH_TAIL, HAS_LAB, LSE1)
            tl.store(g_base + g_off, g.to(g_ptr.dtype.element_ty), mask=mask_p)
            g_off += g_sc


# -- rows: [N, C], classes contiguous ----------------------------------------------------------------


@triton.jit
def _row_teacher(v_row, i_row, t_ptr, row, inv_t, log_rest, v_sk, i_sk,
                 K: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr):
    """A row's teacher at T: log Z, the tail bin's log p, Σ_K p log p, Σ_K p, and (k ≤ CAPTURE_MAX_K)
    its ids and probabilities as scalars."""
    zero = tl.zeros([1], tl.float32)
    mz = zero + _NEG
    sz = zero
    a_tail = zero
    if WITH_TAIL:
        a_tail = zero + (log_rest + (tl.load(t_ptr + row).to(tl.float32) - log_rest) * inv_t)
        mz, sz = _lse_step(mz, sz, a_tail)
    for jt in range(K):
        mz, sz = _lse_step(mz, sz, zero + tl.load(v_row + jt * v_sk).to(tl.float32) * inv_t)
    log_z = tl.sum(_lse(mz, sz), axis=0)
    plogp = tl.sum(zero, axis=0)
    p_k = tl.sum(zero, axis=0)
    for jt in range(K):
        lpj = tl.load(v_row + jt * v_sk).to(tl.float32) * inv_t - log_z
        plogp += tl.exp(lpj) * lpj
        p_k += tl.exp(lpj)
    ids = ()
    ps = ()
    if CAPTURE:
        for j in tl.static_range(K):
            ids = ids + (tl.load(i_row + j * i_sk).to(tl.int32),)
            ps = ps + (tl.exp(tl.load(v_row + j * v_sk).to(tl.float32) * inv_t - log_z),)
    return log_z, tl.sum(a_tail, axis=0) - log_z, plogp, p_k, ids, ps


@triton.jit
def _row_tile(s_row, c0, offs, C):
    """A row's tile of classes from c0: their ids, which exist (< C), and their logits in fp32."""
    cls = c0 + offs
    valid = cls < C
    return cls, valid, tl.load(s_row + cls, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _row_hits(cls, ids, ps, i_row, v_row, i_sk, v_sk, inv_t, log_z, K: tl.constexpr, CAPTURE: tl.constexpr):
    """Whether each class of a row's tile is among its top k, and the teacher's probability of it there (else 0)."""
    hit = cls < 0
    pc = tl.zeros(cls.shape, tl.float32)
    if CAPTURE:
        for j in tl.static_range(K):
            h = cls == ids[j]
            hit = hit | h
            pc = tl.where(h, ps[j], pc)
    else:
        for jd in range(K):
            h = cls == tl.load(i_row + jd * i_sk).to(tl.int32)
            hit = hit | h
            pc = tl.where(h, tl.exp(tl.load(v_row + jd * v_sk).to(tl.float32) * inv_t - log_z), pc)
    return hit, pc


@triton.jit
def _row_fwd(
    s_ptr, v_ptr, i_ptr, t_ptr, ign_ptr, lab_ptr, stat_ptr, part_ptr, ticket_ptr, out_ptr, scale_ptr,
    C, inv_t, T, log_rest, ignore_index, kd_weight, ce_weight, num_programs,
    s_sn, v_sn, v_sk, i_sn, i_sk, stat_s,
    K: tl.constexpr, BLOCK_C: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr,
    HAS_IGN: tl.constexpr, HAS_LAB: tl.constexpr, LSE1: tl.constexpr, REDUCTION: tl.constexpr,
    RBLOCK: tl.constexpr, LEAN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    v_row = v_ptr + row * v_sn
    i_row = i_ptr + row * i_sn
    log_z, lp_tail, plogp, p_k, ids, ps = _row_teacher(v_row, i_row, t_ptr, row, inv_t, log_rest, v_sk, i_sk,
                                                       K, CAPTURE, WITH_TAIL)
    y = (row * 0 - 1).to(tl.int32)
    if HAS_LAB:
        y = tl.load(lab_ptr + row).to(tl.int32)
        y = tl.where(y == ignore_index, -1, y)

    offs = tl.arange(0, BLOCK_C)
    mk = tl.full([BLOCK_C], _NEG, tl.float32)
    ak = tl.zeros([BLOCK_C], tl.float32)
    mt = tl.full([BLOCK_C], _NEG, tl.float32)
    at = tl.zeros([BLOCK_C], tl.float32)
    dot = tl.zeros([BLOCK_C], tl.float32)
    m1 = tl.full([BLOCK_C], _NEG, tl.float32)
    a1 = tl.zeros([BLOCK_C], tl.float32)
    x_y = tl.zeros([BLOCK_C], tl.float32)
    s_row = s_ptr + row * s_sn
    if LEAN:  # the rest's log-sum-exp in the loop, in base 2; the top k's from their k logits, read after it
        scale2 = inv_t * 1.4426950408889634  # log2 e / T
        for c0 in range(0, C, BLOCK_C):
            cls, valid, x = _row_tile(s_row, c0, offs, C)
            out = cls >= C
            for j in tl.static_range(K):
                out = out | (cls == ids[j])
            mt, at = _lse2_step(mt, at, tl.where(out, float("-inf"), x * scale2))
            if HAS_LAB:
                x_y = tl.where(cls == y, x, x_y)
                if LSE1:
                    m1, a1 = _lse_step(m1, a1, tl.where(valid, x, float("-inf")))
        mt_all = tl.max(mt, axis=0)
        lt = (mt_all + tl.log2(tl.sum(at * tl.exp2(mt - mt_all), axis=0))) * 0.6931471805599453
        aks = p_k * 0.0  # scalars (a reduction of the [BLOCK_C] starts would cost a cross-warp round each)
        dots = aks
        mks = aks + _NEG
        for j in tl.static_range(K):
            zj = tl.load(s_row + ids[j]).to(tl.float32) * inv_t
            mks, aks = _lse_step(mks, aks, zj)
            dots += ps[j] * zj
        lse = _logaddexp(_lse(mks, aks), lt)
        kl = plogp - dots + p_k * lse
    else:
        for c0 in range(0, C, BLOCK_C):
            cls, valid, x = _row_tile(s_row, c0, offs, C)
            z = x * inv_t
            hit, pc = _row_hits(cls, ids, ps, i_row, v_row, i_sk, v_sk, inv_t, log_z, K, CAPTURE)
            mk, ak, mt, at, dot, m1, a1, x_y = _stats_step(
                x, tl.where(valid, x, float("-inf")), z, tl.where(valid, z, float("-inf")), hit, pc, cls == y,
                mk, ak, mt, at, dot, m1, a1, x_y, WITH_TAIL, HAS_LAB, LSE1)
        mk_all = tl.max(mk, axis=0)
        lse = mk_all + tl.log(tl.sum(ak * tl.exp(mk - mk_all), axis=0))
        lt = lse
        if WITH_TAIL:
            mt_all = tl.max(mt, axis=0)
            lt = mt_all + tl.log(tl.sum(at * tl.exp(mt - mt_all), axis=0))
            lse = _logaddexp(lse, lt)
        kl = plogp - tl.sum(dot, axis=0) + p_k * lse
    if WITH_TAIL:
        kl += tl.exp(lp_tail) * (lp_tail - (lt - lse))
    kd_on = row >= 0
    if HAS_IGN:
        kd_on = tl.load(ign_ptr + row) == 0
    kd = tl.where(kd_on, T * T * kl, 0.0)
    ce = tl.sum(tl.zeros([1], tl.float32), axis=0)
    ce_on = y >= 0
    if HAS_LAB:
        lse1 = lse
        if LSE1:
            m1_all = tl.max(m1, axis=0)
            lse1 = m1_all + tl.log(tl.sum(a1 * tl.exp(m1 - m1_all), axis=0))
            tl.store(stat_ptr + stat_s + stat_s + row, lse1)
        ce = tl.where(ce_on, lse1 - tl.sum(x_y, axis=0), 0.0)
    tl.store(stat_ptr + row, lse)
    if WITH_TAIL:
        tl.store(stat_ptr + stat_s + row, lt)
    if REDUCTION == 2:
        tl.store(out_ptr + row, kd_weight * kd + ce_weight * ce)
    else:
        _finish(part_ptr, ticket_ptr, out_ptr, scale_ptr, row, num_programs, kd_weight, ce_weight,
                kd, tl.where(kd_on, 1.0, 0.0), ce, tl.where(ce_on, 1.0, 0.0), REDUCTION, RBLOCK)


@triton.jit
def _row_bwd(
    go_ptr, s_ptr, v_ptr, i_ptr, t_ptr, ign_ptr, lab_ptr, stat_ptr, scale_ptr, g_ptr,
    C, inv_t, T, log_rest, ignore_index, kd_weight, ce_weight,
    s_sn, v_sn, v_sk, i_sn, i_sk, stat_s, g_sn,
    K: tl.constexpr, BLOCK_C: tl.constexpr, CAPTURE: tl.constexpr, WITH_TAIL: tl.constexpr,
    HAS_IGN: tl.constexpr, HAS_LAB: tl.constexpr, LSE1: tl.constexpr, REDUCTION: tl.constexpr,
    LEAN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    v_row = v_ptr + row * v_sn
    i_row = i_ptr + row * i_sn
    log_z, lp_tail, plogp, p_k, ids, ps = _row_teacher(v_row, i_row, t_ptr, row, inv_t, log_rest, v_sk, i_sk,
                                                       K, CAPTURE, WITH_TAIL)
    lse = tl.load(stat_ptr + row)
    lt = lse
    q_tail = lse * 0.0
    ct = lse * 0.0
    if WITH_TAIL:
        lt = tl.load(stat_ptr + stat_s + row)
        q_tail = tl.exp(lt - lse)
        ct = q_tail - tl.exp(lp_tail)
    if REDUCTION == 2:
        go = tl.load(go_ptr + row).to(tl.float32)
        w_kd = kd_weight
        w_ce = ce_weight
    else:
        go = tl.load(go_ptr).to(tl.float32)
        w_kd = tl.load(scale_ptr)
        w_ce = tl.load(scale_ptr + 1)
    f_kd = go * w_kd * T
    if HAS_IGN:
        f_kd = tl.where(tl.load(ign_ptr + row) == 0, f_kd, 0.0)
    y = (row * 0 - 1).to(tl.int32)
    f_ce = go * 0.0
    lse1 = lse
    if HAS_LAB:
        y = tl.load(lab_ptr + row).to(tl.int32)
        y = tl.where(y == ignore_index, -1, y)
        f_ce = tl.where(y >= 0, go * w_ce, 0.0)
        if LSE1:
            lse1 = tl.load(stat_ptr + stat_s + stat_s + row)

    offs = tl.arange(0, BLOCK_C)
    s_row = s_ptr + row * s_sn
    g_row = g_ptr + row * g_sn
    if LEAN:  # every class as a tail class (one exponential, one multiply), then the top k and the label again
        scale2, l2_hit, l2_tail, f_tail, _g_hit, g_tail = _lean_scales(inv_t, lse, lt, f_kd, ct, f_ce, q_tail,
                                                                       WITH_TAIL, HAS_LAB, LSE1)
        for c0 in range(0, C, BLOCK_C):
            cls, valid, x = _row_tile(s_row, c0, offs, C)
            g = tl.exp2(x * scale2 - l2_tail) * g_tail
            if LSE1:
                g += f_ce * tl.exp(x - lse1)
            tl.store(g_row + cls, g.to(g_ptr.dtype.element_ty), mask=valid)
        # the k + 1 classes in full; the barrier orders them after the loop's stores of other threads
        tl.debug_barrier()
        pf = ()
        for j in tl.static_range(K):
            pf = pf + (ps[j] * f_kd,)
        for j in tl.static_range(K):
            xj = tl.load(s_row + ids[j]).to(tl.float32)
            g = _grad_lean(xj, ids[j], ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail, lse1, f_ce, scale2,
                           WITH_TAIL, HAS_LAB, LSE1, K)
            tl.store(g_row + ids[j], g.to(g_ptr.dtype.element_ty))
        if HAS_LAB:
            yc = tl.maximum(y, 0)
            xy = tl.load(s_row + yc).to(tl.float32)
            g = _grad_lean(xy, y, ids, pf, y, l2_hit, l2_tail, f_kd, f_tail, q_tail, lse1, f_ce, scale2,
                           WITH_TAIL, HAS_LAB, LSE1, K)
            tl.store(g_row + yc, g.to(g_ptr.dtype.element_ty), mask=y >= 0)
    else:
        for c0 in range(0, C, BLOCK_C):
            cls, valid, x = _row_tile(s_row, c0, offs, C)
            z = x * inv_t
            hit, pc = _row_hits(cls, ids, ps, i_row, v_row, i_sk, v_sk, inv_t, log_z, K, CAPTURE)
            g = _grad_step(x, z, hit, pc, cls == y, lse, lt, ct, q_tail, lse1, f_kd, f_ce, WITH_TAIL, HAS_LAB, LSE1)
            tl.store(g_row + cls, g.to(g_ptr.dtype.element_ty), mask=valid)


# -- launch settings ---------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    """The smallest power of two ≥ n (host side: triton.next_power_of_2 is a jitted function whose
    Python call costs several microseconds a launch)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def map_config(C: int, P: int, k: int, element_size: int, pixel_stride: int = 1, lse1: bool = False) -> dict:
    """Pixels a thread (``SPT``, consecutive so that a class's values load as one vector), warps, and
    ``BLOCK_P``. Registers bound SPT: each pixel keeps ~8 running values and, for k ≤ 16, k ids and
    k probabilities."""
    capture = k <= CAPTURE_MAX_K
    # two pixels a thread up to k = 8: four (the earlier default at k <= 4) measured 5-17% slower on
    # an H200 (benchmarks/results/kernel-sweep-nvidia-h200-06cf5fe.md, two sweeps)
    spt = 4 if not capture else (2 if k <= 8 else 1)
    if lse1:  # labels at T ≠ 1 keep a third running log-sum-exp
        spt = min(spt, 2)
    if pixel_stride != 1:  # channels_last: a pixel's classes are contiguous, not a class's pixels
        spt = 1
    if element_size == 4 and 4 < k <= 8:  # fp32 at k = 8: 2 pixels a thread exceed the 128-register budget
        spt = 1
    chunk = CHUNK
    lean = LEAN
    bits = BITS
    bwd_bits = BWD_BITS
    if MAP_TUNING:  # benchmarks/kernel_sweep.py tries other settings through this
        chunk = MAP_TUNING.get("CHUNK", chunk)
        lean = MAP_TUNING.get("LEAN", lean)
        bits = MAP_TUNING.get("BITS", bits)
        bwd_bits = MAP_TUNING.get("BWD_BITS", bwd_bits)
    # the lean loop: 8 warps and 8 classes in flight, the fastest of two H200 sweeps' lean settings at
    # 8×19 and within 2% of the fastest at 8×11 and 8×150 (kernel-sweep-nvidia-h200.md, 865e091; SPT 4 on
    # 4 warps was as fast, with twice the registers a thread); the class-by-class loop: 4 warps, 4 classes
    num_warps = 8 if lean and capture else 4
    unroll = UNROLL if lean and capture else min(UNROLL, 4)
    if MAP_TUNING:
        spt = MAP_TUNING.get("SPT", spt)
        num_warps = MAP_TUNING.get("num_warps", num_warps)
        unroll = MAP_TUNING.get("UNROLL", unroll)
    block_p = spt * 32 * num_warps
    while block_p > 64 and block_p // 2 >= _pow2(P):  # small maps: fewer idle lanes
        if num_warps > 1:
            num_warps //= 2
        else:
            spt //= 2
        block_p = spt * 32 * num_warps
    return {"SPT": spt, "num_warps": num_warps, "BLOCK_P": block_p, "CAPTURE": capture, "UNROLL": unroll,
            "CHUNK": chunk, "LEAN": lean and capture, "BITS": lean and capture and bits and C <= 32,
            "BWD_BITS": lean and capture and bits and bwd_bits and C <= 32}


def row_config(C: int, k: int) -> dict:
    """``BLOCK_C`` classes a step (8 a thread) and ``num_warps`` growing with C (1 to 4).

    1024 classes on 4 warps from C = 1024 up: on an H200 (97214fa's sweep, device times) this ran
    4096×32000 in 0.42 ms and 4096×128000 in 1.55 ms, where 4096 classes on 16 warps took 0.56 and
    1.81 (more programs resident per SM, the same 8 classes a thread)."""
    block_c = min(_pow2(C), 1024)
    num_warps = max(1, min(4, block_c // 256))
    lean = ROW_LEAN
    if ROW_TUNING:
        block_c = min(ROW_TUNING.get("BLOCK_C", block_c), _pow2(C))
        num_warps = ROW_TUNING.get("num_warps", num_warps)
        lean = ROW_TUNING.get("LEAN", lean)
    return {"BLOCK_C": block_c, "num_warps": num_warps, "CAPTURE": k <= CAPTURE_MAX_K,
            "LEAN": lean and k <= CAPTURE_MAX_K}


#: ``num_warps`` for every launch when set (tests run the same inputs under several); None: the configs'
NUM_WARPS: int | None = None
NUM_STAGES: int | None = None
_MAX_PROGRAMS = 2**31 - 1  # a CUDA grid's x dimension
RBLOCK = 1024
#: classes whose loads a map kernel issues before using any of them (bytes in flight per thread)
UNROLL = 8
#: the maps forward's log-sum-exps over chunks of ``UNROLL`` classes (:func:`_fwd_chunk`: the chunk's
#: maximum first, then exponentials independent of each other) rather than class after class (each
#: exponential after the maximum of the class before it). The same sums; which is faster is a GPU
#: measurement: on an H200 (benchmarks/results/kernel-sweep-nvidia-h200.md, 7d5895f) no chunked setting
#: beat the default beyond the run-to-run spread (8×11: 0.250 against 0.259 ms, 8×150: 1.900 against 1.884)
CHUNK = False
#: the maps kernels' lean class loop (:func:`_fwd_lean`, :func:`_grad_lean`; k ≤ CAPTURE_MAX_K): the forward
#: keeps the tail's log-sum-exp alone in the loop and the top k's logits in registers, both passes work in
#: base 2 with the scales folded in per pixel: at C = 19, k = 4, 14 SASS instructions an element in the forward
#: (with ``BITS``) and 24 in the backward, where the class-by-class loop takes 35 and 30; on an H200, with 8
#: classes in flight (which the class-by-class loop's registers could not afford), 0.22-1.53 ms where it took
#: 0.26-1.88 (benchmarks/results/kernel-sweep-nvidia-h200.md, 865e091)
LEAN = True
#: with ``LEAN`` and C ≤ 32: each pixel's top k as the bits of an int32, so one test per element says
#: whether a class is among them; the forward gathers the top k's logits after the loop and the backward
#: writes those k classes (and the label) again in full, from the block the loop has just read
BITS = True
#: the backward with the top k as bits too (``BITS`` and this): every class written as a tail class, then the
#: k + 1 classes of the top k and the label written again. Off: on an H200 (59c0182's bench) the backward
#: took 0.14 ms at 8×11×512×1024 and 0.20 at 8×19 where the class-by-class loop took 0.10 and 0.14 (the
#: scattered rewrites), while the forward gained (0.16 → 0.15, 0.21 → 0.17)
BWD_BITS = False
#: the rows kernels' lean loop (k ≤ CAPTURE_MAX_K): the forward keeps the rest's log-sum-exp alone in the loop
#: (base 2; the top k's from their k logits, read after it), the backward writes every class as a tail class
#: (one exponential and one multiply an element) and then the top k and the label again in full, after a
#: barrier. Off until a lent GPU has timed it (``benchmarks/kernel_sweep.py`` runs both); tested against the
#: reference and the other loop like the maps' (tests/test_kernels_cuda.py)
ROW_LEAN = False
#: settings that replace the configs' choices when set (``SPT``, ``num_warps``, ``UNROLL``, ``CHUNK`` for maps;
#: ``BLOCK_C``, ``num_warps`` for rows): how benchmarks/kernel_sweep.py times the alternatives
MAP_TUNING: dict | None = None
ROW_TUNING: dict | None = None


def stat_count(with_tail: bool, lse1: bool) -> int:
    """fp32 statistics a position keeps between the two launches."""
    return 3 if lse1 else (2 if with_tail else 1)


#: the most registers a thread may hold (ptxas's ``maxnreg``); None leaves ptxas to choose. A cap of 128
#: (with the teacher loaded up front and the last classes as a masked block) measured slower on an H100
#: (benchmarks/results/kernel-sweep-nvidia-h100-80gb-hbm3.md), so the kernels run uncapped
MAX_REGISTERS: int | None = None


def register_cap(num_warps: int) -> dict:
    """The ``maxnreg`` launch option (at most 65536 registers over the block's threads), if capped."""
    if MAX_REGISTERS is None:
        return {}
    return {"maxnreg": min(MAX_REGISTERS, 65536 // (32 * num_warps) // 8 * 8)}


def _options(num_warps: int) -> dict:
    nw = NUM_WARPS if NUM_WARPS is not None else num_warps
    return ({"num_warps": nw} | register_cap(nw)
            | ({"num_stages": NUM_STAGES} if NUM_STAGES is not None else {}))


def launch_config(C: int, P: int, k: int, element_size: int, pixel_stride: int = 1, lse1: bool = False) -> dict:
    """A call's launch settings: :func:`row_config` for rows (``P`` = 1), else :func:`map_config`."""
    return row_config(C, k) if P == 1 else map_config(C, P, k, element_size, pixel_stride, lse1)


def programs_of(N: int, P: int, cfg: dict) -> int:
    """The programs a forward launch with settings ``cfg`` (:func:`launch_config`) runs."""
    return N if P == 1 else N * _cdiv(P, cfg["BLOCK_P"])


def programs(N: int, C: int, P: int, k: int, element_size: int, pixel_stride: int = 1, lse1: bool = False) -> int:
    if P == 1:
        return N
    return programs_of(N, P, map_config(C, P, k, element_size, pixel_stride, lse1))


def forward(s, v, idx, tail, ign, lab, stats, part, ticket, out, scales, *, T: float, with_tail: bool,
            lse1: bool, ignore_index: int, kd_weight: float, ce_weight: float, reduction: int, s_sp: int,
            cfg: dict | None = None):
    """The forward launch over [N, C, P] views (``s_sp``: the student's pixel stride; the class
    stride is ``s.stride(1)``). Writes ``stats`` [3, N·P] (the rows it needs), ``out`` (the map or the
    scalar), and for ``reduction`` 0 (mean) / 1 (sum) ``part`` [programs, 4] and ``scales`` [2].
    ``cfg``: the call's :func:`launch_config`, when the caller has it already."""
    N, C, P = s.shape
    k = v.shape[1]
    if cfg is None:
        cfg = launch_config(C, P, k, s.element_size(), s_sp, lse1)
    common = dict(K=k, WITH_TAIL=with_tail, HAS_IGN=ign is not None, HAS_LAB=lab is not None, LSE1=lse1,
                  REDUCTION=reduction, RBLOCK=RBLOCK)
    dummy = s
    t_ = tail if tail is not None else dummy
    ign_ = ign if ign is not None else dummy
    lab_ = lab if lab is not None else dummy
    scal = (1.0 / T, T, math.log(C - k) if C > k else 0.0, ignore_index, kd_weight, ce_weight)
    if P == 1:
        grid = N
        _check_grid(grid)
        _row_fwd[(grid,)](s, v, idx, t_, ign_, lab_, stats, part, ticket, out, scales, C, *scal, grid,
                          s.stride(0), v.stride(0), v.stride(1), idx.stride(0), idx.stride(1), stats.stride(0),
                          BLOCK_C=cfg["BLOCK_C"], CAPTURE=cfg["CAPTURE"], LEAN=cfg["LEAN"], **common,
                          **_options(cfg["num_warps"]))
        return
    grid = N * _cdiv(P, cfg["BLOCK_P"])
    _check_grid(grid)
    _map_fwd[(grid,)](s, v, idx, t_, ign_, lab_, stats, part, ticket, out, scales, C, P, *scal, grid,
                      s.stride(0), s.stride(1), s_sp, v.stride(0), v.stride(1), idx.stride(0), idx.stride(1),
                      tail.stride(0) if tail is not None else 0, ign.stride(0) if ign is not None else 0,
                      lab.stride(0) if lab is not None else 0, stats.stride(0),
                      BLOCK_P=cfg["BLOCK_P"], CAPTURE=cfg["CAPTURE"], UNROLL=cfg["UNROLL"], CHUNK=cfg["CHUNK"],
                      LEAN=cfg["LEAN"], BITS=cfg["BITS"], **common,
                      **_options(cfg["num_warps"]))


def backward(go, s, v, idx, tail, ign, lab, stats, scales, grad, *, T: float, with_tail: bool, lse1: bool,
             ignore_index: int, kd_weight: float, ce_weight: float, reduction: int, s_sp: int, g_sp: int):
    """The backward launch: ``grad`` ([N, C, P] views, pixel stride ``g_sp``) from the statistics the
    forward left, scaled by ``go`` (a scalar, or the [N·P] map for ``reduction`` 2)."""
    N, C, P = s.shape
    k = v.shape[1]
    common = dict(K=k, WITH_TAIL=with_tail, HAS_IGN=ign is not None, HAS_LAB=lab is not None, LSE1=lse1,
                  REDUCTION=reduction)
    dummy = s
    t_ = tail if tail is not None else dummy
    ign_ = ign if ign is not None else dummy
    lab_ = lab if lab is not None else dummy
    scal = (1.0 / T, T, math.log(C - k) if C > k else 0.0, ignore_index, kd_weight, ce_weight)
    cfg = launch_config(C, P, k, s.element_size(), s_sp, lse1)
    if P == 1:
        _row_bwd[(N,)](go, s, v, idx, t_, ign_, lab_, stats, scales, grad, C, *scal,
                       s.stride(0), v.stride(0), v.stride(1), idx.stride(0), idx.stride(1), stats.stride(0),
                       grad.stride(0), BLOCK_C=cfg["BLOCK_C"], CAPTURE=cfg["CAPTURE"], LEAN=cfg["LEAN"], **common,
                       **_options(cfg["num_warps"]))
        return
    grid = N * _cdiv(P, cfg["BLOCK_P"])
    _map_bwd[(grid,)](go, s, v, idx, t_, ign_, lab_, stats, scales, grad, C, P, *scal,
                      s.stride(0), s.stride(1), s_sp, v.stride(0), v.stride(1), idx.stride(0), idx.stride(1),
                      tail.stride(0) if tail is not None else 0, ign.stride(0) if ign is not None else 0,
                      lab.stride(0) if lab is not None else 0, stats.stride(0),
                      grad.stride(0), grad.stride(1), g_sp,
                      BLOCK_P=cfg["BLOCK_P"], CAPTURE=cfg["CAPTURE"], UNROLL=cfg["UNROLL"], LEAN=cfg["LEAN"], BITS=cfg["BWD_BITS"], **common,
                      **_options(cfg["num_warps"]))


def _check_grid(grid: int) -> None:
    if grid > _MAX_PROGRAMS:
        raise ValueError(f"{grid} programs exceed a CUDA grid's {_MAX_PROGRAMS}; split the batch")
