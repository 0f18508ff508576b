"""Reliability: integrity under load, slow, stuck and abrupt peers, resource
exhaustion, hostile input, handler faults, shutdown under load, and leaks.

Every test talks to a real server over 127.0.0.1 (or a Unix socket), bounded
in count and in time. With the default sizes this file takes seconds (about
15 s on a busy 2-core machine); the long variants (the sizes issue 6 names)
are the ``soak`` parameters, skipped unless ``TRIOSERVE_SOAK=1`` (about 75 s
more)::

    TRIOSERVE_SOAK=1 python -m pytest tests/test_reliability.py -rP

Tests that measure something print one ``RELIABILITY ...`` line (shown with
``-rP`` or ``-s``): throughput, file descriptors and memory before and after.

Tests that need to measure the server alone (its peak memory, its file
descriptors under a low ``RLIMIT_NOFILE``) run it as a subprocess: the
``python -m trioserve echo`` command, or ``reliability_server.py`` beside
this file, a line-echo service.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from support.servers import Echo, connect, open_fds, roundtrip, serving, tls_contexts

import trioserve

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

SOAK = bool(os.environ.get("TRIOSERVE_SOAK"))
soak_only = pytest.mark.skipif(not SOAK, reason="soak test: set TRIOSERVE_SOAK=1")

# Seconds a soak variant may take: it moves hundreds of MiB or makes 100,000
# connections through one Python process on a machine that may be busy.
SOAK_TIMEOUT = 900

# Bounds on waits that a passing test never reaches (they only turn a hang
# into a failure), generous because the machine may be busy.
IO_TIMEOUT = 30.0
STARTUP_TIMEOUT = 20.0

RELIABILITY_SERVER = Path(__file__).with_name("reliability_server.py")


def params(default: tuple[Any, ...], soak: tuple[Any, ...]) -> list[Any]:
    """The default sizes, and the soak sizes skipped unless TRIOSERVE_SOAK=1."""
    return [
        pytest.param(*default, id="default"),
        pytest.param(
            *soak,
            id="soak",
            marks=[pytest.mark.soak, soak_only, pytest.mark.timeout(SOAK_TIMEOUT)],
        ),
    ]


def report(name: str, **numbers: object) -> None:
    """Print the numbers a test measured, on one line (see ``-rP``)."""
    shown = " ".join(f"{key}={value}" for key, value in numbers.items())
    print(f"RELIABILITY {name}: {shown}")


def memory_kib(field: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` memory field in KiB: VmRSS now, VmHWM its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_stats_add_up(stats: trioserve.ServerStats) -> None:
    """Every accepted request ended in exactly one way, and none is running."""
    ended = (
        stats.rejected
        + stats.dropped
        + stats.completed
        + stats.failed
        + stats.timed_out
        + stats.disconnected
        + stats.cancelled
    )
    assert stats.active == 0, stats
    assert stats.accepted == ended, stats


def count_tasks() -> int:
    """How many Trio tasks exist in this run, the root task's tree included."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child)
            for nursery in task.child_nurseries
            for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


class ClosedRequests:
    """Counts requests the server has closed; lets a test wait for a number."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def add(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


class CountingTCPServer(trioserve.TCPServer):
    """A TCPServer that counts requests once they are closed.

    ``shutdown_request`` is awaited last in every request's task, after the
    counters in ``stats`` are updated, so waiting for ``closed`` is waiting
    for the server to be done with those requests.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = ClosedRequests()

    async def shutdown_request(self, request: Any) -> None:
        try:
            await super().shutdown_request(request)
        finally:
            self.closed.add()


class ByteEcho(trioserve.StreamRequestHandler):
    """Echoes every byte as it arrives, whatever the framing."""

    async def handle(self) -> None:
        while chunk := await self.rfile.read1():
            await self.wfile.write(chunk)


class DatagramEcho(trioserve.DatagramRequestHandler):
    async def handle(self) -> None:
        await self.wfile.write(await self.rfile.read())


async def reset(stream: trio.abc.Stream) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes; a reset ends it as well."""
    data = bytearray()
    with trio.fail_after(IO_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Short, so Unix socket paths stay under the 108-byte limit.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="trel"))
    yield path
    shutil.rmtree(path)


# -- integrity under load ------------------------------------------------------

# Chunk sizes come from three ranges, so tiny writes mix with large ones.
CHUNK_RANGES = ((1, 16), (1, 1500), (1, 65536))


def random_chunk_size(rng: random.Random) -> int:
    return rng.randint(*rng.choice(CHUNK_RANGES))


async def echo_integrity(
    open_stream: Callable[[], Awaitable[trio.abc.Stream]],
    clients: int,
    size: int,
    seed: int = 0,
) -> int:
    """Run ``clients`` echo clients at once; return the bytes verified.

    Each sends ``size`` random bytes in random-sized chunks while it reads
    the echo, and checks that exactly those bytes came back, in order (by
    their SHA-256). Data is made as it is sent, so the soak sizes need no
    memory.
    """
    verified = 0

    async def client(number: int) -> None:
        nonlocal verified
        rng = random.Random(seed * 1_000_003 + number)
        sent, received = hashlib.sha256(), hashlib.sha256()
        count = 0

        async def send(stream: trio.abc.Stream) -> None:
            remaining = size
            while remaining:
                chunk = rng.randbytes(min(remaining, random_chunk_size(rng)))
                sent.update(chunk)
                await stream.send_all(chunk)
                remaining -= len(chunk)

        async def receive(stream: trio.abc.Stream) -> None:
            nonlocal count
            while count < size:
                chunk = await stream.receive_some(65536)
                assert chunk, f"client {number}: end of stream at {count}/{size}"
                received.update(chunk)
                count += len(chunk)

        async with await open_stream() as stream, trio.open_nursery() as nursery:
            nursery.start_soon(send, stream)
            nursery.start_soon(receive, stream)
        assert count == size
        assert received.hexdigest() == sent.hexdigest(), f"client {number}: corrupt"
        verified += count

    async with trio.open_nursery() as nursery:
        for number in range(clients):
            nursery.start_soon(client, number)
    return verified


@pytest.mark.parametrize(("clients", "size"), params((100, 256 * 1024), (500, 2**20)))
async def test_tcp_echo_integrity_under_load(clients: int, size: int) -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), ByteEcho)
    start = time.perf_counter()
    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            verified = await echo_integrity(lambda: connect(server), clients, size)
    elapsed = time.perf_counter() - start
    assert verified == clients * size
    assert server.stats.completed == server.stats.accepted == clients
    assert_stats_add_up(server.stats)
    report(
        "tcp-integrity",
        clients=clients,
        MiB=verified // 2**20,
        seconds=f"{elapsed:.2f}",
        MiB_per_s=f"{verified / 2**20 / elapsed:.1f}",
    )


@pytest.mark.parametrize(("clients", "size"), params((50, 128 * 1024), (500, 2**20)))
async def test_unix_echo_integrity_under_load(
    clients: int, size: int, short_tmp: Path
) -> None:
    path = str(short_tmp / "echo.sock")
    server = trioserve.UnixStreamServer(path, ByteEcho)
    start = time.perf_counter()
    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            verified = await echo_integrity(
                partial(trio.open_unix_socket, path), clients, size
            )
    elapsed = time.perf_counter() - start
    assert verified == clients * size
    assert server.stats.completed == server.stats.accepted == clients
    assert_stats_add_up(server.stats)
    report(
        "unix-integrity",
        clients=clients,
        MiB=verified // 2**20,
        seconds=f"{elapsed:.2f}",
        MiB_per_s=f"{verified / 2**20 / elapsed:.1f}",
    )


@pytest.mark.parametrize(("clients", "size"), params((20, 128 * 1024), (200, 2**20)))
async def test_tls_echo_integrity_under_load(clients: int, size: int) -> None:
    server_context, client_context = tls_contexts()
    server = trioserve.TCPServer(("127.0.0.1", 0), ByteEcho, ssl_context=server_context)

    async def open_tls() -> trio.SSLStream[trio.SocketStream]:
        host, port = server.server_address
        return await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=client_context
        )

    start = time.perf_counter()
    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            verified = await echo_integrity(open_tls, clients, size)
    elapsed = time.perf_counter() - start
    assert verified == clients * size
    assert server.stats.completed == server.stats.accepted == clients
    assert_stats_add_up(server.stats)
    report(
        "tls-integrity",
        clients=clients,
        MiB=verified // 2**20,
        seconds=f"{elapsed:.2f}",
        MiB_per_s=f"{verified / 2**20 / elapsed:.1f}",
    )


# A reply lost on loopback (it can happen when a receive buffer overflows) is
# asked for again, this many times, each after waiting this long.
UDP_ATTEMPTS = 5
UDP_REPLY_WAIT = 1.0


def udp_receive_buffer_errors() -> int:
    """The system's count of datagrams dropped for a full receive buffer."""
    lines = [
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Udp:")
    ]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


@pytest.mark.parametrize(("clients", "requests"), params((50, 40), (50, 2000)))
async def test_udp_every_reply_matches_its_request(clients: int, requests: int) -> None:
    server = trioserve.UDPServer(("127.0.0.1", 0), DatagramEcho)
    resent = 0
    stale = 0

    async def ask(
        sock: trio.socket.SocketType, payload: bytes, asked: set[bytes]
    ) -> bool:
        """Send ``payload``; True once its echo is back, False if not in time."""
        nonlocal stale
        await sock.sendto(payload, server.server_address)
        with trio.move_on_after(UDP_REPLY_WAIT):
            while True:
                reply, source = await sock.recvfrom(65536)
                assert source == server.server_address
                if reply == payload:
                    return True
                # Only a late echo of an earlier request may come instead.
                assert hashlib.sha256(reply).digest() in asked, "foreign reply"
                stale += 1
        return False

    async def client(number: int) -> None:
        nonlocal resent
        rng = random.Random(number)
        asked: set[bytes] = set()  # digests of every request sent
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            for sequence in range(requests):
                # A unique header, then random bytes of a random length.
                payload = f"{number}:{sequence}:".encode()
                payload += rng.randbytes(rng.randint(0, 4000))
                asked.add(hashlib.sha256(payload).digest())
                for _ in range(UDP_ATTEMPTS):
                    if await ask(sock, payload, asked):
                        break
                    resent += 1
                else:
                    pytest.fail(f"no reply to {payload[:20]!r} after resending")

    overflows_before = udp_receive_buffer_errors()
    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            async with trio.open_nursery() as nursery:
                for number in range(clients):
                    nursery.start_soon(client, number)
    # Loopback loses a datagram only when a receive buffer is full; the
    # kernel counts those (for the whole system, so others' too).
    overflows = udp_receive_buffer_errors() - overflows_before
    # A datagram the server received was answered, whether or not the answer
    # arrived; the resent ones were received by the server or lost on the way.
    assert clients * requests <= server.stats.completed <= clients * requests + resent
    assert server.stats.malformed == 0
    assert_stats_add_up(server.stats)
    report(
        "udp",
        clients=clients,
        requests=clients * requests,
        lost_and_resent=resent,
        late_replies=stale,
        receive_buffer_overflows=overflows,
    )


# -- slow and stuck clients ------------------------------------------------------


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


# -- resource exhaustion -----------------------------------------------------------

# Runs ``python -m trioserve`` with RLIMIT_NOFILE lowered first (in the child
# itself, so the test process needs no preexec_fn).
LIMITED_CLI = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
    "runpy.run_module('trioserve', run_name='__main__', alter_sys=True)"
)


class Child:
    """A server subprocess: its stdout line by line, its stderr in a file."""

    def __init__(self, argv: list[str]) -> None:
        # Closed in close(); a file, not a pipe, so nobody has to drain it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.pid = self.proc.pid
        self._stdout = b""

    def line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The next line on stdout, without its newline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._stdout:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line in {timeout} s: {self.stderr()}"
                if selector.select(remaining):
                    data = os.read(fd, 65536)
                    assert data, f"stdout closed: {self.stderr()}"
                    self._stdout += data
        line, _, self._stdout = self._stdout.partition(b"\n")
        return line.decode()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = IO_TIMEOUT) -> tuple[int, str, str]:
        """SIGTERM, then wait; return ``(returncode, rest of stdout, stderr)``."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (self._stdout + out).decode(), self.stderr()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=IO_TIMEOUT)
        self._stderr.close()


@contextlib.contextmanager
def child(*args: str) -> Iterator[Child]:
    process = Child([sys.executable, "-W", "error::ResourceWarning", *args])
    try:
        yield process
    finally:
        process.close()


def cli_port(line: str) -> int:
    assert line.startswith("trioserve: serving TCP on 127.0.0.1:"), line
    return int(line.rpartition(":")[2])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll another process's state (its fds, its log) until ``predicate``."""
    deadline = time.monotonic() + IO_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def blocking_line(sock: socket.socket) -> bytes:
    """Read up to and including a newline (or to end of stream)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_running_out_of_file_descriptors_is_survived() -> None:
    limit = 64
    with child(
        "-c", LIMITED_CLI.format(limit=limit), "echo", "--tcp", "127.0.0.1:0"
    ) as (server):
        port = cli_port(server.line())
        idle_fds = process_fds(server.pid)
        # Each connection it accepts costs the server one descriptor.
        room = limit - idle_fds
        clients: list[socket.socket] = []
        try:
            for number in range(room + 20):
                client = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                clients.append(client)
                client.sendall(b"hi %d\n" % number)
            wait_until(lambda: "EMFILE" in server.stderr(), "EMFILE logged")
            # Those it could accept are served: the first `room` ones, in
            # order of arrival.
            for number, client in enumerate(clients[:room]):
                assert blocking_line(client) == b"hi %d\n" % number
            assert process_fds(server.pid) == limit
            # Out of descriptors, it pauses between attempts to accept
            # instead of spinning: watch it for a second.
            cpu_before = cpu_seconds(server.pid)
            logged_before = server.stderr().count("EMFILE")
            time.sleep(1.0)
            cpu_used = cpu_seconds(server.pid) - cpu_before
            retries = server.stderr().count("EMFILE") - logged_before
            assert cpu_used < 0.5, f"{cpu_used:.2f} s of CPU in 1 s at EMFILE"
            assert server.proc.poll() is None
            # Release them all; the server accepts again, also the clients
            # that waited in the backlog (and have gone by now).
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: process_fds(server.pid) == idle_fds, "fds freed")
        with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT) as client:
            client.sendall(b"served again\n")
            assert blocking_line(client) == b"served again\n"
        wait_until(lambda: process_fds(server.pid) == idle_fds, "fds freed")
        returncode, _, stderr = server.stop()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    emfile_lines = [line for line in stderr.splitlines() if "EMFILE" in line]
    assert all(" ERROR " in line for line in emfile_lines), emfile_lines
    report(
        "emfile",
        limit=limit,
        idle_fds=idle_fds,
        served_at_limit=room,
        emfile_log_lines=len(emfile_lines),
        retries_in_1s=retries,
        cpu_in_1s=f"{cpu_used:.2f}",
    )


@pytest.mark.parametrize("waiting", params((300,), (2000,)))
def test_connection_flood_beyond_max_requests_waits_in_the_backlog(
    waiting: int,
) -> None:
    bound = 10
    with child(
        "-m", "trioserve", "echo", "--tcp", "127.0.0.1:0", "--max-requests", str(bound)
    ) as server:
        port = cli_port(server.line())
        holders: list[socket.socket] = []
        waiters: list[socket.socket] = []
        try:
            for number in range(bound):
                holder = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                holders.append(holder)
                holder.sendall(b"hold %d\n" % number)
                assert blocking_line(holder) == b"hold %d\n" % number
            for number in range(waiting):
                waiter = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                waiters.append(waiter)
                waiter.sendall(b"wait %d\n" % number)
            with selectors.DefaultSelector() as selector:
                for number, waiter in enumerate(waiters):
                    selector.register(waiter, selectors.EVENT_READ, number)
                # At the bound, nobody else is served (a slow server would
                # only make this pass more easily).
                assert selector.select(timeout=0.5) == []
                for holder in holders:
                    holder.close()
                # Each waiter, once answered, hangs up and frees its slot.
                served = 0
                deadline = time.monotonic() + IO_TIMEOUT + waiting / 100
                while served < waiting:
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, f"only {served} of {waiting} served"
                    for key, _ in selector.select(remaining):
                        number = key.data
                        selector.unregister(key.fileobj)
                        assert blocking_line(waiters[number]) == b"wait %d\n" % number
                        waiters[number].close()
                        served += 1
        finally:
            for sock in holders + waiters:
                sock.close()
        returncode, _, stderr = server.stop()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert served == waiting


# -- hostile input -----------------------------------------------------------------


async def send_hostile(port: int, pieces: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``pieces`` while reading; return what came back and bytes sent.

    Stops sending when the server closes or resets the connection, and
    reads until it does.
    """
    echoed = bytearray()
    sent = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:

        async def read() -> None:
            echoed.extend(await read_to_eof(client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                for piece in pieces:
                    await client.send_all(piece)
                    sent += len(piece)
                await client.send_eof()
            except trio.BrokenResourceError:
                pass
    return bytes(echoed), sent


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


@pytest.mark.parametrize("body_mib", params((20,), (100,)))
async def test_hostile_input_closes_the_offender_and_memory_stays_bounded(
    body_mib: int,
) -> None:
    limit = 65536  # the handler's max_line_length
    rng = random.Random(6)
    no_newline = rng.randbytes(2**20).replace(b"\n", b"?")
    with child(str(RELIABILITY_SERVER)) as server:
        port = int(server.line().removeprefix("port "))
        with trio.fail_after(SOAK_TIMEOUT):
            async with await trio.open_tcp_stream("127.0.0.1", port) as normal:
                assert await roundtrip(normal, b"hello\n") == b"hello\n"
                baseline = memory_kib("VmHWM", server.pid)
                offenders = 0

                # An oversized line, then one just over the limit.
                for line in (b"a" * 2**20 + b"\n", b"b" * limit + b"\n"):
                    echoed, _ = await send_hostile(port, iter([line]))
                    assert echoed == b""
                    offenders += 1
                    assert await roundtrip(normal, b"ok\n") == b"ok\n"

                # A line exactly at the limit, of NUL bytes, is echoed.
                line = b"\0" * (limit - 1) + b"\n"
                assert await send_hostile(port, iter([line])) == (line, len(line))

                # Binary garbage: random bytes, with the newlines chance puts
                # in them, comes back exactly (the last line at end of stream).
                garbage = rng.randbytes(256 * 1024)
                assert (await send_hostile(port, iter([garbage])))[0] == garbage

                # A large body without a newline is cut off: the server
                # never holds it (see the peak memory below); it closes the
                # connection, discarding the rest while it lingers.
                body = body_mib * 2**20
                echoed, _ = await send_hostile(port, repeat(no_newline[:65536], body))
                assert echoed == b""
                offenders += 1

                # Several at once, while the normal client goes on.
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(
                            send_hostile, port, repeat(no_newline, 20 * 2**20)
                        )
                    offenders += 8
                    for number in range(5):
                        line = b"during %d\n" % number
                        assert await roundtrip(normal, line) == line
                assert await roundtrip(normal, b"bye\n") == b"bye\n"
                peak = memory_kib("VmHWM", server.pid)
                rss = memory_kib("VmRSS", server.pid)
        returncode, stdout, stderr = server.stop()
    assert returncode == 0, stderr
    stats = json.loads(stdout.strip().rpartition("stats ")[2])
    assert stats["failed"] == offenders, stats
    assert stats["disconnected"] == 0, stats
    assert stats["completed"] == stats["accepted"] - offenders, stats
    # One clear line per offender, with the client's address and the
    # reason; no traceback, since the fault is the peer's, not the server's.
    assert stderr.count("WARNING trioserve: line too long from") == offenders
    too_long = f"line longer than max_line_length ({limit} bytes)"
    assert stderr.count(too_long) == offenders, stderr[-3000:]
    assert stderr.count("Traceback") == 0
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 64, f"peak memory grew {growth_mib:.1f} MiB"
    report(
        "hostile",
        body_MiB=body_mib,
        offenders=offenders,
        baseline_peak_MiB=f"{baseline / 1024:.1f}",
        peak_MiB=f"{peak / 1024:.1f}",
        peak_growth_MiB=f"{growth_mib:.1f}",
        rss_end_MiB=f"{rss / 1024:.1f}",
    )


async def test_garbage_instead_of_tls_or_proxy_header_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    server_context, client_context = tls_contexts()
    rng = random.Random(7)
    tls = CountingTCPServer(("127.0.0.1", 0), Echo, ssl_context=server_context)
    proxied = CountingTCPServer(
        ("127.0.0.1", 0), Echo, proxy_protocol="auto", trusted_proxies=["127.0.0.1"]
    )
    garbage = [rng.randbytes(rng.randint(1, 4096)) for _ in range(20)]
    # Bytes that begin like a header and then go wrong, or never end.
    garbage += [b"PROXY TCP4 1.2.3.4 garbage\r\n", b"PROXY " + b"9" * 200]
    garbage += [b"\r\n\r\n\0\r\nQUIT\n" + rng.randbytes(100)]
    with trio.fail_after(IO_TIMEOUT):
        async with serving(tls), serving(proxied):
            for server in (tls, proxied):
                for data in garbage:
                    async with await connect(server) as client:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await client.send_all(data)
                            await client.send_eof()
                        # A TLS server may send an alert before it closes.
                        if await read_to_eof(client) and server is proxied:
                            pytest.fail("the PROXY server answered garbage")
                await server.closed.wait_for(len(garbage))
            # Both still serve well-behaved clients.
            host, port = tls.server_address
            async with await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            ) as good:
                assert await roundtrip(good, b"fine\n") == b"fine\n"
            async with await connect(proxied) as good:
                header = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n"
                assert await roundtrip(good, header + b"fine\n") == b"fine\n"
    for server in (tls, proxied):
        assert server.stats.dropped == len(garbage), server.stats
        assert server.stats.completed == 1
        assert_stats_add_up(server.stats)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# Random bytes, some starting like a PROXY header, against a live server that
# reads a PROXY header ("auto": v1 or v2) and then lines of at most 64 bytes.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
fuzz_payloads = st.tuples(
    st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", PROXY_V2_SIGNATURE]),
    st.binary(max_size=600),
).map(b"".join)


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(payloads=st.lists(fuzz_payloads, min_size=1, max_size=4))
def test_random_bytes_never_upset_a_proxy_and_line_server(
    payloads: list[bytes],
) -> None:
    class Short(Echo):
        max_line_length = 64

    async def main() -> None:
        server = CountingTCPServer(
            ("127.0.0.1", 0),
            Short,
            proxy_protocol="auto",
            trusted_proxies=["127.0.0.1"],
            handshake_timeout=5,
        )
        with trio.fail_after(IO_TIMEOUT):
            async with serving(server):
                for payload in payloads:
                    async with await connect(server) as client:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await client.send_all(payload)
                            await client.send_eof()
                        echoed = await read_to_eof(client)
                    # Whatever came back is lines the payload held.
                    assert echoed in payload
                await server.closed.wait_for(len(payloads))
                async with await connect(server) as good:
                    header = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n"
                    assert await roundtrip(good, header + b"fine\n") == b"fine\n"
        stats = server.stats
        assert stats.accepted == len(payloads) + 1
        assert stats.disconnected == stats.timed_out == stats.cancelled == 0
        assert_stats_add_up(stats)

    trio.run(main)


# -- handler faults ---------------------------------------------------------------


class Faulty(trioserve.StreamRequestHandler):
    """Misbehaves as its first line says; records what ran."""

    finish_timeout = 1.0
    events: dict[str, list[str]]

    async def setup(self) -> None:
        await super().setup()
        self.mode = (await self.rfile.readline()).strip().decode()
        self.events["setup"].append(self.mode)
        if self.mode == "setup":
            raise ValueError("setup failed")

    async def handle(self) -> None:
        mode = self.mode
        if mode == "handle":
            raise ValueError("handle failed")
        if mode == "group":
            raise ExceptionGroup("two failures", [ValueError("a"), KeyError("b")])
        if mode == "block":
            # Hogs the event loop: no checkpoint for 0.2 s of real time.
            time.sleep(0.2)  # noqa: ASYNC251
        if mode in ("swallow", "hang", "hang-finish"):
            await self.wfile.write(b"working\n")
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                if mode != "swallow":
                    raise
                self.events["swallowed"].append(mode)
            # Swallowed it and keeps going: the next checkpoint raises again.
            await trio.sleep(1)
        await self.wfile.write(f"ok {mode}\n".encode())
        if mode == "echo":
            async for line in self.rfile:
                await self.wfile.write(line)

    async def finish(self) -> None:
        self.events["finish"].append(self.mode)
        if self.mode == "finish":
            raise RuntimeError("finish failed")
        if self.mode == "hang-finish":
            await trio.sleep_forever()
        await super().finish()


async def test_handler_faults_leave_the_server_up_and_counted_right(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: dict[str, list[str]] = {"setup": [], "finish": [], "swallowed": []}
    handler = type("FaultyHandler", (Faulty,), {"events": events})
    grace = 3.0
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=grace)
    failing = ["setup", "handle", "group", "finish"]
    stuck = ["swallow", "hang", "hang-finish"] * 2
    returned: list[float] = []

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await server.serve_forever(task_status=task_status)
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        normal = await connect(server)
        assert await roundtrip(normal, b"echo\n") == b"ok echo\n"
        # What each client gets back before the server closes its connection.
        replies = {"setup": b"", "handle": b"", "group": b""}
        replies |= {"finish": b"ok finish\n", "block": b"ok block\n"}
        for _ in range(3):
            for mode, reply in replies.items():
                async with await connect(server) as client:
                    await client.send_all(mode.encode() + b"\n")
                    assert await read_to_eof(client) == reply
                assert await roundtrip(normal, b"up?\n") == b"up?\n"
        clients = []
        for mode in stuck:
            clients.append(await connect(server))
            assert await roundtrip(clients[-1], mode.encode() + b"\n") == b"working\n"
        start = trio.current_time()
        await server.shutdown()
        stopped = trio.current_time()
        for client in [normal, *clients]:
            await client.aclose()
    await server.server_close()
    # The grace period, then the hanging finish() cut off at finish_timeout,
    # then the close lingering for a client that is not reading yet.
    assert stopped - start == pytest.approx(
        grace + Faulty.finish_timeout + server.drain_window, abs=0.05
    )
    assert returned == [stopped]
    stats = server.stats
    assert stats.failed == 3 * len(failing)
    assert stats.completed == 3 + 1  # the blocking ones and the normal client
    assert stats.cancelled == len(stuck)
    assert stats.timed_out == stats.disconnected == 0
    assert_stats_add_up(stats)
    # finish() ran for every request whose setup() returned.
    assert sorted(events["finish"]) == sorted(
        [mode for mode in events["setup"] if mode != "setup"]
    )
    assert events["swallowed"] == ["swallow", "swallow"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 * len(failing)
    cut_off = [r for r in caplog.records if "finish_timeout" in r.getMessage()]
    assert len(cut_off) == 2


# -- shutdown under load ----------------------------------------------------------


class Worker(trioserve.StreamRequestHandler):
    """``work SECONDS`` takes that long (virtual time), then says ``done``."""

    record: dict[str, int]

    async def setup(self) -> None:
        await super().setup()
        self.record["setup"] += 1

    async def handle(self) -> None:
        async for line in self.rfile:
            self.record["started"] += 1
            await trio.sleep(float(line.split()[1]))
            await self.wfile.write(b"done\n")
            self.record["done"] += 1

    async def finish(self) -> None:
        await trio.sleep(0.01)  # a checkpoint: needs finish()'s shield
        self.record["finish"] += 1
        await super().finish()


@pytest.mark.parametrize("busy", params((200,), (1000,)))
async def test_graceful_shutdown_under_load(
    busy: int, autojump_clock: trio.testing.MockClock
) -> None:
    grace, idle, partial = 5.0, 20, 20
    record = dict.fromkeys(["setup", "started", "done", "finish"], 0)
    handler = type("WorkerHandler", (Worker,), {"record": record})
    fds_before, tasks_before = open_fds(), count_tasks()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=grace)
    returned: list[float] = []
    # Half the busy requests need less than the grace period, half more.
    durations = [(number % 10) + 0.5 for number in range(busy)]
    expected_done = sum(duration < grace for duration in durations)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await server.serve_forever(task_status=task_status)
        returned.append(trio.current_time())

    replies: dict[str, list[bytes]] = {"busy": [], "idle": [], "partial": []}

    async def client(kind: str, duration: float) -> None:
        async with await connect(server) as stream:
            if kind == "idle":
                assert await roundtrip(stream, b"work 0\n") == b"done\n"
                connected.append(kind)
            elif kind == "partial":
                await stream.send_all(b"work ")
                connected.append(kind)
                await shutting_down.wait()
                await trio.sleep(1)  # in the middle of a message: it may finish
                await stream.send_all(b"0.5\n")
            else:
                await stream.send_all(b"work %f\n" % duration)
                connected.append(kind)
            replies[kind].append(await read_to_eof(stream))

    connected: list[str] = []
    shutting_down = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        async with trio.open_nursery() as clients:
            for duration in durations:
                clients.start_soon(client, "busy", duration)
            for _ in range(idle):
                clients.start_soon(client, "idle", 0)
            for _ in range(partial):
                clients.start_soon(client, "partial", 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(connected) == busy + idle + partial
            assert server.stats.active == busy + idle + partial
            start = trio.current_time()
            shutting_down.set()
            await server.shutdown()
            stopped = trio.current_time()
    await server.server_close()
    # Requests cut off at the grace period; finish() (0.01 s) runs after.
    assert stopped - start == pytest.approx(grace + 0.01, abs=0.02)
    assert returned == [stopped]
    # Every request that started either completed or was cancelled, and
    # finish() ran for each.
    assert record["setup"] == record["finish"] == busy + idle + partial
    assert record["done"] == expected_done + idle + partial
    stats = server.stats
    assert stats.completed == expected_done + idle + partial
    assert stats.cancelled == busy - expected_done
    assert_stats_add_up(stats)
    assert sorted(replies["busy"]) == sorted(
        [b"done\n" if duration < grace else b"" for duration in durations]
    )
    assert replies["idle"] == [b""] * idle
    assert replies["partial"] == [b"done\n"] * partial
    assert open_fds() == fds_before
    assert count_tasks() == tasks_before


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "tls",
        "proxy",
    ],
)
async def test_a_connection_that_sent_nothing_does_not_hold_up_shutdown(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    # A port scanner, a load balancer's TCP check, a browser's preconnect.
    server_context, _ = tls_contexts()
    choices: dict[str, dict[str, Any]] = {
        "plain": {},
        "tls": {"ssl_context": server_context},
        "proxy": {"proxy_protocol": "v1", "trusted_proxies": ["127.0.0.1"]},
    }
    options = choices[kind]
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, shutdown_timeout=5, **options)
    received = b"not read"

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        silent = await connect(server)

        async def read_then_close() -> None:
            nonlocal received
            received = await read_to_eof(silent)
            await silent.aclose()

        nursery.start_soon(read_then_close)
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.active == 1
        start = trio.current_time()
        await server.shutdown()
        elapsed = trio.current_time() - start
    await server.server_close()
    assert received == b""
    # Only the drain window for a first message on its way, not the grace.
    assert elapsed == pytest.approx(server.drain_window, abs=0.05)
    assert server.stats.cancelled == 0


async def test_start_stop_200_times_leaks_nothing() -> None:
    async def cycle() -> None:
        server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
        async with serving(server), await connect(server) as client:
            assert await roundtrip(client, b"ping\n") == b"ping\n"

    with trio.fail_after(IO_TIMEOUT * 2):
        for _ in range(20):  # warm up caches and allocators
            await cycle()
        gc.collect()
        fds_before, rss_before = open_fds(), memory_kib("VmRSS")
        tasks_before = count_tasks()
        start = time.perf_counter()
        for _ in range(200):
            await cycle()
        elapsed = time.perf_counter() - start
        gc.collect()
        fds_after, rss_after = open_fds(), memory_kib("VmRSS")
    assert fds_after == fds_before
    assert count_tasks() == tasks_before
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB over 200 cycles"
    report(
        "start-stop",
        cycles=200,
        seconds=f"{elapsed:.2f}",
        fds=f"{fds_before}->{fds_after}",
        rss_MiB=f"{rss_before / 1024:.1f}->{rss_after / 1024:.1f}",
    )


# -- leak checks ------------------------------------------------------------------


class OneLine(trioserve.StreamRequestHandler):
    """Answers one line, then closes: the server closes first, so the
    connection's TIME_WAIT stays on the server's side, not on the client's
    ephemeral ports."""

    async def handle(self) -> None:
        await self.wfile.write(await self.rfile.readline())


@pytest.mark.parametrize("connections", params((5000,), (100_000,)))
async def test_many_short_connections_leak_nothing(connections: int) -> None:
    workers, warm_up = 16, 500
    server = trioserve.TCPServer(("127.0.0.1", 0), OneLine)

    async def run(count: int) -> None:
        async def worker(share: int) -> None:
            for _ in range(share):
                async with await connect(server) as client:
                    await client.send_all(b"ping\n")
                    assert await read_to_eof(client) == b"ping\n"

        async with trio.open_nursery() as nursery:
            for number in range(workers):
                nursery.start_soon(
                    worker, count // workers + (number < count % workers)
                )

    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            await run(warm_up)
            gc.collect()
            fds_before, rss_before = open_fds(), memory_kib("VmRSS")
            start = time.perf_counter()
            await run(connections)
            elapsed = time.perf_counter() - start
            gc.collect()
            fds_after, rss_after = open_fds(), memory_kib("VmRSS")
    assert fds_after == fds_before
    assert server.stats.completed == warm_up + connections
    assert_stats_add_up(server.stats)
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB"
    report(
        "short-connections",
        connections=connections,
        seconds=f"{elapsed:.1f}",
        per_s=f"{connections / elapsed:.0f}",
        fds=f"{fds_before}->{fds_after}",
        rss_MiB=f"{rss_before / 1024:.1f}->{rss_after / 1024:.1f}",
    )
