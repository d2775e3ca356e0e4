"""`.ci/run` starts the tests while the maps' Numba kernel still compiles: the tests wait for the status
file the compile writes (KDCACHE_TESTS_WAIT_FOR, tests/conftest.py), and a failed or missing compile
ends the session in one line instead of letting every test compile the kernel on its own."""

import threading

import pytest
from compile_wait import wait_for_compile


def test_a_compile_that_ends_well_lets_the_tests_start_when_it_ends(tmp_path):
    status = tmp_path / "maps-kernel.status"
    timer = threading.Timer(0.3, lambda: status.write_text("0\n"))
    timer.start()
    wait_for_compile(str(status), timeout_s=30, poll_s=0.01)
    assert status.read_text() == "0\n"  # it returned once the file was there, not before


def test_a_failed_compile_ends_the_session_with_its_status(tmp_path):
    status = tmp_path / "maps-kernel.status"
    status.write_text("1\n")
    with pytest.raises(pytest.exit.Exception, match="ended with status 1"):
        wait_for_compile(str(status), timeout_s=30, poll_s=0.01)


def test_a_compile_that_never_writes_its_status_ends_the_session(tmp_path):
    with pytest.raises(pytest.exit.Exception, match="was not written within"):
        wait_for_compile(str(tmp_path / "never.status"), timeout_s=0.05, poll_s=0.01)
