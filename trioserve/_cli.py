"""The command line: ``trioserve echo`` and ``trioserve serve MODULE:HANDLER``."""

from __future__ import annotations

import argparse
import gc
import importlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

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

# The command line's timeouts (the library's are None: no limit). Between
# them they cut off both slow attacks without cutting off a slow but honest
# client: the idle timeout bounds how long a client may take to send its next
# message (a client trickling one byte a second is cut off), and the
# handler's timeout how long one read or write may make no progress (a client
# that stops reading its replies is cut off). The idle timeout is the shorter,
# so that a client that merely goes quiet is let go without an error.
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_TIMEOUT = 120.0

# Exit statuses (main's docstring and docs/deploying.rst list them).
EXIT_FORCED = 1
EXIT_USAGE = 2
EXIT_IMPORT_FAILED = 3

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


class HandlerImportError(Exception):
    """The handler's module raised while it was imported: the user's bug."""

    def __init__(self, module_name: str, error: BaseException) -> None:
        super().__init__(module_name, error)
        self.module_name = module_name
        self.error = error


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a mistake in one line, with a pointer to ``--help``.

    argparse's own ``error`` prints the whole usage first, which pushes the
    one line that matters below a screenful of options.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message}\n"
            f"(run '{self.prog} --help' for the options)\n",
        )


# A host name as RFC 1123 allows it: dot-separated labels of letters, digits
# and hyphens (underscores too, which some resolvers accept).
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _check_host(host: str, text: str) -> None:
    """Refuse a host that cannot be an IP address or a host name.

    Checks the spelling only: looking a name up would need DNS, which may be
    down (or not yet up) while the command line is read.
    """
    if host == "":
        return  # every interface
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {host!r} is not a valid IPv6 address"
            ) from None
        return
    if re.fullmatch(r"[0-9.]+", host):
        # All digits and dots: no host name looks like that.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {host!r} is not a valid IPv4 address"
            ) from None
        return
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {host!r} is not a valid host name or IP address"
        )


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a ``(host, port)`` pair.

    An empty host (``:9999``) is every interface.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    _check_host(host, text)
    if not port_text.isdigit():  # isdigit: no sign, no spaces
        raise argparse.ArgumentTypeError(
            f"{text!r}: the port {port_text!r} is not a number"
        )
    port = int(port_text)
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


def _seconds_or_off(text: str) -> float:
    """A number of seconds, or ``off`` (as infinity) for no limit."""
    return math.inf if text == "off" else _positive_float(text)


def _timeout_setting(value: float | None, default: float | None) -> float | None:
    """A timeout option's value: ``default`` if not given, None if ``off``."""
    if value is None:
        return default
    return None if value == math.inf else value


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
        help="TCP; [::1]:PORT for IPv6, :PORT for all interfaces, port 0 "
        "for a free port",
    )
    listeners.add_argument(
        "--udp",
        action="append",
        default=[],
        type=parse_host_port,
        metavar="HOST:PORT",
        help="UDP, written as for --tcp",
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
        "--max-concurrent",
        type=_positive_int,
        metavar="N",
        help="handle at most N requests at once; at the bound, stop accepting "
        "(default: no bound)",
    )
    # The old name, which read like gunicorn's "restart after N requests".
    serving.add_argument(
        "--max-requests",
        dest="max_concurrent",
        type=_positive_int,
        help=argparse.SUPPRESS,
    )
    serving.add_argument(
        "--timeout",
        type=_seconds_or_off,
        metavar="SECONDS",
        help="a read or write of a stream handler that makes no progress for "
        "this long ends the request: cuts off a client that stops reading "
        f"(default {DEFAULT_TIMEOUT:g}, or the handler class's own timeout; "
        "'off' for none)",
    )
    serving.add_argument(
        "--max-per-peer",
        type=_positive_int,
        metavar="N",
        help="handle at most N requests at once from one client host",
    )
    serving.add_argument(
        "--request-timeout",
        type=_seconds_or_off,
        metavar="SECONDS",
        help="a request (a whole connection, for a stream handler) that "
        "takes longer is cancelled (default off)",
    )
    serving.add_argument(
        "--idle-timeout",
        type=_seconds_or_off,
        metavar="SECONDS",
        help="a connection must deliver its next whole message within this "
        "time: cuts off a client that trickles bytes, and lets a silent one "
        f"go (default {DEFAULT_IDLE_TIMEOUT:g}; 'off' for none)",
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


EXIT_STATUSES = (
    "exit status: 0 after a graceful shutdown, 1 if a second signal forced "
    "it, 2 for a mistake in the arguments or an address that cannot be served, "
    "3 if the handler's module raised an exception while it was imported."
)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="trioserve",
        description="Run socketserver-style services on Trio. Each listener's "
        "real address is printed as 'trioserve: serving KIND on ADDRESS'. The "
        "first SIGINT or SIGTERM shuts down gracefully, a second cancels what "
        "is still running; SIGHUP is ignored.",
        epilog=EXIT_STATUSES,
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
        epilog=EXIT_STATUSES,
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
        epilog=EXIT_STATUSES,
    )
    serve.add_argument("handler", metavar="HANDLER", help="package.module:ClassName")
    _add_serving_options(serve)
    return parser


def _is_missing(module_name: str, error: ImportError) -> bool:
    """Whether ``error`` says ``module_name`` (or a package of it) is absent.

    Not an import that fails inside the module: that is the module's bug.
    """
    if not isinstance(error, ModuleNotFoundError) or error.name is None:
        return False
    return module_name == error.name or module_name.startswith(error.name + ".")


def load_handler(spec: str) -> type[BaseRequestHandler]:
    """Import ``package.module:ClassName`` and check it is a handler class.

    Raises:
      UsageError: ``spec`` names no module, or no handler class in it.
      HandlerImportError: The module raised while it was imported.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UsageError(f"handler {spec!r} is not package.module:ClassName")
    # Like `python -m`, let handlers in the current directory be found even
    # when we run as the installed `trioserve` script.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyncHookError as exc:
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        if not _is_missing(module_name, exc):
            raise HandlerImportError(module_name, exc) from None
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # SyntaxError too: whatever the module raised
        raise HandlerImportError(module_name, exc) from None
    handler = getattr(module, class_name, None)
    if handler is None:
        raise UsageError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(handler, type) and issubclass(handler, BaseRequestHandler)):
        raise UsageError(f"{spec!r} is not a trioserve request handler class")
    if handler.handle is BaseRequestHandler.handle:
        raise UsageError(
            f"{spec!r} does not override handle(), so it would close every "
            "connection at once"
        )
    return handler


def _print_import_failure(failure: HandlerImportError) -> None:
    """The traceback of the user's module, without importlib's frames."""
    error = failure.error
    tb = error.__traceback__
    # The frames before the module's own are ours and importlib's.
    while tb is not None and not _in_users_code(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    print(
        f"trioserve: error: importing {failure.module_name!r} failed:",
        file=sys.stderr,
    )
    traceback.print_exception(type(error), error, tb, file=sys.stderr)


def _in_users_code(filename: str) -> bool:
    return filename not in (__file__, importlib.__file__) and not filename.startswith(
        "<frozen importlib"
    )


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server constructor's keyword options that the arguments set."""
    names = {
        "shutdown_timeout": "shutdown_timeout",
        "drain_window": "drain_window",
        "max_concurrent": "max_concurrent_requests",
        "max_per_peer": "max_connections_per_peer",
    }
    options = {
        option: getattr(args, name)
        for name, option in names.items()
        if getattr(args, name) is not None
    }
    timeouts = {
        "request_timeout": _timeout_setting(args.request_timeout, None),
        "idle_timeout": _timeout_setting(args.idle_timeout, DEFAULT_IDLE_TIMEOUT),
    }
    options.update(
        (name, value) for name, value in timeouts.items() if value is not None
    )
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
    options["ssl_context"] = _tls_context(args.tls_cert, args.tls_key)
    return options


class _EncryptedKey(Exception):
    pass


def _no_password() -> NoReturn:
    # Asked only for an encrypted key; without this OpenSSL would prompt on
    # the terminal, which a service does not have.
    raise _EncryptedKey


def _tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """A server context from ``--tls-cert`` and ``--tls-key``.

    A failure names the file at fault and what is wrong with it; OpenSSL's
    own errors ("PEM lib") say neither.
    """
    cert_file = f"{cert} (--tls-cert)"
    key_file = cert_file if key is None else f"{key} (--tls-key)"
    contents = {}
    for path, name in ((cert, cert_file), (key, key_file)):
        if path is None:
            continue
        try:
            with open(path, "rb") as file:
                contents[path] = file.read()
        except OSError as exc:
            raise UsageError(
                f"cannot load the TLS certificate: cannot read {name}: "
                f"{exc.strerror or exc}"
            ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        problem = f"the private key in {key_file} is encrypted; give it unencrypted"
    except ssl.SSLError as exc:
        problem = _tls_problem(exc, cert, cert_file, contents[key or cert], key_file)
    else:
        return context
    raise UsageError(f"cannot load the TLS certificate: {problem}")


def _tls_problem(
    error: ssl.SSLError, cert: str, cert_file: str, key_pem: bytes, key_file: str
) -> str:
    """What is wrong, in words, when ``load_cert_chain`` failed."""
    if error.reason == "KEY_VALUES_MISMATCH":
        return (
            f"the private key in {key_file} does not match the certificate "
            f"in {cert_file}"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"{cert_file} holds no valid PEM certificate"
    if b"PRIVATE KEY-----" not in key_pem:
        if key_file == cert_file:
            return f"{cert_file} holds no private key; give it with --tls-key"
        return f"{key_file} holds no PEM private key"
    return f"{cert_file} with the key in {key_file}: {error}"


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
    handler: type[StreamRequestHandler], timeout: float | None
) -> type[StreamRequestHandler]:
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
    if stream is not None and issubclass(stream, StreamRequestHandler):
        # The command line's default, unless the handler class has its own.
        own = stream.timeout
        timeout = _timeout_setting(
            args.timeout, DEFAULT_TIMEOUT if own is None else own
        )
        if timeout != own:
            stream = _with_timeout(stream, timeout)
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
    mistake in the arguments or an address that cannot be served (one line
    on standard error), 3 if the handler's module raised an exception while
    it was imported (its traceback on standard error).
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
        return EXIT_USAGE
    except HandlerImportError as exc:
        _print_import_failure(exc)
        return EXIT_IMPORT_FAILED
    except (OSError, RuntimeError) as exc:
        print(f"trioserve: error: cannot serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if graceful else EXIT_FORCED
