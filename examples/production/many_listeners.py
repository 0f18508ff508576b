"""One server listening on IPv4, IPv6 and a Unix socket at once.

``extra_addresses`` gives a server more listeners besides its
``server_address``; each is an IP ``(host, port)`` or a Unix socket path,
whatever the first one is. The listeners share everything a server has: one
handler class, one nursery of request tasks, one ``max_concurrent_requests``
bound (``--max-requests``: a request on any listener takes a slot from
them all), one graceful shutdown and one set of ``stats``. Once the server
is bound, ``server.server_addresses`` lists every real address, the first
being ``server_address``.

IPv6 is left out, with a warning, where the host has no ``::1``.

Try it::

    python examples/production/many_listeners.py --port 9000 \\
        --unix /tmp/many.sock
    nc 127.0.0.1 9000          # IPv4
    nc ::1 9000                # IPv6
    nc -U /tmp/many.sock       # Unix: type lines, each comes back

Ctrl-C (or SIGTERM) shuts every listener down at once, prints the server's
counters, and exits 0; the Unix socket file is removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
from typing import Any

import trio

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    # One handler for every listener: rfile and wfile work the same over
    # TCP and Unix sockets.
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


def can_bind(host: str) -> bool:
    """Whether this host has the IPv6 address ``host``."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def announce(address: Any) -> None:
    """Print a listener: ``listening: TCP 127.0.0.1:9000``, or ``UNIX PATH``."""
    if isinstance(address, tuple):
        host, port = address[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"listening: TCP {host}:{port}", flush=True)
    else:
        print(f"listening: UNIX {address}", flush=True)


async def main(
    host: str, ipv6_host: str, port: int, unix_path: str, max_requests: int
) -> None:
    extra: list[Any] = []
    if ipv6_host and can_bind(ipv6_host):
        extra.append((ipv6_host, port))
    elif ipv6_host:
        logging.warning("no IPv6 address %s here: not listening on it", ipv6_host)
    extra.append(unix_path)
    server = trioserve.TCPServer(
        (host, port),
        LineEcho,
        extra_addresses=extra,
        max_concurrent_requests=max_requests,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(trioserve.serve_until_signalled, [server])
        # Real addresses now: a port 0 has become the port the kernel chose.
        for address in server.server_addresses:
            announce(address)
    # One set of counters for every listener.
    print(f"stats: {server.stats}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="the IPv4 address")
    parser.add_argument(
        "--ipv6-host", default="::1", help="the IPv6 address ('' for none)"
    )
    parser.add_argument(
        "--port", type=int, default=9000, help="for both IP listeners; 0: any free"
    )
    parser.add_argument(
        "--unix", default=os.path.join(tempfile.gettempdir(), "many_listeners.sock")
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=100,
        metavar="N",
        help="requests handled at once, over all the listeners",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.ipv6_host, args.port, args.unix, args.max_requests)
