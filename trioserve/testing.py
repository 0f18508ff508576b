"""Test request handlers without sockets: servers whose clients are in memory.

:class:`MemoryStreamServer` and :class:`MemoryDatagramServer` are servers
like :class:`~trioserve.TCPServer` and :class:`~trioserve.UDPServer`, with
the same request lifecycle, limits, timeouts, stats and graceful shutdown,
because they are :class:`~trioserve.BaseServer`\\ s that take their requests
from memory instead of a socket: a connection is one end of
:func:`trio.testing.memory_stream_pair`, a datagram is bytes handed to
:meth:`MemoryDatagramServer.send`. Nothing touches the network or the
clock, so a test runs under :func:`trio.testing.MockClock` (pytest-trio's
``autojump_clock``) and tests an hour of timeouts in no real time.

:func:`serve_streams` and :func:`serve_datagrams` run one for the length of
an ``async with`` block::

    async with trioserve.testing.serve_streams(Upper, idle_timeout=30) as server:
        client = await server.connect()
        await client.send_all(b"hi\\n")
        assert await client.receive_some() == b"HI\\n"
    assert server.stats.completed == 1

:class:`MemoryListener` is the in-memory :class:`trio.abc.Listener` the
stream server accepts from; it serves any code that takes a Trio listener.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio
import trio.testing

from ._handlers import BaseRequestHandler
from ._server import BaseServer

__all__ = [
    "MemoryDatagramServer",
    "MemoryListener",
    "MemoryStreamServer",
    "serve_datagrams",
    "serve_streams",
]

_ServerT = TypeVar("_ServerT", bound=BaseServer)

#: Makes a connected pair of streams: ``(client end, server end)``.
StreamPairFactory = Callable[
    [], tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
]

#: The host the in-memory clients come from, unless a test says otherwise.
CLIENT_HOST = "127.0.0.1"


def _client_addresses() -> Iterator[tuple[str, int]]:
    """A new address for each client: one host, as on loopback; its own port."""
    return ((CLIENT_HOST, port) for port in itertools.count(1))


@attrs.define(eq=False)
class MemoryListener(trio.abc.Listener[trio.abc.HalfCloseableStream]):
    """A :class:`trio.abc.Listener` whose connections are in memory.

    :meth:`connect` makes a pair of streams (by default with
    :func:`trio.testing.memory_stream_pair`), queues the server's end for
    :meth:`accept`, as a listen backlog would, and returns the client's.
    Any code that serves a Trio listener can serve this one.

    Args:
      stream_pair: Makes the ``(client, server)`` pair for each connection:
        :func:`trio.testing.memory_stream_pair` (the default), or
        :func:`trio.testing.lockstep_stream_pair` for streams without
        buffering, where every send waits for its receive.
    """

    stream_pair: StreamPairFactory = trio.testing.memory_stream_pair
    _backlog: tuple[
        trio.MemorySendChannel[tuple[trio.abc.HalfCloseableStream, Any]],
        trio.MemoryReceiveChannel[tuple[trio.abc.HalfCloseableStream, Any]],
    ] = attrs.field(
        init=False,
        factory=lambda: trio.open_memory_channel[
            tuple[trio.abc.HalfCloseableStream, Any]
        ](math.inf),
    )

    async def connect(self, client_address: Any = None) -> trio.abc.HalfCloseableStream:
        """Connect a client; return its end of the connection.

        ``client_address`` goes with the server's end, for
        :meth:`accept_with_address`.

        Raises:
          ConnectionRefusedError: the listener is closed.
        """
        client, server = self.stream_pair()
        try:
            self._backlog[0].send_nowait((server, client_address))
        except trio.ClosedResourceError:
            raise ConnectionRefusedError("the listener is closed") from None
        await trio.lowlevel.checkpoint()
        return client

    async def accept(self) -> trio.abc.HalfCloseableStream:
        """Wait for the next connection; return the server's end of it.

        Raises:
          trio.ClosedResourceError: the listener is closed.
        """
        stream, _ = await self.accept_with_address()
        return stream

    async def accept_with_address(self) -> tuple[trio.abc.HalfCloseableStream, Any]:
        """:meth:`accept`, with the ``client_address`` given to :meth:`connect`."""
        try:
            return await self._backlog[1].receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            raise trio.ClosedResourceError("the listener is closed") from None

    async def aclose(self) -> None:
        """Close the listener, and the connections it has not handed on."""
        send, receive = self._backlog
        send.close()
        waiting = []
        while True:
            try:
                waiting.append(receive.receive_nowait()[0])
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        receive.close()
        for stream in waiting:
            await trio.aclose_forcefully(stream)
        await trio.lowlevel.checkpoint()


class MemoryStreamServer(BaseServer):
    """A stream server whose connections come from :meth:`connect`, in memory.

    A :class:`~trioserve.BaseServer` that accepts from a
    :class:`MemoryListener`: serve it as any server (``async with``, then
    :meth:`~trioserve.BaseServer.serve_forever` in a nursery, or
    :meth:`~trioserve.BaseServer.handle_request`), or with
    :func:`serve_streams`. A :class:`~trioserve.StreamRequestHandler`'s
    ``connection`` is the server's end of the pair, and its ``rfile`` keeps
    the server's rules (``idle_timeout``, shutdown's ``drain_window``).
    Closing a request closes the server's end: the client reads what the
    handler wrote, then end-of-stream. What a :class:`~trioserve.TCPServer`
    adds to that on sockets (TLS, the PROXY protocol, a lingering close) is
    for tests with sockets.

    Args:
      RequestHandlerClass: The handler to test.
      stream_pair: See :class:`MemoryListener`.
      options: The :class:`~trioserve.BaseServer` options
        (``max_concurrent_requests``, ``idle_timeout``, ``shutdown_timeout``,
        ...).
    """

    def __init__(
        self,
        RequestHandlerClass: type[BaseRequestHandler],
        *,
        stream_pair: StreamPairFactory = trio.testing.memory_stream_pair,
        **options: Any,
    ) -> None:
        super().__init__("memory", RequestHandlerClass, **options)
        #: The listener the server accepts from.
        self.listener = MemoryListener(stream_pair)
        self._client_addresses = _client_addresses()

    async def connect(self, client_address: Any = None) -> trio.abc.HalfCloseableStream:
        """Connect a client; return its end of the connection.

        The connection waits, as in a listen backlog, until the server
        accepts it. The handler sees ``client_address``; by default
        ``("127.0.0.1", n)``, with a new ``n`` for each connection.

        Raises:
          ConnectionRefusedError: the server is closed.
        """
        if client_address is None:
            client_address = next(self._client_addresses)
        return await self.listener.connect(client_address)

    async def get_request(self) -> tuple[Any, Any]:
        """Accept the next connection: ``(server's stream, client_address)``."""
        return await self.listener.accept_with_address()

    async def close_request(self, request: Any) -> None:
        """Close the server's end of the connection."""
        await request.aclose()

    async def server_close(self) -> None:
        """Close the listener; connections not yet accepted are closed."""
        await self.listener.aclose()


@attrs.define(eq=False)
class _ReplySocket(trio.socket.SocketType):
    """The socket of one in-memory datagram: keeps what is sent on it.

    Its ``sendto`` neither waits nor looks at cancellation, as a datagram
    handler's ``finish()`` needs of a socket (see ``send_datagram``).
    """

    address: Any
    sent: list[tuple[bytes, Any]] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)

    def __attrs_post_init__(self) -> None:
        super().__init__()

    def getsockname(self) -> Any:
        return self.address

    async def sendto(self, data: Any, *args: Any) -> int:
        # sendto(data, address) or sendto(data, flags, address).
        data = bytes(data)
        self.sent.append((data, args[-1]))
        return len(data)


class MemoryDatagramServer(BaseServer):
    """A datagram server whose datagrams come from :meth:`send`, in memory.

    A :class:`~trioserve.BaseServer`; serve it as any server, or with
    :func:`serve_datagrams`. A :class:`~trioserve.DatagramRequestHandler`
    sees the datagram as ``packet``, and its ``socket`` is a stand-in that
    keeps what the handler sends.

    Args:
      RequestHandlerClass: The handler to test.
      options: The :class:`~trioserve.BaseServer` options.
    """

    # As a UDPServer does.
    _runs_requests_in_place = True

    def __init__(
        self, RequestHandlerClass: type[BaseRequestHandler], **options: Any
    ) -> None:
        super().__init__("memory", RequestHandlerClass, **options)
        self._datagrams = trio.open_memory_channel[tuple[Any, Any]](math.inf)
        self._client_addresses = _client_addresses()

    async def send(self, data: bytes, client_address: Any = None) -> list[bytes]:
        """Hand the server one datagram; return the replies, once it is handled.

        The replies are the datagrams its request sent to ``client_address``
        (a :class:`~trioserve.DatagramRequestHandler` sends one, or none if
        it wrote nothing), returned when the request is over: handled,
        refused by ``verify_request``, failed, or cancelled. The datagram
        waits until the server takes it, as in a socket's buffer. By default
        ``client_address`` is ``("127.0.0.1", n)``, with a new ``n`` for
        each datagram.

        Raises:
          ConnectionRefusedError: the server is closed.
        """
        if client_address is None:
            client_address = next(self._client_addresses)
        sock = _ReplySocket(self.server_address)
        try:
            self._datagrams[0].send_nowait(((bytes(data), sock), client_address))
        except trio.ClosedResourceError:
            raise ConnectionRefusedError("the server is closed") from None
        await sock.done.wait()
        return [reply for reply, address in sock.sent if address == client_address]

    async def get_request(self) -> tuple[Any, Any]:
        """Take the next datagram: ``((data, socket), client_address)``."""
        try:
            return await self._datagrams[1].receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            raise trio.ClosedResourceError("the server is closed") from None

    async def close_request(self, request: Any) -> None:
        """The datagram's request is over: its :meth:`send` returns."""
        request[1].done.set()

    async def server_close(self) -> None:
        """Stop taking datagrams; those not yet taken get no reply."""
        send, receive = self._datagrams
        send.close()
        while True:
            try:
                request, _ = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            request[1].done.set()
        receive.close()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def _serving(server: _ServerT) -> AsyncIterator[_ServerT]:
    """Serve ``server`` in the background for the block; shut it down after."""
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        try:
            yield server
        finally:
            await server.shutdown()


def serve_streams(
    RequestHandlerClass: type[BaseRequestHandler],
    *,
    stream_pair: StreamPairFactory = trio.testing.memory_stream_pair,
    **options: Any,
) -> AbstractAsyncContextManager[MemoryStreamServer]:
    """Serve a stream handler in memory for the length of an ``async with``.

    Yields a :class:`MemoryStreamServer`, serving: connect clients with
    :meth:`~MemoryStreamServer.connect`, read :attr:`~trioserve.BaseServer.stats`,
    call :meth:`~trioserve.BaseServer.shutdown`. When the block ends the server shuts
    down gracefully, as :meth:`~trioserve.BaseServer.shutdown` does (requests still
    running get ``shutdown_timeout``), and closes. ``options`` are the
    :class:`~trioserve.BaseServer` options.
    """
    return _serving(
        MemoryStreamServer(RequestHandlerClass, stream_pair=stream_pair, **options)
    )


def serve_datagrams(
    RequestHandlerClass: type[BaseRequestHandler], **options: Any
) -> AbstractAsyncContextManager[MemoryDatagramServer]:
    """Serve a datagram handler in memory for the length of an ``async with``.

    Yields a :class:`MemoryDatagramServer`, serving: hand it datagrams with
    :meth:`~MemoryDatagramServer.send`, which returns the replies. Shuts
    down and closes as :func:`serve_streams` does.
    """
    return _serving(MemoryDatagramServer(RequestHandlerClass, **options))
