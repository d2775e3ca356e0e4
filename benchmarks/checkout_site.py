"""Lay this checkout's kdcache out in a folder as an installation would, for machines where nothing
is installed (benchmarks/gpu_check.sh on a GPU machine):

    python benchmarks/checkout_site.py SITE      # then PYTHONPATH=SITE PYTHONSAFEPATH=1 python -m kdcache

setup.py maps ``kdcache.kernels`` to ``kernels/`` and ``kdcache.cli`` to ``cli/`` (its ``MAPPED``), so the
checkout itself is not importable as it stands. The mapping is read from setup.py, not repeated here.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mapped_folders(root: Path = ROOT) -> dict[str, str]:
    """Package name -> folder, as setup.py installs them (``kdcache`` itself first)."""
    mapped = {"kdcache": "kdcache"}
    for node in ast.walk(ast.parse((root / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MAPPED" for t in node.targets):
            mapped.update(ast.literal_eval(node.value))
            return mapped
    raise SystemExit(f"checkout_site: no MAPPED = {{...}} in {root / 'setup.py'}; update this script to match it")


def lay_out(site: Path, root: Path = ROOT) -> None:
    # parents first, so that a mapped subpackage lands inside its copied parent
    for pkg, folder in sorted(mapped_folders(root).items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(root / folder, site.joinpath(*pkg.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/checkout_site.py SITE")
    lay_out(Path(sys.argv[1]))
