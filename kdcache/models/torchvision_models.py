"""torchvision's segmentation builders, registered by their function names (``fcn_resnet50``,
``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, ...),
always built with ``weights=None, weights_backbone=None``: nothing is downloaded. torchvision is
imported when a name is first looked up that no other family holds (:meth:`Registry.add_loader`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdcache.models.registry import MODELS

SOURCE = "torchvision"


def _builder(fn_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        from torchvision.models import segmentation

        fn = getattr(segmentation, fn_name)
        kwargs.setdefault("aux_loss", None if fn_name.startswith("lraspp") else False)
        if kwargs["aux_loss"] is None:
            kwargs.pop("aux_loss")
        return fn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)

    build.__name__ = fn_name
    build.__doc__ = f"torchvision.models.segmentation.{fn_name} (weights=None, no download)"
    return build


def _register() -> None:
    from torchvision import models
    from torchvision.models import segmentation

    for name in sorted(models.list_models(module=segmentation)):
        MODELS.add(name, _builder(name))


MODELS.add_loader(_register)
