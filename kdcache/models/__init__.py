"""Models: a registry of segmentation networks and one uniform output.

``build_model(name, num_classes)`` accepts
- torchvision's segmentation builders by function name (``fcn_resnet50``,
  ``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, ...),
  always built with ``weights=None, weights_backbone=None`` — nothing is downloaded;
- the built-in CPU-sized pair ``demo_teacher`` / ``demo_student``;
- any ``package.module:callable`` taking ``num_classes=`` and returning an ``nn.Module``.

Every model is wrapped in :class:`~kdcache.models.wrapper.SegModel`, whose forward returns
logits at the head's native stride plus the features requested by module name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from torch import nn

from kdcache.errors import ModelError
from kdcache.models.wrapper import ModelOutput, SegModel
from kdcache.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", ModelError)



def _builtin(fn_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        from kdcache.models import builtin

        return getattr(builtin, fn_name)(num_classes=num_classes, **kwargs)

    build.__name__ = fn_name
    return build


MODELS.add("demo_teacher", _builtin("demo_teacher"))
MODELS.add("demo_student", _builtin("demo_student"))

def _torchvision_segmentation_names() -> list[str]:
    from torchvision import models
    from torchvision.models import segmentation

    return sorted(models.list_models(module=segmentation))


def _torchvision_builder(fn_name: str) -> Callable[..., nn.Module]:
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


for _name in _torchvision_segmentation_names():
    MODELS.add(_name, _torchvision_builder(_name))


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """The factory behind ``name``: a registry entry or a ``package.module:callable`` path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(f"cannot import module '{module_name}' for model '{name}': {exc}") from None
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ModelError(f"module '{module_name}' has no attribute '{attr}' (model '{name}')")
        if not callable(obj):
            raise ModelError(f"'{name}' is not callable; give a function or class that builds the model")
        return obj
    return MODELS.get(name)


def build_model(
    name: str,
    num_classes: int,
    taps: Sequence[str] = (),
    **kwargs,
) -> SegModel:
    """Build model ``name`` for ``num_classes`` classes, wrapped with feature ``taps``."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be positive, got {num_classes}")
    builder = resolve_builder(name)
    try:
        net = builder(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build model '{name}' with num_classes={num_classes}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"model '{name}' built a {type(net).__name__}, not a torch.nn.Module")
    return SegModel(net, name=name, num_classes=num_classes, taps=taps)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["MODELS", "ModelOutput", "SegModel", "build_model", "count_parameters", "resolve_builder"]
