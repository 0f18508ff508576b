"""Tests for the readiness watcher: where a server's readers park their waits.

Each test parks waits on a real connected socket pair, as a server's reader
does, and checks what wakes them: readiness, a deadline, the shutdown's drain
window, a cancellation, or the watcher stopping.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

import trioserve
from trioserve._readiness import CLOSED_SOCKET_SWEEP, ReadinessWatcher
from trioserve._shutdown import ShutdownSignal
from trioserve._streams import ServerReader

pytestmark = pytest.mark.skipif(
    not ReadinessWatcher.supported(), reason="no epoll on this platform"
)

HANG_LIMIT = 5


@asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    near, far = socket.socketpair()
    with near, far:
        near.setblocking(False)
        yield near, far


def started_watcher() -> ReadinessWatcher:
    watcher = ReadinessWatcher(trioserve.ServerStats())
    # A system task: it ends with the test's run if not stopped before.
    watcher.start()
    return watcher


class Waiting:
    """Runs one parked wait in a task of its own and keeps what it gave."""

    def __init__(self) -> None:
        self.result: bool | None = None
        self.done = trio.Event()

    async def run(
        self,
        watcher: ReadinessWatcher,
        sock: socket.socket,
        deadline: float,
        idle: bool,
    ) -> None:
        self.result = await watcher.wait_readable(sock, deadline, idle)
        self.done.set()


async def test_a_parked_wait_wakes_when_its_socket_is_readable() -> None:
    watcher = started_watcher()
    async with socket_pair() as (near, far), trio.open_nursery() as nursery:
        waiting = Waiting()
        nursery.start_soon(waiting.run, watcher, near, math.inf, False)
        await wait_all_tasks_blocked()
        assert not waiting.done.is_set()
        far.send(b"x")
        with trio.fail_after(HANG_LIMIT):
            await waiting.done.wait()
        assert waiting.result is True


async def test_a_parked_wait_ends_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watcher = started_watcher()
    async with socket_pair() as (near, _far):
        start = trio.current_time()
        with trio.fail_after(HANG_LIMIT):
            assert not await watcher.wait_readable(near, start + 3, idle=False)
        assert trio.current_time() == pytest.approx(start + 3)
        # A deadline already passed ends the wait without waiting.
        past = trio.current_time()
        assert not await watcher.wait_readable(near, past - 1, idle=False)
        assert trio.current_time() == past


async def test_a_later_wait_with_an_earlier_deadline_wakes_the_watcher_sooner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watcher = started_watcher()
    async with (
        socket_pair() as (first, _),
        socket_pair() as (second, _),
        trio.open_nursery() as nursery,
    ):
        start = trio.current_time()
        slow, quick = Waiting(), Waiting()
        nursery.start_soon(slow.run, watcher, first, start + 10, False)
        await wait_all_tasks_blocked()
        nursery.start_soon(quick.run, watcher, second, start + 2, False)
        with trio.fail_after(HANG_LIMIT):
            await quick.done.wait()
        assert trio.current_time() == pytest.approx(start + 2)
        assert not slow.done.is_set()
        with trio.fail_after(10):
            await slow.done.wait()
        assert trio.current_time() == pytest.approx(start + 10)
        assert (quick.result, slow.result) == (False, False)


async def test_the_drain_window_ends_idle_waits_and_only_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = trioserve.ServerStats()
    watcher = ReadinessWatcher(stats)
    watcher.start()
    async with (
        socket_pair() as (idle_near, _),
        socket_pair() as (busy_near, busy_far),
        trio.open_nursery() as nursery,
    ):
        idle, busy = Waiting(), Waiting()
        nursery.start_soon(idle.run, watcher, idle_near, math.inf, True)
        nursery.start_soon(busy.run, watcher, busy_near, math.inf, False)
        await wait_all_tasks_blocked()
        # Only an idle wait counts as an idle connection.
        assert stats.idle == 1
        start = trio.current_time()
        watcher.drain(start + 1)
        with trio.fail_after(HANG_LIMIT):
            await idle.done.wait()
        assert idle.result is False
        assert trio.current_time() == pytest.approx(start + 1)
        assert stats.idle == 0
        # An idle wait that begins once the window is over ends at once.
        assert not await watcher.wait_readable(idle_near, math.inf, idle=True)
        # The wait in the middle of a message goes on.
        await trio.sleep(100)
        assert not busy.done.is_set()
        busy_far.send(b"rest of the message")
        with trio.fail_after(HANG_LIMIT):
            await busy.done.wait()
        assert busy.result is True


async def test_a_cancelled_wait_is_no_longer_parked() -> None:
    stats = trioserve.ServerStats()
    watcher = ReadinessWatcher(stats)
    watcher.start()
    async with socket_pair() as (near, far):
        with trio.move_on_after(0.01) as scope:
            await watcher.wait_readable(near, trio.current_time() + 60, idle=True)
        assert scope.cancelled_caught
        assert stats.idle == 0
        # The socket may be waited for again, and the wait works.
        far.send(b"x")
        with trio.fail_after(HANG_LIMIT):
            assert await watcher.wait_readable(near, math.inf, idle=True)


async def test_two_waits_for_one_socket_is_an_error() -> None:
    watcher = started_watcher()
    async with socket_pair() as (near, far), trio.open_nursery() as nursery:
        nursery.start_soon(Waiting().run, watcher, near, math.inf, False)
        await wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await watcher.wait_readable(near, math.inf, idle=False)
        far.send(b"x")


async def test_many_waits_keep_the_deadline_heap_bounded() -> None:
    # Every wait with a deadline leaves an entry behind once it is woken by
    # its socket; the heap is rebuilt before those pile up.
    watcher = started_watcher()
    async with socket_pair() as (near, far), trio.open_nursery() as nursery:
        for _ in range(500):
            waiting = Waiting()
            nursery.start_soon(
                waiting.run, watcher, near, trio.current_time() + 60, True
            )
            await wait_all_tasks_blocked()
            far.send(b"x")
            with trio.fail_after(HANG_LIMIT):
                await waiting.done.wait()
            near.recv(1)
        assert len(watcher._deadlines) <= 64


async def test_a_reader_parked_when_the_watcher_stops_waits_in_a_scope_instead() -> (
    None
):
    # A serving ends with the watcher stopped; a reader that somehow still
    # waits (its handler outlived the serving) must not be left parked.
    signal = ShutdownSignal(0.0, trioserve.ServerStats())
    assert signal.watcher is not None
    signal.watcher.start()
    left, right = trio.socket.socketpair()
    async with (
        trio.SocketStream(left) as near,
        trio.SocketStream(right) as far,
        trio.open_nursery() as nursery,
    ):
        reader = ServerReader(near, signal, first_bytes_idle=True)
        lines: list[bytes] = []
        first_read = trio.Event()

        async def read() -> None:
            lines.append(await reader.readline())
            first_read.set()

        nursery.start_soon(read)
        await wait_all_tasks_blocked()
        signal.watcher.stop()
        await wait_all_tasks_blocked()
        assert not lines
        await far.send_all(b"still read\n")
        with trio.fail_after(HANG_LIMIT):
            await first_read.wait()
        assert lines == [b"still read\n"]
        # The drain window reaches it in its scope too.
        nursery.start_soon(read)
        await wait_all_tasks_blocked()
        signal.start()
        await wait_all_tasks_blocked()
        assert lines == [b"still read\n", b""]


async def test_a_server_gives_its_readers_a_running_watcher() -> None:
    # Serving starts the shutdown signal's watcher, and stops it at the end.
    class Echo(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            async for line in self.rfile:
                await self.wfile.write(line)

    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        watcher = server._shutdown_signal.watcher
        assert watcher is not None
        assert watcher.running
        client = await trio.open_tcp_stream(*server.server_address)
        async with client:
            await client.send_all(b"ping\n")
            with trio.fail_after(HANG_LIMIT):
                assert await client.receive_some(100) == b"ping\n"
            await wait_all_tasks_blocked()
            assert server.stats.idle == 1
            await server.shutdown()
            # The idle connection left at the drain window: a clean end.
            with trio.fail_after(HANG_LIMIT):
                assert await client.receive_some(100) == b""
        assert not watcher.running


async def test_a_reader_whose_connection_another_task_closes_learns_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The kernel drops a closed socket from the epoll without a word: the
    # watcher's sweep finds it, and the reader meets the closed socket.
    signal = ShutdownSignal(0.0, trioserve.ServerStats())
    assert signal.watcher is not None
    signal.watcher.start()
    left, right = trio.socket.socketpair()
    async with trio.SocketStream(right) as _far:
        near = trio.SocketStream(left)
        reader = ServerReader(near, signal, first_bytes_idle=True)
        raised: list[BaseException] = []

        async def read() -> None:
            try:
                await reader.readline()
            except trio.ClosedResourceError as exc:
                raised.append(exc)

        start = trio.current_time()
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await wait_all_tasks_blocked()
                await near.aclose()
        assert len(raised) == 1
        assert trio.current_time() - start <= CLOSED_SOCKET_SWEEP
        assert signal._stats.idle == 0


async def test_a_wait_left_parked_on_a_closed_socket_gives_way_to_its_successor() -> (
    None
):
    # The closed socket's number goes to a new connection before the sweep:
    # the new connection's wait takes its place, and the old wait ends.
    watcher = started_watcher()
    old_near, old_far = socket.socketpair()
    old_near.setblocking(False)
    async with trio.open_nursery() as nursery:
        old = Waiting()
        nursery.start_soon(old.run, watcher, old_near, math.inf, False)
        await wait_all_tasks_blocked()
        number = old_near.fileno()
        old_near.close()
        old_far.close()
        async with socket_pair() as (new_near, new_far):
            if new_near.fileno() != number:
                new_near, new_far = new_far, new_near
            assert new_near.fileno() == number
            new = Waiting()
            nursery.start_soon(new.run, watcher, new_near, math.inf, False)
            with trio.fail_after(HANG_LIMIT):
                await old.done.wait()
            assert old.result is True
            new_far.send(b"x")
            with trio.fail_after(HANG_LIMIT):
                await new.done.wait()
            assert new.result is True
