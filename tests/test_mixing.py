"""Cutmix and mixup per item (``--mix``), and function matching through a schedule cache built with
the same ``--mix`` (issue 49 §2).

References: the mixed crop against the two crops the unmixed pipeline cuts (the partner's cut here
with its drawn geometry), cutmix's box area against its λ, the mixed cross-entropy against a float64
computation of λ·CE(a) + (1 − λ)·CE(b) by hand; the cached targets against the teacher run here in
float64 on the student's mixed crop; a student trained from the mixed schedule against one trained
with the live teacher on the same mixed crops (to the bit); each bad combination as one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_runner import kd
from fake_data import make_teacher

from kdcache.core.checkpoint import read_checkpoint
from kdcache.data import build_dataset
from kdcache.models.loading import open_weights
from kdcache.pipeline.mixing import (
    Mix,
    MixOptions,
    draw_partner,
    mixed_cross_entropy,
    mixed_padding,
)
from kdcache.pipeline.transforms import Augment, Preprocess, SegPipeline, apply_geometry
from kdcache.store import CacheStore
from kdcache.store.forms import form_of
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store

RES = {"resolution": [32, 48]}
E = 2
AUG = Augment(scale=(0.75, 1.25), crop=(32, 48))


def _pipes(mix: MixOptions, seed: int = 0):
    ds = build_dataset("synthetic", "train", resolution=(32, 48), size=12)
    return SegPipeline(ds, Preprocess(), AUG, seed=seed), SegPipeline(ds, Preprocess(), AUG, seed=seed, mix=mix)


def _partner_crop(pipe: SegPipeline, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = pipe.dataset.load(mix.partner)
    return (apply_geometry(pipe.preprocess.image_to_tensor(image), mix.geometry, kind="image"),
            apply_geometry(pipe.preprocess.mask_to_tensor(mask), mix.geometry, kind="label", fill=255))


def test_cutmix_pastes_the_partners_box_and_leaves_the_own_crop_alone():
    plain, mixed = _pipes(MixOptions("cutmix"))
    boxes = []
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        mixed.set_epoch(epoch)
        for i in range(12):
            a, b = plain[i], mixed[i]
            mix = b["mix"]
            assert a["geometry"] == b["geometry"]  # the own crop is the unmixed run's
            assert mix.partner != i and 0 <= mix.partner < 12
            top, bottom, left, right = mix.box
            assert mix.lam == pytest.approx(1 - (bottom - top) * (right - left) / (32 * 48))
            px, py = _partner_crop(plain, mix)
            inside = torch.zeros(32, 48, dtype=torch.bool)
            inside[top:bottom, left:right] = True
            assert torch.equal(b["image"][:, inside], px[:, inside])
            assert torch.equal(b["image"][:, ~inside], a["image"][:, ~inside])
            assert torch.equal(b["label"][inside], py[inside]) and torch.equal(b["label"][~inside], a["label"][~inside])
            assert "mix/lam" not in b  # a segmentation cutmix's labels are the pasted map alone
            boxes.append(inside.float().mean().item())
    assert 0.1 < np.mean(boxes) < 0.6 and max(boxes) > 0.5  # Beta(1, 1): boxes of every size


def test_mixup_blends_and_keeps_both_labels():
    plain, mixed = _pipes(MixOptions("mixup", alpha=0.4))
    lams = []
    for i in range(12):
        a, b = plain[i], mixed[i]
        mix = b["mix"]
        px, py = _partner_crop(plain, mix)
        ref = mix.lam * a["image"].double() + (1 - mix.lam) * px.double()
        torch.testing.assert_close(b["image"].double(), ref, rtol=0, atol=1e-6)
        assert torch.equal(b["label"], a["label"]) and torch.equal(b["mix/label"], py)
        assert b["mix/lam"].item() == pytest.approx(mix.lam)
        lams.append(mix.lam)
    assert min(lams) < 0.2 and max(lams) > 0.8  # Beta(0.4, 0.4) is U-shaped


def test_the_draw_is_the_items_own_and_prob_chooses_how_many():
    opts = MixOptions("cutmix", prob=0.5)
    drawn = [draw_partner(opts, 0, e, i, 50) is not None for e in range(4) for i in range(50)]
    assert 0.35 < np.mean(drawn) < 0.65
    assert draw_partner(MixOptions("cutmix", prob=0.0), 0, 0, 0, 50) is None
    assert draw_partner(MixOptions(), 0, 0, 0, 50) is None
    a, b = draw_partner(opts, 1, 2, 3, 50), draw_partner(opts, 1, 2, 3, 50)
    assert (a is None) == (b is None) and (a is None or a[1] == b[1])  # a pure function of (seed, epoch, index)
    partners = {draw_partner(MixOptions("mixup"), s, 0, 7, 50)[1] for s in range(40)}
    assert 7 not in partners and len(partners) > 20


def test_mixed_cross_entropy_is_the_weighted_pair_in_float64():
    torch.manual_seed(0)
    N, C, H, W = 3, 5, 4, 6
    logits = torch.randn(N, C, H, W) * 3
    a = torch.randint(0, C, (N, H, W))
    b = torch.randint(0, C, (N, H, W))
    a[0, 0, :3] = 255
    b[1, 2, 1:] = 255
    lam = torch.tensor([0.3, 1.0, 0.75])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    for w in (None, weight):
        num = den = 0.0
        ll = logits.double()
        logp = ll - torch.log(torch.exp(ll).sum(1, keepdim=True))
        for n in range(N):
            for y, share in ((a[n], lam[n].item()), (b[n], 1 - lam[n].item())):
                for i in range(H):
                    for j in range(W):
                        c = int(y[i, j])
                        if c == 255:
                            continue
                        cw = 1.0 if w is None else float(w[c])
                        num += share * cw * -float(logp[n, c, i, j])
                        den += share * cw
        got = mixed_cross_entropy(logits, a, b, lam, w, 255)
        assert got.item() == pytest.approx(num / den, rel=1e-5)
    same = mixed_cross_entropy(logits, a, b, torch.ones(N), weight, 255)  # lambda = 1: the plain mean
    ref = torch.nn.functional.cross_entropy(logits, a, weight=weight, ignore_index=255)
    assert same.item() == pytest.approx(ref.item(), rel=1e-6)


def test_a_mixed_crops_padding_is_each_images_where_it_shows():
    own = torch.zeros(4, 6, dtype=torch.bool)
    own[:, 4:] = True
    partner = torch.zeros(4, 6, dtype=torch.bool)
    partner[3, :] = True
    box = Mix("cutmix", 1, None, 0.5, (16, 32, 0, 24))  # rows 2-3, columns 0-2 of a 4 x 6 map of 32 x 48
    got = mixed_padding(own, partner, box, (32, 48))
    want = own.clone()
    want[2:4, 0:3] = partner[2:4, 0:3]
    assert torch.equal(got, want)
    blend = mixed_padding(own, partner, Mix("mixup", 1, None, 0.5), (32, 48))
    assert torch.equal(blend, own & partner)


# -- function matching through a schedule -------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_schedules(tmp_path_factory):
    """A structured teacher and two schedule caches of 12 images x 2 epochs: cutmix and mixup."""
    d = tmp_path_factory.mktemp("mix")
    teacher = make_teacher(d / "t.pt", structured=True)
    stores = {}
    for kind in ("cutmix", "mixup"):
        stores[kind] = d / f"{kind}.zarr"
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(stores[kind]), dataset_options=dict(RES),
                                             limit=12, topk=11, schedule_epochs=E, samples_per_shard=4, mix=kind,
                                             mix_alpha=0.5, device="cpu", workers=0), show_progress=False)
    return teacher, stores


def _dense(item: dict, C: int = 11) -> torch.Tensor:
    out = torch.full((C, *item["kd/values"].shape[-2:]), float("nan"), dtype=torch.float64)
    out.scatter_(0, item["kd/indices"].long(), item["kd/values"].double())
    return out


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_the_cached_targets_are_the_teacher_on_the_students_mixed_crop(mixed_schedules, tmp_path, kind):
    teacher, stores = mixed_schedules
    trainer = StudentTrainer(config_from_store(str(stores[kind]), methods=[{"name": "kl"}], epochs=E, limit=12,
                                               batch_size=4, workers=0, device="cpu", mix=kind, mix_alpha=0.5,
                                               out=str(tmp_path / "r")))
    train_ds, val_ds = trainer.build_datasets()
    pipe = trainer.build_batches(train_ds, val_ds)[0].pipeline
    small = StudentTrainer(config_from_store(str(stores[kind]), methods=[{"name": "kl"}], epochs=E, limit=5,
                                             batch_size=4, workers=0, device="cpu", mix=kind, mix_alpha=0.5,
                                             out=str(tmp_path / "p")))
    part = small.build_batches(*small.build_datasets())[0].pipeline
    assert len(part) == 5 and part.mix_partners(4) == (part._partners, 4) and len(part._partners) == 12
    own = SegPipeline(train_ds, pipe.preprocess, pipe.augment, seed=0, mix=MixOptions(kind, alpha=0.5))
    plain = SegPipeline(train_ds, pipe.preprocess, pipe.augment, seed=0)
    net = open_weights(teacher).build().double().eval()
    assert f"mixed: {kind} (alpha 0.5, p 1)" in form_of(CacheStore(stores[kind]).schema).describe()  # inspect-cache's row
    for epoch in range(E):
        for p in (pipe, own, plain):
            p.set_epoch(epoch)
        items = [pipe[i] for i in range(12)]
        for i, item in enumerate(items):  # the student's own mixed crop
            assert torch.equal(item["image"], own[i]["image"]) and torch.equal(item["label"], own[i]["label"])
        # not its unmixed one (a cutmix box of lambda near 1 may be empty)
        assert sum(not torch.equal(it["image"], plain[i]["image"]) for i, it in enumerate(items)) >= 9
        part.set_epoch(epoch)  # a run on part of the cache: its items pair with the cache's images as the build did
        for i in range(len(part)):
            got = part[i]
            assert torch.equal(got["image"], items[i]["image"]) and torch.equal(got["kd/values"], items[i]["kd/values"])
        with torch.no_grad():
            logits = net(torch.stack([it["image"] for it in items]).double()).logits
        for j, it in enumerate(items):
            torch.testing.assert_close(_dense(it), logits[j], rtol=2e-3, atol=2e-2)
            assert not it["kd/ignore"].any()


def test_a_student_from_the_mixed_schedule_equals_the_live_teacher_on_the_mixed_crops(mixed_schedules, tmp_path):
    """Function matching from the cache is function matching online: the same run, to the bit."""
    _, stores = mixed_schedules
    common = ["--method", "kl", "--epochs", E, "--limit", 12, "--batch-size", 4, "--workers", 0, "--device", "cpu",
              "--quiet"]
    mixing = ["--mix", "mixup", "--mix-alpha", "0.5"]
    for name, extra in (("cached", []), ("online", ["--online-teacher", "cache"])):
        r = kd("train-student", "--cache", stores["mixup"], "--out", tmp_path / name, *common, *mixing, *extra)
        assert r.exit_code == 0, r.output
    a = read_checkpoint(tmp_path / "cached" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "online" / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a live teacher from its weights alone (no cache): the supervised crops, mixed, their padding per image
    teacher = mixed_schedules[0]
    r = kd("train-student", "--online-teacher", "demo_teacher", "--teacher-weights", teacher, "-o", "resolution=32x48",
           "--scale", "0.5,1", *common, "--mix", "cutmix", "--out", tmp_path / "live")
    assert r.exit_code == 0, r.output


def test_bad_mixing_is_one_line_each(mixed_schedules, small_store, tmp_path):
    teacher, stores = mixed_schedules
    base = ["--epochs", 1, "--limit", 12, "--batch-size", 4, "--workers", 0, "--device", "cpu", "--quiet"]
    cases = [
        (["train-student", "--cache", stores["cutmix"], *base], "mixed cutmix (alpha 0.5, p 1)",
         "--mix cutmix --mix-alpha 0.5 --mix-prob 1"),
        (["train-student", "--cache", stores["cutmix"], "--mix", "mixup", "--mix-alpha", "0.5", *base],
         "this run mixes mixup", "--mix cutmix"),
        (["train-student", "--cache", small_store[1], "--mix", "cutmix", *base], "does not hold",
         "--schedule-epochs N and the same --mix"),
        (["train-student", "--cache", stores["cutmix"], "--mix", "blend", *base], "--mix must be one of", "cutmix"),
        (["train-student", "--cache", stores["cutmix"], "--mix", "cutmix", "--mix-prob", "1.5", *base], "--mix-prob",
         "1"),
        (["train-student", "--cache", stores["cutmix"], "--unlabeled-cache", stores["mixup"], "--mix", "cutmix",
          *base], "--unlabeled-cache does not go with --mix", "drop one"),
        (["build-teacher-cache", "--weights", teacher, "--mix", "cutmix", "-o", "resolution=32x48", "--limit", 4,
          "--device", "cpu", "--quiet"], "--mix sets the crops of a schedule", "--schedule-epochs N"),
    ]
    for args, what, fix in cases:
        r = kd(*args, "--out", tmp_path / "x") if args[0] == "build-teacher-cache" else kd(*args, "--out",
                                                                                              tmp_path / "y")
        assert r.exit_code == 2, (args, r.output)
        assert what in r.output and fix in r.output and "Traceback" not in r.output, (what, r.output)
        assert len(r.output.strip().splitlines()) <= 3, r.output
    assert not (tmp_path / "x").exists()


def test_supervised_training_mixes_too(tmp_path, small_store):
    """train-teacher --mix: the CE baseline takes the same mixing (mixup's two labels; a
    classifier's λ-weighted classes)."""
    r = kd("train-teacher", "--model", "demo_student", "-o", "resolution=32x48", "-o", "size=8", "--epochs", 1,
           "--batch-size", 4, "--workers", 0, "--device", "cpu", "--mix", "mixup", "--quiet", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    assert read_checkpoint(tmp_path / "t" / "last.pt")["config"]["mix"] == "mixup"
    # the CE baseline of a study: --method none reads no targets, so any cache serves a mixing run
    r = kd("train-student", "--cache", small_store[1], "--method", "none", "--mix", "cutmix", "--limit", 16, "--epochs", 1,
           "--batch-size", 4, "--workers", 0, "--device", "cpu", "--quiet", "--out", tmp_path / "ce")
    assert r.exit_code == 0, r.output
    r = kd("train-teacher", "--model", "demo_cls_student", "--dataset", "shapes", "-o", "size=8", "-o",
           "resolution=24", "--epochs", 1, "--batch-size", 4, "--workers", 0, "--device", "cpu", "--mix", "cutmix",
           "--quiet", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    ds = build_dataset("shapes", "train", size=8, resolution=24)
    pipe = SegPipeline(ds, Preprocess(), Augment(crop=(24, 24), resized_crop=(0.25, 1.0)), mix=MixOptions("cutmix"))
    item = pipe[0]
    top, bottom, left, right = item["mix"].box
    assert item["mix/lam"].item() == pytest.approx(1 - (bottom - top) * (right - left) / 24 ** 2)
    assert int(item["mix/label"]) == ds.load(item["mix"].partner)[1] and int(item["label"]) == ds.load(0)[1]
