"""The handler under test in the "Testing your handlers" page of the docs.

It answers each line with the line in upper case. Lines are limited to 1 KiB:
a longer one raises ``trioserve.LineTooLong``, which ends the request and is
logged by the server's ``handle_error``.
"""

from __future__ import annotations

import trioserve


class Upper(trioserve.StreamRequestHandler):
    max_line_length = 1024

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line.upper())
