"""Every example of the README and the documentation pages runs as written, in page order, as a
newcomer would run them.

A page's examples chain: a later one reads what an earlier one wrote (runs, caches), in a working
folder of the page's own (getting started shares the README's: :data:`SAME_FOLDER`; with a copy
of ``recipes/``), with ``~`` a home folder holding the data
sets and weights files they name (``~/data/VOCdevkit``, ``~/data/CamVid``, ``~/weights/mit-b0``,
torch's hub cache), written small by ``doc_examples`` as users' data are shaped. Each ``kdcache`` command runs through the real command line at a small size
(``doc_examples.small``: one epoch, 4 images a split, smaller images), and must end with exit
status 0 and no traceback. Python blocks run whole, ``# FILE — COMMAND`` config blocks are
written and then run. What cannot run here is listed below by name, with where it is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from cli_runner import kd
from doc_examples import config_values, examples, small, split_env, write_home_data, write_page_data

REPO = Path(__file__).resolve().parents[1]
#: every page with examples, in the order a newcomer reads them
PAGES = [REPO / "README.md", REPO / "docs" / "getting-started.md",
         *[REPO / "docs" / "guides" / f"{name}.md" for name in (
             "segmentation", "unlabelled", "classification", "ensembles", "scaling-out", "cache-format")],
         *[REPO / "docs" / "recipes" / f"{name}.md" for name in (
             "camvid-segformer", "voc-fcn-mobilenet", "pseudo-label-frames")]]
EXAMPLES = [e for page in PAGES for e in examples(page, str(page.relative_to(REPO)))]

ENVIRONMENT = "sets up or inspects the environment (CI's own steps: .ci/run)"
TORCHRUN = "several processes: tests/test_ddp.py and tests/test_cache.py run torchrun on the CPU"
OBJECT_STORE = "an object store: tests/test_s3.py runs these against moto's S3 server, tests/test_remote.py at memory://"
#: the commands that do not run here, by name, and why
SKIPPED = {
    "python3 -m venv .venv": ENVIRONMENT,
    ". .venv/bin/activate": ENVIRONMENT,
    "pip install .": ENVIRONMENT,
    "pip install -e '.[dev]'": ENVIRONMENT,
    "python -m pytest -m 'not slow' -n 2 --dist loadfile": ENVIRONMENT,
    "bash .ci/run": ENVIRONMENT,
    "pip install 'kdcache[tensorboard]'": ENVIRONMENT,
    "tensorboard --logdir runs": "TensorBoard's own viewer (tests/test_loggers.py reads the event files)",
    "torchrun --nproc-per-node 4 -m kdcache build-teacher-cache --weights runs/t --out caches/t.zarr": TORCHRUN,
    "kdcache build-teacher-cache --weights runs/teacher --out s3://my-bucket/caches/train.zarr": OBJECT_STORE,
    "export FSSPEC_S3_ENDPOINT_URL=https://minio.example.org:9000": OBJECT_STORE,
    "export 'AWS_ACCESS_KEY_ID=…' 'AWS_SECRET_ACCESS_KEY=…'": OBJECT_STORE,
    "kdcache train-student --cache s3://my-bucket/caches/train.zarr --workers 8 --out runs/student-dist": OBJECT_STORE,
    "torchrun --nproc-per-node 4 -m kdcache train-student --cache s3://my-bucket/caches/train.zarr --batch-size 8 "
    "--out runs/student-dist": TORCHRUN,
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
UNWRITTEN: set[tuple[str, str]] = set()  # (page, path)


def _compare_has_a_baseline(cwd: Path) -> None:
    data = json.loads((cwd / "runs" / "compare" / "compare.json").read_text())
    assert data["baseline"] == "runs/student-ce" and data["split"] == "test"
    assert all(r["delta_miou"] is not None for r in data["rows"])  # a Δ column, not dashes


def _frames_were_trained_on(cwd: Path) -> None:
    last = json.loads((cwd / "runs" / "student-dist-frames" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train_unlabeled_seen"] > 0 and last["train_dist"] > 0


def _pool_of_pets_was_trained_on(cwd: Path) -> None:
    last = json.loads((cwd / "runs" / "mnv3-dist-pool" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train_unlabeled_distinct"] > 0 and last["train_dist"] > 0


#: what an example must have done beyond exiting 0, by the start of its command
CHECKS = {
    "kdcache compare runs/teacher runs/student-ce": _compare_has_a_baseline,
    "kdcache train-student --cache caches/train.zarr --unlabeled-cache caches/frames.zarr": _frames_were_trained_on,
    "kdcache train-student --cache caches/pets.zarr --unlabeled-cache caches/pets-pool.zarr": _pool_of_pets_was_trained_on,
}


def why_skipped(example, cwd: Path) -> str | None:
    if example.text in SKIPPED:
        return SKIPPED[example.text]
    words = split_env(example.argv)[1] if example.argv else []
    # what a --config file sets counts as written on the command line
    words = words + [str(v) for value in config_values(words, cwd).values()
                     for v in (value if isinstance(value, list) else [value])]
    out = words[words.index("--out") + 1] if "--out" in words[:-1] else None
    for needs, extra, package in EXTRAS:
        if needs(words) and importlib.util.find_spec(package) is None:
            if out:
                UNWRITTEN.add((example.page, out))
            return f"the {extra} extra is not installed here (pip install \"kdcache[{extra}]\")"
    upstream = next((w for w in words for page, u in UNWRITTEN
                     if page == example.page and (w == u or w.startswith(u + "/"))), None)
    if upstream:
        if out:
            UNWRITTEN.add((example.page, out))
        return f"reads {upstream}, which an example skipped for a missing extra would have written"
    return None


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The home folder (``~``) every page's examples share: data sets and weights files."""
    home = tmp_path_factory.mktemp("home")
    write_home_data(home)
    return home


#: pages a newcomer reads one after the other in one folder: getting-started repeats the README's
#: `kdcache demo`, which there finds its runs done and skips them (the rerun the pages promise)
SAME_FOLDER = {"docs/getting-started.md": "README.md"}


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """A working folder per page (or per :data:`SAME_FOLDER` group), made when its first example runs."""
    shared, made = tmp_path_factory.mktemp("shared"), {}

    def get(page: str) -> Path:
        page = SAME_FOLDER.get(page, page)
        if page not in made:
            cwd = tmp_path_factory.mktemp("newcomer")
            write_page_data(cwd, shared)
            shutil.copytree(REPO / "recipes", cwd / "recipes")
            made[page] = cwd
        return made[page]

    return get


def test_every_page_is_listed():
    """Every page of the docs with a command or code example is one the examples come from."""
    with_examples = {p for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")] if examples(p)}
    assert with_examples <= set(PAGES), sorted(str(p.relative_to(REPO)) for p in with_examples - set(PAGES))


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
def test_example(example, home, workspaces, monkeypatch):
    cwd = workspaces(example.page)
    reason = why_skipped(example, cwd)
    if reason:
        pytest.skip(reason)
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
    args = [os.path.expanduser(w) if w.startswith("~") else w for w in small(words[1:], cwd)]
    r = kd(*args)
    assert r.exit_code == 0 and "Traceback" not in r.output, f"{example.name}\n$ kdcache {' '.join(args)}\n{r.output}"
    for start, check in CHECKS.items():
        if example.text.startswith(start):
            check(cwd)


def test_every_check_names_an_example():
    assert all(any(e.text.startswith(start) for e in EXAMPLES) for start in CHECKS)
