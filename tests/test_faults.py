"""Faults a user meets: damaged chunks during training, a stale cache, a killed training run,
odd image files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from cli_runner import kd, kd_on_one_thread
from fake_data import make_teacher
from PIL import Image

from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

RES = {"resolution": [32, 48]}


def _cache(tmp_path, teacher, name="c.zarr", n=16, **kw):
    out = tmp_path / name
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options=dict(RES), limit=n,
                                         topk=4, samples_per_shard=8, device="cpu", workers=0, **kw),
                        show_progress=False)
    return out


STUDENT = ["--epochs", 1, "--limit", 16, "--batch-size", 4, "--device", "cpu", "--workers", 0, "--quiet"]


@pytest.mark.slow  # builds a cache of larger images, trains
def test_damaged_chunk_stops_training_naming_the_sample_or_is_skipped(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = tmp_path / "c.zarr"  # images large enough for the logits to keep a sample per chunk
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(cache), dataset_options={"resolution": [96, 128]},
                                         limit=16, topk=4, samples_per_shard=8, device="cpu", workers=0),
                        show_progress=False)
    packing = zarr.open_group(str(cache), mode="r").attrs["kdcache"]["packing"]
    assert "logits/values" not in packing  # 4x24x32 fp16: 6 KB a sample
    shard = cache / "logits" / "values" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40:60] = b"\xff" * 20  # corrupt the first chunk of shard 1 (sample train_000008)
    shard.write_bytes(bytes(data))
    r = kd("verify-cache", cache, "--quiet")
    assert r.exit_code == 1 and "train_000008" in r.output
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "a", *STUDENT)
    assert r.exit_code == 2 and "train_000008" in r.output and "--skip-bad" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "b", "--skip-bad", *STUDENT)
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["train_kd_skipped"] == pytest.approx(1 / 16)  # one sample of 16, every step averaged
    assert "had unreadable targets" in r.output


def test_a_damaged_packed_chunk_loses_exactly_the_samples_it_packs(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = _cache(tmp_path, teacher, n=24)
    packing = zarr.open_group(str(cache), mode="r").attrs["kdcache"]["packing"]
    assert packing["logits/values"] == 8  # a 4x8x12 fp16 map is 768 bytes: a shard's 8 samples share a chunk
    shard = cache / "logits" / "values" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the chunk of samples 8..15
    shard.write_bytes(bytes(data))
    r = kd("verify-cache", cache, "--quiet")
    assert r.exit_code == 1 and "8 bad samples" in r.output, r.output
    named = {f"train_{i:06d}" for i in range(24) if f"train_{i:06d}" in r.output}
    assert named <= {f"train_{i:06d}" for i in range(8, 16)} and named
    student = ["--epochs", 1, "--limit", 24, "--batch-size", 4, "--device", "cpu", "--workers", 0, "--quiet"]
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "b", "--skip-bad", *student)
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["train_kd_skipped"] == pytest.approx(8 / 24)  # the chunk's samples, no more
    r = kd("verify-cache", cache, "--reset-bad", "--quiet")  # then a rebuild rewrites that shard alone
    assert kd("build-teacher-cache", "--weights", teacher, "--out", cache, "--dataset", "synthetic", "--resolution",
              "32x48", "--limit", 24, "--topk", 4, "--samples-per-shard", 8, "--device", "cpu", "--workers", 0,
              "--quiet").exit_code == 0
    assert kd("verify-cache", cache, "--quiet").exit_code == 0


@pytest.mark.slow  # builds a cache, trains
def test_a_lost_shard_file_or_a_chunk_that_reads_nan_is_never_trained_on(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = _cache(tmp_path, teacher)
    (cache / "logits" / "indices" / "c" / "1" / "0" / "0" / "0").unlink()  # samples 8..15 lose their class ids
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "a", *STUDENT)
    assert r.exit_code == 2 and "train_000008" in r.output and "is missing" in r.output, r.output
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "b", "--skip-bad", *STUDENT)
    assert r.exit_code == 0, r.output
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["train_kd_skipped"] == pytest.approx(8 / 16)
    # a float chunk that reads as NaN (the fill value of a lost chunk) is caught as well
    nan = _cache(tmp_path, teacher, "nan.zarr")
    tail = zarr.open_group(str(nan), mode="r+")["logits/tail"]
    row = tail[11]
    row[0, 0] = np.nan
    tail[11] = row
    r = kd("train-student", "--cache", nan, "--out", tmp_path / "c", *STUDENT)
    assert r.exit_code == 2 and "samples train_000011 read as NaN" in r.output, r.output


def test_stale_cache_is_refused_with_what_changed(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = _cache(tmp_path, teacher)
    make_teacher(tmp_path / "t.pt", seed=5)  # the teacher is retrained into the same file
    r = kd("train-student", "--cache", cache, "--out", tmp_path / "a", *STUDENT)
    assert r.exit_code == 2 and "is stale" in r.output and "build-teacher-cache --overwrite" in r.output
    r = kd("build-teacher-cache", "--weights", tmp_path / "t.pt", "--out", cache, "--dataset", "synthetic",
           "--resolution", "32x48", "--limit", 16, "--samples-per-shard", 8, "--device", "cpu", "--quiet")
    assert r.exit_code == 2 and "teacher.weights_sha256" in r.output


@pytest.mark.slow  # kill -9
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt")
    cache = _cache(tmp_path, teacher, n=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train-student", "--cache", str(cache), "--epochs", "4", "--limit", "24", "--batch-size", "4",
            "--device", "cpu", "--workers", "0", "--quiet", "--method", "kl"]
    r = kd_on_one_thread(*args, "--out", tmp_path / "a")  # the uninterrupted run, on one thread as the others
    assert r.exit_code == 0, r.output
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--out", str(tmp_path / "b")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and (tmp_path / "b" / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    done = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
    assert max(done) < 3, "the run finished before it could be killed"
    killed = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    r = subprocess.run([sys.executable, "-m", "kdcache", "train-student", "--out", str(tmp_path / "b"), "--resume",
                        "--quiet"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["val_miou"] == pytest.approx(y["val_miou"], rel=1e-6)
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    for k in sa:  # another process may pick other CPU kernels: equal up to float rounding
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    # and the resumed epochs trained: the weights moved on from the killed run's checkpoint
    assert max((sb[k] - killed[k]).abs().max().item() for k in sb if sb[k].is_floating_point()) > 1e-3


def _two_class_folder(tmp_path):
    """An empty two-class ``folder`` data set root: classes.txt, images/ and masks/."""
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    return root


def test_odd_image_files(tmp_path):
    from kdcache.core.errors import DatasetError
    from kdcache.data import build_dataset

    root = _two_class_folder(tmp_path)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, (8, 10), dtype=np.uint8)
    Image.fromarray(rng.integers(0, 255, (8, 10), dtype=np.uint8), mode="L").save(root / "images" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (8, 10, 4), dtype=np.uint8), mode="RGBA").save(root / "images" / "rgba.png")
    (root / "images" / "empty.png").write_bytes(b"")
    for stem in ("gray", "rgba", "empty"):
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")
    ds = build_dataset("folder", "all", root)
    by_id = {sid: j for j, sid in enumerate(ds.ids)}
    for stem in ("gray", "rgba"):  # documented conversion: to RGB
        image, m = ds.load(by_id[stem])
        assert image.shape == (8, 10, 3) and image.dtype == np.uint8 and m.shape == (8, 10)
    with pytest.raises(DatasetError, match="empty.png"):
        ds.load(by_id["empty"])
    Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(root / "masks" / "gray.png")
    with pytest.raises(DatasetError, match="colour image"):
        ds.load(by_id["gray"])


def test_16_bit_images_read_at_their_high_byte_and_32_bit_ones_are_refused(tmp_path):
    """A 16-bit grayscale PNG reads as v >> 8 in each channel (Pillow's own conversion would clip
    every value above 255 to white); 32-bit integer and float images stop with one line."""
    from kdcache.core.errors import DatasetError
    from kdcache.data import build_dataset

    root = _two_class_folder(tmp_path)
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (8, 10), dtype=np.uint16)
    deep[0, :3] = (0, 255, 65535)
    Image.fromarray(deep).save(root / "images" / "deep.png")
    Image.fromarray(rng.integers(0, 1 << 20, (8, 10), dtype=np.int32)).save(root / "images" / "wide.tif")
    # a 32-bit image whose values fit 16 bits: how older Pillow opens a 16-bit PNG
    Image.fromarray(deep.astype(np.int32)).save(root / "images" / "old.tif")
    Image.fromarray(rng.random((8, 10), dtype=np.float32)).save(root / "images" / "real.tif")
    for stem in ("deep", "wide", "real", "old"):
        Image.fromarray(rng.integers(0, 2, (8, 10), dtype=np.uint8), mode="L").save(root / "masks" / f"{stem}.png")
    assert Image.open(root / "images" / "deep.png").mode == "I;16"
    ds = build_dataset("folder", "all", root)
    by_id = {sid: j for j, sid in enumerate(ds.ids)}
    image, _ = ds.load(by_id["deep"])
    want = (deep >> 8).astype(np.uint8)
    assert image.dtype == np.uint8 and image.shape == (8, 10, 3)
    np.testing.assert_array_equal(image, np.stack([want] * 3, axis=-1))
    assert image[0, :3, 0].tolist() == [0, 0, 255]
    assert Image.open(root / "images" / "old.tif").mode == "I"
    np.testing.assert_array_equal(ds.load(by_id["old"])[0], image)
    for stem, words in (("wide", "holds 32-bit integer pixels"), ("real", "holds floating-point pixels")):
        with pytest.raises(DatasetError, match=f"{words}; kdcache reads 8- and 16-bit images: convert it to 8 bits") as e:
            ds.load(by_id[stem])
        assert "\n" not in str(e.value)


def test_a_phone_photo_turned_by_exif_names_the_reason_in_the_size_error(tmp_path):
    """An image whose EXIF orientation (6) turns it a quarter, with a mask of the turned size: the
    one-line size error says why and how to fix it; without the tag, the plain size error."""
    from kdcache.core.errors import DatasetError
    from kdcache.data import build_dataset

    root = _two_class_folder(tmp_path)
    rng = np.random.default_rng(0)
    for stem, orientation in (("phone", 6), ("plain", None)):
        img = Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8))  # stored 12 wide, 8 high
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        img.save(root / "images" / f"{stem}.jpg", exif=exif)
        Image.fromarray(rng.integers(0, 2, (12, 8), dtype=np.uint8), mode="L").save(root / "masks" / f"{stem}.png")
    ds = build_dataset("folder", "all", root)
    by_id = {sid: j for j, sid in enumerate(ds.ids)}
    with pytest.raises(DatasetError, match="EXIF orientation 6 shows it turned a quarter, the mask's way; kdcache "
                                           "reads pixels as stored: save the images turned") as e:
        ds.load(by_id["phone"])
    assert "is 12x8 (WxH) but its mask" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="image and mask must have the same size$"):
        ds.load(by_id["plain"])
