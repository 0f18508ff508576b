"""The command line: ``trioserve echo`` and ``trioserve serve MODULE:HANDLER``."""

from __future__ import annotations

import argparse
import gc
import importlib
import ipaddress
import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NoReturn

import trio

from . import __version__, _service
from ._activation import systemd_sockets
from ._keepalive import parse_tcp_keepalive
from ._metrics import MetricsServer, render_metrics, time_requests
from ._names import format_address, listener_kind
from ._server import BaseServer
from ._service import (
    DATAGRAM_LISTENERS,
    STREAM_LISTENERS,
    HandlerImportError,
    Service,
    UsageError,
    make_servers,
    reload_tls,
)
from ._signals import serve_until_signalled
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


def _tcp_keepalive(text: str) -> tuple[int, int, int]:
    try:
        return parse_tcp_keepalive(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_count(text: str) -> int | Literal["auto"]:
    return "auto" if text == "auto" else _positive_int(text)


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
        "--tcp-keepalive",
        type=_tcp_keepalive,
        metavar="IDLE[,INTERVAL,COUNT]",
        help="probe idle TCP connections: after IDLE seconds of silence, every "
        "INTERVAL seconds (default 10), COUNT times (default 6), then drop the "
        "connection (default: the system's settings)",
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
        "--metrics",
        type=parse_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (with "
        "--workers, from the supervisor: the sums over workers, and each "
        "worker's own as trioserve_worker_*)",
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
        "is still running. SIGHUP reloads: the TLS certificate and key in "
        "place, or with --workers, fresh workers that import the handler "
        "again take over without dropping a client.",
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
    ours = (_service.__file__, importlib.__file__)
    return filename not in ours and not filename.startswith("<frozen importlib")


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


def _announce(servers: Sequence[BaseServer]) -> None:
    """Print each listener's real address: the start-up lines."""
    for server in servers:
        listening = getattr(server, "server_addresses", [server.server_address])
        for address in listening:
            if isinstance(server, MetricsServer):
                kind = "METRICS"
            else:
                kind = listener_kind(server, address)
            print(f"trioserve: serving {kind} on {format_address(address)}", flush=True)


class _AnnounceListeners:
    """A task status that prints the start-up lines once the servers serve.

    Passed as ``task_status`` so the announcement needs no nursery of its
    own: a bind failure then reaches ``main`` as the plain ``OSError`` it is.
    """

    def __init__(self, servers: Sequence[BaseServer]) -> None:
        self.servers = servers

    def started(self, addresses: list[Any] | None = None) -> None:
        _announce(self.servers)


def _tune_gc() -> None:
    # Everything made so far lives as long as the process: move it out of
    # the collector's sight, and let garbage gather longer between young
    # collections, which with many live tasks cost more than they free.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _run(service: Service, servers: list[BaseServer]) -> bool:
    # What a single process can reload: the TLS files.
    reload = None if service.tls_cert is None else partial(reload_tls, service, servers)
    if service.metrics is not None:
        # Served, shut down and announced like the others; it does not
        # count itself.
        time_requests(servers)
        metrics = MetricsServer(service.metrics, partial(render_metrics, servers))
        servers = [*servers, metrics]
    _tune_gc()
    return await serve_until_signalled(
        servers, reload=reload, task_status=_AnnounceListeners(servers)
    )


def worker_servers(
    service: Service, log_level: str, log_format: str
) -> list[BaseServer]:
    """What ``--workers`` serves: the worker factory is a partial of this.

    Called in the supervisor, where ``main`` has set up logging already (so
    ``basicConfig`` leaves it as it is), and first thing in each worker,
    where it sets up logging that says which worker wrote each line.
    """
    _configure_logging(log_level, log_format, worker=True)
    servers = make_servers(service)
    _tune_gc()
    return servers


async def _run_workers(service: Service, args: argparse.Namespace) -> bool:
    factory = partial(worker_servers, service, args.log_level, args.log_format)
    return await serve_in_workers(
        factory, args.workers, announce=_announce, metrics=service.metrics
    )


def describe(
    args: argparse.Namespace, inherited: Sequence[tuple[str, int]] = ()
) -> Service:
    """The service the arguments ask for: a pure function of them.

    ``inherited`` are sockets systemd passed (each as where it came from
    and its file descriptor), used when no listener option is given.
    """
    given = [getattr(args, name) for name in (*STREAM_LISTENERS, *DATAGRAM_LISTENERS)]
    sockets = [(f"--fd {fd}", fd) for fd in args.fd]
    if not sockets and not any(given):
        sockets = list(inherited)
    # With nothing to listen on given, and no socket passed, the default.
    default = None if any(given) or sockets else (DEFAULT_HOST, DEFAULT_PORT)
    server_options = {
        option: value
        for option, value in (
            ("shutdown_timeout", args.shutdown_timeout),
            ("drain_window", args.drain_window),
            ("max_concurrent_requests", args.max_concurrent),
            ("max_connections_per_peer", args.max_per_peer),
            ("request_timeout", _timeout_setting(args.request_timeout, None)),
            (
                "idle_timeout",
                _timeout_setting(args.idle_timeout, DEFAULT_IDLE_TIMEOUT),
            ),
        )
        if value is not None
    }
    return Service(
        handler=None if args.command == "echo" else args.handler,
        tcp=tuple(args.tcp),
        udp=tuple(args.udp),
        unix=tuple(args.unix),
        unix_dgram=tuple(args.unix_dgram),
        sockets=tuple(sockets),
        default_address=default,
        server_options=server_options,
        proxy_protocol=args.proxy_protocol,
        trusted_proxies=tuple(args.trusted_proxy),
        handshake_timeout=args.handshake_timeout,
        tcp_keepalive=args.tcp_keepalive,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        timeout=_timeout_setting(args.timeout, DEFAULT_TIMEOUT),
        timeout_given=args.timeout is not None,
        metrics=args.metrics,
    )


def _systemd_sockets() -> list[tuple[str, int]]:
    """The sockets systemd passed, as ``describe`` takes them."""
    return [
        (f"socket {name!r} from systemd", sock.detach())
        for name, sock in systemd_sockets()
    ]


# Workers bind their addresses through the supervisor; a socket handed to
# the process has no address to bind again.
WORKERS_NEED_ADDRESSES = "--workers cannot serve --fd or socket-activated sockets"


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
        service = describe(args, _systemd_sockets())
        if args.workers is None:
            graceful = trio.run(_run, service, make_servers(service))
        elif service.sockets:
            raise UsageError(WORKERS_NEED_ADDRESSES)
        else:
            graceful = trio.run(_run_workers, service, args)
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
