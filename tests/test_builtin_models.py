"""The built-in teacher and students: shapes, sizes and named taps."""

from __future__ import annotations

import pytest
import torch

from kdcache.models.builtin import compact_student, demo_student, demo_teacher


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("factory", [demo_teacher, demo_student, compact_student])
@pytest.mark.parametrize("hw", [(96, 128), (64, 80), (50, 70), (33, 47)])
def test_output_stride_4(factory, hw):
    torch.manual_seed(0)
    model = factory(11).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, 11, -(-hw[0] // 4), -(-hw[1] // 4))
    assert torch.isfinite(out).all()


def test_num_classes_and_backward():
    model = demo_student(5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5, 16, 16)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("factory", [demo_teacher, demo_student, compact_student])
def test_trains_on_a_batch_of_one(factory):
    model = factory(11).train()
    out = model(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 11, 12, 16)


def test_teacher_much_larger_than_student():
    t, s = _params(demo_teacher(11)), _params(demo_student(11))
    assert 500_000 < t < 3_000_000
    assert 20_000 < s < 200_000
    assert t > 10 * s


def test_the_compact_student_is_a_quarter_to_a_tenth_of_the_teacher():
    """The realistic pair: the literature's DeepLabV3 R101 -> R18 students are about 4x smaller."""
    t, c = _params(demo_teacher(11)), _params(compact_student(11))
    assert t / 10 <= c <= t / 4, (t, c)
    # the teacher's design: its dilated stage and context module, not the demo student's 1x1 stage
    kinds = {type(m).__name__ for m in compact_student(11).stage3.modules()}
    assert {"BasicBlock", "ContextModule"} <= kinds


@pytest.mark.parametrize("factory", [demo_teacher, demo_student, compact_student])
def test_named_stages_give_4d_features(factory):
    model = factory(11).eval()
    names = dict(model.named_children())
    for name in ("stem", "stage1", "stage2", "stage3", "head"):
        assert name in names
    feats = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
             for n in ("stem", "stage1", "stage2", "stage3")]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert feats["stem"].shape[2:] == (16, 24) and feats["stage1"].shape[2:] == (16, 24)
    assert feats["stage2"].shape[2:] == (8, 12) and feats["stage3"].shape[2:] == (8, 12)
    assert all(f.dim() == 4 for f in feats.values())


def test_the_compact_student_distils_from_a_cache_by_name(small_store, tmp_path):
    """Chosen by name on the command line, as a user picks it."""
    import json

    from cli_runner import kd

    _, store = small_store
    r = kd("train-student", "--cache", store, "--student", "compact_student", "--method", "dist",
           "--epochs", "1", "--batch-size", "8", "--limit", "8", "--device", "cpu", "--workers", "0",
           "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["model"] == "compact_student"
    assert cfg["params"] == _params(compact_student(11))
