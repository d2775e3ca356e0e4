"""Options declared once, on the fields of the config dataclasses (TrainConfig, StudentConfig,
CacheBuildConfig): each field that is a command-line option says so with :func:`opt` — its help,
its names, how its text reads (:attr:`Opt.shape`) and whether ``--resume`` may change it. The
command line (``kdcache.cli``) makes its options, their help and their defaults from these
declarations, the ``--config`` file reader reads its keys and values by them, and a resumed run
merges by them: adding an option is one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

#: the metadata key of a field's declaration
OPTION = "kdcache.option"


class _FieldDefault:
    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


#: :attr:`Opt.cli_default` when the command line's default is the field's own
FIELD_DEFAULT = _FieldDefault()

#: how an option's text is read (the field's value in parentheses)
SHAPES = {
    "size": "HxW or one number (an (H, W) pair)",
    "pair": "'lo,hi' (a (lo, hi) pair)",
    "names": "NAME,NAME (a tuple of names)",
    "numbers": "comma-separated numbers (a tuple of floats)",
    "key_values": "KEY=VALUE, repeatable (a mapping)",
    "methods": "NAME or NAME:key=value,..., repeatable (a list of mappings)",
    "repeat": "repeatable (a list)",
}


@dataclass(frozen=True)
class Opt:
    """A config field's command-line option.

    ``names``: its command-line names (default: ``--`` and the field's name with dashes);
    ``short``: a one-letter name (``-o``); ``shape``: how its text is read (:data:`SHAPES`; None:
    as the field's own type); ``resumable``: ``--resume`` may change it; ``cli_default``: the
    command line's default where it is not the field's (None: the command works it out, e.g. a
    run folder named after the model); ``help``: its help, in which ``{default}`` is the
    field's default."""

    help: str
    names: tuple[str, ...] = ()
    short: str | None = None
    shape: str | None = None
    resumable: bool = False
    cli_default: Any = FIELD_DEFAULT

    def __post_init__(self):
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown option shape {self.shape!r}; one of {', '.join(SHAPES)}")


def opt(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **spec) -> Any:
    """A dataclass field that is also a command-line option (see :class:`Opt`)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={OPTION: Opt(help=help, **spec)})


def declared(config_class: type) -> list[tuple[dataclasses.Field, Opt]]:
    """(field, declaration) of every field of ``config_class`` that is an option, in field order."""
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(config_class) if OPTION in f.metadata]


def resumable(config_class: type) -> set[str]:
    """The fields ``--resume`` may change (the run folder, ``out``, always)."""
    return {f.name for f, o in declared(config_class) if o.resumable} | {"out"}


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default
