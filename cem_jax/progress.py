"""A small text progress bar (steps/s and ETA) for long loops; writes to a stream, reads no flags."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1:02:05'``; ``65`` -> ``'1:05'``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``desc [#####-----] 120/390 12.3 steps/s ETA 0:21``, redrawn in place on a terminal.

    Off a terminal (CI logs, files) it prints a line every ``log_every`` fraction of the loop or
    every ``log_seconds``, whichever comes first, so logs stay short but never go silent.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        width: int = 24,
        log_every: float = 0.25,
        log_seconds: float = 30.0,
        unit: str = "steps",
    ) -> None:
        self.total = max(1, total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.unit = unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self._next_log = log_every
        self.log_seconds = log_seconds
        self._last_log = time.perf_counter()
        self._start = time.perf_counter()
        self._first_done: float | None = None
        self.count = 0
        self.extra = ""

    def rate(self) -> float:
        """Steps per second, excluding the first step (which includes compilation)."""
        if self._first_done is None or self.count < 2:
            return 0.0
        return (self.count - 1) / max(1e-9, time.perf_counter() - self._first_done)

    def update(self, n: int = 1, extra: str = "") -> None:
        self.count += n
        if self._first_done is None:
            self._first_done = time.perf_counter()
        self.extra = extra
        frac = self.count / self.total
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        elif (
            frac + 1e-9 >= self._next_log
            or self.count == self.total
            or time.perf_counter() - self._last_log >= self.log_seconds
        ):
            while self._next_log <= frac + 1e-9:
                self._next_log += self.log_every
            self._last_log = time.perf_counter()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        frac = min(1.0, self.count / self.total)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        rate = self.rate()
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        eta_s = format_duration(eta) if eta == eta else "?"
        parts = [
            f"{self.desc} [{bar}] {self.count}/{self.total}",
            f"{rate:.2f} {self.unit}/s",
            f"ETA {eta_s}",
        ]
        if self.extra:
            parts.append(self.extra)
        return " ".join(parts)

    def close(self) -> float:
        """Ends the line; returns the elapsed seconds."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return time.perf_counter() - self._start
