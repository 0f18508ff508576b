"""A TCP line echo server that serves only clients from allowed networks.

``verify_request`` runs for each connection before any handler exists. It
returns False for a client address outside the allow-list, and the server
then closes that connection unhandled and counts it in
``server.stats.rejected``.

Try it::

    python examples/allow_list.py --port 9000 --allow 127.0.0.0/8
    nc 127.0.0.1 9000          # served: lines come back
    python examples/allow_list.py --port 9000 --allow 10.0.0.0/8
    nc 127.0.0.1 9000          # rejected: the connection closes at once

Ctrl-C (or SIGTERM) shuts down gracefully, prints the counts, and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import trio

import trioserve

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


class AllowListServer(trioserve.TCPServer):
    def __init__(self, *args: Any, allowed: Sequence[Network], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    async def verify_request(self, request: Any, client_address: Any) -> bool:
        ip = ipaddress.ip_address(client_address[0])
        # On a dual-stack IPv6 socket, IPv4 clients appear as ::ffff:a.b.c.d.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed):
            return True
        logging.info("rejected %s: not in the allow-list", ip)
        return False


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int, allowed: Sequence[Network]) -> None:
    server = AllowListServer((host, port), LineEcho, allowed=allowed)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)
    stats = server.stats
    print(f"served {stats.completed}, rejected {stats.rejected}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument(
        "--allow",
        type=ipaddress.ip_network,
        action="append",
        metavar="NETWORK",
        help="an allowed network such as 192.168.0.0/16 (repeatable); "
        "default: loopback only",
    )
    args = parser.parse_args()
    allowed = args.allow or [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1")]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port, allowed)
