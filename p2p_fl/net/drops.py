"""Counting and logging the messages a transport drops: every drop counted (result.json's
`dropped`), a few lines per reason and window logged, then one summary line."""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger(__name__)

LOG_FIRST = 5  # lines per drop reason and window; the rest go into the window's summary line
LOG_WINDOW_S = 10.0


class DropLog:
    """Counts every drop in `counter`; logs the first LOG_FIRST per reason and window, then
    one summary line per window with the counts. Thread-safe (the ZAP handler and the
    watcher count from their own threads)."""

    def __init__(self, node: str, counter: collections.Counter, window_s: float = LOG_WINDOW_S, first: int = LOG_FIRST,
                 now: float | None = None):
        self.node = node
        self.counter = counter
        self.window_s = window_s
        self.first = first
        self._lock = threading.Lock()
        self._window: collections.Counter[str] = collections.Counter()
        self._logged: collections.Counter[str] = collections.Counter()
        self._start = time.monotonic() if now is None else now

    def drop(self, reason: str, detail: str | None, now: float | None = None) -> None:
        """Counts one drop; logs `detail` unless this window logged enough of `reason` (or it is None)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.counter[reason] += 1
            line = detail is not None and self._logged[reason] < self.first
            if line:
                self._logged[reason] += 1
            self._window[reason] += 1
            summary = self._close_window(now)
        if line:
            log.warning("%s: dropped message (%s): %s", self.node, reason, detail)
        if summary:
            log.warning("%s", summary)

    def tick(self, now: float | None = None, force: bool = False) -> None:
        """Logs the summary of a window that is over (or of the current one, with `force`)."""
        with self._lock:
            summary = self._close_window(time.monotonic() if now is None else now, force)
        if summary:
            log.warning("%s", summary)

    def _close_window(self, now: float, force: bool = False) -> str | None:
        elapsed = now - self._start
        if elapsed < self.window_s and not force:
            return None
        total = sum(self._window.values())
        silent = total - sum(self._logged.values())
        summary = None
        if silent > 0:  # a window whose drops were all logged needs no summary
            counts = ", ".join(f"{reason} {n:,}" for reason, n in self._window.most_common())
            summary = f"{self.node}: dropped {total:,} messages or connections ({counts}) in the last {elapsed:.0f} s"
        self._window.clear()
        self._logged.clear()
        self._start = now
        return summary
