"""Tests for ``upper.py``, run with pytest and pytest-trio.

Most tests talk to a real server on a free loopback port, started in the
test's nursery; the last ones serve the handler in memory, with
``trioserve.testing``: no sockets, and a clock that tests can jump.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from upper import Upper

import trioserve
import trioserve.testing

# Every test here is a Trio test. (Or set trio_mode = true in pytest's config.)
pytestmark = pytest.mark.trio


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[trioserve.TCPServer]:
    """A server on a free port, serving for as long as the test runs."""
    async with trioserve.TCPServer(("127.0.0.1", 0), Upper) as server:
        await nursery.start(server.serve_forever)
        yield server
        await server.shutdown()


async def connect(server: trioserve.TCPServer) -> trio.SocketStream:
    return await trio.open_tcp_stream(*server.server_address)


async def test_answers_each_line_in_upper_case(server: trioserve.TCPServer) -> None:
    async with await connect(server) as client:
        replies = trioserve.AsyncBufferedReader(client)
        await client.send_all(b"hello\nworld\n")
        assert await replies.readline() == b"HELLO\n"
        assert await replies.readline() == b"WORLD\n"


async def test_serves_clients_concurrently(server: trioserve.TCPServer) -> None:
    async with await connect(server) as first, await connect(server) as second:
        # The first client says nothing; the second is answered all the same.
        await second.send_all(b"me first\n")
        assert await second.receive_some() == b"ME FIRST\n"
        await first.send_all(b"fine\n")
        assert await first.receive_some() == b"FINE\n"


async def test_idle_client_is_let_go_at_once_on_shutdown(
    server: trioserve.TCPServer,
) -> None:
    async with await connect(server) as client:
        await client.send_all(b"hi\n")
        assert await client.receive_some() == b"HI\n"
        # Far less than the grace period: an idle client is not waited for.
        with trio.fail_after(1):
            await server.shutdown()
        assert await client.receive_some() == b""
    assert server.stats.completed == 1


async def test_an_overlong_line_ends_the_request_and_is_logged(
    server: trioserve.TCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with await connect(server) as client:
        await client.send_all(b"x" * 2000 + b"\n")
        assert await client.receive_some() == b""  # the server hung up
    assert server.stats.failed == 1
    # The peer's fault, not the server's: one WARNING line, no traceback.
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "line too long" in record.getMessage()


# -- In memory: no sockets, and no real time ---------------------------------


@pytest.fixture
async def memory_server() -> AsyncIterator[trioserve.testing.MemoryStreamServer]:
    """The same handler, served in memory for as long as the test runs."""
    async with trioserve.testing.serve_streams(Upper, idle_timeout=60) as server:
        yield server


async def test_in_memory(memory_server: trioserve.testing.MemoryStreamServer) -> None:
    async with await memory_server.connect() as client:
        await client.send_all(b"no sockets\n")
        assert await client.receive_some() == b"NO SOCKETS\n"


async def test_a_silent_client_is_let_go_after_a_minute(
    memory_server: trioserve.testing.MemoryStreamServer,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # autojump_clock: the minute passes in no real time.
    async with await memory_server.connect() as client:
        start = trio.current_time()
        assert await client.receive_some() == b""  # the server hung up
        assert trio.current_time() - start == 60
    assert memory_server.stats.completed == 1
