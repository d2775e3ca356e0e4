"""Training learns: on an easy case a short run lowers the loss and lifts mIoU far above chance,
for the supervised trainer and for the student trainer's KD terms. (The resume, kill -9 and DDP
tests compare runs with each other; these show that the runs they compare actually train.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fake_data import make_teacher
from PIL import Image

from kdcache.core.metrics import ConfusionMatrix
from kdcache.data import build_dataset
from kdcache.pipeline.transforms import Preprocess
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache
from kdcache.train.student import config_from_store, train_student
from kdcache.train.trainer import TrainConfig, train

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)  # class c is colour c


def colour_blocks(root, n=8, size=16, seed=0):
    """A folder data set where each pixel's class is its colour (with noise): easy to learn,
    impossible to guess. Every image is a grid of 4x4 blocks of random classes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    for i in range(n):
        blocks = rng.integers(0, 3, (size // 4, size // 4))
        mask = np.kron(blocks, np.ones((4, 4), np.int64)).astype(np.uint8)
        image = np.clip(COLOURS[mask].astype(int) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def majority_miou(ds) -> float:
    """mIoU of always predicting the most frequent class: what no learning gives."""
    pre = Preprocess()
    masks = [pre.mask_to_tensor(ds.load(i)[1]) for i in range(len(ds))]
    counts = np.bincount(np.concatenate([m.numpy().ravel() for m in masks]), minlength=ds.num_classes)
    cm = ConfusionMatrix(ds.num_classes)
    for m in masks:
        cm.update(m.new_full(m.shape, int(counts.argmax())), m)
    return cm.compute()["miou"]


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_supervised_training_learns(tmp_path):
    root = colour_blocks(tmp_path / "blocks")
    chance = majority_miou(build_dataset("folder", "all", root))
    r = train(TrainConfig(model="tiny_models:TinyNet", dataset="folder", data_root=str(root), train_split="all",
                          val_split="all", epochs=10, batch_size=4, lr=2e-2, scale=(1.0, 1.0), hflip=False,
                          device="cpu", workers=0, out=str(tmp_path / "run")), show_progress=False)
    rec = records(tmp_path / "run")
    assert rec[-1]["train_loss"] < 0.5 * rec[0]["train_loss"], [x["train_loss"] for x in rec]
    assert r["best_miou"] > 0.8 and r["best_miou"] > 2.5 * chance, (r["best_miou"], chance)
    assert [x["train_samples_seen"] for x in rec] == [8] * 10  # counted ids, every sample once an epoch


@pytest.mark.parametrize("method", [{"name": "kl", "weight": 5.0}, {"name": "fitnet", "student_tap": "stage3", "teacher_tap": "body"}])
def test_student_training_lowers_its_kd_term(tmp_path, method):
    teacher = make_teacher(tmp_path / "t.pt", name="tiny_models:TinyNet")
    ckpt = torch.load(teacher, weights_only=True)  # a confident teacher, far from the student's start
    ckpt["state_dict"]["head.weight"] *= 20
    torch.save(ckpt, teacher)
    cache = tmp_path / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), dataset_options={"resolution": [32, 48]},
                                         limit=8, topk=4, features=("body",), device="cpu", workers=0),
                        show_progress=False)
    cfg = config_from_store(str(cache), methods=[method], epochs=6, limit=8, batch_size=4, lr=1e-2, scale=(1.0, 1.0),
                            hflip=False, device="cpu", workers=0, out=str(tmp_path / "s"), eval_every=6)
    train_student(cfg, show_progress=False)
    term = [x[f"train_{method['name']}"] for x in records(tmp_path / "s")]
    assert term[-1] < 0.7 * term[0], term


def test_loss_terms_are_read_in_blocks_and_a_nan_names_its_step():
    """The trainer reads the loss terms back every few steps on a GPU (one host sync a block): the
    sums are those of every step, and a non-finite loss inside a block names its own step."""
    import math

    from kdcache.core.errors import KDCacheError
    from kdcache.train.trainer import LossTerms

    terms = LossTerms(epoch=2, every=3)
    reads = []
    real_read = terms.read

    def counting_read():
        reads.append(len(terms.pending))
        real_read()

    terms.read = counting_read
    for step in range(7):
        terms.add(step, ["loss", "kd"], torch.tensor([float(step), 2.0 * step]))
    terms.read()
    assert reads == [3, 3, 1]
    assert terms.read_steps == 7
    assert terms.sums == {"loss": 21.0, "kd": 42.0}
    assert math.isclose(terms.mean_loss(), 3.0)

    bad = LossTerms(epoch=0, every=4)
    bad.add(0, ["loss"], torch.tensor([1.0]))
    bad.add(1, ["loss"], torch.tensor([1.0]))
    bad.add(2, ["loss"], torch.tensor([float("nan")]))
    with pytest.raises(KDCacheError, match="loss became nan at epoch 1, step 3"):
        bad.add(3, ["loss"], torch.tensor([1.0]))


def test_weights_an_epoch_made_non_finite_are_refused_before_any_checkpoint(tmp_path, monkeypatch):
    """The loss is checked before each step, so the last step's update is checked by no loss: an
    optimizer step that leaves NaN in the weights (here, injected after AdamW's real step) ends the run
    in one line, and no best.pt or last.pt holds them."""
    from cli_runner import kd

    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    run = tmp_path / "run"
    r = kd("train-teacher", "--model", "demo_teacher", "--resolution", "32x48", "--limit", "4", "--batch-size", "4",
           "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet", "--out", run)
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: the weights became inf or NaN in epoch 1 (1 tensors, e.g. ")
    assert lines[0].endswith("; lower --lr or --weight-decay"), lines[0]
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
