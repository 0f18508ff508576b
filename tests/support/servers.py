"""Helpers the test modules share; no test module imports another.

More of the shared helpers belong here (see the architecture issue); for
now: TLS contexts, and a byte stream pair of either kind.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
import trustme


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
