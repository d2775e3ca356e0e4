"""The order a CacheStream reads shards in, for the tests that say it changes every epoch, and
the negative control that fixes it (samples still shuffled within each shard), which those
tests must tell apart from the real stream."""

from __future__ import annotations

from kdcache.store import CacheStream


def shard_order(rows: list[int], per_shard: int) -> tuple[int, ...]:
    """The shards of a stream read without a shuffle buffer, in the order they came; each shard's
    samples must come together."""
    order: list[int] = []
    for r in rows:
        shard = int(r) // per_shard
        if not order or order[-1] != shard:
            assert shard not in order, f"shard {shard} came in two runs: {rows}"
            order.append(shard)
    return tuple(order)


def fix_shard_order(monkeypatch) -> None:
    """The bug the shard-order checks must catch: shards always in id order, their samples still
    shuffled (so every epoch's sample order still differs)."""
    real = CacheStream.shards_of_this_rank

    def by_id(self):
        shards, _ = real(self)
        shards = sorted(shards)
        return shards, [p for _, ps in shards for p in ps]

    monkeypatch.setattr(CacheStream, "shards_of_this_rank", by_id)
