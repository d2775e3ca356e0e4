"""Where kdcache writes: one rule for every output folder and every output file.

An **output folder** — a run, an evaluation, a comparison, pseudo labels, a demo — is written only
when it is

* new, or an empty folder, or
* kdcache's own output of the same kind: it holds :data:`MARKER`, written when kdcache made the
  folder, which names the kind and lists every file kdcache wrote there.

Anything else (a folder of the user's, or kdcache's output of another kind) is refused in one line
naming the folder, before any work is done. Inside its own folder kdcache writes, replaces and
removes only the files the marker lists, ``--overwrite`` included: a file of the user's, at the top
or in a sub-folder kdcache writes (``examples/``, ``browse/``, ``masks/`` …), is never changed or
removed, and one that stands where kdcache would write is refused, naming it. A teacher cache keeps
the same rule with its own ``zarr.json`` as the marker (:mod:`kdcache.store.writer`).

An **output file** named by an option (``--json``, ``--markdown``, ``export --out FILE``) is written
where no file is, or over a file kdcache wrote (:func:`own_file`): a JSON object with the key
:data:`SIGNATURE`, a Markdown file whose first line is :data:`MARKDOWN_SIGNATURE`, or any other
file whose sidecar ``FILE.json`` (kdcache's) records its SHA-256.

Temporary files are named :func:`temporary` (hidden, with kdcache's name and the process id), so
that no name a user would choose is ever written or removed on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from kdcache import __version__
from kdcache.core.errors import KDCacheError, make_folder

#: the marker file of an output folder
MARKER = ".kdcache-output.json"
#: the key that marks a JSON file (a marker, a report, a sidecar) as kdcache's
SIGNATURE = "kdcache_output"
#: the first line of a Markdown file kdcache writes
MARKDOWN_SIGNATURE = "<!-- written by kdcache"

#: the kinds of output folder, as messages name them
KINDS = {
    "run": "a training run",
    "evaluation": "an evaluation",
    "comparison": "a comparison",
    "pseudo-labels": "an export of pseudo labels",
    "demo": "a demo",
    "classification-demo": "a classification demo",
}


class OutputError(KDCacheError):
    """An output folder or file that is not kdcache's to write: someone else's files are there."""


def temporary(path: Path) -> Path:
    """A hidden name beside ``path`` for writing it before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.kdcache-{os.getpid()}.tmp")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _write_json(path: Path, data) -> None:
    tmp = temporary(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _describe(kind: str) -> str:
    return KINDS.get(kind, f"a {kind}")


class OutputFolder:
    """An output folder that is kdcache's (see the module docstring). Make one with :meth:`claim`;
    :meth:`check` tells, without changing anything, whether a folder may be written."""

    def __init__(self, path: Path, kind: str, files: Iterable[str] = (), option: str = "--out"):
        self.path = Path(path)
        self.kind = kind
        self.files: set[str] = set(files)
        self.option = option

    # -- whether a folder may be written -----------------------------------------------------------
    @classmethod
    def check(cls, path, kind: str, *, option: str = "--out",
              legacy: Callable[[Path], list[str] | None] | None = None) -> OutputFolder | None:
        """None when ``path`` is new or an empty folder; the :class:`OutputFolder` it is when it is
        kdcache's output of ``kind``; otherwise one error naming it. ``legacy``: for a folder
        without a marker, the files an earlier kdcache wrote there (None: not one of its outputs)."""
        path = Path(path).expanduser()
        if not path.exists():
            return None
        if not path.is_dir():
            raise OutputError(f"{option} {path} is a file, not a folder; give a new or empty folder")
        marker = path / MARKER
        if marker.exists():
            data = _read_json(marker)
            if not isinstance(data, dict) or not isinstance(data.get("files"), list):
                raise OutputError(f"{option} {path}: its {MARKER} cannot be read, so kdcache cannot tell its own "
                                  f"files from yours; choose another {option}")
            found = data.get(SIGNATURE)
            if found != kind:
                raise OutputError(f"{option} {path} holds {_describe(str(found))} of kdcache's, not "
                                  f"{_describe(kind)}; choose another {option}")
            return cls(path, kind, (str(f) for f in data["files"]), option)
        if not any(path.iterdir()):
            return None
        adopted = legacy(path) if legacy is not None else None
        if adopted is not None:
            return cls(path, kind, adopted, option)
        raise OutputError(f"{option} {path} is a folder of files kdcache did not write (not {_describe(kind)} of "
                          f"kdcache's: it has no {MARKER}); give a new or empty folder, kdcache never writes among "
                          "your files")

    @classmethod
    def claim(cls, path, kind: str, *, option: str = "--out",
              legacy: Callable[[Path], list[str] | None] | None = None) -> OutputFolder:
        """The folder ``path`` as kdcache's output of ``kind``: made (with its marker) when it is new
        or empty, taken as it is when it is already that; refused otherwise (:meth:`check`)."""
        found = cls.check(path, kind, option=option, legacy=legacy)
        folder = found or cls(Path(path).expanduser(), kind, (), option)
        make_folder(folder.path, option)
        if not (folder.path / MARKER).exists():  # a new folder, or a run of an earlier kdcache adopted
            folder._save()
        return folder

    @staticmethod
    def is_own(path, kind: str) -> bool:
        """Whether ``path`` is kdcache's output folder of ``kind`` (by its marker)."""
        data = _read_json(Path(path) / MARKER)
        return isinstance(data, dict) and data.get(SIGNATURE) == kind

    # -- files ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        _write_json(self.path / MARKER, {SIGNATURE: self.kind, "kdcache_version": __version__,
                                         "files": sorted(self.files)})

    def owns(self, name: str) -> bool:
        return _rel(name) in self.files

    def file(self, name: str) -> Path:
        """Where to write ``name`` (a path relative to the folder, e.g. ``examples/best01.png``):
        recorded as kdcache's before it is written, its sub-folder made; refused, naming it, when a
        file kdcache did not write stands there."""
        return self.paths([name])[0]

    def paths(self, names: Iterable[str]) -> list[Path]:
        """:meth:`file` for many names at once (the marker is written once)."""
        rels = [_rel(n) for n in names]
        new = []
        for rel in rels:
            if rel in self.files:
                continue
            target = self.path / rel
            if target.exists() or target.is_symlink():
                raise OutputError(f"{self.option} {self.path}: {rel} is there and kdcache did not write it; move "
                                  f"it out of the folder, or choose another {self.option}")
            new.append(rel)
        if new:
            self.files.update(new)
            self._save()
        out = []
        for rel in rels:
            target = self.path / rel
            if target.parent != self.path:
                make_folder(target.parent, f"{self.option} {self.path}: its sub-folder")
            out.append(target)
        return out

    def record(self, names: Iterable[str]) -> None:
        """Record files kdcache has just made through a library that names them itself (TensorBoard's
        event files): new names that were not there before it wrote them."""
        new = {_rel(n) for n in names} - self.files
        if new:
            self.files.update(new)
            self._save()

    def remove(self, under: str | None = None, *, keep: Iterable[str] = ()) -> list[str]:
        """Delete the files kdcache wrote here (those in the sub-folder ``under``, or all of them
        but ``keep``); what anyone else put here stays. Returns the names removed."""
        keep = {_rel(k) for k in keep}
        prefix = None if under is None else _rel(under).rstrip("/") + "/"
        gone = sorted(f for f in self.files if f not in keep and (prefix is None or f.startswith(prefix)))
        for rel in gone:
            target = self.path / rel
            if target.is_file() or target.is_symlink():
                target.unlink()
        if gone:
            self.files.difference_update(gone)
            self._save()
        return gone


def _rel(name: str) -> str:
    rel = PurePosixPath(str(name).replace(os.sep, "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"an output file's name is relative to its folder: {name}")
    return rel.as_posix()


# -- single output files ---------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (what an export's sidecar and a store's teacher record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: Path) -> Path:
    """``FILE.json`` beside ``FILE``: what kdcache records of a file it wrote that holds no JSON."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def own_file(path) -> bool:
    """Whether kdcache wrote the file at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        return isinstance(data, dict) and SIGNATURE in data
    if path.suffix.lower() == ".md":
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().startswith(MARKDOWN_SIGNATURE)
        except (OSError, UnicodeDecodeError):
            return False
    sidecar = _read_json(sidecar_path(path))
    return (isinstance(sidecar, dict) and SIGNATURE in sidecar and sidecar.get("sha256") is not None
            and sidecar["sha256"] == file_sha256(path))


def output_file(path, option: str) -> Path:
    """``path`` (a file an option names) checked before any work: refused when it is a folder or a
    file kdcache did not write; its folder made."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name, e.g. {option} {Path(path) / 'out.json'}")
    if (p.exists() or p.is_symlink()) and not own_file(p):
        raise OutputError(f"{option} {path} exists and kdcache did not write it; give another file name (kdcache "
                          "replaces only a file it wrote)")
    make_folder(p.parent, f"{option} {path}: its folder")
    return p


def signed(data: dict, kind: str) -> dict:
    """``data`` (a JSON object kdcache writes as a file) with its :data:`SIGNATURE`."""
    return {SIGNATURE: kind, **data}


def markdown_signature(kind: str) -> str:
    """The first line of a Markdown file kdcache writes."""
    return f"{MARKDOWN_SIGNATURE} {kind} {__version__}: it may replace this file -->\n"
