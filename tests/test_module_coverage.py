"""The quick tier's module check (tests/module_coverage.py) on made-up sessions: it names a module
never imported and one imported whose functions never ran, and passes a module without functions
that was imported; the tracer notes a function's file and not a module body's."""

from __future__ import annotations

import sys

import module_coverage as mc


def test_the_check_names_what_a_session_did_not_reach():
    files = mc.package_files()
    names = [str(p) for p in files]
    assert len(files) > 80 and str(mc.REPO / "kdcache" / "__main__.py") in names
    assert str(mc.REPO / "kernels" / "numba_kl.py") in names and str(mc.REPO / "cli" / "app.py") in names
    every = {"exercised": names, "imported": names}
    assert mc.problems([every]) == ([], len(files))

    app, main = str(mc.REPO / "cli" / "app.py"), str(mc.REPO / "kdcache" / "__main__.py")
    assert not mc.defines_functions(mc.REPO / "kdcache" / "__main__.py") and mc.defines_functions(mc.REPO / "cli" / "app.py")
    others = [n for n in names if n not in (app, main)]
    half = {"exercised": others[::2], "imported": others}  # the workers' notes are merged
    rest = {"exercised": others[1::2], "imported": [app, main]}
    assert mc.problems([half, rest]) == (["cli/app.py: imported, but none of its functions ran"], len(files))
    missing, _ = mc.problems([half, {"exercised": others[1::2], "imported": []}])
    assert missing == ["cli/app.py: never imported", "kdcache/__main__.py: never imported"]


def test_the_tracer_notes_a_package_function_once_the_tests_run():
    import numpy as np

    from kdcache.core import metrics

    tracer = mc.Tracer()
    previous = sys.gettrace()
    try:
        sys.settrace(tracer._trace)
        metrics._nanmean(np.array([1.0]))  # before the tests start (while collecting): not counted
        tracer.active = True
        mc.defines_functions(mc.REPO / "kdcache" / "__main__.py")  # a function of tests/, not the package's
        before = set(tracer.exercised)
        metrics._nanmean(np.array([1.0, np.nan]))
    finally:
        sys.settrace(previous)
    assert before == set()
    assert tracer.exercised == {str(mc.REPO / "kdcache" / "core" / "metrics.py")}
