"""Progress for people (a rich bar on a terminal), silence for pipes and scripts."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column

from .planning.output import OutTensor


class BarProgress:
    """Bytes and tensors written, on one line that fits the terminal; shown only when stderr is a terminal.

    One task counts bytes (size, speed, time left); the tensor count is a plain field of it, so it
    is never labelled or rated as bytes. The bar takes whatever width the other columns leave.
    """

    def __init__(self, label: str = "writing", enabled: bool | None = None, console: Console | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.console = console
        self.label = label
        self._p: Progress | None = None
        self._task: TaskID | None = None
        self._total_tensors = 0
        self._done_tensors = 0

    def _tensor_text(self) -> str:
        return f"{self._done_tensors}/{self._total_tensors} tensors"

    def start(self, total_bytes: int, total_tensors: int) -> None:
        if not self.enabled:
            return
        self._total_tensors, self._done_tensors = total_tensors, 0
        self._p = Progress(TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                           BarColumn(bar_width=None, table_column=Column(min_width=8, ratio=1)),
                           DownloadColumn(table_column=Column(no_wrap=True)),
                           TransferSpeedColumn(table_column=Column(no_wrap=True)),
                           TimeRemainingColumn(table_column=Column(no_wrap=True)),
                           TextColumn("{task.fields[tensors]}", table_column=Column(no_wrap=True)),
                           console=self.console or Console(stderr=True), transient=True, expand=True)
        self._p.start()
        self._task = self._p.add_task(self.label, total=total_bytes, tensors=self._tensor_text())

    def advance(self, tensor: OutTensor, n_bytes: int) -> None:
        if self._p is None or self._task is None:
            return
        self._done_tensors += 1
        self._p.update(self._task, advance=n_bytes, tensors=self._tensor_text())

    def finish(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
