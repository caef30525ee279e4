"""Progress of long work on stderr: live bars on a terminal, plain lines in a log.

On a terminal, rich bars (count, rate, ETA, and a short info such as the training loss) that fit 80 columns.
Anywhere else (CI, nohup, ``2> file``, ``| tee``) bars would be invisible until the end, so each piece of work
prints a plain line when it starts, at most every ``every`` seconds while it runs, and when it ends:
``training: 40/150 steps (27%), 1.92 steps/s, ETA 0:00:57, loss 0.6123 acc 0.75``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

Report = Callable[..., None]
"""Called as ``report(description, done, total, info="", unit=None)``; ``unit`` names what this piece of work counts
when it is not the reporter's own (a loop counts images, and steps while it trains)."""


def clock_text(seconds: float | None) -> str:
    """``H:MM:SS``, or ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LineReporter:
    """Plain progress lines, at most one per ``every`` seconds per piece of work (plus its first and last)."""

    def __init__(self, unit: str, stream: TextIO, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.unit, self.stream, self.every, self.clock = unit, stream, every, clock
        self.started: dict[str, tuple[float, int]] = {}  # description -> (time, done) at its first report
        self.printed: dict[str, float] = {}

    def __call__(self, description: str, done: int, total: int, info: str = "", unit: str | None = None) -> None:
        unit = unit or self.unit
        now = self.clock()
        start, first_done = self.started.setdefault(description, (now, done))
        finished = done >= total
        if description in self.printed and not finished and now - self.printed[description] < self.every:
            return
        if finished and self.printed.get(description) == -1.0:
            return  # its last line is out already
        self.printed[description] = -1.0 if finished else now
        rate = (done - first_done) / (now - start) if now > start and done > first_done else None
        eta = 0.0 if finished else ((total - done) / rate if rate else None)
        percent = f" ({100 * done // total}%)" if total else ""
        speed = f"{rate:.2f} {unit}/s" if rate else f"- {unit}/s"
        line = f"{description}: {done}/{total} {unit}{percent}, {speed}, ETA {clock_text(eta)}"
        print(line + (f", {info}" if info else ""), file=self.stream, flush=True)


def bar_columns(unit: str) -> tuple:
    """The rich columns of a bar: description, bar, count, rate, ETA, info (fits 80 columns with a short
    description and an info of ~20 characters)."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second, named after the unit being counted (the task's own, if it has one)."""

        def render(self, task) -> Text:
            speed, counted = task.finished_speed or task.speed, task.fields.get("unit") or unit
            return Text(f"{speed:.2f} {counted}/s" if speed else f"- {counted}/s", style="progress.data.speed")

    return (TextColumn("{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(), RateColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


@contextlib.contextmanager
def progress_output(unit: str, visible: bool = True, stream: TextIO | None = None) -> Iterator[Report]:
    """A ``report`` callable for long work: bars on a terminal, plain lines otherwise, nothing when not
    ``visible`` (processes other than the main one). Bars are created on first report, so nothing is drawn
    when a run fails before its work starts."""
    stream = stream or sys.stderr
    if not visible:
        yield lambda *args, **kwargs: None
        return
    if not stream.isatty():
        yield LineReporter(unit, stream)
        return
    from rich.console import Console
    from rich.progress import Progress, TaskID

    with Progress(*bar_columns(unit), console=Console(file=stream)) as bar:
        tasks: dict[str, TaskID] = {}

        def report(description: str, done: int, total: int, info: str = "", unit: str | None = None) -> None:
            if description not in tasks:  # starting at the first count: work skipped on resuming is no speed
                tasks[description] = bar.add_task(description, total=total, completed=done, info=info, unit=unit)
            bar.update(tasks[description], completed=done, total=total, info=info)

        yield report
