"""asyncio Protocol: a line echo ``Protocol`` and a datagram protocol.

The TCP server is the line echo a careful asyncio user writes at the
transport level: ``data_received`` buffers what arrives, splits it on
``b"\\n"`` and writes each whole line with ``transport.write``; when the
transport's write buffer fills (``pause_writing``) it stops reading until
the buffer drains (``resume_writing``), so a client that does not read its
replies cannot make the server buffer without bound. asyncio sets
``TCP_NODELAY`` on its TCP transports itself, as uvloop does. The UDP
server is the ``asyncio`` peer's ``DatagramProtocol``.

``uvloop_peer.py`` runs this same code on uvloop's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

from benchmarks.peers._common import announce, parse_args, receive_like_uvloop
from benchmarks.peers.asyncio_peer import DatagramEcho

#: How an event loop is run: ``asyncio.run`` or ``uvloop.run``.
Runner = Callable[[Coroutine[Any, Any, None]], None]


class LineEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport, though uvloop's is no asyncio.Transport subclass.
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        # Only the new bytes can hold a line end.
        end = len(buffer)
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", end)) >= 0:
            end += 1
            self.transport.write(buffer[start:end])
            start = end
        del buffer[:start]

    # The transport calls these as its write buffer passes its high and low
    # water marks: stop taking input while replies cannot go out.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve(kind: str, address: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        server = await loop.create_server(LineEcho, *address)
        async with server:
            announce(kind, server.sockets[0].getsockname())
            await server.serve_forever()
    else:
        transport, _ = await loop.create_datagram_endpoint(
            DatagramEcho, local_addr=address
        )
        announce(kind, transport.get_extra_info("sockname"))
        await asyncio.Event().wait()  # serve until killed


def main(run: Runner = asyncio.run, description: str | None = None) -> None:
    """Serve with the event loop that run starts."""
    receive_like_uvloop()  # no effect on uvloop's own transports
    run(serve(*parse_args(description or __doc__.splitlines()[0])))


if __name__ == "__main__":
    main()
