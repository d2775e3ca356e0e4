"""Distillation methods: one small module each, one registry entry each.

A method is an ``nn.Module`` built from its weight and options. It says which student modules
it taps (:meth:`KDMethod.student_taps`) and which cached teacher maps it reads
(:meth:`KDMethod.required`, given the cache's schema), and its ``forward(student_output, batch)`` returns its weighted
loss. ``batch`` holds the cached targets already taken through the item's geometry
(``kd/values``, ``kd/indices``, ``kd/tail``, ``kd/ignore``, ``kd/features/<tap>``,
``kd/attention/<tap>``; see :mod:`kdcache.pipeline.warp`).

Add one: write ``kdcache/methods/mine.py`` with a ``KDMethod`` subclass decorated
``@METHODS.register("mine")`` and a docstring citing its paper. Every module of this package is
imported, so nothing else needs editing: the command line offers it, and its constructor's
arguments become its options and shorthands. A method on the teacher's logits subclasses
:class:`~kdcache.methods.logit_base.LogitMethod` and writes only its ``loss``: the temperature and
the teacher-aware options (``mask``, ``rectify``, ``class_weights`` …) come with the base. Once
``benchmarks/full_budget.py`` has measured it, a method whose defaults stood below CE there says so
in its ``standing`` line (``kdcache list-methods``), which ``tests/test_method_standing.py`` checks
against the results file.
"""

from kdcache.core.registry import import_submodules
from kdcache.methods.base import (
    METHODS,
    KDMethod,
    MethodError,
    at_defaults,
    build_method,
    check_options,
    check_spec,
    fill_in,
    method_options,
    methods_taking,
    number_options,
    option_bounds,
    option_default,
    reads,
    settings_at_defaults,
    student_logits_at,
    task_defaults,
    with_task_defaults,
)
from kdcache.methods.logit_base import LogitMethod

import_submodules(__name__, __path__)

__all__ = ["METHODS", "KDMethod", "LogitMethod", "MethodError", "build_method", "check_options", "check_spec", "fill_in",
           "method_options", "methods_taking", "number_options", "option_bounds", "option_default", "reads", "student_logits_at",
           "at_defaults", "settings_at_defaults",
           "task_defaults", "with_task_defaults"]
