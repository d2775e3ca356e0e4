"""`.ci/run` starts the tests while the maps' Numba kernel still compiles: the tests wait for the status
file the compile writes (KDCACHE_TESTS_WAIT_FOR, tests/conftest.py), and a failed or missing compile
ends the session in one line instead of letting every test compile the kernel on its own."""

import threading

import pytest
from compile_wait import wait_for_compile, wait_for_install


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


# -- the Chromium install .ci/run runs in the background (KDCACHE_TESTS_CHROMIUM, tests/test_compare_page.py) --
def test_the_browser_tests_start_when_the_install_ends(tmp_path):
    status = tmp_path / "chromium.status"
    timer = threading.Timer(0.3, lambda: status.write_text("0\n"))
    timer.start()
    wait_for_install(str(status), str(tmp_path / "chromium.log"), timeout_s=30, poll_s=0.01)
    assert status.read_text() == "0\n"


def test_a_failed_install_fails_the_browser_test_naming_its_log(tmp_path):
    status = tmp_path / "chromium.status"
    status.write_text("100\n")
    with pytest.raises(pytest.fail.Exception, match=r"ended with status 100 \(its output: .*chromium\.log\)"):
        wait_for_install(str(status), str(tmp_path / "chromium.log"), timeout_s=30, poll_s=0.01)


def test_an_install_that_never_ends_fails_the_browser_test(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="was not written within"):
        wait_for_install(str(tmp_path / "never.status"), str(tmp_path / "chromium.log"), timeout_s=0.05, poll_s=0.01)
