"""AnyIO on its default (asyncio) backend: TCP line echo and UDP echo.

The TCP handler wraps the connection in a ``BufferedByteReceiveStream`` and
reads lines with ``receive_until(b"\\n", ...)``, AnyIO's documented way to
read delimited messages; ``receive_until`` strips the delimiter, so it is
added back to the reply. The UDP server iterates over a UDP socket.
"""

from __future__ import annotations

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from benchmarks.peers._common import announce, parse_args

# The longest line accepted: as trioserve's default.
MAX_LINE_LENGTH = 65536


async def line_echo(client: SocketStream) -> None:
    async with client:
        reader = BufferedByteReceiveStream(client)
        try:
            while True:
                line = await reader.receive_until(b"\n", MAX_LINE_LENGTH)
                await client.send(line + b"\n")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass  # the client closed (or went away mid-reply)


async def serve(kind: str, address: tuple[str, int]) -> None:
    host, port = address
    if kind == "tcp":
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            announce(kind, listener.extra(SocketAttribute.local_address))
            await listener.serve(line_echo)
    else:
        async with await anyio.create_udp_socket(
            local_host=host, local_port=port
        ) as udp:
            announce(kind, udp.extra(SocketAttribute.local_address))
            async for data, (client_host, client_port) in udp:
                await udp.sendto(data, client_host, client_port)


def main() -> None:
    anyio.run(serve, *parse_args(__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
