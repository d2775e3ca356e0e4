"""``topk_kl``: the one entry point to the fused top-k softmax-KL loss (the loss contract of docs/design.md).

``backend="auto"`` picks Triton for CUDA tensors and Numba for CPU tensors; ``"torch"`` is the
readable reference (any dtype, float64 included, differentiated by autograd), the oracle of the
tests. Both fused paths are PyTorch custom operators (``torch.library``), so ``torch.compile`` traces
through them: on CUDA a forward launch that keeps per-position statistics and a backward launch that
writes the gradient (:mod:`kdcache.kernels.triton_op`); on the CPU one Numba pass that computes the
loss and its gradient, which the backward scales by the incoming gradient (``kdcache::topk_kl_numba``).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np
import torch

from kdcache.kernels.reference import topk_kl_reference

REDUCTIONS = ("mean", "sum", "none")
TAILS = ("bin", "renormalize")
BACKENDS = ("auto", "triton", "numba", "torch")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IDS = (torch.uint8, torch.int16, torch.int32, torch.int64)


class KernelInputError(ValueError):
    """Inputs that do not satisfy the loss contract (shapes, dtypes, ids, temperature)."""


#: (device, C) pairs whose teacher ids a ``check_inputs="first"`` call has validated in this process
_IDS_CHECKED: set[tuple[str, int]] = set()


def _check(student, values, indices, tail, temperature, ignore_mask, reduction, tail_policy, labels,
           backend, check_values: bool | str) -> None:
    if reduction not in REDUCTIONS:
        raise KernelInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if tail_policy not in TAILS:
        raise KernelInputError(f"tail must be one of {TAILS}, got {tail_policy!r}")
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise KernelInputError(f"temperature must be a positive number, got {temperature!r}")
    if student.dim() < 2:
        raise KernelInputError(f"student logits must be [N, C] or [N, C, *spatial], got shape {tuple(student.shape)}")
    if student.dtype not in _FLOATS:
        raise KernelInputError(f"student logits must be float32, float16 or bfloat16 (float64 for the torch backend), got {student.dtype}")
    N, C, *spatial = student.shape
    if values.dim() != student.dim() or values.shape[0] != N or list(values.shape[2:]) != spatial:
        raise KernelInputError(
            f"teacher_values must be [N, k, *spatial] = [{N}, k, {', '.join(map(str, spatial))}] to match the "
            f"student's {tuple(student.shape)}, got {tuple(values.shape)}")
    k = values.shape[1]
    if not 1 <= k <= C:
        raise KernelInputError(f"k = {k} teacher values per position, but the student has C = {C} classes (need 1 <= k <= C)")
    if values.dtype not in (torch.float16, torch.float32, torch.bfloat16, torch.float64):
        raise KernelInputError(f"teacher_values must be float16 or float32, got {values.dtype}")
    if indices.shape != values.shape:
        raise KernelInputError(f"teacher_indices must have the shape of teacher_values {tuple(values.shape)}, got {tuple(indices.shape)}")
    if indices.dtype not in _IDS:
        raise KernelInputError(f"teacher_indices must be uint8, int16, int32 or int64, got {indices.dtype}")
    if indices.dtype == torch.uint8 and C > 256:  # shapes alone: no host synchronisation
        raise KernelInputError(f"teacher_indices are uint8, which hold class ids up to 255, but the student has C = {C} "
                               "classes (ids above 255 wrap around in uint8): pass them as int16 or wider")
    if tail is not None and (tail.dim() != student.dim() - 1 or tail.shape[0] != N or list(tail.shape[1:]) != spatial):
        raise KernelInputError(f"teacher_tail must be [N, *spatial] = {(N, *spatial)}, got {tuple(tail.shape)}")
    if tail_policy == "bin" and k < C and tail is None:
        raise KernelInputError("tail='bin' with k < C needs teacher_tail (the log-sum-exp of the teacher logits "
                               "outside the top k); pass it, or use tail='renormalize'")
    if ignore_mask is not None and (ignore_mask.shape != (N, *spatial) or ignore_mask.dtype != torch.bool):
        raise KernelInputError(f"ignore_mask must be bool [N, *spatial] = {(N, *spatial)}, got {ignore_mask.dtype} {tuple(ignore_mask.shape)}")
    if labels is not None and (labels.shape != (N, *spatial) or labels.dtype.is_floating_point):
        raise KernelInputError(f"labels must be integer [N, *spatial] = {(N, *spatial)}, got {labels.dtype} {tuple(labels.shape)}")
    for name, t in (("teacher_values", values), ("teacher_indices", indices), ("teacher_tail", tail),
                    ("ignore_mask", ignore_mask), ("labels", labels)):
        if t is not None and t.device != student.device:
            raise KernelInputError(f"{name} is on {t.device} but the student logits are on {student.device}")
    if check_values == "first":
        key = (str(student.device), C)
        check_values = key not in _IDS_CHECKED
        _IDS_CHECKED.add(key)
    if check_values:
        # one host synchronisation (on a GPU: the host waits for everything queued before it)
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= C:
            raise KernelInputError(f"teacher_indices hold class ids in [{lo}, {hi}], outside [0, {C})")


def _views(student, values, indices, tail, ignore_mask, labels):
    """[N, C, P] views (P = prod(spatial), 1 for rows) with contiguous positions."""
    N, C = student.shape[:2]
    k = values.shape[1]
    P = int(np.prod(student.shape[2:])) if student.dim() > 2 else 1
    s = student.reshape(N, C, P)
    if P > 1 and s.stride(2) != 1:
        s = s.contiguous()
    v = values.reshape(N, k, P).contiguous()
    i = indices.reshape(N, k, P).contiguous()
    t = tail.reshape(N, P).contiguous() if tail is not None else None
    ign = ignore_mask.reshape(N, P).contiguous() if ignore_mask is not None else None
    lab = labels.reshape(N, P).contiguous() if labels is not None else None
    return s, v, i, t, ign, lab


def _scales(ignore_mask, labels, ignore_index, ce_weight, reduction, N, P, kd_weight) -> np.ndarray:
    """[kd_scale, ce_scale] (float32, on the host: the CPU path's tensors are there, so counting
    costs no launch): 1/count for 'mean', times the KD weight; numpy, not a dozen small torch ops
    a step."""
    f32 = np.float32
    if reduction != "mean":
        return np.array([kd_weight, ce_weight], dtype=f32)
    kd_count = N * P if ignore_mask is None else ignore_mask.numel() - int(np.count_nonzero(ignore_mask.numpy()))
    ce = f32(0.0)
    if labels is not None:
        count = int(np.count_nonzero(labels.numpy() != ignore_index))
        ce = f32(ce_weight) / f32(max(count, 1))
    return np.array([f32(1.0) / f32(max(kd_count, 1)) * f32(kd_weight), ce], dtype=f32)


def numba_forward(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None,
                  ignore_mask: torch.Tensor | None, labels: torch.Tensor | None, T: float, tail_policy: str,
                  reduction: str, ignore_index: int, kd_weight: float,
                  ce_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: (loss, its gradient with respect to the student), from one Numba pass."""
    N, C = student.shape[:2]
    spatial = student.shape[2:]
    s, v, i, t, ign, lab = _views(student, values, indices, tail, ignore_mask, labels)
    P = s.shape[2]
    k = v.shape[1]
    with_tail = tail_policy == "bin" and k < C
    scales = _scales(ign, lab, ignore_index, ce_weight, reduction, N, P, float(kd_weight))
    grad, loss = _run_numba(s, v, i, t if with_tail else None, ign, lab, T, with_tail, ignore_index, scales,
                            reduction == "none")
    if reduction == "none":
        loss = loss.view(N, *spatial)
    return loss, grad.to(student.dtype).view(student.shape)


# a PyTorch custom operator (torch.library), so that torch.compile traces a step through the CPU loss too
_numba_op = torch.library.custom_op("kdcache::topk_kl_numba", numba_forward, mutates_args=())


@_numba_op.register_fake
def _(student, values, indices, tail, ignore_mask, labels, T, tail_policy, reduction, ignore_index, kd_weight,
      ce_weight):
    shape = (student.shape[0], *student.shape[2:]) if reduction == "none" else ()
    return student.new_empty(shape, dtype=torch.float32), torch.empty_like(student)


def _numba_setup(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return grad * grad_out.unsqueeze(1).to(grad.dtype)
    return grad * grad_out.to(grad.dtype)


def _numba_backward(ctx, grad_out, _grad_of_grad):
    """The traced backward (torch.compile): the stored gradient times the incoming one, no branch on
    its value (a traced value cannot be read)."""
    (grad,) = ctx.saved_tensors
    return _scaled(grad, grad_out, ctx.reduction), None, None, None, None, None, None, None, None, None, None, None


_numba_op.register_autograd(_numba_backward, setup_context=_numba_setup)


class _NumbaEager(torch.autograd.Function):
    """Eager code's way to the same Numba pass (less host time than the operator's dispatch); its
    backward skips the multiply when the incoming gradient is 1, as ``loss.backward()`` gives."""

    @staticmethod
    def forward(ctx, *args):
        loss, grad = numba_forward(*args)
        ctx.reduction = args[8]
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.reduction != "none" and float(grad_out) == 1.0:  # a CPU scalar: reading it costs nothing
            return (grad,) + (None,) * 11
        return (_scaled(grad, grad_out, ctx.reduction),) + (None,) * 11


def numba_layout(C: int, P: int) -> str:
    """Which Numba kernel takes [N, C, P]: ``spatial`` (pixels innermost, float32, vectorised along
    pixels) for maps, ``rows`` (classes innermost, float32 vectorised along them) for rows and maps of few positions."""
    return "spatial" if P >= 64 else "rows"


def _bytes(x: torch.Tensor) -> np.ndarray:
    """A tensor's memory as a flat uint8 array (a view when it is contiguous)."""
    return x.contiguous().numpy().reshape(-1).view(np.uint8)


def _run_numba(s, v, i, t, ign, lab, T, with_tail, ignore_index, scales, per_position):
    """(gradient [N, C, P] float32, loss): the [N, P] map when ``per_position``, else its sum."""
    # imported on first use, not to dodge a cycle: importing numba (and loading its compiled
    # kernels) takes time that a GPU run or a command without a loss should not pay
    import numba

    # Numba's kernels take torch's thread budget (OMP_NUM_THREADS, torch.set_num_threads, one per
    # process under torchrun), and the call leaves torch's as it was: Numba's OpenMP layer starts its
    # pool at every core and sets the process's OpenMP threads, which torch shares, to that
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        return _numba_call(numba, s, v, i, t, ign, lab, T, with_tail, ignore_index, scales, per_position)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


#: gradient buffers of the CPU path of at least ``GRAD_POOL_MIN_BYTES``, kept for the next call of the
#: same shape: a fresh one of that size comes from the system as new pages, which the kernel then faults
#: in and the system zeroes (a 37.5 MB gradient: about a quarter of the loss's time on a 2-core Xeon,
#: benchmarks/results/grad-pool-cpu.md). A buffer is reused only when nothing else holds it (its
#: tensors, which keep the array alive, are gone); at most ``GRAD_POOL_SIZE`` are kept
GRAD_POOL_MIN_BYTES = 8 << 20
GRAD_POOL_SIZE = 2
_GRAD_POOL: list[np.ndarray] = []
_GRAD_POOL_LOCK = threading.Lock()


def _free_refs() -> int:
    """What ``sys.getrefcount`` says, in :func:`_grad_buffer`'s loop, of a pooled array that nothing
    else holds: measured here the same way (the list, the local name, the call's argument), because how
    many of its own references the interpreter counts differs between Python versions (3.14 counts
    fewer). A tensor made from the array holds a counted reference of its own."""
    pool = [np.empty(1, dtype=np.float32)]
    a = pool[0]
    return sys.getrefcount(a)


_FREE_REFS = _free_refs()


#: where the gradient buffers of the CPU path start: a cache line (64 bytes). numpy starts a large array
#: 16 bytes past one, so every 512-bit store of the kernel would cross two lines
#: (benchmarks/results/numba-aligned-scratch-cpu.md has the measured difference)
GRAD_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` whose data start at a multiple of :data:`GRAD_ALIGN`
    bytes: a view into a slightly larger array, which it keeps alive."""
    n = math.prod(shape)
    raw = np.empty(n + GRAD_ALIGN // 4, dtype=np.float32)
    off = (-raw.ctypes.data) % GRAD_ALIGN // 4
    return raw[off:off + n].reshape(shape)


def _grad_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` for the kernel to write the gradient into: a pooled one that nothing
    refers to any more, else a new one (pooled when large)."""
    if math.prod(shape) * 4 < GRAD_POOL_MIN_BYTES or GRAD_POOL_SIZE <= 0:
        return _aligned_empty(shape)
    with _GRAD_POOL_LOCK:
        for j in range(len(_GRAD_POOL)):
            a = _GRAD_POOL[j]
            if a.shape == shape and sys.getrefcount(a) == _FREE_REFS:  # no tensor holds it
                _GRAD_POOL.append(_GRAD_POOL.pop(j))  # the most recently used last
                return a
        a = _aligned_empty(shape)
        _GRAD_POOL.append(a)
        del _GRAD_POOL[:-GRAD_POOL_SIZE]  # the least recently used go (one in use lives on in its tensor)
        return a


def _numba_call(numba, s, v, i, t, ign, lab, T, with_tail, ignore_index, scales, per_position):
    from kdcache.kernels.numba_columns import column_kernel
    from kdcache.kernels.numba_kl import block_pixels, kl_rows, kl_spatial

    N, C, P = s.shape
    s32 = s.detach().float().contiguous().numpy()  # read in place when it is fp32
    ign_np = ign.contiguous().numpy() if ign is not None else np.zeros((1, 1), dtype=np.bool_)
    lab_np = lab.long().contiguous().numpy() if lab is not None else np.zeros((1, 1), dtype=np.int64)
    grad = _grad_buffer((N, C, P))
    args = (float(T), with_tail, ign is not None, lab is not None, int(ignore_index), float(scales[0]),
            float(scales[1]))
    if numba_layout(C, P) == "spatial":
        # one compiled variant for every dtype: the teacher goes in as raw bytes with flags. The cache's
        # own types (fp16 values and tail, uint8 ids) are read in place, others converted to fp32 / int32
        half = v.dtype == torch.float16 and (t is None or t.dtype == torch.float16)
        ids8 = i.dtype == torch.uint8
        vv = _bytes(v if half else v.float())
        tt = _bytes(t if half else t.float()) if t is not None else np.zeros(4, np.uint8)
        idx = _bytes(i if ids8 else i.to(torch.int32))
        block = block_pixels(C)
        # flat either way (the [N, P] map or one partial sum per task): one compiled signature, not two
        loss = np.empty(N * P if per_position else N * -(-P // block), dtype=np.float64)
        columns = column_kernel(C, v.shape[1], with_tail, ign is not None, lab is not None,
                                lab is not None and float(T) != 1.0) if C <= COLUMN_MAX_CLASSES else None
        if columns is not None:  # few classes: the kernel generated for this (C, k), a pixel's column in registers
            columns(s32, vv.view(np.int16) if half else vv.view(np.float32), idx if ids8 else idx.view(np.int32),
                    tt.view(np.int16) if half else tt.view(np.float32), ign_np.reshape(-1), lab_np.reshape(-1),
                    float(T), float(scales[0]), float(scales[1]), int(ignore_index), grad, loss, per_position, block,
                    numba.get_num_threads())
        else:
            kl_spatial(s32, vv, idx, tt, v.shape[1], half, ids8, ign_np, lab_np, *args, grad, loss, per_position,
                       block, numba.get_num_threads())
        out = torch.from_numpy(loss.reshape(N, P)).float() if per_position else torch.tensor(loss.sum(),
                                                                                              dtype=torch.float32)
        return torch.from_numpy(grad), out
    # one compiled specialisation: fp32 teacher, int32 ids (a copy of k values per position)
    v32 = v.float().contiguous().numpy()
    idx = i.to(torch.int32).contiguous().numpy()
    tail = t.float().contiguous().numpy() if t is not None else np.zeros((1, 1), dtype=np.float32)
    loss = np.empty((N, P), dtype=np.float32)
    kl_rows(s32, v32, idx, tail, ign_np, lab_np, *args, grad, loss, numba.get_num_threads())
    out = torch.from_numpy(loss) if per_position else loss.astype(np.float64).sum()
    return torch.from_numpy(grad), torch.as_tensor(out, dtype=torch.float32)


#: up to this many classes a map takes the kernel generated for its (C, k) (kernels/numba_columns.py: a
#: pixel's column in registers; compiled on its first use, a few seconds, then kept on disk), above it
#: ``kl_spatial``: a column of more classes than the 32 vector registers hold spills.
#: benchmarks/results/numba-columns-cpu.md times the two side by side
COLUMN_MAX_CLASSES = 24

NUMBA_KERNELS = ("spatial", "rows", "resample")


def compile_numba(kernels: tuple[str, ...] = NUMBA_KERNELS) -> dict[str, str]:
    """Compile the Numba kernels now (``spatial`` for maps, ``rows`` for rows, ``resample`` for
    the loader's targets, nearest and ``--target-resample bilinear``), or load them from Numba's on-disk cache, on tiny
    inputs (a summed loss and a per-position map, which share one compiled signature of each loss
    kernel), so that no training step pays for it. The first compile takes tens of
    seconds (two processes, one kernel each, share it between the cores); Numba then keeps them
    next to ``kernels/numba_kl.py``, or under ``NUMBA_CACHE_DIR`` (or ``~/.cache/numba`` where the
    package folder is read-only), and a later process only loads them. Returns, per kernel, ``"compiled"`` or ``"cached"``."""
    from kdcache.kernels.numba_kl import kl_rows, kl_spatial
    from kdcache.kernels.numba_resample import bilinear_topk, warm, warm_nearest

    unknown = sorted(set(kernels) - set(NUMBA_KERNELS))
    if unknown:
        raise KernelInputError(f"compile_numba takes kernels {', '.join(NUMBA_KERNELS)}, got {', '.join(unknown)}")
    g = torch.Generator().manual_seed(0)
    for name in kernels:
        if name == "resample":  # the loader's two ways: --target-resample bilinear and the default nearest
            warm()
            warm_nearest()
            continue
        P = 64 if name == "spatial" else 1  # a map long enough for the spatial kernel, or a row
        # kl_spatial's maps have more classes than the generated kernels take (those compile per (C, k), on first use)
        C = max(3, COLUMN_MAX_CLASSES + 1) if name == "spatial" else 3
        assert numba_layout(C, P) == name
        s = torch.randn(1, C, P, generator=g)
        values, ids = torch.randn(1, 2, P, generator=g).sort(dim=1, descending=True)[0].half(), torch.zeros(
            1, 2, P, dtype=torch.uint8)
        ids[:, 1] = 1
        for reduction in ("mean", "none"):
            topk_kl(s, values, ids, torch.zeros(1, P, dtype=torch.float16), temperature=2.0, reduction=reduction,
                    backend="numba")
    compiled = {"spatial": kl_spatial, "rows": kl_rows, "resample": bilinear_topk}
    return {name: "cached" if sum(compiled[name].stats.cache_hits.values())
            and not sum(compiled[name].stats.cache_misses.values()) else "compiled" for name in kernels}


def triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def check_interpreter(triton_version: str, numpy_version: str) -> None:
    """Triton 3.6's CPU interpreter fails on every loop over a runtime bound with numpy 2.4 or later
    ("only 0-dimensional arrays can be converted to Python scalars"); 3.6 with numpy 2.2 or 2.3, and
    3.9 with numpy 2.4, run (checked here). One line instead of the interpreter's traceback."""
    if _version(triton_version) <= (3, 6) and _version(numpy_version) >= (2, 4):
        raise KernelInputError(
            f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) does not run with numpy {numpy_version}: "
            f"pip install 'numpy<2.4', or a Triton newer than 3.6")


def topk_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
            teacher_tail: torch.Tensor | None = None, *, temperature: float = 1.0,
            ignore_mask: torch.Tensor | None = None, reduction: str = "mean", tail: str = "bin",
            backend: str = "auto", labels: torch.Tensor | None = None, ignore_index: int = 255,
            ce_weight: float = 1.0, weight: float = 1.0, check_inputs: bool | str = "first") -> torch.Tensor:
    """T² × KL(teacher ‖ student) from a top-k teacher, fused with its gradient.

    ``student_logits`` [N, C] or [N, C, *spatial] (fp32/fp16/bf16, differentiable);
    ``teacher_values`` [N, k, *spatial] raw teacher logits sorted descending (fp16/fp32);
    ``teacher_indices`` their class ids (uint8/int16/int32/int64); ``teacher_tail`` [N, *spatial]
    the log-sum-exp of the teacher logits outside the top k (needed by ``tail="bin"`` when k < C);
    ``ignore_mask`` bool [N, *spatial], True = ignored. ``reduction``: ``mean`` over non-ignored
    positions (all ignored gives 0 and a zero gradient), ``sum`` or ``none`` (a map).
    ``labels`` (+ ``ignore_index``) adds ``ce_weight`` × the cross-entropy at T = 1 in the same
    pass. ``weight`` multiplies the KD term inside the kernel (a method's weight: no extra launch).
    ``check_inputs`` validates the teacher's class ids against C, which reads them back to the
    host (a synchronisation on a GPU): ``"first"`` (the default) on the first call for each device
    and C in the process, so a training loop pays it once; ``True`` on every call; ``False`` never.
    Shapes, dtypes, k and the temperature are always checked.
    """
    _check(student_logits, teacher_values, teacher_indices, teacher_tail, temperature, ignore_mask,
           reduction, tail, labels, backend, check_inputs)
    if backend == "auto":
        backend = "triton" if student_logits.device.type == "cuda" else "numba"
    if backend == "torch":
        return topk_kl_reference(student_logits, teacher_values, teacher_indices, teacher_tail,
                                 temperature=temperature, ignore_mask=ignore_mask, reduction=reduction,
                                 tail=tail, labels=labels, ignore_index=ignore_index, ce_weight=ce_weight,
                                 weight=weight)
    if student_logits.dtype == torch.float64:
        raise KernelInputError("float64 student logits run on the torch backend only (backend='torch')")
    if backend == "numba" and student_logits.device.type != "cpu":
        raise KernelInputError("the numba backend runs on CPU tensors; use backend='triton' (or 'auto') for CUDA")
    if backend == "triton" and not triton_usable(student_logits.device):
        raise KernelInputError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if backend == "triton" and student_logits.device.type != "cuda":
        import triton  # present: TRITON_INTERPRET=1 runs it

        check_interpreter(triton.__version__, np.__version__)
    if backend == "numba":
        args = (student_logits, teacher_values, teacher_indices, teacher_tail, ignore_mask, labels, float(temperature),
                tail, reduction, int(ignore_index), float(weight), float(ce_weight))
        if torch.compiler.is_compiling():
            return _numba_op(*args)[0]
        return _NumbaEager.apply(*args)
    from kdcache.kernels.triton_op import topk_kl_triton

    return topk_kl_triton(student_logits, teacher_values, teacher_indices, teacher_tail, ignore_mask, labels,
                          float(temperature), tail == "bin" and teacher_values.shape[1] < student_logits.shape[1],
                          reduction, int(ignore_index), float(weight), float(ce_weight))
