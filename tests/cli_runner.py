"""The command line as the tests run it: ``kd("train-student", "--cache", path, ...)``, in-process
through typer's CliRunner (every argument passed through ``str``)."""

from __future__ import annotations

from typer.testing import CliRunner

runner = CliRunner()


def kd(*args, env: dict | None = None):
    from kdcache.cli.app import app

    return runner.invoke(app, [str(a) for a in args], env=env)
