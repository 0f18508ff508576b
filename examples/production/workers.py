"""A line echo on every core: worker processes under a supervisor, from Python.

``trioserve.serve_in_workers`` runs the servers that ``make_servers`` returns
in several processes, each with its own Trio run. This process becomes their
supervisor: it binds the addresses once, starts the workers, starts a new
one when one dies, and stops them all gracefully on Ctrl-C or SIGTERM.

Each reply names the worker that served it, so you can watch the kernel
spread new connections over the workers. Try it::

    python examples/production/workers.py --port 9000 --workers 2
    for i in 1 2 3 4; do echo hi | nc -q1 127.0.0.1 9000; done
    # worker 4711: hi, worker 4712: hi, ...

``make_servers`` runs in the supervisor and again in each worker, so it is
a module-level function (workers are started fresh and must be able to
import it) and the place for per-process set-up such as logging; the
``if __name__ == "__main__":`` guard keeps workers from running the
command line again.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any, Literal

import trio

import trioserve


class WorkerEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        worker = f"worker {os.getpid()}: ".encode()
        async for line in self.rfile:
            await self.wfile.write(worker + line)


def make_servers(host: str, port: int) -> list[trioserve.BaseServer]:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(message)s")
    return [trioserve.TCPServer((host, port), WorkerEcho)]


def show(address: Any) -> str:
    """``HOST:PORT``, or ``[V6]:PORT`` for IPv6."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def main(host: str, port: int, workers: int | Literal["auto"]) -> None:
    serve = functools.partial(
        trioserve.serve_in_workers,
        functools.partial(make_servers, host, port),
        workers,
    )
    async with trio.open_nursery() as nursery:
        # Returns once every worker serves, with the real addresses.
        addresses = await nursery.start(serve)
        for address in addresses:
            print(f"listening: TCP {show(address)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument(
        "--workers", default="auto", help="how many, or 'auto': one per core"
    )
    args = parser.parse_args()
    trio.run(
        main,
        args.host,
        args.port,
        "auto" if args.workers == "auto" else int(args.workers),
    )
