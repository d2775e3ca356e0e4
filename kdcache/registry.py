"""A name -> factory registry, shared by data sets, models and KD methods.

Registering sets the name once: ``@METHODS.register("kl")`` on a class also sets the class's
``name`` attribute, and ``@register_model`` on a function registers it under the function's own
name (as timm's ``@register_model`` does). :func:`import_submodules` imports every module of a
package, so adding a data set, model family or method is one new file in its package.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from kdcache.errors import KDCacheError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[KDCacheError] = KDCacheError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str | Callable | None = None):
        """Decorator registering a class or function under ``name`` (default: its ``__name__``);
        a class gets ``name`` as its ``name`` attribute. Works bare (``@reg.register``) too."""
        if name is not None and not isinstance(name, str):  # used bare: @reg.register
            return self.register()(name)

        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            if isinstance(obj, type):
                obj.name = key
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (for factories made in a loop)."""
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise self.error(
                f"unknown {self.kind} '{name}'. Known: {', '.join(sorted(self._items))}.{hint}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


def import_submodules(package: str, path) -> None:
    """Import every module of ``package`` (its ``__path__`` is ``path``): their decorators
    register what they define."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
