"""The examples' handlers, counting the replies they write, for real-client tests.

Served by ``python -m trioserve serve support.counting_handlers:HTTPHandler`` (or
``:RESPHandler``) run from ``tests/`` with ``examples/`` on ``PYTHONPATH``;
:mod:`real_clients` starts it so.

Both examples write each reply in one ``wfile.write``, so a write that
returned is one reply the server wrote: its bytes are with the kernel (or
the TLS stream's transport), and a clean close must deliver them. Every
process that imports this module writes its count to a file of its own when
it exits, in the directory ``real_clients.COUNTS_DIRECTORY`` names: under
``--workers`` one per worker, plus one saying 0 from the supervisor, which
serves nothing itself.
"""

from __future__ import annotations

import atexit
import os

import http_keepalive
import resp_store
import trio

import trioserve
from support.real_clients import COUNTS_DIRECTORY

_replies_written = 0


@atexit.register
def _report() -> None:
    directory = os.environ.get(COUNTS_DIRECTORY)
    if directory is not None:
        path = os.path.join(directory, str(os.getpid()))
        with open(path, "w") as counts:
            counts.write(str(_replies_written))


class CountingWriter(trioserve.AsyncBufferedWriter):
    async def write(self, data: bytes | bytearray | memoryview) -> int:
        global _replies_written
        written = await super().write(data)
        _replies_written += 1
        return written


class CountReplies(trioserve.StreamRequestHandler):
    """Makes ``wfile`` count its writes; put it first among the bases."""

    async def setup(self) -> None:
        await super().setup()
        self.wfile = CountingWriter(
            self.connection, buffer_size=self.wbufsize, timeout=self.timeout
        )


class HTTPHandler(CountReplies, http_keepalive.HTTPHandler):
    pass


class RESPHandler(CountReplies, resp_store.RESPHandler):
    pass


class SlowDatagramEcho(trioserve.DatagramRequestHandler):
    """Echoes each datagram after a tenth of a second, counting its replies.

    The pause keeps datagrams in flight, so that a shutdown always finds some.
    """

    async def handle(self) -> None:
        await trio.sleep(0.1)
        await self.wfile.write(self.packet)

    async def finish(self) -> None:
        global _replies_written
        await super().finish()
        _replies_written += 1
