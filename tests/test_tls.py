"""TLS: ``ssl_context`` makes each request a trio.SSLStream."""

from __future__ import annotations

import ssl

import trio
import trustme
from test_server import Echo, serving

import trioserve


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


async def test_tls_echo_and_connection_type() -> None:
    server_context, client_context = contexts()
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


async def test_a_client_that_does_not_speak_tls_fails_only_its_request() -> None:
    server_context, client_context = contexts()
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
    assert (server.stats.failed, server.stats.completed) == (1, 1)
