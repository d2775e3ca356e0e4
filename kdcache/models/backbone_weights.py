"""Pretrained encoders from local files: ``--backbone-weights FILE`` and ``--pretrained``.

:func:`load_backbone` loads an ImageNet (or any) checkpoint into a model's encoder only — the
module its family calls ``backbone`` (torchvision), ``encoder`` (segmentation_models_pytorch) or
``segformer`` (transformers). The file may be a torchvision classification state dict
(``resnet50-0676ba61.pth``, ``mobilenet_v3_large-8738ca79.pth``: the classifier is left over),
a timm/smp encoder state dict, a Hugging Face SegFormer or MiT folder, or an mmsegmentation MiT
checkpoint (``mit_b0.pth``, converted). The file's keys are aligned to the encoder's by the one
prefix (``features.``, ``backbone.``, ``segformer.``, ... or none) under which the most tensors
match by name and shape; the report says what matched, what the encoder missed and what the file
had left over, and a load where nothing matched is refused.

:func:`pretrained_backbone_file` is ``--pretrained``: torchvision's published ImageNet weights of
the model's backbone, only if the file is already in the local torch hub cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdcache.core.errors import CheckpointError
from kdcache.models import SegModel, resolve_builder
from kdcache.models.loading import open_weights
from kdcache.models.segformer import mmseg_backbone_to_hf

#: a family's encoder attribute, tried in this order
ENCODER_ATTRS = ("backbone", "encoder", "segformer")


@dataclass
class BackboneReport:
    """What ``--backbone-weights`` loaded: counts and a few names of each kind."""

    file: str
    module: str  # the encoder's attribute name
    prefix: str  # stripped from the file's keys
    matched: int
    missing: list[str] = field(default_factory=list)  # encoder tensors the file did not have
    unused: list[str] = field(default_factory=list)  # file tensors the encoder did not take
    mismatched: list[str] = field(default_factory=list)  # same name, other shape

    def summary(self) -> str:
        def few(xs):
            return f" (e.g. {', '.join(xs[:3])})" if xs else ""

        strip = f", keys without '{self.prefix}'" if self.prefix else ""
        return (f"--backbone-weights {self.file} into {self.module}{strip}: {self.matched} tensors matched, "
                f"{len(self.missing)} missing{few(self.missing)}, {len(self.unused)} left over{few(self.unused)}"
                + (f", {len(self.mismatched)} of another shape{few(self.mismatched)}" if self.mismatched else ""))

    def to_dict(self) -> dict:
        return {"file": self.file, "module": self.module, "prefix": self.prefix, "matched": self.matched,
                "missing": len(self.missing), "unused": len(self.unused), "mismatched": len(self.mismatched)}


def encoder_of(model: SegModel) -> tuple[str, nn.Module]:
    net = getattr(model, "net", model)
    for name in ENCODER_ATTRS:
        module = getattr(net, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise CheckpointError(f"model '{getattr(model, 'name', type(net).__name__)}' has no backbone, encoder or "
                          "segformer module for --backbone-weights; give whole-model weights with --weights")


def _prefixes(keys) -> list[str]:
    """'' and every prefix of up to two dotted parts that some key starts with."""
    out = {""}
    for k in keys:
        parts = k.split(".")
        for n in (1, 2):
            if len(parts) > n:
                out.add(".".join(parts[:n]) + ".")
    return sorted(out, key=len)


def _fitting(sd: dict, prefix: str, own: dict) -> dict:
    """The tensors of ``sd`` whose key without ``prefix`` names a tensor of ``own`` of the same shape."""
    out = {}
    for k, v in sd.items():
        name = k[len(prefix):]
        if k.startswith(prefix) and name in own and tuple(own[name].shape) == tuple(v.shape):
            out[name] = v
    return out


def load_backbone(model: SegModel, file: str | Path) -> BackboneReport:
    """Load ``file`` into ``model``'s encoder (see the module docstring); the report says how."""
    name, encoder = encoder_of(model)
    sd = open_weights(file, encoder_only=True).contents["state_dict"]
    if "layers.0.0.projection.weight" in sd or "backbone.layers.0.0.projection.weight" in sd:
        sd = mmseg_backbone_to_hf(sd)  # an mmseg MiT checkpoint: into transformers' key names
    own = encoder.state_dict()
    prefix = max(_prefixes(sd), key=lambda p: len(_fitting(sd, p, own)))  # the first of the best, '' first
    take = _fitting(sd, prefix, own)
    if not take:
        raise CheckpointError(f"no tensor of {file} fits the {name} of model '{model.name}' (its keys: "
                              f"{', '.join(list(sd)[:3])}; the {name}'s: {', '.join(list(own)[:3])}); is it the "
                              "encoder this model uses?")
    mapped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    encoder.load_state_dict(take, strict=False)
    return BackboneReport(
        file=str(file), module=name, prefix=prefix, matched=len(take),
        missing=[k for k in own if k not in take and not k.endswith("num_batches_tracked")],
        unused=[k for k in sd if not (k.startswith(prefix) and k[len(prefix):] in take)],
        mismatched=[k for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape)],
    )


def pretrained_backbone_file(model_name: str) -> Path:
    """The local file of torchvision's published ImageNet weights of ``model_name``'s backbone
    (``--pretrained``): in ``$TORCH_HOME/hub/checkpoints``, never downloaded."""
    builder = resolve_builder(model_name)
    if getattr(builder, "__module__", "") != "kdcache.models.torchvision_models":
        raise CheckpointError(f"--pretrained covers torchvision's models; for '{model_name}' give a local encoder "
                              "file with --backbone-weights")
    from torchvision.models import segmentation

    default = inspect.signature(getattr(segmentation, builder.__name__)).parameters["weights_backbone"].default
    url = default.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / url.rsplit("/", 1)[1]
    if not path.is_file():
        raise CheckpointError(f"--pretrained needs {path.name} (torchvision's {default}) in {folder}; copy it there "
                              f"from a machine that can fetch {url}, or give a file with --backbone-weights")
    return path
