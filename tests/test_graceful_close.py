"""The races at a graceful shutdown and at every close, one deterministic test each.

A keep-alive client sends its next request the moment it has the last
reply, so the server sees a busy connection as idle for a network round
trip; a shutdown lands in that gap all the time. These tests stage each
case: a message already in the server's socket when shutdown starts, one
that arrives within the drain window, one that arrives after it, and a
reply written just before the close while the client is still sending.
The client must see its message served, or a clean end-of-stream; never a
reset, never a reply cut short.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from support import servers
from support.servers import Echo

import trioserve

IO_TIMEOUT = 10


@pytest.fixture(scope="module", name="tls_contexts")
def tls_contexts_fixture() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return servers.tls_contexts()


@asynccontextmanager
async def serving(server: trioserve.TCPServer) -> AsyncIterator[trio.Nursery]:
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        yield nursery
        await server.shutdown()


class Client:
    """A blocking client socket, speaking TLS through memory BIOs if asked.

    Messages are encrypted before they are sent, so a test can put a whole
    request into the server's socket with one synchronous ``sendall``,
    between two of the server's checkpoints.
    """

    def __init__(
        self, server: trioserve.TCPServer, client_context: ssl.SSLContext | None
    ) -> None:
        address = server.server_address
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(address)
        self._tls: ssl.SSLObject | None = None
        if client_context is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = client_context.wrap_bio(
                self._incoming, self._outgoing, server_hostname="127.0.0.1"
            )

    def close(self) -> None:
        self.sock.close()

    def handshake(self) -> None:
        """Blocking: run it in a thread."""
        while self._tls is not None:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(self._outgoing.read())
                self._incoming.write(self.sock.recv(65536))
            else:
                self.sock.sendall(self._outgoing.read())
                return

    def encode(self, message: bytes) -> bytes:
        if self._tls is None:
            return message
        self._tls.write(message)
        return self._outgoing.read()

    def send(self, message: bytes) -> None:
        self.sock.sendall(self.encode(message))

    def receive(self) -> bytes:
        """Blocking: the next bytes, b"" at a clean end-of-stream.

        A reset raises :exc:`ConnectionResetError`.
        """
        while True:
            if self._tls is None:
                return self.sock.recv(65536)
            try:
                return self._tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self._incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def read_to_eof(self) -> bytes:
        data = b""
        while chunk := self.receive():
            data += chunk
        return data

    async def roundtrip(self, message: bytes) -> bytes:
        self.send(message)
        return await trio.to_thread.run_sync(self.receive)


async def connected(
    server: trioserve.TCPServer, client_context: ssl.SSLContext | None
) -> Client:
    client = Client(server, client_context)
    await trio.to_thread.run_sync(client.handshake)
    assert await client.roundtrip(b"first\n") == b"first\n"
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.idle == 1
    return client


def make_server(
    kind: str, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> tuple[trioserve.TCPServer, ssl.SSLContext | None]:
    """A line-echo server of ``kind``, and the client's TLS context if any."""
    server_context, client_context = tls_contexts
    if kind == "unix":
        # Short, as Unix socket paths must be; the server removes the file.
        path = f"/tmp/trioserve-close-{os.getpid()}.sock"
        return trioserve.UnixStreamServer(path, Echo), None
    if kind == "tls":
        server = trioserve.TCPServer(("127.0.0.1", 0), Echo, ssl_context=server_context)
        return server, client_context
    return trioserve.TCPServer(("127.0.0.1", 0), Echo), None


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
async def test_a_message_in_the_socket_when_shutdown_starts_is_served(
    kind: str, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server, client_context = make_server(kind, tls_contexts)
    received = []
    with trio.fail_after(IO_TIMEOUT):
        async with serving(server):
            client = await connected(server, client_context)
            try:
                request = client.encode(b"next\n")

                async def read() -> None:
                    received.append(await trio.to_thread.run_sync(client.read_to_eof))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    # No checkpoint between the send and the start of the
                    # shutdown: the request is in the server's socket,
                    # unread, when shutdown starts.
                    client.sock.sendall(request)
                    await server.shutdown()
            finally:
                client.close()
    assert received == [b"next\n"]
    assert (server.stats.completed, server.stats.cancelled) == (1, 0)


@pytest.mark.parametrize("kind", ["tcp", "tls"])
async def test_a_message_that_arrives_within_the_drain_window_is_served(
    kind: str, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server, client_context = make_server(kind, tls_contexts)
    server.drain_window = 2.0
    with trio.fail_after(IO_TIMEOUT):
        async with serving(server) as nursery:
            client = await connected(server, client_context)
            try:
                nursery.start_soon(server.shutdown)
                await trio.sleep(0.2)  # a round trip, well within the window
                assert not server.is_serving()
                client.send(b"on its way\n")
                received = await trio.to_thread.run_sync(client.read_to_eof)
            finally:
                client.close()
    assert received == b"on its way\n"


@pytest.mark.parametrize("kind", ["tcp", "tls"])
async def test_a_message_after_the_drain_window_gets_a_clean_end_of_stream(
    kind: str, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server, client_context = make_server(kind, tls_contexts)
    server.drain_window = 1.0
    with trio.fail_after(IO_TIMEOUT):
        async with serving(server) as nursery:
            client = await connected(server, client_context)
            try:
                nursery.start_soon(server.shutdown)
                # The window passes with nothing on its way: the server ends
                # the stream, and lingers for the client's end, for another
                # drain_window. The late request comes half-way through that.
                await trio.sleep(1.5)
                client.send(b"too late\n")
                await trio.sleep(0.1)  # time for a reset to come back
                # recv returns b"", a clean end-of-stream, and again: the
                # late request was discarded, not answered with a reset.
                assert await trio.to_thread.run_sync(client.read_to_eof) == b""
                assert await trio.to_thread.run_sync(client.sock.recv, 100) == b""
            finally:
                client.close()


class BigReplyThenClose(trioserve.StreamRequestHandler):
    """Answers the first line with a large reply and returns at once."""

    async def handle(self) -> None:
        await self.rfile.readline()
        await self.wfile.write(b"r" * REPLY_SIZE)


REPLY_SIZE = 2**20


async def test_a_reply_written_before_close_arrives_whole_while_the_client_sends() -> (
    None
):
    server = trioserve.TCPServer(("127.0.0.1", 0), BigReplyThenClose)
    with trio.fail_after(IO_TIMEOUT):
        async with serving(server):
            client = await trio.open_tcp_stream(*server.server_address)
            async with client:

                async def keep_sending() -> None:
                    # The client's data is still arriving when the server
                    # closes: closing at once would reset the connection and
                    # destroy the part of the reply not read yet.
                    await client.send_all(b"go\n")
                    for _ in range(64):
                        await client.send_all(b"x" * 16384)
                    await client.send_eof()

                received = bytearray()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_sending)
                    while chunk := await client.receive_some(65536):
                        received += chunk
    assert len(received) == REPLY_SIZE


async def test_a_connection_whose_client_has_closed_is_closed_without_waiting() -> None:
    # The usual end of a connection: the client closed first. The close then
    # takes one receive and no wait, so the server's request costs no
    # shield and no trip through the scheduler (its close_request is marked
    # shieldable_from_first_wait).
    from trioserve._eager import FINISHED, first_step
    from trioserve._lingering import close_without_reset

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server_side = await listener.accept()
        await client.aclose()
        sock = server_side.socket
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(sock)
        assert first_step(close_without_reset(server_side, 1.0), None) is FINISHED
        assert sock.fileno() == -1


async def test_a_close_that_lingers_waits_plainly_first() -> None:
    # A client still connected: the close must linger, and its first wait
    # is a plain checkpoint, outside any scope of its own, so that the
    # server's shield can go on around the rest.
    from trioserve._eager import FINISHED, first_step, resume
    from trioserve._lingering import close_without_reset

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as client:
            server_side = await listener.accept()
            closing = close_without_reset(server_side, 1.0)
            message = first_step(closing, None)
            assert message is not FINISHED

            async def client_side() -> None:
                # The server shut its side: the client sees the end, then
                # closes, which ends the lingering.
                assert await client.receive_some(10) == b""
                await client.aclose()

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client_side)
                    # The rest, in this task, in a shield entered only now.
                    with trio.CancelScope(shield=True):
                        await resume(closing, message, None)
            assert server_side.socket.fileno() == -1
