"""A small name -> factory registry, shared by data sets, models and (later) KD methods."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from kdcache.errors import KDCacheError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[KDCacheError] = KDCacheError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
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
