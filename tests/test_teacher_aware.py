"""Teacher-aware distillation (issue 28 §1): ``mask=teacher_correct`` and ``min_confidence`` on the
logit methods ``kl``, ``dist`` and ``cwd``.

The mask's cells are checked against a hand computation on a batch whose labels and teacher are
written out; each method's masked loss against an independent float64 computation over the kept
cells alone; the command line trains with the option from a cache and with the live teacher.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_runner import kd
from fake_data import make_small_store

from kdcache.methods import build_method
from kdcache.methods.teacher_aware import cell_labels, teacher_aware_ignore, teacher_top1
from kdcache.models import ModelOutput

C, K = 5, 2


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_small_store(tmp_path_factory)


def _batch() -> dict:
    """One 4 x 6 crop (label map) over a 2 x 3 grid of top-2 + tail teacher cells.

    Cell labels (the pixels at rows 1, 3 and columns 1, 3, 5):  [[0, 1, 255], [2, 3, 4]]
    Teacher top-1 per cell:                                     [[0, 2, 1],   [2, 0, 4]]
    Teacher top-1 probability per cell: high except cell (0, 2) (unlabelled) and (1, 2)."""
    label = torch.full((1, 4, 6), 7, dtype=torch.int64)  # 7 where no cell centre lies: must not matter
    for (r, c), v in {(0, 0): 0, (0, 1): 1, (0, 2): 255, (1, 0): 2, (1, 1): 3, (1, 2): 4}.items():
        label[0, 2 * r + 1, 2 * c + 1] = v
    top1 = torch.tensor([[0, 2, 1], [2, 0, 4]])
    second = (top1 + 1) % C
    indices = torch.stack([top1, second])[None].to(torch.uint8)
    values = torch.tensor([[[6.0, 5.0, 0.4], [4.0, 7.0, 0.3]], [[1.0, 0.5, 0.2], [0.0, 1.0, 0.1]]])[None]
    tail = torch.tensor([[[0.0, -1.0, 0.9], [0.5, 0.0, 0.8]]])
    return {"label": label, "kd/values": values.half(), "kd/indices": indices, "kd/tail": tail.half(),
            "kd/ignore": torch.zeros(1, 2, 3, dtype=torch.bool)}


def test_the_cell_labels_are_the_pixels_at_the_cell_centres():
    label = torch.arange(4 * 6).reshape(1, 4, 6)
    assert cell_labels(label, (2, 3)).tolist() == [[[7, 9, 11], [19, 21, 23]]]
    # a grid finer than the pixels repeats them; a ragged one takes floor((i + 1/2) H / h)
    assert cell_labels(label, (4, 6)).tolist() == label.tolist()
    assert cell_labels(torch.arange(5)[None, None].expand(1, 1, 5), (1, 2)).tolist() == [[[1, 3]]]


def test_the_teachers_top1_and_its_probability():
    b = _batch()
    cls, prob = teacher_top1(b)
    assert cls[0].tolist() == [[0, 2, 1], [2, 0, 4]]
    v, t = b["kd/values"].double()[0], b["kd/tail"].double()[0]
    want = torch.exp(v[0]) / (torch.exp(v).sum(0) + torch.exp(t))
    torch.testing.assert_close(prob[0].double(), want, rtol=1e-5, atol=1e-6)


def test_the_mask_leaves_out_the_labelled_cells_the_teacher_gets_wrong():
    b = _batch()
    assert teacher_aware_ignore(b, "none", 0.0).tolist() == [[[False] * 3] * 2]
    # labels [[0, 1, 255], [2, 3, 4]] against the teacher's [[0, 2, 1], [2, 0, 4]]: wrong at (0, 1), (1, 1);
    # (0, 2) has no label and keeps its term
    assert teacher_aware_ignore(b, "teacher_correct", 0.0).tolist() == [[[False, True, False], [False, True, False]]]
    # min_confidence drops the unlabelled cell (0, 2) only when the teacher is unsure there
    _, prob = teacher_top1(b)
    p = float(prob[0, 0, 2])
    assert teacher_aware_ignore(b, "teacher_correct", p + 0.01).tolist() == [[[False, True, True],
                                                                              [False, True, False]]]
    assert teacher_aware_ignore(b, "teacher_correct", p - 0.01)[0, 0, 2].item() is False
    # the crop's padding stays ignored
    b["kd/ignore"][0, 1, 0] = True
    assert teacher_aware_ignore(b, "teacher_correct", 0.0).tolist() == [[[False, True, False], [True, True, False]]]


def _dense_teacher(b: dict) -> torch.Tensor:
    """[1, C, h, w] float64: the top k at their logits, every other class at tail − log(C − k)."""
    v, i, t = b["kd/values"].double(), b["kd/indices"].long(), b["kd/tail"].double()
    out = (t - math.log(C - K))[:, None].expand(1, C, *t.shape[-2:]).clone()
    return out.scatter(1, i, v)


def _student() -> torch.Tensor:
    return torch.randn(1, C, 2, 3, generator=torch.Generator().manual_seed(3)) * 2


KEEP = torch.tensor([[True, False, True], [True, False, True]])  # the cells teacher_correct keeps


def test_kl_with_the_mask_is_the_kl_of_the_kept_cells():
    b, s = _batch(), _student()
    T = 2.0
    got = build_method("kl", temperature=T, mask="teacher_correct")(ModelOutput(logits=s.clone()), b)
    # the loss contract's (k + 1)-bin KL: the teacher's top k and its tail as one bin, the student's
    # same k classes and the rest of its mass as one bin
    v, i, t = b["kd/values"].double()[0], b["kd/indices"].long()[0], b["kd/tail"].double()[0]
    a = torch.cat([v / T, (math.log(C - K) + (t - math.log(C - K)) / T)[None]])
    lp_t = torch.log_softmax(a, 0)
    lq = torch.log_softmax(s.double()[0] / T, 0)
    lq_k = lq.gather(0, i)
    lq_rest = torch.log(1 - lq_k.exp().sum(0))
    kl = (lp_t.exp() * (lp_t - torch.cat([lq_k, lq_rest[None]]))).sum(0)  # [h, w]
    torch.testing.assert_close(got.double(), T * T * kl[KEEP].mean(), rtol=1e-4, atol=1e-5)
    plain = build_method("kl", temperature=T)(ModelOutput(logits=s.clone()), b)
    assert abs(float(plain) - float(T * T * kl.mean())) < 1e-4 and abs(float(plain) - float(got)) > 1e-3


def test_dist_with_the_mask_uses_only_the_kept_cells():
    from kdcache.methods.dist import dist_loss

    b, s = _batch(), _student()
    got = build_method("dist", mask="teacher_correct")(ModelOutput(logits=s.clone()), b)
    rows_s = s.double()[0].permute(1, 2, 0)[KEEP]
    rows_t = _dense_teacher(b)[0].permute(1, 2, 0)[KEEP]
    torch.testing.assert_close(got.double(), dist_loss(rows_s, rows_t), rtol=1e-4, atol=1e-5)


def test_cwd_with_the_mask_takes_each_channels_softmax_over_the_kept_cells():
    b, s = _batch(), _student()
    T = 4.0
    got = build_method("cwd", mask="teacher_correct")(ModelOutput(logits=s.clone()), b)
    st = (s.double()[0] / T)[:, KEEP]  # [C, kept]
    tt = (_dense_teacher(b)[0] / T)[:, KEEP]
    lp_s, lp_t = torch.log_softmax(st, 1), torch.log_softmax(tt, 1)
    want = 3.0 * T * T * (lp_t.exp() * (lp_t - lp_s)).sum(1).mean()  # cwd's default weight 3
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["kl", "dist", "cwd"])
def test_an_image_the_teacher_gets_wrong_everywhere_gives_no_nan(name):
    b = _batch()
    b["label"] = torch.full_like(b["label"], 3)  # the teacher's top-1 is never 3
    s = _student().requires_grad_(True)
    loss = build_method(name, mask="teacher_correct")(ModelOutput(logits=s), b)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(s.grad).all() and float(s.grad.abs().max()) == 0.0


def test_bad_mask_options_are_one_line_each(small, tmp_path):
    _, store = small
    for spec, words in (("kl:mask=wrong", "method 'kl': mask must be one of none, teacher_correct, got 'wrong'"),
                        ("dist:min_confidence=1.5", "method 'dist': min_confidence must be in [0, 1), got 1.5")):
        r = kd("train-student", "--cache", store, "--method", spec, "--epochs", "1", "--out", tmp_path / "x")
        assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("online", [False, True])
def test_a_student_trains_with_the_mask_from_a_cache_and_online(small, tmp_path, online):
    teacher, store = small
    extra = ["--online-teacher", "cache"] if online else []
    r = kd("train-student", "--cache", store, "--method", "kl:mask=teacher_correct,min_confidence=0.2",
           "--method", "dist:mask=teacher_correct", "--epochs", "1", "--batch-size", "8", "--limit", "16",
           "--device", "cpu", "--workers", "0", "--out", tmp_path / "s", *extra)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert {"name": "kl", "mask": "teacher_correct", "min_confidence": 0.2} in cfg["methods"]
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["train_kl"])
