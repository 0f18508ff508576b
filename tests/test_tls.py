"""TLS: ``ssl_context`` makes each request a trio.SSLStream."""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from support.proxy_headers import build_v2
from support.servers import Echo, serving, tls_contexts

import trioserve


async def test_tls_echo_and_connection_type() -> None:
    server_context, client_context = tls_contexts()
    kinds: list[type] = []

    class Probe(Echo):
        async def setup(self) -> None:
            await super().setup()
            kinds.append(type(self.connection))

    server = trioserve.TCPServer(("127.0.0.1", 0), Probe, ssl_context=server_context)
    async with serving(server):
        host, port = server.server_address
        with trio.fail_after(10):
            client = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            )
            async with client:
                await client.send_all(b"secret\n")
                assert await client.receive_some() == b"secret\n"
                assert client.cipher() is not None
    assert kinds == [trio.SSLStream]
    assert server.stats.completed == 1


async def test_a_client_that_does_not_speak_tls_fails_only_its_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server_context, client_context = tls_contexts()
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, ssl_context=server_context)
    async with serving(server):
        host, port = server.server_address
        with trio.fail_after(10):
            async with await trio.open_tcp_stream(host, port) as plain:
                await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
                try:
                    while await plain.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # closed with our bytes unread: a reset
            client = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            )
            async with client:
                await client.send_all(b"still here\n")
                assert await client.receive_some() == b"still here\n"
    # A failed handshake is dropped and counted, not a handler error.
    stats = server.stats
    assert (stats.dropped, stats.failed, stats.completed) == (1, 0, 1)
    assert "handshake" not in caplog.text.lower() or all(
        r.levelno == logging.DEBUG for r in caplog.records if r.name == "trioserve"
    )


async def test_a_client_that_never_speaks_is_dropped_after_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_context, _ = tls_contexts()
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Echo, ssl_context=server_context, handshake_timeout=3
    )
    async with (
        serving(server),
        await trio.open_tcp_stream(*server.server_address) as mute,
    ):
        start = trio.current_time()
        with trio.fail_after(60):
            # The server gives up on the handshake and closes the connection.
            while await mute.receive_some():
                pass
        assert trio.current_time() - start == pytest.approx(3)
    assert (server.stats.dropped, server.stats.failed) == (1, 0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_is_served(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    class OneLine(trioserve.StreamRequestHandler):
        # Reply and close: s_client -quiet ignores its stdin's end, and
        # leaves when the server closes.
        async def handle(self) -> None:
            await self.wfile.write(await self.rfile.readline())

    server = trioserve.TCPServer(("127.0.0.1", 0), OneLine, ssl_context=server_context)
    async with serving(server):
        host, port = server.server_address
        with trio.fail_after(20):
            result = await trio.run_process(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"{host}:{port}",
                    "-CAfile",
                    str(ca_file),
                    "-verify_return_error",
                    "-quiet",
                ],
                stdin=b"hello from openssl\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert b"hello from openssl\n" in result.stdout, result.stderr
    assert server.stats.completed == 1


@pytest.mark.parametrize("proxied", [False, True])
async def test_silent_connections_do_not_hold_up_an_established_client(
    proxied: bool,
) -> None:
    # More silent connections than max_concurrent_requests: they hold no
    # request slot while in their handshake, so a real client is served at
    # once, not after handshake_timeout. (Used to take the whole timeout.)
    server_context, client_context = tls_contexts()
    slots, handshake_timeout = 2, 4.0
    options: dict[str, object] = {}
    if proxied:
        options = {"proxy_protocol": "v2", "trusted_proxies": ["127.0.0.1"]}
    server = trioserve.TCPServer(
        ("127.0.0.1", 0),
        Echo,
        ssl_context=server_context,
        handshake_timeout=handshake_timeout,
        max_concurrent_requests=slots,
        **options,  # type: ignore[arg-type]
    )
    async with serving(server), contextlib.AsyncExitStack() as silent:
        host, port = server.server_address
        for _ in range(3 * slots):
            await silent.enter_async_context(await trio.open_tcp_stream(host, port))
        # Let the server accept them all and start waiting on them.
        await trio.testing.wait_all_tasks_blocked(0.05)
        with trio.fail_after(10):
            start = trio.current_time()
            tcp = await trio.open_tcp_stream(host, port)
            if proxied:
                await tcp.send_all(build_v2(("203.0.113.7", 1), ("192.0.2.1", 2)))
            client = trio.SSLStream(tcp, client_context, server_hostname=host)
            async with client:
                await client.send_all(b"served\n")
                assert await client.receive_some() == b"served\n"
            elapsed = trio.current_time() - start
        assert elapsed < handshake_timeout / 4
        assert server.stats.active == 3 * slots  # the silent ones, still waiting


async def test_max_concurrent_requests_still_bounds_handlers_under_tls() -> None:
    # Prepared connections wait for a request slot; accepting stops once
    # max_concurrent_handshakes connections are prepared or waiting.
    server_context, client_context = tls_contexts()
    running = 0
    most = 0
    release = trio.Event()

    class Holder(Echo):
        async def handle(self) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await release.wait()
                await super().handle()
            finally:
                running -= 1

    server = trioserve.TCPServer(
        ("127.0.0.1", 0),
        Holder,
        ssl_context=server_context,
        max_concurrent_requests=2,
        max_concurrent_handshakes=3,
    )
    assert server.max_concurrent_handshakes == 3
    replies: list[bytes] = []

    async def client() -> None:
        host, port = server.server_address
        tls = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=client_context
        )
        async with tls:
            await tls.send_all(b"done\n")
            replies.append(bytes(await tls.receive_some()))

    with trio.fail_after(20):
        async with serving(server), trio.open_nursery() as clients:
            for _ in range(7):
                clients.start_soon(client)
            # Two in their handlers; three prepared or being prepared; the
            # last two wait in the listen backlog, not accepted.
            await trio.testing.wait_all_tasks_blocked(0.2)
            assert (running, server.stats.accepted) == (2, 5)
            release.set()
    assert most == 2
    assert replies == [b"done\n"] * 7
    assert server.stats.completed == 7


def test_max_concurrent_handshakes_is_validated() -> None:
    assert trioserve.TCPServer.max_concurrent_handshakes == 1000
    with pytest.raises(ValueError, match="max_concurrent_handshakes"):
        trioserve.TCPServer(("127.0.0.1", 0), Echo, max_concurrent_handshakes=0)
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, max_concurrent_handshakes=None)
    assert server.max_concurrent_handshakes is None
