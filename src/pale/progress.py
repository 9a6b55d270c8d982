"""Progress reports that suit where stderr goes: a tqdm bar on a terminal, and a plain line every few
seconds anywhere else (a log file, CI), where a bar's carriage-return updates would fill the log with
one line per step.

    for batch in progress(loader, desc="eval"):
        ...
    bar = progress(total=n, desc="epoch 1/10", unit="update")
    bar.update(1); bar.set_postfix(loss="0.51"); bar.close()
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

__all__ = ["LineProgress", "progress", "log"]

#: seconds between two lines of :class:`LineProgress` (environment variable ``PALE_PROGRESS_INTERVAL``
#: overrides it, e.g. 0 for a line per step)
LINE_INTERVAL = 10.0


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` / iteration, reported as a plain line at most
    every ``interval`` seconds (and once at the end, unless the last line already showed it, when a line
    was printed or the work took that long). A line shows the postfix set before its ``update``."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float = LINE_INTERVAL, file: Optional[TextIO] = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file = interval, file
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.lines = 0
        self.emitted_n: Optional[int] = None
        self.closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{head}{done} {self.unit}{pct}, {elapsed:.0f} s{tail}"

    def _emit(self) -> None:
        print(self._line(), file=self.file or sys.stderr, flush=True)
        self.lines += 1
        self.emitted_n = self.n
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.emitted_n != self.n and \
                (self.lines or time.monotonic() - self.started >= self.interval):
            self._emit()
        self.closed = True

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(LineProgress):
    def _emit(self) -> None:
        pass


def progress(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", initial: int = 0, enabled: bool = True, leave: bool = False,
             interval: Optional[float] = None) -> Any:
    """A progress report over ``iterable`` (or for ``total`` steps counted with ``update``):
    a tqdm bar when stderr is a terminal, a :class:`LineProgress` otherwise (a line every ``interval``
    seconds, default ``PALE_PROGRESS_INTERVAL`` or 10), nothing when not ``enabled``."""
    if not enabled:
        return _Silent(iterable, total, desc, unit, initial)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    if interval is None:
        interval = float(os.environ.get("PALE_PROGRESS_INTERVAL", LINE_INTERVAL))
    return LineProgress(iterable, total, desc, unit, initial, interval)


def log(text: str) -> None:
    """One line on stderr that does not break a tqdm bar drawn there."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)
