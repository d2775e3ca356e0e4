"""Class ids above 2,048 stay exact (FKD stores them as fp16, which cannot tell 2049 from 2048):
a store of C = 10,000 classes and k = 5, written by the store's own writer and read back, holds
every id the teacher's top 5 had, as [N, C] rows are stored (1 x 1 maps). Past 65,535 classes the
ids are uint32: a store of C = 70,000 round-trips ids that uint16 (and int16) would wrap, and the
kernel's rows path computes the loss from them as the float64 reference does."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.store import CacheSchema, CacheStore
from kdcache.store.writer import ShardWriter, encode_batch, open_for_writing, prepare_store


def rows_store(out, C: int, k: int, n: int, low: int, seed: int = 0):
    """A store of ``n`` rows of C classes whose top k ids are odd ids of ``low`` or more, written by the
    store's own writer; returns (the teacher's logits [n, C, 1, 1], its top-k ids [n, k])."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, 1, 1, generator=gen) * 3
    ids = torch.stack([torch.randperm(C - low, generator=gen)[:k] + low for _ in range(n)]) | 1
    for r in range(n):
        logits[r, ids[r], 0, 0] = 20.0 + torch.arange(k, 0, -1).float()  # distinct, descending
    sample_ids = [f"s{i:03d}" for i in range(n)]
    hashes = ["00" * 32] * n
    schema = CacheSchema.new(class_names=[f"c{i}" for i in range(C)], k=k, input_size=(1, 1), map_size=(1, 1),
                             ids=sample_ids, hashes=hashes, samples_per_shard=16)
    prepare_store(out, schema, sample_ids, hashes, overwrite=False)
    group, schema = open_for_writing(out, schema)
    writer = ShardWriter(group, schema, out, 16)
    for r, sample in enumerate(encode_batch(schema, logits, {}, sample_ids, (1, 1))):
        writer.put(r, sample)
    writer.close()
    return logits, ids


def test_ten_thousand_classes_round_trip_every_id(tmp_path):
    C, k, n = 10_000, 5, 64
    # the top 5 of every row: ids that fp16 cannot hold exactly (odd ids above 2048)
    out = tmp_path / "rows.zarr"
    logits, ids = rows_store(out, C, k, n, low=2049)
    store = CacheStore(out)
    assert store.meta["dtypes"]["indices"] == "uint16" and store.done().all()
    got = np.stack([store.read(r)["logits/indices"][:, 0, 0] for r in range(n)])
    np.testing.assert_array_equal(got, ids.numpy())  # every id, in the teacher's order
    assert (got > 2048).all() and (got % 2 == 1).all()
    assert not np.array_equal(got, got.astype(np.float16).astype(np.int64))  # what fp16 would have lost
    tail = np.stack([store.read(r)["logits/tail"][0, 0] for r in range(n)]).astype(np.float64)
    rest = logits[:, :, 0, 0].double().scatter(1, ids, float("-inf")).logsumexp(1).numpy()
    np.testing.assert_allclose(tail, rest, rtol=1e-3)


def test_seventy_thousand_classes_take_uint32_ids_through_store_and_kernel(tmp_path):
    """C = 70,000 > 65,535: ids are uint32, and ids above 65,535 (which uint16 wraps and int16 reads
    as negative) come back exact and give the kernel's rows path the float64 reference's loss."""
    from kdcache.kernels import topk_kl
    from kdcache.store import to_tensors

    C, k, n = 70_000, 4, 16
    out = tmp_path / "wide.zarr"
    logits, ids = rows_store(out, C, k, n, low=65_537, seed=1)
    store = CacheStore(out)
    assert store.meta["dtypes"]["indices"] == "uint32"
    items = [to_tensors(store.read(r)) for r in range(n)]  # as the training pipeline reads them
    read = torch.stack([it["logits/indices"][:, 0, 0] for it in items])  # the reader's signed type
    assert read.dtype in (torch.int32, torch.int64)
    got = read.long()
    assert torch.equal(got, ids) and (got > 65_535).all()
    assert not torch.equal(got, got.to(torch.int32).to(torch.int16).long())  # what 16 bits would have lost
    values = torch.stack([it["logits/values"][:, 0, 0] for it in items])
    tail = torch.stack([it["logits/tail"][0, 0] for it in items])
    student = torch.randn(n, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    fused = student.float().clone().requires_grad_(True)
    ref = student.clone().requires_grad_(True)
    loss = topk_kl(fused, values, read, tail, temperature=2.0, backend="numba")
    want = topk_kl(ref, values.double(), got, tail.double(), temperature=2.0, backend="torch")
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
    # the loss depends on the ids: the teacher's top k moved to other classes gives another loss
    assert abs(float(topk_kl(student.float(), values, got - 65_536, tail, temperature=2.0)) - float(loss.detach())) > 1e-3
