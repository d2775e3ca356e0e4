"""How much of the teacher a top-k cache keeps: KL to the dense teacher and KD-gradient cosine.

    python benchmarks/cache_fidelity.py --teacher runs/teacher --student runs/student

Needs a trained teacher and student (`kdcache train-teacher --out runs/teacher` and
`kdcache train-teacher --model demo_student --out runs/student`, the built-in pair on the
synthetic data). On the validation split, for k in {1, 2, 4, 8} and T in {1, 2, 4}, the dense
teacher logits are encoded exactly as build-teacher-cache stores them (fp16 top-k values, ids,
fp16 tail) and compared with the dense teacher:

* KL(p_dense,T || p_cache,T): the dense teacher against the distribution the cache implies under
  the default ``bin`` tail policy (tail classes share the tail bin equally), nats per pixel;
* the cosine between the KD gradient w.r.t. the student logits computed from the dense teacher
  and from the cache (``bin``, and ``renormalize`` for comparison), per pixel: mean and 5th
  percentile, using the trained student's own logits;
* for `dist` (T = 1), per batch of 8 images: the loss and its gradient from the cache's rebuilt
  teacher against the dense teacher's.

Writes benchmarks/results/cache-fidelity.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.core.topk import implied_log_probs, topk_targets
from kdcache.data import build_dataset
from kdcache.kernels.reference import topk_kl_reference
from kdcache.methods.cwd import dense_teacher_logits
from kdcache.methods.dist import dist_loss
from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import Preprocess


def load(run: str, num_classes: int):
    return open_weights(run).build(num_classes=num_classes)


def kd_grad(student: torch.Tensor, values, indices, tail, T: float, policy: str) -> torch.Tensor:
    s = student.detach().clone().requires_grad_(True)
    topk_kl_reference(s, values, indices, tail, temperature=T, reduction="sum", tail=policy).backward()
    return s.grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a, b, dim=1, eps=1e-30).flatten().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--student", default="runs/student")
    ap.add_argument("--split", default="val")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    ds = build_dataset("synthetic", args.split)
    C = ds.num_classes
    teacher, student = load(args.teacher, C), load(args.student, C)
    pre = Preprocess()
    x = torch.stack([pre.image_to_tensor(ds.load(i)[0]) for i in range(len(ds))])
    with torch.no_grad():
        t_logits = torch.cat([teacher(b).logits for b in x.split(16)]).double()
        s_logits = torch.cat([student(b).logits for b in x.split(16)]).double()
    if s_logits.shape[-2:] != t_logits.shape[-2:]:
        s_logits = F.interpolate(s_logits, size=t_logits.shape[-2:], mode="bilinear", align_corners=False)

    rows = []
    for k in (1, 2, 4, 8):
        v, i, tail = topk_targets(t_logits.float(), k)
        v, tail = v.half().double(), tail.half().double()  # as stored
        for T in (1.0, 2.0, 4.0):
            log_p = torch.log_softmax(t_logits / T, dim=1)
            log_c = implied_log_probs(v, i, tail, C, T, "bin")
            kl = (log_p.exp() * (log_p - log_c)).sum(1).flatten().numpy()
            dense_idx = t_logits.topk(C, dim=1).indices
            g_dense = kd_grad(s_logits, t_logits.gather(1, dense_idx), dense_idx, None, T, "bin")
            cos_bin = cosine(kd_grad(s_logits, v, i, tail, T, "bin"), g_dense)
            cos_ren = cosine(kd_grad(s_logits, v, i, tail, T, "renormalize"), g_dense)
            total = log_c.exp().sum(1)  # the implied distribution is a distribution
            assert torch.allclose(total, torch.ones_like(total), atol=1e-9)
            rows.append((k, T, kl.mean(), np.percentile(kl, 95), cos_bin.mean(), np.percentile(cos_bin, 5),
                         cos_ren.mean(), np.percentile(cos_ren, 5)))
            print(f"k={k} T={T:g}: KL {kl.mean():.2e} (p95 {np.percentile(kl, 95):.2e})  cos bin {cos_bin.mean():.4f} "
                  f"(p5 {np.percentile(cos_bin, 5):.4f})  cos renormalize {cos_ren.mean():.4f}", flush=True)

    # DIST (intra-class relations span a batch): per batch of 8 images, the loss and its gradient
    # w.r.t. the student logits from the cache against the same from the dense teacher
    dist_rows = []
    for k in (1, 2, 4, 8):
        v, i, tail = topk_targets(t_logits.float(), k)
        rebuilt = dense_teacher_logits(v.half().double(), i, tail.half().double(), C).double()
        rel, cos = [], []
        for sb, tb, cb in zip(s_logits.split(8), t_logits.split(8), rebuilt.split(8)):
            rows_of = lambda z: z.permute(0, 2, 3, 1).reshape(-1, C)  # noqa: E731
            s_req = rows_of(sb).clone().requires_grad_(True)
            dense_loss = dist_loss(s_req, rows_of(tb))
            (g_dense,) = torch.autograd.grad(dense_loss, s_req)
            s_req2 = rows_of(sb).clone().requires_grad_(True)
            cache_loss = dist_loss(s_req2, rows_of(cb))
            (g_cache,) = torch.autograd.grad(cache_loss, s_req2)
            rel.append(abs(cache_loss.item() - dense_loss.item()) / dense_loss.item())
            cos.append(F.cosine_similarity(g_cache.flatten(), g_dense.flatten(), dim=0).item())
        dist_rows.append((k, np.mean(rel), np.mean(cos), np.min(cos)))
        print(f"DIST k={k}: loss rel. diff {np.mean(rel):.2e}, grad cosine {np.mean(cos):.4f} (min {np.min(cos):.4f})",
              flush=True)

    header = ("| k | T | KL(dense ‖ cache) mean, nats/pixel | KL p95 | grad cosine `bin` mean | `bin` p5 | "
              "grad cosine `renormalize` mean | `renormalize` p5 |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {k} | {T:g} | {a:.2e} | {b:.2e} | {c:.4f} | {d:.4f} | {e:.4f} | {f:.4f} |\n"
                   for k, T, a, b, c, d, e, f in rows)
    text = (
        "# Top-k cache fidelity (built-in teacher/student, synthetic data)\n\n"
        f"Teacher `{args.teacher}`, student `{args.student}` (both trained with `train-teacher` defaults), "
        f"the {len(ds)} images of the synthetic `{args.split}` split, {C} classes, maps "
        f"{t_logits.shape[-2]}x{t_logits.shape[-1]} at stride 4 ({t_logits[0, 0].numel() * len(ds)} pixels). "
        "Values and tail are rounded to fp16 as the store holds them. KL is between the dense "
        "teacher and the distribution the cache implies under the `bin` tail policy; the cosines "
        "compare d(T²·KL)/d(student logits) from the cache with the same gradient from the dense "
        "teacher, per pixel. Made by `python benchmarks/cache_fidelity.py`; float64 throughout, so "
        "the numbers do not depend on the machine.\n\n" + header + body
        + "\n## DIST from the cache\n\nThe `dist` method (T = 1, β = γ = 1) on batches of 8 images: the teacher's "
        "logits rebuilt from the cache (top k exact, the classes outside sharing the tail's mass equally) against "
        "the dense teacher; the relative difference of the loss and the cosine between the two gradients w.r.t. "
        "the student's logits (whole batch), mean and minimum over the batches.\n\n"
        "| k | loss rel. difference | grad cosine mean | grad cosine min |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {a:.2e} | {b:.4f} | {c:.4f} |\n" for k, a, b, c in dist_rows)
    )
    out = Path(args.results) / "cache-fidelity.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
