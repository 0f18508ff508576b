"""Graceful shutdown and cancellation, over real loopback connections."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from support.servers import Echo, connect, open_fds, read_to_eof, roundtrip, serving

import trioserve


class Tracked(trioserve.StreamRequestHandler):
    """Echoes lines; ``block`` makes it wait for ever; records its lifecycle."""

    events: list[str]

    async def handle(self) -> None:
        async for line in self.rfile:
            if line == b"block\n":
                self.events.append("blocking")
                await trio.sleep_forever()
            await self.wfile.write(line)

    async def finish(self) -> None:
        # A checkpoint: finish() must be shielded to get past it when the
        # request is being cancelled.
        await trio.sleep(0.01)
        self.events.append("finish")
        await super().finish()


def tracked() -> type[Tracked]:
    return type("TrackedHandler", (Tracked,), {"events": []})


async def read_then_close(stream: trio.SocketStream, received: list[bytes]) -> None:
    """What a real client does at the server's end-of-stream: read it, close."""
    received.append(await read_to_eof(stream))
    await stream.aclose()


async def test_shutdown_when_not_serving_returns_at_once_and_twice_is_harmless(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    start = trio.current_time()
    await server.shutdown()
    await server.shutdown()
    assert trio.current_time() == start
    async with serving(server):
        pass  # serving() shuts down; shut down again after it returned:
    await server.shutdown()
    assert trio.current_time() == start


async def test_shutdown_stops_accepting_at_once() -> None:
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        async with await connect(server) as busy:
            await busy.send_all(b"block\n")
            await trio.testing.wait_all_tasks_blocked()
            assert server.is_serving()
            nursery.start_soon(server.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            assert not server.is_serving()
            async with await connect(server) as late:
                await late.send_all(b"hello?\n")
                await trio.testing.wait_all_tasks_blocked()
                assert server.stats.accepted == 1
            await server.shutdown(timeout=0)
    await server.server_close()


async def test_idle_connections_leave_once_the_drain_window_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=100)
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        clients = [await connect(server) for _ in range(3)]
        for client in clients:
            assert await roundtrip(client, b"hello\n") == b"hello\n"
            nursery.start_soon(read_then_close, client, received)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown()
        # The drain window (nothing came) and finish()'s own 0.01 s passed,
        # not the 100 s grace period.
        assert trio.current_time() - start == pytest.approx(server.drain_window + 0.01)
    assert received == [b""] * 3
    await server.server_close()
    assert handler.events == ["finish"] * 3
    assert server.stats.completed == 3


async def test_request_mid_message_completes_within_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        async with await connect(server) as client:
            await client.send_all(b"half a ")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            nursery.start_soon(server.shutdown)
            await trio.sleep(3)  # virtual time: the client is slow, not idle
            assert server.stats.active == 1
            await client.send_all(b"line\n")
            # The message finishes; the handler then waits between messages,
            # so it sees end-of-stream and the request completes.
            assert await read_to_eof(client) == b"half a line\n"
    assert trio.current_time() - start == pytest.approx(3.01)
    await server.server_close()
    assert (server.stats.completed, server.stats.cancelled) == (1, 0)


async def test_request_running_past_the_grace_is_cancelled_and_finish_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=7)
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        stuck, idle = await connect(server), await connect(server)
        await stuck.send_all(b"block\n")
        for client in (stuck, idle):
            nursery.start_soon(read_then_close, client, received)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown()
        assert trio.current_time() - start == pytest.approx(7, abs=0.1)
    assert received == [b""] * 2
    await server.server_close()
    assert handler.events == ["blocking", "finish", "finish"]
    assert (server.stats.cancelled, server.stats.completed) == (1, 1)
    assert server.stats.active == 0


async def test_shutdown_timeout_argument_overrides_the_attribute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=50)
    async with serving(server), trio.open_nursery() as clients:
        client = await connect(server)
        await client.send_all(b"block\n")
        clients.start_soon(read_then_close, client, [])
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown(timeout=2)
        assert trio.current_time() - start == pytest.approx(2, abs=0.1)


async def test_a_longer_shutdown_timeout_argument_beats_a_short_attribute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Slow(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            await self.rfile.readline()
            await trio.sleep(1)
            await self.wfile.write(b"done\n")

    server = trioserve.TCPServer(("127.0.0.1", 0), Slow, shutdown_timeout=0.05)
    received: list[bytes] = []
    async with serving(server), trio.open_nursery() as clients:
        client = await connect(server)
        await client.send_all(b"work\n")
        clients.start_soon(read_then_close, client, received)
        await trio.testing.wait_all_tasks_blocked()
        await server.shutdown(timeout=3)
    # Served within the 3 s the argument gave, not cut off at 0.05 s.
    assert received == [b"done\n"]
    assert (server.stats.completed, server.stats.cancelled) == (1, 0)


async def test_shutdown_from_inside_a_handler_does_not_deadlock() -> None:
    class Stopper(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            await self.rfile.readline()
            await self.server.shutdown()
            # Still running: shutdown() returned without waiting for us.
            await self.wfile.write(b"stopping\n")

    server = trioserve.TCPServer(("127.0.0.1", 0), Stopper)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await roundtrip(client, b"stop\n") == b"stopping\n"
        # serve_forever returned, so the nursery could close.
    assert not server.is_serving()
    assert server.stats.completed == 1
    await server.server_close()


async def test_concurrent_shutdowns_all_return() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    returned: list[int] = []

    async def stop(n: int) -> None:
        await server.shutdown()
        assert not server.is_serving()
        returned.append(n)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            for n in range(3):
                nursery.start_soon(stop, n)
    assert sorted(returned) == [0, 1, 2]
    await server.server_close()


async def test_closing_the_listening_socket_ends_serving() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await roundtrip(client, b"x\n") == b"x\n"
                await server.server_close()
                # serve_forever leaves and the idle client is let go.
                assert await read_to_eof(client) == b""
    assert not server.is_serving()


async def test_outside_cancellation_cancels_handlers_runs_finish_closes_sockets() -> (
    None
):
    handler = tracked()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=60)
    raised: list[BaseException] = []

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        try:
            await server.serve_forever(task_status=task_status)
        except BaseException as exc:
            raised.append(exc)
            raise

    before = open_fds()
    async with server:
        with trio.CancelScope() as outside:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                clients = [await connect(server) for _ in range(3)]
                await clients[0].send_all(b"block\n")
                await clients[1].send_all(b"half a line")
                assert await roundtrip(clients[2], b"idle\n") == b"idle\n"
                await trio.testing.wait_all_tasks_blocked()
                assert server.stats.active == 3
                outside.cancel()
        assert outside.cancelled_caught
        assert len(raised) == 1
        assert isinstance(raised[0], trio.Cancelled)
        for client in clients:
            assert await read_to_eof(client) == b""
            await client.aclose()
    assert handler.events == ["blocking", "finish", "finish", "finish"]
    assert server.stats.cancelled == 3
    assert server.stats.active == 0
    assert open_fds() == before


async def test_finish_not_called_for_a_request_cancelled_during_setup() -> None:
    entered = trio.Event()
    calls: list[str] = []

    class SlowSetup(trioserve.StreamRequestHandler):
        async def setup(self) -> None:
            entered.set()
            await trio.sleep_forever()

        async def finish(self) -> None:
            calls.append("finish")

    server = trioserve.TCPServer(("127.0.0.1", 0), SlowSetup)
    async with server:
        with trio.CancelScope() as outside:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    await entered.wait()
                    outside.cancel()
                    await client.aclose()
    assert calls == []
    assert server.stats.cancelled == 1


async def test_many_start_stop_cycles_leak_nothing() -> None:
    before = open_fds()
    for _ in range(50):
        server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
        async with serving(server), await connect(server) as client:
            assert await roundtrip(client, b"ping\n") == b"ping\n"
    assert open_fds() == before


def connect_in_backlog(server: trioserve.TCPServer, count: int) -> list[socket.socket]:
    """Clients whose connections the kernel completed but nobody accepted yet.

    Blocking calls without a checkpoint: the server's accept loop cannot run
    until the caller next awaits.
    """
    clients = []
    for number in range(count):
        client = socket.create_connection(server.server_address[:2], timeout=10)
        client.sendall(b"line %d\n" % number)
        clients.append(client)
    return clients


async def replies(clients: list[socket.socket]) -> list[bytes]:
    def read_all(client: socket.socket) -> bytes:
        with client:
            return b"".join(iter(lambda: client.recv(4096), b""))

    with trio.fail_after(10):
        return [await trio.to_thread.run_sync(read_all, c) for c in clients]


async def test_close_serves_the_backlog_instead_of_resetting_it() -> None:
    # As serve_until_signalled does: shutdown and close at once. Connections
    # that were complete in the kernel get served within the grace period.
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        clients = connect_in_backlog(server, 3)
        nursery.start_soon(server.shutdown)
        await server.server_close()
        assert await replies(clients) == [b"line 0\n", b"line 1\n", b"line 2\n"]
    assert server.stats.accepted == server.stats.completed == 3


async def test_close_during_the_grace_period_serves_the_backlog() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        async with await connect(server) as busy:
            # Mid-message, so the shutdown waits for it.
            await busy.send_all(b"par")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(server.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            assert not server.is_serving()
            clients = connect_in_backlog(server, 2)
            await server.server_close()
            assert await replies(clients) == [b"line 0\n", b"line 1\n"]
            await busy.send_all(b"tial\n")
            assert await read_to_eof(busy) == b"partial\n"
    assert server.stats.completed == 3


async def test_close_takes_no_more_of_the_backlog_than_free_slots() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, max_concurrent_requests=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        clients = connect_in_backlog(server, 3)
        nursery.start_soon(server.shutdown)
        await server.server_close()
        served, reset = await replies_or_resets(clients)
    # The accept loop may hold a slot of its own while it waits.
    assert 1 <= served <= 2
    assert served + reset == 3
    assert server.stats.accepted == served


async def replies_or_resets(clients: list[socket.socket]) -> tuple[int, int]:
    """How many clients got their line back, and how many were reset."""
    served = reset = 0
    for client in clients:
        try:
            reply = (await replies([client]))[0]
        except ConnectionResetError:
            reset += 1
        else:
            assert reply.startswith(b"line")
            served += 1
    return served, reset


async def test_close_awaits_no_user_code_and_hands_the_backlog_to_the_nursery() -> None:
    # A verify_request that waits used to run in server_close() itself: it
    # held up closing, and once serving ended the backlog clients were reset.
    class SlowToVerify(trioserve.TCPServer):
        async def verify_request(self, request: object, client_address: object) -> bool:
            await trio.sleep(0.2)
            return True

    server = SlowToVerify(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        clients = connect_in_backlog(server, 3)
        nursery.start_soon(server.shutdown)
        with trio.fail_after(0.1):  # none of verify_request's 0.2 s
            await server.server_close()
        assert await replies(clients) == [b"line 0\n", b"line 1\n", b"line 2\n"]
    assert server.stats.completed == 3


class Read1Parser(trioserve.StreamRequestHandler):
    """A handler that feeds a parser of its own, as one driving h11 would."""

    async def handle(self) -> None:
        pending = b""
        while data := await self.rfile.read1():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await self.wfile.write(line.upper() + b"\n")


async def test_a_handler_reading_with_read1_leaves_within_the_drain_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Read1Parser, shutdown_timeout=60)
    received: list[bytes] = []
    async with serving(server), trio.open_nursery() as clients:
        client = await connect(server)
        assert await roundtrip(client, b"hello\n") == b"HELLO\n"
        clients.start_soon(read_then_close, client, received)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown()
        # Idle in read1, so let go after the drain window, not the 60 s grace.
        assert trio.current_time() - start == pytest.approx(server.drain_window)
    assert received == [b""]
    assert server.stats.completed == 1


class OwnReader(trioserve.StreamRequestHandler):
    """Echoes lines read through a reader of its own, from ``make_reader``."""

    async def handle(self) -> None:
        async for line in self.server.make_reader(self.connection):
            await self.wfile.write(line)


@pytest.mark.parametrize("ends_by", ["shutdown", "idle_timeout"])
async def test_a_reader_from_make_reader_keeps_the_servers_rules(
    autojump_clock: trio.testing.MockClock, ends_by: str
) -> None:
    # A handler's own reader lets an idle connection go as rfile does: at
    # shutdown after the drain window, not the 100 s grace period; and
    # quietly after idle_timeout.
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), OwnReader, shutdown_timeout=100, idle_timeout=30
    )
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        client = await connect(server)
        assert await roundtrip(client, b"hello\n") == b"hello\n"
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        if ends_by == "shutdown":
            nursery.start_soon(read_then_close, client, received)
            await server.shutdown()
            assert trio.current_time() - start == pytest.approx(server.drain_window)
        else:
            await read_then_close(client, received)
            assert trio.current_time() - start == pytest.approx(30)
            await server.shutdown()
    assert received == [b""]
    await server.server_close()
    assert (server.stats.completed, server.stats.timed_out) == (1, 0)
