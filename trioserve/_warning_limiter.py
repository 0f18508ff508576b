"""Warnings that a flood of bad input cannot turn into a flood of log lines.

A datagram costs its sender nothing: one that is logged costs the server a
log record, formatted and written. A limiter lets one warning through per
interval and counts the rest, so that a peer sending bad datagrams as fast
as it can neither fills the log nor takes the server's time from the
clients it serves. The same holds for connections refused for a bad PROXY
header, and for an accept loop that keeps failing because the process is
out of file descriptors. The server's counters
(:class:`~trioserve.ServerStats`) still count every one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio


class WarningLimiter:
    """Logs at most one message per ``interval`` seconds of Trio's clock.

    A message logged after others were held back says how many.
    """

    __slots__ = ("_held_back", "_next_allowed", "interval", "logger")

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._next_allowed = -math.inf
        self._held_back = 0

    def warning(self, message: str, *args: Any) -> None:
        """Log ``message % args`` at WARNING, unless one went out too recently."""
        self._log(logging.WARNING, message, args)

    def error(self, message: str, *args: Any) -> None:
        """Log ``message % args`` at ERROR, unless one went out too recently."""
        self._log(logging.ERROR, message, args)

    def _log(self, level: int, message: str, args: tuple[Any, ...]) -> None:
        now = trio.current_time()
        if now < self._next_allowed:
            self._held_back += 1
            return
        self._next_allowed = now + self.interval
        if self._held_back:
            message += " (%d more like it since the last one were not logged)"
            args = (*args, self._held_back)
            self._held_back = 0
        # The record names the caller of warning() or error(), not this.
        self.logger.log(level, message, *args, stacklevel=3)
