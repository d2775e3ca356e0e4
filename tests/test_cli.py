"""The kdcache command line, run as a user runs it (typer's CliRunner and real subprocesses)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_runner import kd
from fake_data import make_voc_sizes
from PIL import Image

TINY = ["--model", "tiny_models:TinyNet", "--dataset", "synthetic", "--resolution", "32x48",
        "--limit", "8", "--batch-size", "4", "--workers", "0", "--quiet"]



def test_installed_package_layout():
    from pathlib import Path

    import kdcache.cli
    import kdcache.kernels

    repo = Path(__file__).resolve().parents[1]
    assert Path(kdcache.cli.__file__).resolve() == repo / "cli" / "__init__.py"
    assert Path(kdcache.kernels.__file__).resolve() == repo / "kernels" / "__init__.py"


@pytest.mark.slow  # two new Python processes
def test_python_m_kdcache_and_console_script():
    r = subprocess.run([sys.executable, "-m", "kdcache", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train-teacher" in r.stdout and "evaluate" in r.stdout
    exe = __import__("shutil").which("kdcache") or str(__import__("pathlib").Path(sys.executable).with_name("kdcache"))
    r = subprocess.run([exe, "list-models"], capture_output=True, text=True)
    assert r.returncode == 0 and "deeplabv3_resnet50" in r.stdout and "demo_teacher" in r.stdout


@pytest.mark.slow  # a new process (python -m kdcache, 4-5 s)
def test_a_reader_that_stops_early_ends_the_command_quietly(monkeypatch):
    """`kdcache list-datasets | head -1`: the reader closes the pipe, and the command ends as the
    help does there (exit status 1, nothing on stderr), not with a file-system error line. A
    broken pipe that is not standard output's stays that one line."""
    p = subprocess.Popen([sys.executable, "-m", "kdcache", "list-datasets"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the command prints: every write fails
    err = p.stderr.read().decode()
    assert p.wait() == 1 and err == "", err
    import kdcache.cli.tools as tools

    def broken():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(tools, "model_groups", broken)
    r = kd("list-models")
    assert r.exit_code == 2 and r.output.startswith("error: Broken pipe") and len(r.output.splitlines()) == 1, r.output


@pytest.mark.slow  # trains, then evaluates
def test_train_then_evaluate(tmp_path):
    run = tmp_path / "run"
    r = kd("train-teacher", *TINY, "--epochs", 2, "--out", run)
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "tiny_models:TinyNet" and cfg["num_classes"] == 11 and cfg["epochs"] == 2
    assert cfg["class_names"][0] == "sky" and cfg["train_samples"] == 8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert all(0 <= x["val_miou"] <= 1 and x["train_loss"] > 0 for x in lines)
    assert (run / "best.pt").exists() and (run / "last.pt").exists()

    r = kd("evaluate", run, "--qualitative", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and "sky" in r.output
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["params"] > 0 and ev["latency"]["ms_per_image"] > 0 and ev["latency"]["fps"] > 0
    assert "cpu" in ev["latency"]["device"] and len(ev["iou"]) == 11
    assert ev["num_samples"] == 8 and 0 <= ev["miou"] <= 1
    best = sorted((run / "eval" / "best").glob("*.png"))
    worst = sorted((run / "eval" / "worst").glob("*.png"))
    assert len(best) == 2 and len(worst) == 2 and (run / "eval" / "iou_histogram.png").exists()
    with Image.open(best[0]) as im:
        assert im.size[0] > 3 * im.size[1]  # four panels side by side
    # the best-ranked image really has the highest per-image IoU
    ious = ev["per_image_iou"]
    assert best[0].name.split("_iou")[0].split("_", 1)[1] == max(ious, key=ious.get)
    # another split goes to its own folder; evaluating into a folder again says that it replaces
    r = kd("evaluate", run, "--split", "test", "--qualitative", 0, "--no-latency", "--quiet")
    assert r.exit_code == 0 and "replacing" not in r.output, r.output
    assert json.loads((run / "eval-test" / "eval.json").read_text())["split"] == "test"
    assert json.loads((run / "eval" / "eval.json").read_text())["split"] == "val"
    # a batch of more images than the split holds is the whole split (a DataLoader takes none past sys.maxsize)
    r = kd("evaluate", run, "--split", "test", "--batch-size", 10**20, "--qualitative", 0, "--no-latency", "--quiet",
           "--out", tmp_path / "ev-one-batch")
    assert r.exit_code == 0, r.output
    one_batch = json.loads((tmp_path / "ev-one-batch" / "eval.json").read_text())
    assert one_batch["miou"] == pytest.approx(json.loads((run / "eval-test" / "eval.json").read_text())["miou"])
    r = kd("evaluate", run, "--split", "test", "--qualitative", 0, "--no-latency", "--quiet")
    assert r.exit_code == 0 and "(replacing the earlier evaluation there)" in r.output, r.output
    # compare keeps its outputs in its own folder: nothing of the run's is rewritten
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    r = kd("compare", run, "--split", "test", "--no-latency", "--examples", 1, "--out", tmp_path / "cmp", "--quiet")
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_evaluate_a_bare_checkpoint_and_the_metrics_agree(tmp_path):
    run = tmp_path / "run"
    assert kd("train-teacher", *TINY, "--epochs", 1, "--out", run).exit_code == 0
    bare = tmp_path / "elsewhere" / "model.pt"  # no run folder beside it: the checkpoint's own config
    bare.parent.mkdir()
    bare.write_bytes((run / "last.pt").read_bytes())
    r = kd("evaluate", bare, "--qualitative", 0, "--no-latency", "--quiet", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert ev["miou"] == pytest.approx(logged["val_miou"], abs=1e-9)


def _records(run):
    timing = {"train_time_s", "train_images_per_s"}
    return [{k: v for k, v in json.loads(x).items() if k not in timing}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # trains twice
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from kdcache.core.runs import RunDir

    args = [a if a != "0" else "1" for a in TINY]  # one DataLoader worker, the CLI default
    assert args[args.index("--workers") + 1] == "1"
    a, b = tmp_path / "a", tmp_path / "b"
    assert kd("train-teacher", *args, "--epochs", 3, "--out", a).exit_code == 0

    # interrupt the second run while it logs epoch 2 (its last.pt is then epoch 1's)
    real_log = RunDir.log

    def crashing_log(self, record):
        if record.get("epoch") == 1:
            raise KeyboardInterrupt
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crashing_log)
    r = kd("train-teacher", *args, "--epochs", 3, "--out", b)
    assert r.exit_code == 130 and "--resume" in r.output
    monkeypatch.setattr(RunDir, "log", real_log)
    interrupted = torch.load(b / "last.pt", weights_only=True)
    assert interrupted["epoch"] == 0

    # resuming needs only the run folder: the options come from its config.json
    r = kd("train-teacher", "--out", b, "--resume", "--quiet")
    assert r.exit_code == 0, r.output
    sa = torch.load(a / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "last.pt", weights_only=True)["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    # the resumed epochs trained: the weights moved on from the interrupted checkpoint's
    assert any(not torch.equal(sb[k], interrupted["state_dict"][k]) for k in sb if sb[k].is_floating_point())
    assert _records(a) == _records(b)
    assert [x["epoch"] for x in _records(b)] == [0, 1, 2]


def test_resume_with_other_options_is_refused(tmp_path):
    run = tmp_path / "run"
    assert kd("train-teacher", *TINY, "--epochs", 1, "--out", run).exit_code == 0
    r = kd("train-teacher", *TINY, "--epochs", 2, "--lr", 0.5, "--out", run, "--resume")
    assert r.exit_code == 2 and "lr: run has" in r.output
    r = kd("train-teacher", *TINY, "--epochs", 1, "--out", run)
    assert r.exit_code == 2 and "already holds a run" in r.output
    r = kd("train-teacher", *TINY, "--epochs", 1, "--out", tmp_path / "none", "--resume")
    assert r.exit_code == 2 and "no run" in r.output


#: what --resume may change, pinned: anything else changes what the run trains on or how (a resumed
#: schedule student with another --seed would replay another schedule's crops)
RESUMABLE = {"epochs", "device", "workers", "eval_every", "weights", "tensorboard", "wandb", "wandb_project", "out"}


def test_what_resume_may_change_is_pinned():
    from kdcache.core.options import resumable
    from kdcache.teacher.cache_build import CacheBuildConfig
    from kdcache.train.student import StudentConfig
    from kdcache.train.trainer import TrainConfig

    assert resumable(TrainConfig) == RESUMABLE
    assert resumable(StudentConfig) == RESUMABLE  # a student's own options (cache, methods, …) never change
    assert resumable(CacheBuildConfig) == {"out"}  # a build resumes by its store's identity instead


def other_value(option, default) -> list[str]:
    """Command-line arguments that set ``option`` (a CliOption of TrainConfig) to a valid value other
    than the run's ``default``."""
    flag = option.flag
    if isinstance(default, bool):
        return [flag if not default else f"--no-{flag[2:]}"]
    shape = option.spec.shape
    special = {"--optimizer": "sgd", "--schedule": "cosine", "--model": "demo_student", "--dataset": "voc",
               "--fold": "1", "--folds": "3", "--limit": "6", "--batch-size": "2", "--mix": "cutmix",
               "--mix-prob": "0.5"}
    if flag in special:
        return [flag, special[flag], *(["--folds", "2"] if flag == "--fold" else [])]
    if shape == "size":
        return [flag, "16x16"]
    if shape == "pair":
        return [flag, "0.5,0.9"]
    if shape == "key_values":
        return [flag, "size=3"]
    if isinstance(default, int):
        return [flag, str(default + 1)]
    if isinstance(default, float):
        return [flag, repr(default * 2)]
    return [flag, "elsewhere"]


@pytest.mark.slow  # a run per option
def test_every_option_resume_may_not_change_is_refused(tmp_path):
    """Each option outside :data:`RESUMABLE`, given with another value on --resume, is refused in one
    line naming it; each inside it is taken (the run resumes)."""
    from kdcache.cli.flags import cli_options
    from kdcache.cli.train import help_context
    from kdcache.train.trainer import TrainConfig

    run = tmp_path / "run"
    assert kd("train-teacher", *TINY, "--epochs", 1, "--device", "cpu", "--out", run).exit_code == 0
    stored = json.loads((run / "config.json").read_text())
    options = [o for o in cli_options(TrainConfig, help_context()) if o.field != "out"]
    assert len(options) >= 30
    for o in options:
        if o.field in RESUMABLE:
            continue  # may change: two of them are tried below
        args = other_value(o, stored[o.field])
        r = kd("train-teacher", "--out", run, "--resume", "--quiet", *args)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
        assert f"{o.field}: run has {stored[o.field]!r}" in r.output, (args, r.output)
    r = kd("train-teacher", "--out", run, "--resume", "--quiet", "--epochs", 2, "--eval-every", 2)
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_folds_hold_out_part_of_the_training_split(tmp_path):
    run = tmp_path / "fold"
    r = kd("train-teacher", *TINY, "--epochs", 1, "--folds", 2, "--fold", 1, "--out", run)
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["folds"] == 2 and cfg["train_samples"] + cfg["val_samples"] == 8
    r = kd("evaluate", run, "--qualitative", 0, "--no-latency", "--quiet")
    assert r.exit_code == 0 and "fold 1/2" in r.output
    # --limit on a fold run takes the first images of the same held-out fold
    from kdcache.data import build_dataset
    from kdcache.data.splits import kfold_indices

    held = kfold_indices(8, 2, 1, seed=0)[1]
    ids = [build_dataset("synthetic", "train", resolution=(32, 48)).ids[i] for i in held]
    r = kd("evaluate", run, "--limit", 2, "--qualitative", 1, "--no-latency", "--quiet")
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["num_samples"] == 2 and sorted(ev["per_image_iou"]) == sorted(ids[:2])
    # the run's log says which evaluation scored what, and on how many images
    logged = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x.get("event") == "evaluate"]
    assert [(x["num_samples"], x.get("limit"), x["split"], x["dataset"]) for x in logged] == [
        (4, None, "train fold 1/2", "synthetic"), (2, 2, "train fold 1/2", "synthetic")], logged
    assert logged[1]["miou"] == pytest.approx(ev["miou"]) and logged[1]["out"] == str(run / "eval")


@pytest.mark.parametrize("args,message", [
    (["--dataset", "voc", "--data-root", "/nonexistent/voc"], "does not exist"),
    (["--dataset", "voc"], "needs --data-root"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--resize", "12x"], "--resize takes HxW"),
    (["--optimizer", "adam"], "--optimizer must be sgd or adamw"),
    (["--dataset-option", "colour=red"], "does not take option"),
    (["--eval-every", "0"], "--eval-every must be a finite number >= 1, got 0"),
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--fold", "1"], "--fold 1 needs --folds"),
    (["--workers", "-1"], "--workers must be a finite number in [0, 256], got -1"),
    (["--workers", "2147483648"], "--workers must be a finite number in [0, 256], got 2147483648"),
    (["--seed", "-1"], "--seed must be a finite number in [0, 4294967295], got -1"),
    (["--seed", "99999999999999999999"], "--seed must be a finite number in [0, 4294967295], got 99999999999999999999"),
])
def test_bad_training_options_give_clear_errors(tmp_path, args, message):
    r = kd("train-teacher", "--out", tmp_path / "x", "--epochs", 1, "--quiet", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_evaluate_errors(tmp_path):
    r = kd("evaluate", tmp_path / "missing")
    assert r.exit_code == 2 and "does not exist" in r.output
    run = tmp_path / "run"
    assert kd("train-teacher", *TINY, "--epochs", 1, "--out", run).exit_code == 0
    # a model trained on 11 classes evaluated on a 3-class folder data set
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\nc\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "x.png")
    r = kd("evaluate", run, "--dataset", "folder", "--data-root", root, "--split", "all", "--quiet")
    assert r.exit_code == 2 and "predicts 11 classes" in r.output and "has 3" in r.output


def test_class_weights_follow_median_frequency(tmp_path):
    from kdcache.data import build_dataset
    from kdcache.pipeline.transforms import Preprocess
    from kdcache.train.trainer import median_frequency_weights

    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\nc\n")
    m1 = np.zeros((2, 4), np.uint8)
    m1[0, :2] = 1          # image 1: a 6 px, b 2 px
    m2 = np.full((2, 4), 2, np.uint8)
    m2[1, 3] = 255         # image 2: c 7 px (1 ignored)
    for i, m in enumerate((m1, m2)):
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(m).save(root / "masks" / f"{i}.png")
    ds = build_dataset("folder", "all", root)
    w = median_frequency_weights(ds, Preprocess()).numpy()
    f = np.array([6 / 8, 2 / 8, 7 / 7])  # pixels of c / pixels of images containing c
    np.testing.assert_allclose(w, np.median(f) / f, rtol=1e-6)
    # --quiet silences every bar, the class weights' too
    args = ["train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "folder", "--data-root", root,
            "--train-split", "all", "--val-split", "all", "--crop-size", "2x4", "--batch-size", 2, "--epochs", 1,
            "--class-weights"]
    r = kd(*args, "--out", tmp_path / "loud")
    assert r.exit_code == 0 and "class weights" in r.output, r.output
    r = kd(*args, "--out", tmp_path / "quiet", "--quiet")
    assert r.exit_code == 0 and "class weights" not in r.output and "━" not in r.output, r.output


@pytest.mark.slow  # a DataLoader worker process (its shutdown after the error waits 5 s)
def test_bad_mask_in_a_worker_is_one_clear_line(tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.full((8, 8), 7 if i == 2 else 1, np.uint8)).save(root / "masks" / f"im{i}.png")
    r = kd("train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "folder", "--data-root", root,
           "--train-split", "all", "--val-split", "all", "--crop-size", "8x8", "--workers", "1",
           "--batch-size", "2", "--epochs", "1", "--out", tmp_path / "r", "--quiet")
    assert r.exit_code == 2, r.output
    assert "im2.png has values {7} outside the 2 classes" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow  # trains, then evaluates
def test_train_and_evaluate_on_voc_images_of_different_sizes(tmp_path):
    make_voc_sizes(tmp_path)
    run = tmp_path / "run"
    r = kd("train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "voc", "--data-root", tmp_path,
           "--crop-size", "16x16", "--batch-size", "2", "--epochs", "1", "--out", run, "--quiet")
    assert r.exit_code == 0, r.output
    r = kd("evaluate", run, "--batch-size", "3", "--qualitative", "1", "--quiet")
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["num_samples"] == 3 and len(ev["iou"]) == 21 and ev["class_names"][0] == "background"
    assert ev["latency"]["input_size"] == [20 + 4 * 4, 28 - 2 * 4]  # the first val image's size


def _commands():
    from kdcache.cli.app import all_commands

    return all_commands()


def test_training_commands_share_their_options():
    """Both training commands take every option TrainConfig declares (StudentConfig inherits the
    declarations), but the two the student does differently."""
    cmds = _commands()
    teacher = {p.name for p in cmds["train-teacher"].params}
    student = {p.name for p in cmds["train-student"].params}
    assert {"dataset_option", "resolution", "resize", "folds", "class_weights", "crop_size", "flip"} <= teacher
    # the student trains on its cache's split, and names its architecture --student (alias --model)
    assert teacher - student == {"model", "train_split"}
    assert {"student", "method", "cache", "unlabeled_cache", "kd_weight"} <= student - teacher


#: the options whose --help shows no default, by command: each has none (None: not given), or one the
#: command works out (an --out named after the model, a data set from the cache). Any other option
#: showing no default is a default dropped from the command line.
NO_SHOWN_DEFAULT = {
    "train-teacher": {"backbone_weights", "config_file", "crop_size", "data_root", "dataset_option", "folds", "limit",
                      "model_option", "out", "resize", "resolution", "wandb_project", "weights", "workers"},
    "train-student": {"backbone_weights", "cache", "confidence_threshold", "config_file", "crop_size", "data_root",
                      "dataset", "dataset_option", "folds", "kd_weight", "limit", "method", "model_option",
                      "online_teacher", "out", "resize", "resolution", "student_tap", "teacher_tap", "teacher_weights",
                      "temperature", "unlabeled_cache", "unlabeled_limit", "wandb_project", "weights", "workers"},
    "build-teacher-cache": {"config_file", "crop_size", "data_root", "dataset", "dataset_option", "features",
                            "features_from", "form", "grid_stride", "limit", "out", "resolution", "samples_per_shard",
                            "signals", "store_scales", "teacher", "topk", "view_crop", "weights", "workers"},
    "inspect-cache": {"json_out"}, "verify-cache": set(), "export-pseudo-labels": {"class_balanced", "out"},
    "evaluate": {"data_root", "dataset", "limit", "onnx", "out", "split"}, "export": {"input_size", "out"},
    "compare": {"baseline", "data_root", "split"}, "demo": {"limit"},
    "bench-kernels": {"dtype", "json_out", "markdown_out", "repeats"}, "list-models": set(), "list-datasets": set(),
    "list-methods": set(),
}


def test_help_shows_the_defaults_the_code_uses():
    """Every option shows the default the code uses (the config field's, or the library function's
    parameter's), written as the command line takes it; the options showing none are exactly
    :data:`NO_SHOWN_DEFAULT`'s."""
    import dataclasses
    import inspect

    from kdcache.demo.segmentation import run_demo
    from kdcache.kernels import bench
    from kdcache.methods import METHODS
    from kdcache.report.compare import compare_runs
    from kdcache.report.evaluation import evaluate_run
    from kdcache.report.export import export_run
    from kdcache.report.pseudo_labels import export_pseudo_labels
    from kdcache.store.check import inspect_store
    from kdcache.teacher.cache_build import CacheBuildConfig
    from kdcache.train.student import StudentConfig
    from kdcache.train.trainer import TrainConfig

    cmds = _commands()
    for command, c in cmds.items():
        shown_none = {p.name for p in c.params if p.default is None and p.param_type_name == "option"}
        assert shown_none == NO_SHOWN_DEFAULT[command], command

    def cli_text(v):  # a field's default as the command line writes it
        if isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
            return ",".join(f"{x:g}" for x in v)
        return v

    for command, config in (("train-teacher", TrainConfig), ("train-student", StudentConfig),
                            ("build-teacher-cache", CacheBuildConfig)):
        params = {p.name: p for p in cmds[command].params}
        fields = {f.name: f for f in dataclasses.fields(config)}
        renamed = {"crop_size": "crop", "flip": "hflip", "student": "model"}
        checked = 0
        for name, param in params.items():
            field = fields.get(renamed.get(name, name))
            if param.default is None or field is None or param.param_type_name != "option":
                continue
            value = field.default_factory() if field.default is dataclasses.MISSING else field.default
            assert param.default == cli_text(value), (command, name, param.default, value)
            checked += 1
        assert checked >= 20, (command, checked)
    # the commands without a config: each default is its library function's
    library = {
        "evaluate": (evaluate_run, {"batch_size": "batch_size", "workers": "workers", "device": "device",
                                    "qualitative": "qualitative", "latency": "latency"}),
        "compare": (compare_runs, {"out": "out", "examples": "examples", "latency": "latency", "device": "device",
                                   "page_images": "page_images"}),
        "export": (export_run, {"format": "fmt", "opset": "opset"}),
        "demo": (run_demo, {"out": "out", "teacher_epochs": "teacher_epochs", "student_epochs": "student_epochs",
                            "device": "device", "seed": "seed"}),
        "export-pseudo-labels": (export_pseudo_labels, {"confidence_threshold": "threshold"}),
        "inspect-cache": (inspect_store, {"samples": "samples"}),
        "bench-kernels": (bench.run, {"quick": "quick", "compile": "compile_backend"}),
    }
    for command, (fn, names) in library.items():
        params = {p.name: p for p in cmds[command].params}
        for param, arg in names.items():
            assert params[param].default == inspect.signature(fn).parameters[arg].default, (command, param)
    assert {p.name: p for p in cmds["bench-kernels"].params}["topk"].default == ",".join(
        map(str, inspect.signature(bench.run).parameters["ks"].default))
    assert {p.name: p.default for p in cmds["train-teacher"].params}["flip"] is TrainConfig.hflip
    # the shorthands' help names each method's own default, read from its constructor
    helps = {p.name: p.help for p in cmds["train-student"].params}
    for option, help_option in (("temperature", "temperature"), ("confidence_threshold", "confidence_threshold")):
        takers = [n for n, cls in METHODS.items() if option in inspect.signature(cls.__init__).parameters]
        assert takers
        for name in takers:
            value = inspect.signature(METHODS.get(name).__init__).parameters[option].default
            assert f"{name} {value:g}" in helps[help_option], (name, helps[help_option])
    assert "cwd 4" in helps["temperature"]  # not the "4" help
    # once claimed for kl: each task's own default, and a mixing classifier's
    assert "kl 1 (classification 4, classification with mixup 1)" in helps["temperature"]
    assert "dist 1 (classification 4, classification with mixup 1)" in helps["temperature"]
    # each task's weight, chosen on val
    assert "kl 1 (segmentation 0.5, classification 2, classification with mixup 1)" in helps["kd_weight"]
    assert "dist 1 (segmentation 2, classification 2, classification with mixup 1)" in helps["kd_weight"] and "cwd 3," in helps["kd_weight"]
    for name, cls in METHODS.items():
        if name != "none":
            assert f"{name} {cls.default_weight:g}" in helps["kd_weight"]


def test_help_and_version_start_without_torch():
    """`kdcache --help` lists every command from the app's table and `--version` prints the version,
    neither importing a command's module nor torch (how long they take: benchmarks/cli_startup.py)."""
    from kdcache import __version__
    from kdcache.cli.app import COMMANDS

    probe = ("import runpy, sys; sys.argv = ['kdcache', {arg!r}]\n"
             "try:\n    runpy.run_module('kdcache', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, any(m.startswith('kdcache.cli.') and m != 'kdcache.cli.app' "
             "for m in sys.modules))")
    for arg in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", probe.format(arg=arg)], capture_output=True, text=True,
                           env={**__import__("os").environ, "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "False False", (arg, r.stdout)
        if arg == "--version":
            assert r.stdout.splitlines()[0] == f"kdcache {__version__}"
        else:
            for name, entry in COMMANDS.items():
                assert name in r.stdout and entry.summary.split(":")[0][:40] in " ".join(r.stdout.split()), name
            assert "<bool>" not in r.stdout


def test_the_command_table_matches_the_commands():
    """Each command the help lists is defined in the module the table names, with the table's summary
    as the first line of its help; no command is missing from the table."""
    import importlib

    import typer.main

    from kdcache.cli.app import COMMANDS, all_commands, app

    commands = all_commands()
    assert set(commands) == set(COMMANDS) and list(typer.main.get_command(app).list_commands(None)) == list(COMMANDS)
    for name, entry in COMMANDS.items():
        fn = commands[name].callback.__wrapped__
        assert fn.__module__ == f"kdcache.cli.{entry.module}", name
        assert importlib.import_module(fn.__module__)
        assert (commands[name].help or "").strip().splitlines()[0] == entry.summary, name


def test_help_groups_options_in_panels_the_essential_ones_first():
    r = kd("train-student", "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0
    out = r.output
    panels = [p for p in ("Inputs and outputs", "Method", "Training", "Augmentation", "Data", "Hardware", "Logging")
              if f"─ {p} " in out]
    assert panels == ["Inputs and outputs", "Method", "Training", "Augmentation", "Data", "Hardware", "Logging"]
    assert [out.index(f"─ {p} ") for p in panels] == sorted(out.index(f"─ {p} ") for p in panels)
    for option in ("--cache", "--out", "--student", "--method"):
        assert out.index(option) < out.index("--wandb") and out.index(option) < out.index("--epochs"), option
    assert out.index("--cache ") < out.index("--config ")  # within the first panel too
    assert "<bool>" not in out
    r = kd("build-teacher-cache", "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.index("--weights ") < r.output.index("--topk ") < r.output.index("--device ")


@pytest.mark.slow  # builds two caches, trains two students
def test_the_default_method_is_the_one_the_benchmarks_chose_for_the_task(tmp_path, monkeypatch):
    """No --method: dist for a segmentation cache, kl for a classification one (the run folder is
    named after it, config.json records it); --help says why."""
    from fake_data import make_teacher

    from kdcache.core.checkpoint import save_checkpoint
    from kdcache.models import build_model
    from kdcache.train.student import DEFAULT_METHOD

    assert DEFAULT_METHOD == {"segmentation": "dist", "classification": "kl"}
    help_text = " ".join(kd("train-student", "--help", env={"COLUMNS": "200"}).output.split())
    assert "Default: dist for segmentation, kl for classification: the benchmarks' best on val" in help_text
    monkeypatch.chdir(tmp_path)  # the default run folders, runs/student-<method>, go here
    seg = make_teacher(tmp_path / "seg.pt")
    cls = tmp_path / "cls.pt"
    save_checkpoint(cls, build_model("demo_cls_teacher", 10, width=8), config={
        "model": "demo_cls_teacher", "num_classes": 10, "model_options": {"width": 8}})
    cases = (("segmentation", seg, ["--resolution", "32x48"], "demo_student"),
             ("classification", cls, ["--dataset", "shapes", "-o", "size=8", "-o", "resolution=24"], "demo_cls_student"))
    for task, teacher, data, model in cases:
        store = tmp_path / f"{task}.zarr"
        r = kd("build-teacher-cache", "--weights", teacher, "--out", store, "--limit", 4, *data, "--device", "cpu",
               "--workers", 0, "--quiet")
        assert r.exit_code == 0, r.output
        r = kd("train-student", "--cache", store, "--model", model, "--limit", 4, "--batch-size", 2, "--epochs", 1,
               "--workers", 0, "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.output
        config = json.loads((tmp_path / "runs" / f"student-{DEFAULT_METHOD[task]}" / "config.json").read_text())
        assert [m["name"] for m in config["methods"]] == [DEFAULT_METHOD[task]] and config["task"] == task
