"""Progress of long work: counts, rate and ETA, for the CLI and for status.

One implementation serves every job: `advance()` counts, `snapshot()` gives the
figures that go into status, and on a terminal a single line is redrawn
(elsewhere, a log line every few seconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Snapshot:
    """Figures at one moment."""

    done: int
    total: int | None
    rate: float  # units per second over the whole run
    eta_seconds: int | None
    elapsed: float

    @property
    def percent(self) -> float | None:
        return None if not self.total else min(100.0, 100.0 * self.done / self.total)


def eta(done: int, total: int | None, rate: float) -> int | None:
    """Seconds left at the current rate, or None when unknown."""
    if total is None or rate <= 0:
        return None
    return max(0, int((total - done) / rate))


class Progress:
    """Counts units of work and reports them at most every `interval` seconds."""

    def __init__(self, label: str, *, stream: TextIO | None = None, unit: str = "rows", interval: float = 1.0) -> None:
        self.label = label
        self.stream = stream
        self.unit = unit
        self.tty = bool(stream and stream.isatty())
        self.interval = interval if self.tty else max(interval, 5.0)
        self.total: int | None = None
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0

    def start(self, total: int | None) -> None:
        self.total = total
        self._start = time.monotonic()
        self._emit(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._emit()

    def snapshot(self) -> Snapshot:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        return Snapshot(self.done, self.total, rate, eta(self.done, self.total, rate), elapsed)

    def line(self) -> str:
        s = self.snapshot()
        of = f"/{s.total}" if s.total is not None else ""
        pct = f" {s.percent:5.1f}%" if s.percent is not None else ""
        left = f" ETA {s.eta_seconds}s" if s.eta_seconds is not None else ""
        return f"{self.label}: {s.done}{of} {self.unit}{pct} {s.rate:,.0f} {self.unit}/s{left}"

    def _emit(self, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.stream.write(("\r" + self.line() + "\033[K") if self.tty else self.line() + "\n")
        self.stream.flush()

    def finish(self, outcome: str) -> None:
        if self.stream is None:
            return
        self.stream.write(("\r" if self.tty else "") + f"{self.line()} - {outcome}\n")
        self.stream.flush()
