"""kdcache export (ONNX, safetensors, TorchScript) and evaluate --backend onnxruntime, through the CLI.

Each exported file is loaded back with its own runtime and compared with the PyTorch model built
from the run's weights, on random inputs at batch sizes other than the one the export traced.
"""

import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from cli_runner import kd

from kdcache.models import build_model
from kdcache.models.loading import open_weights

# the onnx and safetensors extras: without them this file is skipped, not a collection error
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
safe_open = pytest.importorskip("safetensors").safe_open
load_file = pytest.importorskip("safetensors.torch").load_file

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SIZE = (32, 48)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo_student trained for 2 epochs on 16 synthetic images (predictions that vary by pixel)."""
    out = tmp_path_factory.mktemp("export") / "run"
    r = kd("train-teacher", "--model", "demo_student", "--dataset", "synthetic", "--resolution", "x".join(map(str, SIZE)),
           "--limit", 16, "--batch-size", 4, "--epochs", 2, "--lr", 0.01, "--workers", 0, "--device", "cpu",
           "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def torch_logits(run, x: torch.Tensor) -> torch.Tensor:
    model = open_weights(run).build(device="cpu")
    with torch.no_grad():
        return model(x).logits


def images(n: int, size=SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def one_error_line(result) -> str:
    out = ANSI.sub("", result.output)
    lines = [line for line in out.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_onnx_export_matches_pytorch_at_any_batch_size(run):
    r = kd("export", run, "--format", "onnx")
    assert r.exit_code == 0, r.output
    path = run / "export" / "model.onnx"
    meta = json.loads((run / "export" / "model.onnx.json").read_text())
    printed = float(re.search(r"max abs diff (\S+) vs PyTorch", ANSI.sub("", r.output).replace("\n", " ")).group(1))
    assert printed == pytest.approx(meta["check"]["max_abs_diff"], rel=1e-2, abs=1e-12)
    config = json.loads((run / "config.json").read_text())
    assert meta["model"] == "demo_student" and meta["num_classes"] == 11 and meta["opset"] == 17
    assert meta["class_names"] == config["class_names"] and meta["input_size"] == list(SIZE)
    assert meta["output_stride"] == [4.0, 4.0] and meta["output"]["name"] == "logits"
    assert meta["preprocess"]["mean"] == config["preprocess"]["mean"]
    assert meta["preprocess"]["std"] == config["preprocess"]["std"]
    assert meta["check"]["batch_sizes"] == [1, 2] and meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"]
    assert meta["check"]["tolerance"] == pytest.approx(1e-4 * max(1.0, meta["check"]["logit_scale"]))

    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["logits"]
    assert json.loads({p.key: p.value for p in graph.metadata_props}["kdcache"])["model"] == "demo_student"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 5):  # 3 and 5: sizes the export never saw
        x = images(n, seed=n)
        got = session.run(["logits"], {"image": x.numpy()})[0]
        ref = torch_logits(run, x).numpy()
        assert got.shape == ref.shape == (n, 11, 8, 12)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        assert not np.array_equal(ref.argmax(1), np.zeros_like(ref.argmax(1)))  # not a constant model


def test_onnx_input_size_and_opset(run, tmp_path):
    out = tmp_path / "wide.onnx"
    r = kd("export", run, "--format", "onnx", "--input-size", "64x96", "--opset", 13, "--out", out)
    assert r.exit_code == 0, r.output
    graph = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 96]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 13
    assert json.loads(out.with_name("wide.onnx.json").read_text())["output_stride"] == [4.0, 4.0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = images(2, (64, 96))
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - torch_logits(run, x).numpy()).max() <= 1e-4
    # exporting again over an earlier export is fine; over someone's file it is refused
    assert kd("export", run, "--input-size", "64x96", "--out", out).exit_code == 0
    mine = tmp_path / "mine.onnx"
    mine.write_text("keep")
    line = one_error_line(kd("export", run, "--out", mine))
    assert "mine.onnx exists and kdcache did not write it; give another file name" in line
    assert mine.read_text() == "keep"


def test_safetensors_loads_into_a_freshly_built_model(run):
    r = kd("export", run, "--format", "safetensors")
    assert r.exit_code == 0, r.output
    path = run / "export" / "model.safetensors"
    fresh = build_model("demo_student", 11)
    fresh.net.load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, torch_logits(run, x))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kdcache"])
    assert meta["format"] == "safetensors" and meta["check"]["max_abs_diff"] == 0.0
    sidecar = json.loads((run / "export" / "model.safetensors.json").read_text())
    # the sidecar: the file's own metadata, and its SHA-256 (what tells it as kdcache's: kdcache/core/outputs.py)
    assert meta == {k: v for k, v in sidecar.items() if k != "sha256"}
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the same permissions as the other exports and its sidecar (safetensors' save_file made it 0600)
    assert path.stat().st_mode & 0o777 == (run / "export" / "model.safetensors.json").stat().st_mode & 0o777
    assert path.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_loads_without_kdcache_and_gives_the_same_logits(run):
    r = kd("export", run, "--format", "torchscript")
    assert r.exit_code == 0, r.output
    extra = {"kdcache.json": ""}
    loaded = torch.jit.load(str(run / "export" / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["kdcache.json"])["input_size"] == list(SIZE)
    for n in (1, 3):
        x = images(n, seed=n)
        with torch.no_grad():
            assert torch.allclose(loaded(x), torch_logits(run, x), rtol=0, atol=1e-6)


@pytest.mark.slow  # ONNX export and ONNX Runtime
def test_evaluate_with_onnxruntime_gives_the_torch_metrics(run, tmp_path):
    r = kd("evaluate", run, "--qualitative", 0, "--quiet", "--out", tmp_path / "torch")
    assert r.exit_code == 0, r.output
    r = kd("evaluate", run, "--backend", "onnxruntime", "--qualitative", 2, "--quiet", "--out", tmp_path / "ort")
    assert r.exit_code == 0, r.output
    assert "ONNX Runtime" in ANSI.sub("", r.output)
    a = json.loads((tmp_path / "torch" / "eval.json").read_text())
    b = json.loads((tmp_path / "ort" / "eval.json").read_text())
    assert a["backend"] == "torch" and b["backend"] == "onnxruntime"
    assert b["onnx"]["file"] == str(run / "export" / "model.onnx") and (run / "export" / "model.onnx").is_file()
    assert b["onnx"]["provider"] == "CPUExecutionProvider"
    assert 0.01 < a["miou"] < 1 and b["miou"] == pytest.approx(a["miou"], abs=1e-6)
    assert b["iou"] == pytest.approx(a["iou"], abs=1e-6, nan_ok=True) and b["aacc"] == pytest.approx(a["aacc"], abs=1e-6)
    assert b["params"] == a["params"] > 0
    assert b["latency"]["ms_per_image"] > 0 and b["latency"]["input_size"] == list(SIZE)
    assert len(list((tmp_path / "ort" / "best").glob("*.png"))) == 2
    # an explicit --onnx file is used as given
    r = kd("evaluate", run, "--backend", "onnxruntime", "--onnx", run / "export" / "model.onnx", "--no-latency",
           "--qualitative", 0, "--quiet", "--out", tmp_path / "ort2")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ort2" / "eval.json").read_text())["miou"] == pytest.approx(a["miou"], abs=1e-6)


@pytest.mark.slow  # ONNX export and latency rounds
def test_compare_with_onnxruntime_shows_deployed_latency(run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("export*"))
    r = kd("compare", run, other, "--no-per-class", "--examples", 1, "--quiet", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    r = kd("compare", run, other, "--backend", "onnxruntime", "--no-per-class", "--examples", 1, "--quiet",
           "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "t" / "compare.json").read_text())
    b = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert a["backend"] == "torch" and b["backend"] == "onnxruntime"
    assert (other / "export" / "model.onnx").is_file()  # each run exported for it
    for x, y in zip(a["rows"], b["rows"]):
        assert y["miou"] == pytest.approx(x["miou"], abs=1e-6) and y["ms_per_image"] > 0
    assert "with ONNX Runtime" in (tmp_path / "o" / "compare.md").read_text()


def test_a_graph_that_does_not_match_pytorch_is_refused(tmp_path):
    """A model whose forward branches on the batch size traces to one branch: the check at batch 1
    catches the difference, and no file is left behind."""
    from fake_data import make_teacher

    weights = make_teacher(tmp_path / "weights.pt", name="tiny_models:BatchDependent")
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"model.{fmt}"
        line = one_error_line(kd("export", weights, "--format", fmt, "--input-size", "16x16", "--out", out))
        assert f"the {fmt} export of 'tiny_models:BatchDependent' differs from PyTorch at batch 1" in line
        assert "its forward likely branches on its input" in line
        assert not out.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("missing, args, message", [
    ("onnxruntime", ["--format", "onnx"], 'error: ONNX export needs onnx and onnxruntime: pip install "kdcache[onnx]"'),
    ("onnx", ["--format", "onnx"], 'error: ONNX export needs onnx and onnxruntime: pip install "kdcache[onnx]"'),
    ("safetensors", ["--format", "safetensors"],
     'error: safetensors export needs safetensors: pip install "kdcache[safetensors]"'),
])
def test_a_missing_extra_is_one_line(run, tmp_path, monkeypatch, missing, args, message):
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setitem(sys.modules, missing, None)
    assert one_error_line(kd("export", run, *args, "--out", tmp_path / "m")) == message
    assert not (tmp_path / "m").exists()


def test_evaluate_without_onnxruntime_is_one_line(run, tmp_path, monkeypatch):
    onnx_file = run / "export" / "model.onnx"
    if not onnx_file.exists():
        assert kd("export", run).exit_code == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    line = one_error_line(kd("evaluate", run, "--backend", "onnxruntime", "--onnx", onnx_file, "--quiet",
                             "--out", tmp_path / "ev"))
    assert line == 'error: the onnxruntime backend needs onnxruntime: pip install "kdcache[onnx]"'
