"""A line-echo service that the reliability tests run as a subprocess.

    python tests/reliability_server.py [--max-line-length N] [--nofile N]

Serves TCP on 127.0.0.1 (a free port) with a handler that echoes lines
(``async for line in self.rfile``), until SIGTERM or SIGINT; then it shuts
down gracefully. It prints ``port PORT`` on stdout once it serves, and
``stats {...}`` (the server's counters as JSON) after it has shut down. Logs
go to stderr at DEBUG level.

Running in a process of its own lets a test measure what the server alone
uses: its peak resident memory (``VmHWM`` in ``/proc/PID/status``) and its
open file descriptors (``/proc/PID/fd``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys

import attrs
import trio

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-line-length", type=int, default=65536)
    parser.add_argument("--nofile", type=int, help="set RLIMIT_NOFILE this low")
    args = parser.parse_args()
    if args.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    logging.basicConfig(
        level=logging.DEBUG,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = type("LineEcho", (LineEcho,), {"max_line_length": args.max_line_length})
    server = trioserve.TCPServer(("127.0.0.1", 0), handler)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(trioserve.serve_until_signalled, [server])
            print(f"port {addresses[0][1]}", flush=True)

    trio.run(run)
    print("stats " + json.dumps(attrs.asdict(server.stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
