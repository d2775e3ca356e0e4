"""compare and demo, as a user runs them."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

runner = CliRunner()


def kd(*args):
    from kdcache.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def test_demo_then_compare_outputs_and_rerun_reuses_steps(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--teacher-epochs", 1, "--student-epochs", 1, "--limit", 8, "--device", "cpu", "--quiet"]
    r = kd(*args)
    assert r.exit_code == 0, r.output
    for name in ("teacher", "student-none", "student-kl", "student-at", "student-sp"):
        assert (out / name / "best.pt").exists() and (out / name / "curves.png").exists()
    cmp = out / "compare"
    md = (cmp / "compare.md").read_text()
    assert "| student-kl | kl |" in md and "| student-none | CE (baseline) |" in md and "±0.00" in md
    rows = list(csv.DictReader(open(cmp / "compare.csv")))
    assert [r["method"] for r in rows] == ["CE", "CE (baseline)", "kl", "at", "sp"]
    assert len([k for k in rows[0] if k.startswith("iou_")]) == 11
    data = json.loads((cmp / "compare.json").read_text())
    base = next(r for r in data["rows"] if r["baseline"])
    kl = next(r for r in data["rows"] if r["method"] == "kl")
    assert abs(kl["delta_miou"] - (kl["miou"] - base["miou"])) < 1e-12
    assert data["rows"][0]["params"] > 10 * kl["params"]  # teacher vs student
    assert (cmp / "per_class_iou.png").stat().st_size > 0
    assert sorted(p.name[:4] for p in (cmp / "examples").glob("*.png")) == ["best"] * 3 + ["wors"] * 3
    # a rerun does not train again
    before = (out / "student-kl" / "last.pt").stat().st_mtime_ns
    r = kd(*args)
    assert r.exit_code == 0 and r.output.count("done already") == 6
    assert (out / "student-kl" / "last.pt").stat().st_mtime_ns == before

    # compare by hand, with an explicit baseline and without latency
    r = kd("compare", out / "student-kl", out / "student-at", "--baseline", out / "student-at", "--out",
           tmp_path / "cmp", "--no-latency", "--examples", 1, "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["rows"][1]["baseline"] and data["rows"][0]["ms_per_image"] is None
    assert len(list((tmp_path / "cmp" / "examples").glob("*.png"))) == 2


def test_compare_errors(tmp_path):
    r = kd("compare", tmp_path / "nope")
    assert r.exit_code == 2 and "not a run folder" in r.output
    TINY = ["--model", "tiny_models:TinyNet", "--dataset", "synthetic", "--resolution", "32x48", "--batch-size", "4",
            "--workers", "0", "--epochs", "1", "--quiet"]
    assert kd("train-teacher", *TINY, "--limit", 8, "--out", tmp_path / "a").exit_code == 0
    assert kd("train-teacher", *TINY, "--limit", 12, "--out", tmp_path / "b").exit_code == 0
    r = kd("compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "compare runs on the same validation data" in r.output
    r = kd("compare", tmp_path / "a", "--baseline", tmp_path / "b", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "is not one of the compared runs" in r.output
