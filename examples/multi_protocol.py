"""One handler body served over TCP, UDP and a Unix socket, all at once.

``Shout`` replies to every line with the line in upper case. Its ``handle()``
is written once, as a mixin: stream handlers and datagram handlers give
``rfile`` and ``wfile`` the same async interface, so the same body reads a
TCP or Unix connection line by line, or the lines of one UDP datagram. The
mixin declares that interface (``trioserve.AsyncReader`` and
``trioserve.AsyncWriter``), so it type-checks under ``mypy --strict`` with
either handler class. Three servers run in one process, and one signal
shuts all of them down.

Try it::

    python examples/multi_protocol.py --port 9000 --udp-port 9000 \\
        --unix /tmp/shout.sock
    nc 127.0.0.1 9000          # TCP
    nc -u 127.0.0.1 9000       # UDP: each datagram gets one reply
    nc -U /tmp/shout.sock      # Unix stream socket

Ctrl-C (or SIGTERM) shuts every server down gracefully and exits 0; the
Unix socket file is removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any

import trio

import trioserve


class Shout(trioserve.BaseRequestHandler):
    """The protocol, independent of the transport."""

    # What every handler's rfile and wfile can do: streams' and datagrams'.
    rfile: trioserve.AsyncReader
    wfile: trioserve.AsyncWriter

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line.upper())


# The mixin comes first, so its handle() wins; the base supplies setup()
# and finish(), which make rfile/wfile and (for datagrams) send the reply.
class StreamShout(Shout, trioserve.StreamRequestHandler):
    pass


class DatagramShout(Shout, trioserve.DatagramRequestHandler):
    pass


def announce(kind: str, address: Any) -> None:
    """Print where we listen: ``listening: TCP 127.0.0.1:9000``, or a path."""
    if isinstance(address, tuple):
        host, port = address[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"listening: {kind} {address}", flush=True)


async def main(host: str, tcp_port: int, udp_port: int, unix_path: str) -> None:
    servers: dict[str, trioserve.BaseServer] = {
        "TCP": trioserve.TCPServer((host, tcp_port), StreamShout),
        "UDP": trioserve.UDPServer((host, udp_port), DatagramShout),
        "UNIX": trioserve.UnixStreamServer(unix_path, StreamShout),
    }
    async with trio.open_nursery() as nursery:
        # Every server binds before any serves, so a bad address fails early.
        addresses = await nursery.start(
            trioserve.serve_until_signalled, list(servers.values())
        )
        for kind, address in zip(servers, addresses, strict=True):
            announce(kind, address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="TCP; 0: any free")
    parser.add_argument("--udp-port", type=int, default=9000, help="0: any free")
    parser.add_argument(
        "--unix", default=os.path.join(tempfile.gettempdir(), "shout.sock")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port, args.udp_port, args.unix)
