"""The layout of a teacher cache: a standard Zarr v3 group, described by one :class:`CacheSchema`.

Every array uses only codecs of the Zarr v3 core and its registered extensions (``bytes``,
``blosc`` or ``zstd``, ``crc32c``, ``sharding_indexed``), so any Zarr v3 reader (zarr-python,
tensorstore, zarrs) opens it. The group attribute ``kdcache`` holds the schema's attributes
(``meta``): the format and its version, the provenance (teacher, data set, preprocessing) and
everything below.

```
STORE.zarr/
  done            (n,)            bool     a sample is True only once all its arrays are written
  sample_id       (n, L)          uint8    UTF-8 ids, zero padded
  content_hash    (n, 32)         uint8    SHA-256 of each sample's image and label bytes
  image_hw        (n, 2)          int32    the teacher's input size (after preprocessing)
  logits/values   (n, k, h, w)    float16  top-k raw teacher logits, sorted descending
  logits/indices  (n, k, h, w)    uint8|uint16|uint32   their class ids
  logits/tail     (n, h, w)       float16  logsumexp of the logits outside the top k (absent if k = C)
  logits/hw       (n, 2)          int32    valid extent (h, w) of each sample's maps
  features/<tap>/values (n, c, h, w) float16, features/<tap>/hw   (with --features)
  attention/<tap>/values (n, h, w)   float16, attention/<tap>/hw  (with --attention)
  views/params    (n, V, 7)       float32  each stored view's Geometry, packed (Geometry.PACKED; 6 in stores written before stretch)
  views/logits/…, views/features/…, views/attention/…   the same per view: (n, V, …) (with --views)
```

A *schedule* store (``build-teacher-cache --schedule-epochs E [--schedules R]``) holds V = R·E views
per sample: the crop (scale, offset, flip or random-resized box) a student draws in each epoch
of each schedule, view ``r·E + e`` for epoch ``e`` of schedule ``r`` (``views.schedule`` holds E, R
and the augmentation they were drawn with; ``mix``, when the crops were mixed with a partner's as
``--mix`` mixes them: the views' teacher outputs are on the mixed crops). Where one view's maps are large (``chunks: view``:
at least ``VIEW_CHUNK_BYTES``), its view arrays are chunked one view of one sample per chunk and
sharded by ``samples_per_shard`` samples of one view, so that an epoch reads only its own view
(``c/<shard>/<view>/0/…``); a classifier's tiny views share one chunk per sample.

A *pyramid* store (``--store-scales S,… [--store-flips]``) holds as views the teacher's logits on
the whole image at each other scale (and, with flips, on its mirror at every scale, 1 included);
``views.levels`` gives each view's scale, flip and map size (the arrays are padded to the
largest). A training crop takes the level nearest its own scale and flip.

Maps are stored at the teacher head's native stride, padded to the largest sample's extent
(images of different sizes); ``hw`` says how much of each is valid. Each sample is one chunk
of each map array, except where a sample's map is tiny (a classifier's logits row, its views, a
1x1 map: under ``PACK_SAMPLE_BYTES``): there a chunk packs several consecutive samples
(``packing``: array -> samples per chunk, a divisor of ``samples_per_shard``), so the per-chunk
index entry, checksum and codec header are shared. ``samples_per_shard`` consecutive samples
form a shard, the unit of writing. The small per-sample arrays are chunked by the same sample blocks (no sharding), so
the process that owns a shard owns every byte written for its samples. Missing chunks read as
the fill value: NaN for the float maps, so a lost chunk of a sample marked done is detected.

A sample reads (:mod:`.reader`) as a flat dict keyed by :attr:`MapSpec.key`: ``logits/values``,
``logits/indices`` (widened to a signed type torch indexes with), ``logits/tail``,
``features/<tap>``, ``attention/<tap>``, ``views/params``, ``views/logits/values``, ….
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from kdcache import __version__
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.signals import signal, signal_kinds
from kdcache.store.forms import form_of

FORMAT = "kdcache-teacher-cache"
SCHEMA_VERSION = 1
ATTR = "kdcache"

#: codec name -> compressor chain for inner chunks (crc32c last, so damaged bytes are detected)
CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
#: chosen by measurement: the best compression that still streams faster than a student trains
#: (benchmarks/results/cache-compression-cpu.md, cache-reader-cpu.md)
DEFAULT_CODEC = "blosc-zstd"

#: aim for shards of about this many uncompressed bytes when samples_per_shard is not given
TARGET_SHARD_BYTES = 32 << 20
MAX_SAMPLES_PER_SHARD = 256
#: the most samples a shard may be asked to hold (``--samples-per-shard``): a shard is written whole, and its
#: chunks' packing searches the divisors of its size
MAX_SHARD_SAMPLES = 65536

#: the attributes that must be equal for a rerun to resume a store (everything that changes
#: what is stored); the rest (creation time, code version, data root path) may differ
#: a schedule store chunks its views one per chunk when one view's maps hold at least this many
#: raw bytes (an epoch then reads its own alone); smaller views (a classifier's) share a chunk per
#: sample, whose per-chunk overhead (index entry, checksum, codec header) would outweigh them
VIEW_CHUNK_BYTES = 1024

#: packed chunks: a map array whose one sample holds fewer raw bytes than PACK_SAMPLE_BYTES (a
#: classifier's k logits, its views, 1x1 maps) gets several consecutive samples per chunk, up to
#: PACK_CHUNK_BYTES raw, so that a chunk's fixed costs (its 16-byte shard-index entry, its crc32c,
#: the codec's header) are shared; bigger maps keep one sample per chunk (random access decodes
#: no neighbours). Chosen when a store is created and recorded in its ``packing`` attribute.
PACK_SAMPLE_BYTES = 4096
PACK_CHUNK_BYTES = 64 << 10



def pack_size(sample_bytes: int, samples_per_shard: int) -> int:
    """Samples per chunk for a map array whose one sample holds ``sample_bytes`` raw bytes: 1 from
    PACK_SAMPLE_BYTES up, else the largest divisor of ``samples_per_shard`` within PACK_CHUNK_BYTES."""
    if sample_bytes >= PACK_SAMPLE_BYTES:
        return 1
    return max(d for d in range(1, samples_per_shard + 1)
               if samples_per_shard % d == 0 and d * sample_bytes <= PACK_CHUNK_BYTES)

#: rows per chunk of ``sample_id`` and ``content_hash``, which rank 0 writes once at creation
ID_CHUNK_ROWS = 1 << 16

#: the array of each sample's stored view geometries (read with the views' maps)
VIEW_PARAMS = "views/params"

IDENTITY_KEYS = ("schema_version", "teacher", "num_classes", "class_names", "k", "preprocess",
                 "dataset", "flip_average", "views", "features", "attention", "samples_per_shard",
                 "codec", "map_size", "stride", "amp", "ensemble", "quality", "classification", "packing")

#: stored id type -> the type a read sample holds (torch indexes with signed types)
_READ_IDS = {"uint8": np.uint8, "uint16": np.int32, "uint32": np.int64}


def compressors(codec: str) -> list:
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if codec == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds class ids 0..C-1."""
    if num_classes <= 1 << 8:
        return np.dtype(np.uint8)
    if num_classes <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def fill_value(dtype: str):
    if np.dtype(dtype).kind == "f":
        return float("nan")
    if np.dtype(dtype).kind == "b":
        return False
    return int(np.iinfo(np.dtype(dtype)).max)


def split_fingerprint(ids: Sequence[str], hashes: Sequence[str]) -> str:
    """SHA-256 over a split's sample ids and content hashes, in order."""
    h = hashlib.sha256()
    for i, c in zip(ids, hashes):
        h.update(i.encode("utf-8"))
        h.update(b"\0")
        h.update(c.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def encode_ids(ids: list[str]) -> tuple[np.ndarray, int]:
    raw = [i.encode("utf-8") for i in ids]
    width = max([len(r) for r in raw] + [1])
    out = np.zeros((len(raw), width), dtype=np.uint8)
    for row, r in enumerate(raw):
        out[row, :len(r)] = np.frombuffer(r, dtype=np.uint8)
    return out, width


def decode_ids(arr: np.ndarray) -> list[str]:
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if a.ndim != 2 or a.shape[1] == 0:
        return [bytes(row).rstrip(b"\0").decode("utf-8") for row in a]
    return np.char.decode(a.view(f"S{a.shape[1]}")[:, 0], "utf-8").tolist()  # numpy drops the zero padding


@dataclass(frozen=True)
class MapSpec:
    """One per-sample map array: its path, per-sample shape (view axis included) and dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spatial: bool = True  # has a valid extent recorded in ``<group>/hw``
    kind: str = "logits"  # or the teacher signal (features, attention, …: pipeline/signals.py)

    @property
    def group(self) -> str:
        """``logits``, ``features/<tap>``, ``views/logits``, …: the map group (and its stride)."""
        return self.path.rsplit("/", 1)[0]

    @property
    def key(self) -> str:
        """The key of this array in a read sample: ``features/x/values`` -> ``features/x``."""
        if self.kind != "logits":
            return self.path[: -len("/values")]
        return self.path


def _stride(input_size: Sequence[int], map_size: Sequence[int]) -> list[float]:
    return [input_size[0] / map_size[0], input_size[1] / map_size[1]]


class CacheSchema:
    """Every question about a store's layout, answered from its attributes ``meta``: which
    arrays it holds (:attr:`map_specs`), their strides, the id types, the extents, the shards,
    what a sample with unreadable chunks is replaced by, and whether two builds are the same."""

    def __init__(self, meta: dict):
        self.meta = meta

    # -- a new store ---------------------------------------------------------------------------
    @classmethod
    def new(cls, *, class_names: Sequence[str], k: int, input_size: Sequence[int], map_size: Sequence[int],
            feature_shapes: dict[str, Sequence[int]] | None = None, features: Sequence[str] = (),
            attention: Sequence[str] = (), views: dict | None = None, teacher: dict | None = None,
            dataset: dict | None = None, ids: Sequence[str] = (), hashes: Sequence[str] = (),
            preprocess: dict | None = None, flip_average: bool = False, codec: str = DEFAULT_CODEC,
            amp: bool = False, samples_per_shard: int | None = None, ensemble: dict | None = None,
            quality_rows: Sequence[str] = (), classification: dict | None = None,
            signals: dict[str, Sequence[str]] | None = None, form: str | None = None) -> CacheSchema:
        """The schema of a store for a teacher whose logits on an ``input_size`` input are
        ``map_size`` and whose taps have ``feature_shapes`` (tap -> (c, h, w)).

        ``features``/``attention``: the taps stored as features / attention maps; ``signals``: kind ->
        taps for any registered teacher signal (:mod:`kdcache.pipeline.signals`; ``features`` and
        ``attention`` may be given either way). ``views``:
        ``count``, ``scale``, ``crop``, ``seed``, and the teacher's ``map_size`` and
        ``feature_shapes`` on a crop (None: no views). ``dataset`` (name, split, options,
        limit, root) is completed with the sample count and the fingerprint of ``ids`` and
        ``hashes``. ``ensemble``: the members and the combination of an ensemble or TTA teacher
        (None: one plain teacher, ``teacher``). ``quality_rows``: the names of the teacher
        outputs whose quality each sample records (``quality/…``; none: no quality arrays).
        ``classification`` (a classification data set; None for segmentation): ``targets``, what
        the logits arrays hold: ``logits`` (the classifier's logits on the whole image, 1 x 1) or
        ``label_map`` (its class map before global pooling, pooled over each crop in training).
        ``form``: the cache form's name (:mod:`kdcache.store.forms`), recorded as ``form``."""
        C, shapes = len(class_names), dict(feature_shapes or {})
        taps_of = {"features": tuple(features), "attention": tuple(attention),
                   **{kind: tuple(taps) for kind, taps in (signals or {}).items()}}
        # features and attention are recorded even when empty (as every store has); another kind when used
        taps_of = {kind: taps for kind, taps in taps_of.items() if taps or kind in ("features", "attention")}
        for kind in taps_of:
            signal(kind)  # an unknown kind is refused here
        if not 1 <= k <= C:
            raise ValueError(f"k must be in 1..{C}, got {k}")
        views_meta = None
        if views:
            vshapes = dict(views.get("feature_shapes") or {})
            schedule = views.get("schedule")
            levels = views.get("levels")  # a pyramid: the whole image at other scales / mirrored, logits only
            views_meta = {
                "count": int(views["count"]), "scale": list(views["scale"]), "crop": list(views["crop"]),
                "seed": int(views.get("seed", 0)), "hflip": True, "map_size": list(views["map_size"]),
                **{kind: {} if levels else {t: signal(kind).meta(vshapes[t][0], tuple(vshapes[t][1:])) for t in taps}
                   for kind, taps in taps_of.items()},
                "params": list(Geometry.PACKED),
                "area": list(views["area"]) if views.get("area") else None,  # random-resized crops
            }
            if levels:
                views_meta["levels"] = [{"scale": float(lv["scale"]), "flip": bool(lv["flip"]),
                                         "map_size": [int(v) for v in lv["map_size"]]} for lv in levels]
            if schedule:  # the crops of every epoch of a student's augmentation
                views_meta["schedule"] = {"epochs": int(schedule["epochs"]), "schedules": int(schedule["schedules"]),
                                          **({"first": int(schedule["first"])} if schedule.get("first") else {}),
                                          "augment": dict(schedule["augment"]),
                                          # function matching: the crops mixed as the students mix them
                                          **({"mix": dict(schedule["mix"])} if schedule.get("mix") else {})}
                views_meta["hflip"] = bool(schedule["augment"].get("hflip", True))
        data = dict(dataset or {})
        data.update({"num_samples": len(ids), "fingerprint": split_fingerprint(ids, hashes)})
        meta = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "kdcache_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "teacher": dict(teacher or {}),
            "num_classes": C,
            "class_names": list(class_names),
            "k": k,
            "tail": "logsumexp of the teacher logits outside the top k" if k < C else None,
            "dtypes": {"values": "float16", "indices": index_dtype(C).name, "tail": "float16", "features": "float16"},
            "stride": _stride(input_size, map_size),
            "map_size": list(map_size),
            "preprocess": dict(preprocess or {}),
            "dataset": data,
            "flip_average": bool(flip_average),
            "views": views_meta,
            **{kind: {t: {**signal(kind).meta(shapes[t][0], tuple(shapes[t][1:])),
                          "stride": _stride(input_size, shapes[t][1:])} for t in taps}
               for kind, taps in taps_of.items()},
            "codec": codec,
            "amp": bool(amp),
            "ensemble": ensemble,
            "quality": {"rows": list(quality_rows)} if quality_rows else None,
            "classification": dict(classification) if classification else None,
            **({"form": form} if form else {}),
        }
        schema = cls(meta)
        if views_meta and views_meta.get("schedule"):
            # a view per chunk where a view's maps are large enough for an epoch to gain by reading
            # its own alone; tiny ones (a classifier's k logits) together, one chunk per sample
            per_view = sum(int(np.prod(s.shape[1:])) * np.dtype(s.dtype).itemsize for s in schema.map_specs
                           if s.path.startswith("views/"))
            views_meta["schedule"]["chunks"] = "view" if per_view >= VIEW_CHUNK_BYTES else "sample"
        meta["samples_per_shard"] = schema._shard_size(samples_per_shard)
        meta["packing"] = schema._packing()
        return schema

    def _packing(self) -> dict[str, int]:
        """Samples per chunk of each map array that packs several (see :data:`PACK_SAMPLE_BYTES`):
        the largest divisor of ``samples_per_shard`` whose chunk stays within PACK_CHUNK_BYTES."""
        s = self.samples_per_shard
        out = {}
        for spec in self.map_specs:
            if self.per_view(spec.path):
                continue  # a schedule's views chunked one per chunk stay so: an epoch reads its own
            p = pack_size(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize, s)
            if p > 1:
                out[spec.path] = p
        return out

    def samples_per_chunk(self, path: str) -> int:
        """Consecutive samples one chunk of the map array ``path`` holds (1 unless packed)."""
        return int((self.meta.get("packing") or {}).get(path, 1))

    def _shard_size(self, requested: int | None) -> int:
        if requested is not None:
            if requested < 1:
                raise ValueError("samples per shard must be at least 1")
            return requested
        per_sample = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.map_specs)
        return int(max(1, min(MAX_SAMPLES_PER_SHARD, TARGET_SHARD_BYTES // max(per_sample, 1))))

    # -- what the store is ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def has_tail(self) -> bool:
        return bool(self.meta["tail"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["dataset"]["num_samples"])

    @property
    def samples_per_shard(self) -> int:
        return int(self.meta["samples_per_shard"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """(first row, one past the last row) of ``shard``."""
        s = self.samples_per_shard
        return shard * s, min(self.num_samples, (shard + 1) * s)

    def shard_of(self, rows) -> np.ndarray:
        """The shard of each row."""
        return np.asarray(rows) // self.samples_per_shard

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple(self.meta["map_size"])

    @property
    def stored_index_dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtypes"]["indices"])

    @property
    def read_index_dtype(self) -> np.dtype:
        """The type of class ids in a read sample (uint8, or int32/int64 for the wider ids)."""
        return np.dtype(_READ_IDS[self.meta["dtypes"]["indices"]])

    def signal_taps(self, kind: str, views: bool = False) -> dict[str, dict]:
        """tap -> {channels, map_size, stride} of the stored teacher signal ``kind`` (``features``,
        ``attention``, …), of the base maps or of the stored ``views``."""
        where = (self.views or {}) if views else self.meta
        return dict(where.get(kind) or {})

    @property
    def signals(self) -> dict[str, dict[str, dict]]:
        """kind -> tap -> {…} of every teacher signal the store holds (base maps)."""
        return {kind: taps for kind in signal_kinds() if (taps := self.signal_taps(kind))}

    @property
    def features(self) -> dict[str, dict]:
        """tap -> {channels, map_size, stride} of the stored features."""
        return self.signal_taps("features")

    @property
    def attention(self) -> dict[str, dict]:
        """tap -> {map_size, stride} of the stored attention maps."""
        return self.signal_taps("attention")

    def signal_groups(self) -> list[str]:
        """``<kind>/<tap>`` of every stored teacher signal: the groups a method may require."""
        return [f"{kind}/{tap}" for kind, taps in self.signals.items() for tap in taps]

    @property
    def classification(self) -> dict | None:
        """For a classification store, ``{"targets": "logits" | "label_map"}``; None for segmentation."""
        return self.meta.get("classification") or None

    @property
    def label_map(self) -> bool:
        """The logits arrays hold a classifier's class map, pooled over each crop (ReLabel)."""
        c = self.classification
        return bool(c and c.get("targets") == "label_map")

    @property
    def views(self) -> dict | None:
        return self.meta.get("views") or None

    @property
    def view_count(self) -> int:
        return int(self.views["count"]) if self.views else 0

    @property
    def schedule(self) -> dict | None:
        """A schedule store's ``epochs``, ``schedules`` and ``augment`` (the student augmentation
        its views were drawn with; :meth:`Augment.to_dict`), else None."""
        return (self.views or {}).get("schedule") or None

    @property
    def levels(self) -> list[dict] | None:
        """A pyramid store's levels (``build-teacher-cache --store-scales/--store-flips``): per
        stored view, the scale and flip of the whole image it is the teacher's logits on and its
        map size (the view arrays are padded to the largest); else None."""
        return (self.views or {}).get("levels") or None

    @property
    def schedules_held(self) -> range:
        """The schedules (the students' seeds) a schedule store holds: ``first`` (0 unless built
        with ``--first-schedule``) to ``first + schedules - 1``."""
        first = int(self.schedule.get("first", 0))
        return range(first, first + int(self.schedule["schedules"]))

    def view_of(self, schedule: int, epoch: int) -> int:
        """The view that holds ``epoch`` of ``schedule`` in a schedule store."""
        held, epochs = self.schedules_held, int(self.schedule["epochs"])
        if schedule not in held or not 0 <= epoch < epochs:
            raise ValueError(f"this schedule store holds schedules {held.start}..{held.stop - 1} of {epochs} epochs, "
                             f"not epoch {epoch} of schedule {schedule}")
        return (schedule - held.start) * epochs + epoch

    def per_view(self, path: str) -> bool:
        """Whether the map array ``path`` is chunked one view per chunk (a schedule store's views,
        unless each view is under :data:`VIEW_CHUNK_BYTES`)."""
        sched = self.schedule
        return (bool(sched) and sched.get("chunks", "view") == "view" and path.startswith("views/")
                and path != VIEW_PARAMS)

    @property
    def dataset(self) -> dict:
        """The data set the store was built from: name, split, options, limit, root, …"""
        return dict(self.meta["dataset"])

    @property
    def teacher(self) -> dict:
        """The teacher: model, weights (path when built), weights_sha256, model_options, params."""
        return dict(self.meta["teacher"])

    @property
    def ensemble(self) -> dict | None:
        """The members and combination rule of an ensemble / TTA teacher (None: a plain teacher)."""
        return self.meta.get("ensemble")

    @property
    def members(self) -> list[dict]:
        """Every teacher whose outputs the store holds (model, weights, weights_sha256, …)."""
        e = self.ensemble
        return [dict(m) for m in e["members"]] if e else [self.teacher]

    @property
    def quality_rows(self) -> list[str]:
        """The teacher outputs whose per-sample quality counts the store holds (``quality/…``)."""
        q = self.meta.get("quality")
        return list(q["rows"]) if q else []

    @property
    def preprocess(self) -> dict:
        return dict(self.meta["preprocess"])

    @property
    def amp(self) -> bool:
        return bool(self.meta.get("amp"))

    # -- the arrays ----------------------------------------------------------------------------
    @cached_property
    def map_specs(self) -> list[MapSpec]:
        """Every map array the store holds (base view first, then views)."""
        k = self.k
        h, w = self.map_size
        idx = self.meta["dtypes"]["indices"]
        specs = [MapSpec("logits/values", (k, h, w), "float16"), MapSpec("logits/indices", (k, h, w), idx)]
        if self.has_tail:
            specs.append(MapSpec("logits/tail", (h, w), "float16"))
        for kind, taps in self.signals.items():
            for tap, info in taps.items():
                specs.append(MapSpec(f"{kind}/{tap}/values", signal(kind).shape(info.get("channels", 1),
                                                                                tuple(info["map_size"])),
                                     "float16", kind=kind))
        views = self.views
        if views:
            v = views["count"]
            vh, vw = views["map_size"]
            specs += [MapSpec("views/logits/values", (v, k, vh, vw), "float16", False),
                      MapSpec("views/logits/indices", (v, k, vh, vw), idx, False)]
            if self.has_tail:
                specs.append(MapSpec("views/logits/tail", (v, vh, vw), "float16", False))
            for kind in signal_kinds():
                for tap, info in self.signal_taps(kind, views=True).items():
                    shape = signal(kind).shape(info.get("channels", 1), tuple(info["map_size"]))
                    specs.append(MapSpec(f"views/{kind}/{tap}/values", (v, *shape), "float16", False, kind=kind))
        return specs

    @cached_property
    def extent_groups(self) -> list[str]:
        """Groups of the base view whose maps have a per-sample valid extent (``<group>/hw``)."""
        return sorted({s.group for s in self.map_specs if s.spatial})

    @property
    def strides(self) -> dict[str, tuple[float, float]]:
        """The nominal stride (input pixels per map cell) of each base map group: ``logits``,
        ``features/<tap>``, ``attention/<tap>``."""
        out = {"logits": tuple(self.meta["stride"])}
        for kind, taps in self.signals.items():
            for tap, info in taps.items():
                out[f"{kind}/{tap}"] = tuple(info["stride"])
        return out

    def create_arrays(self, group, id_width: int) -> None:
        """Create every array of this store in the (empty) zarr ``group``."""
        n, s = self.num_samples, self.samples_per_shard
        comp = compressors(self.meta["codec"])

        def small(name, shape, dtype, fill):
            group.create_array(name, shape=(n, *shape), dtype=dtype, chunks=(s, *shape), fill_value=fill,
                               compressors=comp)

        small("done", (), "bool", False)
        # written once, by rank 0 when it creates the store: large chunks (few files to open)
        for name, width in (("sample_id", id_width), ("content_hash", 32)):
            group.create_array(name, shape=(n, width), dtype="uint8", chunks=(max(1, min(n, ID_CHUNK_ROWS)), width),
                               fill_value=0, compressors=comp)
        small("image_hw", (2,), "int32", 0)
        for spec in self.map_specs:
            one = (1, *spec.shape[1:]) if self.per_view(spec.path) else spec.shape  # a chunk: one view, or all
            group.create_array(spec.path, shape=(n, *spec.shape), dtype=spec.dtype,
                               chunks=(self.samples_per_chunk(spec.path), *one),
                               shards=(s, *one), fill_value=fill_value(spec.dtype), compressors=comp)
        for g in self.extent_groups:
            small(f"{g}/hw", (2,), "int32", 0)
        if self.views:
            small("views/params", (self.view_count, len(self.views.get("params") or Geometry.PACKED)), "float32",
                  float("nan"))
        R = len(self.quality_rows)
        if R:
            for name, shape, dtype in self.quality_arrays():
                small(name, shape, dtype, 0)

    def quality_arrays(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(path, per-sample shape, dtype) of the teacher-quality arrays: per row, intersection,
        prediction and label pixels per class; the labels' summed NLL; the grid cells agreeing
        with the combination; and the sample's grid cells."""
        R, C = len(self.quality_rows), self.num_classes
        if not R:
            return []
        return [("quality/counts", (R, 3, C), "int32"), ("quality/nll", (R,), "float64"),
                ("quality/agree", (R,), "int32"), ("quality/cells", (), "int32")]

    # -- a sample that cannot be read --------------------------------------------------------------
    def select(self, groups: Iterable[str] | None) -> list[MapSpec]:
        """The map arrays of ``groups`` (``logits``, ``features/<tap>``, ``views/logits``, …;
        None: every one)."""
        if groups is None:
            return self.map_specs
        wanted = set(groups)
        return [s for s in self.map_specs if s.group in wanted]

    def groups_for(self, required: Iterable[str], views: bool = False) -> set[str]:
        """The map groups a training item reads for KD methods that require ``required``
        (``logits``, ``features/<tap>``, ``attention/<tap>``): those of the base maps (and a
        pyramid's levels' logits), or with
        ``views`` those of the stored views plus ``views/params`` (each view's geometry). A
        group the store lacks is left out (the method that needs it says so when it runs)."""
        have = {s.group for s in self.map_specs}
        prefix = "views/" if views else ""
        out = {prefix + r for r in required if prefix + r in have}
        if views:
            out.add(VIEW_PARAMS)
        elif self.levels and "logits" in out:
            out.add("views/logits")  # a pyramid's levels: each crop takes the nearest (target_geometry.level_targets)
        return out

    def placeholder_targets(self, groups: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Zero targets shaped like one read sample's (1 x 1 maps; views at their size, each the
        identity geometry of the view crop), for a sample whose chunks cannot be read: the
        geometry gives them the right size, and the caller ignores every cell. ``groups`` as
        for :meth:`select` (and ``views/params``)."""
        idx = torch.from_numpy(np.zeros(0, dtype=self.read_index_dtype)).dtype
        k = self.k
        out = {"logits/values": torch.zeros(k, 1, 1, dtype=torch.float16),
               "logits/indices": torch.zeros(k, 1, 1, dtype=idx)}
        if self.has_tail:
            out["logits/tail"] = torch.zeros(1, 1, dtype=torch.float16)
        for kind, taps in self.signals.items():
            for tap, info in taps.items():
                out[f"{kind}/{tap}"] = torch.zeros(signal(kind).shape(info.get("channels", 1), (1, 1)),
                                                   dtype=torch.float16)
        views = self.views
        if views:
            V, crop = self.view_count, tuple(views["crop"])
            identity = Geometry(crop, 1.0, 0, 0, crop, False).pack()[:len(views.get("params") or Geometry.PACKED)]
            out["views/params"] = torch.tensor([identity] * V, dtype=torch.float32)
            for spec in self.map_specs:
                if spec.path.startswith("views/"):
                    dtype = idx if spec.path.endswith("indices") else torch.float16
                    out[spec.key] = torch.zeros(spec.shape, dtype=dtype)
        if groups is not None:
            keep = {spec.key for spec in self.select(groups)} | ({VIEW_PARAMS} & set(groups))
            out = {key: v for key, v in out.items() if key in keep}
        return out

    # -- is it the same store? -------------------------------------------------------------------
    def identity(self) -> dict:
        """The attributes that must agree for a rerun to resume this store."""
        out = {k: self.meta.get(k) for k in IDENTITY_KEYS}
        out.update({kind: self.meta.get(kind) or None for kind in signal_kinds()[2:]})  # a signal added later
        out["packing"] = out["packing"] or {}  # a store from before packing: nothing packed
        ds = dict(out["dataset"] or {})
        ds.pop("root", None)
        out["dataset"] = ds
        teacher = dict(out["teacher"] or {})
        teacher.pop("weights", None)  # the path may move; the hash is what matters
        out["teacher"] = teacher
        if out["ensemble"]:
            ens = dict(out["ensemble"])
            ens["members"] = [{k: v for k, v in m.items() if k != "weights"} for m in ens["members"]]
            out["ensemble"] = ens
        return out

    def differences(self, wanted: CacheSchema) -> list[str]:
        """Human-readable differences of identity between this (stored) schema and ``wanted``."""
        return _differences(self.identity(), wanted.identity())

    # -- inspect-cache's provenance ----------------------------------------------------------------
    def describe(self) -> list[tuple[str, str]]:
        """(label, text) rows: what this store is and where it comes from."""
        m = self.meta
        ds = self.dataset
        views = self.views
        return [
            ("schema", f"{m['format']} v{m['schema_version']} (Zarr v3), kdcache {m['kdcache_version']}, "
                       f"created {m['created']}"),
            *self._describe_teacher(),
            ("data", f"{ds['name']} split '{ds['split']}' ({ds['num_samples']} samples), fingerprint "
                     f"{ds['fingerprint'][:16]}…" + (f", options {ds['options']}" if ds.get("options") else "")),
            ("classes", f"{self.num_classes}: {', '.join(self.class_names[:8])}{' …' if self.num_classes > 8 else ''}"),
            ("top-k", f"k = {self.k}{' (dense)' if self.k == self.num_classes else ''}, values "
                      f"{m['dtypes']['values']}, ids {m['dtypes']['indices']}, tail "
                      f"{'stored' if self.has_tail else 'none (dense)'}"),
            ("maps", f"{self.map_size[0]}x{self.map_size[1]} at stride {m['stride'][0]:g}x{m['stride'][1]:g}"),
            ("preprocess", f"resize {self.preprocess.get('resize') or 'none (native size)'}, mean "
                           f"{self.preprocess.get('mean')}, std {self.preprocess.get('std')}"),
            ("flip-average", "yes" if m["flip_average"] else "no"),
            *([("task", "classification: " + ("the class map before pooling, pooled over each crop (label map)"
                                              if self.label_map else "the classifier's logits"))]
              if self.classification else []),
            ("views", form_of(self).describe() if views else "none"),
            *((kind, ", ".join(signal(kind).describe(t, info) for t, info in self.signal_taps(kind).items())
               or "none") for kind in signal_kinds() if kind in ("features", "attention") or self.signal_taps(kind)),
            ("codec", f"{m['codec']} + crc32c, sharded by {self.samples_per_shard} samples"
                      + (", packed: " + ", ".join(f"{p} {n} per chunk" for p, n in sorted(m["packing"].items()))
                         if m.get("packing") else ", a chunk per sample")),
        ]

    def _describe_teacher(self) -> list[tuple[str, str]]:
        e = self.ensemble
        if not e:
            t = self.teacher
            return [("teacher", f"{t['model']} ({t['params'] / 1e6:.2f}M params), weights sha256 "
                                f"{t['weights_sha256'][:16]}…"),
                    ("weights file", str(t.get("weights")))]
        rows = [(f"member {j + 1}", f"{m['name']}: {m['model']} ({m['params'] / 1e6:.2f}M params), sha256 "
                                   f"{m['weights_sha256'][:12]}…, {m['weights']}")
                for j, m in enumerate(e["members"])]
        rule = ("mean of probabilities at T = " + f"{e['temperature']:g}" if e["combine"] == "prob"
                else "mean of logits")
        tta = f"scales {','.join(f'{s:g}' for s in e['scales'])}" + (" + flips" if e["flip"] else "")
        rows += [("combination", f"{rule}; {tta}; on {e['grid']}"),
                 ("features from", e["features_from"])]
        return rows

    def raw_bytes_per_pixel(self) -> int:
        """Uncompressed bytes of the top-k logits per map position."""
        return self.k * (2 + self.stored_index_dtype.itemsize) + (2 if self.has_tail else 0)


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: store has {_short(a)}, this build wants {_short(b)}")
    return out


def _short(x) -> str:
    text = str(x)
    return text[:60] + "…" if len(text) > 60 else text

