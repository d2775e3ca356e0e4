"""The steps both demos (``kdcache demo``, ``kdcache demo --task classification``) take, each
skipped when an earlier run of the demo finished it: a run finished or started, a cache built
once, the comparison made once."""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.core.progress import console
from kdcache.core.runs import RunDir
from kdcache.report.compare import compare_runs
from kdcache.store import CacheStore, StoreError
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

#: the kind of output folder the demos write (:mod:`kdcache.core.outputs`): their runs, caches and
#: comparison are outputs of their own inside it
DEMO = "demo"
CLASSIFICATION_DEMO = "classification-demo"


def run_finished(run: Path, epochs: int) -> bool:
    """A run folder whose last epoch (of ``epochs``) is done."""
    r = RunDir(run)
    if not (r.exists() and r.last.exists()):
        return False
    records = [x for x in r.read_metrics() if "epoch" in x]
    return bool(records) and records[-1]["epoch"] + 1 >= epochs


def run_started(run: Path) -> bool:
    """A run that has a last.pt to resume from."""
    return RunDir(run).last.exists()


def _compared(out: Path, runs: list[Path]) -> dict | None:
    """The comparison an earlier run of the demo wrote in ``out`` (compare.json), if it covers
    ``runs`` and no run's checkpoint is newer: a rerun then reprints it rather than measuring the
    latencies again (a noisy machine would give other numbers for the same runs)."""
    table = out / "compare.json"
    try:
        result = json.loads(table.read_text())
    except (OSError, ValueError):
        return None
    if [r.get("run") for r in result.get("rows", [])] != [str(r) for r in runs]:
        return None
    written = table.stat().st_mtime_ns
    if any(not RunDir(r).best.exists() or RunDir(r).best.stat().st_mtime_ns > written for r in runs):
        return None
    return {**result, "out_dir": str(out)}


def compare_once(runs: list[Path], baseline: Path | None, out: Path, device: str, show_progress: bool) -> dict:
    """The demo's last step: ``compare`` on the test split, or the comparison already written."""
    done = _compared(out, runs)
    if done is not None:
        console.print(f"[dim]compare: done already ({out}; delete it to measure again)[/dim]")
        return done
    console.print("[bold]4/4 compare[/bold] (test split; checkpoints chosen on val)")
    return compare_runs(runs, baseline=baseline, out=out, split="test", device=device, show_progress=show_progress)


def cache_once(out: Path, teacher: Path, what: str, show_progress: bool, topk: int | None = None, **build) -> Path:
    """The store ``out`` built from ``teacher`` (``build``: more CacheBuildConfig fields), unless it is done."""
    done = False
    try:
        done = bool(CacheStore(out).done().all())
    except StoreError:
        pass
    if done:
        console.print(f"[dim]cache: done already ({out})[/dim]")
    else:
        console.print(f"[bold]2/4 teacher cache[/bold] ({what})")
        build_teacher_cache(CacheBuildConfig(weights=str(teacher), out=str(out), topk=topk, **build),
                            show_progress=show_progress)
    return out
