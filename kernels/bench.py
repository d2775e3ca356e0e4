"""``kdcache bench-kernels``: the fused top-k KL kernel against eager PyTorch and torch.compile.

Every backend computes forward + backward of a top-k KD loss on the same inputs:

* ``fused``: :func:`kdcache.kernels.topk_kl` (Triton on CUDA, Numba on CPU);
* ``eager``: what one writes in PyTorch — densify the top k (the tail's mass spread over the other
  classes), ``log_softmax`` of the student, ``kl_div``, ``backward``;
* ``compile``: ``torch.compile`` of that eager function.

Per case it reports the median time of forward + backward (the backends take turns, one call each,
so that each runs after the same neighbours), and for the fused kernel its forward and its backward
alone; the bytes at the one-pass floor (student read once, teacher values + ids + tail read, gradient
written) and the bytes the fused kernels actually move (on CUDA, two launches: the student read in
each, the teacher in each, the per-position statistics written and read back); the device's copy
bandwidth measured in the same run, the % of it reached on the bytes moved, and the share of the
floor (the floor's bytes at the copy rate, over the fused time); and the fused kernel's speed-up over
each other backend. Times are medians over repeats after warm-up. On CUDA each call is timed with
CUDA events after the L2 cache is flushed (a 256 MB buffer written), as ``triton.testing.do_bench``
does, so that no call reads what the previous one left in L2, and behind a spin of the GPU (:class:`Spin`,
about 10 ms) during which the host queues the whole call: the events then time the device alone, as in a
training loop whose host runs ahead of the GPU. The host's time to queue each call is kept beside it
(``host_ms``), and the fused call is also timed from an idle GPU, host included (``fused_call``), the
way a small step bound by its host sees it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from kdcache.core.errors import KDCacheError
from kdcache.core.runs import device_name
from kdcache.core.topk import topk_targets
from kdcache.kernels.api import topk_kl

GPU_SEG = [(8, C, (512, 1024)) for C in (11, 19, 21, 150)]
GPU_ROWS = [(4096, C, ()) for C in (1000, 32000, 128000)]
# on a CPU the GPU shapes take minutes per case; these keep the same structure (said in the output)
CPU_SEG = [(2, 19, (256, 512))] + [(2, C, (128, 256)) for C in (11, 21, 150)]
CPU_ROWS = [(256, 1000, ()), (32, 32000, ()), (8, 128000, ())]


@dataclass
class CaseResult:
    kind: str
    shape: list[int]
    k: int
    dtype: str
    floor_bytes: int
    moved_bytes: int = 0
    ms: dict[str, float] = field(default_factory=dict)
    host_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def gbps(self, backend: str) -> float:
        """GB/s on the bytes the fused kernels move (the floor's for the other backends)."""
        nbytes = self.moved_bytes if backend == "fused" and self.moved_bytes else self.floor_bytes
        return nbytes / (self.ms[backend] * 1e-3) / 1e9


def eager_loss(s: torch.Tensor, v: torch.Tensor, i: torch.Tensor, tail: torch.Tensor, T: float) -> torch.Tensor:
    """Densify the cached top k into full teacher log-probabilities (tail mass spread equally over
    the other classes), then the usual log_softmax + kl_div, T² × mean over positions."""
    C, k = s.shape[1], v.shape[1]
    log_rest = math.log(C - k)
    a = torch.cat([v.float() / T, (log_rest + (tail.float() - log_rest) / T).unsqueeze(1)], 1)
    logp = torch.log_softmax(a, 1)
    dense = (logp[:, k:k + 1] - log_rest).expand(-1, C, *s.shape[2:]).clone()
    dense = dense.scatter(1, i.long(), logp[:, :k])
    log_q = F.log_softmax(s.float() / T, 1)
    kl = F.kl_div(log_q, dense, log_target=True, reduction="sum")
    positions = s.numel() // C
    return kl * (T * T) / positions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class L2Flush:
    """Writes a buffer larger than the GPU's L2 before each timed call (``triton.testing.do_bench``'s way)."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buf.zero_()


#: how long :class:`Spin` holds the GPU before a timed call: far longer than the host takes to queue one
AHEAD_MS = 10.0


class Spin:
    """Holds the GPU for about ``ms`` milliseconds (``torch.cuda._sleep``, its cycles calibrated against
    CUDA events), so that the host queues a whole call before the GPU reaches it. ``cycles`` is 0 where
    this PyTorch lacks ``_sleep``: the calls are then timed from an idle GPU, host included."""

    def __init__(self, device: torch.device, ms: float = AHEAD_MS):
        self.ms = ms
        self.cycles = 0
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return
        with torch.cuda.device(device):
            probe = 1_000_000
            sleep(probe)  # the first call loads the kernel
            per = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                sleep(probe)
                end.record()
                end.synchronize()
                per.append(start.elapsed_time(end))
        self.cycles = int(probe * ms / max(statistics.median(per), 1e-6))

    def __call__(self) -> None:
        if self.cycles:
            torch.cuda._sleep(self.cycles)


def cuda_time_ms(setup, timed, flush: L2Flush, spin: Spin | None = None) -> tuple[float, float]:
    """One call of ``timed(setup())`` on CUDA, L2 flushed first, timed by CUDA events: (ms, the host's
    ms to queue it). With ``spin`` the GPU is held before the start event while the host queues the
    call, so the events time the device alone; without, the call starts from an idle GPU and its
    host overhead counts too."""
    state = setup()
    flush()
    if spin is not None:
        spin()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    timed(state)
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def moved_bytes_cuda(s: torch.Tensor, v: torch.Tensor, i: torch.Tensor, tail: torch.Tensor | None) -> int:
    """Bytes the two CUDA launches move: forward (student, teacher, statistics written), backward
    (student, teacher, statistics read, gradient written)."""
    N, C = s.shape[:2]
    P = s.numel() // (N * C)
    teacher = N * P * v.shape[1] * (v.element_size() + i.element_size()) + (tail.numel() * tail.element_size()
                                                                            if tail is not None else 0)
    stats = N * P * 4 * (2 if tail is not None and v.shape[1] < C else 1)
    student = s.numel() * s.element_size()
    return (student + teacher + stats) + (student + teacher + stats + student)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` (bytes read + written) on ``device``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, 3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(N: int, C: int, spatial: tuple, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    # drawn on the device itself: a GPU case's teacher is 0.5-2.5 GB of logits, slow to draw and
    # sort on the host (on a CPU this is the same generator as before)
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, C, *spatial, generator=g, device=device) * 3).to(dtype=dtype)
    t = torch.randn(N, C, *spatial, generator=g, device=device) * 3
    v, i, tail = topk_targets(t, k)
    del t
    idx_dtype = torch.uint8 if C <= 256 else torch.int32
    return s, v.half(), i.to(idx_dtype), tail.half()


def bench_case(N: int, C: int, spatial: tuple, k: int, *, device: torch.device, dtype: torch.dtype,
               T: float = 2.0, repeats: int = 10, warmup: int = 2, compile_backend: bool = True) -> CaseResult:
    s, v, i, tail = make_inputs(N, C, spatial, k, dtype, device)
    P = s.numel() // (N * C)
    floor = 2 * s.numel() * s.element_size() + N * P * (k * (v.element_size() + i.element_size()) + tail.element_size())
    res = CaseResult("rows" if not spatial else "segmentation", [N, C, *spatial], k, str(dtype).replace("torch.", ""), floor)
    cuda = device.type == "cuda"
    res.moved_bytes = moved_bytes_cuda(s, v, i, tail) if cuda else floor

    def fused():
        x = s.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, temperature=T, check_inputs=False).backward()

    def eager():
        x = s.detach().requires_grad_(True)
        eager_loss(x, v, i, tail, T).backward()

    backends = {"fused": fused, "eager": eager}
    if compile_backend:
        # a fresh compilation per case: dynamo's cache of eager_loss holds 8 shapes at most and past
        # that silently runs it eagerly (the full GPU and CPU lists have 14 cases)
        import torch._dynamo  # seconds to import: only for the --compile rows

        torch._dynamo.reset()
        compiled = torch.compile(eager_loss, dynamic=False)

        def comp():
            x = s.detach().requires_grad_(True)
            compiled(x, v, i, tail, T).backward()

        backends["compile"] = comp
    for name, fn in list(backends.items()):
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
        except Exception as exc:  # e.g. out of memory for eager at the largest shapes
            res.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            del backends[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # round robin: every backend runs in the same surroundings (what ran just before it, the
    # allocator's and the other thread pools' state), which one block per backend would not give
    if not cuda:
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(repeats):
            for name, fn in backends.items():
                times[name].append(time_ms(fn, device, 1, 0))
        res.ms = {name: statistics.median(t) for name, t in times.items()}
        return res
    flush = L2Flush(device)

    def leaf():
        return s.detach().requires_grad_(True)

    def fused_loss(x):
        return topk_kl(x, v, i, tail, temperature=T, check_inputs=False)

    timed = {}
    if "fused" in backends:
        timed["fused"] = (leaf, lambda x: fused_loss(x).backward())
        timed["fused_fwd"] = (leaf, fused_loss)
        timed["fused_bwd"] = (lambda: fused_loss(leaf()), lambda loss: loss.backward())
    if "eager" in backends:
        timed["eager"] = (leaf, lambda x: eager_loss(x, v, i, tail, T).backward())
    if "compile" in backends:
        timed["compile"] = (leaf, lambda x: compiled(x, v, i, tail, T).backward())
    spin = Spin(device)
    times: dict[str, list[float]] = {name: [] for name in timed}
    hosts: dict[str, list[float]] = {name: [] for name in timed}
    if "fused" in timed:
        times["fused_call"] = []
    for _ in range(repeats):
        for name, (setup, fn) in timed.items():
            ms, host = cuda_time_ms(setup, fn, flush, spin)
            times[name].append(ms)
            hosts[name].append(host)
        if "fused" in timed:  # the same call from an idle GPU: its host overhead counts
            times["fused_call"].append(cuda_time_ms(*timed["fused"], flush)[0])
    res.ms = {name: statistics.median(t) for name, t in times.items()}
    res.host_ms = {name: statistics.median(t) for name, t in hosts.items()}
    if spin.cycles:
        slow = [name for name, t in hosts.items() if max(t) > 0.8 * spin.ms]
        if slow:  # the host did not finish queuing before the spin ended: part of its time is in the device's
            res.notes.append(f"the host took longer than the {spin.ms:g} ms spin to queue {', '.join(slow)}: "
                             "part of its time is in the device time")
    else:
        res.notes.append("torch.cuda._sleep is missing: every call timed from an idle GPU, host included")
    return res



#: student dtypes bench-kernels takes, by name
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(device: torch.device, *, quick: bool = False, ks=(4, 8), dtype: str | torch.dtype | None = None,
        repeats: int | None = None, compile_backend: bool = True, progress=None) -> dict:
    """Time every case on ``device`` (``dtype``: the student's, by name or torch dtype; default
    bfloat16 on CUDA, float32 on CPU) at each k of ``ks`` below its classes;
    ``progress(result)`` is called after each case."""
    cuda = device.type == "cuda"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise KDCacheError(f"--dtype must be {', '.join(DTYPES)}, got {dtype}")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    if not ks or min(ks) < 1:
        raise KDCacheError(f"--topk needs positive k values, got {list(ks)}")
    seg, rows = (GPU_SEG, GPU_ROWS) if cuda else (CPU_SEG, CPU_ROWS)
    if quick:
        seg, rows, ks = seg[:1], rows[:1], ks[:1]
    most = max(C for _, C, _ in seg + rows)
    if max(ks) >= most:  # the cache's top k leaves a tail: k below the classes
        raise KDCacheError(f"--topk {max(ks)} is not below the {most} classes of the largest case: give k from 1 to {most - 1}")
    repeats = repeats or (30 if cuda else 5)
    out = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "scaled_down": not cuda,
           "copy_gbps": copy_bandwidth(device, (256 << 20) if cuda else (64 << 20)), "cases": []}
    cases = [(N, C, sp, k) for (N, C, sp) in seg + rows for k in ks if k < C]  # a k of a case's C or past it: not that case
    for N, C, sp, k in cases:
        r = bench_case(N, C, sp, k, device=device, dtype=dtype, repeats=repeats, compile_backend=compile_backend)
        out["cases"].append(asdict(r) | {"gbps": {b: r.gbps(b) for b in r.ms}})
        if progress:
            progress(r)
    return out
