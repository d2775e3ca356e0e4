"""Teacher-aware distillation (issue 28 §1): ``mask=teacher_correct``, ``min_confidence`` and
``class_weights=baseline`` on the logit methods ``kl``, ``dist`` and ``cwd``.

The mask's cells are checked against a hand computation on a batch whose labels and teacher are
written out; each method's masked and weighted loss against an independent float64 computation;
the weights against the rule for given IoUs (the cache's quality arrays, the teacher run's val
record); the command line trains all three methods with each option from a cache and with the
live teacher.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_runner import kd

from kdcache.methods import build_method
from kdcache.methods.teacher_aware import cell_labels, teacher_aware_ignore, teacher_top1
from kdcache.models import ModelOutput

C, K = 5, 2


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


def test_a_classification_image_without_a_label_keeps_its_term_and_class_255_is_a_class():
    """Classification labels: -100 is an image without a label (full KD, like an unlabelled cell;
    with class weights, the teacher's top-1 class's weight), and 255 is a class like any other on a
    data set of more classes (masked where the teacher is wrong, weighted as itself)."""
    from kdcache.methods.teacher_aware import TeacherAware

    C300 = 300
    top1 = torch.tensor([3, 7, 255, 40])
    values = torch.stack([torch.full((4,), 5.0), torch.zeros(4)], 1)[..., None, None]  # [4, 2, 1, 1]
    indices = torch.stack([top1, (top1 + 1) % C300], 1)[..., None, None].to(torch.int16)
    b = {"label": torch.tensor([3, -100, 255, 255])[:, None, None], "kd/values": values.half(),
         "kd/indices": indices, "kd/tail": torch.zeros(4, 1, 1).half(), "kd/ignore": torch.zeros(4, 1, 1, dtype=torch.bool)}
    # right on image 0, no label on image 1, right on 2 (class 255), wrong on 3 (255, said 40)
    assert teacher_aware_ignore(b, "teacher_correct", 0.0, C300, classification=True).flatten().tolist() == [
        False, False, False, True]
    aware = TeacherAware(class_weights="none")
    aware.setup(type("Schema", (), {"num_classes": C300, "classification": {"targets": "logits"}})())
    aware.weights = torch.arange(C300, dtype=torch.float32) / C300
    assert (aware.cell_weights(b).flatten() * C300).round().tolist() == [3, 7, 255, 255]
    # segmentation: 255 is the no-label value, whatever the number of classes
    assert teacher_aware_ignore(b, "teacher_correct", 0.0, 11).flatten().tolist() == [False] * 4


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


def test_bad_mask_options_are_one_line_each(small_store, tmp_path):
    _, store = small_store
    for spec, words in (("kl:mask=wrong", "method 'kl': mask must be one of none, teacher_correct, got 'wrong'"),
                        ("dist:min_confidence=1.5", "method 'dist': min_confidence must be a finite number in [0, 1), got 1.5"),
                        ("cwd:rectify=label", "method 'cwd': rectify must be one of none, swap, got 'label'"),
                        ("kl:rectify=swap,mask=teacher_correct",
                         "method 'kl': mask=teacher_correct leaves out the cells rectify=swap corrects; give one of the two")):
        r = kd("train-student", "--cache", store, "--method", spec, "--epochs", "1", "--out", tmp_path / "x")
        assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
        assert not (tmp_path / "x").exists()


# -- rectify=swap: Knowledge Adjustment (the label and the teacher's top-1 swap logits) -------------

def _swap_batch() -> dict:
    """_batch() with cell (1, 1)'s second id made its label (3): the teacher is wrong at (0, 1) (label
    1, in its tail) and at (1, 1) (label 3, its second); (0, 2) has no label; the rest it gets right."""
    b = _batch()
    b["kd/indices"][0, 1, 1, 1] = 3
    return b


def _dense_swapped(b: dict) -> torch.Tensor:
    """The dense float64 teacher with each wrong labelled cell's top-1 and label logits swapped by hand."""
    d = _dense_teacher(b).clone()
    for (r, c), (top, label) in {(0, 1): (2, 1), (1, 1): (0, 3)}.items():
        d[0, [top, label], r, c] = d[0, [label, top], r, c]
    return d


def test_rectify_swaps_the_ids_of_the_top1_and_the_label_where_the_teacher_is_wrong():
    from kdcache.methods.teacher_aware import rectified_indices

    b = _swap_batch()
    before = b["kd/indices"].clone()
    got = rectified_indices(b, C)
    # (0, 1): label 1 is in the tail, so the top slot takes it ([2, 3] -> [1, 3]); (1, 1): label 3 is
    # second, so the two swap ([0, 3] -> [3, 0]); the unlabelled and the right cells stay
    assert got[0, 0].tolist() == [[0, 1, 1], [2, 3, 4]] and got[0, 1].tolist() == [[1, 3, 2], [3, 0, 0]]
    assert got.dtype == before.dtype and torch.equal(b["kd/indices"], before)  # the batch is not changed
    # the rebuilt teacher is the hand-swapped one: values and tail unchanged, the tail's log-sum-exp exact
    torch.testing.assert_close(_dense_teacher({**b, "kd/indices": got}), _dense_swapped(b))
    cls, _ = teacher_top1({**b, "kd/indices": got})
    assert cls[0].tolist() == [[0, 1, 1], [2, 3, 4]]  # the label wherever there is one


@pytest.mark.parametrize("name", ["kl", "dist", "cwd"])
def test_each_method_with_rectify_is_the_method_on_the_swapped_teacher(name):
    from kdcache.methods.dist import dist_loss

    b, s = _swap_batch(), _student()
    got = build_method(name, rectify="swap")(ModelOutput(logits=s.clone()), b).double()
    d, sd = _dense_swapped(b)[0], s.double()[0]
    if name == "kl":  # the (k + 1)-bin KL over the swapped top k (C = 5, k = 2: the rebuilt top 2 by hand)
        T = 1.0
        top = d.topk(K, 0)
        rest = torch.log(torch.logsumexp(d, 0).exp() - top.values.exp().sum(0))  # the tail's log-sum-exp
        lp_t = torch.log_softmax(torch.cat([top.values, rest[None]]), 0)
        lq = torch.log_softmax(sd / T, 0)
        lq_k = lq.gather(0, top.indices)
        lq_rest = torch.log(1 - lq_k.exp().sum(0))
        want = (lp_t.exp() * (lp_t - torch.cat([lq_k, lq_rest[None]]))).sum(0).mean()  # built directly: weight 1
    elif name == "dist":
        want = dist_loss(sd.permute(1, 2, 0).reshape(-1, C), d.permute(1, 2, 0).reshape(-1, C))
    else:
        T = 4.0
        lp_s, lp_t = torch.log_softmax(sd.flatten(1) / T, 1), torch.log_softmax(d.flatten(1) / T, 1)
        want = 3.0 * T * T * (lp_t.exp() * (lp_t - lp_s)).sum(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = build_method(name)(ModelOutput(logits=s.clone()), b).double()
    assert abs(float(plain) - float(got)) > 1e-3  # the swap changes the loss


def test_rectify_leaves_a_teacher_that_is_right_alone():
    b = _batch()
    b["label"][0, 1, 3] = 2  # cell (0, 1)'s label now what the teacher says
    b["label"][0, 3, 3] = 0  # and cell (1, 1)'s
    from kdcache.methods.teacher_aware import rectified_indices

    got = rectified_indices(b, C)
    assert got.dtype == b["kd/indices"].dtype
    assert torch.equal(got, b["kd/indices"])
    s = _student()
    assert float(build_method("kl", rectify="swap")(ModelOutput(logits=s), b)) == float(
        build_method("kl")(ModelOutput(logits=s), b))


@pytest.mark.parametrize("online", [False, True])
def test_a_student_trains_with_the_mask_from_a_cache_and_online(small_store, tmp_path, online):
    teacher, store = small_store
    extra = ["--online-teacher", "cache"] if online else []
    r = kd("train-student", "--cache", store, "--method", "kl:mask=teacher_correct,min_confidence=0.2",
           "--method", "dist:rectify=swap", "--method", "cwd:mask=teacher_correct,weight=1",
           "--epochs", "1", "--batch-size", "8", "--limit", "16",
           "--device", "cpu", "--workers", "0", "--out", tmp_path / "s", *extra)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    # kl and dist at their segmentation weights, recorded; cwd at the weight given
    assert {"name": "kl", "mask": "teacher_correct", "min_confidence": 0.2, "weight": 0.5} in cfg["methods"]
    assert {"name": "dist", "rectify": "swap", "weight": 2.0} in cfg["methods"]
    assert {"name": "cwd", "mask": "teacher_correct", "weight": 1.0} in cfg["methods"]
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert all(math.isfinite(rec[k]) for k in ("train_loss", "train_kl", "train_dist", "train_cwd")), rec


# -- per-class weights: the teacher's IoU against a baseline student's -----------------------------


def test_the_class_weight_rule_by_hand():
    from kdcache.methods.teacher_aware import class_weights_rule

    w = class_weights_rule([0.9, 0.6, 0.5, float("nan"), 0.2], [0.85, 0.7, 0.55, 0.3, 0.22], margin=0.1)
    # teacher better: 1; 10 points worse: 0; 5 worse: 0.5; no teacher score: 1; 2 worse: 0.8
    assert w.tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0, 0.8])


def _baseline_run(path, store, iou, dataset="synthetic", classes=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"kind": "distill", "dataset": dataset,
                                                  "class_names": classes or list(store.schema.class_names)}))
    recs = [{"epoch": 0, "val_miou": 0.1, "val_iou": [0.0] * len(iou), "best": True},
            {"epoch": 1, "val_miou": 0.2, "val_iou": iou, "best": True}, {"epoch": 2, "val_miou": 0.1, "val_iou": [0.0] * len(iou)}]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_the_weights_come_from_the_caches_quality_arrays_and_the_baselines_best_epoch(small_store, tmp_path):
    import numpy as np
    import zarr

    from kdcache.store import CacheStore

    _, path = small_store
    store = CacheStore(path)
    C = store.schema.num_classes
    student = [0.5 + 0.04 * c for c in range(C)]
    run = _baseline_run(tmp_path / "ce", store, student)
    m = build_method("kl", class_weights="baseline", baseline=str(run), margin=0.2)
    rows = np.arange(16)
    m.prepare([(store, rows)])
    # the teacher's IoU read here from the store with zarr-python: the combination (last) row's counts
    counts = np.asarray(zarr.open_group(str(path), mode="r")["quality/counts"][:]).sum(0)[-1].astype(float)
    inter, pred, label = counts
    union = pred + label - inter
    teacher = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    want = np.where(np.isfinite(teacher), np.clip(1 + (teacher - np.array(student)) / 0.2, 0, 1), 1.0)
    assert m.aware.weights.tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert 0 < float(m.aware.weights.min()) < 1 or float(m.aware.weights.min()) == 0  # the weights vary
    assert m.aware.evidence["baseline_iou"] == pytest.approx(student)


def _weighted(name="kl", **kw):
    """A method with class weights [1, 0.5, 0, 0.25, 1] set as prepare() would."""
    m = build_method(name, class_weights="baseline", baseline="unused", **kw)
    m.aware.weights = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0])
    return m


def test_kl_with_class_weights_is_the_weighted_mean_of_the_cells_terms():
    b, s = _batch(), _student()
    got = _weighted("kl")(ModelOutput(logits=s.clone()), b)
    v, i, t = b["kd/values"].double()[0], b["kd/indices"].long()[0], b["kd/tail"].double()[0]
    lp_t = torch.log_softmax(torch.cat([v, (math.log(C - K) + (t - math.log(C - K)))[None]]), 0)
    lq = torch.log_softmax(s.double()[0], 0)
    lq_k = lq.gather(0, i)
    kl = (lp_t.exp() * (lp_t - torch.cat([lq_k, torch.log(1 - lq_k.exp().sum(0))[None]]))).sum(0)
    # each cell's class: the label where it has one, else the teacher's top-1: [[0, 1, 1], [2, 3, 4]]
    w = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0], dtype=torch.float64)[torch.tensor([[0, 1, 1], [2, 3, 4]])]
    torch.testing.assert_close(got.double(), (kl * w).sum() / w.sum(), rtol=1e-4, atol=1e-5)


def test_dist_and_cwd_with_class_weights_by_hand():
    from kdcache.methods.dist import pearson_rows

    b, s = _batch(), _student()
    wc = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0], dtype=torch.float64)
    cell_w = wc[torch.tensor([[0, 1, 1], [2, 3, 4]])]
    keep = cell_w > 0
    ys = torch.softmax(s.double()[0].permute(1, 2, 0)[keep], 1)
    yt = torch.softmax(_dense_teacher(b)[0].permute(1, 2, 0)[keep], 1)
    rw = cell_w[keep]
    inter = ((1 - pearson_rows(ys, yt)) * rw).sum() / rw.sum()
    intra = ((1 - pearson_rows(ys.t(), yt.t())) * wc).sum() / wc.sum()
    got = _weighted("dist")(ModelOutput(logits=s.clone()), b)
    torch.testing.assert_close(got.double(), inter + intra, rtol=1e-4, atol=1e-5)
    T = 4.0
    lp_s = torch.log_softmax(s.double()[0].flatten(1) / T, 1)
    lp_t = torch.log_softmax(_dense_teacher(b)[0].flatten(1) / T, 1)
    per_class = (lp_t.exp() * (lp_t - lp_s)).sum(1)
    got = _weighted("cwd")(ModelOutput(logits=s.clone()), b)
    torch.testing.assert_close(got.double(), 3.0 * T * T * (per_class * wc).sum() / wc.sum(), rtol=1e-4, atol=1e-5)


def test_bad_class_weights_are_one_line_each(small_store, tmp_path):
    from kdcache.store import CacheStore

    teacher, store = small_store
    other = _baseline_run(tmp_path / "other", CacheStore(store), [0.5] * 11, classes=["a"] * 11)
    other_data = _baseline_run(tmp_path / "other-data", CacheStore(store), [0.5] * 11, dataset="camvid")
    good = _baseline_run(tmp_path / "good", CacheStore(store), [0.5] * 11)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    base = ["train-student", "--cache", store, "--epochs", "1", "--limit", "8", "--batch-size", "8", "--workers", "0",
            "--out", tmp_path / "x", "--method"]
    for spec, words in (
        ("kl:class_weights=wrong", "method 'kl': class_weights must be one of none, baseline, got 'wrong'"),
        ("kl:class_weights=baseline", "class_weights=baseline needs baseline=RUN (a CE student run on the same data)"),
        ("cwd:teacher_iou=test", "method 'cwd': teacher_iou must be one of train, val, got 'test'"),
        ("dist:margin=0", "method 'dist': margin must be a finite number > 0, got 0"),
        (f"kl:class_weights=baseline,baseline={other}", "give a baseline run of the same data set and class list"),
        (f"kl:class_weights=baseline,baseline={other_data}", "was trained on camvid with classes"),
        (f"kl:class_weights=baseline,baseline={tmp_path / 'nope'}", "is not a run folder (no config.json)"),
        (f"kl:class_weights=baseline,baseline={empty}", "has no validation record with per-class IoU"),
        (f"kl:class_weights=baseline,baseline={good},teacher_iou=val", "is not in a run folder with metrics.jsonl; "
                                                                       "give teacher_iou=train"),
    ):
        r = kd(*base, spec)
        assert r.exit_code == 2 and words in " ".join(r.output.split()), (spec, r.output)
    # a cache without quality arrays (built before kdcache recorded them) is refused with the way out
    m = build_method("kl", class_weights="baseline", baseline=str(good))
    with pytest.raises(Exception, match="kl:class_weights=baseline reads the teacher from its cache; give --cache"):
        m.prepare([])  # a Python caller with no training caches
    cache = CacheStore(store)
    cache.schema.meta["quality"] = None
    with pytest.raises(Exception, match="lacks \\(built before kdcache recorded them\\); rebuild it with "
                                        "build-teacher-cache --overwrite"):
        m.prepare([(cache, [0, 1])])


@pytest.mark.parametrize("online", [False, True])
def test_a_student_trains_with_class_weights_from_a_real_baseline_run(small_store, tmp_path, online):
    _, store = small_store
    common = ["--cache", store, "--epochs", "1", "--batch-size", "8", "--limit", "16", "--device", "cpu",
              "--workers", "0"]
    assert kd("train-student", *common, "--method", "none", "--out", tmp_path / "ce").exit_code == 0
    r = kd("train-student", *common, "--method", f"dist:class_weights=baseline,baseline={tmp_path / 'ce'},margin=0.05",
           "--method", f"cwd:class_weights=baseline,baseline={tmp_path / 'ce'},weight=1", "--out", tmp_path / "s",
           *(["--online-teacher", "cache"] if online else []))
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert math.isfinite(rec["train_dist"]) and math.isfinite(rec["train_cwd"])
    assert json.loads((tmp_path / "s" / "config.json").read_text())["class_weights"]["cwd"]["weights"]
    # the run records what it weighed its classes by: the baseline's best val IoU, the teacher's, the weights
    ev = json.loads((tmp_path / "s" / "config.json").read_text())["class_weights"]["dist"]
    base = [json.loads(x) for x in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines() if '"best"' in x][-1]
    assert ev["baseline_iou"] == pytest.approx([float("nan") if v is None else v for v in base["val_iou"]],
                                               nan_ok=True)
    assert len(ev["weights"]) == 11 and all(0.0 <= w <= 1.0 for w in ev["weights"])


def test_teacher_iou_val_reads_the_teacher_runs_best_epoch(tmp_path):
    """``teacher_iou=val``: the teacher's per-class IoU is its own run's best val record, against the
    baseline's, by the rule (a teacher whose weights file sits in a run folder with metrics.jsonl)."""
    import numpy as np
    from fake_data import make_teacher

    from kdcache.methods.teacher_aware import class_weights_rule
    from kdcache.store import CacheStore
    from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

    (tmp_path / "teacher-run").mkdir()
    weights = make_teacher(tmp_path / "teacher-run" / "best.pt")
    out = tmp_path / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(weights), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=4, topk=4, device="cpu", workers=0), show_progress=False)
    store = CacheStore(out)
    C = store.schema.num_classes
    teacher_iou = [0.9 - 0.05 * c for c in range(C)]
    student_iou = [0.6] * C
    _baseline_run(tmp_path / "teacher-run", store, teacher_iou, classes=list(store.schema.class_names))
    base = _baseline_run(tmp_path / "ce", store, student_iou)
    m = build_method("dist", class_weights="baseline", baseline=str(base), teacher_iou="val", margin=0.1)
    m.prepare([(store, np.arange(4))])
    want = class_weights_rule(teacher_iou, student_iou, 0.1)
    assert m.aware.weights.tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert m.aware.evidence["teacher_iou"] == pytest.approx(teacher_iou)
    assert 0.0 in want and 1.0 in want and any(0 < w < 1 for w in want)  # every part of the rule is used
