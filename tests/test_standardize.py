"""Logit standardisation (``standardize=true`` of ``kl``, ``dist`` and ``cwd``; Sun et al., "Logit
Standardization in Knowledge Distillation", CVPR 2024), declared once in ``LogitMethod``.

Each method's standardised loss is checked against the paper's formula written out here in float64:
Z(z) = (z − mean_c z) / (std_c z + 1e-7) per position over the classes (the standard deviation with
Bessel's correction, as the authors' code's ``torch.std``), of the student's logits and of the
teacher's, then the method's own loss at temperature T. The teacher is a dense cache (k = C: exact)
or a top-k + tail cache, whose C − k classes outside the top k are written out here as equal shares
τ − log(C − k) before the z-score. Negative controls: with ``standardize`` off each method gives the
unstandardised formula, which differs; a teacher-aware choice made on the standardised teacher
would keep other cells.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import kd

from kdcache.cli.parse import parse_method
from kdcache.core.errors import KDCacheError
from kdcache.core.topk import standardized_topk
from kdcache.methods import build_method, method_options
from kdcache.models import ModelOutput

N, C, H, W = 2, 7, 3, 4


def _case(k: int, seed: int = 0, ignored: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A batch of a k-of-C cache of random teacher logits on a 3 x 4 grid, the student's logits at
    twice that resolution, and the teacher's logits. ``ignored``: two cells of the crop's padding."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, C, H, W, generator=g) * 3
    values, ids = t.topk(k, dim=1)
    batch = {"kd/values": values, "kd/indices": ids, "kd/ignore": torch.zeros(N, H, W, dtype=torch.bool),
             "label": torch.full((N, 2 * H, 2 * W), 255)}
    if k < C:
        batch["kd/tail"] = torch.logsumexp(t.scatter(1, ids, float("-inf")), dim=1)
    if ignored:
        batch["kd/ignore"][0, 0, 0] = batch["kd/ignore"][1, 2, 3] = True
    s = torch.randn(N, C, 2 * H, 2 * W, generator=g) * 2
    return batch, s, t


# -- the paper's formula, in float64 ------------------------------------------------------------------


def _z(x: np.ndarray) -> np.ndarray:
    """Z-score over the last axis: (x − mean) / (std + 1e-7), std = sqrt(Σ (x − mean)² / (C − 1))."""
    mean = x.mean(-1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1))
    return (x - mean) / (std + 1e-7)


def _teacher(batch: dict) -> np.ndarray:
    """The teacher's C logits per cell [N, h, w, C] as the cache gives them: its top k, and every
    other class at τ − log(C − k), an equal share of the tail's mass."""
    v, ids = batch["kd/values"].double().numpy(), batch["kd/indices"].numpy()
    k = v.shape[1]
    out = np.empty((N, H, W, C))
    for n in range(N):
        for y in range(H):
            for x in range(W):
                if k < C:
                    out[n, y, x, :] = float(batch["kd/tail"][n, y, x]) - math.log(C - k)
                out[n, y, x, ids[n, :, y, x]] = v[n, :, y, x]
    return out


def _student(s: torch.Tensor) -> np.ndarray:
    """The student's logits at the cache's grid (bilinear, as every KD term takes them) [N, h, w, C]."""
    return F.interpolate(s.double(), size=(H, W), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_ref(zt, zs, batch, T, tail="bin") -> float:
    """T² · mean over the used cells of KL(teacher ‖ student): over the top k and one tail bin (the
    rest's summed probabilities), or over the top k renormalised (``tail=renormalize``)."""
    ids, keep = batch["kd/indices"].numpy(), ~batch["kd/ignore"].numpy()
    terms = []
    for n, y, x in zip(*np.nonzero(keep)):
        p, q = _softmax(zt[n, y, x] / T), _softmax(zs[n, y, x] / T)
        top = list(ids[n, :, y, x])
        rest = [c for c in range(C) if c not in top]
        if tail == "renormalize":
            pk = p[top] / p[top].sum()
            terms.append((pk * (np.log(pk) - np.log(q[top]))).sum())
            continue
        pb = np.append(p[top], p[rest].sum()) if rest else p[top]
        qb = np.append(q[top], q[rest].sum()) if rest else q[top]
        terms.append((pb * (np.log(pb) - np.log(qb))).sum())
    return T * T * float(np.mean(terms))


def _pearson(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + 1e-8))


def _dist_ref(zt, zs, batch, T) -> float:
    """DIST: T² (mean over cells of 1 − ρ over classes + mean over classes of 1 − ρ over cells),
    the used cells of the whole batch."""
    keep = ~batch["kd/ignore"].numpy()
    yt, ys = _softmax(zt[keep] / T), _softmax(zs[keep] / T)
    inter = np.mean([1 - _pearson(ys[i], yt[i]) for i in range(len(ys))])
    intra = np.mean([1 - _pearson(ys[:, c], yt[:, c]) for c in range(C)])
    return T * T * float(inter + intra)


def _cwd_ref(zt, zs, batch, T) -> float:
    """CWD: T² · mean over images and classes of KL over the used cells' softmax of each class channel."""
    keep = ~batch["kd/ignore"].numpy()
    total = 0.0
    for n in range(N):
        for c in range(C):
            pt, ps = _softmax(zt[n][keep[n]][:, c] / T), _softmax(zs[n][keep[n]][:, c] / T)
            total += (pt * (np.log(pt) - np.log(ps))).sum()
    return T * T * total / (N * C)


REFERENCES = {"kl": _kl_ref, "dist": _dist_ref, "cwd": _cwd_ref}


def _ref(name: str, batch, s, T, standardize: bool, **options) -> float:
    zt, zs = _teacher(batch), _student(s)
    if standardize:
        zt, zs = _z(zt), _z(zs)
    return REFERENCES[name](zt, zs, batch, T, **options)


@pytest.mark.parametrize("k", [C, 3], ids=["dense", "top3"])
@pytest.mark.parametrize(("name", "options"), [("kl", {}), ("kl", {"tail": "renormalize"}), ("dist", {}), ("cwd", {})],
                         ids=["kl", "kl-renormalize", "dist", "cwd"])
def test_each_method_standardised_is_the_papers_formula(name, options, k):
    batch, s, _ = _case(k, seed=k)
    T, weight = 2.0, 0.5
    got = build_method(name, weight=weight, temperature=T, standardize=True, **options)(ModelOutput(logits=s), batch)
    want = weight * _ref(name, batch, s, T, True, **options)
    assert float(got) == pytest.approx(want, rel=2e-5, abs=1e-7)
    # the negative control: off, the method is its unstandardised formula, which differs
    plain = build_method(name, weight=weight, temperature=T, **options)(ModelOutput(logits=s), batch)
    assert float(plain) == pytest.approx(weight * _ref(name, batch, s, T, False, **options), rel=2e-5, abs=1e-7)
    assert abs(float(plain) - want) > 1e-3 * max(abs(want), 1e-3)


def test_the_standardised_cache_is_the_z_score_of_its_equal_share_teacher():
    """The values and the new tail, τ' = log(C − k) + (τ − log(C − k) − μ) / (σ + ε): the z-scored
    top k at their ids, and the log-sum-exp of the z-scored equal shares of the C − k other classes."""
    batch, _, _ = _case(3)
    v, tail = standardized_topk(batch["kd/values"].half(), batch["kd/tail"], C)  # fp16 values, as cached
    batch["kd/values"] = batch["kd/values"].half().float()
    z = _z(_teacher(batch))
    ids = batch["kd/indices"].numpy()
    for n, y, x in np.ndindex(N, H, W):
        rest = [c for c in range(C) if c not in ids[n, :, y, x]]
        np.testing.assert_allclose(v[n, :, y, x].double(), z[n, y, x, ids[n, :, y, x]], rtol=1e-5, atol=1e-6)
        want = np.log(np.exp(z[n, y, x, rest]).sum())
        assert float(tail[n, y, x]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        # the closed form, with μ and σ of this cell's C logits (its equal shares included)
        share = float(batch["kd/tail"][n, y, x]) - math.log(C - 3)
        full = _teacher(batch)[n, y, x]
        mu, sd = full.mean(), full.std(ddof=1)
        assert want == pytest.approx(math.log(C - 3) + (share - mu) / (sd + 1e-7), rel=1e-9)
    # a dense cache: the z-score of its values, no tail
    dense, _, _ = _case(C)
    v, tail = standardized_topk(dense["kd/values"], None, C)
    assert tail is None
    np.testing.assert_allclose(v.double(), np.moveaxis(_z(np.moveaxis(dense["kd/values"].double().numpy(), 1, -1)), -1, 1),
                               rtol=1e-5, atol=1e-6)


def test_the_teacher_aware_cells_are_chosen_on_the_teacher_as_cached():
    """``min_confidence`` drops unlabelled cells by the teacher's top-1 probability at T = 1 as cached,
    not after the z-score (the negative control: the z-scored teacher's probability keeps other cells)."""
    batch, s, _ = _case(3, seed=4, ignored=False)
    p_raw = _softmax(_teacher(batch)).max(-1)
    p_std = _softmax(_z(_teacher(batch))).max(-1)
    threshold = float(np.median(p_std))  # keeps about half the cells by the z-scored teacher
    keep_raw, keep_std = p_raw >= threshold, p_std >= threshold
    assert (keep_raw != keep_std).any() and keep_std.any()
    got = build_method("kl", standardize=True, min_confidence=threshold)(ModelOutput(logits=s), batch)
    kept = {**batch, "kd/ignore": torch.from_numpy(~keep_raw)}
    assert float(got) == pytest.approx(_ref("kl", kept, s, 1.0, True), rel=2e-5)
    other = {**batch, "kd/ignore": torch.from_numpy(~keep_std)}
    assert abs(float(got) - _ref("kl", other, s, 1.0, True)) > 1e-4


def test_equal_student_logits_give_a_finite_gradient():
    """A cell whose student logits are all equal z-scores to zeros; the variance's floor keeps its
    gradient finite (a plain std's is 0/0 there)."""
    batch, s, _ = _case(3, ignored=False)
    s = torch.zeros_like(s).requires_grad_()
    for name in ("kl", "dist", "cwd"):
        loss = build_method(name, standardize=True)(ModelOutput(logits=s), batch)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name
        s.grad = None


def test_the_option_of_the_base_as_users_give_it(small_store, tmp_path):
    """Listed once for every logit method, read from the command line's text and a config file, off by
    default; anything but true or false is one line."""
    for name in ("kl", "dist", "cwd"):
        assert list(method_options(name))[-1] == "standardize" and method_options(name)["standardize"].default is False
        assert build_method(name).standardize is False
    assert parse_method("dist:standardize=true,temperature=2") == {"name": "dist", "standardize": True, "temperature": 2}
    assert repr(build_method("cwd", standardize=True)).endswith("class_weights=none, standardize=True)")
    with pytest.raises(KDCacheError, match="method 'kl': standardize takes true or false, got 'yes'"):
        build_method("kl", standardize="yes")
    _, store = small_store
    r = kd("train-student", "--cache", store, "--method", "cwd:standardize=1", "--epochs", "1", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "method 'cwd': standardize takes true or false, got 1" in " ".join(r.output.split())
    assert not (tmp_path / "x").exists()
    # a config file's methods, trained from the cache: the option is recorded and each term is finite
    (tmp_path / "s.yaml").write_text(f"""\
cache: {store}
methods:
  - {{name: kl, standardize: true, temperature: 2}}
  - {{name: dist, standardize: true}}
  - "cwd:standardize=true"
limit: 8
batch_size: 4
epochs: 1
workers: 0
device: cpu
quiet: true
out: {tmp_path / "s"}
""")
    r = kd("train-student", "--config", tmp_path / "s.yaml")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert [m.get("standardize") for m in cfg["methods"]] == [True, True, True]
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert all(math.isfinite(rec[f"train_{m}"]) for m in ("kl", "dist", "cwd")), rec
