"""The signal that tells idle connections a graceful shutdown has begun."""

from __future__ import annotations

import trio


class ShutdownSignal:
    """Lets readers that wait between messages leave as soon as shutdown starts.

    A reader waiting for the first byte of a new message registers the cancel
    scope around its receive with :meth:`open_idle_scope`; :meth:`start`
    cancels every such scope, and the reader reports end-of-stream. A reader
    in the middle of a message never registers, so it keeps its grace period.
    """

    __slots__ = ("_idle_scopes", "started")

    def __init__(self) -> None:
        self.started = False
        self._idle_scopes: set[trio.CancelScope] = set()

    def start(self) -> None:
        """Begin the shutdown: cancel every idle wait, now and from now on."""
        self.started = True
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
