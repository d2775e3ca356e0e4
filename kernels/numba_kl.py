"""The CPU production path: Numba kernels that compute the loss and its gradient in one call.

Math per position (the loss contract of docs/design.md), arranged so that each student logit costs one
exponential:

1. m = max_c z_c (z = s / T); e_c = exp(z_c − m) is written into the gradient buffer and summed
   (S); lse = m + log S.
2. The teacher's k (+1 tail) bins: log_softmax of [v / T, a_tail].
3. The student's tail mass is the sum of e_c over the classes *outside* the top k (marked in
   the buffer by a sign flip), never 1 − Σ_K q, which cancels when the student is confident.
   If every tail term underflows, an exact online log-sum-exp over the tail is used instead.
4. The gradient: q_c = e_c / S; T·(q_c − p_c) inside the top k, T·(q_c − p_tail·e_c/S_tail)
   outside, times the reduction scale; plus ce_scale·(softmax(s)_c − [c = y]) with labels.

Two layouts of the same math: :func:`kl_spatial` takes blocks of ``BLOCK`` contiguous pixels
(NCHW read in place; the inner loops run along pixels, so they vectorise), and
:func:`kl_rows` takes one position at a time with the classes innermost (rows [N, C] and any
map with few positions). The exponential is a polynomial with exact power-of-two scaling
(:func:`fast_exp`, relative error < 1e-14 on its domain) because LLVM cannot vectorise calls to
libm's ``exp``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK = 256  # pixels per task in kl_spatial
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.42860682030941723212e-6


@intrinsic
def _as_int(typingctx, x):  # pragma: no cover - compiled
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _as_float(typingctx, x):  # pragma: no cover - compiled
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@njit(inline="always", cache=True, fastmath={"reassoc", "nsz", "contract"})
def fast_exp(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 (float64; clamped at -708, ~3e-308): range reduction to |r| <= ln2/2, a degree-11
    Taylor polynomial, and the power of two put into the exponent bits."""
    x = max(x, -708.0)
    n = math.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
            1.0 / 3628800 + r * (1.0 / 39916800)))))))))))
    return _as_float(_as_int(p) + (np.int64(n) << 52))


@njit(inline="always", cache=True, fastmath={"reassoc", "nsz", "contract"})
def fast_log(x):  # pragma: no cover - compiled
    """log(x) for normal x > 0 (float64): exponent from the bits, the mantissa folded into
    [sqrt(1/2), sqrt(2)) and log m = 2 atanh((m-1)/(m+1)) by its series (error < 2e-12)."""
    bits = _as_int(x)
    e = (bits >> 52) - 1023
    m = _as_float((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = m > 1.4142135623730951
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    poly = t * (2.0 + t2 * (2.0 / 3 + t2 * (2.0 / 5 + t2 * (2.0 / 7 + t2 * (2.0 / 9 + t2 * (
        2.0 / 11 + t2 * (2.0 / 13 + t2 * (2.0 / 15))))))))
    return e * 0.6931471805599453 + poly


@njit(inline="always", cache=True)
def _teacher(v, idx, tail, s, n, p, k, inv_t, log_rest, with_tail, lse):  # pragma: no cover - compiled
    """(log_z, a_tail, kl over the top-k bins) for one position."""
    amax = -np.inf
    for j in range(k):
        a = v[n, j, p] * inv_t
        if a > amax:
            amax = a
    a_tail = 0.0
    if with_tail:
        a_tail = log_rest + (tail[n, p] - log_rest) * inv_t
        if a_tail > amax:
            amax = a_tail
    zt = 0.0
    for j in range(k):
        zt += math.exp(v[n, j, p] * inv_t - amax)
    if with_tail:
        zt += math.exp(a_tail - amax)
    log_z = amax + math.log(zt)
    kl = 0.0
    for j in range(k):
        lp = v[n, j, p] * inv_t - log_z
        kl += math.exp(lp) * (lp - (s[n, idx[n, j, p], p] * inv_t - lse))
    return log_z, a_tail, kl


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def kl_spatial(s, v, idx, tail, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale, ce_scale,
               grad, loss):  # pragma: no cover - compiled
    """[N, C, P] with P contiguous: tasks of BLOCK pixels, copied once into task-local buffers
    where every inner loop runs along pixels (LLVM vectorises those), then written back once."""
    N, C, P = s.shape
    k = v.shape[1]
    inv_t = 1.0 / T
    log_rest = math.log(C - k) if C > k else 0.0
    nb = (P + BLOCK - 1) // BLOCK
    sep_ce = use_lab and T != 1.0
    s1, v1, i1, g1 = s.ravel(), v.ravel(), idx.ravel(), grad.ravel()  # C-contiguous: views
    for task in prange(N * nb):
        n = task // nb
        p0 = (task - n * nb) * BLOCK
        L = min(BLOCK, P - p0)
        # copy in through flat 1-D slices (3-D indexing in the loops costs ~4x here)
        x = np.empty((C, L))  # the student's logits (raw)
        for c in range(C):
            src = s1[(n * C + c) * P + p0:(n * C + c) * P + p0 + L]
            for j in range(L):
                x[c, j] = src[j]
        va = np.empty((k, L))  # teacher logits / T
        ids = np.empty((k, L), dtype=np.int64)
        for jj in range(k):
            vs = v1[(n * k + jj) * P + p0:(n * k + jj) * P + p0 + L]
            js = i1[(n * k + jj) * P + p0:(n * k + jj) * P + p0 + L]
            for j in range(L):
                va[jj, j] = vs[j] * inv_t
                ids[jj, j] = js[j]
        kd = np.ones(L, dtype=np.bool_)
        if use_ign:
            gs = ign.ravel()[n * P + p0:n * P + p0 + L]
            for j in range(L):
                kd[j] = not gs[j]
        ce_w = np.zeros(L)
        ys = np.zeros(L, dtype=np.int64)
        if use_lab:
            ls = lab.ravel()[n * P + p0:n * P + p0 + L]
            for j in range(L):
                ys[j] = np.int64(ls[j])
                ce_w[j] = ce_scale if ys[j] != ignore_index else 0.0
        # student at T: e = exp(z - m) kept in g, S, lse
        m = np.full(L, -np.inf)
        for c in range(C):
            for j in range(L):
                m[j] = max(m[j], x[c, j] * inv_t)
        g = np.empty((C, L))
        acc = np.zeros(L)
        for c in range(C):
            for j in range(L):
                e = fast_exp(x[c, j] * inv_t - m[j])
                g[c, j] = e
                acc[j] += e
        lse = np.empty(L)
        inv_acc = np.empty(L)
        for j in range(L):
            lse[j] = m[j] + fast_log(acc[j])
            inv_acc[j] = 1.0 / acc[j]
        lse1 = lse
        m1 = np.zeros(L)
        inv_acc1 = inv_acc
        if sep_ce:
            m1[:] = -np.inf
            for c in range(C):
                for j in range(L):
                    m1[j] = max(m1[j], x[c, j])
            acc1 = np.zeros(L)
            for c in range(C):
                for j in range(L):
                    acc1[j] += fast_exp(x[c, j] - m1[j])
            lse1 = np.empty(L)
            inv_acc1 = np.empty(L)
            for j in range(L):
                lse1[j] = m1[j] + fast_log(acc1[j])
                inv_acc1[j] = 1.0 / acc1[j]
        # teacher bins
        amax = np.full(L, -np.inf)
        for jj in range(k):
            for j in range(L):
                amax[j] = max(amax[j], va[jj, j])
        a_tail = np.zeros(L)
        if with_tail:
            for j in range(L):
                a_tail[j] = log_rest + (tail[n, p0 + j] - log_rest) * inv_t
                amax[j] = max(amax[j], a_tail[j])
        zt = np.zeros(L)
        for jj in range(k):
            for j in range(L):
                zt[j] += fast_exp(va[jj, j] - amax[j])
        if with_tail:
            for j in range(L):
                zt[j] += fast_exp(a_tail[j] - amax[j])
        log_z = np.empty(L)
        for j in range(L):
            log_z[j] = amax[j] + fast_log(zt[j])
        pk = np.empty((k, L))
        kl = np.zeros(L)
        for jj in range(k):
            for j in range(L):
                lp = va[jj, j] - log_z[j]
                pk[jj, j] = fast_exp(lp)
                kl[j] += pk[jj, j] * (lp - (x[ids[jj, j], j] * inv_t - lse[j]))
        kdw = np.zeros(L)
        for j in range(L):
            kdw[j] = kd_scale * T if kd[j] else 0.0
        tail_coef = np.zeros(L)
        p_tail = np.zeros(L)
        l_tail = np.zeros(L)
        exact = np.zeros(L, dtype=np.bool_)
        if with_tail:
            for jj in range(k):  # mark the top-k classes (sign flip)
                for j in range(L):
                    g[ids[jj, j], j] = -g[ids[jj, j], j] - 1.0
            st = np.zeros(L)
            for c in range(C):
                for j in range(L):
                    st[j] += max(g[c, j], 0.0)
            for j in range(L):  # vectorised: assumes the tail sum did not underflow ...
                lp_tail = a_tail[j] - log_z[j]
                pt = fast_exp(lp_tail) if kd[j] else 0.0  # ignored pixels may hold NaN teacher values
                ok = st[j] > 1e-290
                p_tail[j] = pt
                l_tail[j] = m[j] + fast_log(st[j] if ok else 1.0)
                tail_coef[j] = pt / st[j] if ok else 0.0
                exact[j] = kd[j] and not ok
                kl[j] += pt * (lp_tail - (l_tail[j] - lse[j])) if ok else 0.0
            for j in range(L):  # ... and fixes the rare pixels where it did
                if exact[j]:
                    mt = -np.inf
                    for c in range(C):
                        if g[c, j] >= 0.0:
                            mt = max(mt, x[c, j] * inv_t)
                    sm = 0.0
                    for c in range(C):
                        if g[c, j] >= 0.0:
                            sm += math.exp(x[c, j] * inv_t - mt)
                    l_tail[j] = mt + math.log(sm)
                    kl[j] += p_tail[j] * ((a_tail[j] - log_z[j]) - (l_tail[j] - lse[j]))
        # the gradient
        for c in range(C):
            for j in range(L):
                e = g[c, j]
                marked = e < 0.0
                et = -e - 1.0 if marked else e
                qc = et * inv_acc[j]
                gg = kdw[j] * (qc - (0.0 if marked else tail_coef[j] * et))
                g[c, j] = gg + ce_w[j] * qc
        if sep_ce:  # the cross-entropy's softmax at T = 1 differs: redo its part
            for c in range(C):
                for j in range(L):
                    q1 = fast_exp(x[c, j] - m1[j]) * inv_acc1[j]
                    qt = fast_exp(x[c, j] * inv_t - m[j]) * inv_acc[j]
                    g[c, j] += ce_w[j] * (q1 - qt)
        for jj in range(k):
            for j in range(L):
                if kd[j]:
                    g[ids[jj, j], j] -= kdw[j] * pk[jj, j]
        for j in range(L):
            if exact[j]:
                for c in range(C):
                    in_k = False
                    for jj in range(k):
                        if ids[jj, j] == c:
                            in_k = True
                    if not in_k:
                        g[c, j] -= kdw[j] * p_tail[j] * math.exp(x[c, j] * inv_t - l_tail[j])
        tot = np.empty(L)
        for j in range(L):
            tot[j] = kd_scale * T * T * kl[j] if kd[j] else 0.0
        if use_lab:
            for j in range(L):
                if ce_w[j] != 0.0:
                    g[ys[j], j] -= ce_w[j]
                    tot[j] += ce_w[j] * (lse1[j] - x[ys[j], j])
        ls = loss.ravel()[n * P + p0:n * P + p0 + L]
        for j in range(L):
            ls[j] = tot[j]
        for c in range(C):
            dst = g1[(n * C + c) * P + p0:(n * C + c) * P + p0 + L]
            for j in range(L):
                dst[j] = g[c, j]


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def kl_rows(s, v, idx, tail, ign, lab, T, with_tail, use_ign, use_lab, ignore_index, kd_scale, ce_scale,
            grad, loss):  # pragma: no cover - compiled
    """Any [N, C, P], one position per iteration: its C logits copied into a local contiguous
    buffer (rows [N, C] read in place), classes innermost."""
    N, C, P = s.shape
    k = v.shape[1]
    inv_t = 1.0 / T
    log_rest = math.log(C - k) if C > k else 0.0
    sep_ce = use_lab and T != 1.0
    s1, g1 = s.ravel(), grad.ravel()
    for q in prange(N * P):
        n = q // P
        p = q - n * P
        base = n * C * P + p
        x = np.empty(C)
        if P == 1:
            row = s1[base:base + C]
            for c in range(C):
                x[c] = row[c]
        else:
            for c in range(C):
                x[c] = s1[base + c * P]
        m = -np.inf
        for c in range(C):
            m = max(m, x[c])
        m = m * inv_t
        g = np.empty(C)
        acc = 0.0
        for c in range(C):
            e = fast_exp(x[c] * inv_t - m)
            g[c] = e
            acc += e
        lse = m + fast_log(acc)
        inv_acc = 1.0 / acc
        kd_on = not (use_ign and ign[n, p])
        total = 0.0
        g_kd = kd_scale * T if kd_on else 0.0
        tail_coef = 0.0
        exact = False
        l_tail = 0.0
        p_tail = 0.0
        log_z = 0.0
        if kd_on:
            log_z, a_tail, kl = _teacher(v, idx, tail, s, n, p, k, inv_t, log_rest, with_tail, lse)
            total = kd_scale * T * T * kl
            if with_tail:
                for jj in range(k):
                    c = idx[n, jj, p]
                    g[c] = -g[c] - 1.0
                st = 0.0
                for c in range(C):
                    st += max(g[c], 0.0)
                lp_tail = a_tail - log_z
                p_tail = math.exp(lp_tail)
                if st > 1e-290:
                    l_tail = m + math.log(st)
                    tail_coef = p_tail / st
                else:
                    mt = -np.inf
                    for c in range(C):
                        if g[c] >= 0.0:
                            mt = max(mt, x[c] * inv_t)
                    sm = 0.0
                    for c in range(C):
                        if g[c] >= 0.0:
                            sm += math.exp(x[c] * inv_t - mt)
                    l_tail = mt + math.log(sm)
                    exact = True
                total += kd_scale * T * T * p_tail * (lp_tail - (l_tail - lse))
        y = -1
        if use_lab:
            y = np.int64(lab[n, p])
            if y == ignore_index:
                y = -1
        ce_w = ce_scale if y >= 0 else 0.0
        lse1 = lse
        inv_acc1 = inv_acc
        m1 = 0.0
        if y >= 0 and sep_ce:
            m1 = -np.inf
            for c in range(C):
                m1 = max(m1, x[c])
            acc1 = 0.0
            for c in range(C):
                acc1 += fast_exp(x[c] - m1)
            lse1 = m1 + fast_log(acc1)
            inv_acc1 = 1.0 / acc1
        for c in range(C):
            e = g[c]
            marked = e < 0.0
            et = -e - 1.0 if marked else e
            qc = et * inv_acc
            g[c] = g_kd * (qc - (0.0 if marked else tail_coef * et)) + (0.0 if sep_ce else ce_w * qc)
        if ce_w != 0.0 and sep_ce:
            for c in range(C):
                g[c] += ce_w * fast_exp(x[c] - m1) * inv_acc1
        if exact:
            for c in range(C):
                in_k = False
                for jj in range(k):
                    if idx[n, jj, p] == c:
                        in_k = True
                if not in_k:
                    g[c] -= g_kd * p_tail * math.exp(x[c] * inv_t - l_tail)
        if kd_on:
            for jj in range(k):
                g[idx[n, jj, p]] -= g_kd * math.exp(v[n, jj, p] * inv_t - log_z)
        if y >= 0:
            g[y] -= ce_scale
            total += ce_scale * (lse1 - x[y])
        if P == 1:
            out = g1[base:base + C]
            for c in range(C):
                out[c] = g[c]
        else:
            for c in range(C):
                g1[base + c * P] = g[c]
        loss[n, p] = total
