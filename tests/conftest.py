"""Test-wide set-up: without a GPU, Triton kernels run in its CPU interpreter; under pytest-xdist
each worker computes on one thread (torch, Numba, and the processes tests start), since CI's
workers are as many as the cores and two threads each would only take turns on them. The shared
fixtures (a tiny teacher, a small store) are made once per session (per xdist worker); tests only
read them. The quick tier is ``python -m pytest -m "not slow" -n 2 --dist loadfile``;
``KDCACHE_MODULE_COVERAGE=1`` checks that it reaches every module (tests/module_coverage.py)."""

import os

import module_coverage

TRACER = module_coverage.Tracer().install() if os.environ.get(module_coverage.ENV) else None

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    torch.set_num_threads(1)


# -- the generated CPU maps kernels only where a test asks for them ----------------------------------------
@pytest.fixture(autouse=True)
def _generated_kernels_where_marked(request, monkeypatch):
    """Maps of up to ``api.COLUMN_MAX_CLASSES`` classes take a kernel generated and compiled for their
    (C, k, options, input types), 5-13 s each on the 2-core Xeon: the tests' matrix of shapes would
    compile dozens (minutes of CI). In-process tests run ``kl_spatial`` for them instead, unless marked
    ``columns`` (tests/test_numba_columns.py checks the generated kernels against the float64
    reference); the commands tests start run them as a user's runs do."""
    if request.node.get_closest_marker("columns") is None:
        import kdcache.kernels.api as api

        monkeypatch.setattr(api, "COLUMN_MAX_CLASSES", 0)


# -- the longest files first, so that CI's two workers finish together -------------------------------------
#: the test files that took longest (seconds, summed over their tests, in a full run of 2026-11-27 on the
#: 2-core machine while two benchmark processes shared it: about 2.5x CI's own).
#: `.ci/run` hands whole files to its two workers (--dist loadfile). In collection order (alphabetical)
#: one worker ran 767 s against 620 s for the other (simulated from CI's durations of 2026-11-25); longest
#: first, 694 and 694. A heuristic only: a file missing here runs after these, in its usual place.
#: pytest-xdist 3.8's scheduler re-sorts the files by their number of tests (its default
#: --loadscope-reorder), so under xdist this order counts only with --no-loadscope-reorder; simulated
#: with CI's per-file times of 2026-11-28, the test-count order is within about 10 s of this one.
#: Measured on 2026-11-29, fresh clones of `.ci/run` on the 2-core EPYC: with xdist's re-sort turned off
#: (this order, refreshed) pytest took 705 s and 774 s; with it on, 657 s (and 626 s at the landing before);
#: in a warm environment, without the documentation and wheel beside the tests, 624 s off and 623 s on.
#: So xdist's order stays.
LONGEST_FIRST = ("test_doc_examples.py",  # 444
                 "test_s3.py",  # 264
                 "test_benchmarks.py",  # 198
                 "test_kernels.py",  # 163
                 "test_cache.py",  # 119
                 "test_ddp.py",  # 99
                 "test_faults.py",  # 92
                 "test_kernels_cuda.py",  # 85
                 "test_compare_page.py",  # 76
                 "test_number_options.py")  # 67


def pytest_collection_modifyitems(session, config, items):
    """Stable: the order of the tests inside a file (a page's examples chain) is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))

# -- every user error is triggered by a test that asserts on it (tests/error_coverage.py) ------------------
from error_coverage import ENV, Recorder, code_sites, coverage, strings_of_file  # noqa: E402

RECORDER = Recorder().install()
WORKER_KEY = "kdcache_error_triggers"


MODULE_DUMPS: list[dict] = []


from compile_wait import WAIT_FOR, wait_for_compile  # noqa: E402


def pytest_collection_finish(session):
    if os.environ.get(WAIT_FOR) and not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: it waits
        wait_for_compile(os.environ[WAIT_FOR])
    if TRACER is not None:  # only what the tests run counts, not what collecting them imported
        TRACER.active = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """pytest-xdist: the controller hands out no test before the compile is done (the workers collect meanwhile)."""
    if os.environ.get(WAIT_FOR):
        wait_for_compile(os.environ[WAIT_FOR])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker's triggers (and modules reached), gathered in the controller."""
    output = getattr(node, "workeroutput", {})
    RECORDER.merge(output.get(WORKER_KEY, []))
    if module_coverage.WORKER_KEY in output:
        MODULE_DUMPS.append(output[module_coverage.WORKER_KEY])


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the triggers to the controller
        session.config.workeroutput[WORKER_KEY] = RECORDER.dump()
        if TRACER is not None:
            session.config.workeroutput[module_coverage.WORKER_KEY] = TRACER.dump()
        return
    if TRACER is not None:
        report_modules(session, [*MODULE_DUMPS, TRACER.dump()])
    if not os.environ.get(ENV) or exitstatus != 0:
        return
    problems = coverage(code_sites(), RECORDER.triggers, strings_of_file)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_sep("=", f"{len(problems)} user errors not triggered and asserted by a test ({ENV}=1)")
        for p in problems:
            reporter.write_line(p)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def report_modules(session, dumps: list[dict]) -> None:
    """KDCACHE_MODULE_COVERAGE=1: fail the session unless every module was imported and exercised."""
    missing, total = module_coverage.problems(dumps)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_sep("=", f"{module_coverage.ENV}: {total - len(missing)} of {total} modules imported and "
                            "exercised by the tests that ran")
    for line in missing:
        reporter.write_line(line)
    if missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- shared fixtures: made once per session (per xdist worker), read-only --------------------------------


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A tiny segmentation teacher: ``demo_teacher``, 11 classes, seed 0, saved as a kdcache checkpoint.
    Read it, never write beside it (a test that changes a teacher makes its own with make_teacher)."""
    from fake_data import make_teacher

    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, teacher):
    """(teacher, store): ``teacher``'s top-4 logits on 16 synthetic 32x48 training images, 8 per shard.
    Read-only: a test that changes a store copies it first (shutil.copytree)."""
    from fake_data import make_small_store

    return make_small_store(tmp_path_factory, teacher)


# -- made once per test session for every xdist worker: the demos several test files look at ------------


def shared_once(factory, name: str, make) -> tuple:
    """``make(folder)`` (returning what the command printed) run once per test session, by whichever
    xdist worker first asks; a worker that asks meanwhile waits for it, and later ones read it:
    (folder, output). Under xdist the workers' temporary folders share a parent of this session's
    own; without xdist the session's folder serves. A ``make`` that fails leaves nothing behind for
    the next to trust."""
    import fcntl

    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-once"
    root.mkdir(exist_ok=True)
    out, printed = root / name, root / f"{name}.output"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not printed.exists():
            printed.write_text(make(out))
        return out, printed.read_text()


def _demo(*args):
    def make(out):
        from cli_runner import kd

        r = kd("demo", "--out", out, *args, "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.output
        return r.output
    return make


#: the segmentation demo at the tests' size, and the same arguments again for a rerun
DEMO_ARGS = ("--teacher-epochs", 1, "--student-epochs", 1, "--limit", 8)
CLASSIFICATION_DEMO_ARGS = ("--task", "classification", "--teacher-epochs", 1, "--student-epochs", 1, "--limit", 40)


@pytest.fixture(scope="session")
def segmentation_demo(tmp_path_factory):
    """(folder, output) of ``kdcache demo`` with :data:`DEMO_ARGS`, run once for the session. Read
    it; a rerun with the same arguments (which finds every step done) is the one write allowed."""
    return shared_once(tmp_path_factory, "demo", _demo(*DEMO_ARGS))


@pytest.fixture(scope="session")
def classification_demo(tmp_path_factory):
    """(folder, output) of ``kdcache demo`` with :data:`CLASSIFICATION_DEMO_ARGS`, once for the session."""
    return shared_once(tmp_path_factory, "classification-demo", _demo(*CLASSIFICATION_DEMO_ARGS))
