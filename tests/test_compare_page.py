"""compare's index.html, opened from file:// in a real browser (headless Chromium from Debian's
``chromium`` package, driven by selenium through ``chromium-driver``), as a user would browse it:
no console errors, one table row per run, sorting reorders the rows, the class filter changes
the images shown, the arrow keys page, the predictions switch between overlays and class maps
under a legend of every class's colour, every picture the page refers to loads. A screenshot is
saved next to the page (``screenshot.png``). The classification demo's page likewise: its
confusion matrices and each run's wrong images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_runner import kd
from compile_wait import CHROMIUM, wait_for_install

pytestmark = pytest.mark.slow  # a browser, and the demos it looks at


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Chromium and its driver. Where .ci/run installs them in the background (``KDCACHE_TESTS_CHROMIUM``:
    the file of the install's exit status), once that install has ended, and a failure if it failed or
    they are still missing; elsewhere the tests skip without them."""
    status = os.environ.get(CHROMIUM)
    if status:
        wait_for_install(status, str(Path(status).with_name("chromium.log")))
    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not all(found):
        why = "no Chromium here: apt-get install chromium chromium-driver (CI installs it)"
        if status:
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def demo(segmentation_demo):
    """The session's demo (conftest.py), made once for this test and tests/test_compare.py."""
    return segmentation_demo[0] / "compare"


@pytest.fixture(scope="module")
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = chromium[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    yield driver
    driver.quit()


def test_the_demo_compare_page_works_in_a_browser(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    data = json.loads((demo / "compare.json").read_text())
    page = demo / "index.html"
    assert page.exists() and "<script src=" not in page.read_text() and "http" not in page.read_text().split("<script>")[1]
    browser.get(page.as_uri())
    d = browser

    def runs():
        return [tr.find_elements(By.TAG_NAME, "td")[0].text for tr in d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]

    def shown():
        return [row.get_attribute("data-id") for row in d.find_elements(By.CSS_SELECTOR, "#browser .row")]

    def broken():
        """The pictures on show that failed to load (after waiting for every one to finish)."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(d, 20).until(lambda drv: drv.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))
        return d.execute_script("return Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)")

    assert runs() == [r["name"] for r in data["rows"]]  # one row per run, in the table's order
    d.find_elements(By.CSS_SELECTOR, "#runs th")[0].click()  # sort by run name
    assert runs() == sorted(r["name"] for r in data["rows"]) != [r["name"] for r in data["rows"]]
    d.find_elements(By.CSS_SELECTOR, "#runs th")[0].click()  # and the other way
    assert runs() == sorted((r["name"] for r in data["rows"]), reverse=True)
    # the per-class view: a row per class, the teacher's column filled
    assert len(d.find_elements(By.CSS_SELECTOR, "#perclass tbody tr")) == len(data["class_names"])
    # the runs table has each run's aAcc
    head = [th.text for th in d.find_elements(By.CSS_SELECTOR, "#runs thead th")]
    assert "aAcc" in head
    cells = [tr.find_elements(By.TAG_NAME, "td")[head.index("aAcc")].text for tr in d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert cells == [f"{100 * r['aacc']:.2f}" for r in sorted(data["rows"], key=lambda r: r["name"], reverse=True)]
    # the legend: every class, in class order, its swatch drawn in the palette's colour, then the void colour
    from kdcache.data import build_dataset
    from kdcache.report.page import IGNORE_COLOR

    palette = build_dataset("synthetic", "test").palette
    legend = d.find_elements(By.CSS_SELECTOR, "#legend li")
    assert legend[0].is_displayed()
    assert [li.text for li in legend] == [*data["class_names"], "no label (class maps)"]
    swatches = [li.find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color") for li in legend]
    assert swatches == [f"rgba({r}, {g}, {b}, 1)" for r, g, b in [*palette[:len(data["class_names"])], IGNORE_COLOR]]
    # the browser: 4 images a page; the arrow keys page; a class filter shows only the images with it
    first = shown()
    assert len(first) == 4 and broken() == []
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    second = shown()
    assert second and not set(second) & set(first) and broken() == []
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    assert shown() == first
    entries = json.loads(d.execute_script("return document.getElementById('data').textContent"))["images"]
    counts = {c: sum(c in m["classes"] for m in entries) for m in entries for c in m["classes"]}
    rare = min(counts, key=counts.get)
    assert counts[rare] < len(entries)
    Select(d.find_element(By.ID, "filter")).select_by_value(rare)
    with_rare = {m["id"] for m in entries if rare in m["classes"]}
    assert f"({len(with_rare)} images)" in d.find_element(By.ID, "page").text
    seen = set()
    for _ in range((len(with_rare) + 3) // 4):  # every page of the filtered browser: those images, no other
        seen |= set(shown())
        assert broken() == []
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    assert seen == with_rare
    # sorting by "KD hurt most" puts the image where the chosen run loses most to the baseline first
    Select(d.find_element(By.ID, "filter")).select_by_value("")
    Select(d.find_element(By.ID, "sort")).select_by_value("hurt")
    run = Select(d.find_element(By.ID, "sortrun")).first_selected_option.get_attribute("value")
    base = data["baseline"].rsplit("/", 1)[-1]
    gain = {m["id"]: (m["iou"][run] or 0) - (m["iou"][base] or 0) for m in entries}
    assert gain[shown()[0]] == min(gain.values())
    # every picture the page refers to is a file that loads: walk every page of the unfiltered browser,
    # with the predictions as overlays and as plain class maps
    Select(d.find_element(By.ID, "sort")).select_by_value("id")

    def pictures():
        return [i.get_attribute("src").rsplit("/", 1)[-1] for i in d.find_elements(By.CSS_SELECTOR, "#browser img")]

    for view in ("overlay", "map"):
        Select(d.find_element(By.ID, "view")).select_by_value(view)
        for _ in range((len(entries) + 3) // 4 + 1):
            d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)  # back to the first page
        on_show = pictures()
        assert len(on_show) == 4 * (2 + len(data["rows"]))  # image, ground truth, a prediction per run
        assert sum(name.endswith("_map.png") for name in on_show) == (0 if view == "overlay" else 4 * (1 + len(data["rows"])))
        for _ in range((len(entries) + 3) // 4):
            assert broken() == []
            d.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    d.save_screenshot(str(demo / "screenshot.png"))
    assert (demo / "screenshot.png").stat().st_size > 10_000


def test_the_classification_demo_page_shows_confusions_and_wrong_images(classification_demo, browser):
    """The classification demo's page: one row per run, the prediction browser hidden, a confusion
    matrix per run and each run's wrong test images, every picture loading, no console errors."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = classification_demo[0]  # the session's (conftest.py), shared with tests/test_classification.py
    data = json.loads((out / "compare" / "compare.json").read_text())
    d = browser
    d.get((out / "compare" / "index.html").as_uri())
    rows = d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert [tr.find_elements(By.TAG_NAME, "td")[0].text for tr in rows] == [r["name"] for r in data["rows"]]
    assert not d.find_element(By.ID, "predictions").is_displayed()
    assert d.find_element(By.ID, "classification").is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#confusion img")) == len(data["rows"])
    wrong = d.find_elements(By.CSS_SELECTOR, "#wrong img")
    assert wrong  # one-epoch students get test images wrong
    WebDriverWait(d, 20).until(lambda drv: drv.execute_script("return Array.from(document.images).every(i => i.complete)"))
    assert d.execute_script("return Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)") == []
    errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors


def test_every_cell_of_the_tables_and_the_page_is_its_own_runs(tmp_path, browser):
    """Two students whose per-class IoUs differ from each other and from the baseline's (each predicts
    one class everywhere: ``tiny_models:OneClass``, so its per-class IoU follows from the labels
    alone), beside the teacher: every named cell of compare.json, compare.md, compare_per_class.csv
    and the page (read in the browser) holds its own run's number, in its own column."""
    import csv

    import numpy as np
    from selenium.webdriver.common.by import By

    from kdcache.data import build_dataset
    from kdcache.data.splits import limit

    common = ["--limit", 8, "--batch-size", 4, "--epochs", 1, "--workers", 0, "--device", "cpu", "--quiet"]
    teacher, store = tmp_path / "teacher", tmp_path / "cache.zarr"
    assert kd("train-teacher", "--model", "tiny_models:TinyNet", "--dataset", "synthetic", "--resolution", "32x48",
              *common, "--out", teacher).exit_code == 0
    assert kd("build-teacher-cache", "--weights", teacher, "--out", store, "--limit", 8, "--device", "cpu",
              "--workers", 0, "--quiet", "--resolution", "32x48").exit_code == 0
    students = {"base": (3, "none"), "s-sky": (0, "dist"), "s-pole": (2, "kl")}  # run: (its one class, method)
    for name, (cls, method) in students.items():
        r = kd("train-student", "--cache", store, "--model", "tiny_models:OneClass", "-m", f"cls={cls}", "--method",
               method, *common, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    out = tmp_path / "cmp"
    # the runs in an order where neither the baseline nor the teacher comes first
    r = kd("compare", tmp_path / "s-pole", teacher, tmp_path / "base", tmp_path / "s-sky", "--out", out,
           "--no-latency", "--examples", 0, "--page-images", 0, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert kd("evaluate", teacher, "--no-latency", "--qualitative", 0, "--out", tmp_path / "teval", "--device", "cpu",
              "--quiet").exit_code == 0

    # the independent reference: each student's IoU from the validation labels' class counts
    ds = limit(build_dataset("synthetic", "val", resolution=[32, 48]), 8)
    counts = np.zeros(ds.num_classes)
    for i in range(len(ds)):
        mask = ds.load(i)[1]
        counts += np.bincount(mask[mask != 255].ravel(), minlength=ds.num_classes)[:ds.num_classes]
    assert counts[0] and counts[2] and counts[3]  # every class a student predicts is in the labels

    def one_class_iou(k):
        return np.array([counts[k] / counts.sum() if c == k else (0.0 if counts[c] else np.nan)
                         for c in range(ds.num_classes)])

    iou = {name: one_class_iou(cls) for name, (cls, _) in students.items()}
    iou["teacher"] = np.array(json.loads((tmp_path / "teval" / "eval.json").read_text())["iou"], dtype=float)
    miou = {name: np.nanmean(v) for name, v in iou.items()}
    # aAcc: a one-class student is right on exactly the pixels of its class
    aacc = {name: counts[cls] / counts.sum() for name, (cls, _) in students.items()}
    aacc["teacher"] = json.loads((tmp_path / "teval" / "eval.json").read_text())["aacc"]
    assert len({round(v, 6) for v in miou.values()}) == 4  # four different runs

    def pct(x):
        return "—" if x is None or np.isnan(x) else f"{100 * x:.2f}"

    def delta(x):
        if x is None or np.isnan(x):
            return "—"
        t = f"{100 * x:+.2f}"
        return "±0.00" if t in ("+0.00", "-0.00") else t

    data = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert [r["name"] for r in data["rows"]] == ["s-pole", "teacher", "base", "s-sky"]
    assert data["baseline"] == str(tmp_path / "base") and data["teacher"] == str(teacher)
    for name in iou:
        np.testing.assert_allclose(np.array(rows[name]["iou"], dtype=float), iou[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows[name]["delta_miou"], miou[name] - miou["base"], rtol=0, atol=1e-12)
    names = list(ds.class_names)

    # compare.md: the main table, cell by cell under its header; then the per-class table
    md = (out / "compare.md").read_text().splitlines()
    tables = [i for i, line in enumerate(md) if line.startswith("| run ") or line.startswith("| class ")]
    head = [c.strip() for c in md[tables[0]].strip("|").split("|")]
    body = {cells[0]: dict(zip(head, cells)) for line in md[tables[0] + 2:] if line.startswith("|")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for name in iou:
        assert body[name]["mIoU"] == pct(miou[name]), name
        assert body[name]["Δ mIoU"] == ("±0.00" if name == "base" else delta(miou[name] - miou["base"])), name
        for c, cname in enumerate(names):
            assert body[name][cname] == pct(iou[name][c]), (name, cname)
    head = [c.strip() for c in md[tables[1]].strip("|").split("|")]
    assert head == ["class", "teacher", "baseline", "Δ s-pole", "Δ s-sky", "teacher < baseline"]
    per_class = {cells[0]: dict(zip(head, cells)) for line in md[tables[1] + 2:] if line.startswith("|")
                 for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for c, cname in enumerate(names):
        row = per_class[cname]
        assert row["teacher"] == pct(iou["teacher"][c]) and row["baseline"] == pct(iou["base"][c]), cname
        for s in ("s-pole", "s-sky"):
            assert row[f"Δ {s}"] == delta(iou[s][c] - iou["base"][c]), (cname, s)
    with open(out / "compare_per_class.csv", newline="") as f:
        for line, cname in zip(csv.DictReader(f), names):
            assert line["class"] == cname
            for s in ("s-pole", "s-sky"):
                want = iou[s][names.index(cname)] - iou["base"][names.index(cname)]
                assert (line[f"delta_{s}"] == "") if np.isnan(want) else abs(float(line[f"delta_{s}"]) - want) < 1e-9

    # the page, as the browser shows it
    browser.get((out / "index.html").as_uri())
    head = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#runs thead th")]
    shown = {cells[0]: dict(zip(head, cells)) for tr in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
             for cells in [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]]}
    for name in iou:
        assert shown[name]["mIoU"] == pct(miou[name]), name
        assert shown[name]["Δ"] == ("base" if name == "base" else delta(miou[name] - miou["base"])), name
        assert shown[name]["aAcc"] == pct(aacc[name]) == body[name]["aAcc"], name
    head = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#perclass thead th")]
    assert head == ["class", "teacher", "baseline", "Δ s-pole", "Δ s-sky", "teacher < baseline"]
    for tr in browser.find_elements(By.CSS_SELECTOR, "#perclass tbody tr"):
        cells = dict(zip(head, [td.text for td in tr.find_elements(By.TAG_NAME, "td")]))
        c = names.index(cells["class"])
        assert cells["teacher"] == pct(iou["teacher"][c]) and cells["baseline"] == pct(iou["base"][c]), cells
        for s in ("s-pole", "s-sky"):
            assert cells[f"Δ {s}"] == delta(iou[s][c] - iou["base"][c]), (cells, s)
