"""The read side of a teacher cache.

:class:`CacheStore` opens a store once per process (a DataLoader worker reopens it after
unpickling), keeps its array handles, and reads whole chunks: one sample (random access) or a
block of consecutive samples (streaming). :meth:`CacheStore.join` ties a store to a data set by
sample id and refuses one built from other data. :class:`CacheStream` streams samples in
shuffled shard order with a shuffle buffer, so each read is a whole shard; :class:`CachedTargets`
is the random-access equivalent.

A sample reads as a flat dict of numpy arrays, cropped to the sample's valid extent:
``logits/values`` [k, h, w] float16, ``logits/indices`` [k, h, w] (uint8, or int32/int64 for
the wider id types), ``logits/tail`` [h, w] float16 (absent when k = C), ``features/<tap>``
[c, h, w], ``attention/<tap>`` [h, w], and with stored views ``views/params`` [V, 7] plus
``views/logits/values`` [V, k, h', w'] and so on; ``row`` and ``id`` say which sample it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr

from kdcache.core.errors import KDCacheError
from kdcache.core.outputs import file_sha256
from kdcache.core.shared import SharedInts
from kdcache.data import SegmentationDataset, build_dataset
from kdcache.data.splits import limit
from kdcache.store.finite import nan_rows
from kdcache.store.location import RemoteError, check_client, is_url, open_group, retrying
from kdcache.store.schema import ATTR, FORMAT, SCHEMA_VERSION, VIEW_PARAMS, CacheSchema, decode_ids
from kdcache.store.shards import ShardFile, fast_reader, read_whole_plain


class StoreError(KDCacheError):
    """A teacher cache that is missing, damaged or does not match what it is used with."""


class BadSampleError(StoreError):
    """A sample whose stored chunks cannot be read (damaged, truncated)."""

    def __init__(self, message: str, rows=()):
        super().__init__(message)
        self.rows = list(rows)

    def __reduce__(self):  # survives the trip back from a DataLoader worker
        return (type(self), (str(self), self.rows))


def read_meta(path: str | Path, storage_options: dict | None = None, mode: str = "r") -> tuple[zarr.Group, dict]:
    """Open ``path`` (read-only by default) and return (group, kdcache attributes); clear errors otherwise."""
    p = str(path)
    check_client(p)
    if not is_url(p) and not Path(p).exists():
        raise StoreError(f"teacher cache {p} does not exist; build it with `kdcache build-teacher-cache --out {p}`")
    try:
        group = retrying(lambda: open_group(p, mode, storage_options), p,
                         "opening the teacher cache")
    except RemoteError:
        raise
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{p} is not a Zarr v3 group ({type(exc).__name__}: {exc}); is it a kdcache teacher cache?") from None
    meta = dict(group.attrs).get(ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{p} is a Zarr group but not a kdcache teacher cache (no '{ATTR}' attributes)")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{p} has cache schema version {meta.get('schema_version')}; this kdcache reads "
                         f"version {SCHEMA_VERSION}. Rebuild the cache with this version.")
    return group, meta


#: the key that marks a placeholder for a sample whose chunks could not be read
BAD = "bad"


class CacheStore:
    """A teacher cache opened for reading. Picklable: workers reopen it lazily."""

    def __init__(self, path: str | Path, storage_options: dict | None = None):
        self.path = str(path)
        self.storage_options = storage_options
        self._group, self.meta = read_meta(self.path, storage_options)
        self.schema = CacheSchema(self.meta)
        self._arrays: dict[str, zarr.Array] = {}
        self._fast: dict[str, ShardFile | None] = {}
        self._ids: list[str] | None = None
        self._extents: dict[tuple[str, int], np.ndarray] = {}

    # -- pickling: open once per process -----------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"] = None
        state["_arrays"] = {}
        state["_fast"] = {}
        state["_extents"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = retrying(lambda: open_group(self.path, "r", self.storage_options), self.path,
                                   "opening the teacher cache")
        return self._group

    def array(self, path: str) -> zarr.Array:
        a = self._arrays.get(path)
        if a is None:
            try:
                a = self.group[path]
            except KeyError:
                raise StoreError(f"teacher cache {self.path} has no array '{path}': the store is incomplete "
                                 "or damaged; run `kdcache verify-cache` on it") from None
            self._arrays[path] = a
        return a

    # -- what the store is ---------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.schema.num_samples

    @property
    def num_classes(self) -> int:
        return self.schema.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.schema.class_names

    @property
    def k(self) -> int:
        return self.schema.k

    @property
    def samples_per_shard(self) -> int:
        return self.schema.samples_per_shard

    @property
    def num_shards(self) -> int:
        return self.schema.num_shards

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = decode_ids(self._get("sample_id"))
        return self._ids

    def done(self) -> np.ndarray:
        return np.asarray(self._get("done"), dtype=bool)

    def content_hashes(self) -> list[str]:
        return [bytes(r).hex() for r in np.asarray(self._get("content_hash"), dtype=np.uint8)]

    def _get(self, path: str, sel=slice(None)) -> np.ndarray:
        """``array(path)[sel]`` as numpy, the request retried where the store is an object store;
        a whole small array of a local store read file by file without zarr's per-chunk cost."""
        a = self.array(path)
        if sel == slice(None):
            whole = read_whole_plain(self.path, path, a.metadata.to_dict())
            if whole is not None:
                return whole
        return retrying(lambda: np.asarray(a[sel]), f"{self.path.rstrip('/')}/{path}", "reading")

    @property
    def map_paths(self) -> list[str]:
        return [s.path for s in self.schema.map_specs]

    def dataset(self) -> SegmentationDataset:
        """The data set the store was built from, as its provenance records it (name, root,
        split, options, ``--limit``); a folder of images without class names takes the store's."""
        spec = self.schema.dataset
        ds = limit(build_dataset(spec["name"], spec["split"], spec.get("root"), **(spec.get("options") or {})),
                   spec.get("limit"))
        if ds.num_classes == 0:
            ds = ds.with_class_names(self.class_names)
        return ds

    def check_teacher_unchanged(self) -> None:
        """Refuse a stale cache: a teacher checkpoint it was built from (any member of an
        ensemble) has changed since (its file is still where the build read it, with other bytes)."""
        for teacher in self.schema.members:
            path = Path(teacher.get("weights") or "")
            if teacher.get("weights") and path.is_file():
                now = file_sha256(path)
                if now != teacher["weights_sha256"]:
                    who = f"member {teacher['name']} " if "name" in teacher else ""
                    raise StoreError(
                        f"teacher cache {self.path} is stale: {who}{path} had SHA-256 "
                        f"{teacher['weights_sha256'][:16]}… when it was built, but that file now has {now[:16]}… "
                        "(the teacher was retrained or replaced). Rebuild the cache: build-teacher-cache --overwrite"
                    )

    def quality(self) -> dict | None:
        """The teacher's quality over the finished samples, per row (each member, each member
        without TTA, the combination): mIoU, aAcc and NLL per labelled pixel where labels exist,
        and the share of grid cells whose top class agrees with the combination's. None for a
        store built before kdcache recorded it."""
        names = self.schema.quality_rows
        if not names:
            return None
        rows = np.flatnonzero(self.done())
        if len(rows) == 0:
            return {"rows": {}, "labelled_pixels": 0, "samples": 0}
        def total(name):
            return np.asarray(self.array(f"quality/{name}")[:])[rows].sum(0)
        counts, nll, agree, cells = total("counts").astype(np.int64), total("nll"), total("agree"), total("cells")
        out = {}
        for r, name in enumerate(names):
            inter, pred, label = counts[r]
            union = pred + label - inter
            present = union > 0
            labelled = int(label.sum())
            out[name] = {
                "miou": float((inter[present] / union[present]).mean()) if labelled else None,
                "aacc": float(inter.sum() / labelled) if labelled else None,
                "nll": float(nll[r] / labelled) if labelled else None,
                "agreement": float(agree[r] / cells) if cells else None,
            }
        return {"rows": out, "labelled_pixels": int(counts[-1][2].sum()), "samples": int(len(rows))}

    # -- reading -----------------------------------------------------------------------------
    def extents(self, group: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The valid extent (h, w) of the maps of ``group`` of samples ``start..stop-1`` (all
        by default), [n, 2]. Read a shard's chunk at a time and kept (8 bytes a sample): a block
        read fetches its own shard's extents once, never the whole array (at 10⁶ samples that
        would be thousands of requests to an object store for every DataLoader worker)."""
        start = 0 if start is None else start
        stop = self.num_samples if stop is None else stop
        s = self.samples_per_shard
        first, last = start // s, (max(stop, start + 1) - 1) // s
        missing = [j for j in range(first, last + 1) if (group, j) not in self._extents]
        if len(missing) > 8:  # a large span (inspect, verify): one read
            lo, hi = missing[0] * s, min((missing[-1] + 1) * s, self.num_samples)
            block = self._get(f"{group}/hw", slice(None) if (lo, hi) == (0, self.num_samples) else slice(lo, hi))
            for j in missing:
                self._extents[(group, j)] = block[j * s - lo:min((j + 1) * s, self.num_samples) - lo]
        else:
            for j in missing:
                self._extents[(group, j)] = self._get(f"{group}/hw", slice(j * s, min((j + 1) * s, self.num_samples)))
        parts = [self._extents[(group, j)] for j in range(first, last + 1)]
        whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return whole[start - first * s:stop - first * s]

    def read(self, row: int, groups: Iterable[str] | None = None, view: int | None = None) -> dict:
        """One sample (every map cropped to its valid extent); ``groups`` and ``view`` as for
        :meth:`read_block`."""
        if not 0 <= row < self.num_samples:
            raise IndexError(f"row {row} is outside the store's {self.num_samples} samples")
        return self.read_block(row, row + 1, groups=groups, view=view)[0]

    def read_rows(self, rows: Sequence[int], groups: Iterable[str] | None = None, view: int | None = None) -> list[dict]:
        """Samples ``rows`` in any order (a shuffled batch's), in that order, each array read in
        one call for all of them: a shard's file is opened once per array and a packed chunk
        decoded once for the batch (random access otherwise pays both per sample), and a few rows
        of a remote shard fetch only their own chunks. A row given twice reads once and comes back
        twice (the same arrays). Raises as :meth:`read_block` does, naming the batch's rows: the
        caller reads them one by one to find the bad sample."""
        rows = [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < self.num_samples:
                raise IndexError(f"row {r} is outside the store's {self.num_samples} samples")
        wanted = sorted(set(rows))
        read = dict(zip(wanted, self._read_rows(wanted, groups, view, True,
                                                 f"rows {', '.join(map(str, wanted[:8]))}{', …' if len(wanted) > 8 else ''}")))
        return [read[r] for r in rows]

    def read_block(self, start: int, stop: int, rows: Sequence[int] | None = None,
                   groups: Iterable[str] | None = None, view: int | None = None, finite: bool = True) -> list[dict]:
        """Samples ``start..stop-1`` (or the ``rows`` among them), each array read in one call.
        ``groups``: only these map groups (``logits``, ``features/<tap>``, ``attention/<tap>``,
        ``views/logits``, …, and ``views/params``; see :meth:`CacheSchema.groups_for`); None:
        every array. ``view``: of a schedule store's views, read this one alone (the view axis
        of every ``views/…`` array, ``views/params`` included, then has length 1); None: all.
        ``finite``: a sample whose float maps hold NaN (the fill value of a lost chunk; the
        writer refuses non-finite teachers) raises :class:`BadSampleError` (False: returned as
        read, for ``verify-cache``'s own checks).

        Reading a whole shard's block is the fast path: its file is fetched in one request per
        array and its chunks decoded together, instead of one request per sample."""
        rows = list(range(start, stop)) if rows is None else [int(r) for r in rows]
        return self._read_rows(rows, groups, view, finite, f"rows {start}..{stop - 1}")

    def _read_rows(self, rows: list[int], groups: Iterable[str] | None, view: int | None, finite: bool,
                   where: str) -> list[dict]:
        """``rows`` (ascending, or a block's), each array read in one call (:meth:`_read_map`);
        ``where`` names them in an error."""
        if not rows:
            return []
        schema = self.schema
        specs = schema.select(groups)
        extents = {g: self._row_extents(g, rows) for g in {s.group for s in specs if s.spatial}}
        data = {}
        for spec in specs:
            try:
                data[spec.path] = retrying(
                    partial(self._read_map, spec.path, rows, view if schema.per_view(spec.path) else None),
                    f"{self.path.rstrip('/')}/{spec.path}", f"reading {where} of")
                if finite and spec.dtype.startswith("float"):  # a lost chunk reads as the fill value, NaN
                    lost = [r for r, bad in zip(rows, nan_rows(data[spec.path])) if bad]
                    if lost:
                        raise OSError(f"samples {', '.join(self.ids[r] for r in lost[:3])} read as NaN: their "
                                      "chunk is missing (lost) or was written damaged")
            except RemoteError:
                raise
            except Exception as exc:
                names = [self.ids[r] for r in rows[:3]] + (["…"] if len(rows) > 3 else [])
                raise BadSampleError(
                    f"cannot decode '{spec.path}' of sample{'s' if len(rows) > 1 else ''} {', '.join(names)} "
                    f"({where}) in {self.path} ({type(exc).__name__}: {exc}); the chunk is "
                    f"damaged or truncated. `kdcache verify-cache {self.path} --reset-bad` marks it for "
                    "rebuilding; train-student --skip-bad trains on without its targets.", rows
                ) from None
        if schema.views and (groups is None or VIEW_PARAMS in groups):
            one = view is not None and schema.schedule
            data[VIEW_PARAMS] = self._get_rows(VIEW_PARAMS, rows, slice(view, view + 1) if one else None)
        ids = self.ids
        ids_type = schema.read_index_dtype
        # what each array's rows need, worked out once (a block's loop runs per sample and array)
        plan = []
        for spec in specs:
            block = data[spec.path]
            one_view = (view is not None and schema.schedule and spec.path.startswith("views/")
                        and not schema.per_view(spec.path))  # all views were read: this one
            hw = extents[spec.group] if spec.spatial else None
            widen = block.dtype.kind == "u" and block.dtype != ids_type
            plan.append((spec.key, block, one_view, hw, widen))
        params = data.get(VIEW_PARAMS)
        out = []
        for j, r in enumerate(rows):
            item = {"row": r, "id": ids[r]}
            for key, block, one_view, hw, widen in plan:
                a = block[j]
                if one_view:
                    a = a[view:view + 1]
                if hw is not None:
                    h, w = hw[j]
                    a = a[..., :h, :w]
                if widen:
                    a = a.astype(ids_type)
                item[key] = a
            if params is not None:
                item[VIEW_PARAMS] = params[j]
            out.append(item)
        return out

    def _row_extents(self, group: str, rows: list[int]) -> list[list[int]]:
        """The valid extent [h, w] of ``group``'s maps of each of ``rows`` (:meth:`extents`, a shard at a time)."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return self.extents(group, rows[0], rows[-1] + 1).tolist()
        s = self.samples_per_shard
        by_shard = {j: self.extents(group, j * s, min((j + 1) * s, self.num_samples)) for j in {r // s for r in rows}}
        return [by_shard[r // s][r % s].tolist() for r in rows]

    def _get_rows(self, path: str, rows: list[int], rest: slice | None = None) -> np.ndarray:
        """``array(path)[rows]`` (and ``[rows, rest]``): a slice for consecutive rows, else only theirs
        (zarr's orthogonal selection: the chunks between them are not read)."""
        lo, hi = rows[0], rows[-1] + 1
        if rows == list(range(lo, hi)):
            return self._get(path, slice(lo, hi) if rest is None else (slice(lo, hi), rest))
        a = self.array(path)
        at = np.asarray(rows)
        return retrying(lambda: np.asarray(a.oindex[at] if rest is None else a.oindex[at, rest]),
                        f"{self.path.rstrip('/')}/{path}", "reading")

    def _read_map(self, path: str, rows: list[int], view: int | None = None) -> np.ndarray:
        """A map array's ``rows`` as a [len(rows), ...] block, in their order; of an array chunked
        per view, ``view`` alone ([len(rows), 1, ...]) when given."""
        if path not in self._fast:
            self._fast[path] = fast_reader(self.path, path, self.array(path).metadata.to_dict(),
                                           self.storage_options)
        fast = self._fast[path]
        rest = None if view is None else slice(view, view + 1)
        if fast is None:  # not kdcache's own layout: zarr
            return self._get_rows(path, rows, rest)
        by_shard: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            by_shard.setdefault(r // fast.per_shard, []).append(j)
        parts, ranged = [], []
        for at in by_shard.values():
            if fast.fs is not None and not fast.reads_whole([rows[j] for j in at]):
                ranged += at  # a few samples of a remote shard: zarr's ranged reads of their chunks
            else:
                parts.append((at, fast.read([rows[j] for j in at], view)))
        if ranged:  # one selection for all of them: zarr fetches their chunks together
            parts.append((ranged, self._get_rows(path, [rows[j] for j in ranged], rest)))
        if len(parts) == 1 and parts[0][0] == list(range(len(rows))):
            return parts[0][1]
        out = np.empty((len(rows), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for at, part in parts:
            out[at] = part
        return out

    # -- joining with a data set -----------------------------------------------------------------
    def join(self, dataset, *, check_content: bool = True, require_done: bool = True) -> np.ndarray:
        """Store row of each sample of ``dataset`` (same order), refusing a store built from
        other data: class count or names, missing ids, unfinished samples and (unless
        ``check_content`` is False) samples whose image or label bytes changed."""
        name = getattr(dataset, "name", "the data set")
        if dataset.num_classes != self.num_classes:
            raise StoreError(
                f"teacher cache {self.path} holds {self.num_classes} classes but {name} has "
                f"{dataset.num_classes}; use a cache built from this data set's teacher"
            )
        if list(dataset.class_names) != self.class_names:
            raise StoreError(f"teacher cache {self.path} was built for classes {self.class_names[:5]}… "
                             f"but {name} has {list(dataset.class_names)[:5]}…; they must be the same, in order")
        where = {sid: r for r, sid in enumerate(self.ids)}
        missing = [i for i in dataset.ids if i not in where]
        if missing:
            built = self.schema.dataset
            raise StoreError(
                f"{len(missing)} of {len(dataset)} samples of {name} (e.g. {', '.join(missing[:3])}) are "
                f"not in teacher cache {self.path}, which was built from {built['name']} split "
                f"'{built['split']}'; build a cache for this data set and split"
            )
        rows = np.array([where[i] for i in dataset.ids], dtype=np.int64)
        if require_done:
            done = self.done()
            todo = [dataset.ids[j] for j, r in enumerate(rows) if not done[r]]
            if todo:
                raise StoreError(
                    f"{len(todo)} samples needed from teacher cache {self.path} are not written yet "
                    f"(e.g. {', '.join(todo[:3])}): the build did not finish; rerun the same "
                    "build-teacher-cache command to complete it"
                )
        if check_content:
            stored = self.content_hashes()
            changed = [dataset.ids[j] for j, r in enumerate(rows)
                       if dataset.content_hash(j) != stored[r]]
            if changed:
                raise StoreError(
                    f"{len(changed)} samples of {name} (e.g. {', '.join(changed[:3])}) differ from the "
                    f"images/labels teacher cache {self.path} was built from; rebuild the cache "
                    "(build-teacher-cache --overwrite) for the data as it is now"
                )
        return rows


def to_tensors(item: dict) -> dict:
    """numpy arrays of a sample -> torch tensors (sharing memory); other values unchanged."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in item.items()}


class CachedTargets(torch.utils.data.Dataset):
    """Random access: item ``i`` is store row ``rows[i]``'s targets (as tensors), merged with
    ``item_fn(i)`` (e.g. the image and label of the joined data set) when given."""

    def __init__(self, store: CacheStore, rows: Sequence[int] | None = None,
                 item_fn: Callable[[int], dict] | None = None):
        self.store = store
        self.rows = np.arange(store.num_samples) if rows is None else np.asarray(rows, dtype=np.int64)
        self.item_fn = item_fn

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self._item(i, self.store.read(int(self.rows[i])))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A DataLoader's batch: its rows read together (:meth:`CacheStore.read_rows`), the same
        items as ``[self[i] for i in indices]``."""
        read = self.store.read_rows([int(self.rows[i]) for i in indices])
        return [self._item(i, cached) for i, cached in zip(indices, read)]

    def _item(self, i: int, cached: dict) -> dict:
        item = to_tensors(cached)
        item["index"] = i
        if self.item_fn is not None:
            item.update(self.item_fn(i))
        return item


class CacheStream(torch.utils.data.IterableDataset):
    """Streaming order for training: the shards holding ``rows`` in a shuffled order (new each
    :meth:`set_epoch`), the samples of each shard shuffled and read in one block, then passed
    through a shuffle buffer of ``buffer_size``. With ``world_size`` > 1, whole shards are dealt
    to the processes; ``positions`` instead gives this process's positions in ``rows`` (e.g. the
    trainer's share for a rank). The DataLoader workers split this process's sequence into
    contiguous parts, so each shard is read once per epoch (a shard cut between two workers is
    read by both, each its own samples).

    Items are like :class:`CachedTargets`'s (``index`` is the position in ``rows``); ``groups``
    restricts the arrays read (:meth:`CacheStore.read_block`). ``transform(index, targets)``
    turns the targets of a sample into the item (e.g. the training pipeline's), else ``item_fn``'s
    dict is merged in. With ``batch_size``, every one of ``num_workers`` workers yields the same
    number of items, a multiple of ``batch_size`` (the remainder of the sequence is left out that
    epoch, as ``drop_last`` does), so processes and workers take equal numbers of whole batches.
    With ``placeholder``, a shard that cannot be decoded is read sample by sample and each
    unreadable sample becomes ``placeholder()`` marked ``bad`` (else the error propagates).
    ``view``: of a schedule store's views, the one read (see :meth:`CacheStore.read_block`).

    The epoch, ``positions`` and ``view`` may change between epochs (assign them, or
    :meth:`set_epoch`) while DataLoader workers started once for the run keep iterating the same
    stream: they are kept in shared memory (:class:`~kdcache.core.shared.SharedInts`), which each
    worker reads when it starts an epoch's iteration."""

    def __init__(self, store: CacheStore, rows: Sequence[int] | None = None, *,
                 item_fn: Callable[[int], dict] | None = None,
                 transform: Callable[[int, dict], dict] | None = None,
                 groups: Iterable[str] | None = None, shuffle: bool = True, buffer_size: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, positions: Sequence[int] | None = None,
                 batch_size: int | None = None, num_workers: int = 0,
                 placeholder: Callable[[], dict] | None = None, view: int | None = None):
        self.store = store
        self.rows = np.arange(store.num_samples) if rows is None else np.asarray(rows, dtype=np.int64)
        # what may change from epoch to epoch: [epoch, view (−1: None), count of positions (−1: None),
        # positions …] (positions index rows, so there are at most as many)
        self._plan = SharedInts(3 + len(self.rows))
        self.view = view  # of a schedule store, the one view read (the epoch's)
        self.positions = positions
        self.item_fn = item_fn
        self.transform = transform
        self.groups = None if groups is None else sorted(groups)
        self.shuffle = shuffle
        self.buffer_size = max(1, buffer_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.placeholder = placeholder

    @property
    def epoch(self) -> int:
        return self._plan[0]

    def set_epoch(self, epoch: int) -> None:
        self._plan[0] = epoch

    @property
    def view(self) -> int | None:
        v = self._plan[1]
        return None if v < 0 else v

    @view.setter
    def view(self, view: int | None) -> None:
        self._plan[1] = -1 if view is None else view

    @property
    def positions(self) -> np.ndarray | None:
        n = self._plan[2]
        return None if n < 0 else self._plan.read(3, n)

    @positions.setter
    def positions(self, positions: Sequence[int] | None) -> None:
        if positions is None:
            self._plan[2] = -1
            return
        p = np.asarray(positions, dtype=np.int64)
        self._plan.write(3, p)
        self._plan[2] = len(p)

    def __len__(self) -> int:
        n = len(self.shards_of_this_rank()[1])
        if self.batch_size is None:
            return n
        return self.num_workers * self._quota(n)

    def _quota(self, n: int) -> int:
        """Items each worker yields with ``batch_size``: whole batches of the shortest part."""
        return n // self.num_workers // self.batch_size * self.batch_size

    def shards_of_this_rank(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """(shard order for this process: (shard, positions in rows), the positions it covers)."""
        s = self.store.samples_per_shard
        positions = self.positions
        mine_pos = np.arange(len(self.rows)) if positions is None else positions
        by_shard: dict[int, list[int]] = {}
        for pos in mine_pos:
            by_shard.setdefault(int(self.rows[pos]) // s, []).append(int(pos))
        order = sorted(by_shard)
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.shuffle:
            order = [order[i] for i in rng.permutation(len(order))]
        if positions is None:
            order = order[self.rank::self.world_size]
        shards = []
        for sh in order:
            ps = sorted(by_shard[sh])
            if self.shuffle:
                ps = [ps[i] for i in rng.permutation(len(ps))]
            shards.append((sh, ps))
        return shards, [p for _, ps in shards for p in ps]

    def __iter__(self):
        shards, sequence = self.shards_of_this_rank()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.batch_size is not None and workers != self.num_workers:
            raise KDCacheError(f"CacheStream was set up for {self.num_workers} DataLoader workers but runs "
                               f"in {workers}; give the DataLoader num_workers={self.num_workers}")
        # this worker's contiguous part of the sequence, as runs of positions per shard
        bounds = np.linspace(0, len(sequence), workers + 1).round().astype(int)
        lo, hi = int(bounds[worker]), int(bounds[worker + 1])
        quota = self._quota(len(sequence)) if self.batch_size is not None else hi - lo
        runs, at = [], 0
        for shard, ps in shards:
            a, b = max(lo, at), min(hi, at + len(ps))
            if a < b:
                runs.append((shard, ps[a - at:b - at]))
            at += len(ps)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, worker, 1))
        buffer: list[dict] = []
        s = self.store.samples_per_shard
        yielded = 0
        for shard, positions in runs:
            if yielded >= quota:
                return
            wanted = [int(self.rows[p]) for p in positions]
            first, last = shard * s, min((shard + 1) * s, self.store.num_samples)
            block = self._read(first, last, sorted(wanted))  # one read, in row order
            at_rank = np.argsort(np.argsort(wanted, kind="stable"), kind="stable")  # where each row sits in block
            for j, p in enumerate(positions):  # the shard's samples in their shuffled order
                item = block[int(at_rank[j])]
                item["index"] = p
                buffer.append(item)
                if len(buffer) >= (self.buffer_size if self.shuffle else 1):
                    item = buffer.pop(int(rng.integers(len(buffer))) if self.shuffle else 0)
                    yield self._finish(item)
                    yielded += 1
                    if yielded >= quota:
                        return
        for j in (rng.permutation(len(buffer)) if self.shuffle else range(len(buffer))):
            if yielded >= quota:
                return
            yield self._finish(buffer[j])
            yielded += 1

    def _read(self, first: int, last: int, rows: list[int]) -> list[dict]:
        try:
            return self.store.read_block(first, last, rows=rows, groups=self.groups, view=self.view)
        except BadSampleError:
            if self.placeholder is None:
                raise
        out = []
        for r in rows:
            try:
                out.append(self.store.read(r, groups=self.groups, view=self.view))
            except BadSampleError:
                out.append({**self.placeholder(), "row": r, "id": self.store.ids[r], BAD: True})
        return out

    def _finish(self, item: dict) -> dict:
        out = to_tensors(item)
        if self.transform is not None:
            return self.transform(int(item["index"]), out)
        if self.item_fn is not None:
            out.update(self.item_fn(item["index"]))
        return out
