"""torchvision's segmentation builders, registered by their function names (``fcn_resnet50``,
``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, ...),
always built with ``weights=None, weights_backbone=None``: nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models
from torchvision.models import segmentation

from kdcache.models.registry import MODELS

SOURCE = "torchvision"


def _builder(fn_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        fn = getattr(segmentation, fn_name)
        kwargs.setdefault("aux_loss", None if fn_name.startswith("lraspp") else False)
        if kwargs["aux_loss"] is None:
            kwargs.pop("aux_loss")
        return fn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)

    build.__name__ = fn_name
    build.__doc__ = f"torchvision.models.segmentation.{fn_name} (weights=None, no download)"
    return build


for _name in sorted(models.list_models(module=segmentation)):
    MODELS.add(_name, _builder(_name))
