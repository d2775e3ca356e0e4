"""User-facing errors: each names the problem and, where there is one, the fix."""

import importlib
from pathlib import Path


class KDCacheError(Exception):
    """An error caused by the user's input (paths, data, options), not by a bug.

    The command-line interface prints these as one clear message and exits with status 2,
    without a traceback.
    """


class DatasetError(KDCacheError):
    """A data set root, split, image or mask is missing, laid out wrongly or inconsistent."""


class CheckpointError(KDCacheError):
    """A checkpoint or state dict cannot be read or does not fit the model."""


class ModelError(KDCacheError):
    """A model name, import path or feature tap cannot be resolved."""


class ExportError(KDCacheError):
    """A model cannot be exported, or an exported model does not compute what the PyTorch one does."""


class MissingExtraError(KDCacheError):
    """An optional dependency (a pip extra of kdcache, e.g. ``kdcache[tensorboard]``) that a command needs is not
    installed."""


def import_extra(what: str, extra: str, *modules: str) -> list:
    """The optional ``modules``, imported now, or one error naming the pip extra that installs them.

    Optional dependencies are imported when first used, not at start-up (the design's rule
    against imports inside functions is about dodging import cycles): kdcache must start and
    train without them, and only the commands that need them may fail."""
    found = []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            packages = " and ".join(dict.fromkeys(m.split(".")[0] for m in modules))
            raise MissingExtraError(f'{what} needs {packages}: pip install "kdcache[{extra}]"') from None
    return found


class ConfigFileError(KDCacheError):
    """A ``--config`` file cannot be read, or holds a key or a value its command does not take."""


def make_folder(path, what: str = "--out") -> Path:
    """``path`` as a folder, created with its parents, or one error naming it and the fix (a
    file in the way, no permission, a read-only file system)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KDCacheError(f"{what} {path}: cannot create the folder ({exc.strerror or exc}"
                           f"{f': {exc.filename}' if exc.filename and str(exc.filename) != str(path) else ''}); "
                           "choose a path where you may write") from None
    return path
