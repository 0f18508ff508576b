"""The command line: ``trioserve echo`` and ``trioserve serve MODULE:HANDLER``."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import Any, Literal

import trio

from . import __version__
from ._activation import systemd_sockets
from ._echo import EchoDatagramHandler, EchoStreamHandler
from ._handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
    SyncHookError,
)
from ._server import BaseServer
from ._signals import serve_until_signalled
from ._socket_servers import TCPServer, UDPServer
from ._workers import serve_in_workers

# Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 50_000

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999

# The listener options of each kind. Stream listeners take stream handlers,
# datagram listeners datagram handlers; each kind makes one server, so its
# listeners share one concurrency bound, one shutdown and one set of counters.
STREAM_LISTENERS = ("tcp", "unix")
DATAGRAM_LISTENERS = ("udp", "unix_dgram")


def _kind(server: BaseServer, address: Any) -> str:
    """How the start-up line names a listener: TCP, UDP, UNIX or UNIX-DGRAM."""
    stream = not isinstance(server, UDPServer)
    if isinstance(address, tuple):
        kind = "TCP" if stream else "UDP"
    else:
        kind = "UNIX" if stream else "UNIX-DGRAM"
    if getattr(server, "ssl_context", None) is not None:
        kind += "+TLS"
    return kind


class UsageError(Exception):
    """A mistake on the command line, reported as one line and exit status 2."""


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a ``(host, port)`` pair."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 0 to 65535")
    return host, port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _worker_count(text: str) -> int | Literal["auto"]:
    return "auto" if text == "auto" else _positive_int(text)


def format_address(address: Any) -> str:
    """An address as the start-up line shows it: ``HOST:PORT``, ``[V6]:PORT``, path."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return os.fsdecode(address)


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    listeners = parser.add_argument_group(
        "listeners (each repeatable; all stream listeners share one server, "
        "all datagram listeners another)"
    )
    listeners.add_argument(
        "--tcp",
        action="append",
        default=[],
        type=parse_host_port,
        metavar="HOST:PORT",
        help="TCP; port 0 picks a free port",
    )
    listeners.add_argument(
        "--udp",
        action="append",
        default=[],
        type=parse_host_port,
        metavar="HOST:PORT",
        help="UDP",
    )
    listeners.add_argument(
        "--unix", action="append", default=[], metavar="PATH", help="Unix stream socket"
    )
    listeners.add_argument(
        "--unix-dgram",
        action="append",
        default=[],
        metavar="PATH",
        help="Unix datagram socket",
    )
    listeners.add_argument(
        "--fd",
        action="append",
        default=[],
        type=int,
        metavar="N",
        help="an inherited, bound socket (stream or datagram); with no "
        "listener options, sockets passed by systemd are used",
    )
    tls = parser.add_argument_group("TLS (stream listeners)")
    tls.add_argument("--tls-cert", metavar="PEM", help="certificate chain")
    tls.add_argument("--tls-key", metavar="PEM", help="private key (if not in PEM)")
    tls.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds a client has to complete the TLS handshake",
    )
    proxy = parser.add_argument_group(
        "PROXY protocol (every listener; datagram listeners take version 2 only)"
    )
    proxy.add_argument(
        "--proxy-protocol",
        choices=["off", "v1", "v2", "auto"],
        default="off",
        help="expect HAProxy's PROXY header giving the real client (default "
        "off); v1 is for stream listeners only, and auto means v2 on datagram "
        "listeners",
    )
    proxy.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an IP address or network allowed to send PROXY headers, or "
        "'unix' for Unix socket peers (repeatable; needed with --proxy-protocol)",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="grace period for requests in flight at shutdown "
        f"(default {BaseServer.shutdown_timeout})",
    )
    serving.add_argument(
        "--drain-window",
        type=_positive_float,
        metavar="SECONDS",
        help="at shutdown, how long a connection idle between messages may "
        "still deliver one already on its way; also how long a closing "
        f"connection waits for the client to close (default {BaseServer.drain_window})",
    )
    serving.add_argument(
        "--max-requests",
        type=_positive_int,
        metavar="N",
        help="handle at most N requests at once (default: no bound)",
    )
    serving.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="a read or write idle this long ends the request",
    )
    serving.add_argument(
        "--max-per-peer",
        type=_positive_int,
        metavar="N",
        help="handle at most N requests at once from one client host",
    )
    serving.add_argument(
        "--request-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="a request that takes longer is cancelled",
    )
    serving.add_argument(
        "--idle-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="a connection must deliver its next message within this time",
    )
    serving.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help="serve in N worker processes under a supervisor that restarts "
        "any that die; 'auto' for one per core (default: serve in this process)",
    )
    serving.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    serving.add_argument("--log-format", default="text", choices=["text", "json"])


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description="Run socketserver-style services on Trio. Each listener's "
        "real address is printed as 'trioserve: serving KIND on ADDRESS'. The "
        "first SIGINT or SIGTERM shuts down gracefully, a second cancels what "
        "is still running; SIGHUP is ignored.",
    )
    parser.add_argument(
        "--version", action="version", version=f"trioserve {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    echo = commands.add_parser(
        "echo",
        help="serve echo (RFC 862) over TCP and UDP",
        description="Echo every byte back. With no listener options, serves TCP "
        f"and UDP on {DEFAULT_HOST}:{DEFAULT_PORT}; with some, only those.",
    )
    _add_serving_options(echo)
    serve = commands.add_parser(
        "serve",
        help="serve your own handler class",
        description="Serve HANDLER, a request handler class given as "
        "package.module:ClassName (importable from the current directory). A "
        "StreamRequestHandler serves --tcp and --unix listeners, a "
        "DatagramRequestHandler --udp and --unix-dgram ones; with no listener "
        f"options, {DEFAULT_HOST}:{DEFAULT_PORT} over TCP or UDP accordingly.",
    )
    serve.add_argument("handler", metavar="HANDLER", help="package.module:ClassName")
    _add_serving_options(serve)
    return parser


def load_handler(spec: str) -> type[BaseRequestHandler]:
    """Import ``package.module:ClassName`` and check it is a handler class."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UsageError(f"handler {spec!r} is not package.module:ClassName")
    # Like `python -m`, let handlers in the current directory be found even
    # when we run as the installed `trioserve` script.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyncHookError) as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    handler = getattr(module, class_name, None)
    if handler is None:
        raise UsageError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(handler, type) and issubclass(handler, BaseRequestHandler)):
        raise UsageError(f"{spec!r} is not a trioserve request handler class")
    return handler


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server constructor's keyword options that the arguments set."""
    names = {
        "shutdown_timeout": "shutdown_timeout",
        "drain_window": "drain_window",
        "max_requests": "max_concurrent_requests",
        "max_per_peer": "max_connections_per_peer",
        "request_timeout": "request_timeout",
        "idle_timeout": "idle_timeout",
    }
    options = {
        option: getattr(args, name)
        for name, option in names.items()
        if getattr(args, name) is not None
    }
    return options


def _proxy_options(args: argparse.Namespace, *, stream: bool) -> dict[str, Any]:
    """The PROXY protocol options, for stream or datagram servers."""
    if args.proxy_protocol == "off":
        return {}
    if not args.trusted_proxy:
        raise UsageError("--proxy-protocol needs --trusted-proxy")
    if args.proxy_protocol == "v1" and not stream:
        raise UsageError(
            "--proxy-protocol v1 cannot serve datagram listeners (PROXY "
            "version 1 is text for TCP only): use v2 or auto, or give only "
            "stream listeners"
        )
    return {
        "proxy_protocol": args.proxy_protocol,
        "trusted_proxies": args.trusted_proxy,
    }


def _stream_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stream servers' own options: TLS and the PROXY protocol."""
    options = _proxy_options(args, stream=True)
    if args.handshake_timeout is not None:
        options["handshake_timeout"] = args.handshake_timeout
    if args.tls_cert is None:
        if args.tls_key is not None:
            raise UsageError("--tls-key needs --tls-cert")
        return options
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate: {exc}") from None
    options["ssl_context"] = context
    return options


def _server_class_for(sock: socket.socket) -> type[TCPServer]:
    return TCPServer if sock.type == socket.SOCK_STREAM else UDPServer


def build_servers(
    args: argparse.Namespace,
    stream_handler: type[BaseRequestHandler] | None,
    datagram_handler: type[BaseRequestHandler] | None,
    inherited: Sequence[tuple[str, socket.socket]] = (),
) -> list[BaseServer]:
    """The servers the listener options (and ``inherited`` sockets) ask for."""
    options = _server_options(args)
    servers: list[BaseServer] = []
    for names, server_class, handler, needed in (
        (STREAM_LISTENERS, TCPServer, stream_handler, "StreamRequestHandler"),
        (DATAGRAM_LISTENERS, UDPServer, datagram_handler, "DatagramRequestHandler"),
    ):
        addresses = [address for name in names for address in getattr(args, name)]
        if not addresses:
            continue
        if handler is None:
            given = [name for name in names if getattr(args, name)]
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} needs a {needed}; the handler is not one")
        if server_class is TCPServer:
            kwargs = {**options, **_stream_options(args)}
        else:
            kwargs = {**options, **_proxy_options(args, stream=False)}
        first, *extra = addresses
        servers.append(server_class(first, handler, extra_addresses=extra, **kwargs))
    sockets = [(f"--fd {fd}", socket.socket(fileno=fd)) for fd in args.fd]
    sockets += [(f"socket {name!r} from systemd", sock) for name, sock in inherited]
    for source, sock in sockets:
        server_class = _server_class_for(sock)
        stream = server_class is TCPServer
        handler = stream_handler if stream else datagram_handler
        if handler is None:
            needed = "StreamRequestHandler" if stream else "DatagramRequestHandler"
            raise UsageError(f"{source} needs a {needed}; the handler is not one")
        own = _stream_options(args) if stream else _proxy_options(args, stream=False)
        kwargs = {**options, **own}
        servers.append(server_class.from_socket(sock, handler, **kwargs))
    return servers


# Workers bind their addresses through the supervisor; a socket handed to
# the process has no address to bind again.
WORKERS_NEED_ADDRESSES = "--workers cannot serve --fd or socket-activated sockets"


def _inherited(server: BaseServer) -> bool:
    """Whether the server serves a socket it was handed, not one it binds."""
    return isinstance(server, TCPServer) and server.binding == "adopted"


def _with_timeout(
    handler: type[BaseRequestHandler], timeout: float | None
) -> type[BaseRequestHandler]:
    if timeout is None:
        return handler
    return type(handler.__name__, (handler,), {"timeout": timeout})


def _servers_for(args: argparse.Namespace) -> list[BaseServer]:
    default = [(DEFAULT_HOST, DEFAULT_PORT)]
    any_listener = args.tcp or args.udp or args.unix or args.unix_dgram or args.fd
    # Socket activation stands in for listener options; with them, the
    # sockets systemd passed are not ours to use.
    inherited = [] if any_listener else systemd_sockets()
    if args.command == "echo":
        if not any_listener and not inherited:
            args.tcp = args.udp = default
        stream: type[BaseRequestHandler] | None = EchoStreamHandler
        datagram: type[BaseRequestHandler] | None = EchoDatagramHandler
    else:
        handler = load_handler(args.handler)
        is_datagram = issubclass(handler, DatagramRequestHandler)
        is_stream = issubclass(handler, StreamRequestHandler)
        stream = None if is_datagram else handler
        datagram = None if is_stream else handler
        if not any_listener and not inherited:
            if is_datagram:
                args.udp = default
            else:
                args.tcp = default
    if stream is not None:
        stream = _with_timeout(stream, args.timeout)
    return build_servers(args, stream, datagram, inherited)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, log_format: str, *, worker: bool = False) -> None:
    """Log to standard error; a worker's lines say which worker wrote them."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        source = "%(name)s [%(processName)s]" if worker else "%(name)s"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {source}: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])


class _AnnounceListeners:
    """A task status that prints each listener's real address once serving.

    Passed as ``task_status`` so the announcement needs no nursery of its
    own: a bind failure then reaches ``main`` as the plain ``OSError`` it is.
    """

    def __init__(self, servers: list[BaseServer]) -> None:
        self.servers = servers

    def started(self, addresses: list[Any] | None = None) -> None:
        for server in self.servers:
            listening = getattr(server, "server_addresses", [server.server_address])
            for address in listening:
                kind = _kind(server, address)
                print(
                    f"trioserve: serving {kind} on {format_address(address)}",
                    flush=True,
                )


def _tune_gc() -> None:
    # Everything made so far lives as long as the process: move it out of
    # the collector's sight, and let garbage gather longer between young
    # collections, which with many live tasks cost more than they free.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _run(servers: list[BaseServer]) -> bool:
    _tune_gc()
    return await serve_until_signalled(servers, task_status=_AnnounceListeners(servers))


class _WorkerServers:
    """What ``--workers`` serves: the servers the arguments ask for.

    The supervisor's call returns the servers already made (and checked)
    from the arguments; each worker, which gets a pickled copy without
    them, sets up logging and makes its own.
    """

    def __init__(self, args: argparse.Namespace, servers: list[BaseServer]) -> None:
        self.args = args
        self.servers: list[BaseServer] | None = servers

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args, "servers": None}

    def __call__(self) -> list[BaseServer]:
        if self.servers is not None:
            servers, self.servers = self.servers, None
            return servers
        _configure_logging(self.args.log_level, self.args.log_format, worker=True)
        servers = _servers_for(self.args)
        _tune_gc()
        return servers


async def _run_workers(args: argparse.Namespace, servers: list[BaseServer]) -> bool:
    return await serve_in_workers(
        _WorkerServers(args, servers),
        args.workers,
        task_status=_AnnounceListeners(servers),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 after a graceful shutdown, 1 if a second signal forced it, 2 for a
    mistake in the arguments or an address that cannot be served.
    """
    args = _build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    try:
        # --fd is refused before its socket is taken; systemd's sockets show
        # only once the servers are made.
        if args.workers is not None and args.fd:
            raise UsageError(WORKERS_NEED_ADDRESSES)
        servers = _servers_for(args)
        if args.workers is None:
            graceful = trio.run(_run, servers)
        elif any(_inherited(server) for server in servers):
            raise UsageError(WORKERS_NEED_ADDRESSES)
        else:
            graceful = trio.run(_run_workers, args, servers)
    except UsageError as exc:
        print(f"trioserve: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"trioserve: error: cannot serve: {exc}", file=sys.stderr)
        return 2
    return 0 if graceful else 1
