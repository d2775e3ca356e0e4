"""One uniform view of any segmentation network or classifier: native-stride logits plus tapped
features. A classifier's logits [N, C] come out as [N, C, 1, 1], a map of one cell, so everything
downstream (losses, caches, metrics) treats classification as segmentation with H = W = 1."""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.errors import ModelError
from kdcache.core.metrics import predicted_class


@dataclass
class ModelOutput:
    """``logits``: [N, C, h, w] at the head's native stride (not upsampled).
    ``features``: tapped module outputs by module name, in the order requested."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):  # transformers' ModelOutput and alike
        return out.logits
    if isinstance(out, dict):
        if "out" in out:
            return out["out"]
        found = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
        if found is not None:
            return found
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"cannot find a tensor in a model/module output of type {type(out).__name__}; return a "
                     "tensor, an object with a 'logits' tensor, a dict with an 'out' tensor, or a tuple/list "
                     "starting with one")


def input_multiple(net: nn.Module) -> int:
    """The number a network's input height and width must be multiples of (1: any size).

    A network says so with an ``input_multiple`` attribute; segmentation_models_pytorch's models
    that check their input (``requires_divisible_input_shape``) need their encoder's output stride
    (16 or 32)."""
    declared = getattr(net, "input_multiple", None)
    if declared:
        return int(declared)
    encoder = getattr(net, "encoder", None)
    if getattr(net, "requires_divisible_input_shape", False) and hasattr(encoder, "output_stride"):
        return int(encoder.output_stride)
    return 1


def fixed_input_size(net: nn.Module) -> tuple[int, int] | None:
    """The one input size a network takes, if it takes only one: a timm ViT with a strict patch
    embedding (``img_size``), torchvision's ``VisionTransformer`` (``image_size``); None: any."""
    pe = getattr(net, "patch_embed", None)
    if (pe is not None and getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None)
            and not getattr(net, "dynamic_img_size", False)):
        return tuple(int(v) for v in pe.img_size)
    vit = _torchvision_class("torchvision.models.vision_transformer", "VisionTransformer")
    if vit is not None and isinstance(net, vit):
        return int(net.image_size), int(net.image_size)
    return None


def _torchvision_class(module: str, name: str) -> type | None:
    """One of torchvision's classes if torchvision is imported, else None: a network built while
    it was not imported is none of its classes (kdcache imports torchvision when first needed)."""
    return getattr(sys.modules.get(module), name, None)


def crop_to_input(t: torch.Tensor, size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """A map [..., h, w] of a padded input of ``padded`` (H', W') cut to the part that covers the
    input of ``size`` (H, W): ceil(h · H / H') x ceil(w · W / W') cells (all of it at stride 1,
    ceil(H / s) at stride s, what the network gives for an input of H x W)."""
    h = max(1, math.ceil(t.shape[-2] * size[0] / padded[0] - 1e-6))
    w = max(1, math.ceil(t.shape[-1] * size[1] / padded[1] - 1e-6))
    return t[..., :h, :w]


class SegModel(nn.Module):
    """Wraps ``net`` so that ``forward(x)`` returns a :class:`ModelOutput`.

    torchvision's ``_SimpleSegmentationModel`` (FCN, DeepLabV3) and ``LRASPP`` are run as
    backbone + classifier, skipping the final upsampling, so the logits stay at the head's
    native stride (8 for FCN/DeepLabV3-ResNet and LRASPP, 16 for DeepLabV3-MobileNetV3).
    Any other network is called as is; an output with a ``logits`` attribute (transformers'
    ``ModelOutput``) uses it, a dict its ``"out"`` entry.

    Feature taps are forward hooks on ``net``'s modules by their ``named_modules()`` name
    (e.g. ``backbone.layer4``). The state dict of the wrapped network is ``self.net``'s, so
    plain torchvision state dicts load into it.

    A network whose input sides must be multiples of N (:func:`input_multiple`: smp's encoders,
    16 or 32) gets its input padded at the bottom and right with zeros (the mean colour after
    normalisation, as a crop's padding) and its logits and feature maps cut back to the part
    that covers the input, in every forward: training, validation, evaluation, export and the
    cache build all see a network that takes any size.
    """

    def __init__(self, net: nn.Module, name: str, num_classes: int, taps: Sequence[str] = (),
                 task: str | None = None):
        super().__init__()
        self.net = net
        self.name = name
        self.num_classes = num_classes
        #: "classification", "segmentation", or None (a callable: told by its output)
        self.task = task
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = []
        self.taps: tuple[str, ...] = ()
        self.set_taps(taps)
        #: input sides are padded up to a multiple of this (1: none)
        self.input_multiple = input_multiple(net)
        #: the one (H, W) the network takes, or None for any size
        self.fixed_input_size = fixed_input_size(net)

    # -- feature taps ---------------------------------------------------------------------
    def set_taps(self, taps: Sequence[str]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        modules = dict(self.net.named_modules())
        for tap in taps:
            if tap not in modules or tap == "":
                close = difflib.get_close_matches(tap, [m for m in modules if m], n=5, cutoff=0.5)
                hint = f" Close matches: {', '.join(close)}." if close else ""
                raise ModelError(
                    f"model '{self.name}' has no module '{tap}' to tap.{hint} "
                    "List them with `python -c \"from kdcache.models import build_model; "
                    f"print([n for n, _ in build_model('{self.name}', 2).net.named_modules()])\"`"
                )
            self._hooks.append(modules[tap].register_forward_hook(self._make_hook(tap)))
        self.taps = tuple(taps)

    def _make_hook(self, tap: str):
        def hook(_module, _inputs, output):
            self._captured[tap] = _first_tensor(output)

        return hook

    # -- forward ---------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        simple = _torchvision_class("torchvision.models.segmentation._utils", "_SimpleSegmentationModel")
        lraspp = _torchvision_class("torchvision.models.segmentation.lraspp", "LRASPP")
        if simple is not None and isinstance(net, simple):
            return net.classifier(net.backbone(x)["out"])
        if lraspp is not None and isinstance(net, lraspp):
            return net.classifier(net.backbone(x))
        return _first_tensor(net(x))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self._captured = {}
        size = padded = tuple(x.shape[-2:])
        self.check_input_size(size)
        m = self.input_multiple
        if m > 1 and (size[0] % m or size[1] % m):
            padded = (size[0] + (-size[0]) % m, size[1] + (-size[1]) % m)
            x = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]))
        logits = self._logits(x)
        if logits.dim() == 2 and self.task != "segmentation":  # a classifier: one cell
            logits = logits[:, :, None, None]
        if self.task == "classification" and (logits.dim() != 4 or tuple(logits.shape[-2:]) != (1, 1)):
            raise ModelError(f"model '{self.name}' returned logits of shape {tuple(logits.shape)}; a classifier must "
                             f"return [N, {self.num_classes}]")
        if logits.dim() != 4:
            raise ModelError(f"model '{self.name}' returned {logits.dim()}-D logits of shape {tuple(logits.shape)}; a "
                             f"segmentation model must return [N, {self.num_classes}, h, w]")
        if logits.shape[1] != self.num_classes:
            raise ModelError(f"model '{self.name}' returned {logits.shape[1]} channels of logits for a data set of "
                             f"{self.num_classes} classes; build its head for num_classes={self.num_classes}")
        features = {t: self._captured[t] for t in self.taps if t in self._captured}
        if padded != size:
            logits = crop_to_input(logits, size, padded)
            features = {t: crop_to_input(f, size, padded) if f.dim() == 4 else f for t, f in features.items()}
        missing = [t for t in self.taps if t not in features]
        if missing:
            raise ModelError(f"taps {missing} of model '{self.name}' did not run in forward; tap modules that "
                             "its forward calls")
        self._captured = {}
        return ModelOutput(logits=logits, features=features)

    def pool_module(self) -> nn.Module:
        """The classifier's global pooling (the last ``AdaptiveAvgPool2d``, or timm's
        ``SelectAdaptivePool2d``), before which its class map is taken."""
        found = [m for _, m in self.net.named_modules()
                 if isinstance(m, nn.AdaptiveAvgPool2d) or type(m).__name__ == "SelectAdaptivePool2d"]
        if not found:
            raise ModelError(f"model '{self.name}' has no global average pooling module to take a class map before "
                             "(a ViT pools a class token); cache its logits or --views instead of --label-map")
        return found[-1]

    def class_map(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's class map before global pooling [N, C, h, w] (ReLabel's label map):
        the layers after the pool applied to every cell of the pooled feature map on its own.
        For a linear head its mean over the cells is the classifier's logits."""
        return self.forward_class_map(x).logits

    def forward_class_map(self, x: torch.Tensor) -> ModelOutput:
        """:meth:`forward` with the class map (see :meth:`class_map`) as the logits."""
        pool = self.pool_module()
        state: dict = {}

        def hook(module, inputs, _output):
            if state.get("busy"):
                return None
            f = inputs[0]
            if f.dim() != 4:
                raise ModelError(f"model '{self.name}' pools a {f.dim()}-D tensor, not a feature map; it has no class map")
            b, c, h, w = f.shape
            state["hw"], state["busy"] = (h, w), True
            try:
                return module(f.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1))
            finally:
                state["busy"] = False

        handle = pool.register_forward_hook(hook)
        try:
            out = self(x)
        finally:
            handle.remove()
        h, w = state["hw"]
        out.logits = out.logits.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class ids [N, H, W] at ``size`` (default: the input's), from bilinearly upsampled logits."""
        logits = self(x).logits
        size = size or tuple(x.shape[-2:])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return predicted_class(logits)

    def check_input_size(self, size: tuple[int, int], what: str = "images") -> None:
        """Refuse inputs of another size than the one the network takes (if it takes one only)."""
        if self.fixed_input_size is not None and tuple(size) != self.fixed_input_size:
            h, w = self.fixed_input_size
            raise ModelError(f"model '{self.name}' takes {h}x{w} images only, and its {what} are {size[0]}x{size[1]}; "
                             f"train, cache and evaluate it at its size with --resize {h}x{w} (timm's ViTs also take "
                             "-m img_size=N or -m dynamic_img_size=true)")

    def probe_size(self, default: tuple[int, int] = (128, 128)) -> tuple[int, int]:
        """An input size for a dummy forward: ``default``, or the one size the network takes."""
        return self.fixed_input_size or default

    def stride(self, input_size: tuple[int, int] | None = None) -> tuple[float, float]:
        """The head's output stride, measured with one dummy forward at ``input_size``."""
        input_size = input_size or self.probe_size()
        p = next(self.parameters())
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self(torch.zeros(1, 3, *input_size, device=p.device, dtype=p.dtype)).logits
        self.train(was_training)
        return input_size[0] / out.shape[-2], input_size[1] / out.shape[-1]
