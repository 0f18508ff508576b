"""An HTTP/1.1 server with keep-alive connections, written by hand.

Each connection carries one request after another: ``handle()`` reads a
request line and headers with ``rfile.readline()`` (and a body, if
``Content-Length`` gives one), answers ``200 OK`` with a short text, and
waits for the next request. It is a demonstration of a protocol's life
cycle, not a web framework: no chunked bodies, no routing.

The part worth copying is the goodbye. Once a graceful shutdown starts,
``self.server.is_serving()`` is False, and the next reply says
``Connection: close``, which in HTTP/1.1 tells the client that the server
will close the connection after it: the client then sends nothing more on
it and does not mistake the close for a failure. A connection idle at that
moment sees the end of the stream and leaves; one whose next request is
already on its way gets its answer first.

Try it::

    python examples/http_keepalive.py --port 8000
    curl -v http://127.0.0.1:8000/ http://127.0.0.1:8000/again   # one connection

or with the command line, from this directory::

    python -m trioserve serve http_keepalive:HTTPHandler --tcp 127.0.0.1:8000

Ctrl-C (or SIGTERM) shuts down gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, NamedTuple

import trio

import trioserve

# Bounds on what a client may send, so that one cannot make the server
# hold unbounded memory. Each header line is bounded by ``max_line_length``.
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024

REASONS = {
    200: "OK",
    400: "Bad Request",
    413: "Content Too Large",
    501: "Not Implemented",
}


class Request(NamedTuple):
    method: str
    target: str
    keep_alive: bool  # what the client asked for; the server may still close


class BadRequest(Exception):
    """A request the server cannot serve; the reply is ``status`` and closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HTTPHandler(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        while True:
            try:
                request = await self.read_request()
            except (BadRequest, trioserve.LineTooLong) as exc:
                status = exc.status if isinstance(exc, BadRequest) else 400
                await self.respond(status, f"{exc}\n", keep_alive=False)
                return
            if request is None:
                # The client closed, or the connection was idle when the
                # server started shutting down.
                return
            # The goodbye: once the server no longer serves, this reply is
            # the connection's last, and it says so.
            keep_alive = request.keep_alive and self.server.is_serving()
            body = f"Hello from trioserve: {request.method} {request.target}\n"
            await self.respond(200, body, keep_alive, head=request.method == "HEAD")
            if not keep_alive:
                return

    async def read_request(self) -> Request | None:
        """The next request, or None if the stream ended before a whole one."""
        line = await self.rfile.readline()
        if line in (b"\r\n", b"\n"):  # RFC 9112: ignore one empty line first
            line = await self.rfile.readline()
        if not line:
            return None
        try:
            method, target, version = line.decode("ascii").split()
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "expected: METHOD TARGET HTTP/1.x") from None
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest(400, f"unsupported version {version!r}")
        headers = await self.read_headers()
        if headers is None:
            return None
        if "transfer-encoding" in headers:
            raise BadRequest(501, "chunked bodies are not supported")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise BadRequest(400, f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY:
            raise BadRequest(413, f"bodies are limited to {MAX_BODY} bytes")
        if len(await self.rfile.read(int(length))) < int(length):
            return None  # the stream ended inside the body
        # HTTP/1.1 keeps the connection unless told otherwise; 1.0 the reverse.
        tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        if version == "HTTP/1.1":
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens
        return Request(method, target, keep_alive)

    async def read_headers(self) -> dict[str, str] | None:
        """The header fields by lower-case name; None if the stream ended."""
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await self.rfile.readline()
            if not line.endswith(b"\n"):
                return None
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise BadRequest(400, f"bad header line {line[:80]!r}")
            headers[name.lower()] = value.strip()
        raise BadRequest(400, f"more than {MAX_HEADERS} header fields")

    async def respond(
        self, status: int, body: str, keep_alive: bool, *, head: bool = False
    ) -> None:
        """Send one whole response, in one write."""
        content = body.encode()
        header = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(content)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            "\r\n"
        )
        await self.wfile.write(header.encode() + (b"" if head else content))


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TCP 127.0.0.1:8000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int) -> None:
    server = trioserve.TCPServer((host, port), HTTPHandler)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TCP", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    trio.run(main, args.host, args.port)
