"""``afdcd`` (Af-DCD, Fan et al., NeurIPS 2023): the loss against the paper's formula written out in
float64 with loops, ignored cells left out, a negative control, gradients to the adapter, its
errors, and a training run from a cache with features and with the live teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd
from torch import nn

from kdcache.core.errors import KDCacheError
from kdcache.methods import build_method
from kdcache.methods.base import MethodError
from kdcache.models import ModelOutput
from kdcache.store import CacheSchema
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache


def schema(channels: int, size=(5, 7)) -> CacheSchema:
    return CacheSchema.new(class_names=[f"c{i}" for i in range(3)], k=3, input_size=(4 * size[0], 4 * size[1]),
                           map_size=size, feature_shapes={"t": (channels, *size)}, features=("t",))


def batch_of(seed: int, N=2, C=8, size=(5, 7), student=(3, 5, 7), ignored=0.25):
    """A hand-made batch: teacher features with garbage (1e3) in the ignored cells, and a student tap."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, C, *size, generator=g)
    ignore = torch.rand(N, *size, generator=g) < ignored
    t = t.masked_fill(ignore[:, None], 1e3)
    s = torch.randn(N, *student, generator=g, requires_grad=True)
    out = ModelOutput(torch.zeros(N, 3, 4 * size[0], 4 * size[1]), {"s": s})
    return out, {"kd/features/t": t, "kd/features/t/ignore": ignore}


def generated64(m, s: torch.Tensor, size, keep: torch.Tensor) -> np.ndarray:
    """F̂ = G(M ⊙ A(Fˢ)) in float64 from the method's weights: 1×1 conv, bilinear resize, mask,
    3×3 conv, ReLU, 3×3 conv."""
    w = {k: v.detach().double() for k, v in m.state_dict().items()}
    a = F.conv2d(s.detach().double(), w["align.weight"], w["align.bias"])
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    a = a * keep.double()
    h = F.relu(F.conv2d(a, w["generator.0.weight"], w["generator.0.bias"], padding=1))
    return F.conv2d(h, w["generator.2.weight"], w["generator.2.bias"], padding=1).numpy()


def reference(s_hat, t, ignore, *, groups, window, pool, tau, mimic, weight) -> float:
    """The paper's loss with loops: the mean squared error over the valid cells and channels, and
    the omni-contrasting InfoNCE over each valid (cell, channel group) of each window of the
    max-pooled maps: positive the teacher's same cell and group, negatives the teacher's other
    groups at every valid cell of the window, similarity −L1 / τ."""
    N, C, H, W = t.shape
    valid = ~ignore
    l_fd = np.mean([((s_hat[n, :, y, x] - t[n, :, y, x]) ** 2).mean() for n, y, x in zip(*np.nonzero(valid))])
    Hp, Wp = math.ceil(H / pool), math.ceil(W / pool)
    ps, pt = np.zeros((N, C, Hp, Wp)), np.zeros((N, C, Hp, Wp))
    pv = np.zeros((N, Hp, Wp), dtype=bool)
    for n in range(N):
        for i in range(Hp):
            for j in range(Wp):
                cells = [(y, x) for y in range(i * pool, min((i + 1) * pool, H))
                         for x in range(j * pool, min((j + 1) * pool, W)) if valid[n, y, x]]
                if cells:
                    pv[n, i, j] = True
                    ps[n, :, i, j] = np.max([s_hat[n, :, y, x] for y, x in cells], axis=0)
                    pt[n, :, i, j] = np.max([t[n, :, y, x] for y, x in cells], axis=0)
    d = C // groups
    terms = []
    for n in range(N):
        for wi in range(math.ceil(Hp / window)):
            for wj in range(math.ceil(Wp / window)):
                cells = [(y, x) for y in range(wi * window, min((wi + 1) * window, Hp))
                         for x in range(wj * window, min((wj + 1) * window, Wp)) if pv[n, y, x]]
                for y, x in cells:
                    for k in range(groups):
                        anchor = ps[n, k * d:(k + 1) * d, y, x]
                        pos = -np.abs(anchor - pt[n, k * d:(k + 1) * d, y, x]).sum() / tau
                        negs = [-np.abs(anchor - pt[n, q * d:(q + 1) * d, yy, xx]).sum() / tau
                                for yy, xx in cells for q in range(groups) if q != k]
                        logits = np.array([pos, *negs])
                        top = logits.max()
                        terms.append(top + math.log(np.exp(logits - top).sum()) - pos)
    return weight * (float(np.mean(terms)) + mimic * l_fd)


CASES = {  # groups, window, pool, tau, student map (channels, h, w)
    "windows-padded": dict(groups=4, window=3, pool=1, tau=0.5, student=(3, 5, 7)),
    "pooled-resized": dict(groups=2, window=2, pool=2, tau=0.07, student=(3, 10, 14)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loss_is_the_papers_formula_in_float64(case):
    """5 × 7 maps: 3 × 3 windows leave part-windows at the edges (padded with ignored cells); the
    second case pools by 2 (a part-block at the edge too) and resizes a 10 × 14 student map. A
    hand-made mask stands in for the random one."""
    c = CASES[case]
    out, batch = batch_of(1, student=c["student"])
    m = build_method("afdcd", weight=0.3, student_tap="s", teacher_tap="t", groups=c["groups"], window=c["window"],
                     pool=c["pool"], tau=c["tau"], mask_ratio=0.5, mimic=2.0)
    m.setup({"s": c["student"][0]}, schema(8))
    keep = (torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(4)) >= 0.5).float()
    m.keep_mask = lambda n, h, w: keep
    got = m(out, batch)
    s_hat = generated64(m, out.features["s"], (5, 7), keep)
    want = reference(s_hat, batch["kd/features/t"].double().numpy(), batch["kd/features/t/ignore"].numpy(),
                     groups=c["groups"], window=c["window"], pool=c["pool"], tau=c["tau"], mimic=2.0,
                     weight=0.3)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ignored_cells_are_left_out():
    """What the teacher's padding cells hold does not count; every cell ignored: a zero loss with no
    NaN in the gradients."""
    out, batch = batch_of(2, ignored=0.4)
    m = build_method("afdcd", student_tap="s", teacher_tap="t", groups=4, window=3, mask_ratio=0.0)
    m.setup({"s": 3}, schema(8))
    ign = batch["kd/features/t/ignore"]
    other = dict(batch, **{"kd/features/t": batch["kd/features/t"].masked_fill(ign[:, None], -7.0)})
    assert ign.any() and m(out, batch).item() == pytest.approx(m(out, other).item(), rel=1e-6)
    # a whole image ignored is the other image's loss alone
    one = {"kd/features/t": batch["kd/features/t"][:1], "kd/features/t/ignore": ign[:1]}
    out_one = ModelOutput(out.logits[:1], {"s": out.features["s"][:1]})
    both = dict(batch, **{"kd/features/t/ignore": torch.cat([ign[:1], torch.ones_like(ign[1:])])})
    assert m(out, both).item() == pytest.approx(m(out_one, one).item(), rel=1e-5)
    allout = dict(batch, **{"kd/features/t/ignore": torch.ones_like(ign)})
    loss = m(out, allout)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(out.features["s"].grad).all()


def test_matching_features_score_lowest_and_shuffled_ones_more():
    """Negative control, with A and G the identity and no mask (F̂ = Fˢ): a student equal to the
    teacher has no mimicking error and a contrast near 0; the same features with the cells
    shuffled within each image, or the channel groups swapped, cost far more."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 8, 6, 8, generator=g) * 2
    batch = {"kd/features/t": t, "kd/features/t/ignore": torch.zeros(2, 6, 8, dtype=torch.bool)}
    m = build_method("afdcd", weight=1.0, student_tap="s", teacher_tap="t", groups=4, window=3, tau=0.1,
                     mask_ratio=0.0, mimic=1.0)
    m.setup({"s": 8}, schema(8, (6, 8)))
    m.align, m.generator = nn.Identity(), nn.Identity()

    def loss(s):
        return m(ModelOutput(torch.zeros(2, 3, 24, 32), {"s": s}), batch).item()

    same = loss(t.clone())
    perm = torch.randperm(48, generator=g)
    shuffled = loss(t.flatten(2)[..., perm].reshape(t.shape))
    swapped = loss(torch.cat([t[:, 2:], t[:, :2]], 1))  # each group holds its neighbour's channels
    noisy = loss(t + 0.3 * torch.randn(t.shape, generator=g))
    assert same < 0.05 and same < noisy < shuffled and swapped > 10 * max(same, 0.01), (same, noisy, shuffled, swapped)


def test_gradients_reach_the_student_and_the_adapter():
    out, batch = batch_of(5)
    m = build_method("afdcd", student_tap="s", teacher_tap="t", groups=4, window=3)
    m.setup({"s": 3}, schema(8))
    loss = m(out, batch)
    loss.backward()
    assert loss.item() > 0 and out.features["s"].grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"align", "generator"}


def test_the_mask_drops_its_share_of_cells_from_the_cpu_generator():
    m = build_method("afdcd", student_tap="s", teacher_tap="t", mask_ratio=0.75)
    torch.manual_seed(0)
    a = m.keep_mask(4, 50, 50)
    torch.manual_seed(0)
    assert torch.equal(a, m.keep_mask(4, 50, 50)) and a.shape == (4, 1, 50, 50)
    assert 1 - a.mean().item() == pytest.approx(0.75, abs=0.02)
    # no mask: nothing is drawn, so the generator's stream is untouched
    out, batch = batch_of(6)
    m = build_method("afdcd", student_tap="s", teacher_tap="t", groups=4, mask_ratio=0.0)
    m.setup({"s": 3}, schema(8))
    state = torch.get_rng_state()
    m(out, batch)
    assert torch.equal(state, torch.get_rng_state())


def test_its_errors_say_what_to_give():
    with pytest.raises(KDCacheError, match=r"method 'afdcd': afdcd groups, window and pool take whole numbers, "
                                           r"got groups=2.5"):
        build_method("afdcd", student_tap="s", teacher_tap="t", groups=2.5)
    m = build_method("afdcd", student_tap="s", teacher_tap="t", groups=3)
    with pytest.raises(MethodError, match=r"method 'afdcd': groups=3 does not divide the teacher's 't' features' 8 "
                                          r"channels; give groups= one of 2, 4, 8"):
        m.setup({"s": 3}, schema(8))
    with pytest.raises(KDCacheError, match=r"method 'afdcd': groups must be a finite number >= 2, got 1"):
        build_method("afdcd", student_tap="s", teacher_tap="t", groups=1)


@pytest.fixture(scope="module")
def features_store(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("afdcd") / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=8, topk=4, features=("stage3",), device="cpu", workers=0),
                        show_progress=False)
    return out


@pytest.mark.parametrize("source", ["cache", pytest.param("online", marks=pytest.mark.slow)])  # online: also below
def test_train_student_with_afdcd(tmp_path, features_store, source):
    """One epoch from a cache built with --features stage3, and with the live teacher (the store's,
    rebuilt); the adapter is saved with the run to resume."""
    online = ["--online-teacher", "cache"] if source == "online" else []
    out = tmp_path / "run"
    r = kd("train-student", "--cache", features_store, *online, "--method", "afdcd:groups=4,window=2",
           "--student-tap", "stage3", "--teacher-tap", "stage3", "--epochs", "1", "--limit", 8, "--batch-size", 4,
           "--workers", 0, "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(rec["train_afdcd"]) and rec["train_afdcd"] > 0
    spec = json.loads((out / "config.json").read_text())["methods"][0]
    assert spec["name"] == "afdcd" and spec["groups"] == 4
    saved = torch.load(out / "last.pt", weights_only=True)["methods"][0]
    assert {"align.weight", "generator.0.weight", "generator.2.weight"} <= set(saved)


def test_the_cache_and_the_live_teacher_give_the_same_loss(tmp_path, features_store, teacher):
    """One batch (no augmentation, no mask): the loss from the cached features equals the loss from
    the live teacher's (both fp16-rounded), with the same adapter."""
    from kdcache.pipeline.transforms import collate
    from kdcache.train.student import StudentTrainer, config_from_store

    spec = {"name": "afdcd", "student_tap": "stage3", "teacher_tap": "stage3", "groups": 4, "window": 2,
            "mask_ratio": 0.0}
    base = dict(methods=[spec], epochs=1, limit=8, batch_size=4, workers=0, device="cpu", scale=(1.0, 1.0),
                hflip=False, crop=(32, 48))
    cached = StudentTrainer(config_from_store(str(features_store), out=str(tmp_path / "a"), **base))
    pipe = cached.build_batches(*cached.build_datasets())[0].pipeline
    torch.manual_seed(0)
    student = cached.build_model(11)
    online_cfg = config_from_store(str(features_store), out=str(tmp_path / "b"), online_teacher="demo_teacher",
                                   teacher_weights=str(teacher), online_topk=4, **base)
    online_cfg.cache = None
    online = StudentTrainer(online_cfg)
    online.build_model(11)
    online.methods[0].load_state_dict(cached.methods[0].state_dict())
    online.class_weight = cached.class_weight = None
    batch = collate([pipe[j] for j in range(4)])
    _, terms_c = cached.compute_loss(student, batch)
    _, terms_o = online.compute_loss(student, {k: v for k, v in batch.items() if not k.startswith("kd/")})
    assert terms_c["afdcd"].item() > 0 and online.teacher is not None and cached.teacher is None
    assert math.isclose(terms_c["afdcd"].item(), terms_o["afdcd"].item(), rel_tol=1e-3)
