"""SegFormer B0–B5 (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation
with Transformers", NeurIPS 2021) through Hugging Face ``transformers`` (the ``hf`` extra).

``segformer_b0`` … ``segformer_b5`` build ``SegformerForSemanticSegmentation`` from a config made
here (the variant's widths and depths, the data set's class count): nothing is downloaded. The
logits come at the head's native stride 4. Taps: the encoder stages ``segformer.stages.0`` …
``segformer.stages.3`` (``[N, C_i, H/4·2^-i, W/4·2^-i]``) and the decode head's fused features
``decode_head.linear_fuse`` (``decode_head.fusion_conv`` with the mmseg head).

Options: ``head="mlp"`` (default, transformers' all-MLP head) or ``head="mmseg"``: the decode head
of mmsegmentation's ``SegformerHead`` (a 1x1 conv + BN + ReLU per stage, then a fusing conv + BN +
ReLU; 256 channels for every variant in mmseg's configs) with mmseg's LayerNorm epsilon (1e-6),
so that an mmsegmentation checkpoint (``iter_40000.pth``) loads exactly, converted on load by
:func:`from_mmseg`. Any other option is a ``SegformerConfig`` field (``drop_path_rate``,
``decoder_hidden_size``, ``classifier_dropout_prob``, ...).

transformers is imported when a SegFormer is first built, not when kdcache starts: it is an
optional extra and importing it costs seconds.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.errors import ModelError, import_extra
from kdcache.models.registry import MODELS

#: the MiT encoders of the paper (Table 6) and transformers' published configs
VARIANTS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
MMSEG_CHANNELS = 256  # SegformerHead ``channels`` in mmsegmentation's segformer configs
MMSEG_LN_EPS = 1e-6  # MixVisionTransformer's norm_cfg
HEADS = ("mlp", "mmseg")
SOURCE, EXTRA, PACKAGE = "transformers", "hf", "transformers"


def transformers_module():
    return import_extra("SegFormer (segformer_b*)", "hf", "transformers")[0]


def variant_of(hidden_sizes, depths) -> str | None:
    """'b2' for the encoder widths and depths of SegFormer-B2, None for no published variant."""
    for name, v in VARIANTS.items():
        if list(hidden_sizes) == v["hidden_sizes"] and list(depths) == v["depths"]:
            return name
    return None


class ConvBNReLU(nn.Sequential):
    """mmcv's ``ConvModule`` with a norm: conv (no bias) → BN → ReLU, under mmcv's key names."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


class MMSegHead(nn.Module):
    """mmsegmentation's ``SegformerHead``: per stage a 1x1 ConvModule, resized to stage 0,
    concatenated in stage order, a fusing ConvModule, dropout, ``conv_seg``."""

    def __init__(self, in_channels, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels)
        self.fusion_conv = ConvBNReLU(channels * len(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, stages) -> torch.Tensor:
        size = stages[0].shape[2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, stages)]
        return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(outs, 1))))


class MMSegSegFormer(nn.Module):
    """transformers' MiT encoder with mmsegmentation's SegformerHead (see the module docstring)."""

    def __init__(self, config, channels: int):
        super().__init__()
        self.segformer = transformers_module().SegformerModel(config)
        for m in self.segformer.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = MMSEG_LN_EPS
        self.decode_head = MMSegHead(config.hidden_sizes, channels, config.num_labels,
                                     config.classifier_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.segformer(x, output_hidden_states=True).hidden_states
        return self.decode_head(stages)


def segformer_config(variant: str, num_classes: int, **overrides):
    t = transformers_module()
    known = t.SegformerConfig().to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:  # SegformerConfig would keep any keyword silently
        raise ModelError(f"segformer_{variant} has no option {', '.join(unknown)}; its options: head, channels (mmseg "
                         "head) and SegformerConfig's fields (drop_path_rate, decoder_hidden_size, ...)")
    fields = dict(VARIANTS[variant], num_labels=num_classes)
    fields.update(overrides)
    return t.SegformerConfig(**fields)


def _builder(variant: str):
    def build(num_classes: int, head: str = "mlp", **options) -> nn.Module:
        if head not in HEADS:
            raise ModelError(f"segformer_{variant}: head must be one of {', '.join(HEADS)}, got '{head}'")
        if head == "mmseg":
            channels = int(options.pop("channels", MMSEG_CHANNELS))
            return MMSegSegFormer(segformer_config(variant, num_classes, **options), channels)
        t = transformers_module()
        return t.SegformerForSemanticSegmentation(segformer_config(variant, num_classes, **options))

    build.__name__ = f"segformer_{variant}"
    build.__doc__ = (f"SegFormer-{variant.upper()} (transformers; head='mlp' or 'mmseg'), stride 4, "
                     "no download [hf]")
    return build


for _v in VARIANTS:
    MODELS.add(f"segformer_{_v}", _builder(_v))


# -- mmsegmentation checkpoints ----------------------------------------------------------------

_MMSEG_BLOCK = re.compile(r"backbone\.layers\.(\d+)\.1\.(\d+)\.(.+)")


def is_mmseg_segformer(sd: dict) -> bool:
    return "backbone.layers.0.0.projection.weight" in sd and "decode_head.conv_seg.weight" in sd


def from_mmseg(sd: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(architecture, model options, state dict) of an mmsegmentation SegFormer checkpoint's
    ``state_dict`` (MixVisionTransformer backbone + SegformerHead), in this module's key names."""
    n_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.layers."))
    widths = [sd[f"backbone.layers.{i}.0.projection.weight"].shape[0] for i in range(n_stages)]
    depths = [1 + max((int(m.group(2)) for k in sd if (m := _MMSEG_BLOCK.match(k)) and int(m.group(1)) == i),
                      default=-1) for i in range(n_stages)]
    variant = variant_of(widths, depths)
    if variant is None:
        raise ModelError(f"mmseg SegFormer checkpoint with stage widths {widths} and depths {depths} matches no "
                         "SegFormer B0-B5")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _mmseg_key(key, value, out)
        if new is not None:
            out[new] = value
    options = {"head": "mmseg", "channels": int(sd["decode_head.conv_seg.weight"].shape[1])}
    return f"segformer_{variant}", options, out


def mmseg_backbone_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmsegmentation MiT encoder checkpoint (``mit_b0.pth``: ``layers.…`` or
    ``backbone.layers.…`` keys) in transformers' key names (``segformer.stages.…``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        full = key if key.startswith("backbone.") else f"backbone.{key}"
        if full.startswith("backbone.layers.") and (new := _mmseg_key(full, value, out)) is not None:
            out[new] = value
    return out


def _mmseg_key(key: str, value: torch.Tensor, out: dict) -> str | None:
    """The new name of one mmseg key (None when it was written into ``out`` already or dropped)."""
    if key.startswith("decode_head."):  # the head's modules carry mmseg's names
        return key
    parts = key.split(".")
    if parts[0] != "backbone" or parts[1] != "layers":
        return key
    i, sub = parts[2], parts[3]
    stage = f"segformer.stages.{i}"
    if sub == "0":  # PatchEmbed: projection conv + norm
        return f"{stage}.patch_embeddings." + ".".join(parts[4:]).replace("projection", "proj").replace(
            "norm", "layer_norm")
    if sub == "2":  # the stage's final norm
        return f"{stage}.layer_norm.{parts[4]}"
    m = _MMSEG_BLOCK.match(key)
    block, rest = f"{stage}.blocks.{m.group(2)}", m.group(3)
    if rest.startswith("attn.attn.in_proj_"):  # nn.MultiheadAttention's stacked q, k, v
        kind = rest.rsplit("_", 1)[1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, 0)):
            out[f"{block}.attention.{name}.{kind}"] = part.clone()
        return None
    simple = {
        "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.attn.out_proj": "attention.o_proj",
        "attn.sr": "attention.sequence_reduction.sequence_reduction",
        "attn.norm": "attention.sequence_reduction.layer_norm", "ffn.layers.1": "mlp.dwconv.dwconv",
    }
    linear = {"ffn.layers.0": "mlp.fc1", "ffn.layers.4": "mlp.fc2"}  # 1x1 convs in mmseg, Linear here
    head, _, leaf = rest.rpartition(".")
    if head in simple:
        return f"{block}.{simple[head]}.{leaf}"
    if head in linear:
        out[f"{block}.{linear[head]}.{leaf}"] = value.reshape(value.shape[0], -1) if leaf == "weight" else value
        return None
    raise ModelError(f"unexpected key '{key}' in an mmseg SegFormer checkpoint")
