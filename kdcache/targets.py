"""Top-k targets computed from teacher logits, and the distribution a top-k cache implies.

* :func:`topk_targets`: top-k raw logits (sorted descending), their class ids, and the tail term
  τ = logsumexp of the logits *outside* the top k, so the missing probability mass is known.
* :func:`attention_map`: attention-transfer maps Σ_c F_c², L2-normalised per sample.
* :func:`implied_log_probs`: the dense distribution over all C classes a cache implies at a
  temperature, under the tail policies of the loss contract (docs/design.md; ``bin``: the
  tail's classes share the tail bin equally; ``renormalize``: the top k alone).
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``logits`` [N, C, *spatial] -> values [N, k, *spatial] (float32, descending), ids
    [N, k, *spatial] (int64) and tail [N, *spatial] (float32; None when k == C).

    The tail is computed as a log-sum-exp over the classes outside the top k directly (the top
    k masked to -inf), never as log(exp(lse) - Σ exp(top k)), which cancels catastrophically
    when the top k hold almost all the mass.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in 1..{num_classes}, got {k}")
    values, indices = logits.topk(k, dim=1, largest=True, sorted=True)
    if k == num_classes:
        return values, indices, None
    rest = logits.scatter(1, indices, float("-inf"))
    return values, indices, torch.logsumexp(rest, dim=1)


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Attention-transfer map of ``feature`` [N, c, h, w]: Q = Σ_c F_c², flattened per sample
    and L2-normalised, returned as [N, h, w] float32 (Zagoruyko & Komodakis)."""
    q = feature.float().pow(2).sum(1)
    flat = q.flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat.view_as(q)


def implied_log_probs(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None,
                      num_classes: int, temperature: float = 1.0, policy: str = "bin") -> torch.Tensor:
    """Log-probabilities [N, C, *spatial] (float64) of the teacher distribution a cache implies.

    ``bin``: the top-k logits a_i = v_i / T and a tail bin a_tail = log(C-k) + (τ - log(C-k)) / T
    share one softmax; the tail bin's probability is spread equally over the C - k classes
    outside the top k (exact at T = 1 only in the bin's total). ``renormalize``: softmax over
    the top k alone; the other classes get probability 0 (log-probability -inf).
    """
    v = values.double() / temperature
    idx = indices.long()
    k = v.shape[1]
    out_shape = (v.shape[0], num_classes, *v.shape[2:])
    if k == num_classes or policy == "renormalize":
        logp_k = torch.log_softmax(v, dim=1)
        out = torch.full(out_shape, float("-inf"), dtype=torch.float64, device=v.device)
        return out.scatter(1, idx, logp_k)
    if policy != "bin":
        raise ValueError(f"tail policy must be 'bin' or 'renormalize', got {policy!r}")
    if tail is None:
        raise ValueError("the 'bin' tail policy needs the tail term when k < C")
    log_rest = math.log(num_classes - k)
    a_tail = log_rest + (tail.double() - log_rest) / temperature
    logp = torch.log_softmax(torch.cat([v, a_tail.unsqueeze(1)], dim=1), dim=1)
    per_tail_class = logp[:, k:k + 1] - log_rest
    out = per_tail_class.expand(out_shape).clone()
    return out.scatter(1, idx, logp[:, :k])
