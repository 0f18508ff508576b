"""trioserve line echo written the obvious way, served by its command line.

The runner starts it as a user serves their own handler::

    python -m trioserve serve trioserve_lines:LineEcho --tcp 127.0.0.1:0
    python -m trioserve serve trioserve_lines:DatagramLineEcho --udp 127.0.0.1:0

with this directory on ``PYTHONPATH``. (The ``trioserve`` server proper is
``python -m trioserve echo``, whose handler relays chunks with ``read1``.)
"""

from __future__ import annotations

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    """TCP line echo with ``StreamRequestHandler``."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


class DatagramLineEcho(trioserve.DatagramRequestHandler):
    """UDP echo with ``DatagramRequestHandler``, line by line."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)
