"""PROXY protocol on a real server: direct clients, and a real HAProxy in front."""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from support.haproxy import HAPROXY, run_haproxy, wait_for_port
from support.proxy_headers import build_v1, build_v2
from support.servers import Echo, free_port, serving

import trioserve


class WhoAmI(trioserve.StreamRequestHandler):
    """Replies with the client address it was given, then echoes lines."""

    async def handle(self) -> None:
        await self.wfile.write(f"{self.client_address!r}\n".encode())
        async for line in self.rfile:
            await self.wfile.write(line)


async def read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
    return data


def proxy_server(mode: str = "auto", **options: object) -> trioserve.TCPServer:
    return trioserve.TCPServer(
        ("127.0.0.1", 0),
        WhoAmI,
        proxy_protocol=mode,  # type: ignore[arg-type]
        trusted_proxies=["127.0.0.0/8"],
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("mode", "header"),
    [
        ("v1", build_v1(("203.0.113.7", 40000), ("192.0.2.1", 443))),
        ("v2", build_v2(("203.0.113.7", 40000), ("192.0.2.1", 443))),
        ("auto", build_v1(("203.0.113.7", 40000), ("192.0.2.1", 443))),
        ("auto", build_v2(("203.0.113.7", 40000), ("192.0.2.1", 443))),
    ],
)
async def test_header_from_a_trusted_proxy_gives_the_client_address(
    mode: str, header: bytes
) -> None:
    server = proxy_server(mode)
    async with serving(server), await trio.open_tcp_stream(*server.server_address) as c:
        # The header and the first line in one segment: the line must reach
        # the handler intact, not be swallowed with the header.
        await c.send_all(header + b"first line\n")
        # The greeting and the echo may arrive together: read them as lines.
        lines = trioserve.AsyncBufferedReader(c)
        with trio.fail_after(10):
            assert await lines.readline() == b"('203.0.113.7', 40000)\n"
            assert await lines.readline() == b"first line\n"


async def test_ipv6_source_and_local_command() -> None:
    server = proxy_server()
    async with serving(server):
        async with await trio.open_tcp_stream(*server.server_address) as client:
            await client.send_all(build_v2(("2001:db8::1", 5000), ("2001:db8::2", 80)))
            assert await read_line(client) == b"('2001:db8::1', 5000, 0, 0)\n"
        async with await trio.open_tcp_stream(*server.server_address) as client:
            # A proxy's own health check: the real peer's address stays.
            await client.send_all(build_v2(command="LOCAL"))
            reply = await read_line(client)
            assert reply == f"{client.socket.getsockname()!r}\n".encode()


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", b"\r\n\r\n"],
)
async def test_malformed_header_closes_only_that_connection(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = proxy_server()
    async with serving(server):
        async with await trio.open_tcp_stream(*server.server_address) as bad:
            await bad.send_all(garbage)
            if garbage == b"\r\n\r\n":
                await bad.send_eof()  # a truncated v2 signature, then nothing
            # Closed with our bytes unread, which may arrive as a reset.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await read_line(bad) == b""
        async with await trio.open_tcp_stream(*server.server_address) as good:
            await good.send_all(build_v1(("198.51.100.1", 1), ("192.0.2.1", 2)))
            assert await read_line(good) == b"('198.51.100.1', 1)\n"
    assert (server.stats.dropped, server.stats.completed) == (1, 1)
    assert "closed a connection" in caplog.text


async def test_untrusted_peer_is_closed_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = trioserve.TCPServer(
        ("127.0.0.1", 0),
        WhoAmI,
        proxy_protocol="v1",
        trusted_proxies=["10.0.0.0/8"],
    )
    async with serving(server), await trio.open_tcp_stream(*server.server_address) as c:
        await c.send_all(build_v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
        with contextlib.suppress(trio.BrokenResourceError):
            assert await read_line(c) == b""
    assert server.stats.dropped == 1
    assert "not a trusted proxy" in caplog.text


async def test_refused_connections_cannot_flood_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # An untrusted peer connecting as fast as it can, and a trusted one
    # sending garbage: each refusal is counted, but the log gets one warning
    # per 10 seconds per server, which says how many it stands for.
    untrusted = trioserve.TCPServer(
        ("127.0.0.1", 0), WhoAmI, proxy_protocol="v1", trusted_proxies=["10.0.0.0/8"]
    )
    garbled = proxy_server()

    async def refused(server: trioserve.TCPServer, times: int) -> None:
        for _ in range(times):
            async with await trio.open_tcp_stream(*server.server_address) as c:
                await c.send_all(b"GET / HTTP/1.1\r\n\r\n")
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await read_line(c) == b""

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    async with serving(untrusted), serving(garbled):
        await refused(untrusted, 20)
        await refused(garbled, 20)
        # One warning from each server, however many they refused.
        assert len(warnings()) == 2
        await trio.sleep(10)
        await refused(untrusted, 1)
        await refused(garbled, 1)
    assert (untrusted.stats.dropped, garbled.stats.dropped) == (21, 21)
    assert len(warnings()) == 4
    assert "not a trusted proxy" in warnings()[0]
    assert "(19 more like it" in warnings()[2]
    assert "(19 more like it" in warnings()[3]


async def test_a_proxy_that_sends_no_header_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = proxy_server(handshake_timeout=4)
    async with serving(server), await trio.open_tcp_stream(*server.server_address) as c:
        start = trio.current_time()
        with trio.fail_after(60):
            assert await c.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(4)
    assert server.stats.dropped == 1


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(build_v1(("203.0.113.7", 40000), ("192.0.2.1", 443)), id="v1"),
        pytest.param(build_v2(("203.0.113.7", 40000), ("192.0.2.1", 443)), id="v2"),
    ],
)
async def test_a_proxy_that_stalls_mid_header_times_out(
    header: bytes,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The reader has taken the first half and waits for the rest: that wait
    # is part of the handshake too, and ends with it.
    server = proxy_server(handshake_timeout=4)
    async with serving(server):
        async with await trio.open_tcp_stream(*server.server_address) as stalled:
            start = trio.current_time()
            await stalled.send_all(header[: len(header) // 2])
            with trio.fail_after(60):
                assert await stalled.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(4)
        async with await trio.open_tcp_stream(*server.server_address) as good:
            await good.send_all(header)
            assert await read_line(good) == b"('203.0.113.7', 40000)\n"
    assert (server.stats.dropped, server.stats.completed) == (1, 1)
    assert "no PROXY header in time" in caplog.text


async def test_a_proxied_client_yet_to_speak_gets_the_grace_period() -> None:
    # Behind a proxy a new connection stands for a client that has just
    # connected; its first line may be a round trip behind the header. A
    # shutdown in between must not take it for an idle connection. (A proxy
    # connection that has not even sent its header is idle: see
    # test_reliability's connections that sent nothing.)
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Echo, proxy_protocol="v2", trusted_proxies=["127.0.0.1"]
    )
    header = build_v2(("203.0.113.7", 40000), ("192.0.2.1", 443))
    with trio.fail_after(10):
        async with server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await trio.open_tcp_stream(*server.server_address) as proxy:
                await proxy.send_all(header)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(server.shutdown)
                await trio.testing.wait_all_tasks_blocked()
                assert not server.is_serving()
                await proxy.send_all(b"late but served\n")
                assert await read_line(proxy) == b"late but served\n"
                # From then on it is between messages: idle, let go.
                assert await proxy.receive_some() == b""
    assert server.stats.completed == 1


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs trusted_proxies"):
        trioserve.TCPServer(("127.0.0.1", 0), WhoAmI, proxy_protocol="v1")
    with pytest.raises(ValueError, match="proxy_protocol must be"):
        trioserve.TCPServer(
            ("127.0.0.1", 0),
            WhoAmI,
            proxy_protocol="v3",  # type: ignore[arg-type]
            trusted_proxies=["127.0.0.1"],
        )
    with pytest.raises(ValueError, match="'v1' needs a stream server"):
        trioserve.UDPServer(
            ("127.0.0.1", 0),
            trioserve.DatagramRequestHandler,
            proxy_protocol="v1",
            trusted_proxies=["127.0.0.1"],
        )


# -- a real HAProxy in front -------------------------------------------------


@pytest.fixture
def haproxy_config_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tshap"))
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt haproxy)")
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
async def test_behind_a_real_haproxy_the_handler_sees_the_true_client(
    send_proxy: str, haproxy_config_dir: Path
) -> None:
    server = proxy_server()
    async with serving(server):
        backend_port = server.server_address[1]
        front_port = free_port()
        config = haproxy_config_dir / "haproxy.cfg"
        config.write_text(
            textwrap.dedent(
                f"""
                global
                    maxconn 100
                defaults
                    mode tcp
                    timeout connect 5s
                    timeout client 30s
                    timeout server 30s
                frontend front
                    bind 127.0.0.1:{front_port}
                    default_backend trioserve
                backend trioserve
                    server one 127.0.0.1:{backend_port} {send_proxy}
                """
            )
        )
        proc = run_haproxy(config)
        try:
            await trio.to_thread.run_sync(
                functools.partial(wait_for_port, front_port, proc, greeted=True)
            )
            async with await trio.open_tcp_stream("127.0.0.1", front_port) as client:
                reply = await read_line(client)
                # The handler sees this client's own address and port, not
                # HAProxy's connection to the backend.
                assert reply == f"{client.socket.getsockname()!r}\n".encode()
                await client.send_all(b"through haproxy\n")
                assert await read_line(client) == b"through haproxy\n"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()
    assert server.stats.dropped == 0
