"""The figures of the docs (``docs/figures/``) are drawn from ``benchmarks/results/`` and match it:
each is drawn again here from its files (``benchmarks/results_figures.py``) and compared with the
one in the repository, byte for byte but for a coordinate's last decimals; every figure is shown on
a page, and a results file that changed, or a figure edited by hand, is found."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "results_figures.py"
spec = importlib.util.spec_from_file_location("results_figures", SCRIPT)
results_figures = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = results_figures
spec.loader.exec_module(results_figures)


@pytest.mark.slow  # draws every figure (the checks' negative controls below stay quick)
@pytest.mark.parametrize("name", sorted(results_figures.FIGURES))
def test_each_figure_is_drawn_from_its_files(name):
    assert results_figures.stale(names=[name]) == [], (
        f"docs/figures/{name}.svg is not what benchmarks/results/ draws: run python benchmarks/results_tables.py")


def test_every_figure_is_shown_and_every_shown_figure_is_drawn():
    pages = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    shown = {m for p in pages for m in re.findall(r"figures/([\w.\-]+)\.svg", p.read_text())}
    assert set(results_figures.FIGURES) <= shown, set(results_figures.FIGURES) - shown
    assert shown <= set(results_figures.FIGURES), shown - set(results_figures.FIGURES)
    on_disk = {p.stem for p in (REPO / "docs" / "figures").glob("*.svg")}
    assert on_disk == set(results_figures.FIGURES), on_disk ^ set(results_figures.FIGURES)


def test_a_changed_results_file_or_a_figure_edited_by_hand_is_found(tmp_path):
    """Negative controls: one number of a results file changed; a figure's bytes changed."""
    name = "kd-weight-sweep"
    results = tmp_path / "results"
    results.mkdir()
    for source in results_figures.FIGURES[name].sources:
        shutil.copy(results_figures.RESULTS / source, results / source)
    assert results_figures.stale(results=results, names=[name]) == []  # the copy draws the same figure
    path = results / "kd-weight-pool-cpu.md"
    text = path.read_text()
    assert "37.69 (38.65, 36.74)" in text
    path.write_text(text.replace("37.69 (38.65, 36.74)", "38.69 (38.65, 36.74)", 1))
    assert results_figures.stale(results=results, names=[name]) == [name]

    figures = tmp_path / "figures"
    figures.mkdir()
    svg = (results_figures.FIGURES_DIR / f"{name}.svg").read_bytes()
    (figures / f"{name}.svg").write_bytes(svg.replace(b"<path ", b"<path  ", 1))
    assert results_figures.stale(figures=figures, names=[name]) == [name]
    (figures / f"{name}.svg").unlink()
    assert results_figures.stale(figures=figures, names=[name]) == [name]


def test_a_coordinates_last_decimal_passes_and_a_moved_mark_or_changed_text_is_found():
    """Another CPU may round a coordinate's sixth decimal otherwise: the same drawing. A mark moved by a
    hundredth of a point, or any text changed, is not."""
    svg = results_figures.render("kd-step-time")
    first = re.search(rb"translate\((-?\d+\.\d+)", svg).group(1)
    nudged = svg.replace(first, b"%.6f" % (float(first) + 1e-6), 1)
    assert nudged != svg and results_figures.same_drawing(svg, nudged)
    moved = svg.replace(first, b"%.6f" % (float(first) + 0.01), 1)
    assert not results_figures.same_drawing(svg, moved)
    assert not results_figures.same_drawing(svg, svg.replace(b"<path ", b"<path  ", 1))
    assert not results_figures.same_drawing(svg, svg.replace(b"CE only", b"CE-only", 1))


def test_a_figure_from_another_matplotlib_is_checked_by_its_files(tmp_path):
    """A figure drawn by another Matplotlib version passes while its files are the same, not after."""
    name = "kd-step-time"
    figures, results = tmp_path / "figures", tmp_path / "results"
    figures.mkdir()
    results.mkdir()
    for source in results_figures.FIGURES[name].sources:
        shutil.copy(results_figures.RESULTS / source, results / source)
    svg = results_figures.render(name).decode()
    import matplotlib

    other = svg.replace(f"Matplotlib v{matplotlib.__version__},", "Matplotlib v0.0.1,").replace("<path ", "<path  ", 1)
    (figures / f"{name}.svg").write_text(other)
    assert results_figures.stale(figures=figures, results=results, names=[name]) == []
    source = results / results_figures.FIGURES[name].sources[0]
    source.write_text(source.read_text().replace("| CE only |", "| CE only  |"))
    assert results_figures.stale(figures=figures, results=results, names=[name]) == [name]


def test_a_figure_that_names_no_file_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="not in"):
        results_figures.render("kernels", results=tmp_path)


def test_numbers_as_the_results_files_write_them():
    assert results_figures.number("−1.20") == -1.2
    assert results_figures.number("+0.34") == 0.34
    assert results_figures.number("1,249,020") == 1249020
    assert results_figures.number("1.62e-01") == pytest.approx(0.162)
    assert results_figures.numbers("[-0.10, +0.78]") == [-0.10, 0.78]
    assert results_figures.cell("56.17 (56.67, 55.68)") == (56.17, [56.67, 55.68])
    mean, lo, hi = results_figures.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2 - 4.303 / 3 ** 0.5) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5)


def test_per_seed_gains_are_read_with_names_that_hold_a_colon():
    text = "Gain over the CE baseline of the same seed (points): DIST: +1.00, +2.00; ceiling: CE + pool: -1.00, +3.00\n"
    f = results_figures.seed_gains(text, "x.md")
    assert f.labels == ["DIST", "ceiling: CE + pool"]
    assert f.seeds == [[1.0, 2.0], [-1.0, 3.0]]
    assert f.means == [1.5, 1.0]


def test_the_full_budget_grid_is_read_per_pair_against_its_best_ce_arm():
    """Each pair's grid table: arms with their val and form (mixing left out), the best CE arm (the
    method ``none``) as the pair's base; a file with no grid is an error, not an empty figure."""
    text = ("# x\n\n## Pair demo: `s`, the grid (seed 0, val mIoU, best epoch)\n\n"
            "| arm | method | form | val | val at each quarter |\n|---|---|---|---|---|\n"
            "| CE | none | image | 56.69 | 1 |\n| CE cutmix | none | image (cutmix) | 55.94 | 1 |\n"
            "| DIST w=1 | name=dist,weight=1.0 | schedule cutmix | 57.79 | 1 |\n\n"
            "Chosen on val: baseline CE.\n\n### Pair demo on test\n\n| arm | seeds | test |\n|---|---|---|\n"
            "| CE | 5 | 1 |\n\n## Pair compact: `c`, the grid (seed 0, val mIoU, best epoch)\n\n"
            "| arm | method | form | val | val at each quarter |\n|---|---|---|---|---|\n"
            "| CE | none | image | 66.58 | 1 |\n| CE cutmix | none | image (cutmix) | 68.07 | 1 |\n")
    (demo, arms, ce, base), (compact, arms2, ce2, base2) = results_figures.grid_panels(text, "fb.md")
    assert (demo, ce, base, compact, ce2, base2) == ("demo", "CE", 56.69, "compact", "CE cutmix", 68.07)
    assert arms == {"CE": (56.69, "image"), "CE cutmix": (55.94, "image"), "DIST w=1": (57.79, "schedule cutmix")}
    assert "DIST w=1" not in arms2  # the test table under pair demo is not read as compact's grid
    with pytest.raises(ValueError, match="no pair's grid"):
        results_figures.grid_panels("# nothing\n", "fb.md")


def test_the_classification_grids_are_a_panel_per_study_with_its_own_arms():
    """One panel per study file, titled by the study, each with its own arms (best first) measured
    from its own best CE arm."""
    def grid(rows):
        return ("# x\n\n## Pair cls: `s`, the grid (seed 0, val top-1, best epoch)\n\n"
                "| arm | method | form | val | val at each quarter |\n|---|---|---|---|---|\n"
                + "".join(f"| {a} | {m} | {f} | {v} | 1 |\n" for a, m, f, v in rows))
    texts = {"full-budget-a-cpu.md": grid([("CE", "none", "image", 70.0), ("CE mixup", "none", "image (mixup)", 72.0),
                                           ("KL image", "name=kl", "image", 75.0)]),
             "full-budget-b-cpu.md": grid([("CE", "none", "image", 90.0),
                                           ("DIST + pool", "name=dist", "image + pool", 95.0)])}
    fig = results_figures.draw_full_budget_classification(texts)
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in axes] == ["--study a", "--study b"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["KL image", "CE mixup", "CE"]
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["DIST + pool", "CE"]
    ce = [line.get_xdata()[0] for line in axes[0].lines if len(line.get_xdata()) == 1]
    assert ce == pytest.approx([3.0, 0.0, -2.0])  # each arm's val minus the best CE arm's (72)
    assert "CE mixup (72.00)" in axes[0].get_xlabel() and "CE (90.00)" in axes[1].get_xlabel()


def test_the_full_budget_test_phase_is_read_per_pair_with_paired_seeds_only_where_complete():
    """Each pair's finalists against its baseline (the arms table's first row): the file's mean and
    interval; a seed's own difference only where the finalist has as many seeds as the baseline (a
    partial arm's seeds are a subset that cannot be paired by position); comparisons between finalists
    left out. The figure marks the goal at +1.5 and at 30% of the teacher–baseline gap."""
    text = ("# x\n\nTeacher on test: 72.25; its val curve\n\n### Pair demo on test\n\n"
            "| arm | seeds | test | per seed |\n|---|---|---|---|\n"
            "| CE | 2 | 55.00 ± 1.00 | 54.00, 56.00 |\n| DIST | 2 | 57.00 ± 1.00 | 57.00, 57.00 |\n"
            "| KL | 1 | 56.00 ± 0.00 | 56.00 |\n\n"
            "| comparison | seeds | mean | 95% interval | share of the teacher–CE gap |\n|---|---|---|---|---|\n"
            "| DIST − CE | 2 | +2.00 | [-10.71, +14.71] | 11.6% |\n| KL − CE | 1 | +2.00 |  | 11.6% |\n"
            "| KL − DIST | 1 | -1.00 |  |  |\n\n## Pair compact: `c`, the grid\n\n### Pair compact on test\n\n"
            "| arm | seeds | test | per seed |\n|---|---|---|---|\n| CE cutmix | 1 | 67.25 ± 0.00 | 67.25 |\n"
            "| DIST | 1 | 68.75 ± 0.00 | 68.75 |\n\n"
            "| comparison | seeds | mean | 95% interval | share of the teacher–CE gap |\n|---|---|---|---|---|\n"
            "| DIST − CE cutmix | 1 | +1.50 |  | 30.0% |\n")
    (demo, base, mean, f), (compact, base2, mean2, f2) = results_figures.test_panels(text, "fb.md")
    assert (demo, base, mean, compact, base2, mean2) == ("demo", "CE", 55.0, "compact", "CE cutmix", 67.25)
    assert f.labels == ["DIST (2 seeds)", "KL (1 seeds)"]
    assert (f.means, f.lows, f.highs) == ([2.0, 2.0], [-10.71, 2.0], [14.71, 2.0])
    assert f.seeds == [[3.0, 1.0], []]
    fig = results_figures.draw_full_budget_test({"fb.md": text})
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").splitlines()[0] for ax in axes] == ["pair demo", "pair compact"]
    goals = [sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() in ("--", ":")) for ax in axes]
    assert goals == [pytest.approx([1.5, 0.3 * (72.25 - 55.0)]), pytest.approx([1.5, 0.3 * (72.25 - 67.25)])]
    with pytest.raises(ValueError, match="no pair's test phase"):
        results_figures.test_panels("# nothing\n", "fb.md")
