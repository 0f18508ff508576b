"""Whole-request deadline, idle timeout between messages, per-peer limit."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from support.servers import Echo, connect, read_to_eof, roundtrip, serving

import trioserve


async def test_request_timeout_cancels_the_handler_and_reports_timeout_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[BaseException | None] = []
    finished: list[float] = []

    class Recording(trioserve.TCPServer):
        async def handle_error(self, request: object, client_address: object) -> None:
            import sys

            seen.append(sys.exc_info()[1])

    class Busy(Echo):
        async def finish(self) -> None:
            finished.append(trio.current_time())

    server = Recording(("127.0.0.1", 0), Busy, request_timeout=10)
    async with serving(server), await connect(server) as client:
        start = trio.current_time()
        # A chatty client: every line is answered, but the request as a
        # whole may last only 10 s.
        for _ in range(3):
            assert await roundtrip(client, b"tick\n") == b"tick\n"
            await trio.sleep(3)
        assert await read_to_eof(client) == b""
        assert trio.current_time() - start == pytest.approx(10)
    assert len(seen) == 1
    assert isinstance(seen[0], TimeoutError)
    assert "request_timeout" in str(seen[0])
    assert finished == [pytest.approx(start + 10)]
    assert (server.stats.timed_out, server.stats.completed) == (1, 0)


async def test_idle_timeout_lets_an_idle_connection_go_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, idle_timeout=30)
    async with serving(server), await connect(server) as client:
        assert await roundtrip(client, b"one\n") == b"one\n"
        await trio.sleep(29)  # busy enough: just inside the idle timeout
        assert await roundtrip(client, b"two\n") == b"two\n"
        start = trio.current_time()
        assert await read_to_eof(client) == b""
        assert trio.current_time() - start == pytest.approx(30)
    # Ended by end-of-stream: a normal completion, no error.
    assert (server.stats.completed, server.stats.timed_out) == (1, 0)


async def test_idle_timeout_cuts_off_a_client_trickling_a_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, idle_timeout=30)
    async with serving(server), await connect(server) as client:
        start = trio.current_time()
        # Slowloris: a byte every 5 s keeps each read busy, but the line
        # never completes within the idle timeout.
        with trio.move_on_after(600):
            try:
                while True:
                    await client.send_all(b"x")
                    await trio.sleep(5)
            except trio.BrokenResourceError:
                pass
        assert await read_to_eof(client) == b""
        # Cut off at 30 s; the client, which only sends, notices at its next
        # send after the server's lingering close.
        assert 30 <= trio.current_time() - start <= 40
    assert (server.stats.timed_out, server.stats.completed) == (1, 0)


async def test_max_connections_per_peer_refuses_the_excess_at_accept() -> None:
    release = trio.Event()

    class Holder(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"welcome\n")
            await release.wait()

    server = trioserve.TCPServer(("127.0.0.1", 0), Holder, max_connections_per_peer=2)
    async with serving(server):
        clients = [await connect(server) for _ in range(3)]
        try:
            assert await roundtrip(clients[0], b"") == b"welcome\n"
            assert await roundtrip(clients[1], b"") == b"welcome\n"
            assert await read_to_eof(clients[2]) == b""
            assert server.stats.rejected == 1
            # The limit counts requests in flight: when one ends, the same
            # peer may connect again.
            release.set()
            await read_to_eof(clients[0])
            await read_to_eof(clients[1])
            async with await connect(server) as again:
                assert await roundtrip(again, b"") == b"welcome\n"
        finally:
            for client in clients:
                await client.aclose()
    assert server.stats.accepted == 4


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_connections_per_peer"):
        trioserve.TCPServer(("127.0.0.1", 0), Echo, max_connections_per_peer=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        trioserve.TCPServer(("127.0.0.1", 0), Echo, idle_timeout=-1)
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Echo, request_timeout=5, idle_timeout=2, handshake_timeout=1
    )
    assert (server.request_timeout, server.idle_timeout) == (5, 2)
    assert server.handshake_timeout == 1
