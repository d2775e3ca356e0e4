"""Every example of the README runs as written, in page order, as a newcomer would run them.

The examples chain: a later one reads what an earlier one wrote (runs, caches), in one working
folder, with ``~`` a home folder holding the data sets they name (``~/data/VOCdevkit``,
``~/data/CamVid``), written small by ``doc_examples.write_example_data`` as users' data are
shaped. Each ``kdcache`` command runs through the real command line at a small size
(``doc_examples.small``: one epoch, 4 images a split, smaller images), and must end with exit
status 0 and no traceback. Python blocks run whole, ``# FILE — COMMAND`` config blocks are
written and then run. What cannot run here is listed below by name, with where it is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from cli_runner import kd
from doc_examples import examples, small, split_env, write_example_data

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"]
EXAMPLES = [e for page in PAGES for e in examples(page, str(page.relative_to(REPO)))]

ENVIRONMENT = "sets up or inspects the environment (CI's own steps: .ci/run)"
TORCHRUN = "several processes: tests/test_ddp.py and tests/test_cache.py run torchrun on the CPU"
OBJECT_STORE = "an object store: tests/test_remote.py runs a store at an fsspec URL"
#: the commands that do not run here, by name, and why
SKIPPED = {
    "python3 -m venv .venv": ENVIRONMENT,
    ". .venv/bin/activate": ENVIRONMENT,
    "pip install -e '.[dev]'": ENVIRONMENT,
    "pip install -e '.[dev,hf,smp,onnx,tensorboard,timm]'": ENVIRONMENT,
    "ruff check .": ENVIRONMENT,
    "KDCACHE_ERROR_COVERAGE=1 python -m pytest -q -n 2 --dist loadfile": ENVIRONMENT,
    "pip install 'kdcache[tensorboard]'": ENVIRONMENT,
    "tensorboard --logdir runs": "TensorBoard's own viewer (tests/test_loggers.py reads the event files)",
    "torchrun --nproc-per-node 4 -m kdcache build-teacher-cache --weights runs/t --out caches/t.zarr": TORCHRUN,
    "kdcache build-teacher-cache --weights runs/teacher --out s3://my-bucket/caches/train.zarr": OBJECT_STORE,
    "kdcache train-student --cache s3://my-bucket/caches/train.zarr --workers 8 --out runs/student-kl": OBJECT_STORE,
    "torchrun --nproc-per-node 4 -m kdcache train-student --cache s3://my-bucket/caches/train.zarr --batch-size 8 "
    "--out runs/student-kl": TORCHRUN,
}
#: what an example's words need that an optional extra installs: (test, extra, package)
EXTRAS = [
    (lambda w: "--wandb" in w, "wandb", "wandb"),
    (lambda w: "--tensorboard" in w, "tensorboard", "tensorboard"),
    (lambda w: any(x.startswith("segformer_") for x in w), "hf", "transformers"),
    (lambda w: any(x.startswith("smp_") for x in w), "smp", "segmentation_models_pytorch"),
    (lambda w: any(x.startswith("timm/") for x in w), "timm", "timm"),
    (lambda w: "onnxruntime" in w or (len(w) > 1 and w[1] == "export" and "--format" not in w), "onnx",
     "onnxruntime"),
    (lambda w: "safetensors" in w, "safetensors", "safetensors"),
]
#: the outputs of examples skipped for a missing extra: later examples that read them skip too
UNWRITTEN: set[str] = set()


def _compare_has_a_baseline(cwd: Path) -> None:
    data = json.loads((cwd / "runs" / "compare" / "compare.json").read_text())
    assert data["baseline"] == "runs/student-ce" and data["split"] == "test"
    assert all(r["delta_miou"] is not None for r in data["rows"])  # a Δ column, not dashes


def _frames_were_trained_on(cwd: Path) -> None:
    last = json.loads((cwd / "runs" / "student-dist-frames" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train_unlabeled_seen"] > 0 and last["train_dist"] > 0


#: what an example must have done beyond exiting 0, by the start of its command
CHECKS = {
    "kdcache compare runs/teacher runs/student-ce": _compare_has_a_baseline,
    "kdcache train-student --cache caches/train.zarr --unlabeled-cache caches/frames.zarr": _frames_were_trained_on,
}


def why_skipped(example) -> str | None:
    if example.text in SKIPPED:
        return SKIPPED[example.text]
    words = split_env(example.argv)[1] if example.argv else []
    for needs, extra, package in EXTRAS:
        if needs(words) and importlib.util.find_spec(package) is None:
            if "--out" in words:
                UNWRITTEN.add(words[words.index("--out") + 1])
            return f"the {extra} extra is not installed here (pip install \"kdcache[{extra}]\")"
    upstream = next((w for w in words for u in UNWRITTEN if w == u or w.startswith(u + "/")), None)
    if upstream:
        return f"reads {upstream}, which an example skipped for a missing extra would have written"
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """(the working folder, the home folder) with the data the examples read."""
    cwd, home = tmp_path_factory.mktemp("newcomer"), tmp_path_factory.mktemp("home")
    write_example_data(cwd, home)
    return cwd, home


def test_every_skip_is_listed_and_still_in_the_docs():
    shell = {e.text for e in EXAMPLES if e.kind == "shell"}
    assert set(SKIPPED) <= shell, f"listed but no longer in the docs: {set(SKIPPED) - shell}"
    for e in EXAMPLES:
        words = " ".join(e.argv)
        if e.kind == "shell" and ("s3://" in words or "gs://" in words or e.argv[0] == "torchrun"):
            assert e.text in SKIPPED, e.name
        if e.kind == "shell" and e.argv and split_env(e.argv)[1][0] != "kdcache":
            assert e.text in SKIPPED, f"{e.name}: only kdcache commands run here; list it in SKIPPED"


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name[:100] for e in EXAMPLES])
def test_example(example, workspace, monkeypatch):
    reason = why_skipped(example)
    if reason:
        pytest.skip(reason)
    cwd, home = workspace
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    if example.kind == "python":
        exec(compile(example.text, example.name, "exec"), {"__name__": "__doc_example__"})
        return
    if example.kind == "file":
        (cwd / example.file).write_text(example.content)
    env, words = split_env(example.argv)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert words[0] == "kdcache", example.name
    args = [os.path.expanduser(w) if w.startswith("~") else w for w in small(words[1:])]
    r = kd(*args)
    assert r.exit_code == 0 and "Traceback" not in r.output, f"{example.name}\n$ kdcache {' '.join(args)}\n{r.output}"
    for start, check in CHECKS.items():
        if example.text.startswith(start):
            check(cwd)


def test_every_check_names_an_example():
    assert all(any(e.text.startswith(start) for e in EXAMPLES) for start in CHECKS)
