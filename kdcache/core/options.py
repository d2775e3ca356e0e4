"""Options declared once, on the fields of the config dataclasses (TrainConfig, StudentConfig,
CacheBuildConfig): each field that is a command-line option says so with :func:`opt` — its help,
its names, how its text reads (:attr:`Opt.shape`) and whether ``--resume`` may change it. The
command line (``kdcache.cli``) makes its options, their help and their defaults from these
declarations, the ``--config`` file reader reads its keys and values by them, and a resumed run
merges by them: adding an option is one field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, dataclass
from typing import Any

from kdcache.core.errors import KDCacheError

#: the metadata key of a field's declaration
OPTION = "kdcache.option"


class _FieldDefault:
    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


#: :attr:`Opt.cli_default` when the command line's default is the field's own
FIELD_DEFAULT = _FieldDefault()

#: the panels ``--help`` groups options in, in this order: the essential ones first
PANELS = ("Inputs and outputs", "Method", "What to store", "Teacher", "Training", "Augmentation", "Data", "Hardware",
          "Logging")

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


_BOUNDS = re.compile(r"^\s*(?:(?P<op>>=|>|<=|<)\s*(?P<x>[-+0-9.e]+)|(?P<lb>[\[(])\s*(?P<lo>[-+0-9.e]+)\s*,\s*"
                     r"(?P<hi>[-+0-9.e]+)\s*(?P<rb>[\])]))\s*$")


@dataclass(frozen=True)
class Bounds:
    """The values a number option takes, written as a reader would: ``"> 0"``, ``">= 0"``, ``"<= 1"``,
    ``"[0, 1]"``, ``"(0, 1]"``, ``"[0, 1)"``. Every number option is finite as well: NaN and ±inf
    are refused whatever its bounds (:func:`check_number`)."""

    text: str

    def __post_init__(self):
        if not _BOUNDS.match(self.text):
            raise ValueError(f"bounds {self.text!r}: write '> 0', '>= 0', '<= 1', '[0, 1]', '(0, 1]' or the like")

    def holds(self, x: float) -> bool:
        m = _BOUNDS.match(self.text)
        if m["op"]:
            b = _number(m["x"])
            return {">": x > b, ">=": x >= b, "<": x < b, "<=": x <= b}[m["op"]]
        lo, hi = _number(m["lo"]), _number(m["hi"])
        return ((x > lo) if m["lb"] == "(" else (x >= lo)) and ((x < hi) if m["rb"] == ")" else (x <= hi))

    def describe(self) -> str:
        """'> 0' or 'in [0, 1]', as an error message says it."""
        return self.text.strip() if self.text.strip()[0] in "<>" else f"in {self.text.strip()}"

    def outside(self) -> float:
        """A finite value these bounds refuse (what the tests feed each option): below the lower
        bound, or above the upper one where there is no lower bound."""
        m = _BOUNDS.match(self.text)
        if m["op"]:
            b = _number(m["x"])
            return b - 1 if m["op"] in (">", ">=") else b + 1
        return _number(m["lo"]) - 1

    def above(self) -> float | None:
        """A finite value above the upper bound (None: no upper bound)."""
        m = _BOUNDS.match(self.text)
        if m["op"]:
            return _number(m["x"]) + 1 if m["op"] in ("<", "<=") else None
        return _number(m["hi"]) + 1


#: the seeds a run takes: what every generator it seeds accepts (numpy's takes no negative seed, torch's
#: none past 2**64 − 1)
SEED_BOUNDS = "[0, 4294967295]"
#: DataLoader worker processes: a number a machine can start (a typo of a few billion would try to)
WORKER_BOUNDS = "[0, 256]"
#: a softmax temperature (a logit method's, a contrastive τ, an ensemble's): the range in use (0.07 to 20 in
#: the papers kdcache follows) with room around it; near 0 a logit method's T² factor is 0 and its term
#: vanishes (1e-300); at 1000 the softmaxes are flat: kl's fp32 sums, times T² = 1e6, came out negative,
#: dist's term was 4e6, and an ensemble's stored T·log p rounded to one fp16 value in every cell
TEMPERATURE_BOUNDS = "[0.01, 100]"


def _number(text: str) -> float | int:
    """A bound as written: a whole number stays an int, which a whole value is compared with exactly
    (as floats, 2**64 and 2**64 - 1 are the same number)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def check_number(value: Any, name: str, bounds: Bounds | str | None = None) -> Any:
    """``value`` when it is a finite number within ``bounds`` (None passes: not given); otherwise one
    error naming ``name`` (``--lr``, ``method 'kl': temperature``) and what it takes."""
    if value is None:
        return value
    bounds = Bounds(bounds) if isinstance(bounds, str) else bounds
    wanted = f"a finite number {bounds.describe()}" if bounds else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KDCacheError(f"{name} takes {wanted}, got {value!r}")
    # a whole number is finite (and may be too large for a float: compared exactly, and shown whole)
    if (not isinstance(value, int) and not math.isfinite(value)) or (bounds is not None and not bounds.holds(value)):
        raise KDCacheError(f"{name} must be {wanted}, got {value if isinstance(value, int) else format(value, 'g')}")
    return value


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
    bounds: str | None = None
    panel: str | None = None

    def __post_init__(self):
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown option shape {self.shape!r}; one of {', '.join(SHAPES)}")
        if self.bounds is not None:
            Bounds(self.bounds)
        if self.panel is not None and self.panel not in PANELS:
            raise ValueError(f"unknown help panel {self.panel!r}; one of {', '.join(PANELS)}")

    def check(self, value: Any, name: str) -> Any:
        """A field's value (a number, or each number of a pair or a list) checked: finite, within
        :attr:`bounds`; one error naming ``name`` otherwise."""
        if self.shape in ("pair", "numbers") and value is not None:
            for x in value:
                check_number(x, name, self.bounds)
        elif isinstance(value, float) or (self.bounds is not None and value is not None):
            check_number(value, name, self.bounds)
        return value


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


def check_declared(config: Any, name=lambda f, o: (o.names or (f"--{f.name.replace('_', '-')}",))[0]) -> None:
    """Every declared number of ``config`` (a config dataclass instance) finite and within its
    bounds, and every other float field finite; one error naming the option (``name(field, opt)``)
    otherwise. What ``validate()`` of a config calls first."""
    specs = dict((f.name, o) for f, o in declared(type(config)))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in specs:
            specs[f.name].check(value, name(f, specs[f.name]))
        elif isinstance(value, float):
            check_number(value, f.name)
