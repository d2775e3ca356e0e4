"""Teacher caches: the one package that knows how a cache is laid out, on disk and in memory.

* :mod:`.schema`: the Zarr v3 layout, described by one :class:`CacheSchema` (arrays, strides,
  id types, extents, shards, placeholders, identity);
* :mod:`.location`: local folders and fsspec URLs, and what differs between them;
* :mod:`.writer`: creating or resuming a store, encoding teacher outputs, writing whole shards;
* :mod:`.reader`: :class:`CacheStore` (``store.join(dataset)`` maps a data set's samples to
  store rows, refusing a store built from other data), :class:`CachedTargets` (random access)
  and :class:`CacheStream` (shuffled shard order with a shuffle buffer);
* :mod:`.shards`: kdcache's fast path for local shard files;
* :mod:`.check`: ``inspect-cache`` and ``verify-cache``.

The teacher pass that fills a store lives in :mod:`kdcache.teacher.cache_build`.
"""

from kdcache.store.reader import (
    BAD,
    BadSampleError,
    CachedTargets,
    CacheStore,
    CacheStream,
    StoreError,
    read_meta,
    to_tensors,
)
from kdcache.store.schema import DEFAULT_CODEC, FORMAT, SCHEMA_VERSION, CacheSchema

__all__ = ["FORMAT", "SCHEMA_VERSION", "DEFAULT_CODEC", "BAD", "BadSampleError", "CacheSchema", "CacheStore",
           "CacheStream", "CachedTargets", "StoreError", "read_meta", "to_tensors"]
