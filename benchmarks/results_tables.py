"""The results shown in the README and the docs, generated from ``benchmarks/results/``.

A page marks each place a result goes::

    <!-- results: kd-methods-cpu.md#1 -->
    (generated: the first Markdown table of benchmarks/results/kd-methods-cpu.md)
    <!-- /results -->

``FILE#N`` is the N-th table of the results file; ``FILE`` alone is the whole file, its headings
two levels down (under the page's own ``##`` section). ``python benchmarks/results_tables.py`` rewrites every marked block of the README
and of ``docs/``; ``--check`` (what ``tests/test_results_tables.py`` runs) lists the blocks that
differ from their file instead and exits 1, so no result in the pages can be typed by hand or
drift from what a benchmark measured.

The figures of ``docs/figures/`` are drawn from the same files by ``results_figures.py`` beside
this script: the same command redraws them, and ``--check`` lists those that differ from a fresh
drawing too. ``--tables-only`` leaves the figures out (drawing them all takes most of the time):
``tests/test_results_tables.py`` runs ``--check --tables-only``, and ``tests/test_results_figures.py``
checks each figure in a test of its own.

    python benchmarks/results_tables.py [--check] [--tables-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<spec>[\w.\-]+(?:#\d+)?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def tables(text: str) -> list[str]:
    """The Markdown tables of ``text``: runs of lines that start with ``|``."""
    out, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def render(spec: str) -> str:
    """What the block ``spec`` holds: a table of a results file, or all of it (headings two levels down)."""
    name, _, number = spec.partition("#")
    path = RESULTS / name
    if not path.is_file():
        raise SystemExit(f"results block names {name}, which is not in {RESULTS}")
    text = path.read_text()
    if number:
        found = tables(text)
        if not 1 <= int(number) <= len(found):
            raise SystemExit(f"results block {spec}: {name} has {len(found)} tables")
        return found[int(number) - 1] + "\n"
    return demote(text.rstrip()) + "\n"


def demote(text: str) -> str:
    """The Markdown ``text`` with its headings two levels down (not the lines of its code blocks)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("##" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def generate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def stale(path: Path) -> list[str]:
    """The blocks of ``path`` whose content is not their file's."""
    text = path.read_text()
    return [m.group("spec") for m in BLOCK.finditer(text) if m.group("body") != render(m.group("spec"))]


def figures_module():
    """``results_figures.py`` beside this file (this folder is not a package)."""
    spec = importlib.util.spec_from_file_location("results_figures", Path(__file__).with_name("results_figures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list the stale blocks and exit 1 instead of rewriting")
    ap.add_argument("--tables-only", action="store_true",
                    help="the pages' results blocks alone, not the figures of docs/figures/")
    args = ap.parse_args()
    problems = []
    for page in pages():
        if args.check:
            problems += [f"{page.relative_to(REPO)}: {spec}" for spec in stale(page)]
        else:
            text = page.read_text()
            new = generate(text)
            if new != text:
                page.write_text(new)
                print(f"updated {page.relative_to(REPO)}")
    if not args.tables_only:
        figures = figures_module()
        if args.check:
            problems += [f"{figures.FIGURES_DIR.relative_to(REPO)}/{name}.svg" for name in figures.stale()]
        else:
            for name in figures.write():
                print(f"drew {figures.FIGURES_DIR.relative_to(REPO)}/{name}.svg")
    if problems:
        print("results blocks and figures that differ from benchmarks/results/ (run python benchmarks/results_tables.py):\n  "
              + "\n  ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
