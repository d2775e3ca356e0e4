"""The readable PyTorch definition of the top-k softmax-KL loss (the loss contract of docs/design.md).

This is the oracle the fused kernels are tested against; it runs in any dtype (float64 for
tests) and gets its gradient from autograd.

Student logits s [N, C, *spatial] (class axis 1), teacher top-k values v and ids K
[N, k, *spatial], tail τ [N, *spatial] (log-sum-exp of the teacher logits outside K),
temperature T.

* ``bin``: a (k+1)-bin KL. Student: log q = log_softmax(s / T); its tail bin is
  log q_tail = logsumexp(s / T over classes not in K) − logsumexp(s / T). Teacher:
  a_i = v_i / T, a_tail = log(C − k) + (τ − log(C − k)) / T; log p = log_softmax([a, a_tail]).
  KL = Σ_bins p (log p − log q).
* ``renormalize``: the teacher over K alone, p̂ = softmax(v / T); KL = Σ_K p̂ (log p̂ − log q).

The loss is ``weight`` × T² × KL, averaged over non-ignored positions (``mean``), summed (``sum``) or
returned per position (``none``). With ``labels``, ``ce_weight`` × the hard-label cross-entropy
at T = 1 is added (positions whose label is ``ignore_index`` left out; ``mean`` averages it over
its own valid positions).
"""

from __future__ import annotations

import math

import torch


def topk_kl_reference(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                      teacher_indices: torch.Tensor, teacher_tail: torch.Tensor | None = None, *,
                      temperature: float = 1.0, ignore_mask: torch.Tensor | None = None,
                      reduction: str = "mean", tail: str = "bin", labels: torch.Tensor | None = None,
                      ignore_index: int = 255, ce_weight: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    s = student_logits
    C = s.shape[1]
    k = teacher_values.shape[1]
    T = float(temperature)
    idx = teacher_indices.long()
    z = s / T
    log_q = torch.log_softmax(z, dim=1)
    log_q_k = log_q.gather(1, idx)  # [N, k, ...]
    a = teacher_values.to(log_q.dtype) / T
    if k == C or tail == "renormalize":
        log_p = torch.log_softmax(a, dim=1)
        kl = (log_p.exp() * (log_p - log_q_k)).sum(1)
    elif tail == "bin":
        if teacher_tail is None:
            raise ValueError("tail='bin' with k < C needs teacher_tail")
        log_rest = math.log(C - k)
        a_tail = log_rest + (teacher_tail.to(log_q.dtype) - log_rest) / T
        log_p = torch.log_softmax(torch.cat([a, a_tail.unsqueeze(1)], dim=1), dim=1)
        outside = torch.ones_like(z, dtype=torch.bool).scatter(1, idx, False)
        log_q_tail = torch.logsumexp(z.masked_fill(~outside, float("-inf")), dim=1) - torch.logsumexp(z, dim=1)
        log_q_bins = torch.cat([log_q_k, log_q_tail.unsqueeze(1)], dim=1)
        kl = (log_p.exp() * (log_p - log_q_bins)).sum(1)
    else:
        raise ValueError(f"tail must be 'bin' or 'renormalize', got {tail!r}")
    loss = (float(weight) * T * T) * kl
    if ignore_mask is not None:
        loss = loss.masked_fill(ignore_mask, 0.0)
    ce = None
    if labels is not None:
        valid = labels.long() != ignore_index
        y = torch.where(valid, labels.long(), torch.zeros_like(labels, dtype=torch.long))
        ce = -torch.log_softmax(s, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        ce = ce.masked_fill(~valid, 0.0)
    if reduction == "none":
        return loss if ce is None else loss + ce_weight * ce
    if reduction == "sum":
        return loss.sum() if ce is None else loss.sum() + ce_weight * ce.sum()
    if reduction == "mean":
        count = loss.numel() if ignore_mask is None else int((~ignore_mask).sum())
        out = loss.sum() / max(count, 1)
        if ce is not None:
            out = out + ce_weight * ce.sum() / max(int(valid.sum()), 1)
        return out
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
