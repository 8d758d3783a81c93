"""Progress bars for long CLI work (rich), driven by ``callback(done, total)``."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "cases") -> Iterator[Callable[[int, int], None]]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    # The bar is drawn from the first update on, so work that fails before it starts (a
    # missing dataset, say) prints its one-line error without an empty "0/?" bar above it.
    bar = Progress(*columns, transient=False)
    task = bar.add_task(description, total=None, rate="")

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        elapsed = bar.tasks[task].elapsed or 0.0
        rate = f"{done / elapsed:.1f} {unit}/s" if elapsed > 0 else ""
        bar.update(task, completed=done, total=total, rate=rate)

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()
