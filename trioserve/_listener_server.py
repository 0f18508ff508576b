"""Serving request handlers on any Trio listener."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from ._handlers import BaseRequestHandler
from ._lingering import close_without_reset
from ._listeners import RequestSource
from ._plan import forwarding
from ._server import DEFAULT, BaseServer, _Default
from ._shielding import shieldable_from_first_wait
from ._socketio import socket_under

StreamListener = trio.abc.Listener[trio.abc.Stream]


def peer_address(stream: trio.abc.Stream) -> Any:
    """The address of a stream's peer; None where the stream has no socket."""
    sock = socket_under(stream)
    if sock is None:
        return None
    try:
        return sock.getpeername()
    except OSError:  # gone already: its handler will find out
        return None


class ListenerServer(BaseServer):
    """Serves ``RequestHandlerClass`` on Trio listeners you already have.

    Any :class:`trio.abc.Listener` of :class:`trio.abc.Stream` will do: the
    listeners :func:`trio.open_tcp_listeners` opens, a
    :class:`trio.SSLListener` over them, a listener of your own that hands
    out in-memory streams in tests. Every request is one accepted stream,
    and everything :class:`BaseServer` promises holds: graceful shutdown
    with :attr:`~BaseServer.drain_window` and
    :attr:`~BaseServer.shutdown_timeout`, ``idle_timeout`` and
    ``request_timeout``, the concurrency bounds, the stats, and every hook
    with the meaning it has on :class:`TCPServer`.

    The server does not bind or open anything: the listeners are yours
    until you hand them over, and :meth:`server_close` (or leaving
    ``async with server``) closes them. A connection is closed the way
    :meth:`TCPServer.close_request` closes one, lingering on a socket so
    that it is never reset. ``client_address`` is the peer's address where
    there is a socket under the stream, and None where there is not.

    Args:
      listeners: One listener, or several, all served by one server (one
        concurrency bound, one shutdown, one set of counters).
      RequestHandlerClass: A stream handler, such as a
        :class:`StreamRequestHandler` subclass.
      max_concurrent_requests, max_connections_per_peer, request_timeout,
      idle_timeout, shutdown_timeout, drain_window: As for
        :class:`BaseServer`.
    """

    def __init__(
        self,
        listeners: StreamListener | Sequence[StreamListener],
        RequestHandlerClass: type[BaseRequestHandler],
        *,
        max_concurrent_requests: int | _Default | None = DEFAULT,
        max_connections_per_peer: int | _Default | None = DEFAULT,
        request_timeout: float | _Default | None = DEFAULT,
        idle_timeout: float | _Default | None = DEFAULT,
        shutdown_timeout: float | _Default = DEFAULT,
        drain_window: float | _Default = DEFAULT,
    ) -> None:
        if isinstance(listeners, trio.abc.Listener):
            listeners = [listeners]
        if not listeners:
            raise ValueError("ListenerServer needs at least one listener")
        #: The listeners served, in the order given.
        self.listeners: list[StreamListener] = list(listeners)
        first = socket_under(self.listeners[0])
        super().__init__(
            None if first is None else first.getsockname(),
            RequestHandlerClass,
            max_concurrent_requests=max_concurrent_requests,
            max_connections_per_peer=max_connections_per_peer,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            shutdown_timeout=shutdown_timeout,
            drain_window=drain_window,
        )

    async def _accept(self, listener: StreamListener) -> tuple[Any, Any]:
        stream = await listener.accept()
        return stream, peer_address(stream)

    def _request_sources(self) -> list[RequestSource]:
        sources = [
            RequestSource(partial(self._accept, each)) for each in self.listeners
        ]
        return self._sources_of(self.listeners, sources)

    @forwarding
    async def get_request(
        self, listener: StreamListener | None = None
    ) -> tuple[Any, Any]:
        """Accept a stream; return ``(stream, client_address)``.

        Accepts on ``listener``, by default the first. (With several, the
        server calls this with each; an override must take that argument.)
        """
        return await self._accept(self.listeners[0] if listener is None else listener)

    async def server_close(self) -> None:
        """Close every listener. Idempotent.

        Closing them while :meth:`serve_forever` runs ends accepting, and
        the requests in flight get the shutdown grace period.
        """
        for listener in self.listeners:
            await listener.aclose()

    @shieldable_from_first_wait
    async def close_request(self, request: Any) -> None:
        """Close the stream without resetting the connection (see
        :meth:`TCPServer.close_request`)."""
        # A peer that has already gone cannot take a TLS close_notify; the
        # stream is closed all the same.
        with contextlib.suppress(trio.BrokenResourceError):
            await close_without_reset(request, linger=self.drain_window)
