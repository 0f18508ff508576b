"""The signal that tells idle connections a graceful shutdown has begun."""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable

import trio

from ._readiness import ReadinessWatcher
from ._socketio import readable_within
from ._stats import ServerStats


class ShutdownSignal:
    """Lets readers that wait between messages leave promptly at shutdown.

    A reader waiting for the first byte of a new message waits inside a
    cancel scope from :meth:`open_wait_scope` (the signal is the
    ``WaitScopes`` of ``receive_when_ready``). When :meth:`start` begins the
    shutdown, each of those scopes gets a deadline ``drain_window`` seconds
    away, and so does every idle wait that begins later: a message already
    on its way (a keep-alive client sends its next request the moment it has
    the last reply, so under load almost every connection is "idle" with a
    request in flight) still arrives and is served, and a connection with
    nothing on its way sees end-of-stream once the window is over. A reader
    in the middle of a message opens no idle scope, so it keeps the whole
    grace period.

    Where the platform allows, readers of the server's plain sockets park
    their waits with the signal's :attr:`watcher` instead, which keeps the
    same deadlines without a scope per wait.
    """

    __slots__ = ("_idle_scopes", "_stats", "drain_deadline", "drain_window", "watcher")

    def __init__(self, drain_window: float, stats: ServerStats) -> None:
        #: Seconds idle connections get, once shutdown starts, for a message
        #: already on its way.
        self.drain_window = drain_window
        #: When idle waits end: never until :meth:`start`.
        self.drain_deadline = math.inf
        self._stats = stats
        # The idle waits that began before start(), to be given its deadline.
        self._idle_scopes: set[trio.CancelScope] = set()
        #: Where waits on plain sockets park while a serving runs (the
        #: server starts and stops it), if the platform has what it needs.
        self.watcher = ReadinessWatcher(stats) if ReadinessWatcher.supported() else None

    @property
    def started(self) -> bool:
        """Whether the shutdown has begun."""
        return self.drain_deadline != math.inf

    def start(self) -> None:
        """Begin the shutdown: every idle wait ends within ``drain_window``."""
        if self.started:
            return
        self.drain_deadline = deadline = trio.current_time() + self.drain_window
        for scope in self._idle_scopes:
            scope.deadline = min(scope.deadline, deadline)
        self._idle_scopes.clear()
        if self.watcher is not None:
            self.watcher.drain(deadline)

    def readable(self, sock: socket.socket) -> Awaitable[bool]:
        """An idle wait for ``sock``: True once readable; False if drain ended it."""
        watcher = self.watcher
        if watcher is not None and watcher.running:
            return watcher.wait_readable(sock, math.inf, idle=True)
        return readable_within(sock, self)

    def open_wait_scope(self) -> trio.CancelScope:
        """A cancel scope for one idle wait, ended ``drain_window`` after start.

        The caller must hand it back with :meth:`close_wait_scope` once its
        wait is over, so that the set of idle waits stays bounded. Whether
        the scope ended the wait is ``scope.cancelled_caught``.
        """
        scope = trio.CancelScope(deadline=self.drain_deadline)
        if not self.started:
            self._idle_scopes.add(scope)
        self._stats.idle += 1
        return scope

    def close_wait_scope(self, scope: trio.CancelScope) -> None:
        """Hand back a scope from :meth:`open_wait_scope`: its wait is over."""
        self._idle_scopes.discard(scope)
        self._stats.idle -= 1
