"""Ensembles and test-time augmentation in one cache pass: the stored targets against the
formula in float64 (members run by hand, resized, combined), the recorded quality against
kdcache's confusion matrix, provenance and resume, the stale check over every member, the
online teacher's parity, bad input, and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd
from fake_data import make_teacher

from kdcache.core.errors import KDCacheError
from kdcache.core.metrics import ConfusionMatrix
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import Preprocess, collate
from kdcache.store import CacheStore, to_tensors
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import StudentTrainer, config_from_store

RES = {"resolution": [32, 48]}
N = 6
OTHER_NORM = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three teachers: demo_teacher (stride 4), demo_student (stride 4, other seed) and a
    stride-8 net trained with another normalisation; each with logits of a few units that vary
    over the image as a trained teacher's do (``structured``), so that a mirrored, rescaled or
    differently resized map differs from the right one by far more than the tolerance."""
    d = tmp_path_factory.mktemp("members")
    return {"a": make_teacher(d / "a.pt", seed=0, structured=True),
            "b": make_teacher(d / "b.pt", seed=1, name="demo_student", structured=True),
            "c": make_teacher(d / "c.pt", seed=2, name="fake_data:stride8_net", preprocess=OTHER_NORM,
                              structured=True)}


def config(weights, out, **kw) -> CacheBuildConfig:
    base = dict(weights=[str(w) for w in weights], out=str(out), dataset_options=dict(RES), limit=N, topk=11,
                samples_per_shard=4, batch_size=4, device="cpu", workers=0)
    base.update(kw)
    return CacheBuildConfig(**base)


def run_member(path, x01: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict]:
    """A member on [0, 1] images, normalised with its own preprocessing, in float64."""
    w = open_weights(path)
    model = w.build(num_classes=11, taps=taps).double()
    pre = w.preprocess
    x = (x01 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x.double())
    return out.logits, out.features


def images01(n: int = N) -> torch.Tensor:
    ds = limit(build_dataset("synthetic", "train", **RES), n)
    return torch.stack([torch.from_numpy(ds.load(i)[0]).permute(2, 0, 1).double() / 255 for i in range(n)])


def dense(store: CacheStore, row: int) -> np.ndarray:
    """The stored logits of a dense (k = C) cache as a [C, h, w] map."""
    item = store.read(row)
    out = np.zeros(item["logits/values"].shape, dtype=np.float64)
    np.put_along_axis(out, item["logits/indices"].astype(np.int64), item["logits/values"].astype(np.float64), axis=0)
    return out


def up(z: torch.Tensor, size, mode: str = "bilinear", align_corners: bool = False) -> torch.Tensor:
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    return F.interpolate(z, size=size, mode=mode, align_corners=align_corners)


ATOL, RTOL = 4e-3, 2e-3  # fp16 storage of logits of a few units


def assert_stored(store: CacheStore, want: np.ndarray, wrong: dict[str, np.ndarray]) -> None:
    """The dense cache equals ``want`` within the tolerance, and each of the ``wrong`` answers
    (the negative controls: what a bug would have stored) breaks that tolerance by 3x or more
    somewhere, so the check can catch each bug."""
    got = np.stack([dense(store, i) for i in range(len(want))])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    allowed = ATOL + RTOL * np.abs(want)
    for name, bad in wrong.items():
        excess = float((np.abs(bad - want) / allowed).max())
        assert excess > 3, f"{name} is within {excess:.1f}x the tolerance of the right maps: the check cannot catch it"


def combine(outputs: list[torch.Tensor], rule: str, T: float) -> torch.Tensor:
    if rule == "logit":
        return sum(outputs) / len(outputs)
    p = sum(torch.softmax(z / T, 1) for z in outputs) / len(outputs)
    return T * p.log()


# -- the stored targets are the formula -------------------------------------------------------------


@pytest.mark.parametrize("rule,T", [("prob", 1.0), ("prob", 2.0), ("logit", 1.0)])
def test_ensemble_of_three_architectures_is_the_combination_on_the_finest_grid(tmp_path, members, rule, T):
    """Stride-4 and stride-8 members with different normalisations: each member's logits resized
    bilinearly to the finest grid (stride 4), combined by the rule, equal the dense cache."""
    out = tmp_path / "e.zarr"
    build_teacher_cache(config(members.values(), out, combine=rule, combine_temperature=T), show_progress=False)
    store = CacheStore(out)
    assert store.schema.map_size == (8, 12) and store.meta["stride"] == [4.0, 4.0]
    x = images01()
    raw = [run_member(p, x)[0] for p in members.values()]
    zs = [up(z, (8, 12)) for z in raw]
    assert raw[2].shape[-2:] == (4, 6) and zs[2].shape[-2:] == (8, 12)  # the stride-8 member was resized
    want = combine(zs, rule, T).numpy()
    wrong = {f"the stride-8 member resized {how}": combine(zs[:2] + [up(raw[2], (8, 12), *args)], rule, T).numpy()
             for how, args in (("with align_corners=True", ("bilinear", True)), ("bicubically", ("bicubic",)))}
    wrong["the mean of the other rule"] = combine(zs, "logit" if rule == "prob" else "prob", T).numpy()
    assert_stored(store, want, wrong)


def test_the_tail_is_exact_for_the_combined_distribution(tmp_path, members):
    """k = 3 of 11, mean of probabilities at T = 1: the top 3 are the combination's and the tail
    holds exactly the rest of its probability mass."""
    out = tmp_path / "k3.zarr"
    build_teacher_cache(config(members.values(), out, topk=3, combine="prob"), show_progress=False)
    store = CacheStore(out)
    x = images01(2)
    p = sum(torch.softmax(up(run_member(m, x)[0], (8, 12)), 1) for m in members.values()) / 3
    for i in range(2):
        item = store.read(i)
        top = p[i].topk(3, 0)
        np.testing.assert_array_equal(item["logits/indices"], top.indices.numpy())
        np.testing.assert_allclose(np.exp(item["logits/values"].astype(np.float64)), top.values.numpy(), rtol=3e-3)
        rest = 1 - top.values.sum(0)
        np.testing.assert_allclose(np.exp(item["logits/tail"].astype(np.float64)), rest.numpy(), rtol=3e-3, atol=1e-6)


def test_multi_scale_flip_tta_is_each_scale_resized_back_and_averaged(tmp_path, members):
    """One teacher at scales 0.5, 1, 1.5 with flips (6 outputs): each input resized bilinearly,
    each output mirrored back and resized to the scale-1 map, then the mean of the logits."""
    out = tmp_path / "tta.zarr"
    build_teacher_cache(config([members["a"]], out, tta_scales=(0.5, 1.0, 1.5), flip_average=True, combine="logit"),
                        show_progress=False)
    store = CacheStore(out)
    x = images01()
    plain, mirrored = {}, {}  # by scale: the output on the image, and on its mirror (not yet flipped back)
    for sc in (0.5, 1.0, 1.5):
        xs = up(x, (round(32 * sc), round(48 * sc)))
        plain[sc] = up(run_member(members["a"], xs)[0], (8, 12))
        mirrored[sc] = up(run_member(members["a"], xs.flip(-1))[0], (8, 12))
    want = combine([z for sc in plain for z in (plain[sc], mirrored[sc].flip(-1))], "logit", 1.0).numpy()
    wrong = {  # the bugs a TTA can have, each of which this check must catch
        "mirrored outputs not flipped back": combine([z for sc in plain for z in (plain[sc], mirrored[sc])], "logit",
                                                     1.0).numpy(),
        "the scales ignored (scale 1 only)": combine([plain[1.0], mirrored[1.0].flip(-1)], "logit", 1.0).numpy(),
        "the flips ignored": combine(list(plain.values()), "logit", 1.0).numpy(),
    }
    assert_stored(store, want, wrong)
    e = store.meta["ensemble"]
    assert e["scales"] == [0.5, 1.0, 1.5] and e["flip"] and e["combine"] == "logit" and len(e["members"]) == 1


def test_a_chosen_grid_stride_and_features_from_a_named_member(tmp_path, members):
    """--grid-stride 8: every member resized to ceil(hw/8); the features are member b's alone
    (flip-averaged at scale 1), at b's own stride."""
    out = tmp_path / "g.zarr"
    build_teacher_cache(config([members["a"], members["b"]], out, grid_stride=8, combine="logit", flip_average=True,
                               features=("stage3",), features_from="b"), show_progress=False)
    store = CacheStore(out)
    assert store.schema.map_size == (4, 6)
    x = images01()
    outs, feats = [], None
    for m in ("a", "b"):
        z, f = run_member(members[m], x, taps=("stage3",))
        z2, f2 = run_member(members[m], x.flip(-1), taps=("stage3",))
        outs += [up(z, (4, 6)), up(z2.flip(-1), (4, 6))]
        if m == "b":
            feats = (f["stage3"] + f2["stage3"].flip(-1)) / 2
    want = combine(outs, "logit", 1.0).numpy()
    for i in range(N):
        np.testing.assert_allclose(dense(store, i), want[i], rtol=2e-3, atol=4e-3)
        np.testing.assert_allclose(store.read(i)["features/stage3"].astype(np.float64), feats[i].numpy(),
                                   rtol=3e-3, atol=3e-3)
    assert store.meta["ensemble"]["features_from"] == "b"
    assert store.meta["teacher"]["model"] == "demo_student"  # the features' teacher


# -- quality, provenance, bytes ---------------------------------------------------------------------


def test_quality_rows_equal_kdcache_confusion_matrix(tmp_path, members):
    """Each member without TTA, each member with TTA and the combination: mIoU, NLL and agreement
    as recorded equal the same numbers computed here from the members run by hand."""
    out = tmp_path / "q.zarr"
    build_teacher_cache(config([members["a"], members["c"]], out, tta_scales=(1.0, 0.75), combine="prob"),
                        show_progress=False)
    store = CacheStore(out)
    q = store.quality()
    assert list(q["rows"]) == ["a, no TTA", "c, no TTA", "a", "c", "combined"]
    ds = limit(build_dataset("synthetic", "train", **RES), N)
    labels = torch.stack([torch.from_numpy(ds.load(i)[1]).long() for i in range(N)])
    x = images01()
    plain, tta = {}, {}
    for m in ("a", "c"):
        plain[m] = up(run_member(members[m], x)[0], (8, 12))
        small = up(run_member(members[m], up(x, (24, 36)))[0], (8, 12))
        tta[m] = combine([plain[m], small], "prob", 1.0)
    combined = combine([plain["a"], up(run_member(members["a"], up(x, (24, 36)))[0], (8, 12)),
                        plain["c"], up(run_member(members["c"], up(x, (24, 36)))[0], (8, 12))], "prob", 1.0)
    rows = {"a, no TTA": plain["a"], "c, no TTA": plain["c"], "a": tta["a"], "c": tta["c"], "combined": combined}
    for name, z in rows.items():
        full = up(z, (32, 48))
        cm = ConfusionMatrix(11)
        cm.update(full.argmax(1), labels)
        nll = F.cross_entropy(full, labels, ignore_index=255, reduction="mean").item()
        agree = (z.argmax(1) == combined.argmax(1)).double().mean().item()
        got = q["rows"][name]
        assert got["miou"] == pytest.approx(cm.compute()["miou"], abs=2e-3), name
        assert got["nll"] == pytest.approx(nll, rel=2e-3), name
        assert got["agreement"] == pytest.approx(agree, abs=0.03), name
    assert q["rows"]["combined"]["agreement"] == 1.0 and q["labelled_pixels"] == int((labels != 255).sum())


def test_a_plain_cache_records_the_teachers_own_miou_as_evaluate_measures_it(tmp_path, members):
    out = tmp_path / "p.zarr"
    build_teacher_cache(config([members["a"]], out, topk=4), show_progress=False)
    q = CacheStore(out).quality()
    assert list(q["rows"]) == ["combined"] and CacheStore(out).meta["ensemble"] is None
    ds = limit(build_dataset("synthetic", "train", **RES), N)
    model = open_weights(members["a"]).build(num_classes=11)
    cm = ConfusionMatrix(11)
    for start in range(0, N, 4):  # in the build's batches of 4
        items = [ds.load(i) for i in range(start, min(start + 4, N))]
        x = torch.cat([Preprocess().image_to_tensor(image)[None] for image, _ in items])
        with torch.no_grad():
            pred = model.predict(x, size=items[0][1].shape)
        cm.update(pred, torch.stack([torch.from_numpy(mask).long() for _, mask in items]))
    # The stored counts behind IoU (intersection, prediction, label per class) against the matrix's.
    # Float32 convolutions may flip the argmax of a near-tie pixel between two runs of the same
    # batch (a CI run once differed by one pixel of 9,216), so a couple of pixels may move; a wrong
    # resize, mirror or label alignment moves hundreds.
    m = cm.matrix.numpy()
    ref = np.stack([np.diag(m), m.sum(0), m.sum(1)])
    got = np.asarray(CacheStore(out).array("quality/counts")[:]).astype(np.int64).sum(0)[0]
    assert got[2].tolist() == ref[2].tolist()  # the labels themselves: exact
    assert np.abs(got - ref).sum() <= 6, (got - ref).tolist()
    assert q["rows"]["combined"]["miou"] == pytest.approx(cm.compute()["miou"], abs=2e-3)


def test_unlabelled_images_record_agreement_only(tmp_path, members):
    out = tmp_path / "u.zarr"
    build_teacher_cache(config([members["a"], members["b"]], out, split="unlabeled", topk=4), show_progress=False)
    q = CacheStore(out).quality()
    assert q["labelled_pixels"] == 0 and q["rows"]["combined"]["miou"] is None
    assert 0 <= q["rows"]["a"]["agreement"] <= 1 and q["rows"]["combined"]["agreement"] == 1


def test_provenance_identity_and_bytes(tmp_path, members):
    """Every member is recorded (architecture, weights hash, normalisation) with the rule; the
    arrays are those of a single teacher's cache of the same k."""
    single, ens = tmp_path / "s.zarr", tmp_path / "e.zarr"
    build_teacher_cache(config([members["a"]], single, topk=4), show_progress=False)
    build_teacher_cache(config(members.values(), ens, topk=4, combine="prob", combine_temperature=2.0),
                        show_progress=False)
    a, e = CacheStore(single), CacheStore(ens)
    m = e.meta["ensemble"]
    assert [x["name"] for x in m["members"]] == ["a", "b", "c"]
    assert [x["model"] for x in m["members"]] == ["demo_teacher", "demo_student", "fake_data:stride8_net"]
    assert [x["weights_sha256"] for x in m["members"]] == [open_weights(p).sha256() for p in members.values()]
    assert m["members"][2]["mean"] == [0.5, 0.5, 0.5] and m["combine"] == "prob" and m["temperature"] == 2.0
    assert [(s.path, s.shape, s.dtype) for s in a.schema.map_specs] == [(s.path, s.shape, s.dtype)
                                                                        for s in e.schema.map_specs]


def test_cli_ensemble_inspect_resume_and_refusals(tmp_path, members):
    out = tmp_path / "cli.zarr"
    common = ["--out", out, "--dataset", "synthetic", "--resolution", "32x48", "--limit", N, "--topk", 4,
              "--samples-per-shard", 4, "--device", "cpu", "--workers", 0, "--quiet"]
    ab = ["--weights", members["a"], "--weights", members["b"]]
    r = kd("build-teacher-cache", *ab, "--tta-scales", "0.75,1", "--flip-average", *common)
    assert r.exit_code == 0, r.output
    r = kd("inspect-cache", out, "--json", tmp_path / "i.json")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "member 1" in text and "member 2" in text and "mean of logits; scales 0.75,1 + flips" in text
    assert "teacher quality" in text and "a, no TTA" in text and "agrees with combined" in text
    report = json.loads((tmp_path / "i.json").read_text())
    assert set(report["teacher_quality"]["rows"]) == {"a, no TTA", "b, no TTA", "a", "b", "combined"}
    # the same command resumes; another member set or rule is refused and nothing is deleted
    r = kd("build-teacher-cache", *ab, "--tta-scales", "0.75,1", "--flip-average", *common)
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    before = sorted(p.name for p in out.rglob("*"))
    r = kd("build-teacher-cache", "--weights", members["a"], "--weights", members["c"], "--tta-scales", "0.75,1",
           "--flip-average", *common)
    assert r.exit_code == 2 and "cannot be resumed" in r.output and "ensemble.members" in r.output, r.output
    r = kd("build-teacher-cache", *ab, "--tta-scales", "0.75,1", "--flip-average", "--combine", "prob", *common)
    assert r.exit_code == 2 and "ensemble.combine: store has logit, this build wants prob" in r.output, r.output
    assert sorted(p.name for p in out.rglob("*")) == before


def own_members_cache(tmp_path):
    """(member b's file, a top-4 cache of members a and b) with files of this test's own, to change."""
    d = tmp_path / "m"
    d.mkdir()
    a, b = make_teacher(d / "a.pt", seed=0), make_teacher(d / "b.pt", seed=1)
    out = tmp_path / "s.zarr"
    build_teacher_cache(config([a, b], out, topk=4), show_progress=False)
    return b, out


def test_a_changed_member_makes_the_cache_stale(tmp_path):
    b, out = own_members_cache(tmp_path)
    make_teacher(b, seed=5)  # member b retrained in place
    r = kd("train-student", "--cache", out, "--out", tmp_path / "run", "--epochs", 1, "--device", "cpu",
           "--workers", 0, "--quiet")
    assert r.exit_code == 2 and "is stale: member b" in r.output and "build-teacher-cache --overwrite" in r.output


# -- the online teacher runs the same ensemble --------------------------------------------------------


def test_online_teacher_runs_the_cached_ensemble_and_tta(tmp_path, members):
    """--online-teacher cache: the ensemble with its TTA run live gives the cached targets (fp16
    rounding) and the same KL loss on the same batch (no augmentation)."""
    out = tmp_path / "o.zarr"
    build_teacher_cache(config(members.values(), out, topk=4, tta_scales=(0.75, 1.0), flip_average=True,
                               features=("stage3",), features_from="b"), show_progress=False)
    common = dict(scale=(1.0, 1.0), hflip=False, crop=(32, 48), device="cpu", workers=0, batch_size=4, epochs=1, limit=N,
                  methods=[{"name": "kl"}, {"name": "fitnet", "student_tap": "stage3", "teacher_tap": "stage3"}])
    cached = StudentTrainer(config_from_store(str(out), out=str(tmp_path / "c"), **common))
    online = StudentTrainer(config_from_store(str(out), out=str(tmp_path / "o"), online_teacher="cache", **common))
    pipe = cached.build_batches(*cached.build_datasets())[0].pipeline
    torch.manual_seed(0)
    student = cached.build_model(11)
    online.build_model(11)
    online.methods[1].load_state_dict(cached.methods[1].state_dict())  # the same FitNet adapter
    assert len(online.teacher.ensemble.members) == 3 and online.teacher.ensemble.features_member.name == "b"
    cached.class_weight = online.class_weight = None
    batch = collate([pipe[j] for j in range(4)])
    targets = online.teacher.targets(batch)
    np.testing.assert_allclose(targets["kd/values"].numpy(), batch["kd/values"].float().numpy(), atol=2e-2, rtol=2e-3)
    assert (targets["kd/indices"] == batch["kd/indices"].long()).float().mean() > 0.99
    np.testing.assert_allclose(targets["kd/features/stage3"].numpy(), batch["kd/features/stage3"].float().numpy(),
                               atol=1e-2, rtol=2e-3)
    _, terms_c = cached.compute_loss(student, batch)
    _, terms_o = online.compute_loss(student, {k: v for k, v in batch.items() if not k.startswith("kd/")})
    assert math.isclose(terms_c["kl"].item(), terms_o["kl"].item(), rel_tol=1e-3)
    assert math.isclose(terms_c["fitnet"].item(), terms_o["fitnet"].item(), rel_tol=1e-3)
    assert to_tensors(CacheStore(out).read(0))["logits/values"].dtype == torch.float16


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_ensembles_are_refused_in_one_line(tmp_path, members):
    d = tmp_path / "bad"
    d.mkdir()
    five = make_teacher(d / "five.pt", num_classes=5)
    resized = make_teacher(d / "resized.pt", preprocess=Preprocess(resize=(32, 48)))
    common = ["--out", tmp_path / "x.zarr", "--dataset", "synthetic", "--resolution", "32x48", "--limit", 2,
              "--device", "cpu", "--workers", 0, "--quiet"]
    cases = [
        (["--weights", members["a"], "--weights", five], "member five"),
        (["--weights", members["a"], "--weights", resized], "ensemble members must see the same input size"),
        (["--weights", members["a"], "--tta-scales", "0.5,0"], "--tta-scales must be a finite number in [0.05, 20], got 0"),
        (["--weights", members["a"], "--tta-scales", ""], "--tta-scales needs at least one scale, e.g. 0.75,1,1.25"),
        (["--weights", members["a"], "--tta-scales", "1,1"], "--tta-scales lists a scale twice"),
        (["--weights", members["a"], "--weights", members["a"]], "is the same file as --weights"),
        (["--weights", members["a"], "--weights", members["b"], "--features", "stage3", "--features-from", "z"],
         "--features-from z names no member; the members are a, b"),
        (["--weights", members["a"], "--weights", members["b"], "--teacher", "demo_teacher", "--teacher",
          "demo_student", "--teacher", "demo_student"], "give --teacher once (for every member) or once per --weights"),
        (["--weights", members["a"], "--combine", "median"], "--combine must be one of prob, logit"),
        (["--weights", members["a"], "--combine-temperature", "0"], "--combine-temperature must be a finite number in [0.01, 100]"),
        (["--weights", members["a"], "--weights", members["b"], "--grid-stride", "1e-300"],
         "--grid-stride must be a finite number in [1, 1024], got 1e-300"),
        (["--weights", members["a"], "--weights", members["b"], "--grid-stride", "-4"],
         "--grid-stride must be a finite number in [1, 1024], got -4"),
    ]
    for args, message in cases:
        r = kd("build-teacher-cache", *args, *common)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert not (tmp_path / "x.zarr").exists()


def test_members_with_other_class_names_are_refused(tmp_path, members):
    from kdcache.core.checkpoint import save_checkpoint
    from kdcache.models import build_model

    names = [f"thing{i}" for i in range(11)]
    other = save_checkpoint(tmp_path / "named.pt", build_model("demo_teacher", 11),
                            config={"model": "demo_teacher", "num_classes": 11, "class_names": names,
                                    "preprocess": Preprocess().to_dict()})
    with pytest.raises(KDCacheError) as e:
        build_teacher_cache(config([members["a"], other], tmp_path / "n.zarr"), show_progress=False)
    assert "has other class names (thing0" in str(e.value)
    assert "every member must use the same classes in the same order" in str(e.value)


def test_online_teacher_needs_every_members_file(tmp_path):
    b, out = own_members_cache(tmp_path)
    b.unlink()
    trainer = StudentTrainer(config_from_store(str(out), out=str(tmp_path / "o"), online_teacher="cache", limit=N,
                                               device="cpu", workers=0))
    with pytest.raises(KDCacheError) as e:
        trainer.build_model(11)
    assert f"weights {b} are gone; the online teacher needs every member's file" in str(e.value)


def test_an_ensemble_from_a_config_file(tmp_path, members):
    """weights and tta_scales as YAML lists (or the command line's texts)."""
    (tmp_path / "ens.yaml").write_text(f"""\
weights: [{members['a']}, {members['c']}]
tta_scales: [0.75, 1]
combine: logit
grid_stride: 8
dataset_options: {{resolution: [32, 48]}}
limit: 2
device: cpu
workers: 0
quiet: true
""")
    r = kd("build-teacher-cache", "--config", tmp_path / "ens.yaml", "--out", tmp_path / "y.zarr")
    assert r.exit_code == 0, r.output
    store = CacheStore(tmp_path / "y.zarr")
    e = store.meta["ensemble"]
    assert [m["name"] for m in e["members"]] == ["a", "c"] and e["scales"] == [0.75, 1.0]
    assert e["combine"] == "logit" and e["grid_stride"] == 8 and store.schema.map_size == (4, 6)


def test_stored_views_hold_the_ensemble_on_each_crop(tmp_path, members):
    """--views with an ensemble: each stored view is the combination of the members run on that
    crop (the crop's geometry as stored)."""
    from kdcache.pipeline.transforms import Geometry, apply_geometry

    out = tmp_path / "v.zarr"
    build_teacher_cache(config([members["a"], members["c"]], out, limit=2, views=2, view_crop=(16, 24),
                               view_scale=(0.5, 1.5), combine="logit"), show_progress=False)
    store = CacheStore(out)
    x = images01(2)
    for i in range(2):
        item = store.read(i)
        for v in range(2):
            g = Geometry.unpack((32, 48), item["views/params"][v])
            crop = apply_geometry(x[i].float(), g, kind="image")[None].double()
            want = combine([up(run_member(members[m], crop)[0], (4, 6)) for m in ("a", "c")], "logit", 1.0)[0]
            got = np.zeros((11, 4, 6))
            np.put_along_axis(got, item["views/logits/indices"][v].astype(np.int64),
                              item["views/logits/values"][v].astype(np.float64), axis=0)
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-3, atol=4e-3)


def test_images_of_different_sizes_need_no_probe_forward(tmp_path, monkeypatch):
    """VOC images of seven sizes, a stride-4 and a stride-8 member: each sample's grid is the
    stride-4 member's own map of that image (its extent recorded), found from the scale-1
    forwards themselves, with no extra probe forward per image size."""
    from fake_data import make_voc_sizes

    from kdcache.teacher.ensemble import TeacherEnsemble

    root = make_voc_sizes(tmp_path / "voc")
    a = make_teacher(tmp_path / "a.pt", num_classes=21)
    c = make_teacher(tmp_path / "c.pt", num_classes=21, name="fake_data:stride8_net", seed=2)
    probed = []
    real = TeacherEnsemble._native_size
    monkeypatch.setattr(TeacherEnsemble, "_native_size", lambda self, j, hw, d: probed.append(hw) or real(self, j, hw, d))
    out = tmp_path / "voc.zarr"
    build_teacher_cache(CacheBuildConfig(weights=[str(a), str(c)], out=str(out), dataset="voc", data_root=str(root),
                                         topk=4, tta_scales=(1.0, 0.5), device="cpu", workers=0), show_progress=False)
    assert probed == []
    store = CacheStore(out)
    ds = build_dataset("voc", "train", root)
    for i in range(len(ds)):
        h, w = ds.load(i)[0].shape[:2]
        assert store.read(i)["logits/values"].shape[-2:] == (math.ceil(h / 4), math.ceil(w / 4))
