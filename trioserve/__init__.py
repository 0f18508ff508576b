"""trioserve: Python's socketserver model on Trio's structured concurrency."""

from ._activation import systemd_sockets
from ._credentials import PeerCredentials, peer_credentials
from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._listener_server import ListenerServer
from ._metrics import render_metrics, serve_metrics
from ._server import BaseServer
from ._signals import serve_until_signalled
from ._socket_servers import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer
from ._stats import RequestDurations, ServerStats
from ._streams import (
    AsyncBufferedReader,
    AsyncBufferedWriter,
    AsyncPacketReader,
    AsyncPacketWriter,
    AsyncReader,
    AsyncWriter,
    LineTooLong,
)
from ._workers import WorkerControl, serve_in_workers

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
    "ListenerServer",
    "PeerCredentials",
    "RequestDurations",
    "ServerStats",
    "StreamRequestHandler",
    "TCPServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
    "WorkerControl",
    "peer_credentials",
    "render_metrics",
    "serve_in_workers",
    "serve_metrics",
    "serve_until_signalled",
    "systemd_sockets",
]
