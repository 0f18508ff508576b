"""A server behind HAProxy that still knows who its clients are.

Behind a proxy in TCP mode every connection comes from the proxy, so a
handler's ``client_address`` would be the proxy's. HAProxy's PROXY protocol
fixes that: with ``send-proxy`` (version 1, a line of text) or
``send-proxy-v2`` (version 2, binary) on its ``server`` line, HAProxy opens
each connection it relays with a header naming the real client. With
``proxy_protocol="auto"`` the server reads either version, and
``client_address`` becomes the client's address. Only the peers listed in
``trusted_proxies`` may send a header, since whoever sends it chooses the
address the server believes; any other peer, and a trusted one that sends
no valid header in time, is closed, logged and counted in
``stats.dropped``.

The handler greets each client with the address it sees, then echoes lines.

Try it, with the HAProxy configuration in ``examples/deploy/haproxy.cfg``
(HAProxy on 127.0.0.1:9000 relays to this server on 127.0.0.1:9001)::

    python examples/production/behind_haproxy.py --port 9001
    haproxy -f examples/deploy/haproxy.cfg
    nc 127.0.0.1 9000          # "hello 127.0.0.1:PORT", your own port
    nc 127.0.0.1 9001          # around HAProxy: closed once you type a
                               # line (not a header), or after 10 s

Ctrl-C (or SIGTERM) shuts down gracefully, prints the counts, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import trio

import trioserve


def show(address: Any) -> str:
    """``HOST:PORT``, or ``[V6]:PORT`` for IPv6."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Greeter(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        # The client's address from the PROXY header, not HAProxy's.
        logging.info("greeting %s", show(self.client_address))
        await self.wfile.write(f"hello {show(self.client_address)}\n".encode())
        async for line in self.rfile:
            await self.wfile.write(line)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9001``."""
    print(f"listening: {kind} {show(address)}", flush=True)


async def main(host: str, port: int, trusted: Sequence[str]) -> None:
    server = trioserve.TCPServer(
        (host, port),
        Greeter,
        # Either header version: send-proxy or send-proxy-v2.
        proxy_protocol="auto",
        # Who may send one: HAProxy's address (or network) as this server
        # sees it. Anyone else is closed before a handler runs.
        trusted_proxies=trusted,
    )
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)
    stats = server.stats
    print(f"served {stats.completed}, dropped {stats.dropped}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9001, help="0: any free port")
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="an address or network allowed to send PROXY headers, such as "
        "10.0.0.0/8 (repeatable); default: 127.0.0.1 and ::1",
    )
    args = parser.parse_args()
    trusted = args.trusted_proxy or ["127.0.0.1", "::1"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port, trusted)
