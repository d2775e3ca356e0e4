"""The Triton loss as PyTorch custom operators: ``kdcache::topk_kl_forward`` and ``kdcache::topk_kl_backward``.

Registered with ``torch.library`` (each with a fake implementation that gives its outputs' shapes,
and the pair tied by ``register_autograd``), so that ``torch.compile`` traces a student's step
through the KD term without a graph break and CUDA graphs capture it: one launch forward, one
backward, no host synchronisation.

Between the two launches only per-position statistics live (2 fp32 values a position with the tail
bin, 1 without, 3 with labels at T ≠ 1), never an [N, C, P] tensor. The student is read in place in
either memory format: NCHW (pixels contiguous) or ``channels_last`` (classes contiguous); the
gradient is written in the student's dtype and memory format.
"""

from __future__ import annotations

import math

import torch

from kdcache.kernels import triton_kl

REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}

# one zeroed ticket counter per (device, stream): the forward's last program resets it to 0, so it is
# allocated once; launches on one stream run in order and never share it concurrently
_TICKETS: dict[tuple, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    t = _TICKETS.get(key)
    if t is None:
        t = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _as_ncp(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[N, C, *spatial] -> an [N, C, P] view and its pixel stride, in place for NCHW and channels_last
    (a copy only for other layouts); rows [N, C] -> [N, C, 1] with classes contiguous."""
    N, C = x.shape[:2]
    P = math.prod(x.shape[2:])
    v = x.reshape(N, C, P)
    if P == 1:
        if v.stride(1) != 1:
            v = v.contiguous()
        return v, 1
    if v.stride(2) != 1 and v.stride(1) != 1:
        v = v.contiguous()
    return v, v.stride(2)


def _flat(x: torch.Tensor | None, N: int, P: int, rows: int = 0) -> torch.Tensor | None:
    if x is None:
        return None
    return x.reshape(N, rows, P).contiguous() if rows else x.reshape(N, P).contiguous()


def _prepare(student, values, indices, tail, ignore_mask, labels):
    N, C = student.shape[:2]
    k = values.shape[1]
    s, s_sp = _as_ncp(student)
    P = s.shape[2]
    v = _flat(values, N, P, k)
    i = _flat(indices, N, P, k)
    t = _flat(tail, N, P)
    ign = _flat(ignore_mask, N, P)
    if ign is not None:
        ign = ign.view(torch.uint8)  # the same bytes, no cast launched
    lab = _flat(labels, N, P)
    return s, s_sp, v, i, t, ign, lab


def _lse1(labels, T: float) -> bool:
    return labels is not None and T != 1.0


def forward_impl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None,
                    ignore_mask: torch.Tensor | None, labels: torch.Tensor | None, T: float, with_tail: bool,
                    reduction: str, ignore_index: int, kd_weight: float,
                    ce_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, statistics [3, N·P] fp32, scales [2] fp32): one launch."""
    views = _prepare(student, values, indices, tail, ignore_mask, labels)
    return _forward_views(student.shape, views, labels is not None, T, with_tail, reduction, ignore_index,
                          kd_weight, ce_weight)


def _forward_views(shape: torch.Size, views: tuple, has_labels: bool, T: float, with_tail: bool, reduction: str,
                   ignore_index: int, kd_weight: float,
                   ce_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_impl` on the [N, C, P] views :func:`_prepare` made of a student of ``shape``."""
    s, s_sp, v, i, t, ign, lab = views
    N, C, P = s.shape
    k = v.shape[1]
    code = REDUCTION_CODES[reduction]
    dev = s.device
    lse1 = has_labels and T != 1.0
    stats = torch.empty((3, N * P), dtype=torch.float32, device=dev)
    scales = torch.empty(2, dtype=torch.float32, device=dev)
    out = torch.empty((N, *shape[2:]) if code == 2 else (), dtype=torch.float32, device=dev)
    # the launch settings once for the call (the forward launch and the partial sums' rows)
    cfg = triton_kl.launch_config(C, P, k, s.element_size(), s_sp, lse1)
    part = torch.empty((triton_kl.programs_of(N, P, cfg) if code != 2 else 1, 4), dtype=torch.float32, device=dev)
    triton_kl.forward(s, v, i, t if with_tail else None, ign, lab, stats, part, _ticket(dev), out, scales,
                      T=T, with_tail=with_tail, lse1=lse1, ignore_index=ignore_index,
                      kd_weight=kd_weight, ce_weight=ce_weight, reduction=code, s_sp=s_sp, cfg=cfg)
    return out, stats, scales


topk_kl_forward = torch.library.custom_op("kdcache::topk_kl_forward", forward_impl, mutates_args=())


@topk_kl_forward.register_fake
def _(student, values, indices, tail, ignore_mask, labels, T, with_tail, reduction, ignore_index, kd_weight,
      ce_weight):
    N = student.shape[0]
    P = math.prod(student.shape[2:])
    out = student.new_empty((N, *student.shape[2:]) if reduction == "none" else (), dtype=torch.float32)
    return out, student.new_empty((3, N * P), dtype=torch.float32), student.new_empty(2, dtype=torch.float32)


def backward_impl(grad_out: torch.Tensor, student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     tail: torch.Tensor | None, ignore_mask: torch.Tensor | None, labels: torch.Tensor | None,
                     stats: torch.Tensor, scales: torch.Tensor, T: float, with_tail: bool, reduction: str,
                     ignore_index: int, kd_weight: float, ce_weight: float) -> torch.Tensor:
    """The gradient with respect to the student, in its dtype and memory format: one launch."""
    views = _prepare(student, values, indices, tail, ignore_mask, labels)
    return _backward_views(grad_out, student, views, stats, scales, T, with_tail, reduction, ignore_index,
                           kd_weight, ce_weight)


def _backward_views(grad_out: torch.Tensor, student: torch.Tensor, views: tuple, stats: torch.Tensor,
                    scales: torch.Tensor, T: float, with_tail: bool, reduction: str, ignore_index: int,
                    kd_weight: float, ce_weight: float) -> torch.Tensor:
    """:func:`backward_impl` on the [N, C, P] views :func:`_prepare` made of ``student`` and its teacher."""
    s, s_sp, v, i, t, ign, lab = views
    N = s.shape[0]
    grad = torch.empty_like(student)
    g, g_sp = _as_ncp(grad)
    assert g.data_ptr() == grad.data_ptr(), "the gradient's [N, C, P] view must alias it"
    code = REDUCTION_CODES[reduction]
    go = grad_out.reshape(N * s.shape[2]).contiguous() if code == 2 else grad_out
    triton_kl.backward(go, s, v, i, t if with_tail else None, ign, lab, stats, scales, g, T=T,
                       with_tail=with_tail, lse1=_lse1(lab, T), ignore_index=ignore_index,
                       kd_weight=kd_weight, ce_weight=ce_weight, reduction=code, s_sp=s_sp, g_sp=g_sp)
    return grad


topk_kl_backward = torch.library.custom_op("kdcache::topk_kl_backward", backward_impl, mutates_args=())


@topk_kl_backward.register_fake
def _(grad_out, student, values, indices, tail, ignore_mask, labels, stats, scales, T, with_tail, reduction,
      ignore_index, kd_weight, ce_weight):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, values, indices, tail, ignore_mask, labels, T, with_tail, reduction, ignore_index, kd_weight, \
        ce_weight = inputs
    _, stats, scales = output
    ctx.save_for_backward(student, values, indices, tail, ignore_mask, labels, stats, scales)
    ctx.args = (T, with_tail, reduction, ignore_index, kd_weight, ce_weight)
    ctx.mark_non_differentiable(stats, scales)
    ctx.set_materialize_grads(False)  # no zero-filled gradients made for the statistics: no launches for them


def _backward(ctx, grad_out, _grad_stats, _grad_scales):
    student, values, indices, tail, ignore_mask, labels, stats, scales = ctx.saved_tensors
    grad = topk_kl_backward(grad_out, student, values, indices, tail, ignore_mask, labels, stats, scales, *ctx.args)
    return grad, None, None, None, None, None, None, None, None, None, None, None


topk_kl_forward.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same two launches for eager code, through a plain autograd function: a custom operator's
    dispatch and argument handling add host time to every call (benchmarks/results/
    loss-host-overhead-cpu.md), and a small student's step is bound by the host. Traced code (``torch.compile``) takes the custom operators."""

    @staticmethod
    def forward(ctx, student, values, indices, tail, ignore_mask, labels, T, with_tail, reduction, ignore_index,
                kd_weight, ce_weight):
        views = _prepare(student, values, indices, tail, ignore_mask, labels)
        args = (T, with_tail, reduction, ignore_index, kd_weight, ce_weight)
        out, stats, scales = _forward_views(student.shape, views, labels is not None, *args)
        # the backward reads the same [N, C, P] views: kept, not made again (a dozen reshapes and
        # stride queries of host time a step). Not a copy of the student (a layout other than NCHW and
        # channels_last): no [N, C, P] tensor lives between the two launches, so the backward makes it again
        s, s_sp, v, i, t, ign, lab = views
        ctx.save_for_backward(student, s if s.data_ptr() == student.data_ptr() else None, v, i, t, ign, lab, stats,
                              scales)
        ctx.s_sp = s_sp
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, s, v, i, t, ign, lab, stats, scales = ctx.saved_tensors
        if s is None:
            s = _as_ncp(student)[0]
        grad = _backward_views(grad_out, student, (s, ctx.s_sp, v, i, t, ign, lab), stats, scales, *ctx.args)
        return grad, None, None, None, None, None, None, None, None, None, None, None


def topk_kl_triton(student, values, indices, tail, ignore_mask, labels, T: float, with_tail: bool, reduction: str,
                   ignore_index: int, kd_weight: float, ce_weight: float) -> torch.Tensor:
    """The loss: the custom operators under ``torch.compile``, the same launches through a plain
    autograd function in eager code. Either way the autograd graph keeps the statistics, not a gradient."""
    args = (student, values, indices, tail if with_tail else None, ignore_mask, labels, T, with_tail, reduction,
            ignore_index, kd_weight, ce_weight)
    if torch.compiler.is_compiling():
        return topk_kl_forward(*args)[0]
    return _Eager.apply(*args)
