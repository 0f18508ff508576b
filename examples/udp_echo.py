"""An echo server over UDP: each datagram comes back to its sender.

Every datagram is one request. ``DatagramRequestHandler`` gives the handler
``self.packet`` (the bytes), an ``rfile`` to read them and a ``wfile`` to
write the reply, which ``finish()`` sends back as one datagram when
``handle()`` returns (nothing is sent if nothing was written).

Try it::

    python examples/udp_echo.py --port 9000
    nc -u 127.0.0.1 9000       # type lines: each one comes back

Ctrl-C (or SIGTERM) shuts the server down gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import trio

import trioserve


class DatagramEcho(trioserve.DatagramRequestHandler):
    async def handle(self) -> None:
        await self.wfile.write(self.packet)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: UDP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int) -> None:
    # Datagrams longer than max_packet_size (8192 bytes by default) are
    # dropped and counted in server.stats.malformed, never handled cut short.
    server = trioserve.UDPServer((host, port), DatagramEcho)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("UDP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port)
