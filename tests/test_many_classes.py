"""Class ids above 2,048 stay exact (FKD stores them as fp16, which cannot tell 2049 from 2048):
a store of C = 10,000 classes and k = 5, written by the store's own writer and read back, holds
every id the teacher's top 5 had, as [N, C] rows are stored (1 x 1 maps)."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.store import CacheSchema, CacheStore
from kdcache.store.writer import ShardWriter, encode_batch, open_for_writing, prepare_store


def test_ten_thousand_classes_round_trip_every_id(tmp_path):
    C, k, n = 10_000, 5, 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, C, 1, 1, generator=gen) * 3
    # make the top 5 of every row ids that fp16 cannot hold exactly (odd ids above 2048)
    ids = torch.stack([torch.randperm(C - 2049, generator=gen)[:k] + 2049 for _ in range(n)]) | 1
    for r in range(n):
        logits[r, ids[r], 0, 0] = 20.0 + torch.arange(k, 0, -1).float()  # distinct, descending
    sample_ids = [f"s{i:03d}" for i in range(n)]
    hashes = ["00" * 32] * n
    schema = CacheSchema.new(class_names=[f"c{i}" for i in range(C)], k=k, input_size=(1, 1), map_size=(1, 1),
                             ids=sample_ids, hashes=hashes, samples_per_shard=16)
    out = tmp_path / "rows.zarr"
    prepare_store(out, schema, sample_ids, hashes, overwrite=False)
    group, schema = open_for_writing(out, schema)
    writer = ShardWriter(group, schema, out, 16)
    for r, sample in enumerate(encode_batch(schema, logits, {}, sample_ids, (1, 1))):
        writer.put(r, sample)
    writer.close()

    store = CacheStore(out)
    assert store.meta["dtypes"]["indices"] == "uint16" and store.done().all()
    got = np.stack([store.read(r)["logits/indices"][:, 0, 0] for r in range(n)])
    np.testing.assert_array_equal(got, ids.numpy())  # every id, in the teacher's order
    assert (got > 2048).all() and (got % 2 == 1).all()
    assert not np.array_equal(got, got.astype(np.float16).astype(np.int64))  # what fp16 would have lost
    tail = np.stack([store.read(r)["logits/tail"][0, 0] for r in range(n)]).astype(np.float64)
    rest = logits[:, :, 0, 0].double().scatter(1, ids, float("-inf")).logsumexp(1).numpy()
    np.testing.assert_allclose(tail, rest, rtol=1e-3)
