"""The results in the README and the docs are generated from ``benchmarks/results/`` and match it
(``benchmarks/results_tables.py --check``, as CI runs it through this test), and the README's links
into the docs lead to pages that exist (the site's own links are checked by ``mkdocs build
--strict``; the README is not part of the site)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "results_tables.py"
spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
results_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_tables)


@pytest.mark.slow  # regenerates every results table
def test_every_results_block_matches_its_file():
    """The script as a developer runs it; the figures are checked one test each in
    tests/test_results_figures.py (drawing them all again here doubled CI's time for them)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--check", "--tables-only"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_headline_results_are_generated_blocks():
    readme = (REPO / "README.md").read_text()
    specs = [m.group("spec") for m in results_tables.BLOCK.finditer(readme)]
    assert "kd-methods-100-labelled-cpu.md#1" in specs
    for spec in specs:  # a block is not empty: it holds its file's table
        assert results_tables.render(spec).startswith("| "), spec


def test_a_block_edited_by_hand_or_a_changed_file_is_found(tmp_path):
    """Negative controls: a number typed over in a page, and a results file that changed."""
    page = tmp_path / "page.md"
    good = results_tables.generate("x\n<!-- results: kd-methods-cpu.md#1 -->\n<!-- /results -->\n")
    page.write_text(good)
    assert results_tables.stale(page) == []
    first_number = re.search(r"\d+\.\d\d", good).group(0)
    page.write_text(good.replace(first_number, "99.99", 1))
    assert results_tables.stale(page) == ["kd-methods-cpu.md#1"]
    page.write_text("<!-- results: kd-methods-cpu.md -->\n" + results_tables.render("kd-methods-cpu.md#1")
                    + "<!-- /results -->\n")  # a table where the whole file belongs
    assert results_tables.stale(page) == ["kd-methods-cpu.md"]


def test_a_block_that_names_no_file_or_table_is_an_error():
    with pytest.raises(SystemExit, match="not in"):
        results_tables.render("no-such-file.md")
    with pytest.raises(SystemExit, match="has 1 tables"):
        results_tables.render("kd-methods-cpu.md#5")


def test_whole_files_keep_their_code_blocks():
    assert results_tables.demote("# A\n```\n# a comment\n```\n## B") == "### A\n```\n# a comment\n```\n#### B"


def test_the_readmes_links_lead_somewhere():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local, "the README links into the docs"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing
