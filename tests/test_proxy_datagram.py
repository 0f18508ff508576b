"""The PROXY protocol on datagram servers: UDPServer and UnixDatagramServer.

A socket of the test plays the proxy: it sends each datagram with a version 2
header naming a client, and must get the reply, since the proxy relays it to
the client. Every socket is real and on loopback (or a Unix socket under
/tmp), and every wait is bounded.

A handler that replies to every datagram with what it was given lets the
tests read ``client_address``, ``reply_address`` and ``packet`` off the wire.
A handler that never waits is done with each datagram in the task that
received it, in order, so once the reply to a later datagram has arrived,
the ones before it have been dealt with; the counters are read after
``serving`` has shut the server down, when no request is left in flight.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from support.cli import IO_TIMEOUT, assert_clean, run_echo
from support.proxy_headers import build_v1, build_v2
from support.servers import ipv6_loopback_available, serving

import trioserve
from trioserve._proxy import V2_SIGNATURE, ProxyProtocolError, parse_proxy_header

# Bounds each test's body: far longer than any of them takes.
TEST_TIMEOUT = 2 * IO_TIMEOUT

# A client behind the proxy, and the address it sent to (the proxy's own).
CLIENT = ("203.0.113.7", 40000)
FRONT = ("192.0.2.1", 5353)


class WhoAmI(trioserve.DatagramRequestHandler):
    """Replies with ``(client_address, reply_address, packet)``, as a repr."""

    async def handle(self) -> None:
        seen = (self.client_address, self.reply_address, self.packet)
        await self.wfile.write(repr(seen).encode())


class WaitingWhoAmI(WhoAmI):
    """The same, after a wait: it goes on in a task of its own."""

    async def handle(self) -> None:
        await trio.lowlevel.checkpoint()
        await super().handle()


HANDLERS = pytest.mark.parametrize(
    "handler", [WhoAmI, WaitingWhoAmI], ids=["in-place", "waits"]
)


def relayed(payload: bytes, source: Any = CLIENT, destination: Any = FRONT) -> bytes:
    """A datagram as a proxy relays it: a v2 header for UDP, then the payload."""
    return build_v2(source, destination, protocol="DGRAM") + payload


def proxied_udp_server(
    handler: type[trioserve.BaseRequestHandler] = WhoAmI,
    *,
    host: str = "127.0.0.1",
    mode: Literal["off", "v1", "v2", "auto"] = "v2",
    trusted: tuple[str, ...] = ("127.0.0.1",),
) -> trioserve.UDPServer:
    return trioserve.UDPServer(
        (host, 0),
        handler,
        proxy_protocol=mode,
        trusted_proxies=list(trusted),
    )


async def bound_socket(address: Any) -> trio.socket.SocketType:
    """A datagram socket bound to ``address``: a ``(host, port)`` or a path."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def ask(
    sock: trio.socket.SocketType, server: trioserve.UDPServer, datagram: bytes
) -> tuple[Any, Any, bytes]:
    """Send ``datagram``; return what the handler saw, from its reply."""
    await sock.sendto(datagram, server.server_address)
    with trio.fail_after(IO_TIMEOUT):
        reply, sender = await sock.recvfrom(65536)
    assert sender == server.server_address
    seen = ast.literal_eval(reply.decode())
    assert isinstance(seen, tuple)
    return seen


def bystander() -> socket.socket:
    """A plain UDP socket on loopback, to check it receives nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def assert_nothing_received(sock: socket.socket) -> None:
    """Nothing waits on ``sock`` (loopback delivers within the send call)."""
    with pytest.raises(BlockingIOError):
        sock.recv(65536, socket.MSG_DONTWAIT)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Under /tmp, not pytest's tmp_path: a Unix socket path has at most 108
    # bytes, which tmp_path may exceed.
    path = tempfile.mkdtemp(dir="/tmp", prefix="tspd-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- relayed datagrams --------------------------------------------------------


@HANDLERS
@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (CLIENT, FRONT, CLIENT),
        (("2001:db8::1", 5000), ("2001:db8::2", 53), ("2001:db8::1", 5000, 0, 0)),
    ],
    ids=["ipv4", "ipv6"],
)
async def test_the_header_gives_the_client_and_the_reply_goes_to_the_proxy(
    handler: type[WhoAmI], source: Any, destination: Any, expected: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(handler)
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy:
                seen = await ask(
                    proxy, server, relayed(b"payload", source, destination)
                )
                assert seen == (expected, proxy.getsockname(), b"payload")
                # The next datagram from the same proxy may be for another client.
                seen = await ask(proxy, server, relayed(b"two", ("198.51.100.9", 9)))
                assert seen == (("198.51.100.9", 9), proxy.getsockname(), b"two")
    stats = server.stats
    assert (stats.accepted, stats.completed, stats.dropped) == (2, 2, 0)


async def test_the_reply_goes_to_the_sender_not_to_the_client_in_the_header() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server()
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy, bystander() as client:
                # The header names a socket that could receive the reply.
                datagram = relayed(b"hello", client.getsockname())
                seen = await ask(proxy, server, datagram)
                assert seen == (client.getsockname(), proxy.getsockname(), b"hello")
                assert_nothing_received(client)


async def test_the_handler_gets_the_payload_only() -> None:
    class Echo(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            assert self.request[0] == self.packet
            await self.wfile.write(await self.rfile.read())

    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(Echo)
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy:
                # A header with TLVs, as a proxy may send, is taken off whole.
                header = build_v2(
                    CLIENT, FRONT, protocol="DGRAM", tlvs=[(0x05, b"an id")]
                )
                await proxy.sendto(header + b"line 1\nline 2\n", server.server_address)
                assert await proxy.recv(65536) == b"line 1\nline 2\n"


async def test_verify_request_sees_the_proxy_and_the_datagram_as_received() -> None:
    verified: list[tuple[bytes, Any]] = []

    class Verifying(trioserve.UDPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            verified.append((request[0], client_address))
            return True

    with trio.fail_after(TEST_TIMEOUT):
        server = Verifying(
            ("127.0.0.1", 0),
            WhoAmI,
            proxy_protocol="v2",
            trusted_proxies=["127.0.0.1"],
        )
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy:
                datagram = relayed(b"payload")
                seen = await ask(proxy, server, datagram)
                assert seen == (CLIENT, proxy.getsockname(), b"payload")
                assert verified == [(datagram, proxy.getsockname())]


@HANDLERS
async def test_a_local_header_leaves_the_sender_as_the_client(
    handler: type[WhoAmI],
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(handler)
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy:
                # A proxy's own health check.
                datagram = build_v2(command="LOCAL") + b"are you there?"
                seen = await ask(proxy, server, datagram)
                me = proxy.getsockname()
                assert seen == (me, me, b"are you there?")
                # PROXY with the AF_UNSPEC family names no client either.
                seen = await ask(proxy, server, build_v2(protocol="DGRAM") + b"x")
                assert seen == (me, me, b"x")
    assert server.stats.completed == 2


async def test_auto_means_v2() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(mode="auto")
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as proxy:
                seen = await ask(proxy, server, relayed(b"payload"))
                assert seen == (CLIENT, proxy.getsockname(), b"payload")


async def test_without_proxy_protocol_the_reply_address_is_the_client() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = trioserve.UDPServer(("127.0.0.1", 0), WhoAmI)
        async with serving(server):
            with await bound_socket(("127.0.0.1", 0)) as client:
                # A header is just bytes to a server that expects none.
                datagram = relayed(b"payload")
                seen = await ask(client, server, datagram)
                me = client.getsockname()
                assert seen == (me, me, datagram)


@pytest.mark.skipif(
    not ipv6_loopback_available(), reason="IPv6 loopback is unavailable"
)
async def test_a_proxy_over_ipv6() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(host="::1", trusted=("::1",))
        async with serving(server):
            with await bound_socket(("::1", 0)) as proxy:
                seen = await ask(proxy, server, relayed(b"six"))
                assert seen == (CLIENT, proxy.getsockname(), b"six")


# -- Unix datagram sockets ----------------------------------------------------


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
@HANDLERS
@pytest.mark.parametrize(
    ("source", "destination"),
    [
        ("/run/client.sock", "/run/service.sock"),
        (CLIENT, FRONT),
    ],
    ids=["unix-source", "ipv4-source"],
)
async def test_a_unix_datagram_proxy(
    handler: type[WhoAmI], source: Any, destination: Any, sock_dir: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = trioserve.UnixDatagramServer(
            os.path.join(sock_dir, "server.sock"),
            handler,
            proxy_protocol="v2",
            trusted_proxies=["unix"],
        )
        async with serving(server):
            proxy_path = os.path.join(sock_dir, "proxy.sock")
            with await bound_socket(proxy_path) as proxy:
                seen = await ask(proxy, server, relayed(b"hi", source, destination))
                assert seen == (source, proxy_path, b"hi")
                seen = await ask(proxy, server, build_v2(command="LOCAL") + b"ok")
                assert seen == (proxy_path, proxy_path, b"ok")
    assert (server.stats.completed, server.stats.dropped) == (2, 0)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
async def test_unix_peers_must_be_trusted_as_unix(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = trioserve.UnixDatagramServer(
            os.path.join(sock_dir, "server.sock"),
            WhoAmI,
            proxy_protocol="v2",
            trusted_proxies=["127.0.0.1"],
        )
        async with serving(server):
            proxy_path = os.path.join(sock_dir, "proxy.sock")
            with await bound_socket(proxy_path) as proxy:
                await proxy.sendto(relayed(b"hi"), server.server_address)
                # The receiving task has dealt with it once
                # every task waits again (a datagram ready to read counts as
                # work, not as waiting).
                await trio.testing.wait_all_tasks_blocked()
                assert server.stats.accepted == 1
    assert (server.stats.dropped, server.stats.completed) == (1, 0)
    assert "not a trusted proxy" in caplog.text


# -- what is dropped ----------------------------------------------------------


@HANDLERS
async def test_an_untrusted_sender_is_dropped_and_counted(
    handler: type[WhoAmI], caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # Loopback is all of 127.0.0.0/8 (on Linux): the proxy is 127.0.0.2.
        server = proxied_udp_server(handler, trusted=("127.0.0.2",))
        async with serving(server):
            with bystander() as stranger, await bound_socket(("127.0.0.2", 0)) as proxy:
                # A valid header, but from a sender that may not send one: it
                # would choose the address the server believes.
                stranger.sendto(relayed(b"spoofed"), server.server_address)
                stranger_address = stranger.getsockname()
                seen = await ask(proxy, server, relayed(b"genuine"))
                assert seen == (CLIENT, proxy.getsockname(), b"genuine")
                assert_nothing_received(stranger)
    stats = server.stats
    assert (stats.accepted, stats.dropped, stats.completed) == (2, 1, 1)
    assert (stats.failed, stats.malformed) == (0, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"dropped a datagram from {stranger_address!r}: not a trusted proxy"
    ]


@HANDLERS
@pytest.mark.parametrize("mode", ["v2", "auto"])
@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"", "input ended before any PROXY header byte"),
        (b"hello", "PROXY v2 signature mismatch"),
        (relayed(b"")[:20], "input ended after 20 of the 28 bytes"),
        (V2_SIGNATURE[:7], "input ended after 7 bytes"),
        (relayed(b"")[:12] + b"\x31" + relayed(b"")[13:], "unsupported PROXY v2"),
        # Version 1 is text for TCP: not accepted on datagrams, even in auto.
        (build_v1(CLIENT, FRONT) + b"hello", "PROXY v2 signature mismatch"),
    ],
    ids=["empty", "no-header", "truncated", "signature-only", "bad-version", "v1"],
)
async def test_a_bad_header_is_dropped_and_the_next_datagram_served(
    handler: type[WhoAmI],
    mode: Literal["off", "v1", "v2", "auto"],
    bad: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = proxied_udp_server(handler, mode=mode)
        async with serving(server):
            with (
                await bound_socket(("127.0.0.1", 0)) as proxy,
                await bound_socket(("127.0.0.1", 0)) as other,
            ):
                await proxy.sendto(bad, server.server_address)
                proxy_address = proxy.getsockname()
                # Another sender, right after.
                seen = await ask(other, server, relayed(b"fine"))
                assert seen == (CLIENT, other.getsockname(), b"fine")
                # And the proxy that sent the bad one is not shut out.
                seen = await ask(proxy, server, relayed(b"again"))
                assert seen == (CLIENT, proxy.getsockname(), b"again")
    stats = server.stats
    assert (stats.accepted, stats.dropped, stats.completed) == (3, 1, 2)
    assert (stats.failed, stats.malformed) == (0, 0)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert message.startswith(f"dropped a datagram from {proxy_address!r}: ")
    assert reason in message


# Valid headers, to truncate and damage.
GOOD_HEADERS = [
    build_v2(CLIENT, FRONT, protocol="DGRAM"),
    build_v2(("2001:db8::1", 5000), ("2001:db8::2", 53), protocol="DGRAM"),
    build_v2("/run/client.sock", "/run/service.sock", protocol="DGRAM"),
    build_v2(CLIENT, FRONT, protocol="DGRAM", tlvs=[(0x01, b"dns"), (0xEA, b"x")]),
    build_v2(command="LOCAL"),
]

# The payload of the datagram that ends each example: its reply marks the end.
LAST = b"\x00last datagram\x00"


@st.composite
def damaged_datagrams(draw: st.DrawFn) -> bytes:
    header = draw(st.sampled_from(GOOD_HEADERS))
    how = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "truncated":
        return header[: draw(st.integers(0, len(header) - 1))]
    # One byte changed: usually invalid, sometimes still a valid header.
    at = draw(st.integers(0, len(header) - 1))
    value = draw(st.integers(0, 255).filter(lambda v: v != header[at]))
    tail = draw(st.binary(max_size=16))
    return header[:at] + bytes([value]) + header[at + 1 :] + tail


def is_valid_v2(datagram: bytes) -> bool:
    try:
        return parse_proxy_header(datagram, "v2") is not None
    except ProxyProtocolError:
        return False


@hypothesis.settings(max_examples=60, deadline=None, database=None)
@hypothesis.given(st.lists(damaged_datagrams(), min_size=1, max_size=6))
def test_damaged_headers_from_a_trusted_proxy_never_crash_the_server(
    datagrams: list[bytes],
) -> None:
    async def check() -> trioserve.ServerStats:
        with trio.fail_after(TEST_TIMEOUT):
            server = proxied_udp_server(WhoAmI)
            async with serving(server):
                with await bound_socket(("127.0.0.1", 0)) as proxy:
                    for datagram in datagrams:
                        await proxy.sendto(datagram, server.server_address)
                    await proxy.sendto(relayed(LAST), server.server_address)
                    # The handler replies in order: every reply before
                    # the last one's is for a datagram that was still valid.
                    replies = 0
                    while (await next_reply(proxy))[2] != LAST:
                        replies += 1
                    assert replies == valid
            return server.stats

    async def next_reply(proxy: trio.socket.SocketType) -> tuple[Any, Any, bytes]:
        seen = ast.literal_eval((await proxy.recv(65536)).decode())
        assert isinstance(seen, tuple)
        return seen

    valid = sum(is_valid_v2(datagram) for datagram in datagrams)
    stats = trio.run(check)
    assert stats.accepted == len(datagrams) + 1
    assert stats.dropped == len(datagrams) - valid
    assert stats.completed == valid + 1
    assert (stats.failed, stats.malformed, stats.active) == (0, 0, 0)


# -- options --------------------------------------------------------------------


def test_datagram_servers_take_v2_and_refuse_v1() -> None:
    for mode in ("v2", "auto"):
        trioserve.UDPServer(
            ("127.0.0.1", 0),
            WhoAmI,
            proxy_protocol=mode,
            trusted_proxies=["127.0.0.1"],
        )
    trioserve.UnixDatagramServer(
        "/tmp/unbound.sock", WhoAmI, proxy_protocol="v2", trusted_proxies=["unix"]
    )
    with pytest.raises(ValueError, match="'v1' needs a stream server"):
        trioserve.UDPServer(
            ("127.0.0.1", 0),
            WhoAmI,
            proxy_protocol="v1",
            trusted_proxies=["127.0.0.1"],
        )
    with pytest.raises(ValueError, match="needs trusted_proxies"):
        trioserve.UDPServer(("127.0.0.1", 0), WhoAmI, proxy_protocol="v2")


# -- the command line -----------------------------------------------------------


def test_cli_udp_echo_behind_a_proxy() -> None:
    options = ["--proxy-protocol", "v2", "--trusted-proxy", "127.0.0.1"]
    with run_echo("--udp", "127.0.0.1:0", *options) as cli:
        [(kind, host, port)] = cli.listeners(1)
        assert kind == "UDP"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as proxy:
            proxy.settimeout(IO_TIMEOUT)
            proxy.bind(("127.0.0.1", 0))
            proxy.sendto(relayed(b"through the proxy"), (host, port))
            # The payload comes back, without the header, to the proxy.
            assert proxy.recvfrom(65536) == (b"through the proxy", (host, port))
            proxy.sendto(build_v2(command="LOCAL") + b"check", (host, port))
            assert proxy.recvfrom(65536) == (b"check", (host, port))
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


@pytest.mark.parametrize(
    "listeners", [["--udp", "127.0.0.1:0"], []], ids=["udp", "default-tcp-and-udp"]
)
def test_cli_v1_with_a_datagram_listener_is_a_usage_error(
    listeners: list[str],
) -> None:
    options = ["--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.1"]
    with run_echo(*listeners, *options) as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == ""
    assert_clean(stderr)
    [line] = stderr.splitlines()
    assert line.startswith("trioserve: error: --proxy-protocol v1 cannot serve"), line
