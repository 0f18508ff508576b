"""trioserve.testing: handlers served in memory, timeouts in no real time."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

import trioserve
from trioserve.testing import (
    MemoryDatagramServer,
    MemoryListener,
    MemoryStreamServer,
    serve_datagrams,
    serve_streams,
)


class Shout(trioserve.BaseRequestHandler):
    """A mixin typed by the protocols: mypy --strict checks it with both bases."""

    rfile: trioserve.AsyncReader
    wfile: trioserve.AsyncWriter

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line.upper())


class StreamShout(Shout, trioserve.StreamRequestHandler):
    pass


class DatagramShout(Shout, trioserve.DatagramRequestHandler):
    pass


class SlowReply(trioserve.StreamRequestHandler):
    """Answers each line after ten seconds."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await trio.sleep(10)
            await self.wfile.write(line)


class Sleeper(trioserve.BaseRequestHandler):
    async def handle(self) -> None:
        await trio.sleep_forever()


async def read_all(client: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await client.receive_some():
        data += chunk
    return data


async def test_a_stream_handler_served_in_memory() -> None:
    with trio.fail_after(5):
        async with serve_streams(StreamShout) as server:
            assert server.is_serving()
            client = await server.connect()
            await client.send_all(b"hello\nworld\n")
            await client.send_eof()
            assert await read_all(client) == b"HELLO\nWORLD\n"
        assert not server.is_serving()
        assert server.stats.accepted == server.stats.completed == 1


async def test_a_datagram_handler_gets_one_datagram_and_returns_its_reply() -> None:
    with trio.fail_after(5):
        async with serve_datagrams(DatagramShout) as server:
            assert await server.send(b"one\ntwo\n") == [b"ONE\nTWO\n"]
            # Nothing written, nothing sent.
            assert await server.send(b"") == []
        assert server.stats.completed == 2


async def test_the_handler_sees_the_client_address() -> None:
    seen = []

    class Where(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            seen.append(self.client_address)

    async with serve_datagrams(Where) as server:
        await server.send(b"x", ("192.0.2.1", 53))
        await server.send(b"x")
    assert seen[0] == ("192.0.2.1", 53)
    assert seen[1][0] == "127.0.0.1"


async def test_errors_go_to_handle_error_and_the_stats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"partial")
            raise RuntimeError("boom")

    async with serve_datagrams(Broken) as server:
        # The request is over, so send returns; finish() sent the reply.
        assert await server.send(b"x") == [b"partial"]
    assert server.stats.failed == 1
    [record] = caplog.records
    assert record.levelno == logging.ERROR


async def test_server_limits_apply_in_memory() -> None:
    async with serve_streams(StreamShout, max_connections_per_peer=1) as server:
        first = await server.connect(("192.0.2.1", 1))
        await first.send_all(b"a\n")
        assert await first.receive_some() == b"A\n"
        # A second connection from the same host is closed at accept.
        second = await server.connect(("192.0.2.1", 2))
        assert await second.receive_some() == b""
        assert server.stats.rejected == 1


async def test_idle_timeout_in_no_real_time(autojump_clock: trio.abc.Clock) -> None:
    async with serve_streams(StreamShout, idle_timeout=600) as server:
        client = await server.connect()
        start = trio.current_time()
        # Ten idle minutes: the server lets the silent client go.
        assert await client.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(600)
    assert server.stats.completed == 1


async def test_handler_timeout_in_no_real_time(autojump_clock: trio.abc.Clock) -> None:
    class Patient(StreamShout):
        timeout = 30

    async with serve_streams(Patient) as server:
        client = await server.connect()
        start = trio.current_time()
        await client.send_all(b"half a li")
        assert await client.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(30)
    assert server.stats.timed_out == 1


async def test_request_timeout_in_no_real_time(autojump_clock: trio.abc.Clock) -> None:
    async with serve_datagrams(Sleeper, request_timeout=3600) as server:
        start = trio.current_time()
        assert await server.send(b"x") == []
        assert trio.current_time() - start == pytest.approx(3600)
    assert server.stats.timed_out == 1


async def test_shutdown_grace_lets_a_request_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serve_streams(SlowReply, shutdown_timeout=60) as server:
        client = await server.connect()
        await client.send_all(b"last words\n")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown()
        # The reply took its ten seconds, inside the grace period.
        assert trio.current_time() - start == pytest.approx(10)
        assert await read_all(client) == b"last words\n"
    assert server.stats.completed == 1


async def test_shutdown_grace_ends_in_cancellation(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_streams(Sleeper, shutdown_timeout=60) as server:
        await server.connect()
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown()
        assert trio.current_time() - start == pytest.approx(60)
    assert server.stats.cancelled == 1
    assert "shutdown cancelled 1 request" in caplog.text


async def test_an_idle_connection_leaves_at_the_drain_window(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serve_streams(StreamShout, shutdown_timeout=60) as server:
        client = await server.connect()
        await client.send_all(b"hi\n")
        assert await client.receive_some() == b"HI\n"
        assert server.stats.idle == 1
        start = trio.current_time()
        await server.shutdown()
        assert trio.current_time() - start == pytest.approx(server.drain_window)
        assert await client.receive_some() == b""
    assert server.stats.completed == 1


async def test_a_lockstep_pair_has_no_buffer() -> None:
    with trio.fail_after(5):
        async with serve_streams(
            StreamShout, stream_pair=trio.testing.lockstep_stream_pair
        ) as server:
            client = await server.connect()
            await client.send_all(b"in step\n")
            assert await client.receive_some() == b"IN STEP\n"


async def test_a_closed_server_refuses() -> None:
    stream_server = MemoryStreamServer(StreamShout)
    datagram_server = MemoryDatagramServer(DatagramShout)
    await stream_server.server_close()
    await datagram_server.server_close()
    with pytest.raises(ConnectionRefusedError):
        await stream_server.connect()
    with pytest.raises(ConnectionRefusedError):
        await datagram_server.send(b"x")


async def test_what_waits_when_the_server_closes_is_let_go() -> None:
    # Serve one request; the next waits (a backlog), then the server closes.
    stream_server = MemoryStreamServer(StreamShout)
    waiting = await stream_server.connect()
    datagram_server = MemoryDatagramServer(DatagramShout)
    replies: list[list[bytes]] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                replies.append(await datagram_server.send(b"x"))

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await stream_server.server_close()
            await datagram_server.server_close()
    assert await waiting.receive_some() == b""
    assert replies == [[]]


async def test_handle_request_serves_one_request() -> None:
    server = MemoryStreamServer(StreamShout)
    client = await server.connect()
    await client.send_all(b"once\n")
    await client.send_eof()
    with trio.fail_after(5):
        await server.handle_request()
    assert await read_all(client) == b"ONCE\n"


async def test_the_memory_listener_serves_trio_serve_listeners() -> None:
    listener = MemoryListener()

    async def echo(stream: trio.abc.HalfCloseableStream) -> None:
        async with stream:
            await stream.send_all(await stream.receive_some())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, echo, [listener])
            client = await listener.connect()
            await client.send_all(b"any listener")
            assert await client.receive_some() == b"any listener"
            nursery.cancel_scope.cancel()
