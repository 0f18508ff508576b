"""Reliability: every byte and datagram echoed intact under load (TCP, Unix, TLS, UDP).

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from support.reliability import (
    SOAK_TIMEOUT,
    ByteEcho,
    assert_stats_add_up,
    params,
    random_chunk_size,
    report,
)
from support.servers import (
    DatagramEcho,
    connect,
    serving,
    tls_contexts,
)

import trioserve


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
