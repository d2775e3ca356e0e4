"""Distillation methods: one small module each, one registry entry each.

A method is an ``nn.Module`` built from its weight and options. It says which student modules
it taps (:meth:`KDMethod.student_taps`) and which cached teacher maps it reads
(:meth:`KDMethod.required`), and its ``forward(student_output, batch)`` returns its weighted
loss. ``batch`` holds the cached targets already taken through the item's geometry
(``kd/values``, ``kd/indices``, ``kd/tail``, ``kd/ignore``, ``kd/features/<tap>``,
``kd/attention/<tap>``; see :mod:`kdcache.target_geometry`).

Add one: write ``kdcache/methods/mine.py`` with a ``KDMethod`` subclass and register it with
``@METHODS.register("mine")``.
"""

from __future__ import annotations

import importlib

from kdcache.errors import KDCacheError
from kdcache.methods.base import KDMethod, MethodError, student_logits_at
from kdcache.registry import Registry

METHODS = Registry("KD method", MethodError)

for _module in ("none", "kl", "at", "sp", "fitnet", "cwd", "pseudo"):
    importlib.import_module(f"kdcache.methods.{_module}")


def build_method(name: str, **options) -> KDMethod:
    cls = METHODS.get(name)
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise KDCacheError(f"method '{name}': {exc}") from None


__all__ = ["METHODS", "KDMethod", "MethodError", "build_method", "student_logits_at"]
