"""``inspect-cache`` (what a store is and how good its top k is) and ``verify-cache`` (read
every chunk and check it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcache.core.progress import progress_bar
from kdcache.core.topk import topk_mass
from kdcache.store.finite import all_finite, count_non_finite
from kdcache.store.location import RemoteError, open_group, retrying, sizes_of
from kdcache.store.reader import CacheStore


def inspect_store(path: str | Path, *, samples: int = 64, temperatures=(1.0, 2.0, 4.0)) -> dict:
    """Schema, counts, size on disk, bytes per pixel and top-k mass coverage of a store."""
    store = CacheStore(path)
    schema = store.schema
    done = store.done()
    n_done = int(done.sum())
    size, under = sizes_of(path, [spec.path for spec in schema.map_specs])
    arrays = []
    for spec in schema.map_specs:
        a = store.array(spec.path)
        arrays.append({"path": spec.path, "shape": list(a.shape), "dtype": str(a.dtype),
                       "chunks": list(a.chunks), "shards": list(a.shards or ()),
                       "bytes": under[spec.path]})
    rows = np.flatnonzero(done)
    # valid teacher-map pixels of the finished samples
    hw = store.extents("logits")
    pixels = int((hw[rows, 0].astype(np.int64) * hw[rows, 1]).sum()) if n_done else 0
    logit_bytes = sum(a["bytes"] for a in arrays if a["path"].startswith("logits/"))
    C, k = store.num_classes, store.k
    report = {
        "path": str(path),
        "meta": store.meta,
        "about": schema.describe(),
        "k": k,
        "samples_per_shard": schema.samples_per_shard,
        "num_samples": store.num_samples,
        "done": n_done,
        "shards": store.num_shards,
        "bytes_on_disk": size,
        "arrays": arrays,
        "logit_pixels": pixels,
        "bytes_per_pixel": logit_bytes / pixels if pixels else None,
        "bytes_per_pixel_uncompressed": schema.raw_bytes_per_pixel(),
        "dense_fp32_bytes_per_pixel": 4 * C,
    }
    # top-k mass coverage on a spread sample of the finished samples
    coverage = {}
    if n_done:
        pick = rows[np.linspace(0, len(rows) - 1, min(samples, len(rows))).round().astype(int)]
        pick = np.unique(pick)
        masses = {t: [] for t in temperatures}
        for item in _read_rows(store, pick):
            tail = item.get("logits/tail")
            for t in temperatures:
                masses[t].append(topk_mass(item["logits/values"], tail, C, t).ravel())
        for t in temperatures:
            m = np.concatenate(masses[t])
            coverage[f"T={t:g}"] = {"mean": float(m.mean()), "p5": float(np.percentile(m, 5))}
        report["coverage_samples"] = len(pick)
    report["coverage"] = coverage
    report["teacher_quality"] = store.quality()
    report["classification"] = store.schema.classification
    return report


def _read_rows(store: CacheStore, rows: np.ndarray):
    """Read ``rows`` shard by shard (one block read per shard)."""
    s = store.samples_per_shard
    by_shard: dict[int, list[int]] = {}
    for r in rows:
        by_shard.setdefault(int(r) // s, []).append(int(r))
    for _shard, rs in sorted(by_shard.items()):
        yield from store.read_block(min(rs), max(rs) + 1, rows=rs)


@dataclass
class VerifyResult:
    num_samples: int
    done: int
    bad: dict[str, list[str]] = field(default_factory=dict)  # sample id (row if not unique) -> problems
    bad_rows: list[int] = field(default_factory=list)
    not_done: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.not_done


def verify_store(path: str | Path, *, show_progress: bool = True, reset_bad: bool = False) -> VerifyResult:
    """Read every chunk of every array and check each sample marked done: decodable, finite,
    class ids in range and distinct, values sorted descending, extents within the map. With
    ``reset_bad``, the bad samples' shards are marked not done, so rerunning the build rewrites
    them."""
    store = CacheStore(path)
    schema = store.schema
    n, s, C = store.num_samples, store.samples_per_shard, store.num_classes
    done = store.done()
    ids = store.ids
    result = VerifyResult(n, int(done.sum()))
    result.not_done = [ids[r] for r in np.flatnonzero(~done)]
    problems: dict[int, list[str]] = {}

    def flag(row: int, what: str) -> None:
        problems.setdefault(row, []).append(what)

    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        for r, i in enumerate(ids):
            if i in dup:
                flag(r, "duplicate sample id")
    for r, i in enumerate(ids):
        if not i:
            flag(r, "empty sample id")
    map_h, map_w = schema.map_size
    with progress_bar("verify cache", total=n, enabled=show_progress, unit="sample") as bar:
        for start in range(0, n, s):
            stop = min(n, start + s)
            rows = [r for r in range(start, stop) if done[r]]
            if not rows:
                bar.advance(stop - start)
                continue
            try:
                items = store.read_block(start, stop, rows=rows, finite=False)
            except RemoteError:
                raise
            except Exception:  # a damaged shard or chunk: which samples, one by one
                items = []
                for r in rows:
                    try:
                        items += store.read_block(r, r + 1, finite=False)
                    except RemoteError:
                        raise
                    except Exception as exc:
                        flag(r, f"unreadable: {str(exc).split(';')[0]}")
            for item in items:
                _check_sample(item, C, (map_h, map_w), lambda what, r=item["row"]: flag(r, what))
            bar.advance(stop - start)
    result.bad_rows = sorted(problems)
    unique = {i for i in ids if i and ids.count(i) == 1} if problems else set()
    result.bad = {(ids[r] if ids[r] in unique else f"{ids[r] or '<empty id>'} (row {r})"): problems[r]
                  for r in result.bad_rows}
    if reset_bad and result.bad_rows:
        def reset():
            group = open_group(path, "r+")
            for j in sorted({int(j) for j in schema.shard_of(result.bad_rows)}):
                start, stop = schema.shard_rows(j)
                group["done"][start:stop] = False

        retrying(reset, str(path), "resetting the done flags of damaged samples in")
    return result


def _check_sample(item: dict, C: int, map_size, flag) -> None:
    for key, a in item.items():
        if not isinstance(a, np.ndarray) or key in ("views/params",):
            continue
        if not all_finite(a):
            flag(f"{key}: {count_non_finite(a)} non-finite values (missing or damaged chunk)")
    for prefix, axis in (("", 0), ("views/", 1)):
        v = item.get(f"{prefix}logits/values")
        i = item.get(f"{prefix}logits/indices")
        if v is None or i is None:
            continue
        if v.size == 0:
            flag(f"{prefix}logits: empty map (extent 0)")
            continue
        if (i.astype(np.int64) >= C).any() or (i.astype(np.int64) < 0).any():
            flag(f"{prefix}logits/indices: class ids outside 0..{C - 1}")
        if v.shape[axis] > 1:
            vf = v.astype(np.float32)
            if (np.diff(vf, axis=axis) > 0).any():
                flag(f"{prefix}logits/values: not sorted descending")
            srt = np.sort(i, axis=axis)
            if (np.diff(srt.astype(np.int64), axis=axis) == 0).any():
                flag(f"{prefix}logits/indices: repeated class ids at one position")
    hw = item["logits/values"].shape[-2:]
    if hw[0] > map_size[0] or hw[1] > map_size[1]:
        flag(f"extent {hw} larger than the map {tuple(map_size)}")
    params = item.get("views/params")
    if params is not None and not np.isfinite(params).all():
        flag("views/params: missing")
