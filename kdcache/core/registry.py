"""A name -> factory registry, shared by data sets, models and KD methods.

Registering sets the name once: ``@METHODS.register("kl")`` on a class also sets the class's
``name`` attribute, and ``@register_model`` on a function registers it under the function's own
name (as timm's ``@register_model`` does). :func:`import_submodules` imports every module of a
package, so adding a data set, model family or method is one new file in its package.

A family whose names come from a heavy package (torchvision's builders) registers them through
:meth:`Registry.add_loader`: the package is imported the first time a name is looked up that the
registry does not hold yet, or the names are listed, not when kdcache is imported (a command that
builds the built-in networks, and each DataLoader worker that is spawned, then starts seconds
sooner).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from kdcache.core.errors import KDCacheError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[KDCacheError] = KDCacheError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}
        self._loaders: list[Callable[[], None]] = []

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

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test that registered its own entry takes it back)."""
        self._items.pop(name, None)

    def add_loader(self, loader: Callable[[], None]) -> None:
        """``loader()`` registers a family's names when first needed (see the module's note)."""
        self._loaders.append(loader)

    def _load(self) -> None:
        while self._loaders:  # popped first: a loader may look names up itself
            self._loaders.pop(0)()

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise self.error(
                f"unknown {self.kind} '{name}'. Known: {', '.join(sorted(self._items))}.{hint}"
            ) from None

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._load()
        return name in self._items

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())


def import_submodules(package: str, path) -> None:
    """Import every module of ``package`` (its ``__path__`` is ``path``): their decorators
    register what they define."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
