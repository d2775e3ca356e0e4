"""--tensorboard and --wandb: small real runs through the command line, read back with each
tool's own reader (TensorBoard's EventAccumulator; W&B's offline run file, or a fake ``wandb``
module recording the calls), every scalar checked against ``metrics.jsonl``."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import kd
from PIL import Image

from kdcache.data import build_dataset
from kdcache.data.splits import limit
from kdcache.pipeline.transforms import Preprocess
from kdcache.report.figures import colorize
from kdcache.train.loggers import RunLogger
from kdcache.train.trainer import TrainConfig, Trainer

RES = ["--resolution", "32x48"]  # synthetic images 32 x 48: panels are 32 x 144
SMALL = ["--limit", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet", *RES]
EXAMPLES = 4


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def expected_scalars(record: dict, class_names: list[str]) -> dict[str, float]:
    """What the loggers should hold for one metrics.jsonl line, spelled out key by key."""
    flat = {k: v for k, v in record.items()
            if k not in ("epoch", "loss_terms", "best", "val_iou", "train_samples_per_rank")}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat.values()), flat
    flat.update({f"val_iou/{name}": v for name, v in zip(class_names, record.get("val_iou", []))})
    flat.update({f"train_samples_per_rank/{r}": v for r, v in enumerate(record["train_samples_per_rank"])})
    return {k: float(v) for k, v in flat.items() if v is not None}  # None: NaN in metrics.jsonl, not logged


def class_names(run: Path) -> list[str]:
    return json.loads((run / "config.json").read_text())["class_names"]


# -- TensorBoard, read with its own reader --------------------------------------------------------------


#: the tensorboard extra (CI installs it; without it these tests skip in one line)
NEEDS_TENSORBOARD = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason='needs the tensorboard extra (pip install "kdcache[tensorboard]")')


def tensorboard(run: Path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def check_tensorboard_scalars(run: Path) -> None:
    acc = tensorboard(run)
    names, records = class_names(run), metrics(run)
    logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    wanted = [expected_scalars(r, names) for r in records]
    assert set(logged) == set().union(*wanted)
    assert len([t for t in logged if t.startswith("val_iou/")]) == len(names) == 11
    for tag, events in logged.items():
        steps = [s for s, _ in events]
        assert steps == [r["epoch"] for r, w in zip(records, wanted) if tag in w], (tag, steps)  # once per epoch
        for (step, value), w in zip(events, (w for w in wanted if tag in w)):
            assert value == np.float32(w[tag]), (tag, step, value, w[tag])  # TensorBoard keeps float32


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@NEEDS_TENSORBOARD
def test_tensorboard_holds_metrics_jsonl_and_validation_panels(tmp_path):
    run = tmp_path / "teacher"
    r = kd("train-teacher", "--model", "demo_student", *SMALL, "--epochs", 2, "--tensorboard", "--out", run)
    assert r.exit_code == 0, r.output
    assert len(metrics(run)) == 2
    check_tensorboard_scalars(run)

    acc = tensorboard(run)
    val = limit(build_dataset("synthetic", "val", resolution=[32, 48]), 16)
    ids = [val.refs[i].id for i in range(EXAMPLES)]
    assert sorted(acc.Tags()["images"]) == sorted(f"val_examples/{i}" for i in ids)  # the first 4, fixed
    pre, palette = Preprocess(), np.asarray(val.palette)
    for k, sid in enumerate(ids):
        events = acc.Images(f"val_examples/{sid}")
        assert [e.step for e in events] == [0, 1]
        image, mask = val.load(k)
        for e in events:
            assert (e.width, e.height) == (3 * 48, 32)
            panel = decode(e.encoded_image_string)
            assert panel.shape == (32, 144, 3)
            np.testing.assert_array_equal(panel[:, :48], pre.denormalize(pre.image_to_tensor(image)))  # input
            np.testing.assert_array_equal(panel[:, 48:96], colorize(pre.mask_to_tensor(mask).numpy(), palette))
            pred = panel[:, 96:].reshape(-1, 3)  # the prediction: every pixel a class colour
            assert (pred[:, None, :] == palette[None]).all(-1).any(-1).all()


@NEEDS_TENSORBOARD
@pytest.mark.slow  # trains, resumes
def test_tensorboard_on_resume_hides_what_the_redone_epoch_replaces(tmp_path, monkeypatch):
    """Epoch 1 logged but never checkpointed (a crash between the two): the resumed run writes
    with purge_step, so TensorBoard shows the redone epoch's values only. W&B (a fake module
    here) continues the same run id."""
    calls = fake_wandb(monkeypatch)
    run = tmp_path / "teacher"
    r = kd("train-teacher", "--model", "demo_student", *SMALL, "--epochs", 1, "--tensorboard", "--wandb", "--out", run)
    assert r.exit_code == 0, r.output
    tb = pytest.importorskip("torch.utils.tensorboard")
    w = tb.SummaryWriter(str(run / "tensorboard"))  # what the crashed epoch 1 had logged
    w.add_scalar("val_miou", 123.0, 1)
    w.add_scalar("train_loss", 123.0, 1)
    w.close()
    r = kd("train-teacher", "--out", run, "--resume", "--epochs", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert [x["epoch"] for x in metrics(run)] == [0, 1]
    check_tensorboard_scalars(run)  # one value per epoch, the metrics.jsonl one (not 123)
    first, second = (c for c in calls if c[0] == "init")
    assert first[1]["id"] == second[1]["id"] and second[1]["resume"] == "allow"
    assert [c[2] for c in calls if c[0] == "log" and "val_miou" in c[1]] == [0, 1]


@NEEDS_TENSORBOARD
def test_a_run_started_again_drops_the_old_event_files(tmp_path):
    run = tmp_path / "teacher"
    args = ["train-teacher", "--model", "demo_student", *SMALL, "--epochs", 1, "--tensorboard", "--out", run]
    assert kd(*args).exit_code == 0
    r = kd(*args, "--overwrite", "--seed", 1)
    assert r.exit_code == 0, r.output
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    check_tensorboard_scalars(run)


# -- Weights & Biases -----------------------------------------------------------------------------------


def fake_wandb(monkeypatch) -> list:
    """A ``wandb`` module that records init, log (data, step), Image and finish."""
    calls: list = []

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = np.asarray(data), caption

    class Run:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=Image, __name__="wandb"))
    return calls


@NEEDS_TENSORBOARD
def test_student_logs_to_tensorboard_and_wandb(small_store, tmp_path, monkeypatch):
    store = small_store[1]
    calls = fake_wandb(monkeypatch)
    run = tmp_path / "student"
    r = kd("train-student", "--cache", store, "--method", "kl", *SMALL, "--epochs", 2, "--tensorboard", "--wandb",
           "--wandb-project", "kd-tests", "--out", run)
    assert r.exit_code == 0, r.output
    check_tensorboard_scalars(run)
    assert "train_kl" in tensorboard(run).Tags()["scalars"]

    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["project"] == "kd-tests" and init[0][1]["dir"] == str(run)
    assert init[0][1]["config"] == json.loads((run / "config.json").read_text())
    assert (run / "wandb" / "kdcache-run-id").read_text().strip() == init[0][1]["id"]
    logs = [c for c in calls if c[0] == "log"]
    scalars = [(data, step) for _, data, step in logs if "val_examples" not in data]
    names = class_names(run)
    assert scalars == [(expected_scalars(rec, names), rec["epoch"]) for rec in metrics(run)]  # exact values
    images = [(data["val_examples"], step) for _, data, step in logs if "val_examples" in data]
    assert [step for _, step in images] == [0, 1]
    for pictures, _ in images:
        assert [p.caption for p in pictures] == [f"val_{i:06d}" for i in range(EXAMPLES)]
        assert all(p.data.shape == (32, 144, 3) and p.data.dtype == np.uint8 for p in pictures)
    assert calls[-1] == ("finish",)


def wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log blocks of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_holds_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run = tmp_path / "teacher"
    r = kd("train-teacher", "--model", "demo_student", *SMALL, "--epochs", 2, "--wandb", "--out", run)
    assert r.exit_code == 0, r.output
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run / "wandb").iterdir())  # offline: the run stays in RUN/wandb
    history = {}
    for rec in wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(rec.history.step.num, {}).update(items)
    names = class_names(run)
    assert sorted(history) == [0, 1]
    for record in metrics(run):
        logged = history[record["epoch"]]
        want = expected_scalars(record, names)
        assert {k: logged[k] for k in want} == want
        assert not {k for k in logged if not k.startswith(("_", "val_examples/"))} - set(want)
        assert logged["val_examples/count"] == EXAMPLES
        assert (logged["val_examples/width"], logged["val_examples/height"]) == (144, 32)
        for name in logged["val_examples/filenames"]:
            assert (files[0].parent / "files" / name).exists()


# -- rank 0 only ----------------------------------------------------------------------------------------


@NEEDS_TENSORBOARD
def test_only_rank_0_opens_the_loggers(tmp_path):
    trainer = Trainer(TrainConfig(tensorboard=True, out=str(tmp_path / "run"), device="cpu"))
    trainer.labels = {"class_names": ["a", "b"], "palette": torch.zeros(2, 3, dtype=torch.uint8)}
    trainer.run_config = {}
    trainer.is_main = False  # what another rank under torchrun is
    assert type(trainer.open_monitor(0)) is RunLogger  # logs nothing
    assert not (tmp_path / "run" / "tensorboard").exists()
