"""Where a teacher cache lives: a local folder, or an fsspec URL (``s3://…``, ``gs://…``,
``memory://…``). The one place that tells the two apart and does what differs between them.

Local stores are read and written through kdcache's own shard files (:mod:`.shards`) and
created in a temporary folder that is renamed into place; remote ones go through zarr's
fsspec store. Object stores use async fsspec file systems that are not fork-safe, so the
DataLoader workers that read them are spawned (``memory://`` lives in the process and forks).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
import zarr
from zarr.storage import FsspecStore, WrapperStore

from kdcache.core.errors import KDCacheError, import_extra

T = TypeVar("T")


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL (``scheme://…``), False for a local path."""
    return "://" in str(path)


def as_location(path: str | Path) -> str | Path:
    """A URL stays a string; a local path becomes a :class:`~pathlib.Path`."""
    return str(path) if is_url(path) else Path(path)


#: pip extras of kdcache that install the fsspec file system of a URL scheme
EXTRAS = {"s3": ("s3", "s3fs")}


def check_client(path: str | Path) -> None:
    """For a URL, check that fsspec's file system for its scheme is installed: one error naming
    the pip extra (``s3://`` needs ``kdcache[s3]``) or the package fsspec asks for."""
    if not is_url(path):
        return
    scheme = str(path).split("://", 1)[0]
    if scheme in EXTRAS:
        extra, module = EXTRAS[scheme]
        import_extra(f"a teacher cache at {path}", extra, module)
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise KDCacheError(f"{path}: fsspec cannot open {scheme}:// URLs ({exc})") from None


def worker_start_method(path: str | Path) -> str | None:
    """DataLoader worker start method for reading the store at ``path``: ``spawn`` for object
    stores (fork-unsafe async file systems), the platform default (None) otherwise."""
    if is_url(path) and not str(path).startswith("memory://"):
        return "spawn"
    return None


def exists(path: str | Path) -> bool:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        return retrying(lambda: fs.exists(p), str(path), "looking up")
    return Path(path).exists()


def is_empty(path: str | Path) -> bool:
    """True when nothing is at ``path`` or it is an empty folder."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        return retrying(lambda: not (fs.exists(p) and fs.ls(p)), str(path), "looking up")
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def remove_tree(path: str | Path) -> None:
    """Delete the folder at ``path`` and everything in it: only kdcache's own temporary folders
    (a store being created); a store is removed with :func:`remove_store`."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        retrying(lambda: fs.exists(p) and fs.rm(p, recursive=True), str(path), "deleting")
        return
    if Path(path).exists():
        shutil.rmtree(path)


def _files(path: str | Path) -> list[str]:
    """Every file under ``path``, as '/'-separated keys relative to it."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        root = p.rstrip("/") + "/"
        found = retrying(lambda: fs.find(p), str(path), "listing")
        return sorted(k[len(root):] for k in found if k.startswith(root))
    out = []
    for folder, _dirs, names in os.walk(path):
        rel = os.path.relpath(folder, path)
        out += [name if rel == "." else f"{Path(rel).as_posix()}/{name}" for name in names]
    return sorted(out)


def store_files(path: str | Path, read: Callable[[str], bytes]) -> tuple[list[str], list[str]]:
    """(the store's own files, every other file) under the store at ``path``: its own are the
    ``zarr.json`` of each node and the chunks and shards under each array's ``c/`` (where kdcache's
    shard writer also leaves its temporary files); ``read(key)``: a file's bytes."""
    keys = _files(path)
    nodes = sorted({k.rpartition("/")[0] for k in keys if k.rpartition("/")[2] == "zarr.json"})
    arrays = []
    for node in nodes:
        try:
            meta = json.loads(read(f"{node}/zarr.json" if node else "zarr.json"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("node_type") == "array":
            arrays.append(f"{node}/c/" if node else "c/")
    own, other = [], []
    for k in keys:
        mine = k.rpartition("/")[2] == "zarr.json" or any(k.startswith(a) for a in arrays)
        (own if mine else other).append(k)
    return own, other


def remove_store(path: str | Path) -> None:
    """Delete the teacher cache at ``path``: its own files (:func:`store_files`) and the folders
    they leave empty. A file anyone else put inside it is never deleted: the store is refused,
    naming that file, before anything is removed."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        root = p.rstrip("/")
        own, other = store_files(path, lambda k: retrying(lambda: fs.cat_file(f"{root}/{k}"), str(path), "reading"))
    else:
        own, other = store_files(path, lambda k: Path(path, k).read_bytes())
    if other:
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise KDCacheError(f"--out {path} is a teacher cache with a file kdcache did not write in it: {other[0]}{more}; "
                           "kdcache never deletes your files: move them out of the store, then rerun")
    if is_url(path):
        if own:
            retrying(lambda: fs.rm([f"{root}/{k}" for k in own]), str(path), "deleting")
        return
    for k in own:
        Path(path, k).unlink(missing_ok=True)
    for folder, _dirs, _names in sorted(os.walk(path, topdown=False), key=lambda w: -len(w[0])):
        try:
            os.rmdir(folder)  # empty ones only: the store's own
        except OSError:
            pass


def delete_key(root: str | Path, key: str) -> None:
    """Remove one object of the store at ``root`` (e.g. a shard file) if it is there."""
    if is_url(root):
        url = f"{str(root).rstrip('/')}/{key}"
        fs, p = fsspec.core.url_to_fs(url)
        retrying(lambda: fs.exists(p) and fs.rm(p), url, "deleting")
    else:
        Path(root, key).unlink(missing_ok=True)


def sizes_of(root: str | Path, keys: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes of the whole store at ``root`` and under each of ``keys`` (folders in it), from one
    walk of a local store (a store of 10⁶ samples holds tens of thousands of files)."""
    if is_url(root):
        return size_of(root), {k: size_of(root, k) for k in keys}
    keyset = {k.strip("/") for k in keys}

    def du(folder: str, rel: str) -> int:  # scandir: one system call per folder, sizes from its entries
        n = 0
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return 0
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    sub = f"{rel}/{e.name}" if rel else e.name
                    got = du(e.path, sub)
                    if sub in keyset:
                        under[sub] = got
                    n += got
                else:
                    n += e.stat(follow_symlinks=False).st_size
            except OSError:
                pass
        return n

    under = dict.fromkeys(keyset, 0)
    total = du(str(root), "")
    return total, {k: under[k.strip("/")] for k in keys}


def size_of(root: str | Path, key: str = "") -> int:
    """Bytes at ``root``/``key``: one file, or everything under a folder (0 when absent)."""
    target = f"{str(root).rstrip('/')}/{key}" if key else str(root)
    if is_url(root):
        fs, p = fsspec.core.url_to_fs(target)
        return retrying(lambda: int(fs.du(p)) if fs.exists(p) else 0, target, "measuring")
    p = Path(target)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(folder, f))
            except OSError:
                pass
    return total


# -- requests to an object store that fail --------------------------------------------------------

#: attempts of a failing request to an object store (each after fsspec's own retries), and the
#: first wait between them in seconds (doubled each time, with jitter)
ATTEMPTS_ENV, BACKOFF_ENV = "KDCACHE_REMOTE_ATTEMPTS", "KDCACHE_REMOTE_BACKOFF"
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs",
                   "google", "azure", "fsspec")


class RemoteError(KDCacheError):
    """A request to an object store that kept failing (after its retries). ``attempts`` and
    ``cause`` (what failed, the URL and the client's error) let an operation around it
    (:func:`retrying`) say it in its own words, naming the object, without trying it again."""

    def __init__(self, message: str, attempts: int | None = None, cause: str | None = None):
        super().__init__(message)
        self.attempts, self.cause = attempts, cause

    def __reduce__(self):  # survives the trip back from a DataLoader worker
        return (type(self), (str(self), self.attempts, self.cause))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` from an object store client may go away on a retry: a 5xx answer, a slow
    or dropped connection; not a missing object, a refused permission or a full disk."""
    if isinstance(exc, KDCacheError) or not getattr(exc, "transient", True):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL)
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in _CLIENT_MODULES and not isinstance(exc, (ValueError, TypeError))


def _policy() -> tuple[int, float]:
    """(attempts, first wait in seconds) of a failing request, from the environment."""
    return max(1, int(os.environ.get(ATTEMPTS_ENV, "5"))), float(os.environ.get(BACKOFF_ENV, "1.0"))


def _wait(first: float, attempt: int) -> float:
    return first * 2 ** (attempt - 1) * (0.5 + random.random())


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _failed(what: str, url: str, attempts: int, cause: str, fix: str = "") -> RemoteError:
    return RemoteError(
        f"{what} {url} failed {attempts} times ({cause}); check that the object store answers (its endpoint, "
        f"e.g. FSSPEC_S3_ENDPOINT_URL, your credentials and the network){fix}. Set {ATTEMPTS_ENV} to retry longer",
        attempts, f"{what} {url}: {cause}")  # the cause an operation around this one names


def retrying(call: Callable[[], T], url: str, what: str, fix: str = "") -> T:
    """``call()``, retried with exponential backoff while it fails with a transient error (see
    :func:`is_transient`) when ``url`` is an object store; after the last attempt a
    :class:`RemoteError` whose one line names ``what``, the URL and the fix. Local paths and
    other errors pass straight through. ``call`` must be safe to repeat (a whole shard written
    again, a read). A request inside it that already failed all its attempts in a
    :class:`RetryingStore` is not tried again: its error is said in ``what``'s words."""
    if not is_url(url) or str(url).startswith("memory://"):
        return call()
    attempts, first = _policy()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except RemoteError as exc:
            if exc.attempts is None:
                raise
            raise _failed(what, url, exc.attempts, exc.cause or "", fix) from None
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise _failed(what, url, attempts, _cause(exc), fix) from None
            time.sleep(_wait(first, attempt))
    raise AssertionError("unreachable")


class RetryingStore(WrapperStore):
    """A zarr store over an object store whose every request (metadata and listings too, not only
    the shards and blocks that :func:`retrying` wraps) is retried with exponential backoff while it
    fails with a transient error, then raises one :class:`RemoteError` naming the object. Each
    request is safe to repeat: a whole object is put again, a byte range read again."""

    def __init__(self, store, url: str = ""):
        super().__init__(store)
        self.url = url.rstrip("/")

    def _with_store(self, store):
        return type(self)(store, self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RetryingStore({self.url!r})"

    async def _again(self, request: str, key: str, call):
        attempts, first = _policy()
        for attempt in range(1, attempts + 1):
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                if attempt == attempts:
                    raise _failed(request, f"{self.url}/{key}" if key else self.url, attempts, _cause(exc)) from None
                await asyncio.sleep(_wait(first, attempt))
        raise AssertionError("unreachable")

    async def get(self, key, prototype, byte_range=None):
        return await self._again("reading", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await self._again("reading", key_ranges[0][0] if key_ranges else "",
                                 lambda: self._store.get_partial_values(prototype, key_ranges))

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key):
        return await self._again("looking up", key, lambda: self._store.exists(key))

    async def is_empty(self, prefix):
        return await self._again("listing", prefix, lambda: self._store.is_empty(prefix))

    async def set(self, key, value):
        await self._again("writing", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key, value):
        await self._again("writing", key, lambda: self._store.set_if_not_exists(key, value))

    async def _set_many(self, values):
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def getsize(self, key):
        return await self._again("measuring", key, lambda: self._store.getsize(key))

    async def delete(self, key):
        await self._again("deleting", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix):
        await self._again("deleting", prefix, lambda: self._store.delete_dir(prefix))

    async def _listed(self, prefix: str, listing):
        async def collect():
            return [k async for k in listing()]

        for key in await self._again("listing", prefix, collect):
            yield key

    def list(self):
        return self._listed("", self._store.list)

    def list_prefix(self, prefix):
        return self._listed(prefix, lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix):
        return self._listed(prefix, lambda: self._store.list_dir(prefix))


def open_group(path: str | Path, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """The Zarr group at ``path``: for an object store, through a :class:`RetryingStore`, so that no
    request to it (metadata included) fails on the first transient error."""
    p = str(path)
    if not is_url(p) or p.startswith("memory://"):
        return zarr.open_group(p, mode=mode, storage_options=storage_options)
    store = FsspecStore.from_url(p, storage_options=storage_options, read_only=mode == "r")
    return zarr.open_group(RetryingStore(store, p), mode=mode, zarr_format=3)  # no v2 documents looked for
