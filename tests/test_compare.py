"""compare and demo, as a user runs them."""

from __future__ import annotations

import csv
import json

import pytest
from cli_runner import kd
from PIL import Image, ImageOps
from rich.console import Console

from kdcache.cli.report import compare_per_class_table, compare_table
from kdcache.store import CacheStore


def test_a_demo_rerun_skips_only_the_steps_an_earlier_run_finished(tmp_path):
    """demo/steps.py's checks, with no training (the demo itself runs in the slow tier): a run is
    started once it has a last.pt and finished once its last epoch is logged too; an earlier
    comparison is reused for the same runs only, and only while no checkpoint is newer than it."""
    import os

    from kdcache.core.runs import RunDir
    from kdcache.demo.steps import _compared, run_finished, run_started

    run = RunDir(tmp_path / "run")
    run.create({"model": "demo_student"})
    assert not run_started(run.path) and not run_finished(run.path, 2)
    run.last.write_bytes(b"")
    run.log({"epoch": 0})
    assert run_started(run.path) and not run_finished(run.path, 2)
    run.log({"epoch": 1})
    assert run_finished(run.path, 2)
    out = tmp_path / "compare"
    out.mkdir()
    assert _compared(out, [run.path]) is None  # nothing compared yet
    run.best.write_bytes(b"")
    table = {"rows": [{"run": str(run.path)}]}
    (out / "compare.json").write_text(json.dumps(table))
    written = (out / "compare.json").stat().st_mtime_ns
    os.utime(run.best, ns=(written - 10**9, written - 10**9))
    assert _compared(out, [run.path]) == {**table, "out_dir": str(out)}
    assert _compared(out, [run.path, tmp_path / "other"]) is None  # other runs
    os.utime(run.best, ns=(written + 10**9, written + 10**9))
    assert _compared(out, [run.path]) is None  # a checkpoint newer than the comparison


def test_the_demo_ends_with_its_recommended_student_described_from_its_recipe():
    """The last line names the recommended student, its recipe in words (from STUDENTS, not typed
    twice) and its Δ over the baseline; a comparison without that row or a baseline has no line."""
    from kdcache.demo.segmentation import RECOMMENDED, STUDENTS, DemoStudent, recommendation

    rows = [{"run": "runs/demo/student-none", "delta_miou": None},
            {"run": f"runs/demo/student-{RECOMMENDED}", "delta_miou": 0.0389}]
    line = recommendation({"rows": rows, "split": "test"})
    assert line == (f"recommended: {RECOMMENDED} ({STUDENTS[RECOMMENDED].describe()}), +3.89 mIoU over the CE "
                    "baseline on the test split")
    assert STUDENTS[RECOMMENDED].describe().startswith("DIST at weight 1 from a schedule cache")
    assert recommendation({"rows": rows[:1], "split": "test"}) is None
    assert recommendation({"rows": [{**rows[1], "delta_miou": None}], "split": "test"}) is None
    assert STUDENTS["none"].describe() == "CE on the labels alone"
    assert DemoStudent([{"name": "kl", "weight": 0.5}], "pool").describe() == (
        "KL at weight 0.5 from the default cache and the unlabelled pool")
    assert DemoStudent([{"name": "dist"}], "schedule", True).describe().endswith("with cutmix (a schedule holds the "
                                                                                  "teacher on the mixed crops)")


@pytest.mark.slow  # the whole demo (the session's, shared with the browser's test), and a rerun
def test_demo_then_compare_outputs_and_rerun_reuses_steps(tmp_path, segmentation_demo):
    from conftest import DEMO_ARGS

    out, printed = segmentation_demo
    args = ["demo", "--out", out, *DEMO_ARGS, "--device", "cpu", "--quiet"]
    names = ("none", "dist-schedule", "dist", "dist-pool", "kl", "pseudo-pool")
    for name in ("teacher", *(f"student-{s}" for s in names)):
        assert (out / name / "best.pt").exists() and (out / name / "curves.png").exists()
    cmp = out / "compare"
    md = (cmp / "compare.md").read_text()
    assert "| student-kl | kl |" in md and "| student-none | CE (baseline) |" in md and "±0.00" in md
    rows = list(csv.DictReader(open(cmp / "compare.csv")))
    assert [r["method"] for r in rows] == ["CE", "CE (baseline)", "dist (every epoch's crops)", "dist",
                                           "dist + unlabelled", "kl", "pseudo + unlabelled"]
    # the recommended recipe: DIST at weight 1 from the schedule of this seed's crops, and the line naming it
    cfg = json.loads((out / "student-dist-schedule" / "config.json").read_text())
    assert cfg["cache_targets"] == "schedule" and cfg["methods"][0]["weight"] == 1.0
    assert cfg["cache"] == str(out / "schedule-1-epochs-seed0.zarr") and "recommended: dist-schedule" in printed
    assert len([k for k in rows[0] if k.startswith("iou_")]) == 11
    data = json.loads((cmp / "compare.json").read_text())
    assert data["split"] == "test" and md.startswith("Reported on synthetic 'test' (8 images), each run's best "
                                                     "checkpoint on its validation split")
    # one latency per architecture: the six demo_student runs share the measurement, the teacher has its own
    students = [r for r in data["rows"] if r["model"] == "demo_student"]
    assert len(students) == 6 and len({(r["ms_per_image"], r["latency_group"]) for r in students}) == 1
    assert data["rows"][0]["latency_group"] == 0 and students[0]["latency_group"] == 1
    assert "interleaved in 5 rounds" in md
    base = next(r for r in data["rows"] if r["baseline"])
    kl = next(r for r in data["rows"] if r["method"] == "kl")
    assert abs(kl["delta_miou"] - (kl["miou"] - base["miou"])) < 1e-12
    assert data["rows"][0]["params"] > 10 * kl["params"]  # teacher vs student
    # the pool: 4x the labelled images, unlabelled; its students trained half the epochs (the same steps)
    assert len(CacheStore(out / "pool.zarr").ids) == 32 and CacheStore(out / "pool.zarr").schema.dataset["split"] == "unlabeled"
    pool_rec = [json.loads(x) for x in (out / "student-dist-pool" / "metrics.jsonl").read_text().splitlines() if '"train_unlabeled_seen"' in x]
    assert pool_rec and pool_rec[-1]["train_samples_seen"] == 8 and pool_rec[-1]["train_unlabeled_seen"] == 8
    assert (cmp / "per_class_iou.png").stat().st_size > 0
    # the per-class view: the teacher found among the runs by its weights (the students' cache records
    # them), the baseline, each student's Δ and the flag, in the JSON, the CSV, the Markdown and 80 columns
    teacher = data["rows"][0]
    assert teacher["teacher"] and data["teacher"].endswith("teacher") and sum(r["teacher"] for r in data["rows"]) == 1
    assert len(data["per_class"]) == 11
    for c, v in enumerate(data["per_class"]):
        assert v["teacher"] == teacher["iou"][c] and v["baseline"] == base["iou"][c]
        assert set(v["delta"]) == {f"student-{s}" for s in names[1:]}
        if v["baseline"] is not None and kl["iou"][c] is not None:
            assert abs(v["delta"]["student-kl"] - (kl["iou"][c] - base["iou"][c])) < 1e-12
            assert v["teacher_below_baseline"] == (teacher["iou"][c] < base["iou"][c])
    per_class = list(csv.DictReader(open(cmp / "compare_per_class.csv")))
    assert len(per_class) == 11 and list(per_class[0])[:3] == ["class", "teacher", "baseline"]
    assert "| class | teacher | baseline | Δ student-dist-schedule |" in md
    narrow = Console(width=80, record=True)
    narrow.print(compare_per_class_table(data))
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "teacher" in text and "Δ against student-none" in text
    assert sorted(p.name[:4] for p in (cmp / "examples").glob("*.png")) == ["best"] * 3 + ["wors"] * 3
    # a rerun does not train again
    before = (out / "student-kl" / "last.pt").stat().st_mtime_ns
    table = (cmp / "compare.json").stat().st_mtime_ns
    r = kd(*args)
    assert r.exit_code == 0 and r.output.count("done already") == 10  # teacher, 2 caches, 6 students, compare
    assert (out / "student-kl" / "last.pt").stat().st_mtime_ns == before
    assert (cmp / "compare.json").stat().st_mtime_ns == table and "student-pseudo-pool" in r.output

    # compare by hand, with an explicit baseline and without latency
    r = kd("compare", out / "student-kl", out / "student-dist", "--baseline", out / "student-dist", "--out",
           tmp_path / "cmp", "--no-latency", "--examples", 1, "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["rows"][1]["baseline"] and data["rows"][0]["ms_per_image"] is None
    assert data["split"] == "val" and "Validation: synthetic 'val'" in (tmp_path / "cmp" / "compare.md").read_text()
    # the table a user reads names every run whole, even in an 80-column terminal
    console = Console(width=80, record=True)
    renamed = {**data, "rows": [{**r, "name": n, "method": m} for r, n, m in zip(
        data["rows"], ("student-kl-temperature-4", "student-pseudo-pool"), ("kl", "pseudo + unlabelled"))]}
    console.print(compare_table(renamed, width=80))
    console.print(compare_per_class_table(renamed))
    text = console.export_text()
    assert "student-kl-temperature-4" in text and "student-pseudo-pool" in text and "unlabelled" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = Console(width=200, record=True)
    wide.print(compare_table(renamed, width=200))
    text = wide.export_text()
    assert "FPS" in text and "aAcc" in text and "too narrow" not in text
    assert len(list((tmp_path / "cmp" / "examples").glob("*.png"))) == 2


def test_compare_errors(tmp_path):
    r = kd("compare", tmp_path / "nope")
    assert r.exit_code == 2 and "not a run folder" in r.output
    TINY = ["--model", "tiny_models:TinyNet", "--dataset", "synthetic", "--resolution", "32x48", "--batch-size", "4",
            "--workers", "0", "--epochs", "1", "--quiet"]
    assert kd("train-teacher", *TINY, "--limit", 8, "--out", tmp_path / "a").exit_code == 0
    assert kd("train-teacher", *TINY, "--limit", 12, "--out", tmp_path / "b").exit_code == 0
    r = kd("compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "compare runs on the same images" in r.output
    r = kd("compare", tmp_path / "a", "--baseline", tmp_path / "b", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "is not one of the compared runs" in r.output
    # the same run twice: refused, not a table with a row repeated
    r = kd("compare", tmp_path / "a", tmp_path / "b", tmp_path / "b" / ".." / "a", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and f"{tmp_path / 'a'} is given twice (as {tmp_path / 'b' / '..' / 'a'}); give each run " \
        "once" in " ".join(r.output.split()), r.output
    # runs of other classes (another class count) cannot be scored on one set of images, whatever the data root
    from fake_data import make_mixed_size_folders

    lab, _ = make_mixed_size_folders(tmp_path / "data")
    assert kd("train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "folder", "--data-root", lab,
              "--train-split", "all", "--val-split", "all", "--crop-size", "32x32", "--batch-size", "2", "--workers",
              "0", "--epochs", "1", "--quiet", "--out", tmp_path / "three").exit_code == 0
    for extra in ([], ["--data-root", lab]):
        r = kd("compare", tmp_path / "a", tmp_path / "three", *extra, "--out", tmp_path / "c", "--quiet")
        assert r.exit_code == 2 and f"{tmp_path / 'a'} was trained on the data set 'synthetic' (11 classes) and " \
            f"{tmp_path / 'three'} on 'folder' (3 classes): runs of different data sets or classes cannot be scored " \
            "on the same images (no --data-root changes that)" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "c").exists()


def test_the_per_class_view_by_hand():
    """Three classes; the teacher below the baseline on the second; a student 2 points down there."""
    from kdcache.report.compare import notable_classes, per_class_markdown, per_class_view

    def row(name, iou, baseline=False, teacher=False):
        return {"name": name, "iou": iou, "baseline": baseline, "teacher": teacher}

    result = {"task": "segmentation", "class_names": ["road", "building", "sky"], "teacher": "runs/t",
              "rows": [row("t", [0.90, 0.60, 0.95], teacher=True), row("ce", [0.85, 0.70, 0.94], baseline=True),
                       row("kl", [0.855, 0.68, 0.945])]}
    view = per_class_view(result)
    assert [v["teacher_below_baseline"] for v in view] == [False, True, False]
    assert [round(100 * v["delta"]["kl"], 6) for v in view] == [0.5, -2.0, 0.5]
    assert [v["teacher"] for v in view] == [0.90, 0.60, 0.95] and [v["baseline"] for v in view] == [0.85, 0.70, 0.94]
    result["per_class"] = view
    assert notable_classes(result) == [1]  # within a point elsewhere; building: -2.00 and flagged
    assert notable_classes(result, points=0.4) == [0, 1, 2]
    md = per_class_markdown(result)
    assert "| building | 60.00 | 70.00 | -2.00 | **yes** |" in md and "| road | 90.00 | 85.00 | +0.50 |  |" in md
    # without a baseline: no Δ, no flag; the narrow view shows the worst classes of the mean
    for r in result["rows"]:
        r["baseline"] = False
    result["per_class"] = per_class_view(result)
    assert all(v["baseline"] is None and v["teacher_below_baseline"] is None for v in result["per_class"])
    assert notable_classes(result, worst=1) == [1]


def test_a_difference_that_rounds_to_zero_is_never_negative_zero():
    from kdcache.cli.report import compare_table
    from kdcache.report.compare import markdown_table, signed_pct

    assert [signed_pct(x) for x in (-4e-6, 4e-6, 0.0, 0.01234, -0.0051)] == ["±0.00", "±0.00", "±0.00", "+1.23", "-0.51"]
    row = {"name": "a", "method": "kl", "model": "m", "miou": 0.5, "macc": 0.5, "aacc": 0.5, "params": 10,
           "ms_per_image": None, "fps": None, "iou": [0.5], "baseline": False, "delta_miou": -3e-6}
    result = {"rows": [row, {**row, "name": "b", "baseline": True, "delta_miou": 0.0}], "class_names": ["x"],
              "dataset": "d", "split": "test", "split_given": True, "num_samples": 1, "baseline": "b"}
    console = Console(width=120, record=True)
    console.print(compare_table(result, width=120))
    for text in (markdown_table(result), console.export_text()):
        assert "-0.00" not in text and "±0.00" in text


def test_the_browsers_pictures_overlay_and_class_map_by_hand(tmp_path):
    """browser_images: per image the picture, the ground truth and each run's prediction as an overlay
    and as a plain class map, whose unlabelled pixels take the void colour, not class 0's black."""
    import numpy as np
    from PIL import Image

    from kdcache.core.outputs import OutputFolder
    from kdcache.report import figures
    from kdcache.report.page import IGNORE_COLOR, browser_images

    palette = [(0, 0, 0), (200, 0, 0), (0, 200, 0)]
    image = np.full((4, 6, 3), 100, np.uint8)
    label = np.array([[0, 1, 2, 255, 0, 1]] * 4, np.uint8)
    pred = np.array([[0, 1, 1, 2, 0, 0]] * 4, np.uint8)
    result = {"class_names": ["a", "b", "c"], "rows": [{"name": "s", "per_image_iou": {"x": 0.5}}]}
    folder = OutputFolder.claim(tmp_path, "comparison")
    (entry,) = browser_images(folder, result, [{"id": "x", "image": image, "label": label, "preds": {"s": pred}}],
                              palette)
    assert sorted(folder.files) == sorted([*entry["files"].values(), *entry["maps"].values(), *entry["runs"].values()])
    read = {k: np.asarray(Image.open(tmp_path / v)) for k, v in {**entry["files"], "map": entry["maps"]["s"],
                                                                   "overlay": entry["runs"]["s"]}.items()}
    np.testing.assert_array_equal(read["image"], image)
    want_truth = np.asarray(palette, np.uint8)[np.where(label == 255, 0, label)]
    want_truth[label == 255] = IGNORE_COLOR
    np.testing.assert_array_equal(read["truth_map"], want_truth)
    np.testing.assert_array_equal(read["map"], np.asarray(palette, np.uint8)[pred])
    np.testing.assert_array_equal(read["overlay"], figures.overlay(image, pred, np.asarray(palette, np.uint8), alpha=0.6))
    assert entry["classes"] == ["a", "b", "c"] and entry["iou"] == {"s": 0.5}


def test_the_page_lists_every_class_colour_and_the_aacc_of_each_run_by_hand(tmp_path):
    """write_page: the legend of the class maps and overlays names every class with its palette
    colour, in class order, then the class maps' colour of unlabelled pixels; the runs table has an
    aAcc column holding each run's own aAcc. Classification pages have neither (no class maps; aAcc
    is top-1 there); a palette short of a colour per class is refused."""
    import re
    from html import unescape

    import pytest

    from kdcache.core.outputs import OutputFolder
    from kdcache.report.page import IGNORE_COLOR, write_page

    names = ["road", "a & b", "sky"]
    palette = [(128, 64, 128), (0, 200, 0), (70, 130, 180), (9, 9, 9)]  # a palette may hold more colours

    def row(name, miou, macc, aacc, baseline=False):
        return {"run": str(tmp_path / name), "name": name, "method": "m", "model": "x", "miou": miou,
                "delta_miou": 0.0, "macc": macc, "aacc": aacc, "params": 1000, "ms_per_image": None, "fps": None,
                "baseline": baseline, "teacher": False, "top1": aacc, "delta_top1": 0.0}

    result = {"rows": [row("base", 0.5, 0.6, 0.875, baseline=True), row("kl", 0.25, 0.375, 0.9375)],
              "class_names": names, "dataset": "d", "split": "test", "num_samples": 2, "per_class": [],
              "task": "segmentation"}

    def page(res, palette, out):
        html = write_page(OutputFolder.claim(tmp_path / out, "comparison"), res, palette=palette).read_text()
        data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)[1])
        items = re.findall(r'<li(?: class="void")? data-class="([^"]*)" data-color="(#[0-9a-f]{6})">'
                           r'<span class="swatch" style="background:(#[0-9a-f]{6})"></span>([^<]*)</li>', html)
        return html, data, items

    html, data, items = page(result, palette, "seg")
    hexed = ["#" + "".join(f"{v:02x}" for v in c) for c in [*palette[:3], IGNORE_COLOR]]
    assert [unescape(i[0]) for i in items] == [*names, "no label (class maps)"]
    assert [unescape(i[3]) for i in items] == [*names, "no label (class maps)"]
    assert [i[1] for i in items] == [i[2] for i in items] == hexed == ["#804080", "#00c800", "#4682b4", "#e0e0c0"]
    assert html.count('<li') == len(names) + 1 and "60% over the image in the overlays" in html
    col = data["columns"].index("aAcc")
    assert data["columns"][col - 1] == "mAcc"
    assert [r["cells"][col] for r in data["table"]] == [{"text": "87.50", "sort": 0.875}, {"text": "93.75", "sort": 0.9375}]
    # negative controls: no legend without a palette or for classification; classification has no aAcc column
    html, data, items = page(result, None, "nopal")
    assert items == [] and 'id="legend"' not in html and "aAcc" in data["columns"]
    html, data, items = page({**result, "task": "classification"}, palette, "cls")
    assert items == [] and 'id="legend"' not in html and "aAcc" not in data["columns"] and "top-1" in data["columns"]
    with pytest.raises(ValueError, match="the palette has 2 colours for 3 classes"):
        page(result, palette[:2], "short")

@pytest.mark.slow  # trains runs to compare
def test_runs_of_other_data_roots_are_compared_only_on_one(tmp_path):
    """Two runs of the same data set name, split and size, trained under other roots (other images):
    refused, naming both roots, unless --data-root scores every run on the same images."""
    import shutil

    from fake_data import make_mixed_size_folders

    lab, _ = make_mixed_size_folders(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(lab, other)
    for f in (other / "images").iterdir():  # other pictures of the same sizes, the same names and masks
        with Image.open(f) as im:
            ImageOps.invert(im.convert("RGB")).save(f)
    tiny = ["--model", "tiny_models:TinyNet", "--dataset", "folder", "--train-split", "all", "--val-split", "all",
            "--epochs", 1, "--batch-size", 2, "--crop-size", "32x32", "--workers", "0", "--device", "cpu", "--quiet"]
    assert kd("train-teacher", *tiny, "--data-root", lab, "--out", tmp_path / "a").exit_code == 0
    assert kd("train-teacher", *tiny, "--data-root", other, "--out", tmp_path / "b").exit_code == 0
    r = kd("compare", tmp_path / "a", tmp_path / "b", "--no-latency", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and f"{tmp_path / 'a'} was trained on the data under {lab.resolve()} and " \
        f"{tmp_path / 'b'} under {other.resolve()}" in " ".join(r.output.split()) and "give --data-root DIR" in r.output
    assert not (tmp_path / "c").exists()
    r = kd("compare", tmp_path / "a", tmp_path / "b", "--data-root", lab, "--no-latency", "--page-images", "0",
           "--examples", "0", "--out", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    # both scored on lab's images: b's numbers are not its own evaluation under other/
    own = kd("evaluate", tmp_path / "b", "--out", tmp_path / "b-own")
    assert own.exit_code == 0
    b_own = json.loads((tmp_path / "b-own" / "eval.json").read_text())["miou"]
    b_here = next(row for row in data["rows"] if row["run"].endswith("b"))["miou"]
    assert b_here != b_own
