"""Teacher caches: the Zarr v3 layout, the read side and the integrity checks.

``CacheStore(path)`` opens a store; ``store.join(dataset)`` maps a data set's samples to store
rows (refusing a store built from other data); :class:`CachedTargets` (random access) and
:class:`CacheStream` (shuffled shard order with a shuffle buffer) feed a DataLoader. The build
lives in :mod:`kdcache.cache_build`.
"""

from kdcache.store.layout import FORMAT, SCHEMA_VERSION
from kdcache.store.reader import (
    CachedTargets,
    CacheStore,
    CacheStream,
    StoreError,
    read_meta,
    to_tensors,
)

__all__ = ["FORMAT", "SCHEMA_VERSION", "CacheStore", "CacheStream", "CachedTargets", "StoreError",
           "read_meta", "to_tensors", "open_store"]


def open_store(path, storage_options=None) -> CacheStore:
    """Open a teacher cache for reading (once per process; DataLoader workers reopen it)."""
    return CacheStore(path, storage_options)
