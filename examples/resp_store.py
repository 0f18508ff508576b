"""A key-value store that speaks a subset of the Redis protocol (RESP2).

Commands arrive as RESP arrays of bulk strings, as ``redis-cli`` and
``redis-benchmark`` send them, or as inline lines (``PING``) typed by hand.
Served: ``PING [message]``, ``ECHO message``, ``SET key value``, ``GET key``,
``DEL key [key ...]``, ``CONFIG GET parameter`` (a few fixed answers, so
that ``redis-benchmark`` finds what it asks for) and ``QUIT``. Anything else
gets an ``-ERR`` reply and the connection carries on; a malformed request
gets ``-ERR Protocol error`` and the connection closes, as Redis does.

Clients may pipeline: send many commands before reading any reply. Each
reply is one write, sent as soon as its command has run.

The data lives in the serving process's memory, in one dict: it is gone when
the process exits, and with ``--workers N`` each worker has its own.

Try it::

    python examples/resp_store.py --port 6380
    redis-cli -p 6380 set greeting hello      # OK
    redis-cli -p 6380 get greeting            # "hello"
    redis-benchmark -p 6380 -t set,get,ping -q

or with the command line, from this directory::

    python -m trioserve serve resp_store:RESPHandler --tcp 127.0.0.1:6380

Ctrl-C (or SIGTERM) shuts down gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import trio

import trioserve

# Bounds on one request, so that a client cannot make the server hold
# unbounded memory. A request line is bounded by ``max_line_length``.
MAX_ARGUMENTS = 1024
MAX_BULK_LENGTH = 1024 * 1024

# What CONFIG GET answers; redis-benchmark asks for these two.
CONFIG = {b"save": b"", b"appendonly": b"no"}

# The data: one dict per process, shared by every connection.
STORE: dict[bytes, bytes] = {}


class ProtocolError(Exception):
    """The client broke the protocol; the connection cannot continue."""


def simple(text: str) -> bytes:
    return f"+{text}\r\n".encode()


def error(text: str) -> bytes:
    return f"-ERR {text}\r\n".encode()


def integer(value: int) -> bytes:
    return f":{value}\r\n".encode()


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(values: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(values) + b"".join(bulk(value) for value in values)


class RESPHandler(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        while True:
            try:
                command = await self.read_command()
            except (ProtocolError, trioserve.LineTooLong) as exc:
                await self.wfile.write(error(f"Protocol error: {exc}"))
                return
            if command is None:
                # The client closed, or the connection was idle when the
                # server started shutting down.
                return
            if not command:
                continue  # an empty inline line: Redis ignores it too
            await self.wfile.write(self.execute(command))
            if command[0].upper() == b"QUIT":
                return

    async def read_command(self) -> list[bytes] | None:
        """The next command's words; None if the stream ended before one."""
        line = await self.rfile.readline()
        if not line.endswith(b"\n"):
            return None
        if not line.startswith(b"*"):
            return line.split()  # an inline command
        count = self.parse_length(line, MAX_ARGUMENTS)
        words = []
        for _ in range(count):
            header = await self.rfile.readline()
            if not header.endswith(b"\n"):
                return None
            if not header.startswith(b"$"):
                raise ProtocolError(f"expected '$', got {header[:1]!r}")
            length = self.parse_length(header, MAX_BULK_LENGTH)
            word = await self.rfile.read(length + 2)
            if len(word) < length + 2:
                return None
            if not word.endswith(b"\r\n"):
                raise ProtocolError("a bulk string must end with CRLF")
            words.append(word[:-2])
        return words

    @staticmethod
    def parse_length(line: bytes, limit: int) -> int:
        """The count in ``*N`` or ``$N``, from 0 to ``limit``."""
        text = line[1:].rstrip(b"\r\n")
        if not text.isdigit() or int(text) > limit:
            raise ProtocolError(f"invalid length {text[:20]!r}")
        return int(text)

    def execute(self, command: list[bytes]) -> bytes:
        """Run one command; return its reply. No await: nothing interleaves."""
        name, *args = command
        match name.upper(), args:
            case b"PING", []:
                return simple("PONG")
            case b"PING" | b"ECHO", [message]:
                return bulk(message)
            case b"SET", [key, value]:
                STORE[key] = value
                return simple("OK")
            case b"GET", [key]:
                return bulk(STORE.get(key))
            case b"DEL", [_, *_]:
                return integer(sum(STORE.pop(key, None) is not None for key in args))
            case b"CONFIG", [subcommand, parameter] if subcommand.upper() == b"GET":
                wanted = parameter.lower()
                return array([wanted, CONFIG[wanted]] if wanted in CONFIG else [])
            case b"QUIT", []:
                return simple("OK")
        word = name[:40].decode("utf-8", "replace")
        return error(f"unknown command or wrong arguments: '{word}'")


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:6380``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int) -> None:
    server = trioserve.TCPServer((host, port), RESPHandler)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=6380, help="0: any free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port)
