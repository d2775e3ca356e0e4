"""``--config FILE``: a command's option values from a YAML or JSON file.

A file's keys are the command's option names (``crop-size`` or ``crop_size``; values as on the
command line, or as YAML lists and mappings), or the fields of the command's config dataclass in
the shapes a run's ``config.json`` stores them (``crop: [96, 128]``, ``hflip: false``,
``methods: [{name: kl, temperature: 2}]``, ``dataset_options: {resolution: [32, 48]}``), so a
run's ``config.json`` given back to ``--config`` repeats the run. What a run records about itself
beside its options (:data:`RUN_INFO_KEYS`) is ignored in a run's ``config.json`` (a file with a
``kind``) given to the command that made it; any other key is an error naming it.

:func:`read_config_file` turns a file into the values of the command's parameters (what the
command would have received from the command line; a text starting with ``~`` is expanded to
the home folder, as the shell does) and the values of config fields that no option sets (``momentum``, ``poly_power``, …). The command line wins over both: the CLI
merges them (:func:`kdcache.cli.flags.config_options`), so the precedence is defaults < file <
command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdcache.core.errors import ConfigFileError

#: the run kinds (``Trainer.kind``) and the command that trains each
RUN_COMMANDS = {"supervised": "train-teacher", "distill": "train-student"}

#: what a run's config.json holds beside its config's fields (``Trainer.describe_run`` in
#: kdcache/train/trainer.py, and ``resumed_from_epoch`` once resumed): ignored in a run's config.json
RUN_INFO_KEYS = frozenset({
    "kind", "num_classes", "task", "class_names", "preprocess", "augment", "amp_enabled", "params",
    "train_samples", "val_samples", "device_name", "kdcache_version", "world_size", "resumed_from_epoch",
    "cache_targets", "backbone_loaded",
})

_WHAT = {str: "a text", int: "an integer", float: "a number", bool: "true or false"}
_SHAPE_WHAT = {
    "size": "HxW text (e.g. 96x128), one number or a list [H, W]",
    "pair": "'lo,hi' text or a list [lo, hi]",
    "names": "NAME,NAME text or a list of names",
    "numbers": "comma-separated numbers or a list of numbers",
    "methods": "a list of methods, each NAME:key=value,... text or a mapping with a name",
    "key_values": "a mapping of options or a list of KEY=VALUE texts",
}


@dataclass(frozen=True)
class Option:
    """One option of a command: its parameter ``name``, the other names a file may give it
    (``--model`` of train-student's ``student``), its value type (str, int, float or bool),
    whether it repeats, whether its default is None, and the shape of its text (``size``,
    ``pair``, ``names``, ``numbers``, ``methods``, ``key_values``: each also takes its config
    field's value, a list or a mapping)."""

    name: str
    type: type = str
    names: tuple[str, ...] = ()
    multiple: bool = False
    optional: bool = False
    shape: str | None = None

    @classmethod
    def from_parameter(cls, parameter: inspect.Parameter, names: tuple[str, ...] = (),
                       shape: str | None = None) -> Option:
        """From a command function's parameter, e.g. ``Annotated[int | None, typer.Option(...)]``."""
        tp = parameter.annotation
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        args = [a for a in _union_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
        multiple = typing.get_origin(tp) in (list, tuple)
        if multiple:
            tp = (typing.get_args(tp) or (str,))[0]
        return cls(parameter.name, tp if tp in _WHAT else str, tuple(n for n in names if n != parameter.name),
                   multiple, parameter.default is None, shape)

    @property
    def what(self) -> str:
        if self.shape in _SHAPE_WHAT:
            return _SHAPE_WHAT[self.shape]
        return "a list of texts (or one)" if self.multiple else _WHAT[self.type]


@dataclass
class ConfigFile:
    """A read ``--config`` file: ``options`` (parameter -> value, as the command receives it from
    the command line) and ``fields`` (config field -> value, for fields no option sets)."""

    path: str
    options: dict[str, Any]
    fields: dict[str, Any]


def _union_args(tp) -> tuple:
    if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def load_mapping(path: str | Path) -> dict:
    """The file's top-level mapping (JSON for ``.json``, YAML otherwise; an empty file is {})."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # UTF-8 on every platform; a byte-order mark is dropped
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"cannot read --config {path} ({reason}); give the path of a YAML or JSON file "
                              "of option values") from None
    fmt = "JSON" if p.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if fmt == "JSON" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        problem, line, column = exc.msg, exc.lineno, exc.colno
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else ("?", "?")
    else:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigFileError(f"--config {path} holds {_describe(data)}, not a mapping of option names to "
                                  "values; write one 'option: value' per line (YAML) or a JSON object")
        return data
    raise ConfigFileError(f"--config {path} is not valid {fmt}: {problem} at line {line}, column {column}; "
                          "fix the file")


def _describe(value) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a text"
    return f"a {type(value).__name__}"


def read_config_file(path: str | Path, options: list[Option], config_class: type, *, command: str,
                     field_params: dict[str, str] | None = None) -> ConfigFile:
    """Read ``path`` for ``command``, whose options are ``options`` and whose config dataclass is
    ``config_class``; every key is checked (unknown keys, two keys for one option, value types).
    ``field_params``: the config fields whose option's parameter has another name (``crop`` ->
    ``crop_size``), as the fields' declarations give them."""
    field_params = field_params or {}
    data = load_mapping(path)
    keys = {str(k).strip().replace("-", "_"): k for k in data}
    by_name = {n.replace("-", "_"): o for o in options for n in (o.name, *o.names)}
    params = {o.name for o in options}
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    is_run = command in RUN_COMMANDS.values()
    kind = data[keys["kind"]] if is_run and "kind" in keys else None
    if kind is not None:
        _check_run_info(path, "kind", kind, command)  # first: a run of another kind has other keys
    seen: dict[str, str] = {}
    out = ConfigFile(str(path), {}, {})
    for key, raw in keys.items():
        value = data[raw]
        if key in by_name:
            target = by_name[key].name
        elif key in field_params and key in fields and field_params[key] in params:
            target = field_params[key]
        elif key in fields:
            target = key
        elif is_run and key in RUN_INFO_KEYS:
            _check_run_info(path, key, kind, command)
            continue
        else:
            known = sorted({*by_name, *fields} - {"config_file"})
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            fields_of = "the keys of a run's config.json" if is_run else f"the fields of {config_class.__name__}"
            raise ConfigFileError(f"--config {path}: unknown key '{raw}' for {command}.{hint} Keys are its options "
                                  f"(see {command} --help) or {fields_of}")
        if target in seen:
            raise ConfigFileError(f"--config {path}: '{seen[target]}' and '{raw}' both set "
                                  f"--{target.replace('_', '-')}; keep one")
        seen[target] = str(raw)
        if target in params:
            option = next(o for o in options if o.name == target)
            out.options[target] = _option_value(path, raw, value, option)
        else:
            out.fields[target] = _field_value(path, raw, value, hints.get(target, Any))
    return out


def _check_run_info(path, key: str, kind, command: str) -> None:
    """What a run records about itself is ignored in a run's config.json, for the command that
    trains that kind of run; a hand-written file that sets it has it wrong."""
    if kind is None:
        raise ConfigFileError(f"--config {path}: '{key}' is what a run records in its config.json, not an option "
                              f"of {command}; remove it")
    trainer = RUN_COMMANDS.get(kind) if isinstance(kind, str) else None
    if trainer != command:
        hint = f"give it to {trainer} --config" if trainer else f"{command} runs are of kind " + ", ".join(
            repr(k) for k, c in RUN_COMMANDS.items() if c == command)
        raise ConfigFileError(f"--config {path} is the config.json of a run of kind {kind!r}, not a {command} run; "
                              f"{hint}")


def _wrong(path, key, value, what: str) -> ConfigFileError:
    return ConfigFileError(f"--config {path}: '{key}' takes {what}, got {json.dumps(value, default=str)}; fix its "
                           "value in the file")


def _scalar(path, key, value, tp: type, what: str):
    """``value`` as ``tp`` (str, int, float or bool), or an error naming the key."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return os.path.expanduser(value) if value.startswith("~") else value  # as the shell does
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _wrong(path, key, value, what)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _option_value(path, key, value, option: Option):
    """The value the command's parameter would have from the command line; config fields' shapes
    (lists, mappings) are turned into the option's text where the text says the same, and
    methods and data set options are passed on as mappings."""
    what = option.what
    if value is None:
        if option.optional:
            return None
        raise _wrong(path, key, value, what)
    shape = option.shape
    if shape == "size":
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value):
            return f"{value[0]}x{value[1]}"
    elif shape == "pair":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)):
            return ",".join(repr(float(v)) for v in value)
    elif shape == "names":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
    elif shape == "numbers":
        if isinstance(value, str):
            return value
        items = value if isinstance(value, list) else [value]
        if items and all(map(_is_number, items)):
            return ",".join(repr(float(v)) for v in items)
    elif shape == "methods":
        items = [value] if isinstance(value, (str, dict)) else value
        if isinstance(items, list) and all(isinstance(m, str) or (isinstance(m, dict) and isinstance(m.get("name"), str))
                                           for m in items):
            return [dict(m) if isinstance(m, dict) else m for m in items]
    elif shape == "key_values":
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): v for k, v in value.items()}
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return list(items)
    elif option.multiple:
        items = value if isinstance(value, list) else [value]
        return [_scalar(path, key, v, option.type, what) for v in items]
    else:
        return _scalar(path, key, value, option.type, what)
    raise _wrong(path, key, value, what)


def _field_value(path, key, value, tp):
    """``value`` for a config field with no option, checked against the field's type."""
    if tp is Any:
        return value
    args = _union_args(tp)
    if value is None:
        if type(None) in args:
            return None
    else:
        for arg in (a for a in args if a is not type(None)):
            origin = typing.get_origin(arg) or arg
            if origin in _WHAT:
                try:
                    return _scalar(path, key, value, origin, "")
                except ConfigFileError:
                    continue
            if origin is dict and isinstance(value, dict):
                return value
            if origin in (list, tuple) and isinstance(value, list):
                return tuple(value) if origin is tuple else value
    names = [_WHAT.get(typing.get_origin(a) or a) or {dict: "a mapping", list: "a list", tuple: "a list",
                                                       type(None): "null"}.get(typing.get_origin(a) or a, str(a))
             for a in args]
    raise _wrong(path, key, value, " or ".join(names))
