"""The command line as the tests run it: ``kd("train-student", "--cache", path, ...)``, in-process
through typer's CliRunner (every argument passed through ``str``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
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


def torchrun(*args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 *args``, its output captured.

    A launch that runs past ``timeout`` (ranks whose collectives fell out of step wait for ever) is
    not left running: every rank (each in a session of its own, as torchrun starts them) is sent
    SIGABRT, which with ``PYTHONFAULTHANDLER`` prints each of its threads' Python stack, then the
    launcher is stopped; the test fails on those stacks, where a killed launcher alone would have
    left the ranks running and said nothing of where they were."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = _descendants(proc.pid)
        for pid in ranks:
            _signal(pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)  # the launcher sees its ranks fail and ends
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for pid in ranks:
            _signal(pid, signal.SIGKILL)
        pytest.fail(f"torchrun {' '.join(map(str, args))[:300]} hung past {timeout:.0f} s; its output, with the "
                    f"ranks' stacks (SIGABRT):\n{err[-20000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (read from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
