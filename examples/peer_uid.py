"""A Unix-socket line echo service that serves only the users it allows.

The kernel tells a Unix socket server who connected: the client's pid, uid
and gid (``SO_PEERCRED``, Linux), which the client cannot forge.
``verify_request`` reads them with ``trioserve.peer_credentials`` before any
handler exists, and returns False for a uid outside the allowed ones: the
server then closes that connection unhandled and counts it in
``server.stats.rejected``. The handler greets with
``self.peer_credentials``. No passwords, as PostgreSQL's ``peer`` method.

Try it::

    python examples/peer_uid.py --path /tmp/echo.sock    # allows your own uid
    nc -U /tmp/echo.sock                                  # served
    sudo -u nobody nc -U /tmp/echo.sock                   # rejected at once

Ctrl-C (or SIGTERM) shuts down gracefully, prints the counts, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Collection
from typing import Any

import trio

import trioserve


class GreetAndEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        credentials = self.peer_credentials
        assert credentials is not None  # a Unix stream connection has them
        await self.wfile.write(b"hello, uid %d\n" % credentials.uid)
        async for line in self.rfile:
            await self.wfile.write(line)


class PeerUidServer(trioserve.UnixStreamServer):
    def __init__(self, *args: Any, allowed: Collection[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    async def verify_request(self, request: Any, client_address: Any) -> bool:
        credentials = trioserve.peer_credentials(request)
        if credentials is not None and credentials.uid in self.allowed:
            return True
        logging.info("rejected %s: uid not allowed", credentials)
        return False


async def main(path: str, allowed: Collection[int]) -> None:
    server = PeerUidServer(path, GreetAndEcho, allowed=allowed)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        print(f"listening: UNIX {address}", flush=True)
    stats = server.stats
    print(f"served {stats.completed}, rejected {stats.rejected}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", default="/tmp/trioserve-peer-uid.sock")
    parser.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="a user id to serve (repeatable); default: your own",
    )
    args = parser.parse_args()
    allowed = set(args.allow_uid or [os.geteuid()])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.path, allowed)
