"""Servers run inside the test's own Trio run, and Trio clients for them.

Also the TLS contexts the TLS tests share, a byte stream pair of either kind,
and the host checks (IPv6 loopback, open file descriptors).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
import trio.testing
import trustme

import trioserve

# Bounds a read that a passing test sees end. Long, as it must outlast the
# server's own timeouts in virtual time too (under ``autojump_clock``); in
# real time pytest's timeout comes first.
READ_TIMEOUT = 600.0


class Echo(trioserve.StreamRequestHandler):
    """Echoes each line back."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


class DatagramEcho(trioserve.DatagramRequestHandler):
    """Echoes each datagram back."""

    async def handle(self) -> None:
        await self.wfile.write(await self.rfile.read())


ServerT = TypeVar("ServerT", bound=trioserve.BaseServer)


@asynccontextmanager
async def serving(server: ServerT) -> AsyncIterator[ServerT]:
    """Run ``server.serve_forever`` for the block; shut down and close after."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        try:
            yield server
        finally:
            with trio.fail_after(10):
                await server.shutdown()
                await server.server_close()


async def connect(server: trioserve.BaseServer) -> trio.SocketStream:
    """A TCP connection to ``server``."""
    host, port = server.server_address[:2]
    return await trio.open_tcp_stream(host, port)


async def roundtrip(stream: trio.abc.Stream, line: bytes) -> bytes:
    """Send ``line`` (if any); return what comes back up to a newline or EOF."""
    if line:
        await stream.send_all(line)
    received = b""
    with trio.fail_after(5):
        while not received.endswith(b"\n"):
            chunk = await stream.receive_some()
            if not chunk:
                break
            received += chunk
    return received


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes; a reset ends it as well."""
    data = bytearray()
    with (
        trio.fail_after(READ_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError),
    ):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def ipv6_loopback_available() -> bool:
    """Whether this host can bind ``::1``."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client context, trusting one fresh CA, for 127.0.0.1."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


@asynccontextmanager
async def one_way_stream(
    transport: str,
) -> AsyncIterator[tuple[trio.abc.SendStream, trio.abc.ReceiveStream]]:
    """``(send, receive)``: a connected loopback TCP pair, or memory streams.

    ``transport`` is ``"socket"`` (the reader's plain-socket path) or
    ``"memory"`` (the path every other stream, TLS among them, takes).
    """
    if transport == "memory":
        send, receive = trio.testing.memory_stream_one_way_pair()
        yield send, receive
        return
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client, await listeners[0].accept() as server_side:
            yield client, server_side
