"""torchvision's image classifiers, registered by their function names (``resnet18``,
``resnet50``, ``mobilenet_v3_small``, ``efficientnet_b0``, ``convnext_tiny``, ``regnet_y_400mf``,
``vit_b_16``, …), always built with ``weights=None``: nothing is downloaded. Their logits are
``[N, C]``; trained weights come from local files (``--weights``: a kdcache run or checkpoint, a
``.pth`` state dict, ``.safetensors``). torchvision is imported when first needed (as in
:mod:`.torchvision_models`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdcache.models.registry import MODELS

SOURCE = "torchvision classifiers"
TASK = "classification"


def _builder(fn_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, fn_name)(weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = fn_name
    build.__doc__ = f"torchvision.models.{fn_name} (weights=None, no download)"
    build.TASK = TASK
    return build


def _register() -> None:
    import torchvision.models

    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        if name not in MODELS:
            MODELS.add(name, _builder(name))


MODELS.add_loader(_register)
