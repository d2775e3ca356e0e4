"""Model registry, native-stride logits, feature taps and checkpoint round trips."""

import subprocess
import sys
import textwrap

import pytest
import torch

from kdcache.core.checkpoint import load_weights, read_checkpoint, save_checkpoint
from kdcache.core.errors import CheckpointError, ModelError
from kdcache.models import MODELS, build_model, count_parameters


def test_registry_lists_torchvision_and_builtin_models():
    names = MODELS.names()
    for n in ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
              "lraspp_mobilenet_v3_large", "demo_teacher", "demo_student"):
        assert n in names


@pytest.mark.slow  # new Python processes
def test_torchvision_is_imported_when_a_name_needs_it_not_at_start_up():
    """A command on the built-in networks starts without torchvision, torch._dynamo (which
    torchvision's ops import), matplotlib or Numba (the loss and resampling kernels import it on
    first use); looking up a torchvision name imports it and builds
    that network, run as torchvision's own class (logits at its native stride). In a fresh
    interpreter: this test session has imported them all already."""
    code = textwrap.dedent("""
        import sys
        import torch
        import kdcache.cli.app, kdcache.train.student, kdcache.train.trainer, kdcache.teacher.cache_build
        from kdcache.models import MODELS, build_model
        heavy = ("torchvision", "torch._dynamo", "matplotlib", "numba")
        assert build_model("demo_student", 3)(torch.zeros(1, 3, 32, 32)).logits.shape[1] == 3
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        assert "fcn_resnet50" in MODELS and "resnet18" in MODELS.names()
        assert "torchvision" in sys.modules
        out = build_model("fcn_resnet50", 5).eval()(torch.zeros(1, 3, 64, 64))
        assert out.logits.shape == (1, 5, 8, 8), out.logits.shape
        assert build_model("resnet18", 7)(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 7, 1, 1)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match="Did you mean demo_teacher"):
        build_model("demo_teacherr", 11)


@pytest.mark.parametrize("name,stride", [("lraspp_mobilenet_v3_large", 8), ("deeplabv3_mobilenet_v3_large", 16)])
def test_torchvision_models_give_native_stride_logits_and_taps(name, stride):
    torch.manual_seed(0)
    model = build_model(name, 5, taps=["backbone"]).eval()
    x = torch.randn(1, 3, 64, 96)
    out = model(x)
    assert out.logits.shape == (1, 5, 64 // stride, 96 // stride)
    assert "backbone" in out.features
    # the wrapper's logits are the net's own output before its final upsampling
    with torch.no_grad():
        full = model.net(x)["out"]
    up = torch.nn.functional.interpolate(out.logits, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, full)
    assert model.predict(x).shape == (1, 64, 96)


def test_feature_tap_by_module_name_captures_that_module_output():
    model = build_model("tiny_models:TinyNet", 3, taps=["body.0", "body"])
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    torch.testing.assert_close(out.features["body.0"], model.net.body[0](x))
    assert out.features["body"].shape == (2, 8, 8, 8)
    assert out.logits.shape == (2, 3, 8, 8)


def test_unknown_tap_names_close_matches():
    with pytest.raises(ModelError, match="no module 'body.9'.*body.0"):
        build_model("tiny_models:TinyNet", 3, taps=["body.9"])


def test_import_path_errors():
    with pytest.raises(ModelError, match="cannot import module 'no_such_mod'"):
        build_model("no_such_mod:Net", 3)
    with pytest.raises(ModelError, match="has no attribute 'Missing'"):
        build_model("tiny_models:Missing", 3)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model("tiny_models:not_a_module", 3)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    a = build_model("tiny_models:TinyNet", 4)
    path = save_checkpoint(tmp_path / "m.pt", a, epoch=3, config={"lr": 0.1})
    b = build_model("tiny_models:TinyNet", 4)
    ck = load_weights(b, path)
    assert ck["epoch"] == 3 and ck["config"] == {"lr": 0.1} and ck["num_classes"] == 4
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(a(x).logits, b(x).logits)


def test_plain_state_dict_loads_with_or_without_prefixes(tmp_path):
    a = build_model("tiny_models:TinyNet", 4)
    torch.save(a.net.state_dict(), tmp_path / "plain.pt")
    torch.save({f"module.{k}": v for k, v in a.net.state_dict().items()}, tmp_path / "ddp.pt")
    torch.save({"state_dict": a.net.state_dict()}, tmp_path / "wrapped.pt")
    for f in ("plain.pt", "ddp.pt", "wrapped.pt"):
        b = build_model("tiny_models:TinyNet", 4)
        load_weights(b, tmp_path / f)
        assert torch.equal(b.net.head.weight, a.net.head.weight)


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    a = build_model("tiny_models:TinyNet", 21)
    save_checkpoint(tmp_path / "voc.pt", a)
    b = build_model("tiny_models:TinyNet", 11)
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(21, 8, 1, 1\) vs model \(11, 8, 1, 1\).*trained for 21 classes, the model has 11"):
        load_weights(b, tmp_path / "voc.pt")


def test_key_mismatch_names_keys(tmp_path):
    a = build_model("tiny_models:TinyNet", 3)
    sd = a.net.state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"missing.*head.bias.*unexpected.*extra.weight"):
        load_weights(build_model("tiny_models:TinyNet", 3), tmp_path / "odd.pt")


def test_unreadable_or_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    a = build_model("tiny_models:TinyNet", 3)
    save_checkpoint(tmp_path / "ok.pt", a)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*cut.pt as a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    read_checkpoint(tmp_path / "ok.pt")  # the untruncated file reads


def test_count_parameters():
    m = build_model("tiny_models:TinyNet", 3)
    assert count_parameters(m) == (3 * 8 * 9 + 8) + (8 * 3 + 3)


@pytest.mark.slow  # torchvision's DeepLabV3 with its auxiliary head, trained and cached
def test_torchvision_checkpoint_with_its_auxiliary_head_loads(tmp_path):
    """torchvision publishes FCN and DeepLabV3 weights with ``aux_classifier.*``: a teacher built
    without the head loads them (the head left out, with a note), one built with -m aux_loss=true
    keeps it; the cached logits are torchvision's own head on its own backbone."""
    import json

    from cli_runner import kd
    from torchvision.models import segmentation

    from kdcache.pipeline.transforms import Preprocess
    from kdcache.store import CacheStore

    torch.manual_seed(0)
    net = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11,
                                                    aux_loss=True).eval()
    sd = net.state_dict()
    assert sum(k.startswith("aux_classifier.") for k in sd) == 8
    torch.save(sd, tmp_path / "deeplabv3_mobilenet_v3_large_coco.pth")
    data = ["--dataset", "synthetic", "--resolution", "32x48", "--limit", 2, "--quiet"]
    r = kd("build-teacher-cache", "--teacher", "deeplabv3_mobilenet_v3_large", "--weights",
           tmp_path / "deeplabv3_mobilenet_v3_large_coco.pth", "--topk", 2, "--out", tmp_path / "c.zarr", *data)
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "left out 8 tensors of the auxiliary head (aux_classifier.*)" in r.output
    from kdcache.data import build_dataset

    image, _ = build_dataset("synthetic", "train", None, resolution=[32, 48]).load(0)
    x = Preprocess().image_to_tensor(image)[None]
    with torch.no_grad():
        want = net.classifier(net.backbone(x)["out"])
    got = CacheStore(tmp_path / "c.zarr").read(0)
    torch.testing.assert_close(torch.from_numpy(got["logits/values"][0]).float(), want.max(1).values[0],
                               rtol=2e-3, atol=2e-3)
    r = kd("train-teacher", "--model", "deeplabv3_mobilenet_v3_large", "-m", "aux_loss=true", "--weights",
           tmp_path / "deeplabv3_mobilenet_v3_large_coco.pth", "--epochs", 1, "--batch-size", 2, "--out",
           tmp_path / "run", *data)
    assert r.exit_code == 0, r.output
    assert "auxiliary head" not in r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_options"] == {"aux_loss": True}


def test_weights_sha256_is_the_weights_alone(tmp_path):
    """Two checkpoints of the same weights with other epochs and configs share weights_sha256 (their
    files' sha256 differ); other weights do not; the value is SHA-256 over name and bytes in name order."""
    import hashlib

    from kdcache.models.loading import open_weights

    model = build_model("demo_student", 11)
    save_checkpoint(tmp_path / "a.pt", model, config={"model": "demo_student", "num_classes": 11}, epoch=1)
    save_checkpoint(tmp_path / "b.pt", model, config={"model": "demo_student", "num_classes": 11, "note": "x"},
                    epoch=7)
    a, b = open_weights(str(tmp_path / "a.pt")), open_weights(str(tmp_path / "b.pt"))
    assert a.sha256() != b.sha256() and a.weights_sha256() == b.weights_sha256()
    h = hashlib.sha256()
    for name, t in sorted(getattr(model, "net", model).state_dict().items()):  # what save_checkpoint keeps
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    assert a.weights_sha256() == h.hexdigest()
    with torch.no_grad():
        next(model.parameters()).add_(1)
    save_checkpoint(tmp_path / "c.pt", model, config={"model": "demo_student", "num_classes": 11}, epoch=1)
    assert open_weights(str(tmp_path / "c.pt")).weights_sha256() != a.weights_sha256()
