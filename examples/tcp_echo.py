"""A line echo server over TCP: the smallest useful trioserve program.

Each connection gets its own ``LineEcho`` handler, running in a Trio task of
its own; ``handle()`` sends every line back as soon as it has arrived whole.

Try it::

    python examples/tcp_echo.py --port 9000
    nc 127.0.0.1 9000          # type lines: each one comes back

Ctrl-C (or SIGTERM) shuts the server down gracefully: idle connections are
closed at once and the process exits 0. A second Ctrl-C cancels whatever is
still running.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import trio

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        # The loop ends when the client closes, or when a graceful shutdown
        # starts while we wait for its next line.
        async for line in self.rfile:
            await self.wfile.write(line)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int) -> None:
    server = trioserve.TCPServer((host, port), LineEcho)
    async with trio.open_nursery() as nursery:
        # start() returns once the server listens, with its real address
        # (port 0 has become the port the kernel chose). The server then
        # runs until SIGINT or SIGTERM and shuts down gracefully.
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port)
