"""The CPU production path: one Numba pass per position computes the loss and its gradient.

Parallel over positions (``prange`` over N × P), fp32 math, the student's class axis read in
place with stride P (NCHW), so no permute or copy of an fp32 student. For each position:

1. the student's log-sum-exp at T (and at T = 1 when labels are given), max-shifted;
2. the teacher's k+1 bins (``bin``) or k entries (``renormalize``, or k = C);
3. the student's tail mass as an online log-sum-exp over the classes *outside* the top k (never
   1 − Σ_K q, which cancels when the student is confident): the top-k classes are marked in
   the gradient row itself, so no scratch memory is allocated;
4. the gradient: T·(q_c − p_c) inside the top k, T·(q_c − p_tail·q_c/q_tail) outside, scaled;
   plus ``ce_scale``·(softmax(s)_c − [c = y]) with labels.

The per-position losses (already scaled) come back as a map; the caller sums it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def topk_kl_numba(s, v, idx, tail, ign, lab, T, bin_policy, use_tail, use_ign, use_lab, ignore_index,
                  kd_scale, ce_scale, grad, loss):  # pragma: no cover - compiled
    N, C, P = s.shape
    k = v.shape[1]
    inv_t = 1.0 / T
    log_rest = math.log(C - k) if C > k else 0.0
    with_tail = bin_policy and use_tail and k < C
    for q in prange(N * P):
        n = q // P
        p = q - n * P
        kd_on = not (use_ign and ign[n, p])
        y = -1
        if use_lab:
            y = np.int64(lab[n, p])
            if y == ignore_index:
                y = -1
        total = 0.0
        # student log-sum-exp at T
        m = -np.inf
        for c in range(C):
            z = s[n, c, p] * inv_t
            if z > m:
                m = z
        acc = 0.0
        for c in range(C):
            acc += math.exp(s[n, c, p] * inv_t - m)
        lse = m + math.log(acc)
        lse1 = 0.0
        if y >= 0:
            m1 = -np.inf
            for c in range(C):
                if s[n, c, p] > m1:
                    m1 = s[n, c, p]
            acc1 = 0.0
            for c in range(C):
                acc1 += math.exp(s[n, c, p] - m1)
            lse1 = m1 + math.log(acc1)
        if kd_on:
            # teacher bins
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
                lq = s[n, idx[n, j, p], p] * inv_t - lse
                kl += math.exp(lp) * (lp - lq)
            g_scale = kd_scale * T
            if with_tail:
                # mark the top-k classes in the gradient row, then the tail's online logsumexp
                for c in range(C):
                    grad[n, c, p] = 0.0
                for j in range(k):
                    grad[n, idx[n, j, p], p] = 1.0
                mt = -np.inf
                st = 0.0
                for c in range(C):
                    if grad[n, c, p] == 0.0:
                        z = s[n, c, p] * inv_t
                        if z > mt:
                            st = st * math.exp(mt - z) + 1.0
                            mt = z
                        else:
                            st += math.exp(z - mt)
                l_tail = mt + math.log(st)  # log Σ_{c∉K} exp(z_c)
                lp_tail = a_tail - log_z
                p_tail = math.exp(lp_tail)
                kl += p_tail * (lp_tail - (l_tail - lse))
                for c in range(C):
                    z = s[n, c, p] * inv_t
                    qc = math.exp(z - lse)
                    if grad[n, c, p] == 0.0:
                        grad[n, c, p] = g_scale * (qc - p_tail * math.exp(z - l_tail))
                    else:
                        grad[n, c, p] = g_scale * qc
            else:
                for c in range(C):
                    grad[n, c, p] = g_scale * math.exp(s[n, c, p] * inv_t - lse)
            for j in range(k):
                grad[n, idx[n, j, p], p] -= g_scale * math.exp(v[n, j, p] * inv_t - log_z)
            total += kd_scale * T * T * kl
        else:
            for c in range(C):
                grad[n, c, p] = 0.0
        if y >= 0:
            for c in range(C):
                grad[n, c, p] += ce_scale * math.exp(s[n, c, p] - lse1)
            grad[n, y, p] -= ce_scale
            total += ce_scale * (lse1 - s[n, y, p])
        loss[n, p] = total
