"""The echo service (RFC 862): one handler body for streams and datagrams."""

from __future__ import annotations

from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._streams import AsyncReader, AsyncWriter


class EchoHandler(BaseRequestHandler):
    """Sends back every byte it receives, as it arrives, whatever the framing.

    A mixin: combined with a stream or a datagram handler it serves either,
    because both give ``rfile`` and ``wfile`` the same async interface.
    """

    rfile: AsyncReader
    wfile: AsyncWriter

    async def handle(self) -> None:
        while chunk := await self.rfile.read1():
            await self.wfile.write(chunk)
            # Let it go before the next read: an idle connection would hold
            # it for as long as it stays idle.
            del chunk


class EchoStreamHandler(EchoHandler, StreamRequestHandler):
    """Echo over TCP or a Unix stream socket."""


class EchoDatagramHandler(EchoHandler, DatagramRequestHandler):
    """Echo over UDP or a Unix datagram socket."""
