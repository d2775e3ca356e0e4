"""The CPU maps kernel for few classes: one generated kernel per (C, k), a pixel's whole column in registers.

:func:`kdcache.kernels.numba_kl.kl_spatial` walks a block of pixels class by class through scratch
buffers (the block's logits, exponentials and teacher probabilities), because C and k are known only
at run time. Up to ``kernels/api.py``'s ``COLUMN_MAX_CLASSES`` classes this module writes, for one (C, k) and one set of
options (tail bin, ignore mask, labels, a separate cross-entropy at T ≠ 1), the Python source of a kernel
with the classes and the k ids unrolled: a pixel's logits, exponentials and teacher probabilities stay in
registers, the student is read once and the gradient written once, and LLVM vectorises the pixel loop
(16 lanes on AVX-512). The same math as ``kl_spatial`` (the loss contract of docs/design.md), the same
float32 polynomials, the same exact float64 fallback where a pixel's whole student tail underflows
(:func:`exact_tail`, run after the block).

What LLVM needs to vectorise that loop (benchmarks/numba_register_probe.py measured each): the C gradient
rows are separate arguments, views ``grad[n, c]`` that the generated task loop passes, declared
``noalias`` (Numba's compiler flag for it, which its parfors set, is offered to ``@njit`` by
:func:`allow_noalias`, through a private interface: without it this path is off and ``kl_spatial``
runs); a pixel's loss goes to a float32 buffer summed in float64 after the loop.

The generated modules are written once, named by a hash of their source, under :func:`kernel_folder`,
and compiled with Numba's on-disk cache: the first use of a (C, k, options) compiles for a few seconds,
a later process loads it. kdcache writes only files of its own there, and one again only where it no
longer holds the source its name hashes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from numba import njit

_LOCK = threading.Lock()
_LOADED: dict[tuple, object] = {}


def allow_noalias() -> bool:
    """``@njit(noalias=True)``: Numba's ``noalias`` compiler flag (every pointer argument ``noalias``, as
    its parfors compile their kernels) as a CPU target option, which Numba does not offer. False where
    this Numba has no such flag (then the generated kernels are not used)."""
    try:
        from numba.core.compiler import Flags
        from numba.core.cpu import CPUTargetOptions
        from numba.core.options import TargetOptions

        if not hasattr(Flags, "noalias"):
            return False
        if not hasattr(CPUTargetOptions, "noalias"):
            CPUTargetOptions.noalias = TargetOptions.Mapping("noalias")
        return True
    except Exception:  # a Numba whose internals moved: the generic kernel
        return False


def kernel_folder() -> Path:
    """Where the generated modules go (Numba keeps their compiled code beside them, in ``__pycache__``):
    ``NUMBA_CACHE_DIR``/kdcache-columns when that is set, else ``~/.cache/kdcache/numba-columns``, else
    (a home that cannot be written) a folder of this user's under the system's temporary folder."""
    from numba import config

    candidates = []
    if getattr(config, "CACHE_DIR", ""):
        candidates.append(Path(config.CACHE_DIR) / "kdcache-columns")
    candidates.append(Path.home() / ".cache" / "kdcache" / "numba-columns")
    candidates.append(Path(tempfile.gettempdir()) / f"kdcache-numba-columns-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable folder for kdcache's generated kernels: set NUMBA_CACHE_DIR to one")


def _sel_chain(c: int, k: int) -> str:
    """The teacher's probability of class c: q_j where id j is c, else 0 (a pixel's ids are distinct)."""
    p = "_F0"
    for j in reversed(range(k)):
        p = f"_select(d{j} == {c}, q{j}, {p})"
    return p


@functools.cache
def _kernels_version() -> str:
    """A hash of the two modules the generated code compiles from (this one and ``numba_kl.py``, whose
    polynomials it inlines): in the generated source, so that a changed kdcache writes new files and
    never loads code Numba cached for the old ones (its cache checks only the generated file itself)."""
    from kdcache.kernels import numba_kl

    h = hashlib.sha256()
    for path in (Path(__file__), Path(numba_kl.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def source(C: int, k: int, with_tail: bool, use_ign: bool, use_lab: bool, sep_ce: bool) -> str:
    """The Python source of the generated module for C classes, k teacher ids and these options: a block
    kernel (one block of one sample's pixels, the column unrolled) and the task loop that runs it."""
    if not (1 <= k <= C):
        raise ValueError(f"k must be in [1, C], got k={k}, C={C}")
    log_rest = repr(math.log(C - k)) if C > k else "0.0"
    rows = ", ".join(f"g{c}" for c in range(C))
    lines = [
        f'"""Generated by kdcache.kernels.numba_columns for C={C}, k={k}, tail={with_tail}, ignore mask={use_ign}, '
        f'labels={use_lab}, separate cross-entropy={sep_ce}, from kernels {_kernels_version()}. Do not edit: '
        'a changed file is a different kernel."""',
        "import numpy as np",
        "from numba import njit, prange",
        "from kdcache.kernels.numba_kl import (_F, _F0, _F1, _F_TAIL_MIN, _fmax, _select, _to_f32, _prefer_vector_width,",
        "                                      exp2_32, exp32, log32)",
        "from kdcache.kernels.numba_columns import exact_tail",
        "",
        "",
        "@njit(cache=True, nogil=True, error_model='numpy', fastmath={'reassoc', 'nsz', 'contract'}, noalias=True)",
        f"def block_kernel(s1, v1, i1, t1, ig1, lb1, sb, vb, pb, q, L, P, T, kd_scale, ce_scale, ignore_index, {rows}, "
        "klb, altb, badb):",
        "    _prefer_vector_width()",
        "    inv_t = _F(1.0 / T)",
        "    inv_t2 = _F(1.4426950408889634 / T)",
        f"    log_rest = _F({log_rest})",
        "    kd_t = _F(kd_scale * T)",
        "    kd_tt = _F(kd_scale * T * T)",
        "    ce_s = _F(ce_scale)",
        "    Pu = np.uint64(P)",
        "    nbad = _F0",
    ]
    a = lines.append
    for c in range(C):
        a(f"    o{c} = sb + np.uint64({c}) * Pu")
    for j in range(k):
        a(f"    w{j} = vb + np.uint64({j}) * Pu")
    a("    for jj in range(L):")
    a("        u = np.uint64(jj)")
    # the position's weights
    if use_ign:
        a("        kdw = _select(ig1[pb + u], _F0, kd_t)")
    else:
        a("        kdw = kd_t")
    a("        on = kdw != _F0")
    if use_lab:
        a("        y = lb1[pb + u]")
        a("        cew = _select(y == ignore_index, _F0, ce_s)")
    # the teacher's bins: logits / T, their maximum, Z, Σ_K p log p, the tail bin's log probability
    for j in range(k):
        a(f"        a{j} = _to_f32(v1[w{j} + u]) * inv_t")
        a(f"        d{j} = np.int32(i1[w{j} + u])")
    if with_tail:
        a("        at = log_rest + (_to_f32(t1[pb + u]) - log_rest) * inv_t")
        a("        lz = " + "_fmax(" * k + "at" + "".join(f", a{j})" for j in range(k)))
    else:
        a("        lz = " + "_fmax(" * (k - 1) + "a0" + "".join(f", a{j})" for j in range(1, k)))
    a("        ez = _F0")
    if with_tail:
        a("        et = exp32(at - lz)")
        a("        Z = et")
    else:
        a("        Z = _F0")
    for j in range(k):
        a(f"        y{j} = a{j} - lz")
        a(f"        h{j} = exp32(y{j})")
        a(f"        Z += h{j}")
        a(f"        ez += h{j} * y{j}")
    a("        lzp = log32(Z)")
    a("        iz = _F1 / Z")
    a("        ps = _select(on, " + ("(Z - et)" if with_tail else "Z") + " * iz, _F0)")
    a("        kl = _select(on, ez * iz - lzp * ps, _F0)  # ignored positions may hold NaN targets")
    for j in range(k):  # 0 where ignored, whatever the exponential made of a NaN or inf target there
        a(f"        q{j} = _select(on, h{j} * iz, _F0)")
    # the student's column: its maximum, e, Σ e, the tail sum (a sum, never 1 − Σ_K q), Σ_K p (x − m)
    for c in range(C):
        a(f"        x{c} = s1[o{c} + u]")
    a("        m = " + "_fmax(" * (C - 1) + "x0" + "".join(f", x{c})" for c in range(1, C)))
    a("        acc = _F0")
    a("        st = _F0")
    a("        px = _F0")
    if sep_ce:
        a("        acc1 = _F0")
    if use_lab:
        a("        xl = _F0")
    for c in range(C):
        a(f"        r{c} = x{c} - m")
        a(f"        e{c} = exp2_32(r{c} * inv_t2)")
        a(f"        acc += e{c}")
        a(f"        p{c} = {_sel_chain(c, k)}")
        a(f"        st += _select(p{c} > _F0, _F0, e{c})")
        a(f"        px += p{c} * r{c}")
        if sep_ce:
            a(f"        acc1 += exp32(r{c})")
        if use_lab:
            a(f"        xl += _select(y == {c}, x{c}, _F0)")
    a("        la = log32(acc)")
    a("        kl += ps * la - px * inv_t")
    if with_tail:
        a("        pt = et * iz")
        a("        ok = st > _F_TAIL_MIN")
        a("        sts = _select(ok, st, _F1)")
        a("        kl += _select(ok, pt * (at - lz - lzp - (log32(sts) - la)), _F0)")
        a("        stc = _select(ok & on, kdw * pt / sts, _F0)")
        a("        bad = _select(on & (not ok), _F1, _F0)  # the exact fallback's positions")
        a("        altb[jj] = at - lz - lzp")
        a("        badb[jj] = bad")
        a("        nbad += bad")
    a("        kl = _select(on, kd_tt * kl, _F0)")
    if use_lab:
        lse1 = "m + log32(acc1)" if sep_ce else "m + la"
        a(f"        kl += _select(cew != _F0, cew * ({lse1} - xl), _F0)")
    a("        klb[jj] = kl")
    # the gradient of every class, written once
    if sep_ce:
        a("        coef = kdw / acc")
        a("        cef = cew / acc1")
    else:
        a("        coef = " + ("(kdw + cew) / acc" if use_lab else "kdw / acc"))
    for c in range(C):
        g = f"(coef - _select(p{c} > _F0, _F0, stc)) * e{c}" if with_tail else f"coef * e{c}"
        g += f" - kdw * p{c}"
        if sep_ce:
            g += f" + cef * exp32(r{c})"
        if use_lab:
            g += f" - _select(y == {c}, cew, _F0)"
        a(f"        g{c}[q + u] = {g}")
    a("    return nbad")
    a("")
    a("")
    a("@njit(cache=True, nogil=True)")
    a("def tasks(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block, "
      "first, last):")
    a(f"    N, C, P, k = s.shape[0], {C}, s.shape[2], {k}")
    a("    s1 = s.ravel()")
    a("    nb = (P + block - 1) // block")
    a("    klb = np.empty(block, np.float32)")
    a("    altb = np.zeros(block, np.float32)")
    a("    badb = np.zeros(block, np.float32)")
    a("    for task in range(first, last):")
    a("        n = task // nb")
    a("        p0 = (task - n * nb) * block")
    a("        L = min(block, P - p0)")
    a("        nbad = block_kernel(s1, v1, i1, t1, ig1, lb1, np.uint64(n * C * P + p0), np.uint64(n * k * P + p0), "
      "np.uint64(n * P + p0), np.uint64(p0), L, P, T, kd_scale, ce_scale, ignore_index, "
      + ", ".join(f"grad[n, {c}]" for c in range(C)) + ", klb, altb, badb)")
    a("        if nbad > 0:")
    a("            exact_tail(s, i1, grad, n, p0, L, k, T, kd_scale, klb, altb, badb)")
    a("        if per_position:")
    a("            for j in range(L):")
    a("                loss[n * P + p0 + j] = klb[j]")
    a("        else:")
    a("            tot = 0.0")
    a("            for j in range(L):")
    a("                tot += np.float64(klb[j])")
    a("            loss[task] = tot")
    a("")
    a("")
    a("@njit(parallel=True, cache=True, nogil=True)")
    a("def kl_columns(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block, "
      "threads):")
    a("    N, P = s.shape[0], s.shape[2]")
    a("    ntask = N * ((P + block - 1) // block)")
    a("    nchunk = min(ntask, 4 * threads)")
    a("    for chunk in prange(nchunk):")
    a("        tasks(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block, "
      "chunk * ntask // nchunk, (chunk + 1) * ntask // nchunk)")
    return "\n".join(lines) + "\n"


@njit(cache=True, nogil=True)
def exact_tail(s, i1, grad, n, p0, L, k, T, kd_scale, klb, altb, badb):  # pragma: no cover - compiled
    """The positions of a block whose whole student tail underflowed (``badb`` 1): the tail bin's term of
    the loss and of the gradient from a float64 log-sum-exp over the classes outside the top k, added to
    ``klb`` and ``grad`` (the generated kernel left both out there). ``altb``: the tail bin's log
    probability per position."""
    C, P = s.shape[1], s.shape[2]
    inv_t = 1.0 / T
    kd_t = np.float64(np.float32(kd_scale * T))
    kd_tt = np.float64(np.float32(kd_scale * T * T))
    top = np.zeros(C, np.bool_)
    for j in range(L):
        if badb[j] == 0:
            continue
        p = p0 + j
        top[:] = False
        for jj in range(k):
            top[min(max(np.int64(i1[(n * k + jj) * P + p]), 0), C - 1)] = True
        m = -np.inf
        for c in range(C):
            m = max(m, np.float64(s[n, c, p]))
        sm = 0.0
        for c in range(C):
            sm += math.exp((np.float64(s[n, c, p]) - m) * inv_t)
        lse = m * inv_t + math.log(sm)
        mt = -np.inf
        for c in range(C):
            if not top[c]:
                mt = max(mt, np.float64(s[n, c, p]) * inv_t)
        st = 0.0
        for c in range(C):
            if not top[c]:
                st += math.exp(np.float64(s[n, c, p]) * inv_t - mt)
        l_tail = mt + math.log(st)
        lpt = np.float64(altb[j])
        pt = math.exp(lpt)
        klb[j] += np.float32(kd_tt * pt * (lpt - (l_tail - lse)))
        w = kd_t * pt
        for c in range(C):
            if not top[c]:
                grad[n, c, p] -= np.float32(w * math.exp(np.float64(s[n, c, p]) * inv_t - l_tail))


def column_kernel(C: int, k: int, with_tail: bool, use_ign: bool, use_lab: bool, sep_ce: bool):
    """The generated kernel for these classes, ids and options (written and imported on first use,
    then held), or None where this Numba has no ``noalias`` flag (the caller then runs ``kl_spatial``)."""
    key = (C, k, bool(with_tail), bool(use_ign), bool(use_lab), bool(sep_ce))
    if key in _LOADED:
        return _LOADED[key]
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(key) if allow_noalias() else None
    return _LOADED[key]


def _load(key: tuple):
    """The generated module of ``key``, written (unless there already) and imported, as :func:`_runner`'s call,
    or None where no folder can take it (the caller then runs ``kl_spatial``)."""
    try:
        text = source(*key)
        C, k = key[:2]
        name = f"kdcache_columns_{C}_{k}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        path = kernel_folder() / f"{name}.py"
        # named by its content: written when missing (or damaged), else left as it is, so Numba's cache stays valid
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:  # a full disk leaves no half-written file of ours behind
                tmp.unlink(missing_ok=True)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return _runner(module)
    except OSError:  # a read-only home and temporary folder: the generic kernel
        return None


def _runner(module):
    """``run(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block,
    threads)``: the generated module's parallel ``kl_columns``, or on one thread its serial task loop
    alone, whose parallel wrapper (about a third of a first compile: LLVM optimises the linked body again)
    is then never compiled: one thread per process is what torchrun's processes and CI's test workers run.
    ``run.module`` is the module."""

    def run(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block, threads):
        if threads <= 1:
            module.tasks(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position, block,
                         0, s.shape[0] * -(-s.shape[2] // block))
        else:
            module.kl_columns(s, v1, i1, t1, ig1, lb1, T, kd_scale, ce_scale, ignore_index, grad, loss, per_position,
                              block, threads)

    run.module = module
    return run
