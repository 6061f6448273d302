"""Progress of long work (merges, statistics, searches), and where library messages go.

Library code never prints. Messages go to the ``alloykit`` loggers
(``logging.getLogger(__name__)``); the CLI shows them on stderr (``show_logs``), and a
program that imports alloykit decides for itself, as with any library. A long loop shows
a ``Progress``: on a terminal a bar redrawn in place at most five times a second; on a
file or pipe (CI logs) one line every few seconds and one at the end.

No dependency: the bar is a few lines here, so it looks the same whether or not tqdm is
installed, and the core imports nothing heavy for it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


class Progress:
    """Done/total of one piece of work, with rate and time left.

    ``total_bytes``: also count bytes (``update(nbytes=...)``) and report GB and MB/s.
    ``log``: send each line to this callback (rate-limited to one per ``every`` seconds)
    instead of drawing on ``stream`` (default stderr). Thread-safe.
    """

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None = None, *, unit: str = "items",
                 total_bytes: int | None = None, enabled: bool = True, stream: TextIO | None = None,
                 every: float | None = None):
        self.what, self.total, self.unit = what, max(int(total), 0), unit
        self.total_bytes = total_bytes
        self.log = log
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = log is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else (0.2 if self.tty else 2.0 if log else 5.0)
        self.done = self.bytes = 0
        self.start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._shown_end = False

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        """``n`` more items (and ``nbytes`` more bytes) done."""
        with self._lock:
            self.done += n
            self.bytes += nbytes
            now = time.monotonic()
            finished = self.done >= self.total
            if self.enabled and (finished or now - self._last >= self.every):
                self._last = now
                self._show(now, finished)

    def close(self) -> None:
        """End the line on a terminal if the work stopped short of its total."""
        with self._lock:
            if self.enabled and self.tty and not self._shown_end and self.done:
                self.stream.write("\n")
                self.stream.flush()
                self._shown_end = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        if self.total_bytes is not None:
            rate = self.bytes / elapsed
            left = (max(self.total_bytes, 1) - self.bytes) / rate if rate > 0 else 0.0
            amount = f" {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB {rate / 1e6:.0f} MB/s"
        else:
            rate = self.done / elapsed
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            amount = f" {rate:.1f} {self.unit}/s"
        bar = ""
        if self.tty:
            filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
            bar = " |" + "#" * filled + " " * (BAR_WIDTH - filled) + "|"
        return (f"{self.what} [{self.done}/{self.total} {self.unit}]{bar}{amount}, "
                f"{elapsed:.0f}s elapsed, ~{max(left, 0.0):.0f}s left")

    def _show(self, now: float, finished: bool) -> None:
        text = self.line(now)
        if self.log is not None:
            self.log(text)
            return
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
            self._shown_end = finished
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record comes (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def show_logs(level: int = logging.INFO) -> None:
    """Show the library's messages on stderr as ``alloykit: MESSAGE`` (what the CLI does)."""
    root = logging.getLogger("alloykit")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("alloykit: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
