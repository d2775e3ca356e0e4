"""Does a test session reach every module of the package? (``KDCACHE_MODULE_COVERAGE=1``)

The quick tier (``pytest -m "not slow"``) is meant to import and exercise every module under
``kdcache/``, ``cli/`` and ``kernels/``; this is the check. With ``KDCACHE_MODULE_COVERAGE=1``,
``conftest.py`` installs :class:`Tracer` before anything else is imported: a ``sys.settrace``
function that looks at each new Python frame only (no line events) and notes which package files
had a function of theirs run once the tests had started (after collection). At the end of the
session (the workers' notes merged in the controller under pytest-xdist) a module counts as covered
when one of its functions, methods, lambdas or comprehensions ran during the tests; a module that
defines none (``__main__.py``, a package's ``__init__.py`` of imports) counts when it was imported.
Anything else fails the session, naming the modules. It needs the whole tier to run: a partial run
(``-k``, one file) reports modules it never meant to reach. Not run by ``.ci/run`` (the tracer
costs time); run it after adding a module or marking tests slow::

    KDCACHE_MODULE_COVERAGE=1 python -m pytest -m "not slow" -n 2 --dist loadfile

What runs in a child process (``subprocess``, ``torchrun``, DataLoader workers) is not seen, and
neither is compiled code (a Numba kernel's Python body): the module's Python-side functions are.
"""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kdcache", "cli", "kernels")
ENV = "KDCACHE_MODULE_COVERAGE"
WORKER_KEY = "kdcache_module_coverage"


def package_files() -> list[Path]:
    """Every module of the package, as installed: ``kdcache/``, ``cli/`` and ``kernels/``."""
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def defines_functions(path: Path) -> bool:
    """Does the module hold code that runs only when called (a def, lambda or comprehension)?"""
    def walk(code) -> bool:
        return any(inspect.iscode(c) and (c.co_flags & inspect.CO_NEWLOCALS or walk(c)) for c in code.co_consts)

    return walk(compile(path.read_text(), str(path), "exec"))


class Tracer:
    """Package files whose functions ran (``exercised``) once :attr:`active` was set."""

    def __init__(self):
        self.roots = tuple(str(REPO / folder) + "/" for folder in FOLDERS)
        self.exercised: set[str] = set()
        self.active = False
        self._settled: set[str] = set()  # files outside the package, or already exercised

    def _trace(self, frame, event, arg):
        code = frame.f_code
        name = code.co_filename
        if name in self._settled:
            return None
        if not name.startswith(self.roots):
            self._settled.add(name)
        elif self.active and code.co_flags & inspect.CO_NEWLOCALS:  # not a module or class body
            self.exercised.add(name)
            self._settled.add(name)
        return None  # no line events

    def install(self) -> Tracer:
        sys.settrace(self._trace)
        threading.settrace(self._trace)
        return self

    def imported(self) -> set[str]:
        return {str(Path(f).resolve()) for m in list(sys.modules.values())
                if isinstance(f := getattr(m, "__file__", None), str) and f.startswith(self.roots)}

    def dump(self) -> dict:
        return {"exercised": sorted(self.exercised), "imported": sorted(self.imported())}


def problems(dumps: list[dict]) -> tuple[list[str], int]:
    """(one line per module the session did not reach, how many modules there are)."""
    exercised = {f for d in dumps for f in d["exercised"]}
    imported = {f for d in dumps for f in d["imported"]} | exercised
    missing = []
    files = package_files()
    for path in files:
        name, rel = str(path), path.relative_to(REPO)
        if name not in imported:
            missing.append(f"{rel}: never imported")
        elif name not in exercised and defines_functions(path):
            missing.append(f"{rel}: imported, but none of its functions ran")
    return missing, len(files)
