"""``build-teacher-cache``: one teacher pass over a data set split into a Zarr v3 store.

The teacher runs in the main thread; a :class:`ShardWriter` thread behind a bounded queue
gathers each shard's samples, encodes and writes them, and only then marks them done, so the
teacher never waits on compression or disk and an interruption never leaves a sample marked
done that is not complete. Work is split by whole shards: under ``torchrun`` rank r owns shards
r, r + world, …; rank 0 alone creates the store and writes its metadata. A rerun of the same
command resumes: shards whose samples are all done are skipped (left untouched), every other
shard is computed and written again.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import kdcache
from kdcache import distributed
from kdcache.checkpoint import file_sha256, load_weights, read_checkpoint
from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.errors import KDCacheError
from kdcache.evaluation import resolve_run
from kdcache.models import SegModel, build_model, count_parameters
from kdcache.progress import progress_bar
from kdcache.runs import resolve_device
from kdcache.store.layout import (
    ATTR,
    CODECS,
    DEFAULT_CODEC,
    FORMAT,
    SCHEMA_VERSION,
    create_layout,
    differences,
    encode_ids,
    extent_groups,
    identity,
    map_specs,
    samples_per_shard,
)
from kdcache.store.reader import StoreError, read_meta, split_fingerprint
from kdcache.store.shards import fast_reader
from kdcache.targets import FP16_MAX, attention_map, index_dtype, topk_targets
from kdcache.training import default_workers
from kdcache.transforms import Augment, Geometry, Preprocess, apply_geometry, sample_geometry


@dataclass
class CacheBuildConfig:
    weights: str
    out: str
    teacher: str | None = None  # default: the model named in the checkpoint
    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_options: dict = field(default_factory=dict)
    split: str = "train"
    topk: int = 4
    features: tuple[str, ...] = ()
    attention: bool = False  # attention maps of the feature taps, beside the features
    attention_only: bool = False  # attention maps instead of the features
    flip_average: bool = False
    views: int = 0
    view_scale: tuple[float, float] = (0.5, 2.0)
    view_crop: tuple[int, int] | None = None
    view_seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    workers: int | None = None
    limit: int | None = None
    samples_per_shard: int | None = None
    codec: str = DEFAULT_CODEC
    amp: bool = False  # fp16 autocast for the teacher (CUDA only)
    queue_size: int = 8  # batches waiting for the writer

    def validate(self) -> None:
        if self.topk < 1:
            raise KDCacheError(f"--topk must be at least 1, got {self.topk}")
        if self.batch_size < 1:
            raise KDCacheError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.views < 0:
            raise KDCacheError(f"--views must be 0 or more, got {self.views}")
        lo, hi = self.view_scale
        if not 0 < lo <= hi:
            raise KDCacheError(f"--view-scale must be 'lo,hi' with 0 < lo <= hi, got {self.view_scale}")
        if (self.attention or self.attention_only) and not self.features:
            raise KDCacheError("--attention needs --features NAME[,NAME]: the taps whose attention maps to store")
        if self.codec not in CODECS:
            raise KDCacheError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise KDCacheError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")


# -- the teacher side -------------------------------------------------------------------------


def load_teacher(weights: str, teacher: str | None, num_classes: int, taps) -> tuple[SegModel, dict, Path]:
    """The teacher model with its weights, its run config (or {}) and the checkpoint path."""
    ckpt_path, run_config, _ = resolve_run(weights)
    ckpt = read_checkpoint(ckpt_path)
    config = dict(run_config or ckpt.get("config") or {})
    stored = ckpt.get("model") or config.get("model")
    if teacher and stored and teacher != stored:
        raise KDCacheError(f"--teacher {teacher} but {ckpt_path} holds a '{stored}'; drop --teacher or give the right weights")
    name = teacher or stored
    if not name:
        raise KDCacheError(f"{ckpt_path} is a plain state dict: say which architecture it is with --teacher")
    stored_classes = ckpt.get("num_classes") or config.get("num_classes")
    if stored_classes is not None and int(stored_classes) != num_classes:
        raise KDCacheError(
            f"teacher {ckpt_path} predicts {stored_classes} classes but the data set has {num_classes}; "
            "build the cache with a teacher trained on this data set"
        )
    model = build_model(name, num_classes, taps=taps, **config.get("model_options", {}))
    load_weights(model, ckpt_path)
    return model, config, ckpt_path


class TeacherInputs(torch.utils.data.Dataset):
    """Item ``i`` of the data set as the teacher sees it: the preprocessed image and, with
    views, its ``V`` crops (each a :class:`Geometry` drawn from (view seed, i), so every process
    and every rerun draws the same ones)."""

    def __init__(self, dataset, preprocess: Preprocess, views: int = 0, view_aug: Augment | None = None,
                 view_seed: int = 0):
        self.dataset, self.preprocess = dataset, preprocess
        self.views, self.view_aug, self.view_seed = views, view_aug, view_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        image, _ = self.dataset.load(i)
        x = self.preprocess.image_to_tensor(image)
        item = {"index": i, "image": x}
        if self.views:
            rng = np.random.default_rng((self.view_seed, i))
            gs = [sample_geometry(rng, tuple(x.shape[-2:]), self.view_aug) for _ in range(self.views)]
            item["views"] = torch.stack([apply_geometry(x, g, kind="image") for g in gs])
            item["view_params"] = torch.tensor([geometry_row(g) for g in gs], dtype=torch.float32)
        return item


def geometry_row(g: Geometry) -> list[float]:
    return [g.scale, g.top, g.left, g.out_size[0], g.out_size[1], float(g.flip)]


def _collate_inputs(batch: list[dict]) -> list[dict]:
    return batch


@torch.inference_mode()
def teacher_outputs(model: SegModel, x: torch.Tensor, *, flip_average: bool, amp: bool) -> tuple[torch.Tensor, dict]:
    """Teacher logits and tapped features (float32) for a batch; with ``flip_average`` the mean
    of the outputs on ``x`` and on its mirror image, mirrored back (exactly flip-equivariant)."""
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp and x.device.type == "cuda"):
        out = model(x)
        logits = out.logits.float()
        feats = {k: v.float() for k, v in out.features.items()}
        if flip_average:
            out2 = model(x.flip(-1))
            logits = (logits + out2.logits.float().flip(-1)) / 2
            feats = {k: (v + out2.features[k].float().flip(-1)) / 2 for k, v in feats.items()}
    return logits, feats


class NonFiniteTeacher(KDCacheError):
    pass


def encode_outputs(logits: torch.Tensor, feats: dict, k: int, meta: dict, ids: list[str],
                   prefix: str = "") -> list[dict]:
    """One dict per image of a batch: array path -> numpy array (fp16 maps, narrow ids)."""
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    if bool(bad.any()):
        names = [ids[i] for i in torch.nonzero(bad).flatten().tolist()]
        raise NonFiniteTeacher(
            f"the teacher produced non-finite logits (NaN/inf) for {len(names)} samples: {', '.join(names[:10])}; "
            "the cache refuses them. Check the teacher weights and those images (try without --amp)"
        )
    big = logits.abs().flatten(1).amax(1) > FP16_MAX
    if bool(big.any()):
        names = [ids[i] for i in torch.nonzero(big).flatten().tolist()]
        raise NonFiniteTeacher(f"teacher logits exceed fp16's range (±{FP16_MAX:g}) for samples {', '.join(names[:10])}")
    values, indices, tail = topk_targets(logits, k)
    cols = {f"{prefix}logits/values": values.half(), f"{prefix}logits/indices": indices}
    if tail is not None:
        cols[f"{prefix}logits/tail"] = tail.half()
    for tap in meta["features"] if not prefix else meta["views"]["features"]:
        cols[f"{prefix}features/{tap}/values"] = feats[tap].half()
    for tap in meta["attention"] if not prefix else meta["views"]["attention"]:
        cols[f"{prefix}attention/{tap}/values"] = attention_map(feats[tap]).half()
    idx_dtype = np.dtype(meta["dtypes"]["indices"])
    out = []
    host = {p: t.cpu().numpy() for p, t in cols.items()}
    for p, a in host.items():
        if p.endswith("/values") and not np.isfinite(a).all():
            raise NonFiniteTeacher(f"'{p}' of the teacher exceeds fp16's range for some of {', '.join(ids[:10])}")
    for i in range(len(ids)):
        out.append({p: (a[i].astype(idx_dtype) if p.endswith("logits/indices") else a[i]) for p, a in host.items()})
    return out


# -- the writer thread ------------------------------------------------------------------------


class WriteFailed(KDCacheError):
    pass


class ShardWriter:
    """Gathers finished samples per shard and writes each complete shard in a background thread.

    ``put(shard, row, sample)`` queues one encoded sample (bounded queue: the teacher waits only
    if the writer falls ``queue_size`` batches behind). A shard is written — every map array, the
    extents, then ``done`` — once all its samples arrived. ``close()`` writes what is complete
    and drops an incomplete shard (its samples stay not done)."""

    def __init__(self, group, meta: dict, shard_rows: dict[int, tuple[int, int]], queue_size: int, path: str):
        self.group = group
        self.meta = meta
        self.shard_rows = shard_rows
        self.path = path
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.samples_written = 0
        self.shards_written = 0
        self.pending: dict[int, dict[int, dict]] = {}
        self.specs = map_specs(meta)
        self.arrays = {s.path: group[s.path] for s in self.specs}
        self.fast = {s.path: fast_reader(path, s.path, self.arrays[s.path].metadata.to_dict()) for s in self.specs}
        for g in extent_groups(meta):
            self.arrays[f"{g}/hw"] = group[f"{g}/hw"]
        for name in ("done", "image_hw") + (("views/params",) if meta.get("views") else ()):
            self.arrays[name] = group[name]
        self.thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard: int, row: int, sample: dict) -> None:
        if self.error is not None:
            raise self._failure()
        self.queue.put((shard, row, sample))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self._failure()

    def _failure(self) -> KDCacheError:
        exc = self.error
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            why = "the disk is full"
        else:
            why = f"{type(exc).__name__}: {exc}"
        return WriteFailed(
            f"writing the teacher cache {self.path} failed ({why}). Every sample marked done is "
            "complete; free space or fix the cause and rerun the same command to resume"
        )

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            if self.error is not None:
                continue  # keep draining so the teacher never blocks on a dead writer
            shard, row, sample = msg
            got = self.pending.setdefault(shard, {})
            got[row] = sample
            start, stop = self.shard_rows[shard]
            if len(got) == stop - start:
                del self.pending[shard]
                try:
                    self.write_shard(shard, start, stop, got)
                except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                    self.error = exc

    def write_shard(self, shard: int, start: int, stop: int, samples: dict[int, dict]) -> None:
        n = stop - start
        rows = [samples[r] for r in range(start, stop)]
        written = 0
        for spec in self.specs:
            block = np.zeros((n, *spec.shape), dtype=spec.dtype)
            for j, s in enumerate(rows):
                a = s[spec.path]
                block[(j, *(slice(0, d) for d in a.shape))] = a
            fast = self.fast.get(spec.path)
            if fast is not None:  # the shard file replaced whole, atomically
                written += fast.write(start, block)
            else:  # through zarr: a shard left by an interrupted run is replaced, never merged
                self._delete(self._shard_key(spec.path, shard, 1 + len(spec.shape)))
                self.arrays[spec.path][start:stop] = block
                written += self._shard_bytes(spec.path, shard, 1 + len(spec.shape))
        for g in extent_groups(self.meta):
            self.arrays[f"{g}/hw"][start:stop] = np.array([s[f"{g}/hw"] for s in rows], dtype=np.int32)
        self.arrays["image_hw"][start:stop] = np.array([s["image_hw"] for s in rows], dtype=np.int32)
        if self.meta.get("views"):
            self.arrays["views/params"][start:stop] = np.stack([s["views/params"] for s in rows])
        self.arrays["done"][start:stop] = True  # last: the samples are complete
        self.bytes_written += written
        self.samples_written += n
        self.shards_written += 1

    @staticmethod
    def _shard_key(path: str, shard: int, ndim: int) -> str:
        return "/".join([path, "c", str(shard)] + ["0"] * (ndim - 1))

    def _delete(self, key: str) -> None:
        from zarr.core.sync import sync

        sync(self.group.store.delete(key))

    def _shard_bytes(self, path: str, shard: int, ndim: int) -> int:
        try:
            return (Path(self.path) / self._shard_key(path, shard, ndim)).stat().st_size
        except OSError:
            return 0  # not a local store


# -- the build ----------------------------------------------------------------------------------


def _sizes(dataset, preprocess: Preprocess) -> list[tuple[int, int]]:
    if preprocess.resize:
        return [tuple(preprocess.resize)] * len(dataset)
    return [tuple(dataset.image_size(i)) for i in range(len(dataset))]


@torch.inference_mode()
def _probe(model: SegModel, size: tuple[int, int], device: torch.device) -> tuple[tuple[int, int], dict]:
    """Logit map size and feature shapes (channels, h, w) for an input of ``size``."""
    model.eval()
    out = model(torch.zeros(1, 3, *size, device=device))
    return tuple(out.logits.shape[-2:]), {k: tuple(v.shape[1:]) for k, v in out.features.items()}


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def build_teacher_cache(config: CacheBuildConfig, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Build (or resume) the store ``config.out``; returns a summary dict."""
    config.validate()
    d = distributed.init_from_env(resolve_device(config.device))
    device = distributed.local_device(resolve_device(config.device), d)
    try:
        return _build(config, d, device, overwrite=overwrite, show_progress=show_progress and d.is_main)
    finally:
        distributed.shutdown()


def _build(config: CacheBuildConfig, d: distributed.Dist, device: torch.device, *, overwrite: bool,
           show_progress: bool) -> dict:
    out = config.out if is_url(config.out) else Path(config.out)
    ds = build_dataset(config.dataset, config.split, config.data_root, **config.dataset_options)
    ds = limit(ds, config.limit)
    if len(ds) == 0:
        raise KDCacheError(f"split '{config.split}' of {config.dataset} is empty")
    C = ds.num_classes
    if config.topk > C:
        raise KDCacheError(f"--topk {config.topk} is more than the {C} classes of {config.dataset}; use --topk {C} for a dense cache")
    taps = tuple(config.features)
    model, teacher_config, ckpt_path = load_teacher(config.weights, config.teacher, C, taps)
    model.to(device).eval()
    preprocess = Preprocess.from_dict(teacher_config.get("preprocess", {}))

    # what the store will hold ------------------------------------------------------------------
    sizes = _sizes(ds, preprocess)
    max_size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    map_size, feat_shapes = _probe(model, max_size, device)
    stride = [max_size[0] / map_size[0], max_size[1] / map_size[1]]
    store_feats = () if config.attention_only else taps
    store_att = taps if (config.attention or config.attention_only) else ()
    views_meta = None
    if config.views:
        crop = config.view_crop
        if crop is None:
            if len(set(sizes)) > 1:
                raise KDCacheError("the images have different sizes: give --view-crop HxW for the stored views")
            crop = sizes[0]
        vmap, vfeat = _probe(model, tuple(crop), device)
        views_meta = {
            "count": config.views, "scale": list(config.view_scale), "crop": list(crop), "seed": config.view_seed,
            "hflip": True, "map_size": list(vmap),
            "features": {t: {"channels": vfeat[t][0], "map_size": list(vfeat[t][1:])} for t in store_feats},
            "attention": {t: {"map_size": list(vfeat[t][1:])} for t in store_att},
            "params": ["scale", "top", "left", "out_h", "out_w", "flip"],
        }
    ids = ds.ids
    with progress_bar("fingerprint data", total=len(ds), enabled=show_progress, unit="sample") as bar:
        hashes = []
        for i in range(len(ds)):
            hashes.append(ds.content_hash(i))
            bar.advance(1)
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kdcache_version": kdcache.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher": {
            "model": model.name, "weights": str(ckpt_path), "weights_sha256": file_sha256(ckpt_path),
            "model_options": teacher_config.get("model_options", {}), "params": count_parameters(model),
        },
        "num_classes": C,
        "class_names": list(ds.class_names),
        "k": config.topk,
        "tail": "logsumexp of the teacher logits outside the top k" if config.topk < C else None,
        "dtypes": {"values": "float16", "indices": index_dtype(C).name, "tail": "float16", "features": "float16"},
        "stride": stride,
        "map_size": list(map_size),
        "preprocess": preprocess.to_dict(),
        "dataset": {"name": config.dataset, "split": config.split, "options": config.dataset_options,
                    "limit": config.limit, "num_samples": len(ds), "fingerprint": split_fingerprint(ids, hashes),
                    "root": config.data_root},
        "flip_average": config.flip_average,
        "views": views_meta,
        "features": {t: {"channels": feat_shapes[t][0], "map_size": list(feat_shapes[t][1:]),
                         "stride": [max_size[0] / feat_shapes[t][1], max_size[1] / feat_shapes[t][2]]}
                     for t in store_feats},
        "attention": {t: {"map_size": list(feat_shapes[t][1:]),
                          "stride": [max_size[0] / feat_shapes[t][1], max_size[1] / feat_shapes[t][2]]}
                      for t in store_att},
        "codec": config.codec,
        "amp": bool(config.amp and device.type == "cuda"),
    }
    meta["samples_per_shard"] = samples_per_shard(meta, config.samples_per_shard)

    # create, or check the store to resume (rank 0 alone writes) ---------------------------------
    resumed = False
    error = None
    if d.is_main:
        try:
            resumed = _prepare_store(out, meta, ids, hashes, sizes, overwrite=overwrite)
        except KDCacheError as exc:
            error = exc
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise KDCacheError("rank 0 could not prepare the store (see its message)")
    group, stored = read_meta(out, mode="r+")
    diff = differences(identity(stored), identity(meta))
    if diff:
        raise StoreError(f"store {out} does not match this build: {'; '.join(diff)}")
    meta = stored

    # which shards are this process's and still to do ---------------------------------------------
    n, S = len(ds), meta["samples_per_shard"]
    done = np.asarray(group["done"][:], dtype=bool)
    shard_rows = {j: (j * S, min(n, (j + 1) * S)) for j in range(-(-n // S))}
    mine = [j for j in shard_rows if j % d.world_size == d.rank]
    todo = [j for j in mine if not done[shard_rows[j][0]:shard_rows[j][1]].all()]
    already = int(done.sum())
    summary = {"out": str(out), "num_samples": n, "already_done": already, "resumed": resumed,
               "shards_total": len(shard_rows), "shards_todo_this_rank": len(todo), "rank": d.rank,
               "world_size": d.world_size}
    if todo:
        t0 = time.perf_counter()
        writer = _run_teacher(model, ds, preprocess, meta, config, device, group, shard_rows, todo,
                              str(out), show_progress)
        summary.update({"samples_written": writer.samples_written, "bytes_written": writer.bytes_written,
                        "seconds": time.perf_counter() - t0})
    distributed.barrier()
    summary["done"] = int(np.asarray(group["done"][:], dtype=bool).sum())
    return summary


def is_url(path) -> bool:
    return "://" in str(path)


PARTIAL = "kdcache-creating"  # attribute of a remote store whose creation has not finished


def _write_layout(group, meta: dict, ids, hashes) -> None:
    id_bytes, width = encode_ids(ids)
    create_layout(group, meta, len(ids), width)
    group["sample_id"][:] = id_bytes
    group["content_hash"][:] = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes])


def _check_resumable(out, stored: dict, meta: dict) -> None:
    diff = differences(identity(stored), identity(meta))
    if diff:
        raise KDCacheError(
            f"{out} holds a teacher cache built differently, so it cannot be resumed: "
            + "; ".join(diff) + ". Use --overwrite to rebuild it, or another --out"
        )


def _not_a_store(out) -> KDCacheError:
    return KDCacheError(f"--out {out} exists and is not a kdcache teacher cache; kdcache never overwrites "
                        "other data. Choose another --out (or remove it yourself)")


def _prepare_remote_store(url: str, meta: dict, ids, hashes, *, overwrite: bool) -> bool:
    """The same as for a local store, at an fsspec URL (no atomic rename there: a store whose
    creation was interrupted carries the ``kdcache-creating`` attribute and is created again)."""
    import fsspec
    import zarr

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path) and fs.ls(path):
        try:
            _, stored = read_meta(url)
        except StoreError:
            try:
                partial = dict(zarr.open_group(url, mode="r").attrs).get(PARTIAL)
            except Exception:
                partial = None
            if not partial:
                raise _not_a_store(url) from None
            stored = None
        if stored is not None and not overwrite:
            _check_resumable(url, stored, meta)
            return True
        fs.rm(path, recursive=True)
    group = zarr.open_group(url, mode="w")
    group.attrs[PARTIAL] = True
    _write_layout(group, meta, ids, hashes)
    group.attrs.put({ATTR: meta})  # replaces the partial marker: the store is complete
    return False


def _prepare_store(out, meta: dict, ids, hashes, sizes, *, overwrite: bool) -> bool:
    """Create the store (returns False), or check an existing one can be resumed (True)."""
    if is_url(out):
        return _prepare_remote_store(str(out), meta, ids, hashes, overwrite=overwrite)
    if out.exists() and not _is_empty_dir(out):
        try:
            _, stored = read_meta(out)
        except StoreError:
            raise _not_a_store(out) from None
        if not overwrite:
            _check_resumable(out, stored, meta)
            return True
        shutil.rmtree(out)
    if _is_empty_dir(out):
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    import zarr

    group = zarr.open_group(str(tmp), mode="w-")
    _write_layout(group, meta, ids, hashes)
    group.attrs[ATTR] = meta
    os.replace(tmp, out)  # the store appears complete with its metadata, or not at all
    return False


def _run_teacher(model, ds, preprocess, meta, config: CacheBuildConfig, device, group, shard_rows,
                 todo, path: str, show_progress: bool) -> ShardWriter:
    B = config.batch_size
    batches = [list(range(b, min(b + B, stop))) for j in todo
               for start, stop in [shard_rows[j]] for b in range(start, stop, B)]
    shard_of = {r: j for j in todo for r in range(*shard_rows[j])}
    view_aug = (Augment(scale=tuple(config.view_scale), crop=tuple(meta["views"]["crop"]), hflip=True)
                if meta.get("views") else None)
    inputs = TeacherInputs(ds, preprocess, config.views, view_aug, config.view_seed)
    workers = default_workers(device) if config.workers is None else config.workers
    loader = torch.utils.data.DataLoader(inputs, batch_sampler=batches, num_workers=workers,
                                         collate_fn=_collate_inputs, pin_memory=device.type == "cuda")
    writer = ShardWriter(group, meta, shard_rows, config.queue_size * B, path)
    amp = meta["amp"]
    ids = ds.ids
    total = sum(shard_rows[j][1] - shard_rows[j][0] for j in todo)
    try:
        with progress_bar("build teacher cache", total=total, enabled=show_progress, unit="sample") as bar:
            for items in loader:
                for group_items in _same_size_groups(items):
                    rows = [it["index"] for it in group_items]
                    x = torch.stack([it["image"] for it in group_items]).to(device, non_blocking=True)
                    logits, feats = teacher_outputs(model, x, flip_average=config.flip_average, amp=amp)
                    encoded = encode_outputs(logits, feats, meta["k"], meta, [ids[r] for r in rows])
                    for it, enc in zip(group_items, encoded):
                        enc["image_hw"] = tuple(it["image"].shape[-2:])
                        for g in extent_groups(meta):
                            enc[f"{g}/hw"] = enc[f"{g}/values"].shape[-2:]
                    if meta.get("views"):
                        v = torch.cat([it["views"] for it in group_items]).to(device, non_blocking=True)
                        vl, vf = teacher_outputs(model, v, flip_average=config.flip_average, amp=amp)
                        V = config.views
                        venc = encode_outputs(vl, vf, meta["k"], meta, [ids[r] for r in rows for _ in range(V)],
                                              prefix="views/")
                        for j, enc in enumerate(encoded):
                            per = venc[j * V:(j + 1) * V]
                            for p in per[0]:
                                enc[p] = np.stack([q[p] for q in per])
                            enc["views/params"] = group_items[j]["view_params"].numpy()
                    for r, enc in zip(rows, encoded):
                        _check_extent(enc, meta, ids[r])
                        writer.put(shard_of[r], r, enc)
                    bar.advance(len(rows), MB_written=round(writer.bytes_written / 1e6, 2))
    except BaseException:
        writer.queue.put(None)  # write what is complete; the unfinished shard stays not done
        writer.thread.join()
        raise
    writer.close()
    return writer


def _check_extent(enc: dict, meta: dict, sid: str) -> None:
    h, w = meta["map_size"]
    eh, ew = enc["logits/hw"]
    if eh > h or ew > w:
        raise KDCacheError(f"sample {sid}: teacher map {eh}x{ew} is larger than the store's {h}x{w}")


def _same_size_groups(items: list[dict]) -> list[list[dict]]:
    """Consecutive items with images of one size, batched together (others run apart)."""
    groups: list[list[dict]] = []
    for it in items:
        if groups and groups[-1][0]["image"].shape == it["image"].shape:
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


def config_dict(config: CacheBuildConfig) -> dict:
    return asdict(config)
