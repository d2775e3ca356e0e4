"""The GPU path: a Triton kernel that computes the loss and writes the gradient in one launch.

The student is addressed as [N, C, P] with class stride ``stride_c`` and positions contiguous:
NCHW logits are read in place (class stride H·W, coalesced along pixels), and rows [N, C]
are the same kernel with P = 1 and class stride 1. Each program owns ``BLOCK_P`` positions of
one sample and walks the class axis in ``BLOCK_C`` tiles:

* pass 1: online max/sum of the student at T (and at T = 1 with labels), and an online
  log-sum-exp over the classes outside the top k (membership by comparing the tile's class ids
  with the k teacher ids), so the student's tail mass never comes from 1 − Σ_K q;
* pass 2: the gradient of T²·KL (+ the weighted cross-entropy) is written tile by tile.

A single class tile (C ≤ BLOCK_C, e.g. segmentation's 19 or 150 classes) makes pass 2 a reread
of what pass 1 just loaded. Loss sums are fp32 and written per program, then summed by the
caller in a fixed order: the result is deterministic (no atomics), with no host synchronisation.

What the CPU interpreter cannot show, and how the kernel guards against it on a GPU:

* every pointer offset is int64 (the program id and the aranges are widened before they meet a
  stride), so C·P or N·C·P past 2^31 elements does not wrap;
* every load is widened (fp16/bf16 to fp32, ids to int64) before any arithmetic;
* the grid is 1-D (N × position blocks), so more than 65535 samples or rows still launch;
* ``num_warps`` / ``num_stages`` are launch settings (:data:`NUM_WARPS`, :data:`NUM_STAGES`,
  or :func:`launch`'s arguments) that must not change results; tests/test_kernels_cuda.py runs
  the same inputs under several, and checks the compiled IR for 32-bit offsets and unwidened loads.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


@triton.jit
def _topk_kl_kernel(
    s_ptr, v_ptr, i_ptr, t_ptr, ign_ptr, lab_ptr, g_ptr, loss_ptr, scale_ptr,
    C, P, K, inv_t, T, log_rest, ignore_index,
    s_sn, s_sc, v_sn, v_sk, i_sn, i_sk, t_sn, ign_sn, lab_sn, g_sn, g_sc,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr,
    WITH_TAIL: tl.constexpr, HAS_IGN: tl.constexpr, HAS_LAB: tl.constexpr, PER_POSITION: tl.constexpr,
):
    # a 1-D grid of N × cdiv(P, BLOCK_P) programs, sample-major (a grid's axis 1 stops at 65535).
    # Every offset below is int64: program ids and aranges are widened *before* they meet a stride,
    # so no product wraps at 2^31 elements (C·P or N·C·P past 2^31 happen on a GPU, never in the
    # interpreter tests' tiny shapes).
    pid = tl.program_id(0).to(tl.int64)
    num_p = (P + BLOCK_P - 1) // BLOCK_P
    n = pid // num_p
    pid_p = pid - n * num_p
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < P
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    kd_scale = tl.load(scale_ptr)
    ce_scale = tl.load(scale_ptr + 1)

    s_base = s_ptr + n * s_sn + offs_p[None, :]
    g_base = g_ptr + n * g_sn + offs_p[None, :]
    v_row = v_ptr + n * v_sn + offs_p  # teacher value j of the block's positions: v_row + j * v_sk
    i_row = i_ptr + n * i_sn + offs_p

    # teacher: k values and ids for the block's positions, [K_PAD, BLOCK_P]; every load is
    # widened to fp32 (or int64 for ids) before any arithmetic (bf16/fp16 inputs)
    offs_k = tl.arange(0, K_PAD).to(tl.int64)
    mask_kp = (offs_k[:, None] < K) & mask_p[None, :]
    a = tl.load(v_row[None, :] + offs_k[:, None] * v_sk, mask=mask_kp, other=float("-inf")).to(tl.float32) * inv_t
    ids = tl.load(i_row[None, :] + offs_k[:, None] * i_sk, mask=mask_kp, other=0).to(tl.int64)

    kd_on = mask_p
    if HAS_IGN:
        ign = tl.load(ign_ptr + n * ign_sn + offs_p, mask=mask_p, other=1)
        kd_on = kd_on & (ign == 0)
    y = tl.full([BLOCK_P], -1, tl.int64)
    if HAS_LAB:
        y = tl.load(lab_ptr + n * lab_sn + offs_p, mask=mask_p, other=ignore_index).to(tl.int64)
        y = tl.where((y == ignore_index) | (~mask_p), -1, y)

    # pass 1: student statistics
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_P], tl.float32)
    m1 = tl.full([BLOCK_P], float("-inf"), tl.float32)
    acc1 = tl.zeros([BLOCK_P], tl.float32)
    mt = tl.full([BLOCK_P], float("-inf"), tl.float32)
    st = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        mask = (cls[:, None] < C) & mask_p[None, :]
        x = tl.load(s_base + cls[:, None] * s_sc, mask=mask, other=float("-inf")).to(tl.float32)
        z = x * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[None, :]), axis=0)
        m = m_new
        if HAS_LAB:
            m1_new = tl.maximum(m1, tl.max(x, axis=0))
            m1_safe = tl.where(m1_new == float("-inf"), 0.0, m1_new)
            acc1 = acc1 * tl.exp(m1 - m1_safe) + tl.sum(tl.exp(x - m1_safe[None, :]), axis=0)
            m1 = m1_new
        if WITH_TAIL:
            in_k = tl.zeros([BLOCK_C, BLOCK_P], tl.int1)
            for j in range(0, K):
                idj = tl.load(i_row + tl.cast(j, tl.int64) * i_sk, mask=mask_p, other=-1).to(tl.int64)
                in_k = in_k | (cls[:, None] == idj[None, :])
            zt = tl.where(in_k | (~mask), float("-inf"), z)
            mt_new = tl.maximum(mt, tl.max(zt, axis=0))
            mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            st = st * tl.exp(mt - mt_safe) + tl.sum(tl.exp(zt - mt_safe[None, :]), axis=0)
            mt = mt_new
    lse = m + tl.log(acc)
    lse1 = m1 + tl.log(acc1)

    # teacher bins
    amax = tl.max(a, axis=0)
    a_tail = tl.zeros([BLOCK_P], tl.float32)
    if WITH_TAIL:
        tail = tl.load(t_ptr + n * t_sn + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        a_tail = log_rest + (tail - log_rest) * inv_t
        amax = tl.maximum(amax, a_tail)
    amax = tl.where(mask_p, amax, 0.0)
    zsum = tl.sum(tl.exp(a - amax[None, :]), axis=0)
    if WITH_TAIL:
        zsum += tl.exp(a_tail - amax)
    log_z = amax + tl.log(zsum)
    lp = a - log_z[None, :]
    pk = tl.where(mask_kp, tl.exp(lp), 0.0)
    # the student's log q at the teacher's ids (a gather along the class axis)
    xk = tl.load(s_base + ids * s_sc, mask=mask_kp, other=0.0).to(tl.float32)
    lq = xk * inv_t - lse[None, :]
    kl = tl.sum(tl.where(mask_kp, pk * (lp - lq), 0.0), axis=0)
    l_tail = tl.zeros([BLOCK_P], tl.float32)
    p_tail = tl.zeros([BLOCK_P], tl.float32)
    if WITH_TAIL:
        l_tail = mt + tl.log(st)
        lp_tail = a_tail - log_z
        p_tail = tl.exp(lp_tail)
        kl += p_tail * (lp_tail - (l_tail - lse))
    total = tl.where(kd_on, kd_scale * T * T * kl, 0.0)  # where, not a product: ignored rows may hold NaN
    if HAS_LAB:
        sy = tl.load(s_base + tl.where(y >= 0, y, 0)[None, :] * s_sc, mask=(y >= 0)[None, :], other=0.0).to(tl.float32)
        ce = lse1 - tl.sum(sy, axis=0)
        total += tl.where(y >= 0, ce_scale * ce, 0.0)
    total = tl.where(mask_p, total, 0.0)

    # pass 2: the gradient
    g_kd = kd_scale * T
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        mask = (cls[:, None] < C) & mask_p[None, :]
        x = tl.load(s_base + cls[:, None] * s_sc, mask=mask, other=0.0).to(tl.float32)
        z = x * inv_t
        q = tl.exp(z - lse[None, :])
        pc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        in_k = tl.zeros([BLOCK_C, BLOCK_P], tl.int1)
        for j in range(0, K):
            j64 = tl.cast(j, tl.int64)
            idj = tl.load(i_row + j64 * i_sk, mask=mask_p, other=-1).to(tl.int64)
            vj = tl.load(v_row + j64 * v_sk, mask=mask_p, other=0.0).to(tl.float32)
            hit = cls[:, None] == idj[None, :]
            pc += tl.where(hit, tl.exp(vj * inv_t - log_z)[None, :], 0.0)
            in_k = in_k | hit
        g = q - pc
        if WITH_TAIL:
            g -= tl.where(in_k, 0.0, p_tail[None, :] * tl.exp(z - l_tail[None, :]))
        g = tl.where(kd_on[None, :], g * g_kd, 0.0)
        if HAS_LAB:
            q1 = tl.exp(x - lse1[None, :])
            onehot = tl.where(cls[:, None] == y[None, :], 1.0, 0.0)
            g += tl.where((y >= 0)[None, :], ce_scale * (q1 - onehot), 0.0)
        tl.store(g_base + cls[:, None] * g_sc, g.to(g_ptr.dtype.element_ty), mask=mask)

    if PER_POSITION:
        tl.store(loss_ptr + n * P + offs_p, total, mask=mask_p)
    else:
        tl.store(loss_ptr + pid, tl.sum(total, axis=0))  # = n * num_p + pid_p: sample-major partials


def block_sizes(C: int, P: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): rows (P = 1) get one program each and wide class tiles; spatial maps
    get the whole class axis (up to 256) by a block of pixels, ~4096 elements a tile."""
    if P == 1:
        return min(4096, triton.next_power_of_2(C)), 1
    block_c = min(triton.next_power_of_2(C), 256)
    block_p = max(16, min(256, 4096 // block_c))
    return block_c, min(block_p, triton.next_power_of_2(P))


def programs_per_sample(C: int, P: int) -> int:
    return triton.cdiv(P, block_sizes(C, P)[1])


#: Launch settings used when :func:`launch` is not given them. ``NUM_WARPS = 4`` is what the kernel
#: has always run with (Triton's own default); ``NUM_STAGES = None`` leaves software pipelining at
#: Triton's default for the GPU. They change the compiled code, not the arithmetic: results must
#: agree across settings, and tests/test_kernels_cuda.py runs the same inputs under several of
#: them (through ``monkeypatch.setattr`` on these two names).
NUM_WARPS: int = 4
NUM_STAGES: int | None = None

_MAX_PROGRAMS = 2**31 - 1  # a CUDA grid's x dimension


def launch(s, v, idx, tail, ign, lab, grad, scales, *, T: float, with_tail: bool, ignore_index: int,
           per_position: bool, loss_out, num_warps: int | None = None, num_stages: int | None = None):
    """Launch over [N, C, P] views; ``grad`` and ``loss_out`` are written.

    ``loss_out`` holds N·P per-position losses (``per_position``) or N·programs_per_sample(C, P)
    partial sums in sample-major order. ``num_warps`` / ``num_stages`` default to the module's
    ``NUM_WARPS`` / ``NUM_STAGES``.
    """
    N, C, P = s.shape
    k = v.shape[1]
    block_c, block_p = block_sizes(C, P)
    programs = N * triton.cdiv(P, block_p)
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"{programs} programs (N = {N} × {triton.cdiv(P, block_p)} position blocks) exceed a "
                         f"CUDA grid's {_MAX_PROGRAMS}; split the batch")
    num_warps = NUM_WARPS if num_warps is None else num_warps
    num_stages = NUM_STAGES if num_stages is None else num_stages
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages is not None else {})

    dummy = s
    _topk_kl_kernel[(programs,)](
        s, v, idx, tail if tail is not None else dummy, ign if ign is not None else dummy,
        lab if lab is not None else dummy, grad, loss_out, scales,
        C, P, k, 1.0 / T, T, math.log(C - k) if C > k else 0.0, ignore_index,
        s.stride(0), s.stride(1), v.stride(0), v.stride(1), idx.stride(0), idx.stride(1),
        tail.stride(0) if tail is not None else 0, ign.stride(0) if ign is not None else 0,
        lab.stride(0) if lab is not None else 0, grad.stride(0), grad.stride(1),
        BLOCK_C=block_c, BLOCK_P=block_p, K_PAD=triton.next_power_of_2(k),
        WITH_TAIL=with_tail, HAS_IGN=ign is not None, HAS_LAB=lab is not None, PER_POSITION=per_position,
        **options,
    )
