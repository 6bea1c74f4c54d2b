"""Progress bars on stderr in one style for every command: what runs, how many of how many, the time left."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: one message stays one line

Advance = Callable[[int, int], None]  # (done, total)


def progress_bars(disable: bool = False) -> Progress:
    """Bars with a description, a count and a free text field `info` per bar; messages printed on CONSOLE while
    they run appear above them."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),  # a log file gets 80 columns: the count and the info must fit beside the bar
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=CONSOLE,
        disable=disable,
    )


@contextmanager
def progress(description: str, info: str = "") -> Iterator[Advance]:
    """A bar for the duration of the block, shown from the first report on (a process that reports nothing shows
    none); yields the function that sets how many of how many are done."""
    bars = progress_bars()
    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bars.start()
            bar = bars.add_task(description, total=total, info=info)
        bars.update(bar, completed=done, total=total)

    try:
        yield advance
    finally:
        if bar is not None:
            bars.stop()
