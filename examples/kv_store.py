"""A key-value store over a line protocol that keeps its data across restarts.

Commands, one per line (UTF-8)::

    SET key value     ->  OK              (the value may contain spaces)
    GET key           ->  VALUE value     or  NOT_FOUND
    DEL key           ->  OK              or  NOT_FOUND

Anything else gets ``ERROR reason`` and the connection carries on. The data
is loaded from a JSON file at start and written back after a graceful
shutdown, atomically: to a temporary file first, then renamed over the old
one, so a crash mid-write never leaves a half-written file.

Try it::

    python examples/kv_store.py --port 9000 --data /tmp/kv.json
    nc 127.0.0.1 9000          # SET greeting hello world / GET greeting

Ctrl-C (or SIGTERM) saves the data and exits 0; start it again to find it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import trio

import trioserve


class KVServer(trioserve.TCPServer):
    def __init__(self, *args: Any, data: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data = data  # one dict shared by every connection's task


class KVHandler(trioserve.StreamRequestHandler):
    server: KVServer

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(f"{self.execute(line)}\n".encode())

    def execute(self, line: bytes) -> str:
        """Run one command; return the reply. No await: nothing interleaves."""
        try:
            command, *args = line.decode().rstrip("\r\n").split(maxsplit=2)
        except (UnicodeDecodeError, ValueError):  # not UTF-8, or an empty line
            command, args = "", []
        data = self.server.data
        match command.upper(), args:
            case "SET", [key, value]:
                data[key] = value
                return "OK"
            case "GET", [key] if key in data:
                return f"VALUE {data[key]}"
            case "DEL", [key] if key in data:
                del data[key]
                return "OK"
            case "GET" | "DEL", [_]:
                return "NOT_FOUND"
        return "ERROR expected SET key value, GET key or DEL key"


def load(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as file:
            return dict(json.load(file))
    except FileNotFoundError:
        return {}


def save(path: str, data: dict[str, str]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename makes it current
    os.replace(temporary, path)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int, data: dict[str, str]) -> None:
    server = KVServer((host, port), KVHandler, data=data)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--data", default="kv_store.json", help="the JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    data = load(args.data)
    print(f"loaded {len(data)} keys from {args.data}", flush=True)
    # Blocking file I/O happens before and after the event loop runs.
    trio.run(main, args.host, args.port, data)
    save(args.data, data)
    print(f"saved {len(data)} keys to {args.data}", flush=True)
