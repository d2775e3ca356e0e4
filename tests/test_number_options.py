"""No number a user types reaches a traceback: every number option refuses NaN, ±inf and a value
outside its declared bounds in one line, exit status 2, before any folder is made.

The options are enumerated from the commands themselves (every option typer reads as a float, and
every declared pair or list of numbers), each matched to its declaration
(:func:`kdcache.cli.flags.number_options`): a new float option without declared bounds fails
:func:`test_every_number_option_declares_its_bounds`, and a new one with them is fed the bad values
below without a new test. The same values go in through ``--config`` files, and into every number
option of every KD method (``--method NAME:key=value`` and a config file's ``methods``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cli_runner import kd

from kdcache.cli.app import all_commands
from kdcache.cli.flags import NumberOption, number_options
from kdcache.core.options import Bounds
from kdcache.methods import METHODS, option_bounds
from kdcache.methods import number_options as method_number_options

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMMANDS = all_commands()


def numbers_of(name: str) -> dict[str, NumberOption]:
    return number_options(COMMANDS[name].callback.__wrapped__)


def bad_values(bounds: str | None, whole: bool = False) -> list[float]:
    """NaN, ±inf and (where it has bounds) a finite value outside them; for a whole-number option on
    the command line (which parses no NaN or inf) the values below and above its bounds."""
    if whole:
        b = Bounds(bounds)
        return [b.outside(), *([b.above()] if b.above() is not None else []), 10**20 if b.above() else -10**20]
    return [float("nan"), float("inf"), float("-inf"), *([Bounds(bounds).outside()] if bounds else [])]


def text(value: float, shape: str | None) -> str:
    """A value as the command line takes it: one number, a 'lo,hi' pair, or a list."""
    one = str(value) if isinstance(value, int) else {float("inf"): "inf", float("-inf"): "-inf"}.get(
        value, "nan" if value != value else f"{value:g}")
    return f"{one},{one}" if shape == "pair" else one


def required_args(name: str, tmp: Path) -> list[str]:
    """Dummy values of a command's required arguments and options (paths under ``tmp`` that do not
    exist: a number is refused before any of them is read)."""
    args = []
    for p in COMMANDS[name].params:
        if p.required:
            args += ([] if p.param_type_name == "argument" else [p.opts[0]]) + [str(tmp / f"dummy-{p.name}")]
    return args


def refused(result, *fragments: str) -> None:
    out = ANSI.sub("", result.output)
    lines = [line for line in out.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


#: every number option of every command, as the test enumerates them
CASES = [(name, param, option) for name in sorted(COMMANDS) for param, option in sorted(numbers_of(name).items())]


#: whole-number options whose range is checked where they are used, not by declared bounds
CHECKED_WHERE_USED = {("export", "opset"): "kdcache.report.export: 11 to 20, and only for --format onnx"}


def test_every_number_option_declares_its_bounds():
    """The options typer reads as floats are exactly the declared number options' one-number kind (a
    float option without a declaration fails here), the integer ones are declared whole-number options
    (or checked where used, :data:`CHECKED_WHERE_USED`), and every number option has bounds."""
    for name, command in COMMANDS.items():
        floats = {p.name for p in command.params if p.bare_type() == "float"}  # what typer reads as a float
        ints = {p.name for p in command.params if p.bare_type() == "int"}
        declared = numbers_of(name)
        assert floats == {p for p, o in declared.items() if o.shape is None and not o.whole}, name
        assert ints - {p for (n, p) in CHECKED_WHERE_USED if n == name} == {p for p, o in declared.items() if o.whole}, \
            f"{name}: declare the bounds of {sorted(ints - {p for p, o in declared.items() if o.whole})}"
        for option in declared.values():
            assert option.bounds is not None, f"{name} {option.flag}: declare its bounds"
    assert len(CASES) >= 20
    assert {"--lr", "--kd-weight", "--temperature", "--tta-scales", "--scale", "--class-balanced", "--seed", "--workers",
            "--epochs", "--samples-per-shard"} <= {o.flag for _, _, o in CASES}


@pytest.mark.parametrize(("name", "param", "option"), CASES, ids=[f"{n}{o.flag}" for n, _, o in CASES])
def test_a_bad_number_on_the_command_line_is_one_line_and_makes_nothing(name, param, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/…) would appear here
    for value in bad_values(option.bounds, option.whole):
        r = kd(name, *required_args(name, tmp_path), option.flag, text(value, option.shape))
        refused(r, option.flag, "must be a finite number")
        assert list(tmp_path.iterdir()) == [], (option.flag, value)


CONFIGURED = [(n, p, o) for n, p, o in CASES if "config_file" in {q.name for q in COMMANDS[n].params}]


@pytest.mark.parametrize(("name", "param", "option"), CONFIGURED, ids=[f"{n}{o.flag}" for n, _, o in CONFIGURED])
def test_a_bad_number_in_a_config_file_is_one_line_and_makes_nothing(name, param, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path.parent / f"{tmp_path.name}-config.yaml"
    for value in bad_values(option.bounds, option.whole):  # (a whole number's NaN: "takes an integer", as any type)
        item = [value, value] if option.shape == "pair" else [value] if option.shape == "numbers" else value
        config.write_text(yaml.safe_dump({option.flag[2:]: item}))
        refused(kd(name, *required_args(name, tmp_path), "--config", config), f"--config {config}: {option.flag}",
                "must be a finite number")
        assert list(tmp_path.iterdir()) == [], (option.flag, value)


def test_a_config_files_other_numbers_are_finite(tmp_path, monkeypatch):
    """A config field that is no option (``momentum``, ``poly_power``) is a number too."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path.parent / "fields.yaml"
    for value in (float("nan"), float("inf")):
        config.write_text(yaml.safe_dump({"momentum": value}))
        refused(kd("train-teacher", "--config", config), f"--config {config}: momentum must be a finite number")
    assert list(tmp_path.iterdir()) == []


METHOD_CASES = [(m, o) for m in METHODS.names() for o in method_number_options(m)]


def test_every_method_number_option_declares_its_bounds():
    for method, option in METHOD_CASES:
        assert option in option_bounds(method), f"method {method}: declare the bounds of {option}"
    assert {("kl", "temperature"), ("dist", "beta"), ("pseudo", "class_balanced"), ("kl", "margin")} <= \
        set(METHOD_CASES)


#: the quick tier's share: each method's first option (the rest are `slow`)
FIRST_OPTION = {m: o for m, o in reversed(METHOD_CASES)}


@pytest.mark.parametrize(("method", "option"), [
    pytest.param(m, o, id=f"{m}:{o}", marks=() if FIRST_OPTION[m] == o else pytest.mark.slow) for m, o in METHOD_CASES])
def test_a_bad_method_option_is_one_line_and_makes_nothing(method, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = str(tmp_path.parent / "no-such-cache.zarr")  # refused before the cache is opened
    config = tmp_path.parent / f"{tmp_path.name}-methods.yaml"
    for value in bad_values(option_bounds(method)[option]):
        refused(kd("train-student", "--cache", store, "--method", f"{method}:{option}={text(value, None)}"),
                f"method '{method}': {option} must be a finite number")
        config.write_text(yaml.safe_dump({"methods": [{"name": method, option: value}]}))
        refused(kd("train-student", "--cache", store, "--config", config),
                f"method '{method}': {option} must be a finite number")
        assert list(tmp_path.iterdir()) == [], (method, option, value)


def test_the_library_refuses_them_too():
    """Python callers get the same one-line errors: a config's validate() and build_method."""
    from kdcache.core.errors import KDCacheError
    from kdcache.methods import build_method
    from kdcache.teacher.cache_build import CacheBuildConfig
    from kdcache.train.student import StudentConfig
    from kdcache.train.trainer import TrainConfig

    with pytest.raises(KDCacheError, match=r"--lr must be a finite number in \(0, 1000\], got nan"):
        TrainConfig(lr=float("nan")).validate()
    with pytest.raises(KDCacheError, match=r"--lr takes a finite number in \(0, 1000\], got 'fast'"):
        TrainConfig(lr="fast").validate()
    with pytest.raises(KDCacheError, match="momentum must be a finite number, got inf"):
        TrainConfig(momentum=float("inf")).validate()
    with pytest.raises(KDCacheError, match=r"--unlabeled-share must be a finite number in \(0, 1\), got 1"):
        StudentConfig(cache="x", unlabeled_share=1.0).validate()
    with pytest.raises(KDCacheError, match="method 'kl': weight must be a finite number >= 0, got inf"):
        StudentConfig(cache="x", methods=[{"name": "kl", "weight": float("inf")}]).validate()
    with pytest.raises(KDCacheError, match=r"--combine-temperature must be a finite number in \[0.01, 100\], got -inf"):
        CacheBuildConfig(weights=["w"], out="o", combine_temperature=float("-inf")).validate()
    with pytest.raises(KDCacheError, match=r"method 'dist': temperature must be a finite number in \[0.01, 100\], got nan"):
        build_method("dist", temperature=float("nan"))
    with pytest.raises(KDCacheError, match="method 'kl': temperature takes a number, got 'warm'"):
        build_method("kl", temperature="warm")
    # a method built directly checks its bounds too (the outermost constructor, once)
    with pytest.raises(KDCacheError, match="method 'dist': gamma must be a finite number >= 0, got -inf"):
        METHODS.get("dist")(gamma=float("-inf"))
    with pytest.raises(KDCacheError, match="method 'at': weight must be a finite number >= 0, got nan"):
        METHODS.get("at")(weight=float("nan"), student_tap="s", teacher_tap="t")
    assert METHODS.get("kl")(temperature=2).temperature == 2.0


def test_bounds_read_as_written():
    assert [Bounds("> 0").holds(x) for x in (0, 1e-9)] == [False, True]
    assert [Bounds(">= 0").holds(x) for x in (-1e-9, 0)] == [False, True]
    assert [Bounds("(0, 1]").holds(x) for x in (0, 0.5, 1, 1.01)] == [False, True, True, False]
    assert [Bounds("[0, 1)").holds(x) for x in (0, 1)] == [True, False]
    assert Bounds("[0, 1]").describe() == "in [0, 1]" and Bounds("> 0").describe() == "> 0"
    assert not Bounds("(0, 1]").holds(Bounds("(0, 1]").outside()) and not Bounds("> 0").holds(Bounds("> 0").outside())
    with pytest.raises(ValueError, match="bounds 'positive'"):
        Bounds("positive")
