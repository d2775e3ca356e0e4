"""Where kdcache writes (``kdcache/core/outputs.py``): no command deletes or changes a file it did not write.

Part 1 tries every command that writes, as a user runs it (the CLI, in-process), twice over:

* into kdcache's own output of that command, where a user's files were planted at the top and in
  every sub-folder the command writes (``examples/``, ``browse/``, ``masks/``, a store's arrays …);
* into a folder of the user's that holds a file of theirs at every path the command writes there.

Each is run without and with ``--overwrite`` (where the command has it); every planted file must be
byte-identical afterwards, and the user's folder refused in one line naming it. A command that
writes a single file (``export``, ``--json``, ``--markdown``) is tried beside a user's files and
over a user's file of that name. :data:`CASES` is checked against the app: a command with an output
option that is not tried here fails :func:`test_every_command_that_writes_is_tried`. Two negative
controls show the test fails when either half of the rule (the folder check, the per-file check)
is taken out.

Part 2 checks the rule's pieces by hand: the marker, the kinds, a run of an earlier kdcache,
own files, and what the messages say.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from cli_runner import kd

from kdcache.core.outputs import (
    MARKER,
    OutputError,
    OutputFolder,
    output_file,
    own_file,
    sidecar_path,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RES = ["--resolution", "32x48"]
COMMON = ["--limit", "8", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet"]
TINY = ["--model", "tiny_models:TinyNet", *COMMON]


def ok(result) -> None:
    assert result.exit_code == 0, (ANSI.sub("", result.output), result.exception)


def error_line(result, *fragments: str) -> str:
    """One ``error:`` line holding every fragment; exit status 2."""
    out = ANSI.sub("", result.output)
    lines = [line for line in out.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    for fragment in fragments:
        assert fragment in " ".join(lines[0].split()), (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A teacher run, its cache, and two students (CE and dist) of the tiny net on synthetic data."""
    base = tmp_path_factory.mktemp("outputs")
    e = {"teacher": base / "teacher", "store": base / "cache.zarr", "ce": base / "student-ce",
         "student": base / "student-dist"}
    ok(kd("train-teacher", *TINY, "--dataset", "synthetic", *RES, "--out", e["teacher"]))
    ok(kd("build-teacher-cache", "--weights", e["teacher"], "--out", e["store"], "--limit", "8", "--device", "cpu",
          "--workers", "0", "--quiet", *RES))
    for run, method in ((e["ce"], "none"), (e["student"], "dist")):
        ok(kd("train-student", "--cache", e["store"], *TINY, "--method", method, "--out", run))
    return e


# -- the commands that write, each as a user runs it into a folder (or a file) ---------------------------


@dataclass(frozen=True)
class Case:
    """``args(env, target)``: the command line writing into ``target`` (a folder; for a command that
    writes files by name, the folder that holds them). ``rerun``/``overwrite``: the exit status of a
    second run into kdcache's own output with a user's files planted in it, without and with
    ``--overwrite`` (None: the command has no --overwrite). ``files``: a file-writing command's files."""

    args: Callable[[dict, Path], list]
    rerun: int = 0
    overwrite: int | None = None
    files: tuple[str, ...] = ()


CASES = {
    # a run that holds a last.pt needs --overwrite (or --resume); --overwrite replaces the run's files alone
    "train-teacher": Case(lambda e, t: ["train-teacher", *TINY, "--dataset", "synthetic", *RES, "--out", t],
                          rerun=2, overwrite=0),
    "train-student": Case(lambda e, t: ["train-student", "--cache", e["store"], *TINY, "--method", "kl", "--out", t],
                          rerun=2, overwrite=0),
    # a finished store resumes (nothing to do); --overwrite refuses a store holding a file of the user's
    "build-teacher-cache": Case(lambda e, t: ["build-teacher-cache", "--weights", e["teacher"], "--out", t, "--limit",
                                              "8", "--device", "cpu", "--workers", "0", "--quiet", *RES],
                                rerun=0, overwrite=2),
    "evaluate": Case(lambda e, t: ["evaluate", e["student"], "--out", t, "--no-latency", "--qualitative", "1",
                                   "--device", "cpu", "--quiet"]),
    "compare": Case(lambda e, t: ["compare", e["teacher"], e["ce"], e["student"], "--out", t, "--no-latency",
                                  "--examples", "1", "--page-images", "2", "--device", "cpu", "--quiet"]),
    "export-pseudo-labels": Case(lambda e, t: ["export-pseudo-labels", e["store"], "--out", t, "--confidence-png",
                                               "--quiet"], rerun=2, overwrite=0),
    "demo": Case(lambda e, t: ["demo", "--out", t, "--teacher-epochs", "1", "--student-epochs", "1", "--limit", "2",
                               "--device", "cpu", "--quiet"]),
    "export": Case(lambda e, t: ["export", e["student"], "--format", "torchscript", "--out", t / "model.pt"],
                   files=("model.pt", "model.pt.json")),
    "inspect-cache": Case(lambda e, t: ["inspect-cache", e["store"], "--samples", "2", "--json", t / "report.json"],
                          files=("report.json",)),
    "bench-kernels": Case(lambda e, t: ["bench-kernels", "--quick", "--no-compile", "--device", "cpu", "--repeats",
                                        "1", "--json", t / "bench.json", "--markdown", t / "bench.md"],
                          files=("bench.json", "bench.md")),
}

#: the options that name where a command writes
OUTPUT_PARAMS = {"out", "json_out", "markdown_out"}


def test_every_command_that_writes_is_tried():
    """Every command with an output option (``--out``, ``--json``, ``--markdown``) is in :data:`CASES`,
    and every case is a command that has one."""
    from kdcache.cli.app import all_commands

    writing = {name for name, c in all_commands().items() if OUTPUT_PARAMS & {p.name for p in c.params}}
    assert writing == set(CASES)
    assert {"list-models", "list-datasets", "verify-cache"}.isdisjoint(writing)


def files_under(folder: Path) -> set[str]:
    """Every file under ``folder`` ('/'-separated, relative), the marker left out."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def plant(files: dict[Path, bytes]) -> dict[Path, bytes]:
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def unchanged(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was changed or removed"


def flags(case: Case) -> list[tuple[list[str], int | None]]:
    """(extra arguments, expected exit status) of the reruns: without and, where it exists, with --overwrite."""
    return [([], case.rerun), *([(["--overwrite"], case.overwrite)] if case.overwrite is not None else [])]


def try_folder_command(case: Case, env: dict, tmp_path: Path) -> None:
    own, theirs = tmp_path / "own", tmp_path / "theirs"
    ok(kd(*case.args(env, own)))
    written = files_under(own)
    assert written
    # kdcache's own output: a user's file at the top and in every sub-folder the command writes
    subs = {str(PurePosixPath(f).parent) for f in written}
    mine = plant({own / sub / "users-notes.txt": f"mine, in {sub}\n".encode() for sub in subs})
    for extra, status in flags(case):
        r = kd(*case.args(env, own), *extra)
        assert r.exit_code == status, (extra, ANSI.sub("", r.output))
        unchanged(mine)
    # a folder of the user's with a file of theirs at every path the command writes there, and one
    # that holds a note of theirs alone (nothing in the way of kdcache's files): both refused
    notes = tmp_path / "theirs-notes"
    theirs_files = plant({**{theirs / f: f"mine: {f}\n".encode() for f in written}, notes / "notes.txt": b"mine\n"})
    for folder in (theirs, notes):
        for extra, _ in flags(case):
            error_line(kd(*case.args(env, folder), *extra), str(folder))
            unchanged(theirs_files)
    assert files_under(notes) == {"notes.txt"}


def try_file_command(case: Case, env: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    beside = plant({folder / "users-notes.txt": b"mine\n", folder / "sub" / "photo.jpg": b"\xff\xd8 mine"})
    ok(kd(*case.args(env, folder)))
    unchanged(beside)
    assert {f"{folder / n}" for n in case.files} <= {str(p) for p in folder.iterdir()}
    ok(kd(*case.args(env, folder)))  # over its own files: replaced
    unchanged(beside)
    for name in case.files:  # a user's file at one of the names it writes
        other = tmp_path / f"theirs-{name}"
        theirs = plant({other / name: b"mine, not kdcache's\n"})
        error_line(kd(*case.args(env, other)), name, "kdcache did not write it")
        unchanged(theirs)


SLOW = {"compare", "bench-kernels", "demo"}  # the longest three


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_no_command_changes_a_file_it_did_not_write(name, env, tmp_path):
    case = CASES[name]
    (try_file_command if case.files else try_folder_command)(case, env, tmp_path)


def test_the_classification_demo_refuses_a_users_folder_and_another_demos(tmp_path):
    theirs = plant({tmp_path / "theirs" / "demo.json": b"mine\n"})
    error_line(kd("demo", "--task", "classification", "--out", tmp_path / "theirs", "--quiet"), "theirs",
               "not a classification demo of kdcache's")
    unchanged(theirs)
    OutputFolder.claim(tmp_path / "seg", "demo")  # a segmentation demo's folder is not a classification demo's
    error_line(kd("demo", "--task", "classification", "--out", tmp_path / "seg", "--quiet"),
               "holds a demo of kdcache's, not a classification demo; choose another --out")


@pytest.mark.slow  # evaluates twice
def test_the_test_fails_without_the_folder_check(env, tmp_path, monkeypatch):
    """Negative controls: with the folder check taken out, the user's folder is written (not refused);
    with the per-file check and removal taken out as well, the user's files are replaced."""
    monkeypatch.setattr(OutputFolder, "check", classmethod(lambda cls, *a, **k: None))
    with pytest.raises(AssertionError):
        try_folder_command(CASES["evaluate"], env, tmp_path / "a")
    monkeypatch.setattr(OutputFolder, "paths", lambda self, names: [self.path / n for n in names])
    theirs = plant({tmp_path / "b" / "eval.json": b"my evaluation\n"})
    kd(*CASES["evaluate"].args(env, tmp_path / "b"))
    with pytest.raises(AssertionError, match="was changed or removed"):
        unchanged(theirs)


# -- the rule's pieces, by hand ------------------------------------------------------------------------------


def test_a_folder_is_new_empty_or_kdcaches_own_of_the_same_kind(tmp_path):
    assert OutputFolder.check(tmp_path / "new", "comparison") is None
    (tmp_path / "empty").mkdir()
    assert OutputFolder.check(tmp_path / "empty", "comparison") is None
    folder = OutputFolder.claim(tmp_path / "new", "comparison")
    assert json.loads((tmp_path / "new" / MARKER).read_text()) == {
        "kdcache_output": "comparison", "kdcache_version": json.loads((tmp_path / "new" / MARKER).read_text())[
            "kdcache_version"], "files": []}
    folder.paths(["compare.md", "examples/best01.png"])
    again = OutputFolder.check(tmp_path / "new", "comparison")
    assert again.files == {"compare.md", "examples/best01.png"}
    with pytest.raises(OutputError, match=r"holds a comparison of kdcache's, not an evaluation; choose another --out"):
        OutputFolder.check(tmp_path / "new", "evaluation")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"is a folder of files kdcache did not write \(not a comparison of "
                                          r"kdcache's: it has no \.kdcache-output\.json\)"):
        OutputFolder.claim(tmp_path / "theirs", "comparison")
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        OutputFolder.check(tmp_path / "file", "comparison")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MARKER).write_text("{not json")
    with pytest.raises(OutputError, match="cannot be read, so kdcache cannot tell its own files from yours"):
        OutputFolder.check(tmp_path / "broken", "comparison")


def test_kdcache_writes_and_removes_only_the_files_its_marker_lists(tmp_path):
    folder = OutputFolder.claim(tmp_path / "out", "comparison")
    for p in folder.paths(["compare.md", "examples/a.png", "examples/b.png", "browse/0.png"]):
        p.write_text("kdcache")
    mine = plant({tmp_path / "out" / "examples" / "mine.png": b"mine", tmp_path / "out" / "notes.txt": b"mine"})
    with pytest.raises(OutputError, match=r"examples/mine\.png is there and kdcache did not write it; move it out "
                                          r"of the folder, or choose another --out"):
        folder.file("examples/mine.png")
    assert folder.remove(under="examples") == ["examples/a.png", "examples/b.png"]
    assert not (tmp_path / "out" / "examples" / "a.png").exists() and (tmp_path / "out" / "browse" / "0.png").exists()
    assert folder.remove(keep=["compare.md"]) == ["browse/0.png"]
    assert (tmp_path / "out" / "compare.md").read_text() == "kdcache"
    unchanged(mine)
    assert OutputFolder.check(tmp_path / "out", "comparison").files == {"compare.md"}
    with pytest.raises(ValueError):
        folder.file("../escape.txt")


def test_a_run_folder_of_an_earlier_kdcache_is_adopted_and_nothing_else(tmp_path):
    from kdcache.core.runs import RunDir

    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"kind": "supervised", "kdcache_version": "0.0.9"}))
    (old / "last.pt").write_bytes(b"checkpoint")
    (old / "notes.txt").write_text("mine")
    found = RunDir(old).check()
    assert found is not None and found.files == {"config.json", "last.pt"}
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"my": "settings"}))  # a config.json kdcache did not write
    with pytest.raises(OutputError, match="is a folder of files kdcache did not write"):
        RunDir(theirs).check()


def test_a_file_is_kdcaches_by_its_signature(tmp_path):
    mine = plant({tmp_path / "a.json": b'{"mine": 1}', tmp_path / "a.md": b"# mine\n", tmp_path / "a.onnx": b"m"})
    for path in mine:
        assert not own_file(path)
        with pytest.raises(OutputError, match="exists and kdcache did not write it; give another file name"):
            output_file(path, "--json")
    (tmp_path / "b.json").write_text(json.dumps({"kdcache_output": "inspect-cache"}))
    (tmp_path / "b.md").write_text("<!-- written by kdcache bench-kernels 0.1.0: it may replace this file -->\n# x\n")
    assert own_file(tmp_path / "b.json") and own_file(tmp_path / "b.md")
    # any other file: kdcache's when its sidecar records its SHA-256, and only while the file is unchanged
    import hashlib

    (tmp_path / "m.onnx").write_bytes(b"graph")
    sidecar_path(tmp_path / "m.onnx").write_text(json.dumps({"kdcache_output": "export",
                                                              "sha256": hashlib.sha256(b"graph").hexdigest()}))
    assert own_file(tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_bytes(b"graph, edited by its user")
    assert not own_file(tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        output_file(tmp_path, "--json")
    assert output_file(tmp_path / "new" / "c.json", "--json") == tmp_path / "new" / "c.json"
    assert (tmp_path / "new").is_dir()
