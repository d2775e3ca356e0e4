"""``--config FILE``: option values from YAML or JSON, through the real command line.

A file's values train the run (its config.json says so), the command line wins over the file,
and a run's config.json given back to ``--config`` repeats the run: the same config.json but for
``out``, and (seeds being in the config, and training on a CPU reproducible) the same weights to
the bit. The error cases are in tests/test_cli_errors.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from cli_runner import kd

from kdcache.cli.config_files import RUN_COMMANDS, RUN_INFO_KEYS, Option, read_config_file
from kdcache.core.errors import ConfigFileError
from kdcache.store.reader import CacheStore
from kdcache.teacher.cache_build import CacheBuildConfig
from kdcache.train.student import StudentConfig, StudentTrainer
from kdcache.train.trainer import TrainConfig, Trainer

TEACHER_YAML = """\
# option names, with - or _, values as on the command line or as YAML lists
model: tiny_models:TinyNet
dataset: synthetic
resolution: 32x48
limit: 8
batch-size: 4
epochs: 1
crop-size: 24x32
scale: "0.5,1.5"
flip: false
lr: 1e-3          # YAML reads this as a string; --lr takes it as the number
seed: 1
workers: 0
device: cpu
quiet: true
out: {out}
"""


def config_json(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(b / "last.pt", weights_only=False)["state_dict"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A: trained from TEACHER_YAML with --seed 3 on the command line; B: --config A/config.json --out B."""
    tmp = tmp_path_factory.mktemp("teacher")
    (tmp / "teacher.yaml").write_text(TEACHER_YAML.format(out=tmp / "A"))
    r = kd("train-teacher", "--config", tmp / "teacher.yaml", "--seed", 3)
    assert r.exit_code == 0, r.output
    r = kd("train-teacher", "--config", tmp / "A" / "config.json", "--out", tmp / "B", "--quiet")
    assert r.exit_code == 0, r.output
    return tmp / "A", tmp / "B"


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher_runs) -> Path:
    """A cache built from a config file that mixes option names and CacheBuildConfig fields, with --topk 3 given."""
    tmp = tmp_path_factory.mktemp("store")
    (tmp / "build.yaml").write_text(f"""\
weights: {teacher_runs[0]}
out: {tmp / "cache.zarr"}
dataset_options: {{resolution: [32, 48]}}   # a CacheBuildConfig field, as a mapping
features: [body]                             # the field's list (the option's text is body)
samples-per-shard: 4
limit: 8
topk: 4
queue_size: 2                                # a field with no option
device: cpu
workers: 0
quiet: true
""")
    r = kd("build-teacher-cache", "--config", tmp / "build.yaml", "--topk", 3)
    assert r.exit_code == 0, r.output
    return tmp / "cache.zarr"


def test_a_yaml_file_trains_the_run_and_the_command_line_wins(teacher_runs):
    a, _ = teacher_runs
    c = config_json(a)
    assert c["model"] == "tiny_models:TinyNet" and c["dataset_options"] == {"resolution": [32, 48]}
    assert c["limit"] == 8 and c["batch_size"] == 4 and c["epochs"] == 1 and c["workers"] == 0
    assert c["crop"] == [24, 32] and c["scale"] == [0.5, 1.5] and c["hflip"] is False and c["lr"] == 1e-3
    assert c["out"] == str(a) and c["train_samples"] == 8
    assert c["seed"] == 3  # the file says 1; --seed 3 on the command line wins


def test_a_runs_config_json_repeats_the_run(teacher_runs):
    a, b = teacher_runs
    ca, cb = config_json(a), config_json(b)
    assert cb["out"] == str(b)
    assert {k: v for k, v in ca.items() if k != "out"} == {k: v for k, v in cb.items() if k != "out"}
    assert same_weights(a, b)  # the seeds are in the config; training on the CPU is reproducible


def test_config_fields_and_an_option_less_field_in_json(tmp_path):
    """The config dataclass's field names and shapes (what config.json stores) work in a
    hand-written JSON file, as does a field that no option sets (momentum)."""
    cfg = {"model": "tiny_models:TinyNet", "dataset_options": {"resolution": [32, 48]}, "limit": 8,
           "batch_size": 4, "epochs": 1, "crop": [24, 32], "scale": [0.5, 1.5], "hflip": False,
           "optimizer": "sgd", "momentum": 0.5, "workers": None, "device": "cpu", "out": str(tmp_path / "run")}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    r = kd("train-teacher", "--config", tmp_path / "run.json", "--quiet")
    assert r.exit_code == 0, r.output
    c = config_json(tmp_path / "run")
    assert {k: c[k] for k in cfg} == cfg


def test_build_teacher_cache_from_a_config_file(store):
    schema = CacheStore(store).schema
    assert schema.k == 3  # the file says 4; --topk 3 on the command line wins
    assert list(schema.features) == ["body"] and schema.samples_per_shard == 4
    assert schema.dataset["options"] == {"resolution": [32, 48]} and schema.dataset["limit"] == 8


def test_train_student_methods_in_both_syntaxes(store, tmp_path):
    """Methods as --method texts in a YAML file (with a shorthand from the file and one from the
    command line), then as the mappings a run's config.json holds."""
    (tmp_path / "student.yaml").write_text(f"""\
cache: {store}
model: tiny_models:TinyNet    # --model, train-student's other name for --student
method: [kl, "dist:temperature=2"]
kd-weight: 0.5
limit: 8
batch_size: 4
epochs: 1
workers: 0
device: cpu
quiet: true
out: {tmp_path / "s1"}
""")
    r = kd("train-student", "--config", tmp_path / "student.yaml", "--temperature", 3)
    assert r.exit_code == 0, r.output
    c = config_json(tmp_path / "s1")
    assert c["methods"] == [{"name": "kl", "weight": 0.5, "temperature": 3.0},
                            {"name": "dist", "temperature": 2, "weight": 0.5}]  # its own temperature stays
    assert c["model"] == "tiny_models:TinyNet" and c["cache"] == str(store) and c["kind"] == "distill"

    r = kd("train-student", "--config", tmp_path / "s1" / "config.json", "--out", tmp_path / "s2", "--quiet")
    assert r.exit_code == 0, r.output
    c2 = config_json(tmp_path / "s2")
    assert {k: v for k, v in c.items() if k != "out"} == {k: v for k, v in c2.items() if k != "out"}
    assert same_weights(tmp_path / "s1", tmp_path / "s2")


# -- the reader on its own (kdcache.config_files) ----------------------------------------------------

OPTIONS = [Option("epochs", int), Option("lr", float), Option("crop_size", str, optional=True, shape="size"),
           Option("scale", str, shape="pair"), Option("flip", bool), Option("workers", int, optional=True),
           Option("dataset_option", str, multiple=True, optional=True, shape="key_values"),
           Option("out", str, optional=True)]
FIELD_PARAMS = {"crop": "crop_size", "hflip": "flip", "dataset_options": "dataset_option"}


def read(tmp_path, text: str, command: str = "train-teacher", name: str = "c.yaml", config=TrainConfig):
    (tmp_path / name).write_text(text)
    return read_config_file(tmp_path / name, OPTIONS, config, command=command, field_params=FIELD_PARAMS)


def test_a_home_folder_path_is_expanded_as_the_shell_does(tmp_path, monkeypatch):
    """``~/weights`` in a file means the home folder, as it does on the command line (the recipes'
    config files name ``~/data/...`` and ``~/weights/...``); a ``~`` inside a text is left alone."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = read(tmp_path, "out: ~/runs/a\ndataset_options: {root: ~/x}\n")
    assert f.options["out"] == str(tmp_path / "home" / "runs" / "a")
    assert f.options["dataset_option"] == {"root": "~/x"}  # a data set's own options are passed on as written
    assert read(tmp_path, "out: runs/a~b\n").options["out"] == "runs/a~b"


def test_the_run_kinds_are_the_trainers():
    assert RUN_COMMANDS == {Trainer.kind: Trainer.command, StudentTrainer.kind: StudentTrainer.command}


def test_values_take_either_shape(tmp_path):
    f = read(tmp_path, "epochs: 3\nlr: 1e-3\ncrop: [96, 128]\nscale: [0.5, 2]\nhflip: false\nworkers: null\n"
                       "dataset_options: {size: 40}\nmomentum: 0.5\nmodel_options: {width: 4}\n")
    assert f.options == {"epochs": 3, "lr": 1e-3, "crop_size": "96x128", "scale": "0.5,2.0", "flip": False,
                         "workers": None, "dataset_option": {"size": 40}}
    assert f.fields == {"momentum": 0.5, "model_options": {"width": 4}}  # no option sets these
    f = read(tmp_path, "crop-size: 96\ndataset-option: size=40\n")
    assert f.options == {"crop_size": "96", "dataset_option": ["size=40"]}
    assert read(tmp_path, "").options == {} and read(tmp_path, "# nothing\n").fields == {}


def test_a_config_file_saved_with_a_byte_order_mark_reads_as_utf8(tmp_path):
    """A JSON or YAML file a Windows editor saved with a byte-order mark reads like any other (json
    refused the mark), and non-ASCII text is UTF-8 whatever the platform's locale."""
    from kdcache.cli.config_files import load_mapping

    for name, text in (("c.json", '{"epochs": 3, "out": "runs/é"}'), ("c.yaml", "epochs: 3\nout: runs/é\n")):
        (tmp_path / name).write_bytes(text.encode("utf-8-sig"))
        assert load_mapping(tmp_path / name) == {"epochs": 3, "out": "runs/é"}, name


def test_a_runs_informational_keys_are_ignored_only_in_a_runs_config(tmp_path):
    info = {k: 1 for k in RUN_INFO_KEYS} | {"kind": "supervised", "epochs": 2}
    assert read(tmp_path, json.dumps(info), name="config.json").options == {"epochs": 2}
    with pytest.raises(ConfigFileError, match="'num_classes' is what a run records"):
        read(tmp_path, "num_classes: 5\n")  # no kind: not a run's config.json
    with pytest.raises(ConfigFileError, match="unknown key 'kind' for build-teacher-cache"):
        read(tmp_path, "kind: supervised\n", command="build-teacher-cache", config=CacheBuildConfig)
    with pytest.raises(ConfigFileError, match="not a train-student run; give it to train-teacher --config"):
        read(tmp_path, "kind: supervised\n", command="train-student", config=StudentConfig)


def test_wrong_values_name_the_key(tmp_path):
    for text, fragment in (("epochs: 2.5\n", "'epochs' takes an integer, got 2.5"),
                           ("flip: yes please\n", "'flip' takes true or false"),
                           ("crop: [1, 2, 3]\n", "'crop' takes HxW text"),
                           ("scale: [a, b]\n", "'scale' takes 'lo,hi' text or a list [lo, hi]"),
                           ("epochs: null\n", "'epochs' takes an integer, got null"),
                           ("momentum: [1]\n", "'momentum' takes a number, got [1]"),
                           ("model_options: 3\n", "'model_options' takes a mapping, got 3")):
        with pytest.raises(ConfigFileError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            read(tmp_path, text)


# -- an option is one declaration ----------------------------------------------------------------------


def test_a_new_option_is_one_declared_field(tmp_path):
    """A field declared with opt() on a config dataclass is, with nothing else written: a command-line
    option with its help and default, a --config key (by option or field name), and what --resume
    lets change or refuses, as declared."""
    import dataclasses

    from typer.testing import CliRunner

    from kdcache.cli.flags import config_options
    from kdcache.cli.train import help_context
    from kdcache.core.errors import KDCacheError
    from kdcache.core.options import opt, resumable

    @dataclasses.dataclass
    class Dummy(TrainConfig):
        dummy_level: int = opt(3, "A dummy level (default {dummy_level}).", names=("--dummy",))
        dummy_mode: str = opt("a", "A dummy mode that a resume may change.", resumable=True)

    app = typer.Typer()

    @app.command()
    @config_options(Dummy, help_context)
    def run(ctx: typer.Context, fields: dict, given: set[str]):
        typer.echo(json.dumps({"fields": fields, "given": sorted(given)}))

    runner = CliRunner()
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "--dummy" in r.output and "A dummy level (default 3)." in r.output
    assert "--dummy-mode" in r.output and "--epochs" in r.output  # with every inherited option
    r = runner.invoke(app, ["--dummy", "7"])
    assert json.loads(r.output) == {"fields": {"dummy_level": 7}, "given": ["dummy_level"]}
    (tmp_path / "c.yaml").write_text("dummy: 9\ndummy_mode: b\nepochs: 2\n")  # the option's name, the field's name
    r = runner.invoke(app, ["--config", str(tmp_path / "c.yaml"), "--epochs", "5"])
    assert json.loads(r.output)["fields"] == {"dummy_level": 9, "dummy_mode": "b", "epochs": 5}
    r = runner.invoke(app, ["--dummy", "many"], env={"COLUMNS": "250"})
    assert r.exit_code == 2 and "Invalid value for '--dummy'" in r.output, r.output
    # --resume: the resumable one may change, the other is compared with the run's config.json
    assert resumable(Dummy) == resumable(TrainConfig) | {"dummy_mode"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({**Dummy(out=str(run_dir)).to_dict(), "kind": "supervised",
                                                     "kdcache_version": "0.1.0"}))
    (run_dir / "last.pt").write_bytes(b"")
    trainer = Trainer(Dummy(out=str(run_dir), dummy_mode="z"), resume=True, explicit={"dummy_mode"})
    assert trainer.config.dummy_mode == "z" and trainer.config.dummy_level == 3
    with pytest.raises(KDCacheError, match="dummy_level: run has 3, now 4"):
        Trainer(Dummy(out=str(run_dir), dummy_level=4), resume=True, explicit={"dummy_level"})
