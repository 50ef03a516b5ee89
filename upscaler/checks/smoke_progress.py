"""Progress of a smoke test's scoring on a terminal: tokens scored of total, elapsed, estimate."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ScoringProgress:
    """``progress(label, done, total)`` for :func:`upscaler.checks.smoke.run_smoke`; one bar per model.

    Fits 80 columns: "scoring model  ━━━━━━━━━━━━━━━━━━━━  512/1024 tokens 0:00:05 ETA 0:00:05".
    The bar is transient; call :meth:`close` (run_smoke's caller does, through ``with``).
    """

    def __init__(self) -> None:
        self._p: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if self._p is None:
            self._p = Progress(TextColumn("scoring {task.description:<9}"), BarColumn(bar_width=20),
                               MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(),
                               TextColumn("ETA"), TimeRemainingColumn(),
                               console=Console(stderr=True), transient=True)
            self._p.start()
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._p.add_task(label, total=total)
        self._p.update(task, completed=done, total=total)
        if done >= total and all(t.finished for t in self._p.tasks):
            self.close()

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
            self._tasks = {}
