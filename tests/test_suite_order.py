"""The order CI's two pytest workers take the test files in (tests/conftest.py): longest first, by
the list of file names there, which would silently stop counting for a file renamed or removed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import conftest

TESTS = Path(__file__).resolve().parent


def test_every_file_named_longest_first_exists_once():
    assert len(set(conftest.LONGEST_FIRST)) == len(conftest.LONGEST_FIRST)
    missing = [name for name in conftest.LONGEST_FIRST if not (TESTS / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that are not in tests/: {missing}"


def test_xdist_keeps_the_collection_order_and_the_longest_files_come_first():
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True))  # pytest-xdist's default
    conftest.pytest_configure(config)
    assert config.option.loadscopereorder is False
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace()))  # without xdist: nothing to turn off

    items = [SimpleNamespace(path=TESTS / name, name=f"{name}:{i}")
             for i, name in enumerate(["test_a.py", conftest.LONGEST_FIRST[1], "test_b.py", conftest.LONGEST_FIRST[0],
                                       conftest.LONGEST_FIRST[1]])]
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.name for i in items] == [f"{conftest.LONGEST_FIRST[0]}:3", f"{conftest.LONGEST_FIRST[1]}:1",
                                       f"{conftest.LONGEST_FIRST[1]}:4", "test_a.py:0", "test_b.py:2"]
