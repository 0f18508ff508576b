"""The command line: ``python -m trioserve echo``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack

import trio

from . import __version__
from ._echo import EchoDatagramHandler, EchoStreamHandler
from ._server import LOGGER
from ._socket_servers import TCPServer, UDPServer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999


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


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description="Run socketserver-style services on Trio.",
    )
    parser.add_argument(
        "--version", action="version", version=f"trioserve {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    echo = commands.add_parser(
        "echo",
        help="serve TCP and UDP echo",
        description=(
            "Echo every byte back (RFC 862). With no listener options, serves TCP "
            f"and UDP on {DEFAULT_HOST}:{DEFAULT_PORT}; with some, serves only "
            "those. Runs until SIGINT or SIGTERM, then shuts down gracefully; a "
            "second signal cancels the requests still running."
        ),
    )
    echo.add_argument(
        "--tcp",
        action="append",
        default=[],
        type=parse_host_port,
        metavar="HOST:PORT",
        help="serve TCP echo here (repeatable; port 0 picks a free port)",
    )
    echo.add_argument(
        "--udp",
        action="append",
        default=[],
        type=parse_host_port,
        metavar="HOST:PORT",
        help="serve UDP echo here (repeatable)",
    )
    return parser


async def serve_until_signalled(servers: Sequence[TCPServer]) -> bool:
    """Run ``servers`` until SIGINT or SIGTERM; return True if shutdown was graceful.

    Each server binds first, so a bad address fails before anything serves,
    then one line per listener reports its real address on stdout. The first
    signal shuts every server down gracefully; a second cancels the
    requests still running.
    """
    shutting_down = forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            async with trio.open_nursery() as nursery:

                async def shut_down_all() -> None:
                    async with trio.open_nursery() as shutdowns:
                        for server in servers:
                            shutdowns.start_soon(server.shutdown)
                    # Every serve_forever has returned; stop watching signals.
                    nursery.cancel_scope.cancel()

                for server in servers:
                    await nursery.start(server.serve_forever)
                    print(
                        f"trioserve: serving {_kind(server)} "
                        f"on {format_address(server.server_address)}",
                        flush=True,
                    )
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if shutting_down:
                        LOGGER.warning("%s again: cancelling every request", name)
                        forced = True
                        nursery.cancel_scope.cancel()
                    else:
                        in_flight = sum(s.stats.active for s in servers)
                        LOGGER.warning(
                            "%s: shutting down; %d requests in flight get up to %s s",
                            name,
                            in_flight,
                            max(s.shutdown_timeout for s in servers),
                        )
                        shutting_down = True
                        nursery.start_soon(shut_down_all)
    return not forced


def _kind(server: TCPServer) -> str:
    return "UDP" if isinstance(server, UDPServer) else "TCP"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tcp, udp = args.tcp, args.udp
    if not tcp and not udp:
        tcp = udp = [(DEFAULT_HOST, DEFAULT_PORT)]
    servers: list[TCPServer] = [TCPServer(a, EchoStreamHandler) for a in tcp]
    servers += [UDPServer(a, EchoDatagramHandler) for a in udp]
    try:
        graceful = trio.run(serve_until_signalled, servers)
    except OSError as exc:
        print(f"trioserve: cannot serve: {exc}", file=sys.stderr)
        return 2
    return 0 if graceful else 1
