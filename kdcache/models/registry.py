"""The model registry: ``build_model(name, num_classes)`` for a registered name or any
``package.module:callable``, always wrapped in :class:`~kdcache.models.wrapper.SegModel`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from torch import nn

from kdcache.core.errors import ModelError
from kdcache.core.registry import Registry
from kdcache.models.wrapper import SegModel

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", ModelError)

#: ``@register_model`` on a function ``name(num_classes, **options) -> nn.Module`` registers it
#: under its own name
register_model = MODELS.register

#: name prefix -> (factory taking the rest of the name, how ``list-models`` shows it), for
#: families too large to list (``timm/<name>``)
PREFIXES: dict[str, tuple[Callable[[str], Callable[..., nn.Module]], str]] = {}


def register_prefix(prefix: str, factory: Callable[[str], Callable[..., nn.Module]], shown: str,
                    extra: str | None = None, package: str | None = None) -> None:
    """Names starting with ``prefix`` are built by ``factory(rest of the name)``; ``shown`` is its
    line in ``list-models``, which names the optional ``extra`` (and whether its ``package`` is
    installed) when the family needs one."""
    if extra:
        state = "installed" if importlib.util.find_spec(package or extra) else "not installed"
        shown = f'{shown} (pip install "kdcache[{extra}]"; {state})'
    PREFIXES[prefix] = (factory, shown)


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """The factory behind ``name``: a registry entry or a ``package.module:callable`` path."""
    for prefix, (factory, _) in PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return factory(name[len(prefix):])
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


def model_task(name: str) -> str | None:
    """``classification`` or ``segmentation`` for a registered family (its builder's or module's
    ``TASK``; segmentation when none is set), None for a ``package.module:callable``."""
    return _task_of(resolve_builder(name), name)


def _task_of(builder: Callable[..., nn.Module], name: str) -> str | None:
    task = getattr(builder, "TASK", None) or getattr(sys.modules.get(builder.__module__), "TASK", None)
    if task:
        return task
    return None if ":" in name else "segmentation"


def build_model(name: str, num_classes: int, taps: Sequence[str] = (), **kwargs) -> SegModel:
    """Build model ``name`` for ``num_classes`` classes, wrapped with feature ``taps``."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be positive, got {num_classes}")
    builder = resolve_builder(name)
    try:
        net = builder(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an option of the wrong kind, or a number too large
        given = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        first = (str(exc).splitlines() or [type(exc).__name__])[0]  # not torch's C++ frames
        raise ModelError(f"cannot build model '{name}' with num_classes={num_classes}{given}: {first}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"model '{name}' built a {type(net).__name__}, not a torch.nn.Module")
    return SegModel(net, name=name, num_classes=num_classes, taps=taps, task=_task_of(builder, name))


def model_groups() -> dict[str, list[str]]:
    """Registered names by where the models come from: each family module's ``SOURCE`` (with
    ``pip install "kdcache[EXTRA]"`` and whether it is installed, for an optional family)."""
    groups: dict[str, list[str]] = {}
    for name, builder in MODELS.items():
        module = sys.modules.get(builder.__module__)
        source = getattr(module, "SOURCE", builder.__module__)
        extra = getattr(module, "EXTRA", None)
        if extra:
            package = getattr(module, "PACKAGE", extra)
            state = "installed" if importlib.util.find_spec(package) else "not installed"
            source = f'{source} (pip install "kdcache[{extra}]"; {state})'
        groups.setdefault(source, []).append(name)
    return groups


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
