"""A fast read and write path for the shards of a teacher cache, on a local disk or at a URL.

zarr-python decodes each inner chunk through its asyncio codec pipeline, at a fixed cost a chunk
whatever its size; with one chunk per sample per array that cost bounds a reader's samples per
second per core (benchmarks/results/cache-reader-cpu.md has the read rates). The stores kdcache writes use
one fixed, standard layout (Zarr v3 ``sharding_indexed``: inner chunks ``bytes`` (little
endian) → blosc/zstd → ``crc32c``; the index, at the end, ``bytes`` → ``crc32c``), so a local
shard can be read with one file read and decoded chunk by chunk with numcodecs directly, the
checksums checked as zarr checks them. Writing is the mirror image: each chunk compressed and
checksummed with numcodecs, the shard assembled in memory and written to a temporary file
that is renamed over the shard (so a killed writer never leaves a torn shard); at a URL, one PUT
of the whole object, which an object store replaces whole (zarr's sharding codec would first read
the shard it replaces: a HEAD and a LIST for a missing one). Encoding through zarr's pipeline is
slow enough to take the CPU from the teacher on a small machine. :func:`fast_reader` returns a
:class:`ShardFile` only for arrays whose metadata is exactly that layout; anything else goes
through zarr. Tests check that zarr reads what this writes and that both read paths give
identical arrays.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import fsspec
import google_crc32c
import numpy as np
from numcodecs import blosc
from numcodecs.zstd import Zstd

from kdcache.store.location import is_url

_MISSING = 2**64 - 1  # the offset (and size) of a chunk never written, as sharding_indexed writes it
#: parsed shard indices a reader keeps (random access reads a sample's chunk without reading and
#: checking its shard's index again): 1024 of 256 chunks are 4 MB
INDEX_CACHE = 1024


class DamagedShard(OSError):
    """A shard file that is missing, truncated or fails its checksums."""

    transient = False  # not retried (:func:`kdcache.store.location.is_transient`)


def _crc_ok(payload: bytes | memoryview, stored: bytes | memoryview) -> bool:
    return google_crc32c.value(bytes(payload)) == int.from_bytes(bytes(stored), "little")


class ShardFile:
    """Reads and writes the shards of one sharded array in kdcache's layout."""

    def __init__(self, root: Path | str, path: str, meta: dict, fs=None):
        #: an fsspec file system for a store at a URL (a whole shard is one request); None: local
        self.fs = fs
        self.dir = f"{str(root).rstrip('/')}/{path}/c" if fs is not None else Path(root) / path / "c"
        self.shape = tuple(meta["shape"])
        sharding = meta["codecs"][0]["configuration"]
        self.chunk_shape = tuple(sharding["chunk_shape"])
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        #: samples per shard; samples per chunk (more than 1 in a packed array), chunks per shard
        self.per_shard = self.shard_shape[0]
        self.per_chunk = self.chunk_shape[0]
        self.chunks = self.per_shard // self.per_chunk
        self.compressor = sharding["codecs"][1]["name"] if len(sharding["codecs"]) == 3 else None
        self.compressor_conf = sharding["codecs"][1].get("configuration", {}) if self.compressor else {}
        self.index_bytes = 16 * self.chunks + 4
        #: a schedule store's views: one view of one sample per chunk, a shard file per view
        self.per_view = (len(self.shape) >= 2 and self.shape[1] > 1 and self.chunk_shape[1] == 1
                         and self.shard_shape[1] == 1)
        self.views = self.shape[1] if self.per_view else 1
        self.ndim = len(self.shape)
        self._zstd = Zstd(level=self.compressor_conf.get("level", 0)) if self.compressor == "zstd" else Zstd()
        #: each local shard's checked index, by path, with the (inode, size, mtime) it was read at: a shard
        #: written again (renamed over, or changed in place) is a miss and its index is read again
        self._indices: OrderedDict[str, tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()

    def shard_path(self, shard: int, view: int = 0) -> Path | str:
        if self.fs is not None:
            return self._shard_key(shard, view)
        return Path(self._shard_key(shard, view))

    def _shard_key(self, shard: int, view: int = 0) -> str:
        """The shard's file as a string (a pathlib join per read cost as much as opening the file)."""
        parts = [str(shard), str(view), *(["0"] * (self.ndim - 2))] if self.per_view else \
            [str(shard), *(["0"] * (self.ndim - 1))]
        return "/".join([str(self.dir), *parts])

    def reads_whole(self, rows: list[int]) -> bool:
        """Whether reading ``rows`` of one shard fetches the whole shard file (a quarter or more
        of its samples): one request; fewer are read chunk by chunk."""
        return len(rows) * 4 >= self.per_shard

    def read(self, rows: list[int], view: int | None = None) -> np.ndarray:
        """Samples ``rows`` (all in one shard), stacked: [len(rows), *chunk_shape[1:]]. At a
        URL only whole-shard reads (:meth:`reads_whole`) take this path. An array chunked per
        view reads ``view`` alone ([len(rows), 1, …]), or every view (None)."""
        if self.per_view and view is None:
            return np.concatenate([self.read(rows, v) for v in range(self.views)], axis=1)
        shard = rows[0] // self.per_shard
        out = np.empty((len(rows), *self.chunk_shape[1:]), dtype=self.dtype)
        if self.fs is not None:
            path = self.shard_path(shard, view or 0)
            try:
                data = memoryview(self.fs.cat_file(path))
            except FileNotFoundError:
                raise DamagedShard(f"shard {path} is missing (lost, or never written)") from None
            return self._decode_rows(data, len(data), rows, path, out)
        path = self._shard_key(shard, view or 0)
        if self.reads_whole(rows):
            try:
                with open(path, "rb") as f:
                    data = memoryview(f.read())
            except FileNotFoundError:
                raise DamagedShard(f"shard {path} is missing (lost, or never written)") from None
            return self._decode_rows(data, len(data), rows, path, out)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedShard(f"shard {path} is missing (lost, or never written)") from None
        try:
            st = os.fstat(fd)

            def fetch(off: int, nbytes: int) -> memoryview:
                return memoryview(os.pread(fd, nbytes, off))

            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._indices.get(path)
            if cached is not None and cached[0] == stamp:
                index = cached[1]
                self._indices.move_to_end(path)
            else:
                index = self._read_index(fetch, st.st_size, path)
                self._indices[path] = (stamp, index)
                if len(self._indices) > INDEX_CACHE:
                    self._indices.popitem(last=False)
            return self._decode_rows(None, st.st_size, rows, path, out, fetch, index)
        finally:
            os.close(fd)

    def _read_index(self, fetch, size: int, path) -> np.ndarray:
        """The index of a shard of ``size`` bytes, its checksum checked: [chunks, 2] (offset, bytes)."""
        if size < self.index_bytes:
            raise DamagedShard(f"shard {path} is truncated ({size} bytes)")
        raw_index = fetch(size - self.index_bytes, self.index_bytes)
        if len(raw_index) != self.index_bytes or not _crc_ok(raw_index[:-4], raw_index[-4:]):
            raise DamagedShard(f"shard {path} has a damaged index (checksum mismatch or truncated)")
        return np.frombuffer(raw_index[:-4], dtype="<u8").reshape(self.chunks, 2)

    def _decode_rows(self, data: memoryview | None, size: int, rows: list[int], path, out: np.ndarray,
                     fetch=None, index: np.ndarray | None = None) -> np.ndarray:
        """Check and decode ``rows`` of a shard of ``size`` bytes: from ``data`` (the whole
        file) or, chunk by chunk, from ``fetch(offset, nbytes)``; ``index``: the shard's index,
        checked when it was read (None: read and checked here)."""
        if data is not None:
            def fetch(off: int, nbytes: int) -> memoryview:
                return data[off:off + nbytes]
        if index is None:
            index = self._read_index(fetch, size, path)
        P, first = self.per_chunk, (rows[0] // self.per_shard) * self.per_shard
        # (offset, bytes) per chunk as Python ints: the whole index converted at once for a block, the
        # chunks' own entries for a few rows (a shard of 256 chunks converts in tens of microseconds)
        entries = index.tolist() if len(rows) * 8 >= len(index) else None
        decoded: dict[int, np.ndarray] = {}  # chunk -> its samples (a packed chunk holds P)
        for j, r in enumerate(rows):
            c, at = divmod(r - first, P)
            if c not in decoded:
                off, nbytes = entries[c] if entries is not None else index[c].tolist()
                if off == _MISSING:
                    raise DamagedShard(f"shard {path} has no chunk for row {r} (lost, or never written)")
                if off + nbytes > size:
                    raise DamagedShard(f"shard {path}: chunk of row {r} runs past the end of the file")
                raw = fetch(off, nbytes)
                if not _crc_ok(raw[:-4], raw[-4:]):
                    raise DamagedShard(f"shard {path}: chunk of row {r} fails its crc32c checksum")
                decoded[c] = self._decode(raw[:-4]).reshape(self.chunk_shape)
            out[j] = decoded[c][at]
        return out

    def _decode(self, payload: memoryview) -> np.ndarray:
        if self.compressor == "blosc":
            buf = blosc.decompress(bytes(payload))
        elif self.compressor == "zstd":
            buf = self._zstd.decode(bytes(payload))
        else:
            buf = bytes(payload)
        return np.frombuffer(buf, dtype=self.dtype)


    def _encode(self, chunk: np.ndarray) -> bytes:
        buf = np.ascontiguousarray(chunk, dtype=self.dtype)
        if self.compressor == "blosc":
            c = self.compressor_conf
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c.get("shuffle", "shuffle")]
            payload = blosc.compress(buf, c["cname"].encode(), int(c["clevel"]), shuffle,
                                     int(c.get("blocksize", 0)), int(c.get("typesize", buf.itemsize)))
        elif self.compressor == "zstd":
            payload = self._zstd.encode(buf)
        else:
            payload = buf.tobytes()
        payload = bytes(payload)
        return payload + google_crc32c.value(payload).to_bytes(4, "little")

    def write(self, start: int, block: np.ndarray) -> int:
        """Write ``block`` (rows ``start``..) as one whole shard (a file per view for an array
        chunked per view); returns the bytes written."""
        shard, rem = divmod(start, self.per_shard)
        if rem or len(block) > self.per_shard:
            raise ValueError(f"a shard write must start at a shard boundary, got row {start}")
        if self.per_view:
            return sum(self._write_file(self.shard_path(shard, v), block[:, v:v + 1]) for v in range(self.views))
        return self._write_file(self.shard_path(shard), block)

    def _write_file(self, path: Path, block: np.ndarray) -> int:
        index = np.full((self.chunks, 2), np.uint64(_MISSING), dtype="<u8")
        parts, offset = [], 0
        P = self.per_chunk
        for j in range(0, len(block), P):  # chunks past the array's last sample stay missing, as zarr leaves them
            chunk = block[j:j + P]
            if len(chunk) < P:  # the array's last chunk, padded to the chunk shape as zarr does
                chunk = np.concatenate([chunk, np.zeros((P - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            raw = self._encode(chunk)
            index[j // P] = (offset, len(raw))
            parts.append(raw)
            offset += len(raw)
        ib = index.tobytes()
        parts.append(ib + google_crc32c.value(ib).to_bytes(4, "little"))
        if self.fs is not None:  # an object store: one PUT, which replaces the object whole
            self.fs.pipe_file(path, b"".join(parts))
            return offset + len(parts[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
        return offset + len(parts[-1])


def fast_reader(root: str | Path, path: str, array_meta: dict, storage_options: dict | None = None
                ) -> ShardFile | None:
    """A :class:`ShardFile` if ``array_meta`` (the array's zarr.json) is exactly kdcache's
    sharded layout with one sample (or a packed run of samples) per chunk, or one view of one sample
    sharded by view; None
    otherwise. A store at an fsspec URL gets one
    that reads whole shards in one request each (``storage_options`` as for the store)."""
    fs = None
    if is_url(root):
        fs, root = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    try:
        codecs = array_meta["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        if conf.get("index_location", "end") != "end" or index != ["bytes", "crc32c"]:
            return None
        if inner not in (["bytes", "blosc", "crc32c"], ["bytes", "zstd", "crc32c"], ["bytes", "crc32c"]):
            return None
        for c in conf["codecs"][:1] + conf["index_codecs"][:1]:
            if (c.get("configuration") or {}).get("endian", "little") != "little":
                return None
        shape, chunk = list(array_meta["shape"]), list(conf["chunk_shape"])
        grid = list(array_meta["chunk_grid"]["configuration"]["chunk_shape"])
        if chunk[0] < 1 or grid[0] % chunk[0]:
            return None
        whole = chunk[1:] == shape[1:] and grid[1:] == shape[1:]  # a sample (or packed samples) per chunk
        one_view = len(shape) >= 2 and chunk[1:] == [1, *shape[2:]] and grid[1:] == [1, *shape[2:]]  # a view per chunk
        if not (whole or one_view):
            return None
        if array_meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/":
            return None
        return ShardFile(root if fs is not None else Path(root), path, array_meta, fs)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def read_whole_plain(root: str | Path, path: str, array_meta: dict) -> np.ndarray | None:
    """The whole of a small, unsharded array of a local store (``done``, ``sample_id``, extents:
    chunked by blocks of samples), read file by file and decoded with numcodecs, each chunk's
    crc32c checked; None for a layout this does not know (zarr reads it then). zarr's per-chunk
    overhead adds up over the thousands of chunks of a large store's ``done`` flags."""
    if is_url(root):
        return None
    try:
        codecs = [c["name"] for c in array_meta["codecs"]]
        if codecs not in (["bytes", "blosc", "crc32c"], ["bytes", "zstd", "crc32c"], ["bytes", "crc32c"]):
            return None
        if (array_meta["codecs"][0].get("configuration") or {}).get("endian", "little") != "little":
            return None
        if array_meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/":
            return None
        shape = tuple(array_meta["shape"])
        chunk = tuple(array_meta["chunk_grid"]["configuration"]["chunk_shape"])
        if chunk[1:] != shape[1:]:
            return None
        dtype = np.dtype(array_meta["data_type"]).newbyteorder("<")
        fill = array_meta.get("fill_value")
        compressor = codecs[1] if len(codecs) == 3 else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    out = np.empty(shape, dtype=dtype)
    rows = chunk[0]
    zstd = Zstd()
    tail = ["0"] * (len(shape) - 1)
    for j in range(-(-shape[0] // rows)):
        lo, hi = j * rows, min(shape[0], (j + 1) * rows)
        file = Path(root, path, "c", str(j), *tail)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            out[lo:hi] = np.nan if fill == "NaN" else fill
            continue
        if len(raw) < 4 or not _crc_ok(raw[:-4], raw[-4:]):
            raise DamagedShard(f"chunk {file} fails its crc32c checksum")
        payload = raw[:-4]
        buf = blosc.decompress(payload) if compressor == "blosc" else zstd.decode(payload) if compressor == "zstd" \
            else payload
        out[lo:hi] = np.frombuffer(buf, dtype=dtype).reshape(chunk)[:hi - lo]
    return out
