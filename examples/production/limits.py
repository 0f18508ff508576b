"""A line echo server with the limits a public service needs, each one logged.

Three server options stop one client from holding the server for ever:

- ``request_timeout``: how long one connection may last, however busy. Past
  it the handler is cancelled, ``finish()`` runs, and ``handle_error`` sees
  a ``TimeoutError`` (counted in ``stats.timed_out``).
- ``idle_timeout``: how long a client may take over its next line. One that
  sends nothing in that time is let go quietly (``rfile`` reports the end of
  the stream); one that sends part of a line but not the rest, a byte at a
  time as in a slowloris attack, gets a ``TimeoutError``.
- ``max_connections_per_peer``: how many connections one client host may
  have open at once. One more is closed at accept, before any handler runs
  (logged by trioserve at DEBUG level, counted in ``stats.rejected``), so a
  single client cannot take every slot.

Try it::

    python examples/production/limits.py --port 9000 --request-timeout 30 \\
        --idle-timeout 5 --max-per-peer 2
    nc 127.0.0.1 9000          # say nothing for 5 s: let go
    nc 127.0.0.1 9000          # keep typing lines: cut off after 30 s
    # a third nc while two are connected: closed at once

Ctrl-C (or SIGTERM) shuts down gracefully, prints the counters, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import trio

import trioserve


def show(address: Any) -> str:
    """``HOST:PORT``, or ``[V6]:PORT`` for IPv6."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        lines = 0
        while True:
            waiting_since = trio.current_time()
            line = await self.rfile.readline()
            if not line:
                break
            lines += 1
            await self.wfile.write(line)
        # End of stream: the client closed, or idle_timeout let it go (the
        # read then waited that long), or the server is shutting down.
        waited = trio.current_time() - waiting_since
        idle_timeout = self.server.idle_timeout
        if idle_timeout is not None and waited >= idle_timeout:
            logging.info(
                "%s: nothing sent for %s s (idle_timeout): let go",
                show(self.client_address),
                idle_timeout,
            )
        else:
            logging.info(
                "%s: end of stream after %d lines", show(self.client_address), lines
            )


class LimitedServer(trioserve.TCPServer):
    async def handle_error(self, request: Any, client_address: Any) -> None:
        # A timeout is the limits doing their job: one line, no traceback.
        error = sys.exc_info()[1]
        if isinstance(error, TimeoutError):
            logging.warning("%s: cut off: %s", show(client_address), error)
        else:
            await super().handle_error(request, client_address)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    print(f"listening: {kind} {show(address)}", flush=True)


async def main(
    host: str,
    port: int,
    request_timeout: float,
    idle_timeout: float,
    max_per_peer: int,
) -> None:
    server = LimitedServer(
        (host, port),
        LineEcho,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        max_connections_per_peer=max_per_peer,
    )
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)
    print(f"stats: {server.stats}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the longest a connection may last (default 60)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the longest a client may take over its next line (default 10)",
    )
    parser.add_argument(
        "--max-per-peer",
        type=int,
        default=4,
        metavar="N",
        help="connections at once from one client host (default 4)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # trioserve logs each connection max_connections_per_peer refuses at
    # DEBUG level: show those.
    logging.getLogger("trioserve").setLevel(logging.DEBUG)
    trio.run(
        main,
        args.host,
        args.port,
        args.request_timeout,
        args.idle_timeout,
        args.max_per_peer,
    )
