"""``bpkd`` (Liu et al., "BPKD: Boundary Privileged Knowledge Distillation for Semantic
Segmentation", WACV 2024): an edge term and a body term, each against an independent float64
computation of the formula (``kdcache/methods/bpkd.py``) on a small batch written out by hand.

The reference finds the edges pixel by pixel (a labelled pixel is on class c's edge where the
square of ``width`` around it, cut at the image's border, holds a pixel of c and one of another
class), checked itself against edges written out by hand; it averages them over each cell, then
takes the pixel-wise KL of the masked logits per cell and the channel-wise KL of the body's logits.
Boundaries from the labels and from the teacher's top-1, the crop's padding and the teacher-aware
cells left out, a top-k cache's tail as equal shares, class weights; negative controls: the
teacher's edges and the labels' differ, and an unlabelled area is no class (counting it as one
moves the edges). A student trains with it from a cache and with the live teacher.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd

from kdcache.core.errors import KDCacheError
from kdcache.methods import MethodError, build_method, method_options
from kdcache.methods.bpkd import class_edges
from kdcache.models import ModelOutput

N, C, H, W, S = 2, 4, 8, 12, 2  # two images, four classes, 8 x 12 labels, a cache grid of stride 2
h, w = H // S, W // S


def _labels() -> torch.Tensor:
    """Image 0: class 0 left of column 6, class 1 right of it, an unlabelled (255) block at the bottom
    right. Image 1: class 2 around a class-3 square (rows 2-5, columns 2-5), its top row unlabelled."""
    lab = torch.zeros(N, H, W, dtype=torch.int64)
    lab[0, :, 6:] = 1
    lab[0, 6:, 8:] = 255
    lab[1] = 2
    lab[1, 2:6, 2:6] = 3
    lab[1, 0] = 255
    return lab


def _batch(k: int = C, seed: int = 0) -> tuple[dict, torch.Tensor, np.ndarray]:
    """The batch (a k-of-C cache of random teacher logits), the student's logits at the label's
    resolution, and the teacher's C logits per cell as the cache gives them [N, C, h, w] (float64)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, C, h, w, generator=g) * 3
    values, ids = t.topk(k, dim=1)
    batch = {"kd/values": values, "kd/indices": ids, "kd/ignore": torch.zeros(N, h, w, dtype=torch.bool),
             "label": _labels()}
    dense = t.double().numpy().copy()
    if k < C:
        batch["kd/tail"] = torch.logsumexp(t.scatter(1, ids, float("-inf")), dim=1)
        for n, y, x in np.ndindex(N, h, w):  # every class outside the top k: τ − log(C − k)
            rest = [c for c in range(C) if c not in ids[n, :, y, x].tolist()]
            dense[n, rest, y, x] = float(batch["kd/tail"][n, y, x]) - math.log(C - k)
    s = torch.randn(N, C, H, W, generator=g) * 2
    return batch, s, dense


# -- the reference, in float64 -----------------------------------------------------------------------


def _edges(lab: np.ndarray, width: int) -> np.ndarray:
    """E [N, C, H, W]: 1 where a labelled pixel's square of ``width`` holds class c and another class."""
    r = width // 2
    out = np.zeros((lab.shape[0], C, *lab.shape[1:]))
    for n, y, x in np.ndindex(*lab.shape):
        if not 0 <= lab[n, y, x] < C:
            continue
        window = lab[n, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
        present = {int(v) for v in window.ravel() if 0 <= v < C}
        for c in present:
            if present - {c}:
                out[n, c, y, x] = 1.0
    return out


def _cells(e: np.ndarray) -> np.ndarray:
    """The share of each S x S cell's pixels: [N, C, H, W] -> [N, C, h, w]."""
    return e.reshape(N, C, h, S, w, S).mean((3, 5))


def _label_edges(width: int = 3) -> np.ndarray:
    return _cells(_edges(_labels().numpy(), width))


def _teacher_edges(dense: np.ndarray, ignore: np.ndarray, width: int = 3) -> np.ndarray:
    """The edges of the teacher's top-1 map, each cell's class on its S x S pixels, padding no class."""
    top1 = np.where(ignore, -1, dense.argmax(1))
    return _cells(_edges(top1.repeat(S, 1).repeat(S, 2), width))


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis, keepdims=True))


def _reference(M, t, s, T, used, ignore, body_weight, edge_weight, class_w=None) -> float:
    """λ_B L_B + λ_E L_E. ``used``: each cell's weight [N, h, w] (0: left out); ``ignore``: the cells
    out of the body's softmax; ``class_w``: each class channel's weight in the body term."""
    M = M * (used > 0)[:, None]
    # edge: φ per cell, each class's band averaged over the cells it touches, summed over the classes
    lt, ls = _log_softmax(t * M / T, 1), _log_softmax(s * M / T, 1)
    phi = T * T * (np.exp(lt) * (lt - ls)).sum(1)
    edge = 0.0
    for n in range(N):
        for c in range(C):
            count = ((M[n, c] > 0) * used[n]).sum()
            if count > 0:
                edge += (M[n, c] * phi[n] * used[n]).sum() / count
    edge /= N
    # body: per image and class channel, KL of the softmax over the cells not ignored
    cw = np.ones(C) if class_w is None else class_w
    body = 0.0
    for n in range(N):
        keep = ~ignore[n]
        for c in range(C):
            bt = _log_softmax(t[n, c][keep] * (1 - M[n, c][keep]) / T, 0)
            bs = _log_softmax(s[n, c][keep] * (1 - M[n, c][keep]) / T, 0)
            body += cw[c] * (np.exp(bt) * (bt - bs)).sum()
    body = T * T * body / (N * cw.sum())
    return body_weight * body + edge_weight * edge


def _student(s: torch.Tensor) -> np.ndarray:
    return F.interpolate(s.double(), size=(h, w), mode="bilinear", align_corners=False).numpy()


OPTIONS = {"width": 3, "temperature": 2.0, "body_weight": 3.0, "edge_weight": 5.0, "weight": 0.5}


def _loss(batch: dict, s: torch.Tensor, **options) -> float:
    return float(build_method("bpkd", **{**OPTIONS, **options})(ModelOutput(logits=s), batch))


# -- the edges -------------------------------------------------------------------------------------


def test_the_edges_are_the_bands_around_the_class_boundaries():
    """By hand: image 0's boundary between columns 5 and 6 puts both classes' bands on columns 5-6
    (cells' columns 2 and 3, half their pixels); the unlabelled block makes none. Image 1's square:
    a band on its inside and outside rows and columns 1-2 and 5-6. The reference and the method agree."""
    e = _edges(_labels().numpy(), 3)
    want0 = np.zeros((H, W))
    want0[:, 5:7] = 1
    for c in (0, 1):
        np.testing.assert_array_equal(e[0, c], want0)
    assert not e[0, 2:].any()
    ring = np.zeros((H, W))
    ring[1:7, 1:7] = 1
    ring[3:5, 3:5] = 0
    ring[0] = 0  # the unlabelled top row: no edge on it, and no class for its neighbours
    for c in (2, 3):
        np.testing.assert_array_equal(e[1, c], ring)
    M = class_edges(_labels(), C, 3, (h, w))
    np.testing.assert_allclose(M.double().numpy(), _cells(e), atol=1e-7)
    assert M[0, 0, 0].tolist() == [0, 0, 0.5, 0.5, 0, 0]
    # the negative control: counted as a class of its own, the unlabelled block would have edges
    as_class = _labels().masked_fill(_labels() == 255, C - 1)
    assert class_edges(as_class, C, 3, (h, w))[0, C - 1].sum() > 0 and M[0, C - 1].sum() == 0
    # a wider band reaches further
    np.testing.assert_allclose(class_edges(_labels(), C, 5, (h, w)).double().numpy(), _cells(_edges(_labels().numpy(), 5)),
                               atol=1e-7)


# -- the loss against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("k", [C, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("boundary", ["labels", "teacher"])
def test_the_loss_is_the_papers_formula(boundary, k):
    batch, s, t = _batch(k, seed=k)
    batch["kd/ignore"][1, 0, 0] = batch["kd/ignore"][1, 3, 5] = True  # the crop's padding
    ignore = batch["kd/ignore"].numpy()
    M = _label_edges() if boundary == "labels" else _teacher_edges(t, ignore)
    want = 0.5 * _reference(M, t, _student(s), 2.0, (~ignore).astype(float), ignore, 3.0, 5.0)
    got = _loss(batch, s, boundary=boundary)
    assert got == pytest.approx(want, rel=1e-5)
    # each term alone
    assert _loss(batch, s, boundary=boundary, edge_weight=0.0) == pytest.approx(
        0.5 * _reference(M, t, _student(s), 2.0, (~ignore).astype(float), ignore, 3.0, 0.0), rel=1e-5)
    assert _loss(batch, s, boundary=boundary, body_weight=0.0) == pytest.approx(
        0.5 * _reference(M, t, _student(s), 2.0, (~ignore).astype(float), ignore, 0.0, 5.0), rel=1e-5)


def test_the_teachers_edges_are_not_the_labels():
    """The negative control of the boundary option: the teacher's top-1 map is not the labels, so the
    edge term differs; the body term moves with it."""
    batch, s, t = _batch(seed=1)
    ignore = batch["kd/ignore"].numpy()
    assert not np.allclose(_label_edges(), _teacher_edges(t, ignore))
    assert abs(_loss(batch, s, body_weight=0.0) - _loss(batch, s, body_weight=0.0, boundary="teacher")) > 1e-3


def test_a_student_equal_to_the_teacher_has_nothing_to_learn():
    batch, _, t = _batch()
    same = F.interpolate(torch.from_numpy(t).float(), size=(H, W), mode="nearest")
    assert _loss(batch, same) == pytest.approx(0.0, abs=1e-5)


def test_the_teacher_aware_cells_and_class_weights():
    """``mask=teacher_correct`` leaves out the labelled cells the teacher gets wrong (no edge there, out
    of the body's softmax); class weights weigh each cell's φ (and n_c) by its class (its label at the
    cell's centre, else the teacher's top-1) and each body channel by its class."""
    batch, s, t = _batch(seed=2)
    lab = _labels().numpy()[:, 1::S, 1::S]  # the pixel at each cell's centre
    labelled = (lab >= 0) & (lab < C)
    top1 = t.argmax(1)
    wrong = labelled & (top1 != lab)
    assert wrong.any() and (~wrong).any()
    M = _label_edges()
    got = _loss(batch, s, mask="teacher_correct")
    assert got == pytest.approx(0.5 * _reference(M, t, _student(s), 2.0, (~wrong).astype(float), wrong, 3.0, 5.0),
                                rel=1e-5)
    assert abs(got - _loss(batch, s)) > 1e-4

    m = build_method("bpkd", **OPTIONS)
    m.setup({}, SimpleNamespace(num_classes=C, classification=None))
    m.aware.weights = torch.tensor([1.0, 0.5, 0.0, 0.25])  # what prepare() sets from a baseline run
    cls = np.where(labelled, lab, top1)
    used = m.aware.weights.double().numpy()[cls]
    want = 0.5 * _reference(M, t, _student(s), 2.0, used, np.zeros_like(wrong), 3.0, 5.0,
                            class_w=m.aware.weights.double().numpy())
    assert float(m(ModelOutput(logits=s), batch)) == pytest.approx(want, rel=1e-5)


def test_a_batch_with_every_cell_left_out_gives_zero_and_no_nan():
    batch, s, _ = _batch()
    batch["kd/ignore"][:] = True
    s = s.clone().requires_grad_()
    loss = build_method("bpkd")(ModelOutput(logits=s), batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(s.grad).all()


# -- the options ---------------------------------------------------------------------------------------


def test_its_options_and_their_errors(small_store, tmp_path):
    assert list(method_options("bpkd"))[:6] == ["weight", "temperature", "width", "boundary", "edge_weight",
                                                "body_weight"]
    m = build_method("bpkd")
    assert (m.weight, m.temperature, m.width, m.boundary, m.edge_weight, m.body_weight) == (1.0, 4.0, 7, "labels",
                                                                                            50.0, 20.0)
    assert build_method("bpkd", width=5.0).width == 5
    with pytest.raises(MethodError, match="method 'bpkd' distils class edges and bodies of segmentation maps; a "
                                          "classification cache has one cell per image: use kl or dist"):
        m.setup({}, SimpleNamespace(num_classes=C, classification={"targets": "logits"}))
    with pytest.raises(KDCacheError, match="method 'bpkd': width must be a finite number >= 3, got 1"):
        build_method("bpkd", width=1)
    _, store = small_store
    for spec, words in (("bpkd:width=4", "method 'bpkd': width must be an odd number of pixels (3, 5, 7, ...), got 4"),
                        ("bpkd:boundary=edges", "method 'bpkd': boundary must be one of labels, teacher, got 'edges'"),
                        ("bpkd:edge_weight=0,body_weight=0",
                         "method 'bpkd': edge_weight and body_weight must not both be 0")):
        r = kd("train-student", "--cache", store, "--method", spec, "--epochs", "1", "--out", tmp_path / "x")
        assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("online", [False, True], ids=["cache", "online"])
def test_a_student_trains_with_it(small_store, tmp_path, online):
    """From the cache with the labels' edges; with the live teacher (the cache's) and its own edges."""
    _, store = small_store
    spec, extra = ("bpkd:boundary=teacher,width=5", ["--online-teacher", "cache"]) if online else ("bpkd", [])
    r = kd("train-student", "--cache", store, "--method", spec, "--epochs", "1", "--batch-size", "4", "--limit", "8",
           "--device", "cpu", "--workers", "0", "--out", tmp_path / "s", "--quiet", *extra)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["methods"][0]["name"] == "bpkd"
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert math.isfinite(rec["train_bpkd"]) and rec["train_bpkd"] > 0 and math.isfinite(rec["val_miou"]), rec
