"""The ``kdcache`` command: thin typer commands that parse options and call the library.

The commands live by group — :mod:`~kdcache.cli.train` (train-teacher, train-student),
:mod:`~kdcache.cli.results` (evaluate, export, compare, demo), :mod:`~kdcache.cli.cache`
(build-teacher-cache, inspect-cache, verify-cache, export-pseudo-labels) and
:mod:`~kdcache.cli.tools` (bench-kernels, list-models, list-datasets) — on the one app of
:mod:`~kdcache.cli.base`; this module puts them together (in the order ``--help`` lists them).
The options of the commands that configure a run or a cache are the fields declared on its
config dataclass (:mod:`kdcache.options`, made into options by :mod:`kdcache.cli.options`); every
other default ``--help`` shows is read from the library, so the help cannot drift from what runs.
"""

from __future__ import annotations

from kdcache.cli import cache, results, tools, train  # noqa: F401  (each registers its commands)
from kdcache.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
