"""The command line as the tests run it: ``kd("train-student", "--cache", path, ...)``, in-process
through typer's CliRunner (every argument passed through ``str``)."""

from __future__ import annotations

import typer.main
import typer.testing
from typer.testing import CliRunner

runner = CliRunner()
_built: dict = {}


def _command_of(app):
    """The click command of ``app``, built once per test process as the ``kdcache`` process builds
    it once (typer's runner built it again for every invocation, about 40 ms a time with every
    command module imported: a few hundred times in a test process). A command whose module is
    imported later is built when first run, as in ``kdcache`` itself (cli.app.Commands)."""
    key = id(app)
    if key not in _built:
        _built[key] = (app, typer.main.get_command(app))
    return _built[key][1]


typer.testing._get_command = _command_of


def kd(*args, env: dict | None = None):
    from kdcache.cli.app import app

    return runner.invoke(app, [str(a) for a in args], env=env)


def kd_on_one_thread(*args, env: dict | None = None):
    """:func:`kd` on one torch thread: the reference for a command that a test runs in processes
    of one thread each (``OMP_NUM_THREADS=1``), the same numbers without a second interpreter to
    start."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return kd(*args, env=env)
    finally:
        torch.set_num_threads(threads)
