"""``cirkd`` (Yang et al., CVPR 2022): each term against the paper's formula written out in float64,
the class memories (first in, first out per class; unlabelled and padding cells write nothing), the
state dict through a file, and training from a cache with features (labelled and unlabelled) and
resumed from ``last.pt``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_runner import kd

from kdcache.core.errors import KDCacheError
from kdcache.methods import build_method
from kdcache.models import ModelOutput
from kdcache.store import CacheSchema
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer

C, D_T, D_S = 4, 6, 5  # classes, teacher channels, student channels

SCHEMA = CacheSchema.new(class_names=[f"c{i}" for i in range(C)], k=2, input_size=(12, 16), map_size=(6, 8),
                         feature_shapes={"t": (D_T, 3, 4)}, features=("t",))


def make_batch(seed: int = 0, N: int = 3, h: int = 3, w: int = 4, student_size: tuple[int, int] | None = None):
    """A batch by hand: teacher features [N, D_T, h, w] with some padding cells, labels at 4× the grid
    (image 1 unlabelled: 255 everywhere), and a student output whose feature needs a gradient."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, D_T, h, w, generator=g)
    ignore = torch.zeros(N, h, w, dtype=torch.bool)
    ignore[0, -1, :] = True  # the crop's padding: a row of image 0
    ignore[2, :, -1] = True  # and a column of image 2
    labels = torch.randint(0, C, (N, h, w), generator=g)
    labels[1] = 255
    labels[0, 0, 0] = 255  # a pixel without a label in a labelled image
    label = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # cell (i, j)'s centre pixel carries its label
    sh, sw = student_size or (h, w)
    s = torch.randn(N, D_S, sh, sw, generator=g, requires_grad=True)
    batch = {"kd/features/t": t, "kd/features/t/ignore": ignore, "label": label}
    return batch, ModelOutput(torch.randn(N, C, 4 * h, 4 * w, generator=g), {"s": s}), labels


def cirkd(**options):
    m = build_method("cirkd", student_tap="s", teacher_tap="t", **options)
    m.setup({"s": D_S}, SCHEMA)
    return m


# -- independent references: the paper's formulas, written out in float64 -------------------------------


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def kl_rows(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) ‖ softmax(s)) of each row, by exp and sums."""
    p = t_logits.exp() / t_logits.exp().sum(-1, keepdim=True)
    q = s_logits.exp() / s_logits.exp().sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1)


def cells_of(x: torch.Tensor, n: int, valid: torch.Tensor) -> torch.Tensor:
    """Image n's embeddings [D, h, w] at its valid cells, as rows [|V_n|, D], row by row."""
    return torch.stack([x[n, :, a, b] for a in range(x.shape[2]) for b in range(x.shape[3]) if valid[n, a, b]])


def reference_batch_term(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, tau: float) -> float:
    """1/|P| Σ_(i,j) 1/|V_i| Σ_a KL(σ(Sᵗ_ij[a]/τ) ‖ σ(Sˢ_ij[a]/τ)), S_ij = x_i x_jᵀ of unit pixel embeddings."""
    s, t = s.double(), t.double()
    images = [n for n in range(s.shape[0]) if valid[n].any()]
    total = 0.0
    for i in images:
        for j in images:
            si, sj = normalise(cells_of(s, i, valid)), normalise(cells_of(s, j, valid))
            ti, tj = normalise(cells_of(t, i, valid)), normalise(cells_of(t, j, valid))
            total += kl_rows(ti @ tj.T / tau, si @ sj.T / tau).mean().item()
    return total / len(images) ** 2


def projected(m, s: torch.Tensor) -> torch.Tensor:
    """The projection head by hand from its weights: 1×1 conv, BatchNorm on the batch's statistics
    (training mode, biased variance), ReLU, 1×1 conv; float64, [N, D_T, h, w]."""
    conv1, bn, _, conv2 = m.projector
    x = torch.einsum("oc,nchw->nohw", conv1.weight.detach().double()[:, :, 0, 0], s.detach().double())
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    x = (x - mean) / (var + bn.eps).sqrt() * bn.weight.detach().double()[None, :, None, None] \
        + bn.bias.detach().double()[None, :, None, None]
    x = x.clamp_min(0)
    return torch.einsum("oc,nchw->nohw", conv2.weight.detach().double()[:, :, 0, 0], x)


def reference_memory_term(anchors_s: torch.Tensor, anchors_t: torch.Tensor, memory: torch.Tensor, tau: float) -> float:
    """1/|A| Σ_a KL(σ(⟨t_a, K⟩/τ) ‖ σ(⟨s_a, K⟩/τ)) over a contrast set K [k, D]."""
    return kl_rows(anchors_t @ memory.T / tau, anchors_s @ memory.T / tau).mean().item()


# -- the terms --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_size", [None, (6, 8)])
def test_the_batch_pixel_to_pixel_term_is_the_papers_formula(student_size):
    """Every ordered pair of images, the softmax over image j's cells the teacher saw; a student map
    of another size is resized (bilinearly) to the teacher's grid first."""
    batch, out, _ = make_batch(student_size=student_size)
    m = cirkd(weight=2.0, tau=0.5, memory_pixel=0, memory_region=0, batch_pixel=1.5)
    s = out.features["s"]
    if student_size is not None:
        s = torch.nn.functional.interpolate(s, size=(3, 4), mode="bilinear", align_corners=False)
    want = reference_batch_term(s, batch["kd/features/t"], ~batch["kd/features/t/ignore"], 0.5)
    got = m(out, batch)
    assert math.isclose(got.item(), 2.0 * 1.5 * want, rel_tol=1e-5)
    got.backward()
    assert out.features["s"].grad.abs().sum() > 0
    assert not m.pixel_filled.any() and not m.region_filled.any()  # memory terms off: nothing written


def test_an_image_that_is_all_padding_is_left_out_of_the_pairs():
    batch, out, _ = make_batch()
    batch["kd/features/t/ignore"][2] = True
    m = cirkd(tau=0.2, memory_pixel=0, memory_region=0)
    want = reference_batch_term(out.features["s"], batch["kd/features/t"], ~batch["kd/features/t/ignore"], 0.2)
    assert math.isclose(m(out, batch).item(), want, rel_tol=1e-5)  # 1/4 of the two images' 4 pairs
    batch["kd/features/t/ignore"][:] = True
    loss = m(out, batch)
    assert loss.item() == 0.0 and loss.requires_grad


def test_the_memory_pixel_and_region_terms_are_the_papers_formula():
    """One step from empty memories, each big enough to keep the whole batch and contrasted whole: the
    pixel memory is every labelled cell's unit teacher embedding (at most 16 of a class per image,
    here fewer), the region memory each (image, class)'s normalised mean; the anchors are every cell
    the teacher saw, labelled or not."""
    torch.manual_seed(0)
    batch, out, labels = make_batch()
    tau = 0.3
    m = cirkd(tau=tau, batch_pixel=0, memory_pixel=0.4, memory_region=0.7, pixel_memory=64, region_memory=8)
    terms = m.terms(out, batch)
    t, valid = batch["kd/features/t"].double(), ~batch["kd/features/t/ignore"]
    unit_t = t / t.norm(dim=1, keepdim=True)
    pixels, regions = [], []
    for n in range(t.shape[0]):
        for c in range(C):
            where = valid[n] & (labels[n] == c)
            if where.any():
                cells = unit_t[n][:, where].T  # [m, D]
                pixels.append(cells)
                regions.append(normalise(cells.mean(0))[None])
    pixels, regions = torch.cat(pixels), torch.cat(regions)
    assert int(m.pixel_filled.sum()) == len(pixels) and int(m.region_filled.sum()) == len(regions)
    p = projected(m, out.features["s"])
    anchors_s = normalise(torch.cat([cells_of(p, n, valid) for n in range(3)]))
    anchors_t = normalise(torch.cat([cells_of(t, n, valid) for n in range(3)]))
    assert len(anchors_s) == int(valid.sum()) == 3 * 12 - 4 - 3  # image 1's unlabelled cells are anchors
    want_pixel = reference_memory_term(anchors_s, anchors_t, pixels, tau)
    want_region = reference_memory_term(anchors_s, anchors_t, regions, tau)
    assert math.isclose(terms["pixel"].item(), want_pixel, rel_tol=1e-5)
    assert math.isclose(terms["region"].item(), want_region, rel_tol=1e-5)
    assert set(terms) == {"pixel", "region"}


def test_the_loss_is_the_weighted_sum_of_the_terms_and_trains_the_projection():
    batch, out, _ = make_batch()
    m = cirkd(weight=3.0, batch_pixel=1.0, memory_pixel=0.1, memory_region=0.2, pixel_memory=32, region_memory=4)
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    terms = m.terms(out, batch)
    m.load_state_dict(state)  # the same memories and draws again
    torch.manual_seed(1)
    loss = m(out, batch)
    want = 3.0 * (terms["batch"] + 0.1 * terms["pixel"] + 0.2 * terms["region"])
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())


def test_a_contrast_set_takes_its_share_of_each_class_at_random():
    m = cirkd(pixel_memory=50, pixel_contrast=7)  # 7 // 4 + 1 = 2 of each class
    m.pixel_queue[:, :, 0] = torch.arange(C)[:, None].float()  # channel 0: the class
    m.pixel_filled[:] = torch.tensor([50, 1, 0, 30])
    got = m.contrast_set(m.pixel_queue, m.pixel_filled, m.pixel_contrast)
    assert sorted(got[:, 0].tolist()) == [0, 0, 1, 3, 3]  # class 1 has one, class 2 none written


# -- the memories -----------------------------------------------------------------------------------------


def test_the_memories_are_first_in_first_out_per_class():
    m = cirkd(pixel_memory=5, region_memory=2)
    eye = torch.eye(D_T)

    def step(vectors: list[torch.Tensor], classes: list[int]):
        """One image of len(vectors) cells (a 1 × n grid) of the given classes."""
        t = torch.stack(vectors, 1)[None, :, None, :]  # [1, D, 1, n]
        labels = torch.tensor(classes)[None, None, :]
        m.update_memory(t, labels, labels != 255)

    step([eye[0], eye[1], eye[2], eye[3]], [0, 0, 0, 255])  # the unlabelled cell writes nothing
    assert m.pixel_filled.tolist() == [3, 0, 0, 0] and m.pixel_ptr.tolist() == [3, 0, 0, 0]
    assert {tuple(r.tolist()) for r in m.pixel_queue[0, :3]} == {tuple(eye[k].tolist()) for k in range(3)}
    first_region = normalise(eye[:3].mean(0))
    assert torch.allclose(m.region_queue[0, 0], first_region) and m.region_filled.tolist() == [1, 0, 0, 0]

    step([eye[4], eye[5], eye[4]], [0, 0, 1])  # class 0's pixel ring is full: slots 3 and 4
    assert m.pixel_filled.tolist() == [5, 1, 0, 0] and m.pixel_ptr.tolist() == [0, 1, 0, 0]
    assert {tuple(r.tolist()) for r in m.pixel_queue[0, 3:5]} == {tuple(eye[4].tolist()), tuple(eye[5].tolist())}
    assert {tuple(r.tolist()) for r in m.pixel_queue[0, :3]} <= {tuple(eye[k].tolist()) for k in range(3)}
    assert torch.equal(m.pixel_queue[1, 0], eye[4])
    step([eye[1]], [0])  # the oldest go first: pixel slot 0, region slot 0
    step([eye[2]], [0])  # then pixel slot 1, region slot 1
    assert m.pixel_ptr.tolist() == [2, 1, 0, 0]
    assert torch.allclose(m.pixel_queue[0, 0], eye[1]) and torch.allclose(m.pixel_queue[0, 1], eye[2])
    assert m.region_filled.tolist() == [2, 1, 0, 0] and m.region_ptr.tolist() == [0, 1, 0, 0]
    assert torch.allclose(m.region_queue[0, 0], eye[1]) and torch.allclose(m.region_queue[0, 1], eye[2])


def test_at_most_16_cells_of_a_class_per_image_are_written():
    m = cirkd(pixel_memory=100)
    t = torch.randn(2, D_T, 5, 8)
    labels = torch.zeros(2, 5, 8, dtype=torch.long)
    m.update_memory(t, labels, torch.ones(2, 5, 8, dtype=torch.bool))
    assert m.pixel_filled.tolist() == [32, 0, 0, 0] and m.region_filled.tolist() == [2, 0, 0, 0]
    written = {tuple(r.tolist()) for r in m.pixel_queue[0, :32]}
    assert written <= {tuple(t[n, :, a, b].tolist()) for n in range(2) for a in range(5) for b in range(8)}
    assert len(written) == 32


def test_unlabelled_and_padding_cells_do_not_write_to_the_memories():
    """Image 1 of the batch is unlabelled (255): its distinct teacher vector is in no memory; nor is a
    padding cell's, though it has a label."""
    batch, out, labels = make_batch()
    t = batch["kd/features/t"]
    t[1] = 0.0
    t[1, 0] = 1.0  # image 1: e0 everywhere
    t[0, :, -1, :] = 0.0
    t[0, 1, -1, :] = 1.0  # image 0's padding row: e1
    m = cirkd(pixel_memory=64, region_memory=8)
    m(out, batch)
    held = torch.cat([m.pixel_queue[c, :int(m.pixel_filled[c])] for c in range(C)])
    unit = torch.nn.functional.normalize(t, dim=1)
    labelled = ~batch["kd/features/t/ignore"] & (labels != 255)
    assert len(held) == int(labelled.sum())
    rows = sorted(tuple(round(x, 5) for x in r.tolist()) for r in held)
    assert rows == sorted(tuple(round(x, 5) for x in r.tolist()) for r in unit.permute(0, 2, 3, 1)[labelled])
    for e in (0, 1):
        assert not (held - torch.eye(D_T)[e]).abs().sum(1).lt(1e-6).any()
    assert int(m.region_filled.sum()) == sum(len((labels[n][labelled[n]]).unique()) for n in range(3))


# -- a negative control -----------------------------------------------------------------------------------


def test_negative_controls():
    """A student with the teacher's own embeddings has no batch term; the reference detects a softmax
    over the whole batch's cells at once (one reading of 'across images'), or the reverse KL."""
    batch, out, _ = make_batch()
    t = batch["kd/features/t"]
    same = ModelOutput(out.logits, {"s": t.clone().requires_grad_()})
    m = build_method("cirkd", student_tap="s", teacher_tap="t", memory_pixel=0, memory_region=0)
    m.setup({"s": D_T}, SCHEMA)
    assert abs(m(same, batch).item()) < 1e-6
    got = m(out, batch).item()
    valid = ~batch["kd/features/t/ignore"]
    s_all = normalise(torch.cat([cells_of(out.features["s"].double(), n, valid) for n in range(3)]))
    t_all = normalise(torch.cat([cells_of(t.double(), n, valid) for n in range(3)]))
    whole_batch = kl_rows(t_all @ t_all.T / 0.1, s_all @ s_all.T / 0.1).mean().item()
    reverse = reference_batch_term(t, out.features["s"], valid, 0.1)
    right = reference_batch_term(out.features["s"], t, valid, 0.1)
    assert math.isclose(got, right, rel_tol=1e-5)
    assert not math.isclose(got, whole_batch, rel_tol=1e-2) and not math.isclose(got, reverse, rel_tol=1e-2)


# -- state, options ---------------------------------------------------------------------------------------


def test_the_state_dict_round_trips_through_a_file(tmp_path):
    batch, out, _ = make_batch()
    a = cirkd(pixel_memory=16, region_memory=3)
    for seed in range(3):
        a(*make_batch(seed)[1::-1])
    path = tmp_path / "cirkd.pt"
    torch.save(a.state_dict(), path)
    b = cirkd(pixel_memory=16, region_memory=3)
    b.load_state_dict(torch.load(path, weights_only=True))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert int(b.region_filled.sum()) > 0 and int(b.pixel_ptr.sum()) > 0
    torch.manual_seed(5)
    la = a(out, batch)
    torch.manual_seed(5)
    assert torch.equal(la, b(out, batch))  # the same memories and draws: the same loss
    fresh = cirkd(pixel_memory=16, region_memory=3)
    torch.manual_seed(5)
    assert not torch.equal(la, fresh(out, batch))


def test_memory_sizes_are_whole_numbers():
    with pytest.raises(KDCacheError, match="method 'cirkd': cirkd pixel_memory, region_memory, pixel_contrast and "
                                           "region_contrast take whole numbers, got pixel_memory=2.5"):
        build_method("cirkd", student_tap="s", teacher_tap="t", pixel_memory=2.5)


# -- from a cache (labelled and unlabelled) and resumed -----------------------------------------------


@pytest.fixture(scope="module")
def feature_caches(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("cirkd")
    out = {}
    for name, split in (("lab", "train"), ("pool", "unlabeled")):
        out[name] = root / f"{name}.zarr"
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out[name]), split=split, limit=8, topk=4,
                                             features=("stage3",), dataset_options={"resolution": [32, 48]},
                                             samples_per_shard=8, device="cpu", workers=0), show_progress=False)
    return out


def test_cli_trains_from_a_feature_cache_with_unlabelled_images_and_resumes_the_memory(tmp_path, feature_caches,
                                                                                     monkeypatch):
    out = tmp_path / "run"
    r = kd("train-student", "--cache", feature_caches["lab"], "--unlabeled-cache", feature_caches["pool"],
           "--method", "cirkd", "--student-tap", "stage3", "--teacher-tap", "stage3", "--epochs", "1",
           "--limit", "8", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(rec["train_cirkd"]) and rec["train_cirkd"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["methods"] == [{"name": "cirkd", "student_tap": "stage3", "teacher_tap": "stage3"}]
    saved = torch.load(out / "last.pt", weights_only=True)["methods"][0]
    assert saved["pixel_queue"].shape == (11, 2500, 128) and saved["region_queue"].shape == (11, 250, 128)
    # 4 steps of 2 labelled 32x48 images (4x6 cells): regions and pixels written, no more than 16 a class an image
    assert 0 < int(saved["region_filled"].sum()) <= 4 * 2 * 11
    assert int(saved["region_filled"].sum()) <= int(saved["pixel_filled"].sum()) <= 4 * 2 * 24

    restored = {}
    real = StudentTrainer.load_extra_state

    def spy(self, ckpt):
        real(self, ckpt)
        restored.update({k: v.clone() for k, v in self.methods[0].state_dict().items()})

    monkeypatch.setattr(StudentTrainer, "load_extra_state", spy)
    r = kd("train-student", "--out", out, "--resume", "--quiet")  # the run is complete: restored, nothing trained
    assert r.exit_code == 0, r.output
    assert restored.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(restored[k].cpu(), v), k


def test_the_online_teacher_gives_the_cached_loss(tmp_path, feature_caches):
    """The live teacher (--online-teacher cache: the one the cache records) fills the same
    kd/features keys (rounded to fp16 as a cache stores them); on the same batch, student, head and
    draws the term equals the cached one."""
    from kdcache.pipeline.transforms import collate
    from kdcache.train.student import config_from_store

    common = dict(methods=[{"name": "cirkd", "student_tap": "stage3", "teacher_tap": "stage3"}], device="cpu",
                  workers=0, batch_size=4, limit=8, hflip=False, scale=(1.0, 1.0), crop=(32, 48))
    cached = StudentTrainer(config_from_store(str(feature_caches["lab"]), out=str(tmp_path / "a"), **common))
    online = StudentTrainer(config_from_store(str(feature_caches["lab"]), out=str(tmp_path / "b"),
                                              online_teacher="cache", **common))
    pipe = cached.build_batches(*cached.build_datasets())[0].pipeline
    student = cached.build_model(11)
    online.build_model(11)
    assert online.teacher is not None and cached.teacher is None
    online.methods[0].load_state_dict(cached.methods[0].state_dict())  # the same projection head
    batch = collate([pipe[j] for j in range(4)])
    terms = {}
    for name, trainer, given in (("cached", cached, batch),
                                 ("online", online, {k: v for k, v in batch.items() if not k.startswith("kd/")})):
        torch.manual_seed(3)
        terms[name] = trainer.compute_loss(student, given)[1]["cirkd"].item()
    assert terms["cached"] > 0 and math.isclose(terms["cached"], terms["online"], rel_tol=1e-6)
    for a, b in zip(cached.methods[0].buffers(), online.methods[0].buffers()):  # the same cells written
        assert a.shape == b.shape and (a.dtype != torch.long or torch.equal(a, b))
