"""The write side of a teacher cache: creating (or resuming) a store, turning teacher outputs
into its arrays, and writing whole shards from a background thread.

* :func:`prepare_store` creates the store described by a :class:`~.schema.CacheSchema`, or
  checks that an existing one can be resumed; one process (rank 0) calls it. A local store is
  created in a temporary folder renamed into place, so it appears complete or not at all; a
  remote one carries the ``kdcache-creating`` attribute until its creation finished.
* :func:`open_for_writing` opens it in every process and refuses one built differently;
  :func:`pending_shards` says which of a process's shards still need writing.
* :func:`encode_batch` turns a batch of teacher outputs (float32 logits and features) into one
  dict of arrays per sample: top-k fp16 values, ids in the store's id type, the tail, the
  features and attention maps, the extents and the stored views.
* :class:`ShardWriter` gathers those samples per shard and writes each complete shard — every
  map array, the extents, then ``done`` — so an interruption never leaves a sample marked done
  that is not complete. Local shards go through :mod:`.shards` (one file, renamed into place).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr

from kdcache.core.errors import KDCacheError
from kdcache.core.topk import FP16_MAX, topk_targets
from kdcache.pipeline.signals import signal, signal_kinds
from kdcache.store import location
from kdcache.store.finite import all_finite
from kdcache.store.reader import StoreError, read_meta
from kdcache.store.schema import ATTR, CacheSchema, encode_ids
from kdcache.store.shards import fast_reader

#: attribute of a remote store whose creation has not finished
PARTIAL = "kdcache-creating"


class NonFiniteTeacher(KDCacheError):
    """The teacher produced NaN/inf, or values beyond fp16's range."""


class WriteFailed(KDCacheError):
    """Writing a shard failed (full disk, lost connection, …); finished shards are kept."""


# -- creating and opening -----------------------------------------------------------------------


def _not_a_store(out) -> KDCacheError:
    return KDCacheError(f"--out {out} exists and is not a kdcache teacher cache; kdcache never overwrites "
                        "other data. Choose another --out (or remove it yourself)")


def _check_resumable(out, stored: CacheSchema, wanted: CacheSchema) -> None:
    diff = stored.differences(wanted)
    if diff:
        raise KDCacheError(
            f"{out} holds a teacher cache built differently, so it cannot be resumed: "
            + "; ".join(diff) + ". Use --overwrite to rebuild it, or another --out"
        )


def _initialise(group, schema: CacheSchema, ids, hashes) -> None:
    id_bytes, width = encode_ids(ids)
    schema.create_arrays(group, width)
    group["sample_id"][:] = id_bytes
    group["content_hash"][:] = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes])


def _existing(out) -> CacheSchema | None:
    """The schema of the store at ``out``; None for an interrupted remote creation; an error
    for anything that is not a kdcache store."""
    try:
        return CacheSchema(read_meta(out)[1])
    except StoreError:
        if location.is_url(out):
            try:
                if dict(location.open_group(out, "r").attrs).get(PARTIAL):
                    return None
            except location.RemoteError:
                raise  # a store that keeps failing is not "not a store"
            except Exception:  # zarr raises several types for "not a group"
                pass
        raise _not_a_store(out) from None


def check_out(out) -> None:
    """Refuse, before any work, an ``--out`` that holds something other than a teacher cache."""
    location.check_client(out)
    if not location.is_empty(out):
        _existing(out)


def _nothing_done(out) -> bool:
    """Whether the store at ``out`` holds no finished sample (a build stopped before its first shard)."""
    try:
        group, _ = read_meta(out)
        return not done_flags(group, out).any()
    except StoreError:
        return False


def prepare_store(out, schema: CacheSchema, ids, hashes, *, overwrite: bool) -> bool:
    """Create the store ``schema`` describes at ``out`` (returns False), or check that the one
    already there can be resumed (True). ``--overwrite`` replaces a store, never other data (nor a
    file anyone put inside it: :func:`~.location.remove_store`); a store built differently that
    holds no finished sample has nothing to keep and is built again without it."""
    location.check_client(out)
    if not location.is_empty(out):
        stored = _existing(out)
        if stored is not None and not overwrite and not (stored.differences(schema) and _nothing_done(out)):
            _check_resumable(out, stored, schema)
            return True
        location.remove_store(out)
    if location.is_url(out):
        def create():
            group = location.open_group(out, "w")
            group.attrs[PARTIAL] = True
            _initialise(group, schema, ids, hashes)
            group.attrs.put({ATTR: schema.meta})  # replaces the partial marker: the store is complete

        location.retrying(create, str(out), "creating the teacher cache", "; then rerun the same command")
        return False
    out = Path(out)
    if out.exists():  # an empty folder
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    location.remove_tree(tmp)
    group = zarr.open_group(str(tmp), mode="w-")
    _initialise(group, schema, ids, hashes)
    group.attrs[ATTR] = schema.meta
    os.replace(tmp, out)  # the store appears complete with its metadata, or not at all
    return False


def open_for_writing(out, wanted: CacheSchema) -> tuple[zarr.Group, CacheSchema]:
    """The store at ``out`` opened for writing, with its stored schema; refuses a store whose
    identity differs from ``wanted``."""
    group, meta = read_meta(out, mode="r+")
    stored = CacheSchema(meta)
    diff = stored.differences(wanted)
    if diff:
        raise StoreError(f"store {out} does not match this build: {'; '.join(diff)}")
    return group, stored


def done_flags(group, out="") -> np.ndarray:
    """Which samples of the store ``group`` (at ``out``: a URL's request is retried) are done."""
    return location.retrying(lambda: np.asarray(group["done"][:], dtype=bool), str(out), "reading done flags of")


def pending_shards(group, schema: CacheSchema, rank: int = 0, world_size: int = 1, out="") -> list[int]:
    """This process's shards (``rank``, ``rank + world_size``, …) that hold a sample not done."""
    done = done_flags(group, out)
    mine = range(rank, schema.num_shards, world_size)
    return [j for j in mine if not done[slice(*schema.shard_rows(j))].all()]


# -- teacher outputs -> arrays ----------------------------------------------------------------------


def _encode(schema: CacheSchema, logits: torch.Tensor, feats: dict, ids: list[str], views: bool,
            per_sample: int = 1) -> list[dict]:
    """One dict per image: array path -> numpy array (fp16 maps, ids in the store's type); with
    ``views``, the rows of ``logits`` are ``per_sample`` (V) consecutive views of each image and
    each dict holds the image's V, stacked ([V, …], V = 1 too): ``ids`` names the images."""
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    if bool(bad.any()):
        names = list(dict.fromkeys(ids[i // per_sample] for i in torch.nonzero(bad).flatten().tolist()))
        raise NonFiniteTeacher(
            f"the teacher produced non-finite logits (NaN/inf) for {len(names)} samples: {', '.join(names[:10])}; "
            "the cache refuses them. Check the teacher weights and those images (try without --amp)"
        )
    big = logits.abs().flatten(1).amax(1) > FP16_MAX
    if bool(big.any()):
        names = list(dict.fromkeys(ids[i // per_sample] for i in torch.nonzero(big).flatten().tolist()))
        raise NonFiniteTeacher(f"teacher logits exceed fp16's range (±{FP16_MAX:g}) for samples {', '.join(names[:10])}")
    prefix = "views/" if views else ""
    described = schema.views if views else schema.meta
    values, indices, tail = topk_targets(logits, schema.k)
    cols = {f"{prefix}logits/values": values.half(), f"{prefix}logits/indices": indices}
    if tail is not None:
        cols[f"{prefix}logits/tail"] = tail.half()
    for kind in signal_kinds():
        for tap in described.get(kind) or {}:
            cols[f"{prefix}{kind}/{tap}/values"] = signal(kind).encode(feats[tap]).half()
    idx_dtype = schema.stored_index_dtype
    host = {p: t.cpu().numpy() for p, t in cols.items()}
    for p, a in host.items():
        if p.endswith("/values") and not all_finite(a):
            raise NonFiniteTeacher(f"'{p}' of the teacher exceeds fp16's range for some of {', '.join(ids[:10])}")
        if p.endswith("logits/indices"):
            host[p] = a.astype(idx_dtype)  # once for the batch
        if views:  # [B·V, …] -> [B, V, …]: each image's views together, no copy
            host[p] = host[p].reshape(len(ids), per_sample, *a.shape[1:])
    return [{p: a[i] for p, a in host.items()} for i in range(len(ids))]


def encode_batch(schema: CacheSchema, logits: torch.Tensor, feats: dict, ids: list[str],
                 image_hw: tuple[int, int], views: tuple[torch.Tensor, dict, np.ndarray] | None = None) -> list[dict]:
    """The samples of a batch of same-size images, ready for :meth:`ShardWriter.put`.

    ``logits`` [B, C, h, w] and ``feats`` (tap -> [B, c, h', w']) are the teacher's float32
    outputs on the ``image_hw`` inputs; ``views``: its outputs on the stored views, [B·V, …]
    each, and their packed geometries [B, V, 6]."""
    samples = _encode(schema, logits, feats, ids, views=False)
    h, w = schema.map_size
    for sid, sample in zip(ids, samples):
        sample["image_hw"] = tuple(image_hw)
        for g in schema.extent_groups:
            sample[f"{g}/hw"] = sample[f"{g}/values"].shape[-2:]
        eh, ew = sample["logits/hw"]
        if eh > h or ew > w:
            raise KDCacheError(f"sample {sid}: teacher map {eh}x{ew} is larger than the store's {h}x{w}")
    if views is not None:
        view_logits, view_feats, params = views
        V = schema.view_count
        per_image = _encode(schema, view_logits, view_feats, ids, views=True, per_sample=V)
        for j, sample in enumerate(samples):
            sample.update(per_image[j])
            sample["views/params"] = np.asarray(params[j], dtype=np.float32)
    return samples


# -- the writer thread -----------------------------------------------------------------------------


class ShardWriter:
    """Gathers finished samples per shard and writes each complete shard in a background thread.

    ``put(row, sample)`` queues one encoded sample (bounded queue: the teacher waits only if
    the writer falls ``queue_size`` samples behind). A shard is written — every map array, the
    extents, then ``done`` — once all its samples arrived. ``close()`` writes what is complete
    and drops an incomplete shard (its samples stay not done); ``abort()`` does the same after
    an error in the caller."""

    def __init__(self, group, schema: CacheSchema, out, queue_size: int):
        self.group = group
        self.schema = schema
        self.out = out
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.samples_written = 0
        self.shards_written = 0
        self.pending: dict[int, dict[int, dict]] = {}
        specs = schema.map_specs
        # every chunk written, even one equal to the fill value: a missing chunk means a lost one
        self.arrays = {s.path: group[s.path].with_config({"write_empty_chunks": True}) for s in specs}
        # kdcache's own shard layout written whole: at a URL one PUT a shard file, where zarr's sharding
        # codec first reads the shard it replaces (a HEAD and a LIST when it is missing) and the stale
        # shard had to be deleted first (another two)
        self.fast = {s.path: fast_reader(out, s.path, self.arrays[s.path].metadata.to_dict()) for s in specs}
        for g in schema.extent_groups:
            self.arrays[f"{g}/hw"] = group[f"{g}/hw"]
        self.quality = [name for name, _, _ in schema.quality_arrays()]
        for name in ("done", "image_hw") + (("views/params",) if schema.views else ()) + tuple(self.quality):
            self.arrays[name] = group[name]
        self.thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def put(self, row: int, sample: dict) -> None:
        if self.error is not None:
            raise self._failure()
        self.queue.put((row, sample))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self._failure()

    def abort(self) -> None:
        """Write the complete shards and stop (after an error elsewhere); raises nothing."""
        self.queue.put(None)
        self.thread.join()

    def _failure(self) -> KDCacheError:
        exc = self.error
        if isinstance(exc, location.RemoteError):
            return exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            why = "the disk is full"
        else:
            why = f"{type(exc).__name__}: {exc}"
        return WriteFailed(
            f"writing the teacher cache {self.out} failed ({why}). Every sample marked done is "
            "complete; free space or fix the cause and rerun the same command to resume"
        )

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            if self.error is not None:
                continue  # keep draining so the teacher never blocks on a dead writer
            row, sample = msg
            shard = int(self.schema.shard_of(row))
            got = self.pending.setdefault(shard, {})
            got[row] = sample
            start, stop = self.schema.shard_rows(shard)
            if len(got) == stop - start:
                del self.pending[shard]
                try:  # at a URL, a failing request retried: a whole shard rewritten is safe
                    location.retrying(partial(self.write_shard, shard, start, stop, got), self.out,
                                      f"writing shard {shard} of the teacher cache",
                                      "; every sample marked done is complete: rerun the same command to resume")
                except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                    self.error = exc

    def write_shard(self, shard: int, start: int, stop: int, samples: dict[int, dict]) -> None:
        n = stop - start
        rows = [samples[r] for r in range(start, stop)]
        written = 0
        for spec in self.schema.map_specs:
            block = np.zeros((n, *spec.shape), dtype=spec.dtype)
            for j, s in enumerate(rows):
                a = s[spec.path]
                block[(j, *(slice(0, d) for d in a.shape))] = a
            fast = self.fast.get(spec.path)
            if fast is not None:  # the shard file replaced whole, atomically
                written += fast.write(start, block)
            else:  # through zarr: a shard left by an interrupted run is replaced, never merged
                if self.schema.per_view(spec.path):  # a shard file per view
                    keys = ["/".join([spec.path, "c", str(shard), str(v)] + ["0"] * (len(spec.shape) - 1))
                            for v in range(spec.shape[0])]
                else:
                    keys = ["/".join([spec.path, "c", str(shard)] + ["0"] * len(spec.shape))]
                for key in keys:
                    location.delete_key(self.out, key)
                self.arrays[spec.path][start:stop] = block
                if not location.is_url(self.out):  # no extra requests to an object store
                    written += sum(location.size_of(self.out, key) for key in keys)
        for g in self.schema.extent_groups:
            self.arrays[f"{g}/hw"][start:stop] = np.array([s[f"{g}/hw"] for s in rows], dtype=np.int32)
        self.arrays["image_hw"][start:stop] = np.array([s["image_hw"] for s in rows], dtype=np.int32)
        if self.schema.views:
            self.arrays["views/params"][start:stop] = np.stack([s["views/params"] for s in rows])
        for name in self.quality:
            self.arrays[name][start:stop] = np.stack([np.asarray(s[name]) for s in rows])
        self.arrays["done"][start:stop] = True  # last: the samples are complete
        self.bytes_written += written
        self.samples_written += n
        self.shards_written += 1
