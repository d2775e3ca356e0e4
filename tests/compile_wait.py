"""Files that a step started before the tests writes when it ends (its exit status): the tests wait
for them. `.ci/run` collects while the maps' Numba kernel compiles, the set-up's longest step,
instead of after it; a compile that failed, or never wrote its status, ends the session in one line
(tests/conftest.py calls :func:`wait_for_compile`). It installs Debian's Chromium in the background
too: the browser tests wait for that install (:func:`wait_for_install`, tests/test_compare_page.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

WAIT_FOR = "KDCACHE_TESTS_WAIT_FOR"
CHROMIUM = "KDCACHE_TESTS_CHROMIUM"


def _status(path: str, timeout_s: float, poll_s: float) -> str | None:
    """The exit status written to ``path`` (None if not written within ``timeout_s``)."""
    status, deadline = Path(path), time.monotonic() + timeout_s
    while not status.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
    return status.read_text().strip()


def wait_for_compile(path: str, timeout_s: float = 900.0, poll_s: float = 0.2) -> None:
    code = _status(path, timeout_s, poll_s)
    if code is None:
        pytest.exit(f"{WAIT_FOR}: {path} was not written within {timeout_s:.0f} s", returncode=1)
    if code != "0":
        pytest.exit(f"{WAIT_FOR}: the compile the tests wait for ended with status {code} (its output is above)",
                    returncode=1)


def wait_for_install(path: str, log: str, timeout_s: float = 900.0, poll_s: float = 0.5) -> None:
    """Fails the waiting test (not the session) if the install failed or never ended."""
    code = _status(path, timeout_s, poll_s)
    if code is None:
        pytest.fail(f"{CHROMIUM}: {path} was not written within {timeout_s:.0f} s (the install's output: {log})",
                    pytrace=False)
    if code != "0":
        pytest.fail(f"{CHROMIUM}: the install ended with status {code} (its output: {log})", pytrace=False)
