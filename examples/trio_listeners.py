"""Handlers on listeners a Trio application opened itself, cancelled by it.

The application opens its listeners with ``trio.open_tcp_listeners`` (every
interface of the host, IPv4 and IPv6 where the host has them) and hands them
to a ``ListenerServer``, which serves them with everything a ``TCPServer``
has: idle timeout, graceful shutdown, stats. A second task reads the stats
while the server serves. The application ends the service on its own
terms: after ``--serve-for`` seconds its cancel scope cancels everything
in it, server and requests alike; each handler's ``finish()`` still runs
and each connection is closed cleanly.

Try it::

    python examples/trio_listeners.py --port 9000 --serve-for 30
    nc 127.0.0.1 9000          # type lines; at 30 s the connection closes
"""

from __future__ import annotations

import argparse

import trio

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)

    async def finish(self) -> None:
        # Runs even when the application cancels the request.
        print(f"closing {self.client_address}", flush=True)
        await super().finish()


async def report_stats(server: trioserve.BaseServer, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        print(f"stats: {server.stats}", flush=True)


async def main(host: str, port: int, serve_for: float, interval: float) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = trioserve.ListenerServer(listeners, LineEcho, idle_timeout=300)
    for listener in listeners:
        address = listener.socket.getsockname()
        print(f"listening: TCP {address[0]}:{address[1]}", flush=True)
    # The application's own deadline: when it passes, everything inside is
    # cancelled at once; there is no grace period, as there is with
    # server.shutdown().
    with trio.move_on_after(serve_for):
        async with server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            nursery.start_soon(report_stats, server, interval)
    print(f"final stats: {server.stats}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--serve-for", type=float, default=60.0, help="seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    trio.run(main, args.host, args.port, args.serve_for, args.interval)
