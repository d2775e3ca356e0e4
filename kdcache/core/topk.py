"""Top-k targets computed from teacher logits, and everything a top-k + tail cache implies: the
one home of that maths (every other module calls these).

* :func:`topk_targets`: top-k raw logits (sorted descending), their class ids, and the tail term
  τ = logsumexp of the logits *outside* the top k, so the missing probability mass is known.
* :func:`tail_share`: the logit each of the C − k classes outside the top k is given, τ − log(C − k)
  (the tail's mass in equal shares: their logsumexp is τ), the assumption of the loss contract's
  ``bin`` policy (docs/design.md). :func:`dense_logits` rebuilds [N, C, …] logits with it;
  :func:`tail_bin_logit` is the tail bin at a temperature; :func:`topk_mass` the probability the
  top k hold; :func:`implied_log_probs` the whole implied distribution, under either policy.
* :func:`zscore`, :func:`standardized_topk`: logit standardisation (z-scores over the classes) of
  logits, and of a top-k + tail cache under the same equal-share assumption.
* :func:`teacher_confidence`, :func:`add_to_histogram`, :func:`thresholds_from_histogram`: the
  teacher's top-1 probability per position and CBST's class-balanced thresholds from it.
* :func:`attention_map`: attention-transfer maps Σ_c F_c², L2-normalised per sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: confidence histogram bins for the class-balanced thresholds (quantiles to 1/BINS)
BINS = 2000
#: the logit of an absent class in a dense rebuild: exp(-1e4) is 0 in every float type
ABSENT = -1e4

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


def tail_share(tail, num_classes: int, k: int):
    """The logit each of the C − k classes outside the top k gets: τ − log(C − k), so that their
    logsumexp is the tail τ (numpy arrays or tensors)."""
    return tail - math.log(num_classes - k)


def tail_bin_logit(tail, num_classes: int, k: int, temperature: float = 1.0):
    """The ``bin`` policy's tail bin at temperature T: log(C − k) + (τ − log(C − k)) / T, the
    logsumexp of C − k equal shares of τ, each divided by T (exact at T = 1)."""
    log_rest = math.log(num_classes - k)
    return log_rest + (tail - log_rest) / temperature


def dense_logits(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None,
                 num_classes: int) -> torch.Tensor:
    """[N, C, *spatial] float32 logits rebuilt from a top-k cache: the top k at their ids, every
    other class at :func:`tail_share` (or :data:`ABSENT` when the cache is dense or has no tail).
    At T = 1 their softmax is the ``bin`` policy's distribution."""
    k = values.shape[1]
    shape = (values.shape[0], num_classes, *values.shape[2:])
    if k == num_classes or tail is None:
        base = torch.full(shape, ABSENT, dtype=torch.float32, device=values.device)
    else:
        base = tail_share(tail.float(), num_classes, k).unsqueeze(1).expand(shape).clone()
    return base.scatter(1, indices.long(), values.float())


#: what the logit standardisation adds to the standard deviation (the authors' code's ε): a position whose
#: logits are all equal becomes zeros
STD_EPS = 1e-7


def zscore(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR
    2024): ``(z − mean(z)) / (std(z) + ε)`` over ``dim`` (the classes), the standard deviation with
    Bessel's correction (1 / (C − 1)) as the authors' code takes it (``torch.std``), ε = :data:`STD_EPS`.
    The variance is floored at 1e-30 before its square root, so equal logits have a finite gradient."""
    mean = logits.mean(dim, keepdim=True)
    centred = logits - mean
    var = centred.pow(2).sum(dim, keepdim=True) / (logits.shape[dim] - 1)
    return centred / (var.clamp_min(1e-30).sqrt() + STD_EPS)


def standardized_topk(values: torch.Tensor, tail: torch.Tensor | None,
                      num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A top-k cache's values [N, k, …] and tail [N, …] after :func:`zscore` of the teacher's C logits,
    both float32.

    The C − k classes outside the top k are taken as equal shares x = τ − log(C − k) (:func:`tail_share`,
    the kernel's ``bin`` assumption), so the mean and the standard deviation over the C classes are
    μ = (Σ_K v + (C − k) x) / C and σ² = (Σ_K (v − μ)² + (C − k)(x − μ)²) / (C − 1); each value becomes
    (v − μ) / (σ + ε) and each share x' = (x − μ) / (σ + ε), whose log-sum-exp is the new tail
    τ' = log(C − k) + x'. Exact for a dense cache (k = C, no tail). The order of the values is kept
    (σ + ε > 0)."""
    v = values.float()
    k = v.shape[1]
    if tail is None or k >= num_classes:  # a cache without a tail is dense
        return zscore(v), None
    rest = num_classes - k
    share = tail_share(tail.float(), num_classes, k).unsqueeze(1)  # [N, 1, …]
    mean = (v.sum(1, keepdim=True) + rest * share) / num_classes
    var = ((v - mean).pow(2).sum(1, keepdim=True) + rest * (share - mean).pow(2)) / (num_classes - 1)
    sd = var.clamp_min(1e-30).sqrt() + STD_EPS
    return (v - mean) / sd, math.log(rest) + ((share - mean) / sd).squeeze(1)


def topk_mass(values, tail, num_classes: int, temperature: float = 1.0) -> np.ndarray:
    """The probability the top k hold at ``temperature`` under the ``bin`` policy, per position
    (``values`` [k, …], ``tail`` […] or None for a dense cache: 1): 1 − p_tail."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float64)) / temperature
    if tail is None:
        return np.ones(tuple(v.shape[1:]))
    a_tail = tail_bin_logit(torch.as_tensor(np.asarray(tail, dtype=np.float64)), num_classes, v.shape[0],
                            temperature)
    logp = torch.log_softmax(torch.cat([v, a_tail[None]]), dim=0)
    return (1.0 - logp[-1].exp()).numpy()


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
    a_tail = tail_bin_logit(tail.double(), num_classes, k, temperature)
    logp = torch.log_softmax(torch.cat([v, a_tail.unsqueeze(1)], dim=1), dim=1)
    per_tail_class = tail_share(logp[:, k:k + 1], num_classes, k)  # the bin's probability in equal shares
    out = per_tail_class.expand(out_shape).clone()
    return out.scatter(1, idx, logp[:, :k])


def teacher_confidence(values, indices, tail) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-1 probability at T = 1 and its class, per position ([N, k, …] maps)."""
    v = values.float()
    lse = torch.logsumexp(v, dim=1)
    if tail is not None:
        lse = torch.logaddexp(lse, tail.float())
    return (v[:, 0] - lse).exp(), indices[:, 0].long()


def add_to_histogram(hist: np.ndarray, conf: torch.Tensor, labels: torch.Tensor) -> None:
    """Count each position's confidence into its class's row of ``hist`` [C, BINS]."""
    b = np.minimum((conf.numpy().ravel() * BINS).astype(np.int64), BINS - 1)
    np.add.at(hist, (labels.numpy().ravel(), b), 1)


def thresholds_from_histogram(hist: np.ndarray, keep: float) -> np.ndarray:
    """t_c for every class: the confidence above which the most confident ``keep`` of class c's
    counted pixels lie (to 1/BINS, rounded down: at least that share is kept); a class never
    counted gets 1 (the global threshold rules it)."""
    out = np.ones(hist.shape[0])
    for c in range(hist.shape[0]):
        n = hist[c].sum()
        if n == 0:
            continue
        above = np.cumsum(hist[c][::-1])  # pixels in the top bins, from the most confident down
        j = int(np.searchsorted(above, keep * n))  # the first bin (from the top) reaching the share
        out[c] = (BINS - 1 - min(j, BINS - 1)) / BINS
    return out
