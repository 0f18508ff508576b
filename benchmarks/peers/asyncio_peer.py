"""asyncio: streams line echo (``start_server``) and a datagram protocol.

The TCP handler is the asyncio streams idiom: ``reader.readline()``, then
``writer.write()`` and ``await writer.drain()``. asyncio sets
``TCP_NODELAY`` on its TCP transports itself. The UDP server is a
``DatagramProtocol`` that sends each datagram straight back.
"""

from __future__ import annotations

import asyncio

from benchmarks.peers._common import announce, parse_args, receive_like_uvloop


async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass  # the client went away mid-reply
    finally:
        writer.close()


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(kind: str, address: tuple[str, int]) -> None:
    if kind == "tcp":
        server = await asyncio.start_server(line_echo, *address)
        async with server:
            announce(kind, server.sockets[0].getsockname())
            await server.serve_forever()
    else:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            DatagramEcho, local_addr=address
        )
        announce(kind, transport.get_extra_info("sockname"))
        await asyncio.Event().wait()  # serve until killed


def main() -> None:
    receive_like_uvloop()
    asyncio.run(serve(*parse_args(__doc__.splitlines()[0])))


if __name__ == "__main__":
    main()
