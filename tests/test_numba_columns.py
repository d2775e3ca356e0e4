"""The CPU maps kernel generated per (C, k) (kernels/numba_columns.py) against the float64 reference.

Each distinct (C, k, options, input types) compiles once, for 5-13 s on the 2-core Xeon, so the other
in-process tests run ``kl_spatial`` (tests/conftest.py turns this path off unless a test is marked
``columns``) and these cover the generated kernels on four of them, every option in both states: the
tail bin or none, an ignore mask or none, labels at T = 1 and at T ≠ 1 (a separate cross-entropy),
fp16 and fp32 teacher values, uint8 and wider ids, k = C, the exact fallback where a pixel's whole
student tail underflows, maps of several blocks, per-position losses. The commands the tests start
run it as a user's runs do."""

from __future__ import annotations

import re

import pytest
import torch
from test_kernels import check, make_case

from kdcache.kernels import numba_columns as nc
from kdcache.kernels import topk_kl
from kdcache.kernels.numba_kl import block_pixels

pytestmark = pytest.mark.columns


@pytest.fixture
def taken(monkeypatch):
    """The (C, k, options) of every call that ran a generated kernel (not ``kl_spatial``)."""
    real, keys = nc.column_kernel, []

    def spy(*key):
        fn = real(*key)
        if fn is not None:
            keys.append(key)
        return fn

    monkeypatch.setattr(nc, "column_kernel", spy)
    return keys


def confident(s, i, share, seed):
    """``s`` with the top-k classes 400 above the rest at a ``share`` of positions: their whole student
    tail underflows in float32, which the kernel hands to its exact float64 fallback."""
    where = torch.rand(s.shape[0], *s.shape[2:], generator=torch.Generator().manual_seed(seed)) < share
    boost = torch.zeros_like(s).scatter(1, i.long(), 400.0)
    return torch.where(where.unsqueeze(1), s + boost, s)


def test_tail_ignore_mask_labels_at_t2_several_blocks_and_underflow(taken):
    """The cache's own inputs (fp16 values and tail, uint8 ids) with every option on, T = 2 and T = 3 (a
    separate cross-entropy at T = 1): a map of two blocks and a short third, a summed and a per-position
    loss, underflowing pixels beside ordinary ones; the same bits on a second call."""
    C, k = 6, 2
    P = 2 * block_pixels(C) + 37
    s, v, i, tail, ign, lab = make_case(3, C, k, (1, P), seed=5, labels=True)
    s = confident(s, i, 0.3, seed=6)
    for T in (2.0, 3.0):
        out, g = check("numba", s, v, i, tail, ign, lab, T=T, reduction="mean")
        check("numba", s, v, i, tail, ign, lab, T=T, reduction="none")
    x = s.clone().requires_grad_(True)
    again = topk_kl(x, v, i, tail, temperature=3.0, ignore_mask=ign, labels=lab, ce_weight=0.7, backend="numba")
    again.backward(torch.tensor(1.7))
    assert again.item() == out.item() and torch.equal(x.grad, g)
    assert set(taken) == {(C, k, True, True, True, True)}


def test_the_parallel_wrapper_gives_the_serial_loops_bits(monkeypatch):
    """Several threads' share (``kl_columns``: a prange over chunks of tasks; on one thread the task loop is
    called alone): a map of several blocks and samples, cut into chunks, gives the same loss and gradient,
    bit for bit. (Under pytest-xdist Numba has one thread, which runs the chunks one after another.)"""
    import numba

    C, k = 6, 2
    s, v, i, tail, ign, lab = make_case(3, C, k, (1, 2 * block_pixels(C) + 37), seed=16, labels=True)
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(numba, "get_num_threads", lambda t=threads: t)
        x = s.clone().requires_grad_(True)
        loss = topk_kl(x, v, i, tail, temperature=3.0, ignore_mask=ign, labels=lab, ce_weight=0.7, backend="numba")
        loss.backward()
        results.append((loss.item(), x.grad))
    fn = nc.column_kernel(C, k, True, True, True, True)
    assert fn.module.tasks.signatures and fn.module.kl_columns.signatures
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_labels_at_t1_fp32_values_wide_ids_large_logits_and_underflow(taken):
    """fp32 teacher values, int16/int64 ids (passed to the kernel as int32), labels at T = 1 (the
    cross-entropy shares the softmax), logits of 1e4 and pixels whose student tail underflows."""
    C, k = 6, 2
    for index_dtype in (torch.int16, torch.int64):
        s, v, i, tail, ign, lab = make_case(2, C, k, (9, 14), seed=7, value_dtype=torch.float32,
                                            index_dtype=index_dtype, labels=True)
        check("numba", confident(s, i, 0.3, seed=8), v, i, tail, ign, lab, T=1.0)
        check("numba", s * 3e3, v, i, tail, ign, lab, T=1.0, reduction="none")
    # a student in fp16 and in bf16: the kernel reads float32, the gradient goes back in the student's dtype
    for student_dtype in (torch.float16, torch.bfloat16):
        s, v, i, tail, ign, lab = make_case(2, C, k, (9, 14), seed=9, value_dtype=torch.float32,
                                            student_dtype=student_dtype, index_dtype=torch.int32, labels=True)
        check("numba", s, v, i, tail, ign, lab, T=1.0)
    assert set(taken) == {(C, k, True, True, True, False)}


def test_no_tail_bin_no_mask_no_labels_and_k_equal_to_c(taken):
    """The renormalised top k (no tail bin), no ignore mask, no labels; and k = C, where the teacher has
    no tail at all. All-ignored pixels holding NaN targets give 0, not NaN."""
    s, v, i, tail, _, _ = make_case(2, 6, 2, (8, 16), seed=10)
    check("numba", s, v, i, tail, None, tail_policy="renormalize", reduction="mean")
    check("numba", s, v, i, tail, None, tail_policy="renormalize", reduction="none")
    s, v, i, tail, ign, _ = make_case(2, 3, 3, (8, 16), seed=11)
    assert tail is None
    check("numba", s, v, i, None, ign, T=2.0)
    v[0, :, 0, 0] = float("nan")  # ignored positions may hold anything
    v[1, 0, 2, 3] = float("inf")
    x = s.clone().requires_grad_(True)
    out = topk_kl(x, v, i, None, ignore_mask=torch.ones(2, 8, 16, dtype=torch.bool), backend="numba")
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert set(taken) == {(6, 2, False, False, False, False), (3, 3, False, True, False, False)}


@pytest.mark.slow  # compiles a generated kernel (8 s)
def test_a_generated_kernel_is_vectorised_written_once_and_loaded_from_disk(monkeypatch, tmp_path):
    """In a folder of its own (so that it compiles here): the module is written under a name that hashes
    its source (which carries a hash of the kernels' own sources); its pixel loop stores float32 vectors
    (LLVM proves that the C gradient rows do not overlap only because they are ``noalias`` arguments: as
    one array it keeps the loop scalar); a later load, as in a new process, neither rewrites the file nor
    compiles again."""
    monkeypatch.setattr(nc, "kernel_folder", lambda: tmp_path)
    monkeypatch.setattr(nc, "_LOADED", {})
    mine = tmp_path / "mine.py"  # a file of the user's in that folder is left as it was
    mine.write_bytes(b"# not kdcache's\n")
    key = (6, 2, True, True, True, True)
    s, v, i, tail, ign, lab = make_case(1, 6, 2, (8, 8), seed=13, labels=True)
    topk_kl(s, v, i, tail, temperature=2.0, ignore_mask=ign, labels=lab, backend="numba")  # compiled here
    fn = nc.column_kernel(*key)
    (path,) = tmp_path.glob("kdcache_columns_6_2_*.py")
    assert path.stem == fn.module.__name__
    assert path.read_text() == nc.source(*key) and nc._kernels_version() in path.read_text()
    (ir,) = fn.module.block_kernel.inspect_llvm().values()
    widths = {int(w) for w in re.findall(r"store <(\d+) x float>", ir)}
    assert widths and max(widths) >= 4, f"no vector stores of float32 in the generated kernel: {sorted(widths)}"
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(nc, "_LOADED", {})
    again = nc.column_kernel(*key)
    assert again.module is not fn.module and path.stat().st_mtime_ns == before
    topk_kl(s, v, i, tail, temperature=2.0, ignore_mask=ign, labels=lab, backend="numba")
    used = [f for f in (again.module.tasks, again.module.kl_columns) if f.signatures]  # one thread or several
    assert len(used) == 1 and sum(used[0].stats.cache_hits.values()) == 1
    assert not sum(used[0].stats.cache_misses.values())
    assert mine.read_bytes() == b"# not kdcache's\n"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == sorted(["mine.py", path.name])


def test_without_numbas_noalias_flag_the_maps_take_kl_spatial(monkeypatch, taken):
    """A Numba without the ``noalias`` compiler flag (a private interface this path needs): no generated
    kernel, and the same loss from ``kl_spatial``."""
    monkeypatch.setattr(nc, "allow_noalias", lambda: False)
    monkeypatch.setattr(nc, "_LOADED", {})
    assert nc.column_kernel(6, 2, True, True, True, True) is None
    s, v, i, tail, ign, lab = make_case(2, 6, 2, (9, 14), seed=12, labels=True)
    check("numba", s, v, i, tail, ign, lab, T=2.0)
    assert taken == []


def test_without_a_writable_folder_the_maps_take_kl_spatial(monkeypatch, taken):
    """No folder can take the generated source (a read-only home and temporary folder): the loss still
    runs, through ``kl_spatial``, and the failure is not retried at every call."""
    calls = []

    def no_folder():
        calls.append(1)
        raise OSError("read-only")

    monkeypatch.setattr(nc, "kernel_folder", no_folder)
    monkeypatch.setattr(nc, "_LOADED", {})
    s, v, i, tail, ign, lab = make_case(2, 6, 2, (9, 14), seed=15, labels=True)
    for _ in range(2):
        check("numba", s, v, i, tail, ign, lab, T=2.0)
    assert taken == [] and calls == [1]


def test_the_generator_refuses_k_outside_1_to_c():
    with pytest.raises(ValueError, match="k must be in"):
        nc.source(4, 5, True, False, False, False)
