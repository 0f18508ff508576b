"""Hand-written Trio: ``trio.serve_tcp`` line echo and a ``recvfrom`` loop.

The TCP handler buffers ``SocketStream.receive_some`` chunks in a
``bytearray`` and splits lines off the front, the way one writes readline
by hand on a Trio stream. The UDP server is a single task that receives a
datagram and sends it back.
"""

from __future__ import annotations

import functools
import socket

import trio

from benchmarks.peers._common import announce, parse_args

# The most bytes one receive asks for: as trioserve's default.
RECEIVE_SIZE = 65536


class LineReader:
    """Lines from a Trio stream, with their ``\\n``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def readline(self) -> bytes:
        """The next line; ``b""`` at end of stream."""
        while True:
            end = self.buffer.find(b"\n") + 1
            if end:
                line = bytes(self.buffer[:end])
                del self.buffer[:end]
                return line
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                line = bytes(self.buffer)
                self.buffer.clear()
                return line
            self.buffer += data


async def line_echo(stream: trio.SocketStream) -> None:
    reader = LineReader(stream)
    try:
        while line := await reader.readline():
            await stream.send_all(line)
    except trio.BrokenResourceError:
        pass  # the client went away mid-reply


async def serve_tcp(address: tuple[str, int]) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            trio.serve_tcp, line_echo, address[1], host=address[0]
        )
        listeners = await nursery.start(serve)
        announce("tcp", listeners[0].socket.getsockname())


async def serve_udp(address: tuple[str, int]) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(address)
        announce("udp", sock.getsockname())
        while True:
            data, client = await sock.recvfrom(RECEIVE_SIZE)
            await sock.sendto(data, client)


def main() -> None:
    kind, address = parse_args(__doc__.splitlines()[0])
    trio.run(serve_tcp if kind == "tcp" else serve_udp, address)


if __name__ == "__main__":
    main()
