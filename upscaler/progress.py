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

from .output import OutTensor


class BarProgress:
    """Bytes and tensors written; shown only when stderr is a terminal."""

    def __init__(self, label: str = "writing", enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label = label
        self._p: Progress | None = None
        self._bytes: TaskID | None = None
        self._tensors: TaskID | None = None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        if not self.enabled:
            return
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=True)
        self._p.start()
        self._bytes = self._p.add_task(self.label, total=total_bytes)
        self._tensors = self._p.add_task("tensors", total=total_tensors)

    def advance(self, tensor: OutTensor, n_bytes: int) -> None:
        if self._p is None or self._bytes is None or self._tensors is None:
            return
        self._p.update(self._bytes, advance=n_bytes, description=f"{self.label} {tensor.name}")
        self._p.update(self._tensors, advance=1)

    def finish(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None



