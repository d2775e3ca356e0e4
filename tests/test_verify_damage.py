"""verify-cache against stores damaged one way each: every check it makes (finite values, ids
in range, distinct ids, values in order, sample ids) is triggered by a store broken exactly that
way, flags that sample alone, and stays quiet on the undamaged copy. The damage is written with
zarr's public API, as a faulty disk, a buggy writer or a hand edit would leave it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from fake_data import make_teacher
from typer.testing import CliRunner

from kdcache.cli.app import app
from kdcache.store.check import verify_store
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

runner = CliRunner()
ROW = 5  # the damaged sample (shard 1 of 4-sample shards)
Y, X = 1, 2  # the damaged map cell


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    teacher = make_teacher(tmp / "t.pt")
    out = tmp / "c.zarr"
    build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), dataset_options={"resolution": [32, 48]},
                                         limit=8, topk=4, samples_per_shard=4, device="cpu", workers=0),
                        show_progress=False)
    assert verify_store(out, show_progress=False).ok
    return out


def _non_finite(g):
    v = g["logits/values"]
    cell = v[ROW, :, Y, X]
    cell[2] = np.nan
    v[ROW, :, Y, X] = cell


def _infinite_tail(g):
    g["logits/tail"][ROW, Y, X] = np.inf


def _id_out_of_range(g):
    i = g["logits/indices"]
    cell = i[ROW, :, Y, X]
    cell[3] = 11  # the demo has classes 0..10; 11 fits the uint8 id array
    i[ROW, :, Y, X] = cell


def _repeated_id(g):
    i = g["logits/indices"]
    cell = i[ROW, :, Y, X]
    cell[1] = cell[0]
    i[ROW, :, Y, X] = cell


def _out_of_order(g):
    v = g["logits/values"]
    cell = v[ROW, :, Y, X]
    assert cell[0] > cell[1]
    v[ROW, :, Y, X] = cell[[1, 0, 2, 3]]


def _duplicate_id(g):
    ids = g["sample_id"]
    ids[ROW] = ids[ROW - 1]


def _empty_id(g):
    ids = g["sample_id"]
    ids[ROW] = np.zeros_like(ids[ROW])


DAMAGE = {
    "non-finite value": (_non_finite, "logits/values: 1 non-finite values"),
    "non-finite tail": (_infinite_tail, "logits/tail: 1 non-finite values"),
    "id out of range": (_id_out_of_range, "logits/indices: class ids outside 0..10"),
    "repeated id": (_repeated_id, "logits/indices: repeated class ids at one position"),
    "values out of order": (_out_of_order, "logits/values: not sorted descending"),
    "duplicate sample id": (_duplicate_id, "duplicate sample id"),
    "empty sample id": (_empty_id, "empty sample id"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_check_is_triggered_by_its_damage(tmp_path, pristine, kind):
    damage, problem = DAMAGE[kind]
    out = tmp_path / "c.zarr"
    shutil.copytree(pristine, out)
    damage(zarr.open_group(str(out), mode="r+"))

    result = verify_store(out, show_progress=False)
    assert not result.ok
    bad_rows = [ROW - 1, ROW] if kind == "duplicate sample id" else [ROW]
    assert result.bad_rows == bad_rows, result.bad
    assert len(result.bad) == len(bad_rows)  # a duplicated id names each of its rows
    problems = [p for ps in result.bad.values() for p in ps]
    assert problems and all(p.startswith(problem) for p in problems), problems

    r = runner.invoke(app, ["verify-cache", str(out), "--quiet"])
    assert r.exit_code == 1, r.output
    assert problem in r.output and f"{len(bad_rows)} bad sample{'s' if len(bad_rows) > 1 else ''};" in r.output


def test_reset_bad_marks_only_the_damaged_shard_for_rebuilding(tmp_path, pristine):
    out = tmp_path / "c.zarr"
    shutil.copytree(pristine, out)
    _repeated_id(zarr.open_group(str(out), mode="r+"))
    result = verify_store(out, show_progress=False, reset_bad=True)
    assert result.bad_rows == [ROW]
    assert list(zarr.open_group(str(out))["done"][:]) == [True] * 4 + [False] * 4
