"""Our users' models and weight files: SegFormer (transformers), segmentation_models_pytorch,
Hugging Face folders, safetensors, mmsegmentation checkpoints, encoders from local files.

Each format is written here by the library that owns it (``save_pretrained``, safetensors,
``torch.save`` with mmsegmentation's key names taken from mmsegmentation's source), and each model
must give the same logits through kdcache as through its own library on the same input."""

import importlib
import importlib.util
import json
import pickle
import sys
import types

import pytest
import torch
from cli_runner import kd
from fake_data import make_mixed_size_folders

from kdcache.core.errors import CheckpointError, MissingExtraError, ModelError
from kdcache.models import build_model, model_groups
from kdcache.models.backbone_weights import load_backbone, pretrained_backbone_file
from kdcache.models.loading import open_weights

EXTRAS = ("transformers", "segmentation_models_pytorch", "safetensors")
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in EXTRAS),
                                reason='pip install "kdcache[hf,smp]": transformers, segmentation_models_pytorch, '
                                       'safetensors')


class _OnFirstUse:
    """A module imported when a test first reaches into it, not while pytest collects every file
    (segmentation_models_pytorch takes seconds to import, in each xdist worker)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("_"):  # what pytest probes each module-level name for while collecting
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


transformers = _OnFirstUse("transformers")
smp = _OnFirstUse("segmentation_models_pytorch")
safetensors_torch = _OnFirstUse("safetensors.torch")

SYN = ["--dataset", "synthetic", "--resolution", "32x48", "--limit", "4", "--batch-size", "2", "--workers", "0",
       "--quiet", "--epochs", "1"]


def randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so that a BN loaded wrongly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def hf_segformer(num_labels=5, **kw):
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=num_labels, **kw)
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    randomise_bn(model)
    return model


# -- SegFormer through transformers --------------------------------------------------------------------------------


def test_hf_folder_gives_transformers_own_logits(tmp_path):
    hf = hf_segformer()
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors, as users download them
    x = torch.randn(2, 3, 64, 96)
    w = open_weights(tmp_path / "hf")
    assert (w.arch, w.num_classes) == ("segformer_b0", 5)
    ours = w.build(num_classes=5, taps=["segformer.stages.3", "decode_head.linear_fuse"])
    with torch.no_grad():
        out, ref = ours(x), hf(pixel_values=x).logits
    assert out.logits.shape == (2, 5, 16, 24)  # native stride 4
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    assert out.features["segformer.stages.3"].shape == (2, 256, 2, 3)
    assert out.features["decode_head.linear_fuse"].shape == (2, 256, 16, 24)


#: SegFormer's parameter counts as its paper publishes them (Xie et al. 2021, Table 1: the whole
#: model on ADE20K, 150 classes), in millions: a check of the built architectures independent of
#: transformers' own code
PAPER_PARAMS_M = {"segformer_b0": 3.8, "segformer_b1": 13.7, "segformer_b2": 27.5, "segformer_b3": 47.3,
                  "segformer_b4": 64.1, "segformer_b5": 84.7}


@pytest.mark.slow  # builds SegFormer B0-B5
def test_segformer_variants_match_the_paper():
    # SegFormer Table 1 / Table 6: B2 has MiT-B2 (depths 3-4-6-3) and a 768-channel MLP head
    b2 = build_model("segformer_b2", 19)
    assert [len(s.blocks) for s in b2.net.segformer.stages] == [3, 4, 6, 3]
    assert b2.net.decode_head.linear_fuse.out_channels == 768
    for name, published in PAPER_PARAMS_M.items():
        params = sum(p.numel() for p in build_model(name, 150).parameters())
        assert round(params / 1e6, 1) == published, (name, params)


def mmseg_names(sd: dict) -> dict:
    """kdcache's mmseg-head SegFormer state dict under mmsegmentation's own key names, written from
    mmseg/models/backbones/mit.py (layers[i] = [PatchEmbed(projection, norm), [TransformerEncoderLayer
    (norm1, attn = EfficientMultiheadAttention(attn = nn.MultiheadAttention, sr, norm), norm2, ffn = MixFFN
    (layers = [fc1 1x1, pe_conv 3x3, act, drop, fc2 1x1, drop]))], norm]) and decode_heads/segformer_head.py
    (convs[i] and fusion_conv ConvModules: conv + bn; conv_seg)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("decode_head."):
            out[k] = v
            continue
        p = k.split(".")  # segformer.stages.{i}....
        i = p[2]
        if p[3] == "patch_embeddings":
            out[f"backbone.layers.{i}.0.{ {'proj': 'projection', 'layer_norm': 'norm'}[p[4]]}.{p[5]}"] = v
        elif p[3] == "layer_norm":
            out[f"backbone.layers.{i}.2.{p[4]}"] = v
        else:
            j, rest, leaf = p[4], ".".join(p[5:-1]), p[-1]
            b = f"backbone.layers.{i}.1.{j}"
            if rest in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                out.setdefault(f"{b}.attn.attn.in_proj_{leaf}", {})[rest[-6]] = v
                continue
            name = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.attn.out_proj",
                    "attention.sequence_reduction.sequence_reduction": "attn.sr",
                    "attention.sequence_reduction.layer_norm": "attn.norm", "mlp.fc1": "ffn.layers.0",
                    "mlp.dwconv.dwconv": "ffn.layers.1", "mlp.fc2": "ffn.layers.4"}[rest]
            if rest in ("mlp.fc1", "mlp.fc2") and leaf == "weight":
                v = v[:, :, None, None]  # mmseg's MixFFN uses 1x1 Conv2d
            out[f"{b}.{name}.{leaf}"] = v
    for k, v in list(out.items()):
        if isinstance(v, dict):  # nn.MultiheadAttention stacks q, k, v
            out[k] = torch.cat([v["q"], v["k"], v["v"]])
    return out


class HistoryBuffer:  # stands for mmengine's class, which is not installed where the file is read
    def __init__(self):
        self.log = [1.0, 2.0]


def save_mmseg_checkpoint(path, state_dict):
    mod = types.ModuleType("mmengine_logging_fake")
    HistoryBuffer.__module__ = mod.__name__
    mod.HistoryBuffer = HistoryBuffer
    sys.modules[mod.__name__] = mod
    try:
        torch.save({"meta": {"mmseg_version": "1.2.2", "hist": HistoryBuffer()}, "state_dict": state_dict,
                    "optimizer": {"state": {}}}, path)
    finally:
        del sys.modules[mod.__name__]


#: key names of a released mmsegmentation SegFormer checkpoint (MiT-B0 with SegformerHead), as its
#: loader printed them in mmsegmentation issue #1380 (backbone) and as mmseg's decode_heads/
#: segformer_head.py names its modules (ConvModule: .conv, .bn): text from outside this test, which
#: the test's own ``mmseg_names`` must produce and kdcache's converter must take
RELEASED_MMSEG_KEYS = [
    "backbone.layers.0.0.projection.weight", "backbone.layers.0.0.norm.bias",
    "backbone.layers.2.1.1.norm1.weight", "backbone.layers.2.1.1.attn.attn.in_proj_weight",
    "backbone.layers.2.1.1.attn.attn.in_proj_bias", "backbone.layers.2.1.1.attn.attn.out_proj.weight",
    "backbone.layers.2.1.1.attn.sr.weight", "backbone.layers.2.1.1.attn.norm.weight",
    "backbone.layers.2.1.1.norm2.bias", "backbone.layers.2.1.0.ffn.layers.0.weight",
    "backbone.layers.2.1.0.ffn.layers.1.weight", "backbone.layers.2.1.0.ffn.layers.4.bias",
    "backbone.layers.2.2.weight", "backbone.layers.3.0.projection.weight",
    "decode_head.convs.0.conv.weight", "decode_head.convs.3.bn.running_var", "decode_head.fusion_conv.conv.weight",
    "decode_head.fusion_conv.bn.weight", "decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
]


def test_mmseg_segformer_checkpoint_converted_on_load(tmp_path):
    """What this proves: kdcache's converter (``from_mmseg``) and this test's ``mmseg_names`` (written
    from mmseg's source) are inverses, and a model loaded through the converter gives exactly the
    logits of the model the names came from. What it does not prove alone: that ``mmseg_names`` are
    mmseg's real names — the key list of a released checkpoint (``RELEASED_MMSEG_KEYS``) checks that."""
    torch.manual_seed(1)
    ref = build_model("segformer_b0", 7, head="mmseg").eval()
    randomise_bn(ref)
    sd = mmseg_names(ref.net.state_dict())
    assert set(RELEASED_MMSEG_KEYS) <= set(sd), sorted(set(RELEASED_MMSEG_KEYS) - set(sd))
    assert sd["backbone.layers.1.1.0.ffn.layers.0.weight"].dim() == 4  # mmseg's MixFFN: 1x1 convolutions
    save_mmseg_checkpoint(tmp_path / "iter_40000.pth", sd)
    with pytest.raises(pickle.UnpicklingError):  # what weights_only refuses: why the tolerant reader exists
        torch.load(tmp_path / "iter_40000.pth", weights_only=True)
    w = open_weights(tmp_path / "iter_40000.pth")
    assert (w.arch, w.num_classes, w.model_options) == ("segformer_b0", 7, {"head": "mmseg", "channels": 256})
    ours = w.build(num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=0, atol=0)


def test_mmseg_checkpoint_as_train_teacher_weights_keeps_its_head(tmp_path):
    torch.manual_seed(2)
    ref = build_model("segformer_b0", 11, head="mmseg").eval()
    save_mmseg_checkpoint(tmp_path / "iter.pth", mmseg_names(ref.net.state_dict()))
    r = kd("train-teacher", "--model", "segformer_b0", "--weights", tmp_path / "iter.pth", *SYN, "--lr", "1e-12",
           "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model_options"] == {"head": "mmseg", "channels": 256}
    # lr 1e-12: the run's weights are the checkpoint's (BatchNorm statistics aside)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    for k, v in ref.net.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-9)


# -- state dicts -------------------------------------------------------------------------------------------------


def test_safetensors_state_dict(tmp_path):
    model = build_model("demo_student", 11).eval()
    randomise_bn(model)
    safetensors_torch.save_file(model.net.state_dict(), str(tmp_path / "student.safetensors"))
    ours = open_weights(tmp_path / "student.safetensors").build(arch="demo_student", num_classes=11)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, model(x).logits, rtol=0, atol=0)
    # and as a teacher: the cache records the file's hash
    r = kd("build-teacher-cache", "--weights", tmp_path / "student.safetensors", "--teacher", "demo_student",
           "--out", tmp_path / "c.zarr", "--dataset", "synthetic", "--resolution", "32x48", "--limit", "2",
           "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output


# -- segmentation_models_pytorch --------------------------------------------------------------------------------


#: smp's documented encoder sizes (its encoders table, millions of parameters)
SMP_ENCODER_PARAMS_M = {"resnet18": 11, "resnet34": 21, "mobilenet_v2": 2}


@pytest.mark.parametrize("arch,encoder", [("unet", "resnet18"), ("fpn", "mobilenet_v2"), ("segformer", "mit_b0")])
def test_smp_models_give_smps_own_logits(arch, encoder):
    """What this proves: kdcache's smp family builds smp's own model and returns its logits
    untouched (the same weights, the same output, to the bit). It cannot prove smp itself right:
    it checks smp against smp. The encoders' sizes against smp's documented table
    (``SMP_ENCODER_PARAMS_M``) check that the encoder named is the one built."""
    ours = build_model(f"smp_{arch}", 4, encoder_name=encoder).eval()
    randomise_bn(ours)
    ref = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=4).eval()
    ref.load_state_dict(ours.net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x), rtol=0, atol=0)
    if encoder in SMP_ENCODER_PARAMS_M:
        assert round(sum(p.numel() for p in ours.net.encoder.parameters()) / 1e6) == SMP_ENCODER_PARAMS_M[encoder]


def test_smp_input_of_any_size_is_padded_and_the_logits_cut_back():
    """smp needs sides divisible by its encoder's output stride; kdcache pads the input with zeros at
    the bottom and right and cuts the logits back: smp's own forward on the padded input, cropped."""
    ours = build_model("smp_deeplabv3plus", 4, encoder_name="mobilenet_v2", taps=["decoder"]).eval()
    randomise_bn(ours)
    assert ours.input_multiple == 16
    ref = smp.create_model("deeplabv3plus", encoder_name="mobilenet_v2", encoder_weights=None, classes=4).eval()
    ref.load_state_dict(ours.net.state_dict())
    x = torch.randn(1, 3, 72, 90)  # CamVid-like sides that are not multiples of 16
    with pytest.raises(RuntimeError, match="Wrong input shape"):
        ref(x)
    with torch.no_grad():
        out = ours(x)
        want = ref(torch.nn.functional.pad(x, (0, 6, 0, 8)))[..., :72, :90]
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    assert out.features["decoder"].shape[-2:] == (18, 23)  # stride 4 of 80 x 96, cut to ceil(72/4) x ceil(90/4)


@pytest.mark.slow  # trains, evaluates, exports and caches an smp U-Net
def test_smp_student_on_images_whose_sides_are_not_multiples_of_its_stride(tmp_path):
    """Images of mixed sizes, crops of 42 x 50, an encoder of output stride 8: training, validation,
    evaluate, export and the cache build all run (smp alone refuses every one of these inputs)."""
    lab, _ = make_mixed_size_folders(tmp_path)
    smp_unet = ["-m", "encoder_name=resnet18", "-m", "encoder_depth=3", "-m", "decoder_channels=16x8x8"]
    folder = ["--dataset", "folder", "--data-root", lab, "--train-split", "all", "--val-split", "all"]
    r = kd("train-teacher", "--model", "smp_unet", *smp_unet, *folder, "--crop-size", "42x50", "--epochs", 1,
           "--batch-size", 3, "--quiet", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    r = kd("evaluate", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    r = kd("export", tmp_path / "run", "--format", "torchscript")
    assert r.exit_code == 0, r.output
    r = kd("build-teacher-cache", "--weights", tmp_path / "run", "--dataset", "folder", "--data-root", lab,
           "--split", "all", "--topk", 2, "--out", tmp_path / "c.zarr", "--quiet")
    assert r.exit_code == 0, r.output
    from kdcache.store import CacheStore

    store = CacheStore(tmp_path / "c.zarr")
    assert store.schema.strides["logits"] == (1.0, 1.0)  # stride 1: the maps cover each image exactly
    assert [tuple(store.read(i)["logits/values"].shape[-2:]) for i in range(2)] == [(42, 50), (47, 57)]


def test_smp_refuses_downloaded_encoder_weights():
    with pytest.raises(ModelError, match="--backbone-weights"):
        build_model("smp_unet", 4, encoder_name="resnet18", encoder_weights="imagenet")


def test_smp_student_from_the_cli(tmp_path):
    r = kd("train-teacher", "--model", "smp_unet", "--model-option", "encoder_name=resnet18",
           "--model-option", "encoder_depth=3", "--model-option", "decoder_channels=32x16x8", *SYN,
           "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model_options"] == {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


# -- encoders from local files ------------------------------------------------------------------------------------


def test_backbone_weights_torchvision_resnet_into_smp_encoder(tmp_path):
    import torchvision

    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(num_classes=1000)
    torch.save(resnet.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    model = build_model("smp_unet", 4, encoder_name="resnet18")
    report = load_backbone(model, tmp_path / "resnet18-f37072fd.pth")
    assert report.module == "encoder" and report.prefix == ""
    assert report.matched == len(resnet.state_dict()) - 2 and sorted(report.unused) == ["fc.bias", "fc.weight"]
    assert not report.missing
    assert torch.equal(model.net.encoder.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)


@pytest.mark.slow  # trains from backbone weights
def test_backbone_weights_mobilenet_into_torchvision_lraspp_from_the_cli(tmp_path):
    import torchvision

    mnet = torchvision.models.mobilenet_v3_large()
    torch.save(mnet.state_dict(), tmp_path / "mobilenet_v3_large-8738ca79.pth")
    r = kd("train-teacher", "--model", "lraspp_mobilenet_v3_large", "--backbone-weights",
           tmp_path / "mobilenet_v3_large-8738ca79.pth", *SYN, "--lr", "1e-12", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "tensors matched" in r.output and "keys without 'features.'" in r.output
    loaded = json.loads((tmp_path / "run" / "config.json").read_text())["backbone_loaded"]
    assert loaded["prefix"] == "features." and loaded["matched"] > 100 and loaded["unused"] == 4  # the classifier
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["backbone.5.block.0.0.weight"], mnet.features[5].block[0][0].weight,
                               rtol=0, atol=1e-9)
    # the run's config.json (with what it records about the backbone) repeats the run
    r = kd("train-teacher", "--config", tmp_path / "run" / "config.json", "--out", tmp_path / "again", "--quiet")
    assert r.exit_code == 0, r.output


def test_pretrained_only_from_the_local_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError, match=r"--pretrained needs mobilenet_v3_large-8738ca79\.pth .* in .*th/hub/"
                                              r"checkpoints"):
        pretrained_backbone_file("lraspp_mobilenet_v3_large")
    folder = tmp_path / "th" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), folder / "mobilenet_v3_large-8738ca79.pth")
    assert pretrained_backbone_file("lraspp_mobilenet_v3_large") == folder / "mobilenet_v3_large-8738ca79.pth"
    with pytest.raises(CheckpointError, match="--pretrained covers torchvision's models"):
        pretrained_backbone_file("segformer_b0")


def test_backbone_weights_hf_mit_folder_and_mmseg_mit_file(tmp_path):
    torch.manual_seed(4)
    mit = transformers.SegformerForImageClassification(transformers.SegformerConfig(num_labels=1000))
    mit.save_pretrained(tmp_path / "mit-b0")
    model = build_model("segformer_b0", 6)
    report = load_backbone(model, tmp_path / "mit-b0")
    assert report.module == "segformer" and not report.missing
    assert sorted(report.unused) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.net.segformer.stages[2].blocks[1].mlp.fc2.weight,
                       mit.segformer.stages[2].blocks[1].mlp.fc2.weight)
    # an mmseg MiT encoder checkpoint (mit_b0.pth: backbone keys without the "backbone." prefix)
    src = build_model("segformer_b0", 6, head="mmseg")
    mm = {k.removeprefix("backbone."): v for k, v in mmseg_names(src.net.state_dict()).items()
          if k.startswith("backbone.")}
    torch.save({"state_dict": mm}, tmp_path / "mit_b0.pth")
    fresh = build_model("segformer_b0", 6)
    report = load_backbone(fresh, tmp_path / "mit_b0.pth")
    assert not report.missing and not report.unused
    own = src.net.segformer.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in fresh.net.segformer.state_dict().items())


def test_backbone_weights_refused_where_nothing_fits(tmp_path):
    torch.save({"a.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor of .*other.pth fits the encoder"):
        load_backbone(build_model("smp_unet", 4, encoder_name="resnet18"), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="has no backbone, encoder or segformer module"):
        load_backbone(build_model("demo_student", 4), tmp_path / "other.pth")


# -- models and outputs --------------------------------------------------------------------------------------------


def test_output_with_a_logits_attribute(tmp_path):
    model = build_model("tiny_models:LogitsAttribute", 3)
    assert model(torch.zeros(1, 3, 16, 16)).logits.shape == (1, 3, 8, 8)


def test_list_models_groups_by_source():
    groups = model_groups()
    assert groups["torchvision"] and "demo_student" in groups["built-in (kdcache)"]
    hf = next(k for k in groups if k.startswith("transformers"))
    assert groups[hf] == [f"segformer_b{i}" for i in range(6)] and 'pip install "kdcache[hf]"' in hf
    r = kd("list-models")
    assert r.exit_code == 0 and "smp_deeplabv3plus" in r.output and "segmentation_models_pytorch" in r.output
    import importlib.util

    state = "installed" if importlib.util.find_spec("timm") else "not installed"  # timm is an extra too
    assert f'timm/<name>: any timm model (pip install "kdcache[timm]"; {state})' in r.output
    assert 'segmentation_models_pytorch (pip install "kdcache[smp]"; installed)' in r.output


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingExtraError, match=r'SegFormer \(segformer_b\*\) needs transformers: pip install '
                                                r'"kdcache\[hf\]"'):
        build_model("segformer_b0", 3)
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    r = kd("train-teacher", "--model", "smp_unet", *SYN)
    assert r.exit_code == 2 and 'an smp_* model needs segmentation_models_pytorch: pip install "kdcache[smp]"' in r.output


# -- bad input: one line that names the fix ---------------------------------------------------------------------


def write_hf_config(folder, weights: bytes | None = None, **cfg):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "segformer", **cfg}))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def error_of(fn) -> str:
    with pytest.raises((CheckpointError, ModelError)) as info:
        fn()
    return str(info.value)


def test_weight_file_errors(tmp_path, monkeypatch):
    # a Hugging Face folder without weights, of another model, of a non-standard SegFormer, unreadable
    bare = write_hf_config(tmp_path / "bare")
    assert "lacks both model.safetensors and pytorch_model.bin; write it with save_pretrained" in error_of(
        lambda: open_weights(bare))
    bert = write_hf_config(tmp_path / "bert", b"", model_type="bert")
    assert "holds a 'bert' model; kdcache reads Hugging Face folders of SegFormer only" in error_of(
        lambda: open_weights(bert))
    odd = write_hf_config(tmp_path / "odd", b"", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    assert "SegFormer with hidden_sizes [16, 32, 64, 128] and depths [1, 1, 1, 1] is none of B0-B5" in error_of(
        lambda: open_weights(odd))
    broken = write_hf_config(tmp_path / "broken", b"not safetensors", hidden_sizes=[32, 64, 160, 256],
                             depths=[2, 2, 2, 2])
    assert "transformers cannot load" in error_of(lambda: open_weights(broken))
    # an encoder folder where a whole model is needed
    transformers.SegformerForImageClassification(transformers.SegformerConfig()).save_pretrained(tmp_path / "mit")
    r = kd("build-teacher-cache", "--weights", tmp_path / "mit", "--out", tmp_path / "c.zarr", "--dataset",
           "synthetic", "--limit", "2", "--quiet")
    assert r.exit_code == 2 and "is a SegFormer encoder (SegformerForImageClassification) without a " \
                                "segmentation head; load it with --backbone-weights" in r.output
    # safetensors files: unreadable, and without the package
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    assert "as a safetensors file (" in error_of(lambda: open_weights(tmp_path / "bad.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(MissingExtraError, match=r'reading bad.safetensors needs safetensors: pip install '
                                                r'"kdcache\[safetensors\]"'):
        open_weights(tmp_path / "bad.safetensors")


def test_mmseg_checkpoint_errors(tmp_path):
    sd = mmseg_names(build_model("segformer_b0", 3, head="mmseg").net.state_dict())
    shallow = {k: v for k, v in sd.items() if not k.startswith("backbone.layers.0.1.1.")}  # stage 1: one block
    save_mmseg_checkpoint(tmp_path / "shallow.pth", shallow)
    assert "mmseg SegFormer checkpoint with stage widths [32, 64, 160, 256] and depths [1, 2, 2, 2] matches no " \
           "SegFormer B0-B5" in error_of(lambda: open_weights(tmp_path / "shallow.pth"))
    save_mmseg_checkpoint(tmp_path / "odd.pth", {**sd, "backbone.layers.0.1.0.gamma.weight": torch.zeros(1)})
    assert "unexpected key 'backbone.layers.0.1.0.gamma.weight' in an mmseg SegFormer checkpoint" in error_of(
        lambda: open_weights(tmp_path / "odd.pth"))


@pytest.mark.parametrize("args,message", [
    (["--model", "segformer_b0", "-m", "head=fancy"], "segformer_b0: head must be one of mlp, mmseg, got 'fancy'"),
    (["--model", "segformer_b0", "-m", "dropout=0.5"], "segformer_b0 has no option dropout; its options: head"),
    (["--model", "smp_unet", "-m", "encoder_weights=imagenet"],
     "smp encoders are built without downloaded weights; give a local encoder file with --backbone-weights"),
    (["--model", "smp_unet", "-m", "encoder_name=nope"], "smp_unet with encoder 'nope': \"Wrong encoder name"),
    (["--model", "lraspp_mobilenet_v3_large", "--pretrained", "--backbone-weights", "x.pth"],
     "give --backbone-weights or --pretrained, not both"),
])
def test_model_option_errors_from_the_cli(tmp_path, args, message):
    r = kd("train-teacher", *args, *SYN, "--out", tmp_path / "run")
    assert r.exit_code == 2 and r.output.startswith("error: ") and message in r.output, r.output


@pytest.mark.slow  # SegFormer B2 teacher, cache, two students
def test_segformer_b2_to_b0_and_smp_students_through_the_cache(tmp_path):
    """The CamVid seed's workflow with SegFormer: train-teacher segformer_b2 -> build-teacher-cache
    (with an encoder stage tapped) -> train-student segformer_b0 and an smp student with kl."""
    r = kd("train-teacher", "--model", "segformer_b2", *SYN, "--out", tmp_path / "b2")
    assert r.exit_code == 0, r.output
    r = kd("build-teacher-cache", "--weights", tmp_path / "b2", "--out", tmp_path / "b2.zarr", "--dataset", "synthetic",
           "--resolution", "32x48", "--limit", "4", "--features", "segformer.stages.1", "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    attrs = json.loads((tmp_path / "b2.zarr" / "zarr.json").read_text())["attributes"]["kdcache"]
    assert attrs["teacher"]["model"] == "segformer_b2" and attrs["stride"] == [4.0, 4.0]
    for student, extra in (("segformer_b0", []), ("smp_unet", ["-m", "encoder_name=resnet18", "-m", "encoder_depth=3",
                                                               "-m", "decoder_channels=16x8x8"])):
        r = kd("train-student", "--cache", tmp_path / "b2.zarr", "--student", student, *extra, "--method", "kl",
               *SYN, "--out", tmp_path / student)
        assert r.exit_code == 0, r.output
        cfg = json.loads((tmp_path / student / "config.json").read_text())
        assert cfg["model"] == student and cfg["methods"][0]["name"] == "kl"
        assert "train_kl" in json.loads((tmp_path / student / "metrics.jsonl").read_text().splitlines()[-1])
