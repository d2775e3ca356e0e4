"""The fused top-k softmax-KL loss: one entry point, Triton on GPU, Numba on CPU, and the
float64-capable PyTorch reference the kernels are tested against; and the loader's compiled
resampling of a top-k + tail cache (:func:`nearest_topk`, :func:`bilinear_topk`).

    from kdcache.kernels import topk_kl
    loss = topk_kl(student_logits, values, indices, tail, temperature=2.0, ignore_mask=mask)
"""

from kdcache.kernels.api import BACKENDS, REDUCTIONS, TAILS, KernelInputError, topk_kl
from kdcache.kernels.reference import topk_kl_reference
from kdcache.kernels.resample import bilinear_topk, nearest_topk, warm_resample

__all__ = ["topk_kl", "topk_kl_reference", "KernelInputError", "BACKENDS", "REDUCTIONS", "TAILS", "bilinear_topk",
           "nearest_topk", "warm_resample"]
