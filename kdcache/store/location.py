"""Where a teacher cache lives: a local folder, or an fsspec URL (``s3://…``, ``gs://…``,
``memory://…``). The one place that tells the two apart and does what differs between them.

Local stores are read and written through kdcache's own shard files (:mod:`.shards`) and
created in a temporary folder that is renamed into place; remote ones go through zarr's
fsspec store. Object stores use async fsspec file systems that are not fork-safe, so the
DataLoader workers that read them are spawned (``memory://`` lives in the process and forks).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fsspec


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL (``scheme://…``), False for a local path."""
    return "://" in str(path)


def as_location(path: str | Path) -> str | Path:
    """A URL stays a string; a local path becomes a :class:`~pathlib.Path`."""
    return str(path) if is_url(path) else Path(path)


def worker_start_method(path: str | Path) -> str | None:
    """DataLoader worker start method for reading the store at ``path``: ``spawn`` for object
    stores (fork-unsafe async file systems), the platform default (None) otherwise."""
    if is_url(path) and not str(path).startswith("memory://"):
        return "spawn"
    return None


def exists(path: str | Path) -> bool:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        return fs.exists(p)
    return Path(path).exists()


def is_empty(path: str | Path) -> bool:
    """True when nothing is at ``path`` or it is an empty folder."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        return not (fs.exists(p) and fs.ls(p))
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def remove_tree(path: str | Path) -> None:
    """Delete the store at ``path`` and everything in it (callers check it is a store first)."""
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(str(path))
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    if Path(path).exists():
        shutil.rmtree(path)


def delete_key(root: str | Path, key: str) -> None:
    """Remove one object of the store at ``root`` (e.g. a shard file) if it is there."""
    if is_url(root):
        fs, p = fsspec.core.url_to_fs(f"{str(root).rstrip('/')}/{key}")
        if fs.exists(p):
            fs.rm(p)
    else:
        Path(root, key).unlink(missing_ok=True)


def size_of(root: str | Path, key: str = "") -> int:
    """Bytes at ``root``/``key``: one file, or everything under a folder (0 when absent)."""
    target = f"{str(root).rstrip('/')}/{key}" if key else str(root)
    if is_url(root):
        fs, p = fsspec.core.url_to_fs(target)
        return int(fs.du(p)) if fs.exists(p) else 0
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
