"""The on-disk layout of a teacher cache: a standard Zarr v3 group.

Every array uses only codecs of the Zarr v3 core and its registered extensions (``bytes``,
``blosc`` or ``zstd``, ``crc32c``, ``sharding_indexed``), so any Zarr v3 reader (zarr-python,
tensorstore, zarrs) opens it. The group attribute ``kdcache`` holds the provenance.

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
  views/params    (n, V, 6)       float32  scale, top, left, out_h, out_w, flip of each stored view
  views/logits/…, views/features/…, views/attention/…   the same per view: (n, V, …) (with --views)
```

Maps are stored at the teacher head's native stride, padded to the largest sample's extent
(images of different sizes); ``hw`` says how much of each is valid. Each sample is one chunk
of each map array; ``samples_per_shard`` consecutive samples form a shard, the unit of
writing. The small per-sample arrays are chunked by the same sample blocks (no sharding), so
the process that owns a shard owns every byte written for its samples. Missing chunks read as
the fill value: NaN for the float maps, so a lost chunk of a sample marked done is detected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

FORMAT = "kdcache-teacher-cache"
SCHEMA_VERSION = 1
ATTR = "kdcache"

#: codec name -> compressor chain for inner chunks (crc32c last, so damaged bytes are detected)
CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
#: chosen by measurement (benchmarks/results/cache-compression-cpu.md, cache-reader-cpu.md):
#: blosc-zstd with byte shuffle stores 1.86x (blosc-lz4 1.44x) and still streams > 2000 samples/s
DEFAULT_CODEC = "blosc-zstd"

#: aim for shards of about this many uncompressed bytes when samples_per_shard is not given
TARGET_SHARD_BYTES = 32 << 20
MAX_SAMPLES_PER_SHARD = 256


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


@dataclass(frozen=True)
class MapSpec:
    """One per-sample map array: its path, per-sample shape (view axis included) and dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spatial: bool = True  # has a valid extent recorded in ``<group>/hw``

    @property
    def group(self) -> str:
        return self.path.rsplit("/", 1)[0]


def map_specs(meta: dict) -> list[MapSpec]:
    """Every map array a store with these attributes holds (base view first, then views)."""
    k = meta["k"]
    h, w = meta["map_size"]
    idx = meta["dtypes"]["indices"]
    specs = [MapSpec("logits/values", (k, h, w), "float16"), MapSpec("logits/indices", (k, h, w), idx)]
    if meta["tail"]:
        specs.append(MapSpec("logits/tail", (h, w), "float16"))
    for tap, f in meta["features"].items():
        specs.append(MapSpec(f"features/{tap}/values", (f["channels"], *f["map_size"]), "float16"))
    for tap, a in meta["attention"].items():
        specs.append(MapSpec(f"attention/{tap}/values", tuple(a["map_size"]), "float16"))
    views = meta.get("views")
    if views:
        v = views["count"]
        vh, vw = views["map_size"]
        specs += [MapSpec("views/logits/values", (v, k, vh, vw), "float16", False),
                  MapSpec("views/logits/indices", (v, k, vh, vw), idx, False)]
        if meta["tail"]:
            specs.append(MapSpec("views/logits/tail", (v, vh, vw), "float16", False))
        for tap, f in views["features"].items():
            specs.append(MapSpec(f"views/features/{tap}/values", (v, f["channels"], *f["map_size"]), "float16", False))
        for tap, a in views["attention"].items():
            specs.append(MapSpec(f"views/attention/{tap}/values", (v, *a["map_size"]), "float16", False))
    return specs


def extent_groups(meta: dict) -> list[str]:
    """Groups of the base view whose maps have a per-sample valid extent (``<group>/hw``)."""
    return sorted({s.group for s in map_specs(meta) if s.spatial})


def fill_value(dtype: str):
    if np.dtype(dtype).kind == "f":
        return float("nan")
    if np.dtype(dtype).kind == "b":
        return False
    return int(np.iinfo(np.dtype(dtype)).max)


def samples_per_shard(meta: dict, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError("samples per shard must be at least 1")
        return requested
    per_sample = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in map_specs(meta))
    return int(max(1, min(MAX_SAMPLES_PER_SHARD, TARGET_SHARD_BYTES // max(per_sample, 1))))


def create_layout(group, meta: dict, num_samples: int, id_width: int) -> None:
    """Create every array of a store described by ``meta`` in the (empty) zarr ``group``."""
    n = num_samples
    s = meta["samples_per_shard"]
    comp = compressors(meta["codec"])
    group.create_array("done", shape=(n,), dtype="bool", chunks=(s,), fill_value=False, compressors=comp)
    group.create_array("sample_id", shape=(n, id_width), dtype="uint8", chunks=(s, id_width), fill_value=0, compressors=comp)
    group.create_array("content_hash", shape=(n, 32), dtype="uint8", chunks=(s, 32), fill_value=0, compressors=comp)
    group.create_array("image_hw", shape=(n, 2), dtype="int32", chunks=(s, 2), fill_value=0, compressors=comp)
    for spec in map_specs(meta):
        group.create_array(
            spec.path, shape=(n, *spec.shape), dtype=spec.dtype, chunks=(1, *spec.shape),
            shards=(s, *spec.shape), fill_value=fill_value(spec.dtype), compressors=comp,
        )
    for g in extent_groups(meta):
        group.create_array(f"{g}/hw", shape=(n, 2), dtype="int32", chunks=(s, 2), fill_value=0, compressors=comp)
    if meta.get("views"):
        v = meta["views"]["count"]
        group.create_array("views/params", shape=(n, v, 6), dtype="float32", chunks=(s, v, 6),
                           fill_value=float("nan"), compressors=comp)


def encode_ids(ids: list[str]) -> tuple[np.ndarray, int]:
    raw = [i.encode("utf-8") for i in ids]
    width = max([len(r) for r in raw] + [1])
    out = np.zeros((len(raw), width), dtype=np.uint8)
    for row, r in enumerate(raw):
        out[row, :len(r)] = np.frombuffer(r, dtype=np.uint8)
    return out, width


def decode_ids(arr: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in np.asarray(arr, dtype=np.uint8)]


#: the attributes that must be equal for a rerun to resume a store (everything that changes
#: what is stored); the rest (creation time, code version, data root path) may differ
IDENTITY_KEYS = ("schema_version", "teacher", "num_classes", "class_names", "k", "preprocess",
                 "dataset", "flip_average", "views", "features", "attention", "samples_per_shard",
                 "codec", "map_size", "stride", "amp")


def identity(meta: dict) -> dict:
    out = {k: meta.get(k) for k in IDENTITY_KEYS}
    ds = dict(out["dataset"] or {})
    ds.pop("root", None)
    out["dataset"] = ds
    teacher = dict(out["teacher"] or {})
    teacher.pop("weights", None)  # the path may move; the hash is what matters
    out["teacher"] = teacher
    return out


def differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts (nested keys joined by dots)."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: store has {_short(a)}, this build wants {_short(b)}")
    return out


def _short(x) -> str:
    text = str(x)
    return text[:60] + "…" if len(text) > 60 else text
