"""What one KD loss call costs in launches and host synchronisations, and that torch.compile traces it.

The CUDA path is checked on the CPU with the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py without a GPU): the Triton launches are counted by wrapping the kernels, and every
PyTorch operator the loss runs is recorded by a ``TorchDispatchMode``. One loss call, forward and
backward, must be one forward launch and one backward launch, its PyTorch operators only
allocations and views (nothing that launches a kernel of its own), and no operator that reads a
value back to the host (``aten._local_scalar_dense``, what ``.item()`` / ``float()`` / ``.tolist()`` run).
A deliberately syncing variant shows that the check catches one.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdcache.core.topk import topk_targets
from kdcache.kernels import topk_kl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton_kl = pytest.importorskip("kdcache.kernels.triton_kl")
from kdcache.kernels import triton_op  # noqa: E402  (after the skip: needs triton)

#: operators that allocate or re-describe memory: no kernel, no transfer
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_reshape_alias", "reshape", "as_strided",
        "detach", "alias", "unsqueeze", "squeeze", "expand", "t", "_unsafe_view", "lift_fresh"}
SYNCS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "tolist"}


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _case(C=19, k=4, spatial=(6, 10)):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, C, *spatial, generator=g)
    v, i, tail = topk_targets(torch.randn(2, C, *spatial, generator=g) * 3, k)
    ign = torch.rand(2, *spatial, generator=g) < 0.3
    return s, v.half(), i.to(torch.uint8 if C <= 256 else torch.int16), tail.half(), ign  # as a store holds them


def _spy(monkeypatch, launches, run_kernels=True):
    """Each kernel's launches recorded; run (in the interpreter) or mocked (``run_kernels=False``: the
    interpreter's own copies of the arguments would otherwise show as PyTorch operators)."""
    for name in ("_map_fwd", "_map_bwd", "_row_fwd", "_row_bwd"):
        real = getattr(triton_kl, name)

        class Spy:
            def __getitem__(self, grid, name=name, real=real):
                def run(*args, **kw):
                    launches.append(name)
                    return real[grid](*args, **kw) if run_kernels else None

                return run

        monkeypatch.setattr(triton_kl, name, Spy())


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (conftest.py sets it without a GPU)")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("shape", ["map", "rows"])
def test_one_loss_call_is_one_launch_each_way_with_no_sync(monkeypatch, shape):
    s, v, i, tail, ign = _case() if shape == "map" else _case(C=300, k=8, spatial=())
    topk_kl(s.requires_grad_(True), v, i, tail, ignore_mask=ign, check_inputs=False, backend="triton").backward()
    launches: list[str] = []
    _spy(monkeypatch, launches, run_kernels=False)  # mocked: the interpreter's own copies stay out of the record
    x = s.detach().requires_grad_(True)
    seed = torch.ones(())
    with Recorder() as rec:  # forward and backward as a training step runs them (eager)
        loss = topk_kl(x, v, i, tail, ignore_mask=ign, temperature=2.0, weight=0.5, check_inputs=False,
                       backend="triton")
        torch.autograd.grad(loss, x, seed)
    kind = "map" if shape == "map" else "row"
    assert launches == [f"_{kind}_fwd", f"_{kind}_bwd"]
    assert not [op for op in rec.ops if op not in FREE], rec.ops  # allocations and views only
    assert not SYNCS & set(rec.ops)
    # the custom operators (what torch.compile traces) launch the same two kernels
    launches.clear()
    with Recorder() as rec:
        out, stats, scales = triton_op.topk_kl_forward(x, v, i, tail, ign, None, 2.0, True, "mean", 255, 0.5, 1.0)
        triton_op.topk_kl_backward(seed, x, v, i, tail, ign, None, stats, scales, 2.0, True, "mean", 255, 0.5, 1.0)
    assert launches == [f"_{kind}_fwd", f"_{kind}_bwd"]
    assert [op for op in rec.ops if op not in FREE] == ["topk_kl_forward", "topk_kl_backward"], rec.ops


def test_the_recorder_sees_a_sync_and_a_stray_kernel():
    """The check's own control: .item() and an eager multiply are caught."""
    x = torch.randn(3)
    with Recorder() as rec:
        y = x * 2.0
        y.sum().item()
    ops = set(rec.ops)
    assert SYNCS & ops and ops - FREE - SYNCS


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.slow  # torch.compile
def test_torch_compile_traces_the_loss_without_a_graph_break(backend):
    """fullgraph=True makes a graph break an error; aot_eager traces forward and backward through the
    custom operators' fake implementations without compiling C++."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("the CPU run of the Triton path needs TRITON_INTERPRET=1")
    s, v, i, tail, ign = _case()

    def term(x):
        return topk_kl(x, v, i, tail, ignore_mask=ign, temperature=2.0, weight=0.5, check_inputs=False,
                       backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(term, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = compiled(x1)
    (got * 1.5).backward()
    want = term(x2)
    (want * 1.5).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.slow  # torch.compile (Dynamo's first use: seconds)
def test_torch_compile_traces_the_kl_method_on_the_cpu():
    """The ``kl`` method as a training step calls it, forward and backward under fullgraph=True."""
    from kdcache.methods import METHODS
    from kdcache.models import ModelOutput

    method = METHODS.get("kl")(weight=0.5)
    g = torch.Generator().manual_seed(1)
    v, i, tail = topk_targets(torch.randn(2, 19, 8, 16, generator=g) * 3, 4)
    batch = {"kd/values": v.half(), "kd/indices": i.to(torch.uint8), "kd/tail": tail.half(),
             "kd/ignore": torch.rand(2, 8, 16, generator=g) < 0.2}
    def term(s):  # the model's own output type, made inside the compiled code as a model's forward makes it
        return method(ModelOutput(logits=s), batch)

    torch._dynamo.reset()
    compiled = torch.compile(term, fullgraph=True, backend="aot_eager")
    s = torch.randn(2, 19, 32, 64, generator=g)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = compiled(x1)
    got.backward()
    want = term(x2)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x1.grad, x2.grad)



@pytest.mark.slow  # torch.compile of a whole student
def test_torch_compile_traces_a_whole_training_step_of_train_student(small_store, tmp_path):
    """The student's forward, the cross-entropy and the ``kl`` term as ``train-student`` computes them
    (:meth:`StudentTrainer.compute_loss` on a batch from its own loader), compiled with
    fullgraph=True: no graph break anywhere in the step, and the same loss and gradients as eager."""
    from kdcache.train.student import StudentTrainer, config_from_store

    _, store = small_store
    tr = StudentTrainer(config_from_store(store, methods=[{"name": "kl"}], model="demo_student", device="cpu",
                                          limit=16, batch_size=2, workers=0, out=str(tmp_path / "run")),
                        show_progress=False)
    ready = tr.prepare()
    batch = next(iter(ready.batches.loader(0)))
    assert {"kd/values", "kd/indices", "kd/tail", "kd/ignore"} <= set(batch)
    model = ready.model

    def step(b):
        total, terms = tr.compute_loss(model, b)
        return total, terms["kl"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_kl = compiled(batch)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    want, want_kl = step(batch)
    want.backward()
    assert float(want_kl) > 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_kl, want_kl)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)

def test_the_default_id_check_reads_back_once_per_device_and_class_count(monkeypatch):
    """check_inputs="first": the teacher's ids are validated (read back to the host) on the first call
    for a device and C, not on every step; True checks every call; a bad id on a first call is caught."""
    from kdcache.kernels import KernelInputError, api

    monkeypatch.setattr(api, "_IDS_CHECKED", set())
    s, v, i, tail, ign = _case()

    def reads(**kw):
        with Recorder() as rec:
            topk_kl(s, v, i, tail, ignore_mask=ign, backend="numba", **kw)
        return [op for op in rec.ops if op in ("min", "max", "_local_scalar_dense")]

    assert reads() == ["min", "_local_scalar_dense", "max", "_local_scalar_dense"]
    assert reads() == []  # the same device and C: not again
    assert reads(check_inputs=True) == ["min", "_local_scalar_dense", "max", "_local_scalar_dense"]
    bad = i.clone()
    bad[0, 0, 0, 0] = 30
    s30 = torch.randn(2, 30, 6, 10)  # another C: a first call again, which checks
    with pytest.raises(KernelInputError, match=r"outside \[0, 30\)"):
        topk_kl(s30, v, bad + 12, tail, ignore_mask=ign, backend="numba")
