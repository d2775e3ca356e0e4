"""Test-wide set-up: without a GPU, Triton kernels run in its CPU interpreter; under pytest-xdist
each worker computes on one thread (torch, Numba, and the processes tests start), since CI's
workers are as many as the cores and two threads each would only take turns on them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    torch.set_num_threads(1)


# -- every user error is triggered by a test that asserts on it (tests/error_coverage.py) ------------------
import pytest  # noqa: E402
from error_coverage import ENV, Recorder, code_sites, coverage, strings_of_file  # noqa: E402

RECORDER = Recorder().install()
WORKER_KEY = "kdcache_error_triggers"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker's triggers, gathered in the controller."""
    RECORDER.merge(getattr(node, "workeroutput", {}).get(WORKER_KEY, []))


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the triggers to the controller
        session.config.workeroutput[WORKER_KEY] = RECORDER.dump()
        return
    if not os.environ.get(ENV) or exitstatus != 0:
        return
    problems = coverage(code_sites(), RECORDER.triggers, strings_of_file)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_sep("=", f"{len(problems)} user errors not triggered and asserted by a test ({ENV}=1)")
        for p in problems:
            reporter.write_line(p)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
