"""The benchmark scripts that other tooling runs unattended (benchmarks/gpu_check.sh runs
kd_step_time.py on a GPU machine) still run, on a tiny cache, and write their tables."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from fake_data import make_small_store

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def teacher_and_store(tmp_path_factory):
    return make_small_store(tmp_path_factory)


def run_script(name: str, *args, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(BENCH / name), run_name="__main__")


def test_kd_step_time_runs_every_variant_on_the_same_batches(teacher_and_store, tmp_path, monkeypatch):
    """The batches come from the pipeline that reads the cached logits: the CE-only trainer's
    (`--method none`) reads no cache, and batches from it once broke the KL variants."""
    teacher, store = teacher_and_store
    run_script("kd_step_time.py", "--cache", store, "--teacher", teacher, "--limit", 16, "--batch-size", 2,
               "--steps", 2, "--rounds", 1, "--device", "cpu", "--results", tmp_path, monkeypatch=monkeypatch)
    table = (tmp_path / "kd-step-time-cpu.md").read_text()
    for row in ("| CE only |", "| KL, cache |", "| KL, online teacher |"):
        assert row in table
    assert "cached-KD step / CE-only step = **" in table
