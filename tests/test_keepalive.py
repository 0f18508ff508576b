"""TCP keepalive on accepted connections: ``tcp_keepalive``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from support.servers import connect, roundtrip, serving

import trioserve
from trioserve._keepalive import parse_tcp_keepalive

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_KEEPIDLE"), reason="needs Linux's keepalive options"
)


def keepalive_of(sock: trio.socket.SocketType) -> tuple[int, int, int, int]:
    """``(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT)`` of ``sock``."""
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


class ReportKeepalive(trioserve.StreamRequestHandler):
    """Answers with its connection's keepalive options, as four numbers."""

    async def handle(self) -> None:
        sock = self.request.socket
        if sock.family == socket.AF_UNIX:
            report = b"unix"
        else:
            report = b" ".join(b"%d" % value for value in keepalive_of(sock))
        await self.wfile.write(report + b"\n")


async def report_of(server: trioserve.TCPServer) -> bytes:
    with trio.fail_after(10):
        async with await connect(server) as stream:
            return await roundtrip(stream, b"")


async def test_accepted_connections_get_the_keepalive_times() -> None:
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), ReportKeepalive, tcp_keepalive=(30, 5, 4)
    )
    async with serving(server):
        assert await report_of(server) == b"1 30 5 4\n"
        # The listening socket is left alone.
        assert keepalive_of(server.socket)[0] == 0


async def test_keepalive_seconds_round_up_to_whole_seconds() -> None:
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), ReportKeepalive, tcp_keepalive=(29.2, 0.5, 2)
    )
    assert server.tcp_keepalive == (30, 1, 2)
    async with serving(server):
        assert await report_of(server) == b"1 30 1 2\n"


async def test_keepalive_as_a_class_attribute() -> None:
    class KeepaliveServer(trioserve.TCPServer):
        tcp_keepalive = (45, 7, 3)

    server = KeepaliveServer(("127.0.0.1", 0), ReportKeepalive)
    async with serving(server):
        assert await report_of(server) == b"1 45 7 3\n"


async def test_keepalive_set_after_construction_counts_from_serving_on() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), ReportKeepalive)
    server.tcp_keepalive = (50, 6, 5)
    async with serving(server):
        assert await report_of(server) == b"1 50 6 5\n"


async def test_bad_keepalive_set_after_construction_fails_serving() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), ReportKeepalive)
    server.tcp_keepalive = (50, 6, 0)
    async with server:
        # Raised inside serving's nurseries, which wrap it.
        with pytest.raises(BaseExceptionGroup) as caught:
            await server.serve_forever()
    assert caught.group_contains(ValueError, match="count", depth=None)


async def test_without_keepalive_the_system_default_stays() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), ReportKeepalive)
    assert server.tcp_keepalive is None
    async with serving(server):
        assert (await report_of(server)).startswith(b"0 ")


async def test_unix_connections_are_left_alone(short_tmp: Path) -> None:
    path = str(short_tmp / "keepalive.sock")
    server = trioserve.TCPServer(
        ("127.0.0.1", 0),
        ReportKeepalive,
        extra_addresses=[path],
        tcp_keepalive=(30, 5, 4),
    )
    async with serving(server):
        assert await report_of(server) == b"1 30 5 4\n"
        with trio.fail_after(10):
            async with await trio.open_unix_socket(path) as stream:
                assert await roundtrip(stream, b"") == b"unix\n"


async def test_a_unix_stream_server_takes_the_option(short_tmp: Path) -> None:
    path = str(short_tmp / "keepalive.sock")
    server = trioserve.UnixStreamServer(path, ReportKeepalive, tcp_keepalive=(30, 5, 4))
    async with serving(server):
        with trio.fail_after(10):
            async with await trio.open_unix_socket(path) as stream:
                assert await roundtrip(stream, b"") == b"unix\n"


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ((0, 5, 4), "idle"),
        ((-1, 5, 4), "idle"),
        ((30, 0, 4), "interval"),
        ((30, 40000, 4), "interval"),
        ((float("nan"), 5, 4), "idle"),
        ((30, 5, 0), "count"),
        ((30, 5, 2.5), "count"),
        ((30, 5, 200), "count"),
        ((True, 5, 4), "idle"),
        (("30", 5, 4), "idle"),
        ((30, 5), r"\(idle, interval, count\)"),
        (30, r"\(idle, interval, count\)"),
        ("30,5,4", r"\(idle, interval, count\)"),
    ],
)
def test_a_bad_keepalive_raises_at_construction(value: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        trioserve.TCPServer(("127.0.0.1", 0), ReportKeepalive, tcp_keepalive=value)


def test_a_datagram_server_refuses_keepalive() -> None:
    with pytest.raises(ValueError, match="stream server"):
        trioserve.UDPServer(
            ("127.0.0.1", 0), trioserve.DatagramRequestHandler, tcp_keepalive=(1, 1, 1)
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60", (60, 10, 6)),
        ("60,5,3", (60, 5, 3)),
        (" 60 , 5 , 3 ", (60, 5, 3)),
        ("0.5,1.5,1", (1, 2, 1)),
    ],
)
def test_parse_tcp_keepalive(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_tcp_keepalive(text) == expected


@pytest.mark.parametrize("text", ["", "60,5", "60,5,3,1", "x", "60,5,3.5", "0", "-1"])
def test_parse_tcp_keepalive_refuses_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"(?i)keepalive"):
        parse_tcp_keepalive(text)
