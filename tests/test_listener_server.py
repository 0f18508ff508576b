"""ListenerServer: request handlers on any Trio listener, with every guarantee."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from support.servers import Echo, read_to_eof, roundtrip, serving, tls_contexts

import trioserve
from trioserve.testing import MemoryListener


async def test_serves_listeners_from_open_tcp_listeners() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = trioserve.ListenerServer(listeners, Echo)
    host, port = server.server_address
    async with serving(server):
        with trio.fail_after(10):
            for n in range(3):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    assert await roundtrip(stream, b"line %d\n" % n) == b"line %d\n" % n
            assert server.stats.accepted == 3
    assert server.stats.completed == 3
    # Leaving serving() closed the listeners: the port refuses.
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream(host, port)


async def test_client_address_is_the_peer_of_a_socket_stream() -> None:
    seen: list[Any] = []

    class Where(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            seen.append(self.client_address)
            await self.wfile.write(b"ok\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = trioserve.ListenerServer(listeners, Where)
    async with serving(server):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(*server.server_address)
            async with stream:
                assert await roundtrip(stream, b"") == b"ok\n"
                assert seen == [stream.socket.getsockname()]


async def test_serves_an_ssl_listener() -> None:
    server_context, client_context = tls_contexts()
    [tcp] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = trio.SSLListener(tcp, server_context)
    kinds: list[type] = []

    class Probe(Echo):
        async def setup(self) -> None:
            await super().setup()
            kinds.append(type(self.connection))

    server = trioserve.ListenerServer(listener, Probe)
    host, port = server.server_address
    async with serving(server):
        with trio.fail_after(10):
            client = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            )
            async with client:
                await client.send_all(b"secret\n")
                assert await client.receive_some() == b"secret\n"
    assert kinds == [trio.SSLStream]


async def test_graceful_shutdown_of_an_idle_tls_connection_is_a_clean_goodbye() -> None:
    # An idle keep-alive client over TLS: shutdown lets it go with
    # close_notify and end of stream, not a reset, within the drain window.
    server_context, client_context = tls_contexts()
    [tcp] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = trioserve.ListenerServer(
        trio.SSLListener(tcp, server_context), Echo, drain_window=0.1
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        with trio.fail_after(10):
            client = await trio.open_ssl_over_tcp_stream(
                *server.server_address, ssl_context=client_context
            )
            async with client:
                await client.send_all(b"one\n")
                assert await client.receive_some() == b"one\n"
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(server.shutdown)
                assert await read_to_eof(client) == b""
        await server.server_close()
    assert server.stats.completed == 1
    assert server.stats.cancelled == 0


async def test_in_memory_listener_with_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = MemoryListener()
    server = trioserve.ListenerServer(listener, Echo, idle_timeout=30)
    assert server.server_address is None
    async with serving(server):
        client = await listener.connect()
        assert await roundtrip(client, b"hello\n") == b"hello\n"
        before = trio.current_time()
        # Silent past the idle timeout: let go with end of stream.
        assert await client.receive_some() == b""
        assert trio.current_time() - before == pytest.approx(30)
    assert server.stats.completed == 1


async def test_in_memory_shutdown_grace_then_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[str] = []

    class Slow(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            await trio.sleep(float(line))
            await self.wfile.write(b"done\n")

        async def finish(self) -> None:
            finished.append("finish")
            await super().finish()

    listener = MemoryListener()
    server = trioserve.ListenerServer(listener, Slow, shutdown_timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        quick, slow = await listener.connect(), await listener.connect()
        await quick.send_all(b"3\n")
        await slow.send_all(b"60\n")
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        await server.shutdown()
        # The quick one finished within the grace; the slow one was
        # cancelled at its end, and both ran finish().
        assert trio.current_time() - started == pytest.approx(5)
        assert await roundtrip(quick, b"") == b"done\n"
        await server.server_close()
    assert server.stats.completed == 1
    assert server.stats.cancelled == 1
    assert finished == ["finish", "finish"]


async def test_hooks_mean_what_they_mean_on_tcp_server() -> None:
    # verify_request refuses; an overridden get_request is what accepts.
    listener = MemoryListener()
    taken = 0

    class Picky(trioserve.ListenerServer):
        async def get_request(self, listener: Any = None) -> tuple[Any, Any]:
            nonlocal taken
            request, _ = await super().get_request(listener)
            taken += 1
            return request, ("memory", taken)

        async def verify_request(self, request: Any, client_address: Any) -> bool:
            return bool(client_address[1] % 2 == 1)

    server = Picky(listener, Echo, max_concurrent_requests=1)
    async with serving(server):
        with trio.fail_after(10):
            first = await listener.connect()
            assert await roundtrip(first, b"odd\n") == b"odd\n"
            await first.aclose()
            second = await listener.connect()
            assert await read_to_eof(second) == b""
    assert taken == 2
    assert server.stats.rejected == 1


async def test_needs_a_listener() -> None:
    with pytest.raises(ValueError, match="at least one listener"):
        trioserve.ListenerServer([], Echo)
    await trio.lowlevel.checkpoint()


async def test_accepts_on_every_listener() -> None:
    listeners = [MemoryListener(), MemoryListener()]
    server = trioserve.ListenerServer(listeners, Echo)
    async with serving(server):
        with trio.fail_after(10):
            for listener in listeners:
                client = await listener.connect()
                assert await roundtrip(client, b"hi\n") == b"hi\n"
    assert server.stats.completed == 2
    # Both listeners were closed with the server.
    for listener in listeners:
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
