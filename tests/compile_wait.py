"""A file that a compile started before the tests writes when it ends (its exit status): the tests
wait for it after collecting. `.ci/run` collects while the maps' Numba kernel compiles, the set-up's
longest step, instead of after it; a compile that failed, or never wrote its status, ends the session
in one line (tests/conftest.py calls :func:`wait_for_compile`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

WAIT_FOR = "KDCACHE_TESTS_WAIT_FOR"


def wait_for_compile(path: str, timeout_s: float = 900.0, poll_s: float = 0.2) -> None:
    status, deadline = Path(path), time.monotonic() + timeout_s
    while not status.exists():
        if time.monotonic() > deadline:
            pytest.exit(f"{WAIT_FOR}: {path} was not written within {timeout_s:.0f} s", returncode=1)
        time.sleep(poll_s)
    code = status.read_text().strip()
    if code != "0":
        pytest.exit(f"{WAIT_FOR}: the compile the tests wait for ended with status {code} (its output is above)",
                    returncode=1)
