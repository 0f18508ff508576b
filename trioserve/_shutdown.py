"""The signal that tells idle connections a graceful shutdown has begun."""

from __future__ import annotations

import contextlib
import socket

import trio


class ShutdownSignal:
    """Lets readers that wait between messages leave as soon as shutdown starts.

    A reader waiting for the first byte of a new message says so, and
    :meth:`start` makes it see end-of-stream: a reader on a plain socket puts
    the socket in :attr:`idle_sockets`, and :meth:`start` shuts the socket's
    receiving side down, which wakes the reader with end-of-stream at the
    cost of a set insertion per wait; any other reader registers the cancel
    scope around its receive with :meth:`open_idle_scope`, and :meth:`start`
    cancels it. A reader in the middle of a message does neither, so it
    keeps its grace period.
    """

    __slots__ = ("_idle_scopes", "idle_sockets", "started")

    def __init__(self) -> None:
        self.started = False
        #: The sockets whose readers wait between messages right now.
        self.idle_sockets: set[socket.socket] = set()
        self._idle_scopes: set[trio.CancelScope] = set()

    def start(self) -> None:
        """Begin the shutdown: end every idle wait, now and from now on."""
        self.started = True
        for sock in self.idle_sockets:
            # The peer may have closed it already; then there is no wait left.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        self.idle_sockets.clear()
        for scope in self._idle_scopes:
            scope.cancel()
        self._idle_scopes.clear()

    def open_idle_scope(self) -> trio.CancelScope:
        """Return a cancel scope that :meth:`start` cancels.

        The caller must hand it back with :meth:`close_idle_scope` once its
        wait is over, so that the set of idle waits stays bounded.
        """
        scope = trio.CancelScope()
        if self.started:
            scope.cancel()
        else:
            self._idle_scopes.add(scope)
        return scope

    def close_idle_scope(self, scope: trio.CancelScope) -> None:
        self._idle_scopes.discard(scope)
