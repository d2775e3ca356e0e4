"""Tests for kdcache.core.metrics: hand-computed cases, NaN rules, accumulation and a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.core.metrics import ConfusionMatrix, per_image_iou, predicted_class

IGN = 255


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def _assert_list_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert _close(g, w), (got, want)


def test_hand_computed_2x3_with_ignore() -> None:
    # target:   [[0, 1, 2],      pred: [[0, 1, 1],
    #            [0, 255, 1]]           [2, 0, 1]]
    # valid pixels (gt, pred): (0,0) (1,1) (2,1) (0,2) (1,1)  -- the ignore pixel is dropped
    # class 0: I=1, GT=2, P=1, U=2   -> IoU 1/2,  Acc 1/2
    # class 1: I=2, GT=2, P=3, U=3   -> IoU 2/3,  Acc 1
    # class 2: I=0, GT=1, P=1, U=2   -> IoU 0,    Acc 0
    target = torch.tensor([[0, 1, 2], [0, IGN, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 1]])
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(pred, target)
    expected = torch.tensor([[1, 0, 1], [0, 2, 0], [0, 1, 0]])
    assert torch.equal(cm.matrix.cpu(), expected)
    assert cm.matrix.dtype == torch.int64

    r = cm.compute()
    assert r["intersection"] == [1, 2, 0]
    assert r["gt_pixels"] == [2, 2, 1]
    assert r["pred_pixels"] == [1, 3, 1]
    assert r["union"] == [2, 3, 2]
    _assert_list_close(r["iou"], [1 / 2, 2 / 3, 0.0])
    _assert_list_close(r["acc"], [1 / 2, 1.0, 0.0])
    assert _close(r["miou"], (1 / 2 + 2 / 3 + 0.0) / 3)
    assert _close(r["macc"], (1 / 2 + 1.0 + 0.0) / 3)
    assert _close(r["aacc"], 3 / 5)
    for key in ("miou", "macc", "aacc"):
        assert isinstance(r[key], float)
    assert all(isinstance(v, float) for v in r["iou"] + r["acc"])


def test_nan_rules_absent_and_predicted_only_classes() -> None:
    # 4 classes. class 3 appears nowhere; class 2 is predicted but absent from gt.
    # target: 0 0 1 1     pred: 0 2 1 1
    # class 0: I=1, GT=2, P=1, U=2 -> IoU 1/2, Acc 1/2
    # class 1: I=2, GT=2, P=2, U=2 -> IoU 1,   Acc 1
    # class 2: I=0, GT=0, P=1, U=1 -> IoU 0 (counted), Acc NaN (not counted)
    # class 3: U=0, GT=0           -> IoU NaN, Acc NaN (not counted)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute()
    _assert_list_close(r["iou"], [1 / 2, 1.0, 0.0, math.nan])
    _assert_list_close(r["acc"], [1 / 2, 1.0, math.nan, math.nan])
    assert _close(r["miou"], (1 / 2 + 1.0 + 0.0) / 3)
    assert _close(r["macc"], (1 / 2 + 1.0) / 2)
    assert _close(r["aacc"], 3 / 4)


def test_empty_is_all_nan() -> None:
    cm = ConfusionMatrix(3)
    r = cm.compute()
    assert math.isnan(r["miou"]) and math.isnan(r["macc"]) and math.isnan(r["aacc"])
    assert all(math.isnan(v) for v in r["iou"] + r["acc"])
    # only ignore pixels: still nothing valid
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), IGN))
    r = cm.compute()
    assert math.isnan(r["miou"]) and math.isnan(r["macc"]) and math.isnan(r["aacc"])
    assert int(cm.matrix.sum()) == 0


def test_ignore_pixels_do_not_count_whatever_pred_says() -> None:
    target = torch.tensor([[0, IGN], [IGN, 1]])
    cm_a = ConfusionMatrix(2)
    cm_a.update(torch.tensor([[0, 0], [0, 1]]), target)
    cm_b = ConfusionMatrix(2)
    cm_b.update(torch.tensor([[0, 1], [1, 1]]), target)
    assert torch.equal(cm_a.matrix, cm_b.matrix)
    assert int(cm_a.matrix.sum()) == 2
    assert cm_a.compute()["miou"] == 1.0


def test_accumulation_equals_single_update_on_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 5, (2, 7, 9), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 5, (2, 7, 9), generator=g) for _ in range(3)]
    for t in targets:
        t[torch.rand(t.shape, generator=g) < 0.2] = IGN
    acc = ConfusionMatrix(5)
    for p, t in zip(preds, targets, strict=True):
        acc.update(p, t)
    one = ConfusionMatrix(5)
    one.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(acc.matrix, one.matrix)
    ra, ro = acc.compute(), one.compute()
    assert ra["miou"] == ro["miou"] and ra["iou"] == ro["iou"]

    # dataset-level sums differ from averaging per-image mIoU in general, but merge == update
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(preds[0], targets[0])
    b.update(preds[1], targets[1])
    b.update(preds[2], targets[2])
    a += b
    assert torch.equal(a.matrix, one.matrix)


def test_reset_and_merge_checks() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    cm.reset()
    assert int(cm.matrix.sum()) == 0
    with pytest.raises(ValueError, match="num_classes"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="ignore_index"):
        cm.merge(ConfusionMatrix(3, ignore_index=-1))
    assert cm.merge(ConfusionMatrix(3)) is cm


def test_accepts_uint8_numpy_and_any_shape() -> None:
    target = np.array([[[0, 1], [2, IGN]]], dtype=np.uint8)
    pred = np.array([[[0, 1], [1, 2]]], dtype=np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.compute()["intersection"] == [1, 1, 0]
    # a custom ignore index
    cm2 = ConfusionMatrix(3, ignore_index=-1)
    cm2.update(torch.tensor([0, 2]), torch.tensor([-1, 2]))
    assert cm2.compute()["gt_pixels"] == [0, 0, 1]


def test_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target.*\[3, 7\]"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 7, IGN]))
    with pytest.raises(ValueError, match=r"target.*\[-1\]"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"pred.*\[5\]"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([-2, 0]), torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    assert int(cm.matrix.sum()) == 0  # failed updates add nothing


def test_all_reduce_is_noop_without_distributed() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)


def test_all_reduce_single_rank_gloo(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        cm = ConfusionMatrix(2)
        cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        before = cm.matrix.clone()
        cm.all_reduce()
        assert torch.equal(cm.matrix, before)
    finally:
        dist.destroy_process_group()


def _reference(pred: np.ndarray, target: np.ndarray, c: int, ignore: int) -> dict[str, object]:
    """Straightforward loop implementation of mmsegmentation's IoU metric."""
    inter = [0] * c
    gt = [0] * c
    pr = [0] * c
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t == ignore:
            continue
        gt[t] += 1
        pr[p] += 1
        if p == t:
            inter[t] += 1
    iou, acc = [], []
    for k in range(c):
        union = gt[k] + pr[k] - inter[k]
        iou.append(inter[k] / union if union > 0 else math.nan)
        acc.append(inter[k] / gt[k] if gt[k] > 0 else math.nan)
    iou_valid = [v for v in iou if not math.isnan(v)]
    acc_valid = [v for v in acc if not math.isnan(v)]
    return {
        "iou": iou,
        "acc": acc,
        "miou": sum(iou_valid) / len(iou_valid) if iou_valid else math.nan,
        "macc": sum(acc_valid) / len(acc_valid) if acc_valid else math.nan,
        "aacc": sum(inter) / sum(gt) if sum(gt) else math.nan,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 6
    cm = ConfusionMatrix(c)
    preds, targets = [], []
    for _ in range(4):
        # classes 4 and 5 rarely/never in gt so the NaN paths are exercised
        target = rng.choice(np.arange(5), size=(13, 17), p=[0.3, 0.3, 0.2, 0.2, 0.0])
        target[rng.random(target.shape) < 0.15] = IGN
        pred = rng.integers(0, 5 if seed == 0 else c, size=target.shape)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    ref = _reference(np.concatenate(preds), np.concatenate(targets), c, IGN)
    got = cm.compute()
    for key in ("miou", "macc", "aacc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, nan_ok=True)
    assert got["iou"] == pytest.approx(ref["iou"], rel=1e-12, nan_ok=True)
    assert got["acc"] == pytest.approx(ref["acc"], rel=1e-12, nan_ok=True)
    assert math.isnan(got["acc"][5])


def test_per_image_iou() -> None:
    target = torch.tensor([[0, 1, 2], [0, IGN, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 1]])
    assert per_image_iou(pred, target, 3) == pytest.approx((1 / 2 + 2 / 3 + 0.0) / 3)
    assert per_image_iou(target.clamp(max=2), target, 3) == 1.0
    assert math.isnan(per_image_iou(pred, torch.full_like(target, IGN), 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matrix_stays_on_device() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 1, 1], device="cuda"))
    assert cm.matrix.device.type == "cuda"
    cpu = ConfusionMatrix(3)
    cpu.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    assert torch.equal(cm.matrix.cpu(), cpu.matrix)
    cpu += cm
    assert int(cpu.matrix.sum()) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_predicted_class_is_numpys_argmax_ties_to_the_first(dtype) -> None:
    """`predicted_class` (max(dim).indices, faster than torch's argmax over a class axis on the CPU)
    against numpy's argmax in float64, which takes the first of equal maxima."""
    g = torch.Generator().manual_seed(0)
    for shape, dim in [((3, 11, 9, 13), 1), ((11, 17, 5), 0), ((6, 21), 1), ((2, 4, 1, 1), 1)]:
        x = torch.randint(-3, 4, shape, generator=g).to(dtype)  # few values: many ties
        ref = np.argmax(x.double().numpy(), axis=dim)
        got = predicted_class(x, dim)
        assert got.dtype == torch.int64 and got.shape == ref.shape
        np.testing.assert_array_equal(got.numpy(), ref)
