"""Rich progress bars for every long step (they fall back to nothing when disabled)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task, unit: str):
        self.progress = progress
        self.task = task
        self.unit = unit
        self.start = time.perf_counter()
        self.done = 0
        self.info = ""

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        if fields:
            self.info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if self.progress is not None:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.progress.update(self.task, advance=n, info=f"{self.info}  {rate:.1f} {self.unit}/s")

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, unit: str = "img"):
    """``with progress_bar("train", total=n) as bar: bar.advance(k, loss=0.3)``."""
    if not enabled:
        yield _Bar(None, None, unit)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task, unit)
