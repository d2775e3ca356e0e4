"""A method whose defaults lose to CE says so (issue 49 §5): each method's ``standing`` line, which
``kdcache list-methods`` prints, against the full-budget results it names."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from cli_runner import kd

from kdcache.methods import METHODS, at_defaults, settings_at_defaults

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"


@pytest.fixture(scope="module")
def full_budget():
    import sys

    sys.path.insert(0, str(BENCH))  # it reads cached_vs_online's helpers
    try:
        yield runpy.run_path(str(BENCH / "full_budget.py"), run_name="fb")
    finally:
        sys.path.remove(str(BENCH))


def test_settings_at_defaults_are_the_constructors_and_the_tasks():
    assert settings_at_defaults("cwd", "segmentation")["temperature"] == 4.0
    kl = METHODS.get("kl")
    assert settings_at_defaults("kl", "classification")["weight"] == kl.task_defaults["classification"]["weight"]
    assert settings_at_defaults("kl", "segmentation")["tail"] == "bin"
    seg = kl.task_defaults["segmentation"]["weight"]
    assert at_defaults({"name": "kl", "weight": seg, "temperature": 1.0}, "segmentation")
    assert not at_defaults({"name": "kl", "weight": seg + 1, "temperature": 1.0}, "segmentation")
    assert not at_defaults({"name": "kl", "mask": "teacher_correct"}, "segmentation")
    assert at_defaults({"name": "cirkd", "student_tap": "stage3"}, "segmentation")  # a tap is not a setting


def test_standing_puts_each_method_at_its_defaults_against_the_best_ce_arm(full_budget):
    """The standing of a made-up grid: the best CE arm, the best form at the defaults, combinations,
    and nothing for a pair whose arms are not all in."""
    kl = METHODS.get("kl").task_defaults["segmentation"]["weight"]
    grid = {"CE": (None, "image", False), "CE cutmix": (None, "image", True),
            "KL a": ({"name": "kl", "weight": kl}, "image", False),
            "KL b": ({"name": "kl", "weight": kl}, "schedule", False),
            "KL other weight": ({"name": "kl", "weight": kl + 1}, "schedule", False),
            "CWD + KL": ([{"name": "cwd"}, {"name": "kl", "weight": kl}], "schedule", False)}
    study = {**full_budget["studies"]()["segmentation"], "grid": grid, "pairs": {"p": "x", "q": "y"}}
    vals = {"CE": 0.5, "CE cutmix": 0.6, "KL a": 0.55, "KL b": 0.58, "KL other weight": 0.9, "CWD + KL": 0.7}
    runs = {f"p | {a} | seed 0": {"val": v} for a, v in vals.items()}
    runs["q | CE | seed 0"] = {"val": 0.1}  # q: CE cutmix missing, so no row
    got = full_budget["standing"]({"runs": runs}, study)
    assert got == {"kl": {"p": {"arm": "KL b", "val": 0.58, "ce_arm": "CE cutmix", "ce": 0.6}},
                   "cwd+kl": {"p": {"arm": "CWD + KL", "val": 0.7, "ce_arm": "CE cutmix", "ce": 0.6}}}


@pytest.mark.parametrize("study", ["segmentation", "shapes", "digits", "digits-few"])
def test_each_methods_standing_line_matches_the_full_budget_results(full_budget, study):
    """Below the best CE arm on val in any pair: the method's line says "below CE" and names the
    results file; above it in every pair: the line does not say "below CE"."""
    path = RESULTS / f"full-budget-{study}-cpu.json"
    if not path.exists():
        pytest.skip(f"{path.name}: the study has not run")
    settings = full_budget["studies"]()[study]
    task = "segmentation" if settings["task"]["score"] == "miou" else "classification"
    stand = full_budget["standing"](json.loads(path.read_text()), settings)
    checked = 0
    for label, by_pair in stand.items():
        line = METHODS.get(label.split("+")[0]).standing.get(task, "")
        below = [p for p, s in by_pair.items() if s["val"] < s["ce"]]
        if below:
            assert "below CE" in line and path.with_suffix(".md").name in line, (label, below, line)
            checked += 1
        elif len(by_pair) == len(settings["pairs"]):
            assert "below CE" not in line, (label, line)
            checked += 1
    assert checked or not stand


def test_list_methods_prints_each_method_its_settings_and_its_standing():
    r = kd("list-methods")
    assert r.exit_code == 0, r.output
    for name, cls in METHODS.items():
        assert f"{name}  " in r.output
        for line in cls.standing.values():
            assert line in r.output
    kl = METHODS.get("kl").task_defaults
    assert f"segmentation: weight {kl['segmentation']['weight']:g}, temperature 1" in r.output
    assert "Hinton" not in r.output.split("kl  ")[1].split("\n")[0]  # the first paragraph only


def test_a_mixed_arm_is_at_the_defaults_of_a_mixing_student(full_budget):
    """In a classification grid, a mixup arm counts at kl's defaults when it has a mixing student's
    (T = 1, weight 1), and a plain arm with the same settings does not; a mixup arm at the plain
    defaults is not either."""
    kl = METHODS.get("kl")
    plain, mixed = kl.task_defaults["classification"], kl.task_defaults["classification mixup"]
    assert plain != mixed
    grid = {"CE": (None, "image", False),
            "KL plain": ({"name": "kl", **plain}, "schedule", False),
            "KL mixed": ({"name": "kl", **mixed}, "schedule mixup", True),
            "KL plain, mixed settings": ({"name": "kl", **mixed}, "schedule", False),
            "KL mixup, plain settings": ({"name": "kl", **plain}, "schedule mixup", True)}
    study = {**full_budget["studies"]()["shapes"], "grid": grid}
    vals = {"CE": 0.5, "KL plain": 0.55, "KL mixed": 0.6, "KL plain, mixed settings": 0.9,
            "KL mixup, plain settings": 0.95}
    got = full_budget["standing"]({"runs": {f"cls | {a} | seed 0": {"val": v} for a, v in vals.items()}}, study)
    assert got == {"kl": {"cls": {"arm": "KL mixed", "val": 0.6, "ce_arm": "CE", "ce": 0.5}}}
    assert at_defaults({"name": "kl", **mixed}, "classification", "mixup")
    assert not at_defaults({"name": "kl", **mixed}, "classification", "cutmix")
