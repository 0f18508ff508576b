"""Reliability: slow, stuck, half-closed and abrupt peers.

Each is timed out, served or counted, and harms no one else.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from support.reliability import (
    IO_TIMEOUT,
    SOAK_TIMEOUT,
    CountingTCPServer,
    assert_stats_add_up,
    params,
    random_chunk_size,
    report,
    reset,
    soak_only,
)
from support.servers import (
    Echo,
    connect,
    open_fds,
    read_to_eof,
    roundtrip,
    serving,
    tls_contexts,
)

import trioserve


async def slowloris(
    slow: int, interval: float, idle_timeout: float, normal_for: float
) -> tuple[list[float], list[float], trioserve.ServerStats]:
    """``slow`` clients trickle a byte per ``interval``, a normal one chats.

    Returns how long after connecting each slow client was cut off, the
    normal client's round-trip times, and the server's counters.
    """
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, idle_timeout=idle_timeout)
    cut_off_after: list[float] = []
    latencies: list[float] = []

    async def trickle() -> None:
        async with await connect(server) as client:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        while True:
                            await client.send_all(b"x")
                            await trio.sleep(interval)

                nursery.start_soon(send)
                # The server answers nothing; it closes (or resets) at last.
                assert await read_to_eof(client) == b""
                cut_off_after.append(trio.current_time() - start)
                nursery.cancel_scope.cancel()

    async def chat() -> None:
        async with await connect(server) as client:
            started = trio.current_time()
            sequence = 0
            while trio.current_time() - started < normal_for:
                line = b"ping %d\n" % sequence
                sent_at = trio.current_time()
                assert await roundtrip(client, line) == line
                latencies.append(trio.current_time() - sent_at)
                sequence += 1
                await trio.sleep(min(interval, idle_timeout / 4))

    async with serving(server), trio.open_nursery() as nursery:
        for _ in range(slow):
            nursery.start_soon(trickle)
        nursery.start_soon(chat)
    return cut_off_after, latencies, server.stats


@pytest.mark.parametrize("slow", params((100,), (500,)))
async def test_slowloris_is_cut_off_by_idle_timeout_while_others_are_served(
    slow: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: a byte every 0.2 s, an idle timeout of 5 s.
    cut_off_after, latencies, stats = await slowloris(
        slow, interval=0.2, idle_timeout=5, normal_for=12
    )
    assert len(cut_off_after) == slow
    assert all(5 <= after <= 5.2 + 0.01 for after in cut_off_after), cut_off_after
    # The normal client went on being answered at once, before and after.
    assert len(latencies) >= 12 / 0.2 - 1
    assert max(latencies) < 0.2
    assert (stats.timed_out, stats.completed) == (slow, 1)
    assert_stats_add_up(stats)


@soak_only
@pytest.mark.timeout(SOAK_TIMEOUT)
async def test_slowloris_in_real_time() -> None:
    # Hundreds of clients trickling a byte a second, in real time.
    slow, idle_timeout = 300, 4.0
    cut_off_after, latencies, stats = await slowloris(
        slow, interval=1.0, idle_timeout=idle_timeout, normal_for=10
    )
    assert len(cut_off_after) == slow
    assert all(idle_timeout <= after < idle_timeout + 5 for after in cut_off_after)
    latencies.sort()
    assert latencies[-1] < 1.0, latencies
    assert (stats.timed_out, stats.completed) == (slow, 1)
    report(
        "slowloris-real-time",
        slow=slow,
        cut_off_max_s=f"{max(cut_off_after):.2f}",
        normal_roundtrips=len(latencies),
        latency_median_ms=f"{latencies[len(latencies) // 2] * 1000:.1f}",
        latency_max_ms=f"{latencies[-1] * 1000:.1f}",
    )


# What the firehose handler writes, again and again, to a client that asked.
BLOCK = bytes(range(256)) * 256  # 64 KiB


class Firehose(trioserve.StreamRequestHandler):
    """Echoes lines; ``flood`` makes it write for ever."""

    timeout = 3.0

    async def handle(self) -> None:
        async for line in self.rfile:
            if line == b"flood\n":
                while True:
                    await self.wfile.write(BLOCK)
            await self.wfile.write(line)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_clients_that_stop_reading_are_timed_out_and_freed(
    tls: bool, autojump_clock: trio.testing.MockClock
) -> None:
    stuck = 20
    before = open_fds()
    server_context, client_context = tls_contexts()
    server = CountingTCPServer(
        ("127.0.0.1", 0), Firehose, ssl_context=server_context if tls else None
    )
    answered = 0

    async def chat(normal: trio.abc.Stream) -> None:
        # Within Firehose.timeout between lines, as a live client would be.
        nonlocal answered
        while True:
            assert await roundtrip(normal, b"hello\n") == b"hello\n"
            answered += 1
            await trio.sleep(1)

    async def open_stuck() -> trio.abc.Stream:
        sock = trio.socket.socket()
        # A small receive buffer: the server's writes block sooner.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stream: trio.abc.Stream = trio.SocketStream(sock)
        await sock.connect(server.server_address)
        if tls:
            stream = trio.SSLStream(stream, client_context, server_hostname="127.0.0.1")
        return stream

    async with serving(server):
        host, port = server.server_address
        if tls:
            normal: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            )
        else:
            normal = await trio.open_tcp_stream(host, port)
        async with normal, trio.open_nursery() as chatting:
            chatting.start_soon(chat, normal)
            listening = open_fds()
            clients = []
            try:
                for _ in range(stuck):
                    clients.append(await open_stuck())
                    await clients[-1].send_all(b"flood\n")
                start = trio.current_time()
                # The server writes until the buffers are full; then its
                # writes make no progress for Firehose.timeout seconds.
                await server.closed.wait_for(stuck)
                elapsed = trio.current_time() - start
                # Then each close lingers for the client's end-of-stream,
                # which a client that stopped reading never sends.
                assert elapsed == pytest.approx(
                    Firehose.timeout + server.drain_window, abs=0.1
                )
                assert server.stats.timed_out == stuck
                assert server.stats.active == 1
                # The server's end of each stuck connection is closed; ours
                # are still open.
                assert open_fds() == listening + stuck
                answered_before = answered
                await trio.sleep(2)
                assert answered > answered_before
            finally:
                for client in clients:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await client.aclose()
            chatting.cancel_scope.cancel()
    assert open_fds() == before
    assert (server.stats.timed_out, server.stats.completed) == (stuck, 1)
    assert_stats_add_up(server.stats)


class ReverseAfterEOF(trioserve.StreamRequestHandler):
    """Reads to end of stream, then sends everything back reversed."""

    async def handle(self) -> None:
        data = await self.rfile.read()
        await self.wfile.write(data[::-1])


@pytest.mark.parametrize("family", ["tcp", "unix"])
async def test_half_closed_connections_get_their_full_reply(
    family: str, short_tmp: Path
) -> None:
    clients, size = 20, 2**20
    path = str(short_tmp / "half.sock")
    server: trioserve.TCPServer
    if family == "tcp":
        server = trioserve.TCPServer(("127.0.0.1", 0), ReverseAfterEOF)
    else:
        server = trioserve.UnixStreamServer(path, ReverseAfterEOF)

    async def client(number: int) -> None:
        rng = random.Random(number)
        data = rng.randbytes(size)
        if family == "tcp":
            stream = await connect(server)
        else:
            stream = await trio.open_unix_socket(path)
        async with stream:
            view = memoryview(data)
            while view:
                chunk_size = random_chunk_size(rng)
                await stream.send_all(view[:chunk_size])
                view = view[chunk_size:]
            # shutdown(SHUT_WR): we send no more, but still read.
            await stream.send_eof()
            assert await read_to_eof(stream) == data[::-1]

    with trio.fail_after(IO_TIMEOUT):
        async with serving(server), trio.open_nursery() as nursery:
            for number in range(clients):
                nursery.start_soon(client, number)
    assert server.stats.completed == clients
    assert_stats_add_up(server.stats)


# -- abrupt peers ----------------------------------------------------------------


class BigReply(trioserve.StreamRequestHandler):
    """Echoes lines; ``big N`` makes it send N bytes back."""

    async def handle(self) -> None:
        async for line in self.rfile:
            if line.startswith(b"big "):
                for _ in range(int(line[4:]) // len(BLOCK)):
                    await self.wfile.write(BLOCK)
            else:
                await self.wfile.write(line)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_peers_that_reset_are_logged_at_debug_and_counted(
    tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    each = 10 if tls else 50
    server_context, client_context = tls_contexts()
    server = CountingTCPServer(
        ("127.0.0.1", 0), BigReply, ssl_context=server_context if tls else None
    )

    async def open_client() -> trio.abc.Stream:
        host, port = server.server_address
        if tls:
            return await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            )
        return await trio.open_tcp_stream(host, port)

    async def mid_request() -> None:
        client = await open_client()
        await client.send_all(b"half a li")
        # The handler has the bytes and waits for the rest of its line.
        await trio.testing.wait_all_tasks_blocked()
        await reset(client)

    async def mid_response() -> None:
        client = await open_client()
        await client.send_all(b"big %d\n" % (64 * 2**20))
        received = 0
        while received < 256 * 1024:
            received += len(await client.receive_some())
        await reset(client)

    with trio.fail_after(IO_TIMEOUT):
        async with serving(server), await open_client() as normal:
            assert await roundtrip(normal, b"before\n") == b"before\n"
            async with trio.open_nursery() as nursery:
                for _ in range(each):
                    nursery.start_soon(mid_request)
                    nursery.start_soon(mid_response)
            await server.closed.wait_for(2 * each)
            assert server.stats.disconnected == 2 * each
            assert await roundtrip(normal, b"after\n") == b"after\n"
    assert (server.stats.disconnected, server.stats.completed) == (2 * each, 1)
    assert server.stats.failed == 0
    assert_stats_add_up(server.stats)
    records = [r for r in caplog.records if r.name == "trioserve"]
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    went_away = [r for r in records if "connection lost mid-request" in r.getMessage()]
    assert len(went_away) == 2 * each
    assert {r.levelno for r in went_away} == {logging.DEBUG}


class Relay(trioserve.StreamRequestHandler):
    """Echo written as a relay, as a proxy would be: two tasks, one nursery."""

    async def handle(self) -> None:
        send_channel, receive_channel = trio.open_memory_channel[bytes](16)

        async def pump_in() -> None:
            async with send_channel:
                while chunk := await self.rfile.read1():
                    await send_channel.send(chunk)

        async def pump_out() -> None:
            async with receive_channel:
                async for chunk in receive_channel:
                    await self.wfile.write(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_in)
            nursery.start_soon(pump_out)


async def test_a_reset_seen_by_a_handler_with_a_nursery_is_a_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    server = CountingTCPServer(("127.0.0.1", 0), Relay)
    with trio.fail_after(IO_TIMEOUT):
        async with serving(server):
            client = await connect(server)
            assert await roundtrip(client, b"relayed\n") == b"relayed\n"
            await client.send_all(b"half a li")
            await trio.testing.wait_all_tasks_blocked()
            await reset(client)
            await server.closed.wait_for(1)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (server.stats.disconnected, server.stats.failed) == (1, 0)
    assert errors == []
