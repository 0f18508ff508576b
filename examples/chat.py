"""A line-based chat room over TCP: every line a client sends goes to the others.

The server keeps the set of connected handlers. A broadcast writes to them
in turn under one lock, so all see messages in the same order and no two
tasks ever write to one client at once. A client whose write fails (it has
gone) or stalls for WRITE_TIMEOUT seconds (it stopped reading) is dropped and
disconnected; the others carry on. On a graceful shutdown every client gets
a goodbye line before its connection closes.

Try it, with two or more terminals::

    python examples/chat.py --port 9000
    nc 127.0.0.1 9000          # in each terminal; type lines

Ctrl-C (or SIGTERM) says goodbye to everyone and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

import trio

import trioserve

WRITE_TIMEOUT = 2.0  # seconds a client may leave us unable to write to it


class ChatServer(trioserve.TCPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members: set[ChatHandler] = set()
        self.lock = trio.Lock()

    async def broadcast(self, message: str, sender: ChatHandler) -> None:
        async with self.lock:
            for member in list(self.members):
                if member is not sender:
                    await member.send(message)


class ChatHandler(trioserve.StreamRequestHandler):
    server: ChatServer
    # The stream writer itself, for its timeout.
    wfile: trioserve.AsyncBufferedWriter

    async def setup(self) -> None:
        await super().setup()
        self.wfile.timeout = WRITE_TIMEOUT  # reads stay unbounded: idling is fine
        self.name = "{}:{}".format(*self.client_address[:2])
        self.membership = trio.CancelScope()  # cancelled to drop this client

    async def send(self, message: str) -> None:
        """Write to this client; drop it if that fails. Call under the lock."""
        try:
            await self.wfile.write(message.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, TimeoutError):
            self.server.members.discard(self)
            self.membership.cancel()

    async def handle(self) -> None:
        with self.membership:
            async with self.server.lock:
                self.server.members.add(self)
                await self.send(f"* welcome, {self.name}\n")
            await self.server.broadcast(f"* {self.name} joined\n", self)
            # A client that resets its connection ends the loop too.
            with contextlib.suppress(trio.BrokenResourceError):
                async for line in self.rfile:
                    text = line.decode(errors="replace").rstrip("\r\n")
                    await self.server.broadcast(f"{self.name}: {text}\n", self)
            async with self.server.lock:
                if not self.server.is_serving():
                    # Shutdown ended the loop (idle readers see end of stream).
                    await self.send("* the server is shutting down, goodbye\n")
                self.server.members.discard(self)
        if self.server.is_serving():
            await self.server.broadcast(f"* {self.name} left\n", self)


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int) -> None:
    server = ChatServer((host, port), ChatHandler)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port)
