"""The figures of the docs and the README, drawn from ``benchmarks/results/`` as the tables are.

Each figure of :data:`FIGURES` names the results files it reads and draws what it parses from
them (no number is typed here); ``docs/figures/NAME.svg`` holds what it drew.
``python benchmarks/results_tables.py`` redraws every figure with the tables and ``--check`` (what
``tests/test_results_figures.py`` runs) lists the figures whose file differs from a fresh drawing.

The SVG is the same every time it is drawn from the same files with the same Matplotlib (byte for
byte on one machine; on another CPU a coordinate's last decimal may differ, which the check allows:
:func:`same_drawing`): matplotlib's own defaults (not the user's matplotlibrc), text as paths (no font
of the reader's machine), a fixed ``svg.hashsalt`` for the ids, no date. A figure drawn by
another Matplotlib version than the one installed (its ``Creator`` metadata says which) is
compared by the digest of its files instead (its ``Description`` metadata), since a new Matplotlib
may place a path differently.

    python benchmarks/results_figures.py [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIGURES_DIR = REPO / "docs" / "figures"

#: two-sided 95% quantiles of Student's t by degrees of freedom (the benchmarks' own intervals use the same)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
#: Okabe–Ito: told apart with every kind of colour vision
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#666666")
METHOD_COLOURS = {"kl": BLUE, "dist": ORANGE}
STYLE = {
    "svg.fonttype": "path",
    "svg.hashsalt": "kdcache",
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 9,
}
WIDTH = 8.0  # inches: the text column, so that 10 pt reads as the page's own small print

NUMBER = r"[+\-−]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[+\-]\d+)?"


# -- reading the results files ------------------------------------------------------------------


def number(text: str) -> float:
    """``+0.34``, ``−1.2``, ``16%``, ``1,249,020``, ``1.62e-01`` as a float."""
    m = re.search(NUMBER, text.replace("−", "-"))
    if not m:
        raise ValueError(f"no number in {text!r}")
    return float(m.group(0).replace(",", ""))


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, text.replace("−", "-"))]


@dataclass
class Table:
    header: list[str]
    rows: list[dict[str, str]]

    def column(self, starts: str) -> str:
        """The header that starts with ``starts`` (the files' headers carry units and notes)."""
        found = [h for h in self.header if h.startswith(starts)]
        if not found:
            raise ValueError(f"no column {starts!r} in {self.header}")
        return found[0]


def tables(text: str) -> list[Table]:
    """Every Markdown table of ``text``, its rows keyed by the header."""
    out, lines = [], text.splitlines() + [""]
    block: list[str] = []
    for line in lines:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            header, body = cells[0], cells[2:]
            out.append(Table(header, [dict(zip(header, row)) for row in body]))
        block = []
    return out


def table(text: str, *columns: str, name: str = "") -> Table:
    """The first table whose header has a column starting with each of ``columns``."""
    for t in tables(text):
        if all(any(h.startswith(c) for h in t.header) for c in columns):
            return t
    raise ValueError(f"{name}: no table with columns {columns}")


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of the mean of paired differences."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


# -- drawing --------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, height: float, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


@dataclass
class Forest:
    title: str
    labels: list[str]
    means: list[float]
    lows: list[float]
    highs: list[float]
    seeds: list[list[float]]


def forest(ax, f: Forest, unit: str) -> None:
    """Paired differences: each row's mean, its 95% interval and its seeds, with zero marked."""
    n = len(f.labels)
    y = list(range(n))[::-1]
    ax.axvline(0, color=GREY, linewidth=1)
    for yi, mean, lo, hi, seeds in zip(y, f.means, f.lows, f.highs, f.seeds):
        colour = GREEN if lo > 0 else VERMILLION if hi < 0 else GREY
        ax.plot([lo, hi], [yi, yi], color=colour, linewidth=2.2, solid_capstyle="butt")
        ax.plot([mean], [yi], "o", color=colour, markersize=6, zorder=3)
        ax.plot(seeds, [yi] * len(seeds), "|", color="black", alpha=0.45, markersize=7, zorder=2)
    ax.set_yticks(y, f.labels)
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(unit)
    ax.set_title(f.title, loc="left")


def forest_legend(fig, extra: tuple = ()) -> None:
    """The forest's marks (and ``extra`` handles after them) below the figure."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=GREEN, marker="o", linewidth=2.2, label="mean, 95% interval above 0"),
               Line2D([], [], color=VERMILLION, marker="o", linewidth=2.2, label="below 0"),
               Line2D([], [], color=GREY, marker="o", linewidth=2.2, label="includes 0"),
               Line2D([], [], color="black", alpha=0.45, marker="|", linestyle="", markersize=7, label="one seed"),
               *extra]
    fig.legend(handles=handles, loc="outside lower center", ncols=4 if not extra else 3)


def paired_rows(text: str, name: str, keep: Callable[[str], str | None]) -> Forest:
    """The rows of a "Paired differences" table (comparison, mean, 95% interval, per seed) that
    ``keep`` labels (``None``: left out)."""
    t = table(text, "comparison", "95% interval", "per seed", name=name)
    f = Forest("", [], [], [], [], [])
    for row in t.rows:
        label = keep(row["comparison"])
        if label is None:
            continue
        lo, hi = numbers(row[t.column("95% interval")])
        f.labels.append(label)
        f.means.append(number(row["mean"]))
        f.lows.append(lo)
        f.highs.append(hi)
        f.seeds.append(numbers(row["per seed"]))
    return f


def seed_gains(text: str, name: str) -> Forest:
    """The "Gain over the CE baseline of the same seed" line of a kd-methods file, as a forest."""
    m = re.search(r"^Gain over the CE baseline of the same seed[^:]*:\s*(.+)$", text, re.M)
    if not m:
        raise ValueError(f"{name}: no line of per-seed gains over the CE baseline")
    pairs = re.findall(rf"(.+?): ((?:{NUMBER})(?:, {NUMBER})*)(?:; |$)", m.group(1))
    return gains_forest([label.strip() for label, _ in pairs], [numbers(values) for _, values in pairs])


def draw_kd_methods(texts: dict[str, str]):
    (name, text), = texts.items()
    f = seed_gains(text, name)
    labelled = re.search(r"(\d+) labelled", text)
    f.title = f"Gain over the CE baseline, same seed ({labelled.group(1)} labelled images)"
    fig, axes = _figure(1, 1, 0.45 * len(f.labels) + 1.4)
    forest(axes[0][0], f, "test mIoU points (95% t interval over seeds)")
    forest_legend(fig)
    return fig


def gains_forest(labels: list[str], gains: list[list[float]]) -> Forest:
    f = Forest("", [], [], [], [], [])
    for label, values in zip(labels, gains):
        mean, lo, hi = interval(values)
        f.labels.append(label)
        f.means.append(mean)
        f.lows.append(lo)
        f.highs.append(hi)
        f.seeds.append(values)
    return f


def draw_ensembles(texts: dict[str, str]):
    """DIST from each teacher's cache against the CE baseline of the same seed."""
    (name, text), = texts.items()
    t = table(text, "run", "per seed", "Δ vs CE", name=name)
    base = next(numbers(r["per seed"]) for r in t.rows if r["run"].startswith("CE"))
    rows = [r for r in t.rows if not r["run"].startswith("CE")]
    f = gains_forest([r["run"] for r in rows],
                     [[a - b for a, b in zip(numbers(r["per seed"]), base)] for r in rows])
    f.title = "DIST students from each teacher's cache: gain over CE, same seed"
    fig, axes = _figure(1, 1, 0.45 * len(f.labels) + 1.5)
    forest(axes[0][0], f, "test mIoU points (95% t interval over seeds)")
    forest_legend(fig)
    return fig


def draw_classification(texts: dict[str, str]):
    """Each cache form's students against CE, from the per-seed gains of the students' table."""
    (name, text), = texts.items()
    t = table(text, "student", "Δ top-1 vs CE", name=name)
    column = t.column("Δ top-1 vs CE")
    rows = [r for r in t.rows if "(" in r[column]]
    f = gains_forest([r["student"] for r in rows], [cell(r[column])[1] for r in rows])
    f.title = "Classification students: top-1 gain over CE, same seed"
    fig, axes = _figure(1, 1, 0.45 * len(f.labels) + 1.5)
    forest(axes[0][0], f, "test top-1 points (95% t interval over seeds)")
    forest_legend(fig)
    return fig


def draw_cached_vs_online(texts: dict[str, str]):
    """KD − CE and cache − live teacher, paired by seed, per task (a column each)."""
    panels = []
    for name, text in texts.items():
        task = "segmentation" if "segmentation" in name else "classification"
        unit = "test mIoU points" if task == "segmentation" else "test top-1 points"
        vs_ce = paired_rows(text, name, lambda c: c.removesuffix(" − CE") if c.endswith(" − CE") else None)
        vs_live = paired_rows(text, name, lambda c: c.removesuffix(" − KL online").removesuffix(" − DIST online")
                              if re.search(r" − (KL|DIST) online$", c) else None)
        vs_ce.title, vs_live.title = f"{task}\nKD − CE", f"{task}\ncache − live teacher"
        panels.append((vs_ce, vs_live, unit))
    rows = [max(len(p[0].labels) for p in panels), max(len(p[1].labels) for p in panels)]
    fig, axes = _figure(2, len(panels), 0.3 * sum(rows) + 2.4, height_ratios=[r + 1.5 for r in rows])
    for col, (vs_ce, vs_live, unit) in enumerate(panels):
        forest(axes[0][col], vs_ce, unit)
        forest(axes[1][col], vs_live, unit)
    forest_legend(fig)
    return fig


def draw_weak_teacher(texts: dict[str, str]):
    """Teacher-aware − plain KD, paired by seed, for each setting (a row each)."""
    fig, axes = _figure(len(texts), 1, 0.32 * sum(
        len(table(t, "comparison", "recovered").rows) for t in texts.values()) + 1.3 * len(texts) + 0.6,
        height_ratios=[len(table(t, "comparison", "recovered").rows) + 2 for t in texts.values()])
    for ax, (name, text) in zip(axes[:, 0], texts.items()):
        f = paired_rows(text, name, lambda c: c.removesuffix(" − plain").replace("teacher, ", "teacher: "))
        setting = re.search(r"Students `[^`]+`, [^.]*?(T = \d+[^(]*)", text)
        f.title = f"teacher-aware − plain KD ({setting.group(1).strip().rstrip(',')})" if setting else name
        forest(ax, f, "test mIoU points")
    forest_legend(fig)
    return fig


#: a grid arm's form (its table's "form" column, mixing left out) -> its colour
FORM_COLOURS = {"image": BLUE, "schedule": ORANGE, "schedule cutmix": GREEN, "schedule mixup": GREEN,
                "schedule features": PURPLE, "image + pool": SKY}


def grid_panels(text: str, name: str) -> list[tuple[str, dict[str, tuple[float, str]], str, float]]:
    """Each pair's grid of a full-budget file: (pair, arm -> (val, form), the best CE arm, its val);
    an arm of the method ``none`` is a CE arm."""
    out = []
    for m in re.finditer(r"^## Pair (\S+): .*?the grid.*?$(.*?)(?=^## |\Z)", text, re.M | re.S):
        t = table(m.group(2), "arm", "method", "form", "val", name=name)
        arms = {r["arm"]: (number(r["val"]), r["form"].split(" (")[0]) for r in t.rows}
        ces = [r["arm"] for r in t.rows if r["method"] == "none"]
        if not ces:
            raise ValueError(f"{name}: pair {m.group(1)}'s grid has no CE arm")
        ce = max(ces, key=lambda a: arms[a][0])
        out.append((m.group(1), arms, ce, arms[ce][0]))
    if not out:
        raise ValueError(f"{name}: no pair's grid")
    return out


def _grid_panel(ax, arms: list[str], vals: dict[str, tuple[float, str]], ce: str, base: float, unit: str) -> None:
    """One pair's grid arms as lollipops from its best CE arm (at 0), coloured by form."""
    y = list(range(len(arms)))[::-1]
    ax.axvline(0, color=GREY, linewidth=1)
    for yi, arm in zip(y, arms):
        val, form = vals[arm]
        colour = GREY if arm.startswith("CE") else FORM_COLOURS.get(form, GREY)
        ax.plot([0, val - base], [yi, yi], color=colour, linewidth=1.2, alpha=0.6)
        ax.plot([val - base], [yi], "o", color=colour, markersize=6, zorder=3)
    ax.set_yticks(y, arms)
    ax.set_ylim(-0.7, len(arms) - 0.3)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"val {unit} over {ce} ({base:.2f}),\nin points")


def _form_legend(fig, forms: set[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=FORM_COLOURS[f], marker="o", linestyle="", label=f)
               for f in sorted(forms, key=list(FORM_COLOURS).index)]
    handles.append(Line2D([], [], color=GREY, marker="o", linestyle="", label="CE"))
    fig.legend(handles=handles, loc="outside lower center", ncols=(len(handles) + 1) // 2)


def draw_full_budget_grid(texts: dict[str, str]):
    """Each grid arm's val score minus the pair's best CE arm (seed 0), a panel per pair, the arms
    in one order (the best mean over the pairs first), coloured by where the targets come from."""
    (name, text), = texts.items()
    panels = grid_panels(text, name)
    arms = [a for a in panels[0][1] if all(a in p[1] for p in panels)]  # the best CE arm of a pair sits at 0
    arms.sort(key=lambda a: -statistics.fmean(p[1][a][0] - p[3] for p in panels))
    fig, axes = _figure(1, len(panels), 0.3 * len(arms) + 1.6, sharey=True)
    for ax, (pair, vals, ce, base) in zip(axes[0], panels):
        _grid_panel(ax, arms, vals, ce, base, "mIoU")
        ax.set_title(f"pair {pair}", loc="left")
    _form_legend(fig, {vals[a][1] for _, vals, _, _ in panels for a in arms if not a.startswith("CE")})
    return fig


def draw_full_budget_classification(texts: dict[str, str]):
    """The classification studies' grids, a panel per study (each its own arms, the best first):
    val top-1 minus the study's best CE arm (seed 0), coloured by where the targets come from."""
    studies = []
    for name, text in texts.items():
        (_, vals, ce, base), = grid_panels(text, name)  # one student per classification study
        studies.append((name.removeprefix("full-budget-").removesuffix("-cpu.md"), vals, ce, base))
    from matplotlib.figure import Figure

    sizes = [len(vals) for _, vals, _, _ in studies]
    fig = Figure(figsize=(WIDTH, 0.27 * sum(sizes) + 1.2 * len(studies) + 0.8), layout="constrained")
    axes = fig.subplots(len(studies), 1, squeeze=False, height_ratios=sizes)
    forms = set()
    for ax, (study, vals, ce, base) in zip(axes[:, 0], studies):
        arms = sorted(vals, key=lambda a: -vals[a][0])
        _grid_panel(ax, arms, vals, ce, base, "top-1")
        ax.set_title(f"--study {study}", loc="left")
        forms |= {vals[a][1] for a in arms if not a.startswith("CE")}
    _form_legend(fig, forms)
    return fig


def test_panels(text: str, name: str) -> list[tuple[str, str, float, Forest]]:
    """Each pair's test phase of a full-budget file: (pair, baseline arm, baseline's mean test score,
    a forest of each finalist minus the baseline). The intervals are the file's (paired over the seeds
    both have); a seed's own difference is drawn where both arms have every seed of the baseline."""
    out = []
    for m in re.finditer(r"^### Pair (\S+) on test$(.*?)(?=^##|\Z)", text, re.M | re.S):
        arms = table(m.group(2), "arm", "seeds", "test", "per seed", name=name)
        comp = table(m.group(2), "comparison", "seeds", "mean", "95% interval", name=name)
        base = arms.rows[0]["arm"]
        scores = {r["arm"]: numbers(r["per seed"]) for r in arms.rows}
        f = Forest("", [], [], [], [], [])
        for r in comp.rows:
            arm, _, against = r["comparison"].rpartition(" − ")
            if against != base:
                continue
            mean = number(r["mean"])
            lo, hi = numbers(r[comp.column("95% interval")]) or (mean, mean)
            a, b = scores[arm], scores[base]
            f.labels.append(f"{arm} ({int(number(r['seeds']))} seeds)")
            f.means.append(mean)
            f.lows.append(lo)
            f.highs.append(hi)
            f.seeds.append([x - y for x, y in zip(a, b)] if len(a) == len(b) else [])
        out.append((m.group(1), base, statistics.fmean(scores[base]), f))
    if not out:
        raise ValueError(f"{name}: no pair's test phase")
    return out


def draw_full_budget_test(texts: dict[str, str]):
    """Each pair's finalists on test: the paired difference from the pair's baseline with its 95%
    interval and each seed's, against the study's goal (+1.5 points and 30% of the teacher–CE gap)."""
    from matplotlib.lines import Line2D

    (name, text), = texts.items()
    teacher = re.search(rf"^Teacher on test: ({NUMBER})", text, re.M)
    if not teacher:
        raise ValueError(f"{name}: no teacher's test score")
    panels = test_panels(text, name)
    rows = [len(f.labels) for *_, f in panels]
    fig, axes = _figure(len(panels), 1, 0.42 * sum(rows) + 1.3 * len(panels) + 0.6, height_ratios=rows)
    for ax, (pair, base, base_mean, f) in zip(axes[:, 0], panels):
        gap = float(teacher.group(1)) - base_mean
        f.title = f"pair {pair}\nover {base} ({base_mean:.2f}); the teacher +{gap:.2f}"
        forest(ax, f, "test mIoU over the baseline\n(points, paired, 95% t interval)")
        ax.axvline(1.5, color=BLUE, linestyle="--", linewidth=1.2)
        ax.axvline(0.3 * gap, color=PURPLE, linestyle=":", linewidth=1.4)
    forest_legend(fig, (Line2D([], [], color=BLUE, linestyle="--", label="goal: +1.5 points"),
                        Line2D([], [], color=PURPLE, linestyle=":", label="goal: 30% of the teacher–baseline gap")))
    return fig


def cell(text: str) -> tuple[float, list[float]]:
    """``56.17 (56.67, 55.68)`` as (56.17, [56.67, 55.68]); a plain number has no seeds."""
    values = numbers(text)
    return values[0], values[1:]


def sweep(ax, t: Table, prefix: str, ylabel: str, base: str | None = None) -> None:
    """One line per method over the columns ``prefix = X``, seeds as dots, the chosen value ringed."""
    columns = [h for h in t.header if h.startswith(prefix)]
    xs = [number(h.partition("=")[2]) for h in columns]
    for row in t.rows:
        method = row[t.header[0]]
        colour = METHOD_COLOURS.get(method, PURPLE)
        means = [cell(row[c])[0] for c in columns]
        ax.plot(xs, means, "-o", color=colour, label=method, linewidth=2, markersize=5)
        for x, c in zip(xs, columns):
            seeds = cell(row[c])[1]
            ax.plot([x] * len(seeds), seeds, ".", color=colour, alpha=0.4, markersize=6)
        chosen = next((row[h] for h in t.header if h in ("chosen", "default")), "")
        if chosen.startswith(prefix):
            x = number(chosen.partition("=")[2])
            ax.plot([x], [means[xs.index(x)]], "o", markersize=13, markerfacecolor="none", markeredgecolor=colour)
    if base:
        ce = cell(t.rows[0][t.column(base)])[0]
        ax.axhline(ce, color=GREY, linestyle="--", linewidth=1.2, label="CE")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel({"T = ": "temperature T", "w = ": "KD weight w (L = CE + w · KD)"}.get(prefix, prefix))
    ax.set_ylabel(ylabel)


def sweep_legend(fig, ce: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linewidth=2, label=m) for m, c in METHOD_COLOURS.items()]
    if ce:
        handles.append(Line2D([], [], color=GREY, linestyle="--", label="CE alone"))
    handles += [Line2D([], [], color=GREY, marker=".", linestyle="", alpha=0.6, label="one seed"),
                Line2D([], [], color=GREY, marker="o", markersize=11, markerfacecolor="none", linestyle="",
                       label="chosen on val")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))


def draw_temperatures(texts: dict[str, str]):
    fig, axes = _figure(1, len(texts), 3.4)
    for ax, (name, text) in zip(axes[0], texts.items()):
        task = "segmentation" if "segmentation" in name else "classification"
        sweep(ax, table(text, "method", "T = ", name=name), "T = ", "val mIoU %" if task == "segmentation"
              else "val top-1 %")
        ax.set_title(f"{task}: temperature (val)", loc="left")
    sweep_legend(fig, ce=False)
    return fig


def draw_weights(texts: dict[str, str]):
    fig, axes = _figure(1, len(texts), 3.6)
    titles = {"kd-weight-pool": "segmentation + pool", "kd-weight-classification": "classification",
              "cached-vs-online-segmentation": "segmentation"}
    for ax, (name, text) in zip(axes[0], texts.items()):
        t = table(text, "method", "w = ", "CE", name=name)
        task = next(v for k, v in titles.items() if name.startswith(k))
        sweep(ax, t, "w = ", "val top-1 %" if task == "classification" else "val mIoU %", base="CE")
        ax.set_title(f"{task} (val)", loc="left")
    sweep_legend(fig, ce=True)
    return fig


def draw_per_class(texts: dict[str, str]):
    """Per-class test IoU of each student minus CE's, a map per setting."""
    from matplotlib.colors import TwoSlopeNorm

    data = []
    for name, text in texts.items():
        t = table(text, "class", "CE", name=name)
        arms = [h for h in t.header[2:]]
        classes = [row["class"] for row in t.rows]
        grid = [[number(row[a]) - number(row["CE"]) for a in arms] for row in t.rows]
        data.append((name, [a.replace("weak teacher, ", "").replace("class weights", "cls w.") for a in arms],
                     classes, grid))
    span = max(abs(v) for _, _, _, g in data for r in g for v in r)
    fig, axes = _figure(1, len(data), 4.6, width_ratios=[len(d[1]) for d in data])
    norm = TwoSlopeNorm(0, -span, span)
    for ax, (name, arms, classes, grid) in zip(axes[0], data):
        image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                ax.text(j, i, f"{v:+.1f}".replace("-", "−"), ha="center", va="center", fontsize=7.5,
                        color="white" if abs(v) > 0.6 * span else "black")
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.grid(False)
        setting = "KL at T = 4, weight 1" if "seed" in name else "the defaults"
        ax.set_title(f"weak teacher, {setting}", loc="left")
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.colorbar(image, ax=axes[0].tolist(), label="test IoU − CE's (points)", shrink=0.8)
    return fig


def draw_cache_fidelity(texts: dict[str, str]):
    (name, text), = texts.items()
    t = table(text, "k", "T", "KL(dense", name=name)
    fig, axes = _figure(1, 2, 3.2)
    temps = sorted({number(r["T"]) for r in t.rows})
    shades = {1: BLUE, 2: ORANGE, 4: GREEN}
    for temp in temps:
        rows = [r for r in t.rows if number(r["T"]) == temp]
        ks = [number(r["k"]) for r in rows]
        colour = shades.get(int(temp), PURPLE)
        axes[0][0].plot(ks, [number(r[t.column("KL(dense")]) for r in rows], "-o", color=colour, label=f"T = {temp:g}")
        axes[0][1].plot(ks, [number(r[t.column("grad cosine `bin` mean")]) for r in rows], "-o", color=colour,
                        label=f"T = {temp:g}, bin")
        axes[0][1].plot(ks, [number(r[t.column("grad cosine `renormalize` mean")]) for r in rows], "--o",
                        color=colour, markerfacecolor="white", label=f"T = {temp:g}, renormalize")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.minorticks_off()
        ax.set_xlabel("k (top-k classes kept)")
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("KL(dense ‖ cache), nats/pixel")
    axes[0][0].set_title("what the cache loses", loc="left")
    axes[0][1].set_ylabel("gradient cosine, mean")
    axes[0][1].set_title("the gradient it gives", loc="left")
    axes[0][0].legend()
    axes[0][1].legend(fontsize=7.5, ncols=1)
    return fig


def draw_crop_fidelity(texts: dict[str, str]):
    (name, text), = texts.items()
    found = [t for t in tables(text) if t.header and t.header[0] == "cache form (training mix)"]
    fig, axes = _figure(len(found), 1, 0.27 * sum(len(t.rows) for t in found) + 1.4 * len(found),
                        height_ratios=[len(t.rows) + 2 for t in found])
    for ax, t, task in zip(axes[:, 0], found, ("segmentation", "classification")):
        labels = [r[t.header[0]] for r in t.rows]
        kl = [number(r[t.column("KL at T = 1")]) for r in t.rows]
        size = [r[t.column("bytes on disk")] for r in t.rows]
        y = list(range(len(labels)))[::-1]
        colours = [GREEN if "schedule" in lab else BLUE if "bilinear" in lab else SKY for lab in labels]
        ax.barh(y, kl, color=colours)
        for yi, v, b in zip(y, kl, size):
            ax.text(v * 1.15, yi, f"{b} B", va="center", fontsize=7.5, color=GREY)
        ax.set_xscale("log")
        ax.set_yticks(y, labels, fontsize=8.5)
        ax.grid(axis="y", visible=False)
        ax.set_xlim(min(kl) / 3, max(kl) * 12)
        ax.set_title(f"{task}, training mix", loc="left")
    axes[-1][0].set_xlabel("KL(teacher on the crop ‖ target) at T = 1, nats/cell; B: bytes per image")
    return fig


def machine(text: str) -> str:
    m = re.search(r"(?:Device|Machine): (.+?)(?:;|\. |\.$)", text, re.M)
    return m.group(1) if m else "?"


def draw_step_time(texts: dict[str, str]):
    """One panel a machine, stacked, on one x axis: each step's time over the CE-only step's."""
    fig, axes = _figure(len(texts), 1, 1.3 * len(texts) + 0.5, sharex=True)
    top = 0.0
    for ax, (name, text) in zip(axes[:, 0], texts.items()):
        t = table(text, "step", "median ms", name=name)
        steps = [r["step"] for r in t.rows]
        ms = [number(r["median ms"]) for r in t.rows]
        base = ms[steps.index("CE only")]
        y = list(range(len(steps)))[::-1]
        ax.barh(y, [m / base for m in ms], color=[GREY, BLUE, VERMILLION][: len(steps)])
        for yi, m in zip(y, ms):
            ax.text(m / base + 0.05, yi, f"{m / base:.2f}× ({m:g} ms)", va="center", fontsize=8.5)
        ax.axvline(1, color="black", linewidth=0.8)
        ax.set_yticks(y, steps)
        ax.grid(axis="y", visible=False)
        top = max(top, max(ms) / base * 1.45)
        ax.set_xlim(0, top)
        ax.set_title(machine(text), loc="left")
    axes[-1, 0].set_xlabel("step time / CE-only step")
    return fig


def draw_kernels(texts: dict[str, str]):
    """Speed-up of the fused kernel over eager PyTorch and torch.compile, and its share of the copy rate."""
    parsed = []
    for name, text in texts.items():
        t = table(text, "case", "k", "× compile", "% of copy", name=name)
        ks = {r["k"] for r in t.rows}
        labels = [r["case"] + (f", k = {r['k']}" if len(ks) > 1 else "") for r in t.rows]
        copy = re.search(r"copy bandwidth measured in the same run: ([\d.]+ GB/s)", text)
        title = re.sub(r"\((?:R|TM)\)| Processor", "", machine(text))  # a panel title's width, not the next one's
        if "Times are the device's" in text:
            title += ", device time"
        elif "NVIDIA" in title:
            title += ", host incl."
        parsed.append((title, f"% of copy ({copy.group(1)})" if copy else "% of copy", labels, t))
    fig, axes = _figure(len(parsed), 2, 0.23 * sum(len(p[2]) for p in parsed) + 1.5 * len(parsed),
                        height_ratios=[len(p[2]) + 3 for p in parsed], width_ratios=[3, 2])
    for (title, share_title, labels, t), (left, right) in zip(parsed, axes):
        y = list(range(len(labels)))[::-1]
        compiled = [number(r["× compile"]) for r in t.rows]
        eager = [number(r["× eager"]) for r in t.rows]
        left.barh([v + 0.2 for v in y], compiled, height=0.4, color=BLUE, label="× torch.compile")
        left.barh([v - 0.2 for v in y], eager, height=0.4, color=SKY, label="× eager PyTorch")
        left.axvline(1, color="black", linewidth=0.8)
        left.set_xscale("log")
        left.set_xticks([0.5, 1, 2, 5, 10], ["0.5", "1", "2", "5", "10"])
        left.minorticks_off()
        left.set_yticks(y, labels, fontsize=8)
        left.grid(axis="y", visible=False)
        left.set_title(title, loc="left")
        share = [number(r["% of copy"]) for r in t.rows]
        right.barh(y, share, color=GREEN)
        if "NVIDIA" in title:  # issue 50's goal on a GPU
            right.axvline(70, color="black", linewidth=0.8, linestyle="--")
            right.text(70, y[0] + 0.6, " goal 70%", fontsize=7, va="bottom")
        right.set_xlim(0, 100)
        right.set_yticks(y, [])
        right.grid(axis="y", visible=False)
        right.set_title(share_title, loc="left")
    axes[0][0].legend(loc="lower right", fontsize=8)
    axes[-1][0].set_xlabel("speed-up of fused fwd + bwd (log)")
    axes[-1][1].set_xlabel("fused GB/s, % of copy")
    return fig


def run_label(name: str, text: str) -> str:
    """An interleaved epoch-time run's commit (from its file's name, else from its "Run …" note) and which of
    a commit's runs it is (from the file's name, or the note's "the third of three runs", "the second of two runs")."""
    named = re.search(r"-([0-9a-f]{7,})(?:-run(\d+))?\.md$", name)
    if named:
        return named.group(1) + (f" run {named.group(2)}" if named.group(2) else "")
    note = re.search(r"^Run .*", text, re.M)
    commit = re.search(r"commit ([0-9a-f]{7,})", note.group(0)) if note else None
    nth = re.search(r"the (first|second|third) of (?:two|three) runs", note.group(0)) if note else None
    return (commit.group(1) if commit else name) + (
        f" run {({'first': 1, 'second': 2, 'third': 3})[nth.group(1)]}" if nth else "")


def draw_epoch_time(texts: dict[str, str]):
    """Each interleaved run of ``benchmarks/epoch_time.py --interleave``, oldest first, a panel per machine: a
    cached epoch's time over its paired CE epoch's, the median over rounds (dot), the middle half (bar) and the
    min–max (line, cut at the axis's end), for streamed ``kl`` and for ``none`` (the student's pipeline, no
    targets read), against issue 50's 1.05."""
    from matplotlib.lines import Line2D

    machines: dict[str, list[tuple[str, str]]] = {}
    for name, text in texts.items():
        cpu = re.sub(r"\((?:R|TM)\)| Processor|^cpu: ", "", machine(text)).split(",")[0].strip()
        machines.setdefault(cpu, []).append((name, text))
    runs = sum(len(v) for v in machines.values())
    fig, axes = _figure(len(machines), 1, 0.36 * runs + 0.8 * len(machines) + 1.0, sharex=True,
                        height_ratios=[len(v) + 1 for v in machines.values()])
    variants = (("kl, stream", BLUE, 0.15), ("none, stream", GREY, -0.15))
    right = 1.6  # the axis's end: a min–max beyond it is cut there
    for ax, (title, files) in zip(axes[:, 0], machines.items()):
        for j, (name, text) in enumerate(files):
            t = table(text, "run", "epoch time / CE only", "middle half", name=name)
            rows = {r["run"]: r for r in t.rows}
            y = len(files) - 1 - j
            for variant, colour, dy in variants:
                r = rows[variant]
                med = number(r[t.column("epoch time / CE only")])
                lo, hi = numbers(r[t.column("middle half")].replace("–", " "))
                mn, mx = numbers(r[t.column("min–max")].replace("–", " "))
                ax.plot([mn, min(mx, right)], [y + dy] * 2, color=colour, linewidth=0.8)
                ax.plot([lo, hi], [y + dy] * 2, color=colour, linewidth=4.5, solid_capstyle="butt", alpha=0.4)
                ax.plot([med], [y + dy], "o", color=colour, markersize=4.5)
                if variant == "kl, stream":
                    ax.text(hi + 0.012, y + dy + 0.06, f"{med:.3f}", va="bottom", fontsize=8, color=colour)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.05, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(files))[::-1], [run_label(n, t) for n, t in files], fontsize=8.5)
        ax.grid(axis="y", visible=False)
        ax.set_ylim(-0.6, len(files) - 0.3)
        ax.set_xlim(0.5, right)
        ax.set_title(title, loc="left")
    handles = [Line2D([], [], color=BLUE, marker="o", linewidth=4.5, alpha=0.6, label="kl, stream"),
               Line2D([], [], color=GREY, marker="o", linewidth=4.5, alpha=0.6, label="none, stream (no targets read)"),
               Line2D([], [], color="black", linewidth=0.8, linestyle="--", label="goal ≤ 1.05")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8.5)
    axes[-1, 0].set_xlabel("epoch time / paired CE-only epoch: median over rounds (dot), middle half (bar), "
                           "min–max (line)", fontsize=9)
    return fig


@dataclass(frozen=True)
class Spec:
    sources: tuple[str, ...]
    draw: Callable[[dict[str, str]], object]
    alt: str


FIGURES: dict[str, Spec] = {
    "kd-methods-100-labelled": Spec(("kd-methods-100-labelled-cpu.md",), draw_kd_methods,
                                    "Gain of each KD run over the CE baseline of the same seed, 100 labelled images"),
    "kd-methods-400-labelled": Spec(("kd-methods-cpu.md",), draw_kd_methods,
                                    "Gain of each KD run over the CE baseline of the same seed, 400 labelled images"),
    "cached-vs-online": Spec(("cached-vs-online-segmentation-cpu.md", "cached-vs-online-classification-cpu.md"),
                             draw_cached_vs_online, "Paired differences: KD against CE, cache against live teacher"),
    "temperature-sweep": Spec(("cached-vs-online-segmentation-cpu-run2.md", "cached-vs-online-classification-cpu.md"),
                              draw_temperatures, "Validation score against the temperature, kl and dist"),
    "kd-weight-sweep": Spec(("cached-vs-online-segmentation-cpu.md", "kd-weight-pool-cpu.md",
                             "kd-weight-classification-cpu.md"), draw_weights,
                            "Validation score against the KD weight, kl and dist, with the CE baseline"),
    "weak-teacher": Spec(("weak-teacher-cpu.md", "weak-teacher-seed-cpu.md"), draw_weak_teacher,
                         "Teacher-aware KD minus plain KD, paired by seed"),
    "weak-teacher-per-class": Spec(("weak-teacher-cpu.md", "weak-teacher-seed-cpu.md"), draw_per_class,
                                   "Per-class test IoU of each student minus the CE baseline's"),
    "cache-fidelity": Spec(("cache-fidelity.md",), draw_cache_fidelity,
                           "KL and gradient cosine of a top-k cache against the dense teacher, by k"),
    "teacher-ensembles": Spec(("teacher-ensembles-cpu.md",), draw_ensembles,
                              "Gain of DIST students from a single teacher, an ensemble and TTA over CE, same seed"),
    "classification": Spec(("classification-cpu.md",), draw_classification,
                           "Gain of students from each classification cache form over CE, same seed"),
    "crop-fidelity": Spec(("crop-fidelity.md",), draw_crop_fidelity,
                          "KL between the teacher on a crop and each cache form's target"),
    "kd-step-time": Spec(("kd-step-time-cpu.md", "kd-step-time-nvidia-h100-80gb-hbm3.md", "kd-step-time-nvidia-h200.md"),
                         draw_step_time,
                         "Training step time with the KD term, relative to CE only"),
    "full-budget-grid": Spec(("full-budget-segmentation-cpu.md",), draw_full_budget_grid,
                             "Each recipe of the full-budget grid: val mIoU over the best CE arm, seed 0, per pair"),
    "full-budget-test": Spec(("full-budget-segmentation-cpu.md",), draw_full_budget_test,
                             "Each pair's finalists on test: mIoU over the pair's baseline, paired over seeds, against the "
                             "goal"),
    "full-budget-classification": Spec(("full-budget-shapes-cpu.md", "full-budget-digits-cpu.md",
                                        "full-budget-digits-few-cpu.md"), draw_full_budget_classification,
                                       "Each recipe of the classification full-budget grids: val top-1 over the "
                                       "best CE arm, seed 0, per study"),
    "epoch-time": Spec(tuple(f"epoch-time-interleaved-cpu{run}.md" for run in (
        "-1247321", "-13f2afa", "-ee49f93", "-0c0efc1", "-492d33d-run1", "-492d33d-run2", "-492d33d-run3", "-247d34e",
        "-6c604b6-run1", "-6c604b6-run2", "-6c604b6-run3", "-a0111a4", "-dc299bc-run1", "-dc299bc-run2", "-750b58d",
        "")), draw_epoch_time,
        "A cached kl epoch's time over its paired CE epoch's, each interleaved run, against the 1.05 goal"),
    "kernels": Spec(("kernels-cpu.md", "kernels-nvidia-h100-80gb-hbm3.md", "kernels-nvidia-h200.md"), draw_kernels,
                    "Fused loss kernel: speed-up over eager PyTorch and torch.compile, share of the copy rate"),
}


# -- writing and checking -------------------------------------------------------------------------


def digest(name: str, results: Path = RESULTS) -> str:
    h = hashlib.sha256()
    for source in FIGURES[name].sources:
        h.update(source.encode() + b"\0" + (results / source).read_bytes() + b"\0")
    return h.hexdigest()


def render(name: str, results: Path = RESULTS) -> bytes:
    """The SVG of figure ``name`` drawn from the files in ``results``."""
    import matplotlib as mpl

    spec = FIGURES[name]
    missing = [s for s in spec.sources if not (results / s).is_file()]
    if missing:
        raise SystemExit(f"figure {name} reads {', '.join(missing)}, which is not in {results}")
    texts = {s: (results / s).read_text() for s in spec.sources}
    with mpl.rc_context():
        mpl.rcdefaults()
        mpl.rcParams.update(STYLE)
        fig = spec.draw(texts)
        out = io.BytesIO()
        fig.savefig(out, format="svg", metadata={
            "Date": None, "Title": spec.alt,
            "Description": f"drawn by benchmarks/results_figures.py ({name}) from benchmarks/results/"
                           f"{', '.join(spec.sources)}; sha256 {digest(name, results)}"})
    return out.getvalue()


def _meta(svg: bytes, tag: str) -> str:
    m = re.search(rf"<dc:{tag}>(.*?)</dc:{tag}>".encode(), svg, re.S)
    return m.group(1).decode() if m else ""


#: a decimal number of an SVG: a coordinate, a transform, a length
_SVG_DECIMAL = re.compile(rb"-?\d+\.\d+")
#: how far (in the SVG's points) a coordinate of two drawings of the same files may differ: Matplotlib's layout
#: can round the sixth decimal of a text's position differently on another CPU (157.514927 against 157.514928
#: for the kernels figure, the same Matplotlib, numpy and files); a changed number of a results file moves a
#: mark by far more
SVG_TOLERANCE = 1e-3


def same_drawing(a: bytes, b: bytes, tol: float = SVG_TOLERANCE) -> bool:
    """Whether two SVGs draw the same: their text outside the decimal numbers byte for byte, and each
    decimal number within ``tol``."""
    if a == b:
        return True
    if _SVG_DECIMAL.split(a) != _SVG_DECIMAL.split(b):
        return False
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(_SVG_DECIMAL.findall(a), _SVG_DECIMAL.findall(b)))


def stale(figures: Path = FIGURES_DIR, results: Path = RESULTS, names=None) -> list[str]:
    """The figures whose SVG in ``figures`` is not what ``results`` draws now."""
    import matplotlib as mpl

    out = []
    for name in names or FIGURES:
        path = figures / f"{name}.svg"
        if not path.is_file():
            out.append(name)
            continue
        committed = path.read_bytes()
        if same_drawing(committed, render(name, results)):
            continue
        drawn_by = _meta(committed, "creator")
        if f"v{mpl.__version__}," not in drawn_by and _meta(committed, "description").endswith(digest(name, results)):
            continue  # another Matplotlib drew it from these very files
        out.append(name)
    return out


def write(figures: Path = FIGURES_DIR, results: Path = RESULTS) -> list[str]:
    """Draw every figure into ``figures``; the names of those that changed (a figure that is the same drawing,
    :func:`same_drawing`, is left as it is)."""
    figures.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in FIGURES:
        path, svg = figures / f"{name}.svg", render(name, results)
        if not path.is_file() or not same_drawing(path.read_bytes(), svg):
            path.write_bytes(svg)
            changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="list the stale figures and exit 1 instead of drawing")
    ap.add_argument("--out", type=Path, default=FIGURES_DIR, help="where the figures go (default docs/figures)")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale(args.out)
        if problems:
            print("figures that differ from benchmarks/results/ (run python benchmarks/results_tables.py):\n  "
                  + "\n  ".join(f"{args.out / n}.svg" for n in problems))
            return 1
        return 0
    for name in write(args.out):
        print(f"drew {args.out / name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
