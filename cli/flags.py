"""A config dataclass's command-line options, made from its fields' declarations
(:mod:`kdcache.core.options`): the typer parameters with their help and defaults, the reading of
their texts into field values, and ``--config FILE`` (read by :mod:`kdcache.cli.config_files`
with the same declarations). A command takes them all with :func:`config_options`; adding an
option to it is adding a declared field to its config dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape

from kdcache.cli.base import bounded_parameters, command_line_options
from kdcache.cli.config_files import ConfigFile, Option, read_config_file
from kdcache.cli.parse import parse_key_values, parse_list, parse_method, parse_pair, parse_size
from kdcache.core.options import FIELD_DEFAULT, PANELS, Opt, check_number, declared, field_default

#: the shapes whose text typer reads as one string
TEXT_SHAPES = ("size", "pair", "names", "numbers")
#: the shapes whose option repeats
REPEATED_SHAPES = ("key_values", "methods", "repeat")


@dataclass(frozen=True)
class CliOption:
    """One command-line option: the function ``param`` typer fills, the config ``field`` it sets
    (None for an option that is no field, e.g. ``--resolution``), its declaration, and its
    typer annotation and default."""

    param: str
    field: str | None
    spec: Opt
    annotation: Any
    default: Any

    @property
    def flag(self) -> str:
        """The option's first name as a user types it (errors name it)."""
        names = self.spec.names or (f"--{self.param.replace('_', '-')}",)
        return names[0]


def _base_type(tp) -> tuple[Any, bool]:
    """(the non-None type of a field's annotation, whether None is allowed)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType",
                                                                                          None)) else (tp,)
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else rest[-1]), len(rest) != len(args)


def _default_text(value, shape: str | None):
    """A field's default as the command line writes it."""
    if value is None:
        return None
    if shape in ("size",):
        return f"{value[0]}x{value[1]}"
    if shape in ("pair", "numbers"):
        return ",".join(f"{x:g}" for x in value) or None
    if shape == "names":
        return ",".join(value) or None
    if shape in REPEATED_SHAPES:
        return None
    return value


def help_text(spec: Opt, context: dict) -> str:
    """The declared help with its ``{placeholders}`` filled, escaped for rich."""
    return escape(spec.help.format(**context))


def cli_options(config_class: type, context: dict, *, exclude: tuple[str, ...] = ()) -> list[CliOption]:
    """The options of every declared field of ``config_class`` but ``exclude``; ``context``: what
    the helps' placeholders name (beside every field's default)."""
    hints = typing.get_type_hints(config_class)
    ctx = {f.name: field_default(f) for f in dataclasses.fields(config_class)} | context
    out = []
    for f, spec in declared(config_class):
        if f.name in exclude:
            continue
        names = spec.names or (f"--{f.name.replace('_', '-')}",)
        param = names[0].lstrip("-").replace("-", "_")
        base, optional = _base_type(hints[f.name])
        value = field_default(f) if spec.cli_default is FIELD_DEFAULT else spec.cli_default
        if spec.shape in TEXT_SHAPES:
            kind, default = str | None, _default_text(value, spec.shape)
        elif spec.shape in REPEATED_SHAPES:
            kind, default = list[str] | None, None
        else:
            kind = base | None if (optional or value is None) else base
            default = value
        if base is bool:  # --flip/--no-flip
            names = tuple(f"{n}/--no-{n[2:]}" for n in names)
        flags = [*names, *([spec.short] if spec.short else [])]
        annotation = Annotated[kind, typer.Option(*flags, help=help_text(spec, ctx), rich_help_panel=spec.panel)]
        out.append(CliOption(param, f.name, spec, annotation, default))
    return out


def panel_of(parameter: inspect.Parameter) -> str | None:
    """The help panel a parameter's ``typer.Option`` names (None: typer's plain "Options")."""
    meta = typing.get_args(parameter.annotation)[1:] if typing.get_origin(parameter.annotation) is Annotated else ()
    return next((m.rich_help_panel for m in meta if isinstance(m, typer.models.ParameterInfo)), None)


#: the options listed first in their panel, where a command has them: what every run names
FIRST = ("cache", "weights", "out", "model", "student", "method", "dataset", "data_root")


def by_panel(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """``params`` in the order of :data:`~kdcache.core.options.PANELS` (the essential ones first; the
    order within a panel kept): typer lists the panels in the order their first option comes."""
    rank = {name: i for i, name in enumerate(PANELS)}
    first = {name: i for i, name in enumerate(FIRST)}
    ordered = sorted(params, key=lambda p: (-1, 0) if p.annotation is typer.Context else
                     (rank.get(panel_of(p), len(rank)), first.get(p.name, len(first))))
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]  # typer passes them all by name


def parameters(options: list[CliOption]) -> list[inspect.Parameter]:
    return [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation, default=o.default)
            for o in options]


def field_value(option: CliOption, value):
    """A parameter's value (as typer gives it, or a --config file's mapping) as the field's."""
    shape, flag = option.spec.shape, option.flag
    if value is None:
        return None
    if shape == "size":
        return parse_size(value, flag)
    if shape == "pair":
        return parse_pair(value, flag)
    if shape == "names":
        return parse_list(value, flag)
    if shape == "numbers":
        return parse_list(value, flag, float)
    if shape == "key_values":
        return parse_key_values(value, flag)
    if shape == "methods":
        return [parse_method(m) for m in value]
    if shape == "repeat":
        return list(value)
    return value


def config_options(config_class: type, context: dict | Callable[[], dict], *, exclude: tuple[str, ...] = (),
                   extra: dict[str, str] | None = None) -> Callable:
    """Give a command every declared option of ``config_class`` (and ``--config FILE``). The
    command receives ``fields``: the field values the user gave — on the command line, in the
    file (the command line wins), or the file's fields that no option sets — and
    ``given``: the names of those fields (what ``--resume`` compares). The command's own
    parameters come first and stay its own; ``extra``: the shapes of those that a --config file
    may also set with a list (e.g. ``resolution: [32, 48]``)."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name not in ("fields", "given")]
        own_bounds = bounded_parameters(fn)
        ctx_name = next(p.name for p in own if p.annotation is typer.Context)

        @functools.wraps(fn)
        def wrapper(*args, config_file=None, **kwargs):
            ctx = kwargs[ctx_name]
            options = cli_options(config_class, context() if callable(context) else context, exclude=exclude)
            on_line = command_line_options(ctx)
            file = None
            if config_file is not None:
                file = read_file(config_file, ctx, sig, options, config_class, extra or {})
                kwargs.update({k: v for k, v in file.options.items() if k not in on_line})
                for param, (flag, bounds) in own_bounds.items():  # the command's own numbers, from the file
                    if param in file.options and param not in on_line:
                        check_number(kwargs[param], f"--config {config_file}: {flag}", bounds)
            from_file = set(file.options) if file else set()
            fields = {}
            for o in options:
                value = kwargs.pop(o.param)
                if o.param in on_line or o.param in from_file:
                    fields[o.field] = field_value(o, value)
                    # numbers finite and within their declared bounds, before the command does anything
                    o.spec.check(fields[o.field], o.flag if o.param in on_line else f"--config {config_file}: {o.flag}")
            if file is not None:  # the file's fields that no option sets
                for k, v in file.fields.items():
                    if k not in fields:
                        fields[k] = check_number(v, f"--config {config_file}: {k}") if isinstance(v, float) else v
            return fn(*args, fields=fields, given=set(fields), **kwargs)

        options = cli_options(config_class, context() if callable(context) else context, exclude=exclude)
        config_param = inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
                                         annotation=Annotated[str | None, typer.Option(
                                             "--config", rich_help_panel=PANELS[0], help="YAML or JSON file of option values (option names, or "
                                                              "a run's config.json to repeat the run); the command "
                                                              "line overrides it.")])
        wrapper.__signature__ = sig.replace(parameters=by_panel([*own, *parameters(options), config_param]))
        wrapper.kdcache_options = lambda: cli_options(config_class, context() if callable(context) else context,
                                                      exclude=exclude)
        return wrapper

    return deco


@dataclass(frozen=True)
class NumberOption:
    """A number option of a command: its flag, its declared bounds (a :class:`~kdcache.core.options.Bounds`
    text) and its shape (None: one number; ``pair``, ``numbers``)."""

    flag: str
    bounds: str | None
    shape: str | None = None
    #: an integer option (the command line takes whole numbers only: NaN and ±inf do not parse)
    whole: bool = False


def number_options(fn: Callable) -> dict[str, NumberOption]:
    """Every number option of a command function (the one ``cli.base.command`` registers): those
    declared on its config dataclass (float and int fields, pairs and lists of numbers; an int field
    is one with declared bounds) and its own parameters declared with bounds; param -> :class:`NumberOption`."""
    params = inspect.signature(fn, eval_str=True).parameters
    out = {param: NumberOption(flag, bounds.text, whole=_base_type(typing.get_args(params[param].annotation)[0])[0] is int)
           for param, (flag, bounds) in bounded_parameters(fn).items()}
    declared_options = getattr(inspect.unwrap(fn, stop=lambda f: hasattr(f, "kdcache_options")), "kdcache_options",
                               None)
    for o in declared_options() if declared_options else []:
        base, _ = _base_type(typing.get_args(o.annotation)[0])  # Annotated[float | None, …] -> float
        if o.spec.shape in ("pair", "numbers") or base is float or (base is int and o.spec.bounds is not None):
            out[o.param] = NumberOption(o.flag, o.spec.bounds, o.spec.shape, whole=base is int)
    return out


def read_file(path, ctx: typer.Context, sig: inspect.Signature, options: list[CliOption], config_class: type,
              extra: dict[str, str]) -> ConfigFile:
    """``--config FILE`` read for this command: its keys are the command's options (the declared
    ones with their shapes, its own with ``extra``'s) and the config's fields."""
    names = {p.name: tuple(o[2:] for o in p.opts if o.startswith("--")) for p in ctx.command.params}
    shapes = {o.param: o.spec.shape for o in options} | extra
    params = {**{o.param: inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                                            default=o.default) for o in options},
              **{p.name: p for p in sig.parameters.values()}}
    file_options = [Option.from_parameter(p, names[n], shapes.get(n)) for n, p in params.items() if n in names]
    field_params = {o.field: o.param for o in options if o.field != o.param}
    return read_config_file(path, file_options, config_class, command=ctx.command.name, field_params=field_params)
