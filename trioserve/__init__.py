"""trioserve: Python's socketserver model on Trio's structured concurrency."""

from ._activation import systemd_sockets
from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._server import BaseServer
from ._signals import serve_until_signalled
from ._socket_servers import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer
from ._stats import ServerStats
from ._streams import (
    AsyncBufferedReader,
    AsyncBufferedWriter,
    AsyncPacketReader,
    AsyncPacketWriter,
    AsyncReader,
    AsyncWriter,
    LineTooLong,
)
from ._workers import serve_in_workers

__version__ = "0.1.0"

__all__ = [
    "AsyncBufferedReader",
    "AsyncBufferedWriter",
    "AsyncPacketReader",
    "AsyncPacketWriter",
    "AsyncReader",
    "AsyncWriter",
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "LineTooLong",
    "ServerStats",
    "StreamRequestHandler",
    "TCPServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
    "serve_in_workers",
    "serve_until_signalled",
    "systemd_sockets",
]
