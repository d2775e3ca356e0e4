"""The layers of docs/design.md, checked against the code's imports.

The design's table puts every module of ``kdcache`` (with ``kernels/`` and ``cli/``, which install as
``kdcache.kernels`` and ``kdcache.cli``) on a numbered layer; a module may import only from lower
layers (or from its own package), and no kdcache import hides inside a function. The imports are
read with ``ast`` from every file and resolved by *module name*, so ``methods/kl.py``'s
``from kdcache.kernels import topk_kl`` is an arrow to ``kernels/`` although the folder is not
under ``kdcache/``.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"kdcache": "kdcache", "kernels": "kdcache.kernels", "cli": "kdcache.cli"}  # folder -> package
FACES = {"kdcache", "kdcache.__main__"}  # the package's face and `python -m kdcache`: above every layer


def layer_table(text: str) -> dict[str, int]:
    """``{entry: layer}`` from the design's table: ``errors`` (a module), ``data/`` (a package)."""
    table = {}
    for m in re.finditer(r"^\| (\d+) \| (.+?) \|", text, re.M):
        for name in re.findall(r"`([\w/]+)`", m.group(2)):
            table[name] = int(m.group(1))
    return table


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    package = FOLDERS[rel.parts[0]]
    parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([package, *parts])


def entry_of(module: str, table: dict[str, int]) -> str | None:
    """The table entry a module belongs to: ``kdcache.store.reader`` -> ``store/``,
    ``kdcache.kernels.api`` -> ``kernels/``, ``kdcache.train.trainer`` -> ``training``."""
    if module in FACES:
        return None
    parts = module.split(".")[1:]
    if f"{parts[0]}/" in table:
        return f"{parts[0]}/"
    return parts[0] if len(parts) == 1 and parts[0] in table else None


def imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported kdcache module, inside a function?) of every kdcache import in a file;
    ``from kdcache import x`` counts as an import of ``kdcache.x``, relative imports are resolved."""
    tree = ast.parse(path.read_text())
    inside = set()  # the nodes inside a function (its decorators and defaults too): one pass over the tree
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if in_function:
            inside.add(id(node))
        below = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        stack.extend((child, below) for child in ast.iter_child_nodes(node))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t == "kdcache" or t.startswith("kdcache."):
                out.append((node.lineno, t, id(node) in inside))
    return out


def known_module(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of the code's modules (``kdcache.data.build_dataset``
    -> ``kdcache.data``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def violations(files: dict[str, tuple[Path, list[tuple[int, str, bool]]]], table: dict[str, int]) -> list[str]:
    """What breaks the table: ``files`` maps each module to (its file, its kdcache imports)."""
    modules = set(files)
    problems = []
    for module, (path, found) in sorted(files.items()):
        mine = entry_of(module, table)
        where = path.relative_to(REPO) if path.is_absolute() else path
        if mine is None and module not in FACES:
            problems.append(f"{where}: module {module} is on no layer of docs/design.md's table")
            continue
        seen = set()
        for line, target, in_function in found:
            theirs_module = known_module(target, modules)
            if theirs_module is None or theirs_module == module or (line, theirs_module) in seen:
                continue
            seen.add((line, theirs_module))
            theirs = entry_of(theirs_module, table)
            if in_function and theirs != mine:  # a package may load its own parts late (kernels/: the backends)
                problems.append(f"{where}:{line}: imports {theirs_module} inside a function")
            if mine is None or theirs is None or theirs == mine:
                continue
            if table[theirs] >= table[mine]:
                problems.append(f"{where}:{line}: {mine} (layer {table[mine]}) imports {theirs_module} "
                                f"({theirs}, layer {table[theirs]}): a layer may import only from lower ones")
    return problems


def code_files() -> dict[str, tuple[Path, list]]:
    """Every module of the code with its file and its kdcache imports (a new dict each call: tests
    change their copy; the files are read once)."""
    return dict(_code_files())


@functools.cache
def _code_files() -> dict[str, tuple[Path, list]]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            module = module_name(path)
            out[module] = (path, imports(path, module))
    return out


def test_the_imports_keep_to_the_design_layers():
    table = layer_table((REPO / "docs" / "design.md").read_text())
    assert {"core/", "store/", "kernels/", "methods/", "train/", "cli/"} <= set(table)
    files = code_files()
    # the arrow path-based tools miss: methods/kl.py -> kernels/ (installed as kdcache.kernels)
    kl = files["kdcache.methods.kl"][1]
    assert any(known_module(t, set(files)) == "kdcache.kernels" for _, t, _ in kl)
    problems = violations(files, table)
    assert not problems, "\n".join(problems)
    # every entry of the table names code that exists
    entries = {entry_of(m, table) for m in files} - {None}
    assert set(table) == entries, set(table) ^ entries


def test_the_layer_check_catches_an_import_back_up_and_one_inside_a_function():
    table = layer_table((REPO / "docs" / "design.md").read_text())
    files = code_files()
    errors_path = files["kdcache.core.errors"][0]
    bad = dict(files)
    bad["kdcache.core.errors"] = (errors_path, [*files["kdcache.core.errors"][1], (99, "kdcache.train.trainer.Trainer", False)])
    bad["kdcache.core.topk"] = (files["kdcache.core.topk"][0], [(7, "kdcache.kernels.topk_kl", True)])
    bad["kdcache.newthing"] = (REPO / "kdcache" / "newthing.py", [])
    problems = violations(bad, table)
    assert any("core/ (layer 1) imports kdcache.train.trainer (train/, layer 6)" in p for p in problems), problems
    assert any("imports kdcache.kernels inside a function" in p for p in problems), problems
    assert any("module kdcache.newthing is on no layer" in p for p in problems), problems


def cycles(files: dict[str, tuple[Path, list[tuple[int, str, bool]]]]) -> list[list[str]]:
    """Import cycles among the code's modules (inside a folder too, where the layers do not look):
    each as the modules around it, found by a depth-first search over the top-level imports."""
    modules = set(files)
    graph = {m: sorted({known_module(t, modules) for _, t, inside in found if not inside} - {None, m})
             for m, (_, found) in files.items()}
    state, stack, found_cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph.get(m, []):
            if n in FACES:
                continue
            if state.get(n) == "open":
                found_cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found_cycles


def test_no_module_imports_itself_round_a_cycle():
    files = code_files()
    assert cycles(files) == []
    # negative control, inside one folder (the layers allow it): outputs imports errors; errors importing
    # outputs back closes a loop
    assert any(t == "kdcache.core.errors" or t.startswith("kdcache.core.errors.")
               for _, t, _ in files["kdcache.core.outputs"][1])
    bad = dict(files)
    bad["kdcache.core.errors"] = (files["kdcache.core.errors"][0],
                                  [*files["kdcache.core.errors"][1], (1, "kdcache.core.outputs.OutputFolder", False)])
    assert ["kdcache.core.errors", "kdcache.core.outputs", "kdcache.core.errors"] in cycles(bad)


def test_the_package_has_a_folder_per_layer_and_no_loose_modules():
    """A newcomer finds each part by its folder: the package's top level holds folders, its face
    (``__init__``) and ``__main__``, nothing else."""
    loose = sorted(p.name for p in (REPO / "kdcache").glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert loose == []
    folders = sorted(p.name for p in (REPO / "kdcache").iterdir() if p.is_dir() and p.name != "__pycache__")
    table = layer_table((REPO / "docs" / "design.md").read_text())
    assert {f"{f}/" for f in folders} <= set(table), set(f"{f}/" for f in folders) - set(table)
    assert len(folders) <= 10, folders
