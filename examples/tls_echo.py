"""A TLS line echo server: ``TCPServer(..., ssl_context=...)``.

With ``ssl_context`` every request's ``self.connection`` is a
``trio.SSLStream``; ``rfile`` and ``wfile`` work over it unchanged. The
handshake happens in the request's own task, so a slow client holds up
nobody else. For the demo the server makes a throw-away certificate
authority with ``trustme`` (``pip install trustme``), issues itself a
certificate for 127.0.0.1, ::1 and localhost, and writes the CA certificate
to a file (``--cafile``, else a temporary file, removed at exit) so that
clients can verify the server.

Try it::

    python examples/tls_echo.py --port 9000 --cafile /tmp/demo-ca.pem
    openssl s_client -quiet -connect 127.0.0.1:9000 -CAfile /tmp/demo-ca.pem
    # or: ncat --ssl --ssl-verify --ssl-trustfile /tmp/demo-ca.pem 127.0.0.1 9000
    # type lines: each one comes back (plain `nc` does not speak TLS)

Ctrl-C (or SIGTERM) shuts down gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import tempfile
from typing import Any

import trio
import trustme

import trioserve


class LineEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        # The same body as over plain TCP: rfile and wfile hide the TLS.
        async for line in self.rfile:
            await self.wfile.write(line)


def make_server_context(cafile: str) -> ssl.SSLContext:
    """A server context with a fresh certificate; write its CA to ``cafile``."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "::1", "localhost").configure_cert(context)
    ca.cert_pem.write_to_path(cafile)
    return context


def announce(kind: str, address: Any) -> None:
    """Print where we listen, e.g. ``listening: TLS 127.0.0.1:9000``."""
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"listening: {kind} {host}:{port}", flush=True)


async def main(host: str, port: int, context: ssl.SSLContext) -> None:
    server = trioserve.TCPServer((host, port), LineEcho, ssl_context=context)
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(trioserve.serve_until_signalled, [server])
        announce("TLS", address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="e.g. ::1 for IPv6")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--cafile", help="where to write the CA certificate (PEM)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    cafile = args.cafile
    if cafile is None:
        fd, cafile = tempfile.mkstemp(prefix="tls_echo-ca-", suffix=".pem")
        os.close(fd)
    context = make_server_context(cafile)
    print(f"CA certificate: {cafile}", flush=True)
    try:
        trio.run(main, args.host, args.port, context)
    finally:
        if args.cafile is None:
            os.unlink(cafile)  # ours, made above; a given path is the user's
