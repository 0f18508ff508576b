"""A server embedded in a larger Trio application, beside other tasks.

Here the application runs two things in one nursery: the echo server,
started with ``await nursery.start(server.serve_forever)`` (which returns
once the server accepts), and a task that reports ``server.stats`` every
second. The application owns the signals: on the first SIGINT or SIGTERM it
shuts the server down gracefully, then cancels its own tasks. Once the
signal receiver is closed a second Ctrl-C interrupts at once.

Try it::

    python examples/embedded.py --port 9000
    nc 127.0.0.1 9000          # type lines, and watch the stats change

Ctrl-C (or SIGTERM) shuts down gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

import trio

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


async def report_stats(server: trioserve.BaseServer, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        print(f"stats: {server.stats}", flush=True)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int, interval: float) -> None:
    server = trioserve.TCPServer((host, port), LineEcho)
    # `async with server` binds at once and closes the socket at the end.
    async with server, trio.open_nursery() as nursery:
        # Receive the signals before anyone can know where to connect.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            announce("TCP", await nursery.start(server.serve_forever))
            nursery.start_soon(report_stats, server, interval)
            signum = await anext(signals)
        logging.warning("%s: shutting down", signal.Signals(signum).name)
        await server.shutdown()  # returns once serve_forever has returned
        nursery.cancel_scope.cancel()  # then stop the application's own tasks
    print(f"final stats: {server.stats}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port, args.interval)
