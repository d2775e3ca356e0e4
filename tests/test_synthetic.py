"""The built-in synthetic data set: determinism, splits, options, labels."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.core.errors import DatasetError
from kdcache.data import build_dataset
from kdcache.data import synthetic as syn
from kdcache.data.rendered import Rendered

REPO = Path(__file__).resolve().parents[1]
RES = (48, 64)  # small images keep the tests fast


def _digest(ds, i: int) -> str:
    image, mask = ds.load(i)
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


def test_deterministic_across_processes():
    ds = build_dataset("synthetic", "val", seed=3, resolution=RES)
    here = [_digest(ds, i) for i in (0, 7)]
    code = (
        "import hashlib\n"
        "from kdcache.data import build_dataset\n"
        f"ds = build_dataset('synthetic', 'val', seed=3, resolution={RES!r})\n"
        "for i in (7, 0):\n"
        "    im, m = ds.load(i)\n"
        "    print(hashlib.sha256(im.tobytes() + m.tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=REPO).stdout.split()
    assert out == [here[1], here[0]]


def test_independent_of_order_and_memo(monkeypatch):
    def forget():  # each object draws its samples itself, not reading the process's earlier drawings
        monkeypatch.setattr(syn, "RENDERED", Rendered(syn.RENDERED.budget))

    forget()
    ds = build_dataset("synthetic", "train", size=6, resolution=RES)
    forward = [_digest(ds, i) for i in range(6)]
    forget()
    fresh = build_dataset("synthetic", "train", size=6, resolution=RES)
    backward = [_digest(fresh, i) for i in reversed(range(6))][::-1]
    assert forward == backward
    # a smaller or larger split holds the same samples under the same ids
    forget()
    big = build_dataset("synthetic", "train", size=10, resolution=RES)
    assert [_digest(big, i) for i in range(6)] == forward
    assert big.content_hash(2) == ds.content_hash(2)


@pytest.fixture
def render_calls(monkeypatch) -> list:
    """The arguments of every render_scene call from here on, this process's renders forgotten."""
    calls = []
    real = syn.render_scene

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(syn, "render_scene", counting)
    monkeypatch.setattr(syn, "RENDERED", Rendered(syn.RENDERED.budget))
    return calls


def test_samples_render_once(render_calls, monkeypatch):
    calls = render_calls
    ds = build_dataset("synthetic", "test", size=3, resolution=RES)
    image, mask = ds.load(1)  # read_image + read_mask
    assert len(calls) == 1
    image[:] = 0  # callers get copies: the cached sample stays intact
    again, _ = ds.load(1)
    assert len(calls) == 1 and again.any()
    # with no memory budget (the object's nor the process's) only the latest sample is kept
    monkeypatch.setattr(syn.RENDERED, "budget", 0)
    ds = build_dataset("synthetic", "test", size=3, resolution=RES)
    ds.cache_bytes = 0
    ds.load(0)
    ds.load(0)
    assert len(calls) == 2
    ds.load(2)
    ds.load(0)
    assert len(calls) == 4


def test_a_sample_renders_once_per_process_whichever_object_reads_it(render_calls):
    """A second data set object of the same seed (as each step of `kdcache demo` opens) reads the
    first one's renders; another seed, split, index or resolution is another sample. What is kept
    is read-only."""
    first = build_dataset("synthetic", "train", size=3, resolution=RES)
    digests = [_digest(first, i) for i in range(3)]
    assert len(render_calls) == 3
    second = build_dataset("synthetic", "train", size=4, resolution=RES)
    assert [_digest(second, i) for i in range(3)] == digests and len(render_calls) == 3
    _digest(second, 3)
    for other in (build_dataset("synthetic", "train", size=1, resolution=RES, seed=1),
                  build_dataset("synthetic", "val", size=1, resolution=RES),
                  build_dataset("synthetic", "train", size=1, resolution=(RES[0], RES[1] + 8))):
        _digest(other, 0)
    assert len(render_calls) == 7 and len({args[:3] + (tuple(args[3]),) for args in render_calls}) == 7
    image, mask = next(iter(syn.RENDERED.samples.values()))
    assert not image.flags.writeable and not mask.flags.writeable
    with pytest.raises(ValueError):
        image[0, 0, 0] = 1


def test_the_least_recently_used_sample_goes_first_beyond_the_budget():
    drawn = []

    def draw(i):
        drawn.append(i)
        return np.full(10, i, np.uint8), np.zeros(6, np.uint8)  # 16 bytes a sample

    kept = Rendered(budget=2 * 16)
    for i in (1, 2, 0):
        kept.get(("s", i), lambda i=i: draw(i))
    kept.get(("s", 3), lambda: draw(3))
    assert list(kept.samples) == [("s", 0), ("s", 3)] and kept.bytes == 2 * 16  # 0, read last, stayed
    assert kept.get(("s", 0), lambda: draw(0))[0][0] == 0 and drawn == [1, 2, 0, 3]  # kept: not drawn again
    kept.get(("s", 1), lambda: draw(1))
    assert drawn == [1, 2, 0, 3, 1] and list(kept.samples) == [("s", 0), ("s", 1)]
    big = Rendered(budget=8)  # a sample larger than the whole budget is drawn, returned, not kept
    assert big.get(("s", 5), lambda: draw(5))[0][0] == 5 and not big.samples and big.bytes == 0
    single = Rendered(budget=100)  # one array is a sample too
    assert single.get(("one",), lambda: np.arange(4, dtype=np.int64)).sum() == 6 and single.bytes == 32


def test_seeds_and_splits_differ():
    a = build_dataset("synthetic", "train", size=2, resolution=RES, seed=0)
    b = build_dataset("synthetic", "train", size=2, resolution=RES, seed=1)
    v = build_dataset("synthetic", "val", size=2, resolution=RES, seed=0)
    assert _digest(a, 0) != _digest(b, 0)
    assert _digest(a, 0) != _digest(v, 0)
    assert _digest(a, 0) != _digest(a, 1)


def test_split_sizes_and_ids():
    for split, n in syn.DEFAULT_SIZES.items():
        ds = build_dataset("synthetic", split)
        assert len(ds) == n
        assert ds.ids[0] == f"{split}_000000" and ds.ids[-1] == f"{split}_{n - 1:06d}"
    ds = build_dataset("synthetic", "train", size=12)
    assert len(ds) == 12 and ds.ids[11] == "train_000011"
    assert ds.num_classes == 11 and ds.class_names[0] == "sky" and ds.class_names[-1] == "bicyclist"
    assert ds.palette.shape == (11, 3) and ds.palette.dtype == np.uint8


def test_unknown_split_and_bad_options():
    with pytest.raises(DatasetError, match="train, val, test"):
        build_dataset("synthetic", "validation")
    with pytest.raises(DatasetError):
        build_dataset("synthetic", "train", size=-1)
    with pytest.raises(DatasetError):
        build_dataset("synthetic", "train", resolution=(8, 8))


@pytest.mark.parametrize("resolution", [(48, 64), (40, 90)])
def test_resolution_honoured(resolution):
    ds = build_dataset("synthetic", "val", size=2, resolution=resolution)
    image, mask = ds.load(0)
    assert image.shape == (*resolution, 3) and image.dtype == np.uint8
    assert mask.shape == resolution and mask.dtype == np.uint8


def test_labels_cover_all_classes_and_void_is_sparse():
    ds = build_dataset("synthetic", "train", size=40, resolution=(72, 96))
    counts = np.zeros(256, np.int64)
    for i in range(len(ds)):
        _, mask = ds.load(i)
        counts += np.bincount(mask.ravel(), minlength=256)
    present = set(np.nonzero(counts)[0].tolist())
    assert present <= set(range(11)) | {255}
    assert set(range(11)) <= present
    assert 0 < counts[255] / counts.sum() < 0.03


class _Loads(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return torch.from_numpy(self.ds.load(i)[1])


def _render_only_in(pid: int, real):
    def render(*args):
        if os.getpid() != pid:
            raise RuntimeError("rendered in a DataLoader worker")
        return real(*args)
    return render


@pytest.mark.slow  # DataLoader worker processes (the failing one's shutdown waits 5 s)
def test_prepared_samples_reach_the_workers_without_rendering(monkeypatch):
    """prepare_for_workers renders every sample in this process; a worker forked afterwards reads
    them all without rendering one (a worker that rendered would raise). Over the memory budget
    it renders nothing (each epoch's workers render again, as before)."""
    monkeypatch.setattr(syn, "render_scene", _render_only_in(os.getpid(), syn.render_scene))
    monkeypatch.setattr(syn, "RENDERED", Rendered(0))  # none kept for the process: only the object's own
    ds = build_dataset("synthetic", "test", size=5, resolution=RES)
    ds.prepare_for_workers()
    loader = torch.utils.data.DataLoader(_Loads(ds), batch_size=5, num_workers=1,
                                         multiprocessing_context="fork")
    (masks,) = list(loader)
    assert torch.equal(masks, torch.from_numpy(np.stack([ds.load(i)[1] for i in range(5)])))
    small = build_dataset("synthetic", "test", size=5, resolution=RES)
    small.cache_bytes = 3 * RES[0] * RES[1] * 4
    small.prepare_for_workers()
    assert small._cache == {}
    with pytest.raises(RuntimeError, match="rendered in a DataLoader worker"):
        list(torch.utils.data.DataLoader(_Loads(small), batch_size=5, num_workers=1, multiprocessing_context="fork"))


@pytest.mark.slow  # DataLoader worker processes
def test_training_with_workers_renders_in_the_main_process_only(monkeypatch, tmp_path):
    from kdcache.train.trainer import TrainConfig, train

    monkeypatch.setattr(syn, "render_scene", _render_only_in(os.getpid(), syn.render_scene))
    r = train(TrainConfig(model="demo_student", dataset="synthetic", dataset_options={"resolution": list(RES)},
                          limit=8, epochs=2, batch_size=4, device="cpu", workers=1, out=str(tmp_path / "run")),
              show_progress=False)
    assert r["best_miou"] >= 0


def test_unlabeled_split_is_its_own_stream_without_masks():
    """The unlabeled pool: 1600 images by default, none equal to a labelled one (its own seed
    stream), masks of 255, and refused where labels are needed."""
    pool = build_dataset("synthetic", "unlabeled", size=20, resolution=RES)
    assert len(build_dataset("synthetic", "unlabeled")) == 1600 and not pool.labelled
    train = build_dataset("synthetic", "train", size=20, resolution=RES)
    labelled = {train.load(i)[0].tobytes() for i in range(20)}
    for i in range(20):
        image, mask = pool.load(i)
        assert image.tobytes() not in labelled and (mask == 255).all() and image.std() > 10
    with pytest.raises(DatasetError, match="unlabelled images"):
        pool.require_labels("evaluation")


def test_unlabeled_masks_reveal_the_pool_s_true_labels_for_a_ceiling():
    hidden = build_dataset("synthetic", "unlabeled", size=3, resolution=RES)
    shown = build_dataset("synthetic", "unlabeled", size=3, resolution=RES, unlabeled_masks=True)
    assert shown.labelled and not hidden.labelled
    image, mask = shown.load(1)
    assert np.array_equal(image, hidden.load(1)[0])
    assert np.array_equal(mask, syn.render_scene(0, "unlabeled", 1, RES)[1]) and (mask != 255).mean() > 0.5
