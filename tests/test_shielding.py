"""Cleanup shielded from cancellation, with the shield deferred to the first wait."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

import trioserve
from trioserve._shielding import await_shielded, shieldable_from_first_wait

# Long enough to pass for "never" under the autojump clock.
FOREVER = 1000.0
# Seconds a test on real sockets may take before it counts as hung.
HANG_LIMIT = 10


class Cleanup:
    """Cleanups that record how far they got."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.released = trio.Event()

    async def at_once(self) -> None:
        self.steps.append("done")

    async def until_released(self) -> None:
        # Event.wait opens no cancel scope (trio.sleep would: it waits inside
        # a move_on_at), so this one may be marked.
        self.steps.append("waiting")
        await self.released.wait()
        self.steps.append("done")

    async def in_a_scope_of_its_own(self) -> None:
        # Waits inside a cancel scope it opened before its first wait: a
        # deferred shield would be nested inside that scope, and Trio refuses
        # to close them in that order. So it must not be marked.
        with trio.move_on_after(FOREVER):
            self.steps.append("waiting")
            await self.released.wait()
        self.steps.append("done")


class Deferred(Cleanup):
    """The same cleanups, marked: their shields are deferred."""

    at_once = shieldable_from_first_wait(Cleanup.at_once)
    until_released = shieldable_from_first_wait(Cleanup.until_released)


@pytest.fixture(params=["deferred", "from-the-start"])
def cleanup(request: pytest.FixtureRequest) -> Cleanup:
    """A marked or an unmarked cleanup: both must behave alike."""
    return Deferred() if request.param == "deferred" else Cleanup()


@asynccontextmanager
async def released_after(cleanup: Cleanup, seconds: float) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:

        async def release() -> None:
            await trio.sleep(seconds)
            cleanup.released.set()

        nursery.start_soon(release)
        yield


async def test_runs_to_the_end_although_cancelled_before_it_starts(
    cleanup: Cleanup, autojump_clock: trio.testing.MockClock
) -> None:
    async with released_after(cleanup, 5):
        with trio.CancelScope() as outer:
            outer.cancel()
            cut_off = await await_shielded(cleanup.until_released, timeout=10)
            # The shield ends with the cleanup: the cancellation is still on.
            with pytest.raises(trio.Cancelled):
                await trio.lowlevel.checkpoint()
    assert not cut_off
    assert cleanup.steps == ["waiting", "done"]
    assert trio.current_time() == pytest.approx(5)


async def test_runs_to_the_end_although_cancelled_while_it_waits(
    cleanup: Cleanup, autojump_clock: trio.testing.MockClock
) -> None:
    async with released_after(cleanup, 5):
        with trio.move_on_after(1) as outer:
            assert not await await_shielded(cleanup.until_released, timeout=10)
            await trio.lowlevel.checkpoint()
    assert outer.cancelled_caught
    assert cleanup.steps == ["waiting", "done"]
    assert trio.current_time() == pytest.approx(5)


async def test_timeout_cuts_it_off(
    cleanup: Cleanup, autojump_clock: trio.testing.MockClock
) -> None:
    async with released_after(cleanup, FOREVER):
        assert await await_shielded(cleanup.until_released, timeout=2)
        assert cleanup.steps == ["waiting"]
        assert trio.current_time() == pytest.approx(2)
        cleanup.released.set()


async def test_without_a_timeout_it_waits_as_long_as_it_takes(
    cleanup: Cleanup, autojump_clock: trio.testing.MockClock
) -> None:
    async with released_after(cleanup, 500):
        assert not await await_shielded(cleanup.until_released, timeout=None)
    assert trio.current_time() == pytest.approx(500)


async def test_a_marked_cleanup_that_does_not_wait_never_yields() -> None:
    cleanup = Deferred()
    with trio.CancelScope() as outer:
        outer.cancel()
        assert not await await_shielded(cleanup.at_once, timeout=1)
    assert cleanup.steps == ["done"]
    # Not even a checkpoint: nothing raised the outer scope's Cancelled.
    assert not outer.cancelled_caught


async def test_an_unmarked_cleanup_may_wait_in_a_scope_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cleanup = Cleanup()
    async with released_after(cleanup, 3):
        with trio.CancelScope() as outer:
            outer.cancel()
            assert not await await_shielded(cleanup.in_a_scope_of_its_own, timeout=10)
    assert cleanup.steps == ["waiting", "done"]


@pytest.mark.parametrize("deferred", [True, False])
async def test_errors_propagate_whether_raised_before_or_after_waiting(
    deferred: bool,
) -> None:
    async def fails_at_once() -> None:
        raise ValueError("before")

    async def fails_after_waiting() -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("after")

    failures = ((fails_at_once, "before"), (fails_after_waiting, "after"))
    for function, message in failures:
        if deferred:
            shieldable_from_first_wait(function)
        with pytest.raises(ValueError, match=message):
            await await_shielded(function, timeout=1)


async def test_a_datagram_reply_that_must_wait_for_room_is_still_sent(
    tmp_path: Path,
) -> None:
    # The real marked finish() on its slow path: the client's queue is full,
    # so the reply waits for room, in a scope cancelled all along. It must
    # neither be cancelled nor trip over the cancellation it saw before its
    # shield went up (as Trio's own sendto would: it checks first).
    raw_server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_sock = trio.socket.from_stdlib_socket(raw_server_sock)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with server_sock, client:
        await server_sock.bind(str(tmp_path / "server"))
        client.bind(str(tmp_path / "client"))
        client.setblocking(False)
        # Connected, so that epoll reports room in the client's queue (Linux
        # tells only a connected sender); the reply names the address anyway.
        await server_sock.connect(str(tmp_path / "client"))
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # until the client's receive queue is full
                raw_server_sock.sendto(b"filler", str(tmp_path / "client"))
                filler += 1
        handler = trioserve.DatagramRequestHandler(
            (b"reply", server_sock),
            str(tmp_path / "client"),
            server=trioserve.UnixDatagramServer(
                str(tmp_path / "unused"), trioserve.DatagramRequestHandler
            ),
        )
        await handler.setup()
        await handler.wfile.write(b"reply")
        async with trio.open_nursery() as nursery:

            async def drain_once_finish_waits() -> None:
                await wait_all_tasks_blocked()
                for _ in range(filler):
                    assert client.recv(100) == b"filler"

            nursery.start_soon(drain_once_finish_waits)
            with trio.CancelScope() as outer:
                outer.cancel()
                # The shield hides fail_after too: the bound is the timeout.
                assert not await await_shielded(handler.finish, timeout=HANG_LIMIT)
        assert client.recv(100) == b"reply"


class BufferedStreamHandler(trioserve.StreamRequestHandler):
    wbufsize = 65536
    wfile: trioserve.AsyncBufferedWriter


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_a_stream_reply_still_buffered_is_flushed_in_a_cancelled_scope(
    timeout: float | None,
) -> None:
    # The real marked finish() of a stream handler with bytes in its buffer,
    # on its slow path: the peer's buffers are full, so the flush waits for
    # room, with a timeout inside a scope of its own. The shield must be up
    # before that scope, and before any look at the cancellation.
    raw_left, raw_right = socket.socketpair()
    left = trio.socket.from_stdlib_socket(raw_left)
    right = trio.socket.from_stdlib_socket(raw_right)
    async with trio.SocketStream(left) as near, trio.SocketStream(right) as far:
        server = trioserve.BaseServer(("127.0.0.1", 0), BufferedStreamHandler)
        handler = BufferedStreamHandler(near, ("127.0.0.1", 1), server)
        handler.timeout = timeout
        await handler.setup()
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # until the socket pair's buffers are full
                filler += raw_left.send(b"f" * 4096)
        await handler.wfile.write(b"reply")
        assert handler.wfile.buffered == 5
        received = bytearray()
        async with trio.open_nursery() as nursery:

            async def drain_once_finish_waits() -> None:
                await wait_all_tasks_blocked()
                while len(received) < filler + 5:
                    received.extend(await far.receive_some(65536))

            nursery.start_soon(drain_once_finish_waits)
            with trio.CancelScope() as outer:
                outer.cancel()
                assert not await await_shielded(handler.finish, timeout=HANG_LIMIT)
        assert received.endswith(b"freply")


async def test_a_stream_handler_with_nothing_buffered_finishes_without_a_wait() -> None:
    # So its shield is never entered: the finish is done in its first step.
    left, right = trio.socket.socketpair()
    async with trio.SocketStream(left) as near, trio.SocketStream(right):
        server = trioserve.BaseServer(("127.0.0.1", 0), trioserve.StreamRequestHandler)
        handler = trioserve.StreamRequestHandler(near, ("127.0.0.1", 1), server)
        await handler.setup()
        await handler.wfile.write(b"sent at once")
        assert isinstance(handler.wfile, trioserve.AsyncBufferedWriter)
        assert handler.wfile.buffered == 0
        finish = handler.finish()
        with pytest.raises(StopIteration):
            finish.send(None)
