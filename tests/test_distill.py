"""train-student: targets through the geometry, each method's loss against a direct formula,
the no-teacher guarantee, the online-teacher parity mode, resume and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd

from kdcache.core.checkpoint import load_weights
from kdcache.core.topk import attention_map, dense_logits, topk_targets
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.kernels import topk_kl_reference
from kdcache.methods import build_method
from kdcache.models import ModelOutput, build_model
from kdcache.pipeline.transforms import Geometry, Preprocess, apply_geometry
from kdcache.pipeline.warp import warp_targets
from kdcache.store import CacheSchema, CacheStore, to_tensors
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store, train_student

RES = {"resolution": [32, 48]}


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("c") / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=16,
                                         topk=4, features=("stage3",), attention=True, flip_average=True,
                                         combine="logit",  # the mean of the logits, as flip_averaged() says
                                         samples_per_shard=8, device="cpu", workers=0), show_progress=False)
    return out


def flip_averaged(teacher_path, x):
    m = build_model("demo_teacher", 11, taps=("stage3",))
    load_weights(m, teacher_path)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x.flip(-1))
    return (a.logits + b.logits.flip(-1)) / 2


# -- geometry ----------------------------------------------------------------------------------------


def test_cached_targets_follow_the_geometry(store, teacher):
    """Flips: exactly the (flip-averaged) teacher on the flipped image, up to fp16 rounding.
    A 1.25x scaled crop agrees with the teacher run on that crop on the top-1 class at >= 50% of
    the cells (nearest resampling of a map is not the teacher on a resampled image)."""
    s = CacheStore(store)
    strides = s.schema.strides
    ds = limit(build_dataset("synthetic", "train", **RES), 16)
    agree_scaled = []
    for i in range(6):
        cached = to_tensors(s.read(i))
        x = Preprocess().image_to_tensor(ds.load(i)[0])
        H, W = x.shape[-2:]
        g = Geometry((H, W), 1.0, 0, 0, (H, W), True)
        w = warp_targets(cached, g, strides)
        ref = flip_averaged(teacher, apply_geometry(x, g, kind="image")[None])[0]
        np.testing.assert_allclose(w["kd/values"].float(), ref.topk(4, 0).values, atol=2e-2, rtol=2e-3)
        assert not w["kd/ignore"].any()
        g = Geometry((H, W), 1.25, 4, 8, (24, 32), False)
        w = warp_targets(cached, g, strides)
        ref = flip_averaged(teacher, apply_geometry(x, g, kind="image")[None])[0]
        assert w["kd/values"].shape == (4, *ref.shape[-2:])
        agree_scaled.append((w["kd/indices"][0].long() == ref.argmax(0)).float().mean().item())
    assert np.mean(agree_scaled) >= 0.5, agree_scaled


@pytest.mark.parametrize("flip", [False, True])
def test_stride_aligned_scale_one_crops_are_exactly_the_cached_slice(store, flip):
    """Scale 1 and a crop window on the stride grid: every target is the cached array's slice
    (mirrored when flipped), bit for bit, for the logits and for each feature and attention map
    at its own stride."""
    s = CacheStore(store)
    strides = s.schema.strides
    cached = to_tensors(s.read(2))
    checked = 0
    for top, left, oh, ow in ((8, 16, 16, 24), (0, 0, 32, 48), (16, 8, 16, 32)):
        g = Geometry((32, 48), 1.0, top, left, (oh, ow), flip)
        w = warp_targets(cached, g, strides)
        assert not w["kd/ignore"].any()
        for group, arrays in (("logits", ("values", "indices", "tail")), ("features/stage3", ("",)),
                              ("attention/stage3", ("",))):
            sy, sx = strides[group]
            assert top % sy == left % sx == oh % sy == ow % sx == 0, (group, strides[group])
            for name in arrays:
                src = cached[f"{group}/{name}" if name else group]
                want = src[..., int(top // sy):int((top + oh) // sy), int(left // sx):int((left + ow) // sx)]
                if flip:
                    want = want.flip(-1)
                got = w[f"kd/{name}" if group == "logits" else f"kd/{group}"]
                assert got.dtype == want.dtype and torch.equal(got, want), (group, name, top, left)
                checked += 1
    assert checked == 15


def test_padding_is_ignored_and_ids_are_never_interpolated(store):
    s = CacheStore(store)
    cached = to_tensors(s.read(0))
    g = Geometry((32, 48), 0.5, 0, 0, (32, 48), False)  # the scaled image covers a quarter of the crop
    w = warp_targets(cached, g, s.schema.strides)
    assert w["kd/ignore"].float().mean().item() == pytest.approx(0.75)
    assert w["kd/attention/stage3/ignore"].float().mean().item() == pytest.approx(0.75)


def test_a_scaled_flipped_crop_takes_each_cell_whole_from_its_nearest_source_cell(store):
    """Off the stride grid (scale 1.3, odd offsets, flipped) every target cell is one cached
    cell's whole top-k entry (its k ids in their order, their values and the tail, never a blend
    of neighbours): the cell under the target cell's centre, mapped back by hand."""
    s = CacheStore(store)
    sy, sx = s.schema.strides["logits"]
    cached = to_tensors(s.read(1))
    v, ids, tail = cached["logits/values"], cached["logits/indices"], cached["logits/tail"]
    H, W = 32, 48
    g = Geometry((H, W), 1.3, 3, 5, (24, 40), True)
    w = warp_targets(cached, g, s.schema.strides)
    sh, sw = g.scaled_size
    out_h, out_w = w["kd/values"].shape[-2:]
    differ = 0
    for i in range(out_h):
        for j in range(out_w):
            y = g.top + (i + 0.5) * sy                      # centre of the cell in the scaled image
            x = g.left + g.out_size[1] - (j + 0.5) * sx    # mirrored
            if not (0 <= y < sh and 0 <= x < sw):
                assert w["kd/ignore"][i, j]
                continue
            r, c = int(y * H / sh // sy), int(x * W / sw // sx)   # back in the input, then a map cell
            assert not w["kd/ignore"][i, j]
            assert torch.equal(w["kd/indices"][:, i, j], ids[:, r, c]), (i, j)
            assert torch.equal(w["kd/values"][:, i, j], v[:, r, c]) and w["kd/tail"][i, j] == tail[r, c]
            # a blend with the next cell would differ from this pick wherever their entries differ
            nr, nc = min(r + 1, ids.shape[1] - 1), min(c + 1, ids.shape[2] - 1)
            differ += int(not torch.equal(v[:, nr, nc], v[:, r, c]) or not torch.equal(ids[:, nr, nc], ids[:, r, c]))
    assert differ > out_h * out_w // 4, differ  # so the checks above tell a blend from a nearest pick


@pytest.mark.parametrize("vdtype, idtype, with_tail", [(torch.float16, torch.uint8, True), (torch.float32, torch.int32, True),
                                                      (torch.float16, torch.int16, False)],
                         ids=["cache-dtypes", "fp32-int32", "int16-no-tail"])
def test_compiled_nearest_warp_is_the_numpy_cell_arithmetic(vdtype, idtype, with_tail):
    """The loader's nearest warp of the logits is one compiled call (``kdcache.kernels.nearest_topk``);
    it must pick, for every target cell of every crop, the very cell the numpy arithmetic of
    ``_grid`` picks (the same float64 operations in the same order), mirror a stored flip level as
    it does, and copy the values, ids and tail bit for bit in their own dtypes — over many random
    crops (scaled, stretched, flipped, sticking out into padding), a map read as a non-contiguous
    slice, and maps whose size does not divide the input's."""
    from kdcache.pipeline.signals import take_cells
    from kdcache.pipeline.warp import _grid, cell_index, out_map_size

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        H, W = int(rng.integers(8, 70)), int(rng.integers(8, 90))
        mh, mw = int(rng.integers(1, 20)), int(rng.integers(1, 24))
        k = int(rng.integers(1, 6))
        big = torch.randn(k, mh + 2, mw + 3, generator=gen).to(vdtype)
        v = big[:, 1:1 + mh, 2:2 + mw]  # a slice, as a store's extent crop gives
        assert not v.is_contiguous()
        ids = torch.randint(0, 100, (k, mh, mw), generator=gen).to(idtype)
        tail = torch.randn(mh, mw, generator=gen).to(vdtype) if with_tail else None
        g = Geometry((H, W), float(rng.uniform(0.5, 2.0)), int(rng.integers(-4, 30)), int(rng.integers(-4, 30)),
                     (int(rng.integers(4, 60)), int(rng.integers(4, 60))), bool(rng.integers(2)),
                     float(rng.uniform(0.75, 1.33)))
        stride = (float(rng.choice([2.0, 4.0, 8.0, 3.0])), float(rng.choice([2.0, 4.0, 8.0, 5.0])))
        mirror = bool(rng.integers(2))
        item = {"logits/values": v, "logits/indices": ids, **({"logits/tail": tail} if with_tail else {})}
        got = warp_targets(item, g, {"logits": stride}, mirror=mirror)
        yi, xi, invalid = _grid(g, (mh, mw), out_map_size(g.out_size, stride), mirror)
        cells = cell_index(yi, xi, mw)
        want = {"kd/values": take_cells(v.contiguous(), cells, invalid.shape),
                "kd/indices": take_cells(ids, cells, invalid.shape), "kd/ignore": torch.from_numpy(invalid)}
        if with_tail:
            want["kd/tail"] = take_cells(tail, cells, invalid.shape)
        assert sorted(got) == sorted(want), trial
        for key, a in want.items():
            assert got[key].dtype == a.dtype and torch.equal(got[key], a), (trial, key, g, mirror)


@pytest.mark.parametrize("C, k, with_tail", [(11, 4, True), (11, 11, False), (40, 12, True), (11, 4, False)],
                         ids=["top4", "dense", "top12-of-40", "top4-no-tail"])
@pytest.mark.parametrize("g", [Geometry((32, 48), 1.3, 3, 5, (24, 40), True),
                               Geometry((32, 48), 0.8, 0, 2, (32, 48), False),
                               Geometry((32, 48), 1.0, 1, 3, (24, 40), False)], ids=["up-flip", "down-pad", "offset"])
def test_bilinear_resampling_is_grid_sample_of_the_rebuilt_logits(g, C, k, with_tail):
    """``--target-resample bilinear``: the cached top-k + tail rebuilt to logits (the rest at an
    equal share of the tail, or at ``ABSENT`` where no tail is kept), sampled at each target
    cell's exact point by torch's own ``grid_sample`` (bilinear, border, align_corners=False;
    float64) and cut to top-k + tail again — with a scaled and flipped crop, a crop into padding
    and an off-grid offset; a dense cache (k = C), k = 4 (the compiled kernel's k passes) and
    k = 12 of 40 classes (its sort), with and without a tail. Padding cells are ignored as with
    nearest sampling."""
    from kdcache.pipeline.warp import out_map_size

    gen = torch.Generator().manual_seed(3)
    (mh, mw), stride = (8, 12), (4.0, 4.0)
    z = torch.randn(1, C, mh, mw, generator=gen, dtype=torch.float64) * 2
    v, ids, tail = topk_targets(z.float(), k)
    tail = tail if with_tail else None
    item = {"logits/values": v[0], "logits/indices": ids[0]}
    if tail is not None:
        item["logits/tail"] = tail[0]
    got = warp_targets(item, g, {"logits": stride}, "bilinear", C)
    out_h, out_w = out_map_size(g.out_size, stride)
    # the reference: each target cell's point in the input, then in map-cell units
    H, W = g.in_size
    sh, sw = g.scaled_size
    ys = (g.top + (torch.arange(out_h, dtype=torch.float64) + 0.5) * g.out_size[0] / out_h) * H / sh * mh / H
    xc = (torch.arange(out_w, dtype=torch.float64) + 0.5) * g.out_size[1] / out_w
    xs = (g.left + (g.out_size[1] - xc if g.flip else xc)) * W / sw * mw / W
    grid = torch.stack(torch.broadcast_tensors(xs[None, :] / mw * 2 - 1, ys[:, None] / mh * 2 - 1), -1)[None]
    dense = dense_logits(v, ids, tail, C).double() if k < C else z
    ref = F.grid_sample(dense, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rv, ri, rt = topk_targets(ref, k)
    torch.testing.assert_close(got["kd/values"], rv[0].float(), rtol=0, atol=1e-5)
    assert torch.equal(got["kd/indices"], ri[0])
    if tail is not None:
        torch.testing.assert_close(got["kd/tail"], rt[0].float(), rtol=0, atol=1e-5)
    else:
        assert "kd/tail" not in got
    nearest = warp_targets(item, g, {"logits": stride})
    assert torch.equal(got["kd/ignore"], nearest["kd/ignore"])
    if g.scale != 1.0:  # off the grid the two samplings differ (so this test tells them apart)
        assert not torch.equal(got["kd/values"], nearest["kd/values"])


def test_bilinear_resampling_of_an_aligned_crop_is_the_cached_slice(store):
    """Scale 1, a stride-aligned offset: every target cell's point is a cell centre, so bilinear
    sampling gives back the cached entries exactly (fp16 values, ids, tail)."""
    s = CacheStore(store)
    cached = to_tensors(s.read(2))
    g = Geometry((32, 48), 1.0, 8, 4, (16, 24), False)
    got = warp_targets(cached, g, s.schema.strides, "bilinear", s.schema.num_classes)
    want = warp_targets(cached, g, s.schema.strides)
    for key in ("kd/values", "kd/indices", "kd/tail", "kd/ignore"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_cli_target_resample_bilinear_trains_and_a_bad_value_is_one_line(tmp_path, store):
    out = tmp_path / "bilinear"
    r = kd("train-student", "--cache", store, "--method", "kl", "--target-resample", "bilinear", "--epochs", 1,
           "--limit", 8, "--batch-size", 4, "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["target_resample"] == "bilinear"
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(rec["train_kl"])
    bad = kd("train-student", "--cache", store, "--target-resample", "cubic", "--out", tmp_path / "bad", "--quiet")
    assert bad.exit_code != 0 and "--target-resample must be one of nearest, bilinear, got 'cubic'" in bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1 and not (tmp_path / "bad").exists()


# -- each method against a direct formula -------------------------------------------------------------------


def _batch(seed=0, N=3, C=11, k=4, h=6, w=8):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(N, C, h, w, generator=g) * 3
    v, i, tail = topk_targets(t_logits, k)
    ignore = torch.rand(N, h, w, generator=g) < 0.2
    feat_t = torch.randn(N, 16, h // 2, w // 2, generator=g)
    batch = {"kd/values": v, "kd/indices": i, "kd/tail": tail, "kd/ignore": ignore,
             "kd/features/t": feat_t, "kd/features/t/ignore": torch.zeros(N, h // 2, w // 2, dtype=torch.bool),
             "kd/attention/t": attention_map(feat_t), "kd/attention/t/ignore": torch.zeros(N, h // 2, w // 2, dtype=torch.bool)}
    out = ModelOutput(torch.randn(N, C, h * 2, w * 2, generator=g, requires_grad=True),
                      {"s": torch.randn(N, 8, h, w, generator=g, requires_grad=True)})
    return t_logits, batch, out


META = CacheSchema.new(class_names=[f"c{i}" for i in range(11)], k=4, input_size=(12, 16), map_size=(6, 8),
                      feature_shapes={"t": (16, 3, 4)}, features=("t",), attention=("t",))


def test_kl_is_the_reference_on_downsampled_logits():
    _, batch, out = _batch()
    m = build_method("kl", weight=0.5, temperature=2.0)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False)
    want = 0.5 * topk_kl_reference(s.double(), batch["kd/values"].double(), batch["kd/indices"],
                                   batch["kd/tail"].double(), temperature=2.0, ignore_mask=batch["kd/ignore"])
    assert torch.allclose(m(out, batch).double(), want, rtol=1e-4)


def test_at_and_sp_and_fitnet_against_their_formulas():
    _, batch, out = _batch()
    at = build_method("at", weight=10.0, student_tap="s", teacher_tap="t")
    at.setup({"s": 8}, META)
    q_s = F.adaptive_avg_pool2d(out.features["s"].pow(2).sum(1, keepdim=True), (3, 4))[:, 0]
    q_t = batch["kd/features/t"].pow(2).sum(1)
    want = 10.0 * (F.normalize(q_s.flatten(1), dim=1) - F.normalize(q_t.flatten(1), dim=1)).pow(2).mean()
    assert torch.allclose(at(out, batch), want, rtol=1e-5)

    sp = build_method("sp", weight=2.0, student_tap="s", teacher_tap="t")
    fs, ft = out.features["s"].flatten(1), batch["kd/features/t"].flatten(1)
    gs, gt = F.normalize(fs @ fs.t(), dim=1), F.normalize(ft @ ft.t(), dim=1)
    assert torch.allclose(sp(out, batch), 2.0 * (gs - gt).pow(2).sum() / 9, rtol=1e-5)

    fit = build_method("fitnet", student_tap="s", teacher_tap="t")
    fit.setup({"s": 8}, META)
    adapted = F.interpolate(fit.adapter(out.features["s"]), size=(3, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(fit(out, batch), (adapted - batch["kd/features/t"]).pow(2).mean(), rtol=1e-5)
    assert fit(out, batch).requires_grad and any(p.requires_grad for p in fit.parameters())


def test_cwd_with_a_dense_cache_is_the_channel_wise_kl():
    t_logits, batch, out = _batch(k=11)
    batch["kd/ignore"][:] = False
    v, i, _ = topk_targets(t_logits, 11)
    batch.update({"kd/values": v, "kd/indices": i})
    batch.pop("kd/tail")
    cwd = build_method("cwd", weight=3.0, temperature=4.0)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False)
    ps = F.log_softmax(s.flatten(2) / 4, -1)
    pt = F.log_softmax(t_logits.flatten(2) / 4, -1)
    want = 3.0 * 16 * (pt.exp() * (pt - ps)).sum(-1).mean()
    assert torch.allclose(cwd(out, batch), want, rtol=1e-4)


def test_sparse_cwd_fills_the_tail_evenly_and_leaves_padding_out():
    """cwd from a top-k cache with ignored cells, against the paper's formula written out in
    float64: each class channel is a softmax over the positions both saw (T = 3), the teacher's
    logit for a class outside its top k is the tail's log-mass shared equally by the C - k classes."""
    t_logits, batch, out = _batch(seed=3, k=4)
    C, k, T = 11, 4, 3.0
    cwd = build_method("cwd", weight=2.0, temperature=T)
    got = cwd(out, batch)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False).detach().double().numpy()
    v, idx = batch["kd/values"].double().numpy(), batch["kd/indices"].numpy()
    tail, ign = batch["kd/tail"].double().numpy(), batch["kd/ignore"].numpy()
    N, _, H, W = s.shape
    total = 0.0
    for n in range(N):
        keep = [(y, x) for y in range(H) for x in range(W) if not ign[n, y, x]]
        for c in range(C):
            zt, zs = [], []
            for y, x in keep:
                ids = list(idx[n, :, y, x])
                zt.append(v[n, ids.index(c), y, x] if c in ids else tail[n, y, x] - math.log(C - k))
                zs.append(s[n, c, y, x])
            pt = np.exp(np.array(zt) / T - np.logaddexp.reduce(np.array(zt) / T))
            log_ps = np.array(zs) / T - np.logaddexp.reduce(np.array(zs) / T)
            total += float((pt * (np.log(pt) - log_ps)).sum())
    want = 2.0 * T * T * total / (N * C)
    assert got.item() == pytest.approx(want, rel=1e-4)
    # the filled logits carry exactly the tail's mass: logsumexp over the classes outside the top k
    dense = dense_logits(batch["kd/values"], batch["kd/indices"], batch["kd/tail"], C).double()
    outside = torch.ones_like(dense, dtype=torch.bool).scatter(1, batch["kd/indices"].long(), False)
    lse = torch.logsumexp(dense.masked_fill(~outside, float("-inf")), 1)
    assert torch.allclose(lse, batch["kd/tail"].double(), atol=1e-5)
    got.backward()
    assert out.logits.grad is not None and torch.isfinite(out.logits.grad).all()


def _pearson64(a: np.ndarray, b: np.ndarray) -> float:
    """The paper's ρ: the cosine of the mean-centred vectors, ε = 1e-8 beside the norms."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + 1e-8))


def _dist64(zs: np.ndarray, zt: np.ndarray, T: float, beta: float, gamma: float) -> float:
    """DIST (Huang et al. 2022, eq. 5-7) in float64 on logit matrices [cells, classes]."""
    def soft(z):
        e = np.exp(z / T - (z / T).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    ys, yt = soft(zs), soft(zt)
    inter = np.mean([1 - _pearson64(ys[i], yt[i]) for i in range(len(ys))])
    intra = np.mean([1 - _pearson64(ys[:, c], yt[:, c]) for c in range(ys.shape[1])])
    return T * T * (beta * inter + gamma * intra)


def test_dist_with_a_dense_cache_is_the_papers_formula():
    """k = C: the cache holds the teacher exactly; the loss is eq. 5-7 over every cell of the
    batch (per-cell correlations over classes, per-class correlations over the batch's cells),
    and matches numpy's own Pearson correlation up to the paper's ε."""
    t_logits, batch, out = _batch(seed=5, k=11)
    batch["kd/ignore"][:] = False
    batch.pop("kd/tail")
    m = build_method("dist", weight=1.5, temperature=2.0, beta=0.5, gamma=2.0)
    got = m(out, batch)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False).detach().double()
    zs = s.permute(0, 2, 3, 1).reshape(-1, 11).numpy()
    zt = t_logits.double().permute(0, 2, 3, 1).reshape(-1, 11).numpy()
    want = 1.5 * _dist64(zs, zt, 2.0, 0.5, 2.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    ys, yt = np.exp(zs / 2) / np.exp(zs / 2).sum(1, keepdims=True), np.exp(zt / 2) / np.exp(zt / 2).sum(1, keepdims=True)
    rho_inter = np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    rho_intra = np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(11)])
    assert got.item() == pytest.approx(1.5 * 4 * (0.5 * (1 - rho_inter) + 2.0 * (1 - rho_intra)), rel=1e-4)
    # a student equal to the teacher has nothing left to match
    same = ModelOutput(F.interpolate(t_logits, size=(12, 16), mode="nearest"), {})
    assert m(same, batch).item() == pytest.approx(0.0, abs=1e-5)


def test_sparse_dist_shares_the_tail_evenly_and_leaves_padding_out():
    """From a top-k cache with ignored cells: the teacher's classes outside its top k each get an
    equal share of the tail's mass, and only the cells both saw enter either correlation."""
    t_logits, batch, out = _batch(seed=6, k=4)
    C, k, T = 11, 4, 1.0
    m = build_method("dist")
    got = m(out, batch)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False).detach().double().numpy()
    v, idx = batch["kd/values"].double().numpy(), batch["kd/indices"].numpy()
    tail, ign = batch["kd/tail"].double().numpy(), batch["kd/ignore"].numpy()
    rows_s, rows_t = [], []
    for n, y, x in zip(*np.nonzero(~ign)):
        ids = list(idx[n, :, y, x])
        rows_t.append([v[n, ids.index(c), y, x] if c in ids else tail[n, y, x] - math.log(C - k) for c in range(C)])
        rows_s.append(s[n, :, y, x])
    assert got.item() == pytest.approx(_dist64(np.array(rows_s), np.array(rows_t), T, 1.0, 1.0), rel=1e-5)
    got.backward()
    assert out.logits.grad is not None and torch.isfinite(out.logits.grad).all()
    # every cell in the padding: a zero loss with a zero gradient
    _, batch, out = _batch(seed=6, k=4)
    batch["kd/ignore"][:] = True
    loss = m(out, batch)
    loss.backward()
    assert loss.item() == 0.0 and not out.logits.grad.any()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_fitnet_leaves_ignored_cells_out(loss):
    """fitnet's MSE and 1 - cosine per position, averaged over the cells the teacher saw only,
    against numpy float64; ignored cells hold garbage that must not count."""
    _, batch, out = _batch(seed=5)
    g = torch.Generator().manual_seed(9)
    ign = torch.rand(3, 3, 4, generator=g) < 0.4
    batch["kd/features/t/ignore"] = ign
    batch["kd/features/t"] = batch["kd/features/t"].masked_fill(ign[:, None], 1e3)
    fit = build_method("fitnet", weight=0.7, student_tap="s", teacher_tap="t", loss=loss)
    fit.setup({"s": 8}, META)
    got = fit(out, batch)
    a = F.interpolate(fit.adapter(out.features["s"]), size=(3, 4), mode="bilinear",
                      align_corners=False).detach().double().numpy()
    t = batch["kd/features/t"].double().numpy()
    per = []
    for n, y, x in zip(*np.nonzero(~ign.numpy()), strict=True):
        sv, tv = a[n, :, y, x], t[n, :, y, x]
        per.append(((sv - tv) ** 2).mean() if loss == "mse"
                   else 1.0 - sv @ tv / (np.linalg.norm(sv) * np.linalg.norm(tv)))
    assert got.item() == pytest.approx(0.7 * float(np.mean(per)), rel=1e-5)


def test_pseudo_labels_keep_confident_teacher_argmax_only():
    t_logits, batch, out = _batch()
    pseudo = build_method("pseudo", confidence_threshold=0.6)
    p = t_logits.softmax(1)
    conf, arg = p.max(1)
    labels = arg.masked_fill((conf < 0.6) | batch["kd/ignore"], 255)
    s = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(pseudo(out, batch), F.cross_entropy(s, labels, ignore_index=255), rtol=1e-5)
    strict = build_method("pseudo", confidence_threshold=0.999999)  # below its bound, 1 (where no pixel is kept)
    assert not bool((conf >= 0.999999).any())
    assert strict(out, batch).item() == 0.0  # nothing kept: zero, not NaN


def test_class_balanced_pseudo_labels_keep_each_class_s_most_confident_share(store):
    """CBST thresholds from a real cache against exact per-class quantiles of the teacher's
    confidence (numpy, float64): within one histogram bin; a pixel is kept when its confidence
    reaches min(t_c, the global threshold), so every class keeps at least its top share."""
    from kdcache.core.topk import BINS

    s = CacheStore(store)
    rows = np.arange(8)
    pseudo = build_method("pseudo", confidence_threshold=0.9, class_balanced=0.3)
    pseudo.prepare([(s, rows)])
    confs, cls = [], []
    for r in rows:
        it = s.read(int(r), groups={"logits"})
        v, tail = it["logits/values"].astype(np.float64), it["logits/tail"].astype(np.float64)
        lse = np.logaddexp(np.logaddexp.reduce(v, axis=0), tail)
        confs.append(np.exp(v[0] - lse).ravel())
        cls.append(it["logits/indices"][0].ravel())
    conf, cl = np.concatenate(confs), np.concatenate(cls)
    t = pseudo.class_thresholds.numpy()
    for c in range(11):
        mine = conf[cl == c]
        if len(mine) == 0:
            assert t[c] == 1.0
            continue
        exact = np.quantile(mine, 0.7)  # 30% of the class's pixels lie above it
        assert abs(t[c] - exact) <= 1.0 / BINS + 1e-9, (c, t[c], exact)
        kept = (mine >= min(t[c], 0.9)).mean()
        assert kept >= 0.3 - 1e-9 or t[c] >= 0.9  # at least the top share, or the global threshold keeps more
    # the labels: argmax where conf >= min(t_c, 0.9)
    t_logits, batch, out = _batch()
    conf_b, arg = t_logits.softmax(1).max(1)
    want = arg.masked_fill((conf_b < torch.from_numpy(t).float().clamp(max=0.9)[arg]) | batch["kd/ignore"], 255)
    labels = F.interpolate(out.logits, size=(6, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(pseudo(out, batch), F.cross_entropy(labels, want, ignore_index=255), rtol=1e-5)
    assert build_method("pseudo", class_balanced=0.3).class_thresholds.numel() == 0  # set by prepare only


def test_unknown_method_and_missing_cached_maps_are_clear_errors(tmp_path, store):
    r = kd("train-student", "--cache", store, "--method", "kld", "--epochs", 1, "--limit", 8, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "unknown KD method 'kld'" in r.output and "kl" in r.output
    r = kd("train-student", "--cache", store, "--method", "sp", "--student-tap", "stage3", "--teacher-tap", "stage2",
           "--epochs", 1, "--limit", 8, "--out", tmp_path / "r", "--quiet")
    assert r.exit_code == 2 and "--features stage2" in r.output
    r = kd("train-student", "--cache", store, "--method", "at", "--epochs", 1, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "at needs student_tap" in r.output


# -- training --------------------------------------------------------------------------------------------


def _config(store, out, **kw):
    base = dict(methods=[{"name": "kl"}], epochs=1, limit=16, batch_size=4, workers=0, device="cpu", out=str(out),
                scale=(0.75, 1.25), crop=(32, 48))
    base.update(kw)
    return config_from_store(str(store), **base)


def test_cached_training_never_builds_the_teacher(tmp_path, store, monkeypatch):
    import kdcache.models as models
    import kdcache.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the teacher was built in cached mode")

    real = models.MODELS.get("demo_teacher")
    monkeypatch.setattr(loading.Weights, "build", refuse)
    monkeypatch.setitem(models.MODELS._items, "demo_teacher", refuse)
    methods = [{"name": "kl"}, {"name": "at", "student_tap": "stage2", "teacher_tap": "stage3"},
               {"name": "fitnet", "student_tap": "stage3", "teacher_tap": "stage3"}]
    r = train_student(_config(store, tmp_path / "run", methods=methods), show_progress=False)
    assert r["last"]["train_kl"] > 0 and r["last"]["train_at"] > 0 and r["last"]["train_fitnet"] > 0
    assert real is not None


def test_at_reads_the_features_of_a_cache_without_attention_maps(tmp_path, teacher):
    """A cache built with --features alone: ``at`` squares the cached features itself, and the
    pipeline reads them (it read the absent attention maps and failed with a KeyError before), to
    the same loss as from the cache's attention maps on the same batch."""
    out = tmp_path / "f.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=8,
                                         topk=4, features=("stage3",), device="cpu", workers=0), show_progress=False)
    at = {"name": "at", "student_tap": "stage2", "teacher_tap": "stage3", "weight": 10.0}
    cfg = _config(out, tmp_path / "run", methods=[at], limit=8, scale=(1.0, 1.0), hflip=False)
    trainer = StudentTrainer(cfg)
    train_ds, val_ds = trainer.build_datasets()
    pipe = trainer.build_batches(train_ds, val_ds)[0].pipeline
    assert set(pipe.groups) == {"features/stage3"}
    batch = torch.utils.data.default_collate([pipe[0], pipe[1]])
    torch.manual_seed(0)
    student = trainer.build_model(11)
    loss = trainer.methods[0](student(batch["image"]), batch)
    # the same through attention maps computed here from the cached features (Q = sum_c F^2)
    via_maps = dict(batch, **{"kd/attention/stage3": batch["kd/features/stage3"].float().pow(2).sum(1),
                              "kd/attention/stage3/ignore": batch["kd/features/stage3/ignore"]})
    trainer.methods[0].source = "attention"
    assert loss > 0 and torch.allclose(loss, trainer.methods[0](student(batch["image"]), via_maps), rtol=1e-5)
    r = train_student(_config(out, tmp_path / "run2", methods=[at], limit=8), show_progress=False)
    assert r["last"]["train_at"] > 0


def test_a_method_whose_required_takes_no_schema_still_works():
    """Methods of users' own written before ``required`` took the cache's schema are called as
    they were; the built-in ones get the schema."""
    from kdcache.methods import KDMethod, reads

    class Old(KDMethod):
        def required(self):
            return ["logits"]

    assert reads(Old(weight=1.0), object()) == ["logits"]
    at = build_method("at", student_tap="s", teacher_tap="t")
    assert reads(at, None) == ["attention/t"]


def test_online_teacher_feeds_the_same_loss_code(tmp_path, store, teacher):
    """Same batch (no augmentation): the online teacher's targets and loss equal the cached ones
    within fp16 rounding."""
    cfg = _config(store, tmp_path / "a", scale=(1.0, 1.0), hflip=False, crop=(32, 48))
    cached = StudentTrainer(cfg)
    online_cfg = _config(store, tmp_path / "b", scale=(1.0, 1.0), hflip=False, crop=(32, 48),
                         online_teacher="demo_teacher", teacher_weights=str(teacher), online_topk=4)
    online_cfg.cache = None
    online = StudentTrainer(online_cfg)
    train_ds, val_ds = cached.build_datasets()
    pipe = cached.build_batches(train_ds, val_ds)[0].pipeline
    torch.manual_seed(0)
    student = cached.build_model(11)
    online.build_model(11)
    online.class_weight = cached.class_weight = None
    from kdcache.pipeline.transforms import collate

    batch = collate([pipe[j] for j in range(4)])
    loss_c, terms_c = cached.compute_loss(student, batch)
    # the cache was built flip-averaged; the online teacher is not, so compare on a plain cache
    plain = tmp_path / "plain.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(plain), dataset_options=dict(RES), limit=16,
                                         topk=4, device="cpu", workers=0), show_progress=False)
    cached = StudentTrainer(_config(plain, tmp_path / "c", scale=(1.0, 1.0), hflip=False, crop=(32, 48)))
    pipe = cached.build_batches(*cached.build_datasets())[0].pipeline
    cached.build_model(11)
    cached.class_weight = None
    batch = collate([pipe[j] for j in range(4)])
    loss_c, terms_c = cached.compute_loss(student, batch)
    loss_o, terms_o = online.compute_loss(student, {k: v for k, v in batch.items() if not k.startswith("kd/")})
    assert math.isclose(terms_c["kl"].item(), terms_o["kl"].item(), rel_tol=1e-3)
    assert online.teacher is not None and cached.teacher is None


@pytest.mark.slow  # trains twice
def test_resume_equals_an_uninterrupted_run(tmp_path, store, monkeypatch):
    from kdcache.core.runs import RunDir

    methods = [{"name": "kl"}, {"name": "fitnet", "student_tap": "stage3", "teacher_tap": "stage3"}]
    a = train_student(_config(store, tmp_path / "a", epochs=2, methods=methods), show_progress=False)
    real_log = RunDir.log

    def crashing_log(self, record):  # interrupted while logging epoch 2: last.pt is epoch 1's
        if record.get("epoch") == 1:
            raise KeyboardInterrupt
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crashing_log)
    with pytest.raises(KeyboardInterrupt):
        train_student(_config(store, tmp_path / "b", epochs=2, methods=methods), show_progress=False)
    monkeypatch.setattr(RunDir, "log", real_log)
    interrupted = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    r = kd("train-student", "--out", tmp_path / "b", "--resume", "--quiet")  # options from config.json
    assert r.exit_code == 0, r.output
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k in sa["state_dict"]:
        torch.testing.assert_close(sa["state_dict"][k], sb["state_dict"][k], rtol=0, atol=0)
    assert any(not torch.equal(sb["state_dict"][k], interrupted[k]) for k in interrupted
               if interrupted[k].is_floating_point())  # the resumed epoch trained
    for k in sa["methods"][1]:  # the FitNet adapter resumed too
        torch.testing.assert_close(sa["methods"][1][k], sb["methods"][1][k], rtol=0, atol=0)
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rb] == [0, 1]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["val_miou"] == pytest.approx(y["val_miou"], rel=1e-6)
    assert a["best_miou"] == pytest.approx(max(y["val_miou"] for y in rb), rel=1e-6)


@pytest.mark.slow  # trains a student per method
def test_cli_every_method_trains(tmp_path, store):
    for spec in ("none", "kl:weight=0.5,temperature=2", "at", "sp", "fitnet", "cwd", "dist", "pseudo:confidence_threshold=0.5",
                 "pseudo:class_balanced=0.5"):
        out = tmp_path / spec.replace(":", "-").replace("=", "-").replace(",", "-")
        r = kd("train-student", "--cache", store, "--method", spec, "--student-tap", "stage3", "--teacher-tap", "stage3",
               "--epochs", 1, "--limit", 8, "--batch-size", 4, "--device", "cpu", "--out", out, "--quiet")
        assert r.exit_code == 0, (spec, r.output)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["kind"] == "distill" and cfg["methods"][0]["name"] == spec.split(":")[0]
        rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        name = spec.split(":")[0]
        if name != "none":
            assert f"train_{name}" in rec and math.isfinite(rec[f"train_{name}"])
    ev = kd("evaluate", tmp_path / "kl-weight-0.5-temperature-2", "--quiet", "--qualitative", "0", "--no-latency")
    assert ev.exit_code == 0, ev.output


def test_stored_views_are_drawn_per_epoch_with_their_own_targets(tmp_path, teacher):
    from kdcache.train.student_batches import KDPipeline

    out = tmp_path / "v.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=4,
                                         topk=4, views=3, view_crop=(16, 24), device="cpu", workers=0),
                        show_progress=False)
    s = CacheStore(out)
    ds = limit(build_dataset("synthetic", "train", **RES), 4)
    pipe = KDPipeline(ds, Preprocess(), None, 0, s, np.arange(4), use_views=True)
    cached = s.read(1)
    seen = set()
    for epoch in range(6):
        pipe.set_epoch(epoch)
        item = pipe[1]
        assert item["image"].shape == (3, 16, 24) and item["label"].shape == (16, 24)
        v = [j for j in range(3) if np.array_equal(item["kd/values"].numpy(), cached["views/logits/values"][j])]
        assert len(v) == 1
        scale, top, left, oh, ow, flip, _stretch = cached["views/params"][v[0]].tolist()
        x = Preprocess().image_to_tensor(ds.load(1)[0])
        g = Geometry((32, 48), scale, int(top), int(left), (16, 24), bool(flip))
        assert torch.equal(item["image"], apply_geometry(x, g, kind="image"))
        seen.add(v[0])
    assert len(seen) >= 2  # a new view is drawn across epochs
