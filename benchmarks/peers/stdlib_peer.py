"""The standard library: ``ThreadingTCPServer`` and ``UDPServer``.

TCP line echo with ``StreamRequestHandler`` written the obvious way, one
thread per connection; UDP echo with ``DatagramRequestHandler`` on the
synchronous ``UDPServer``. Two settings differ from socketserver's
defaults, both in the stdlib's favour, so the comparison measures serving
rather than configuration:

- ``request_queue_size``: socketserver's listen backlog of 5 drops SYNs
  when hundreds of clients connect at once (each drop costs the client a
  one-second retransmit); trioserve, Trio and asyncio all ask for more.
- ``disable_nagle_algorithm``: every other server here sets ``TCP_NODELAY``.
"""

from __future__ import annotations

import socket
import socketserver

from benchmarks.peers._common import announce, parse_args


class LineEcho(socketserver.StreamRequestHandler):
    disable_nagle_algorithm = True

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class DatagramEcho(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    # Threads of connections still open must not keep a stopping server alive.
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN


def main() -> None:
    kind, address = parse_args(__doc__.splitlines()[0])
    server: socketserver.BaseServer
    if kind == "tcp":
        server = ThreadingTCPServer(address, LineEcho)
    else:
        server = socketserver.UDPServer(address, DatagramEcho)
    with server:
        announce(kind, server.server_address)
        server.serve_forever()


if __name__ == "__main__":
    main()
