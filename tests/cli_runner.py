"""The command line as the tests run it: ``kd("train-student", "--cache", path, ...)``, in-process
through typer's CliRunner (every argument passed through ``str``)."""

from __future__ import annotations

from typer.testing import CliRunner

runner = CliRunner()


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
