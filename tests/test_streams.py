"""Tests for the buffered files a handler reads and writes: ``rfile`` and ``wfile``.

Readers and writers sit on a real connected socket pair, so what is checked is
what a handler sees over a connection. Memory streams appear only where exact
chunk boundaries are the point (the property tests), which a kernel socket
does not let us choose.

"Has the peer received it?" is answered by a :class:`Collector` task that
drains the peer socket, plus ``wait_all_tasks_blocked()``: Trio polls for I/O
before it declares every task blocked, so once that returns, every byte that
was sent has reached the collector.
"""

from __future__ import annotations

import array
import collections
import contextlib
import gc
import inspect
import itertools
import socket as stdlib_socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypedDict, TypeVar

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from support.servers import one_way_stream
from trio.testing import wait_all_tasks_blocked

import trioserve
from trioserve import (
    AsyncBufferedReader,
    AsyncBufferedWriter,
    AsyncPacketReader,
    AsyncPacketWriter,
    LineTooLong,
)
from trioserve._shutdown import ShutdownSignal
from trioserve._socketio import SocketIO
from trioserve._streams import ServerReader

# Comfortably more than a Unix socket pair's send and receive buffers
# together, so a writer whose peer never reads is sure to block.
FILL_SOCKET_BUFFERS = 16 * 1024 * 1024

# Bounds every await that would hang if the code under test were wrong. Under
# autojump_clock it is virtual time, and a hang fails at once.
HANG_LIMIT = 5

# Hypothesis runs each example under its own trio.run(): keep it quick. No
# example database: a failure is reported with its example, and the project
# does not keep .hypothesis/ (which Hypothesis still uses for a cache).
PROPERTY_SETTINGS = hypothesis.settings(max_examples=75, deadline=None, database=None)


@asynccontextmanager
async def socket_stream_pair() -> AsyncIterator[
    tuple[trio.SocketStream, trio.SocketStream]
]:
    """Two connected socket streams, both closed on exit."""
    left, right = trio.socket.socketpair()
    async with trio.SocketStream(left) as near, trio.SocketStream(right) as far:
        yield near, far


class Collector:
    """Receives everything the peer is sent, so a test can look without waiting."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self.closed = trio.Event()  # set once the peer's end of stream arrives

    async def run(self) -> None:
        while chunk := await self.stream.receive_some():
            self.data += chunk
        self.closed.set()

    async def drain_every(self, seconds: float) -> None:
        """A slow reader: takes all that has arrived once every ``seconds``."""
        while True:
            await trio.sleep(seconds)
            # All of it, not one default-sized piece: a Unix socket reports
            # writable only once its queue is down to a quarter of the send
            # buffer, so a reader taking 64 KiB at a time would leave the
            # writer with no wake-up for several periods.
            chunk = await self.stream.receive_some(1024 * 1024)
            if not chunk:
                self.closed.set()
                return
            self.data += chunk


class Pending:
    """Runs one read in the background and records its result when it ends."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None

    async def run(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self.result = await read()
        self.done.set()


# --- readline, async for, read, read1 ---------------------------------------


async def test_readline_returns_lines_with_newline_then_empty_at_eof() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"one\ntwo\n")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"one\n"
            assert await reader.readline() == b"two\n"
            assert await reader.readline() == b""
            # End of stream is sticky: asking again does not block.
            assert await reader.readline() == b""


async def test_readline_returns_last_line_without_newline_at_eof() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"first\nno newline")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"first\n"
            assert await reader.readline() == b"no newline"
            assert await reader.readline() == b""


async def test_empty_lines_are_returned_as_a_bare_newline() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"\n\nx\n")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert [line async for line in reader] == [b"\n", b"\n", b"x\n"]


async def test_many_lines_in_one_chunk_are_split_without_more_receives() -> None:
    lines = [b"line %d\n" % i for i in range(2000)]
    payload = b"".join(lines)
    assert len(payload) < 65536  # fits one receive of the default size
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(payload)
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == lines[0]
        # One receive brought every line: the rest is buffered, and the peer
        # sends nothing more, so a reader that went back to the socket would
        # hang here instead of answering.
        assert len(reader._buffer) == len(payload) - len(lines[0])
        with trio.fail_after(HANG_LIMIT):
            for expected in lines[1:]:
                assert await reader.readline() == expected


async def test_line_arriving_one_byte_at_a_time() -> None:
    line = b"trickle\n"
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(near)
        pending = Pending()
        nursery.start_soon(pending.run, reader.readline)
        for i in range(len(line)):
            await wait_all_tasks_blocked()
            # The reader has taken every byte so far and still waits.
            assert not pending.done.is_set()
            assert reader._buffer == line[:i]
            await far.send_all(line[i : i + 1])
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == line


async def test_receive_size_one_still_reads_whole_lines() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, receive_size=1)
        await far.send_all(b"ab\ncd\n")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"ab\n"
            # Each receive asked for one byte, so nothing past the line was
            # taken from the socket.
            assert reader._buffer == b""
            assert await reader.readline() == b"cd\n"
            assert await reader.readline() == b""


async def test_async_for_yields_each_line_and_stops_at_eof() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"a\nbb\nccc")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert [line async for line in reader] == [b"a\n", b"bb\n", b"ccc"]


async def test_read_n_waits_for_exactly_n_bytes() -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(near)
        pending = Pending()
        nursery.start_soon(pending.run, lambda: reader.read(10))
        await far.send_all(b"abcd")
        await wait_all_tasks_blocked()
        assert not pending.done.is_set()  # 4 of 10 bytes: keep waiting
        await far.send_all(b"efghijXYZ")
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == b"abcdefghij"
        # What came beyond the 10 bytes is kept for the next read.
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read(10) == b"XYZ"  # fewer only at EOF
            assert await reader.read(10) == b""


async def test_read_zero_returns_nothing_without_receiving() -> None:
    async with socket_stream_pair() as (near, _far):
        reader = AsyncBufferedReader(near)
        # The peer sends nothing: a read that went to the socket would hang.
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read(0) == b""


@pytest.mark.parametrize("size", [None, -1], ids=["read()", "read(-1)"])
async def test_read_to_eof(size: int | None) -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, receive_size=3)
        await far.send_all(b"head\n")
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"head\n"
        await far.send_all(b"body in ")
        await far.send_all(b"several chunks")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            body = await (reader.read() if size is None else reader.read(size))
            assert body == b"body in several chunks"
            assert await reader.read() == b""


async def test_read1_returns_buffered_bytes_without_receiving() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"line\nrest of chunk")
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"line\n"
        # The peer sends nothing more: read1 must answer from the buffer.
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read1(4) == b"rest"
            assert await reader.read1() == b" of chunk"


async def test_read1_returns_one_chunk_when_nothing_is_buffered() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"abc")
        # Three bytes, then silence: read1 must not wait for more.
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read1() == b"abc"
        await far.send_all(b"defgh")
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read1(2) == b"de"
            assert await reader.read1(100) == b"fgh"
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.read1() == b""
            assert await reader.read1(5) == b""


async def test_methods_mix_on_one_buffer() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near)
        await far.send_all(b"GET /\r\nContent-Length: 5\r\n\r\nhelloextra")
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"GET /\r\n"
            assert await reader.readline() == b"Content-Length: 5\r\n"
            assert await reader.readline() == b"\r\n"
            assert await reader.read(5) == b"hello"
            assert await reader.read1() == b"extra"
            assert await reader.readline() == b""


# --- max_line_length ----------------------------------------------------------


def test_line_too_long_is_a_value_error() -> None:
    assert issubclass(LineTooLong, ValueError)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "newline-later"])
async def test_line_of_exactly_max_line_length_is_accepted(split: bool) -> None:
    line = b"1234567\n"  # 8 bytes counting the newline
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, max_line_length=8)
        if split:
            # The reader holds 7 bytes and no newline: that is not yet too
            # long, so it must wait for the newline rather than raise.
            await far.send_all(line[:-1])
            await wait_all_tasks_blocked()
            await far.send_all(line[-1:])
        else:
            await far.send_all(line)
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == line


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "newline-later"])
async def test_line_one_byte_over_max_line_length_raises(split: bool) -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, max_line_length=8)
        await far.send_all(b"ok\n")
        if split:
            await far.send_all(b"12345678")
            await wait_all_tasks_blocked()
            await far.send_all(b"\n")
        else:
            await far.send_all(b"12345678\n")
        with trio.fail_after(HANG_LIMIT):
            # Lines before the long one are still delivered.
            assert await reader.readline() == b"ok\n"
            with pytest.raises(LineTooLong, match=r"max_line_length \(8 bytes\)"):
                await reader.readline()


async def test_line_too_long_raises_without_waiting_for_a_newline() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, max_line_length=8)
        # One byte more than the limit allows and no newline, then silence:
        # the line is already too long, so the reader must not wait for more.
        await far.send_all(b"123456789")
        with trio.fail_after(HANG_LIMIT), pytest.raises(LineTooLong):
            await reader.readline()


async def test_async_for_raises_line_too_long() -> None:
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, max_line_length=4)
        await far.send_all(b"abc\nabcd\n")
        seen = []

        async def consume() -> None:
            async for line in reader:
                seen.append(line)

        with trio.fail_after(HANG_LIMIT), pytest.raises(LineTooLong):
            await consume()
        assert seen == [b"abc\n"]


async def test_endless_line_keeps_the_buffer_bounded() -> None:
    max_line_length = 100_000
    receive_size = 4096
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(
            near, max_line_length=max_line_length, receive_size=receive_size
        )
        # A peer that would send 16 MiB without a newline; it blocks once the
        # reader stops taking bytes, and is cancelled below.
        nursery.start_soon(far.send_all, b"x" * FILL_SOCKET_BUFFERS)
        with trio.fail_after(HANG_LIMIT), pytest.raises(LineTooLong):
            await reader.readline()
        assert max_line_length <= len(reader._buffer)
        assert len(reader._buffer) <= max_line_length + receive_size
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("source", ["datagram", "stream"])
async def test_last_line_of_exactly_max_line_length_without_newline(
    source: str,
) -> None:
    line = b"12345678"  # 8 bytes, the stream's last line, no newline
    if source == "datagram":
        assert await AsyncPacketReader(line, max_line_length=8).readline() == line
        return
    async with socket_stream_pair() as (near, far):
        reader = AsyncBufferedReader(near, max_line_length=8)
        await far.send_all(line)
        await far.send_eof()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == line


class _Sizes(TypedDict, total=False):
    receive_size: int
    max_line_length: int


@pytest.mark.parametrize(
    "kwargs",
    [{"receive_size": 0}, {"max_line_length": 0}],
    ids=["receive_size", "max_line_length"],
)
async def test_sizes_below_one_are_rejected(kwargs: _Sizes) -> None:
    near, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="must be at least 1"):
        AsyncBufferedReader(near, **kwargs)
    with pytest.raises(ValueError, match="must be at least 1"):
        AsyncPacketReader(b"", max_line_length=0)


# --- AsyncPacketReader (datagrams) --------------------------------------------------


async def test_packet_reader_reads_a_datagram_and_ends_with_it() -> None:
    reader = AsyncPacketReader(b"a\nbb\nrest")
    with trio.fail_after(HANG_LIMIT):
        assert await reader.readline() == b"a\n"
        assert await reader.read(2) == b"bb"
        assert await reader.read1(1) == b"\n"
        assert await reader.read(9) == b"rest"  # fewer: the datagram ended
        assert await reader.readline() == b""
        assert await reader.read(1) == b""
        assert await reader.read1() == b""
        assert await reader.read() == b""


async def test_packet_reader_async_for_and_max_line_length() -> None:
    with trio.fail_after(HANG_LIMIT):
        reader = AsyncPacketReader(b"x\ny\nz")
        assert [line async for line in reader] == [b"x\n", b"y\n", b"z"]
        reader = AsyncPacketReader(b"1234\n12345\n123456", max_line_length=5)
        assert await reader.readline() == b"1234\n"  # exactly the limit
        with pytest.raises(LineTooLong):
            await reader.readline()
        # The last line, without its newline, is held to the limit too.
        assert await AsyncPacketReader(b"12345", max_line_length=5).readline()
        with pytest.raises(LineTooLong):
            await AsyncPacketReader(b"123456", max_line_length=5).readline()


async def test_packet_reader_hands_over_the_whole_datagram_uncopied() -> None:
    packet = b"one datagram\n" * 10
    assert await AsyncPacketReader(packet).read1() is packet
    assert await AsyncPacketReader(packet).read() is packet


async def test_packet_reader_never_yields_to_the_scheduler() -> None:
    # A datagram handler runs in the receive loop; a read that yielded would
    # cost a scheduler round trip per datagram. Inside a cancelled scope any
    # checkpoint would raise Cancelled, so getting through proves there was
    # none.
    with trio.CancelScope() as scope:
        scope.cancel()
        reader = AsyncPacketReader(b"a\nb")
        assert [line async for line in reader] == [b"a\n", b"b"]
        assert await reader.read1() == b""
        assert await reader.read() == b""
        wfile = AsyncPacketWriter()
        await wfile.write(b"reply")
        await wfile.flush()
    assert not scope.cancelled_caught


# --- read timeout -------------------------------------------------------------------


READS: dict[str, Callable[[AsyncBufferedReader], Awaitable[bytes]]] = {
    "readline": lambda reader: reader.readline(),
    "read(n)": lambda reader: reader.read(5),
    "read()": lambda reader: reader.read(),
    "read1": lambda reader: reader.read1(),
}


@pytest.mark.parametrize("method", list(READS))
async def test_read_timeout_raises_after_exactly_timeout_seconds(
    method: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with socket_stream_pair() as (near, _far):
        reader = AsyncBufferedReader(near, timeout=7)
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(TimeoutError):
            await READS[method](reader)
        assert trio.current_time() - start == pytest.approx(7)


async def test_read_timeout_measures_silence_not_total_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(near, timeout=5)

        async def slow_peer() -> None:
            # A byte every 4 s of virtual time: each gap is under the timeout
            # though the whole line takes 12 s.
            for byte in b"ab\n":
                await trio.sleep(4)
                await far.send_all(bytes([byte]))

        nursery.start_soon(slow_peer)
        start = trio.current_time()
        with trio.fail_after(60):
            assert await reader.readline() == b"ab\n"
        assert trio.current_time() - start == pytest.approx(12)
        # Now silence: the timeout counts from the last byte, in full.
        with trio.fail_after(60), pytest.raises(TimeoutError):
            await reader.readline()
        assert trio.current_time() - start == pytest.approx(17)


async def test_no_timeout_waits_past_any_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(near)

        async def late_peer() -> None:
            await trio.sleep(10_000)
            await far.send_all(b"late\n")

        nursery.start_soon(late_peer)
        with trio.fail_after(20_000):
            assert await reader.readline() == b"late\n"


# --- concurrent use -------------------------------------------------------------------


async def test_concurrent_reads_raise_busy_resource_error() -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = AsyncBufferedReader(near)
        pending = Pending()
        nursery.start_soon(pending.run, reader.readline)
        await wait_all_tasks_blocked()
        for read in READS.values():
            with pytest.raises(trio.BusyResourceError):
                await read(reader)
        # The refused calls must not have released the first reader's claim,
        # nor disturbed its read.
        assert reader._reading
        await far.send_all(b"mine\n")
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == b"mine\n"
        assert not reader._reading


async def test_concurrent_writes_raise_busy_resource_error() -> None:
    async with socket_stream_pair() as (near, _far), trio.open_nursery() as nursery:
        writer = AsyncBufferedWriter(near)
        # Nobody reads: this write blocks once the socket buffers are full.
        nursery.start_soon(writer.write, b"x" * FILL_SOCKET_BUFFERS)
        await wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await writer.write(b"second")
        with pytest.raises(trio.BusyResourceError):
            await writer.flush()
        nursery.cancel_scope.cancel()


def test_the_reader_takes_only_its_own_options() -> None:
    # The server's rules (shutdown, whether a connection's first wait is
    # idle) come with BaseServer.make_reader, not through the constructor.
    parameters = inspect.signature(AsyncBufferedReader).parameters
    assert list(parameters) == [
        "stream",
        "receive_size",
        "max_line_length",
        "timeout",
        "idle_timeout",
    ]


async def test_timeouts_set_after_construction_apply_to_the_next_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socket_stream_pair() as (near, _far):
        reader = AsyncBufferedReader(near)
        assert (reader.timeout, reader.idle_timeout) == (None, None)
        reader.timeout = 2.0
        start = trio.current_time()
        with pytest.raises(TimeoutError), trio.fail_after(HANG_LIMIT):
            await reader.readline()
        assert trio.current_time() - start == pytest.approx(2.0)
        reader.timeout, reader.idle_timeout = None, 1.0
        start = trio.current_time()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b""
        assert trio.current_time() - start == pytest.approx(1.0)


# --- shutdown signal -----------------------------------------------------------------


SignalFactory = Callable[..., ShutdownSignal]


@pytest.fixture(params=["watcher", "scope"])
def new_signal(request: pytest.FixtureRequest) -> SignalFactory:
    """Makes a server's shutdown signal, by default with no drain window.

    Each test runs twice: with the signal's readiness watcher running, as
    while a server serves (where the platform has epoll), and without it,
    where waits take a cancel scope each (TLS, other platforms).
    """

    def make(drain_window: float = 0.0) -> ShutdownSignal:
        signal = ShutdownSignal(drain_window, trioserve.ServerStats())
        if request.param == "watcher":
            if signal.watcher is None:
                pytest.skip("no epoll on this platform")
            # Its task is a system task: it ends with the test's run.
            signal.watcher.start()
        return signal

    return make


async def test_idle_reader_returns_eof_when_shutdown_starts(
    new_signal: SignalFactory,
) -> None:
    signal = new_signal()
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = ServerReader(near, signal, first_bytes_idle=True)
        pending = Pending()
        nursery.start_soon(pending.run, reader.readline)
        await wait_all_tasks_blocked()
        assert not pending.done.is_set()
        signal.start()
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == b""
        # The reader has ended for good, even if the peer speaks later. (Its
        # receiving side is shut down, so a Unix peer may not even get to.)
        with contextlib.suppress(trio.BrokenResourceError):
            await far.send_all(b"too late\n")
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b""
        assert not signal._idle_scopes


async def test_idle_async_for_ends_when_shutdown_starts(
    new_signal: SignalFactory,
) -> None:
    signal = new_signal()
    async with socket_stream_pair() as (near, far):
        reader = ServerReader(near, signal, first_bytes_idle=True)
        seen = []

        async def consume() -> None:
            async for line in reader:
                seen.append(line)

        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as consumers:
                consumers.start_soon(consume)
                await far.send_all(b"one\n")
                await wait_all_tasks_blocked()
                assert seen == [b"one\n"]
                signal.start()
                # The loop must end by itself for this nursery to close.
        assert seen == [b"one\n"]


async def test_reader_returns_eof_at_once_if_shutdown_already_started(
    autojump_clock: trio.testing.MockClock, new_signal: SignalFactory
) -> None:
    signal = new_signal()
    signal.start()
    async with socket_stream_pair() as (near, _far):
        reader = ServerReader(near, signal, first_bytes_idle=True)
        start = trio.current_time()
        # Under the autojump clock a reader that waited would let virtual
        # time pass (and hit fail_after); it must not wait at all.
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b""
            assert await reader.read1() == b""
        assert trio.current_time() == start
        assert not signal._idle_scopes


async def test_reader_holding_half_a_line_keeps_waiting_after_shutdown(
    new_signal: SignalFactory,
) -> None:
    signal = new_signal()
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        reader = ServerReader(near, signal, first_bytes_idle=True)
        pending = Pending()
        nursery.start_soon(pending.run, reader.readline)
        await far.send_all(b"hal")
        await wait_all_tasks_blocked()
        assert reader._buffer == b"hal"
        signal.start()
        await wait_all_tasks_blocked()
        # Part of a message is in hand: shutdown must not cut it off.
        assert not pending.done.is_set()
        await far.send_all(b"f\n")
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == b"half\n"
        # With the message complete and nothing buffered, it is idle again.
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b""


@pytest.mark.parametrize("where", ["in the reader's buffer", "in the socket"])
async def test_a_message_already_in_hand_at_shutdown_is_still_read(
    where: str, new_signal: SignalFactory
) -> None:
    # In the socket: the first receive emptied it, so the reader next waits
    # without trying a receive first; at shutdown it must still look.
    signal = new_signal()
    async with socket_stream_pair() as (near, far):
        reader = ServerReader(near, signal, first_bytes_idle=True)
        in_buffer = where == "in the reader's buffer"
        await far.send_all(b"one\ntwo\n" if in_buffer else b"one\n")
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"one\n"
        if not in_buffer:
            assert isinstance(reader._receiver, SocketIO)
            assert reader._receiver.drained
            await far.send_all(b"two\n")
        signal.start()
        with trio.fail_after(HANG_LIMIT):
            assert await reader.readline() == b"two\n"
            assert await reader.readline() == b""


async def test_reads_before_shutdown_leave_no_idle_scopes_behind(
    new_signal: SignalFactory,
) -> None:
    signal = new_signal()
    async with socket_stream_pair() as (near, far):
        reader = ServerReader(near, signal, first_bytes_idle=True)
        for i in range(3):
            await far.send_all(b"%d\n" % i)
            with trio.fail_after(HANG_LIMIT):
                assert await reader.readline() == b"%d\n" % i
        # Each idle wait handed its scope back, so the set stays bounded.
        assert not signal._idle_scopes


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_an_idle_reader_at_shutdown_serves_a_message_within_the_drain_window(
    autojump_clock: trio.testing.MockClock, transport: str, new_signal: SignalFactory
) -> None:
    # A keep-alive client's next request is on its way when shutdown
    # starts: it arrives within the window and is read, not thrown away.
    signal = new_signal(drain_window=1.0)
    async with one_way_stream(transport) as (send, receive):
        reader = ServerReader(receive, signal, first_bytes_idle=True)
        async with trio.open_nursery() as nursery:
            pending = Pending()
            nursery.start_soon(pending.run, reader.readline)
            await wait_all_tasks_blocked()
            start = trio.current_time()
            signal.start()
            await trio.sleep(0.9)
            assert not pending.done.is_set()
            await send.send_all(b"next request\n")
        assert pending.result == b"next request\n"
        # The next idle read ends with the window, which was not extended.
        assert await reader.readline() == b""
        assert trio.current_time() - start == pytest.approx(1.0)
        assert await reader.readline() == b""
        assert signal._stats.idle == 0


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_an_idle_reader_sees_eof_when_the_drain_window_ends(
    autojump_clock: trio.testing.MockClock, transport: str, new_signal: SignalFactory
) -> None:
    signal = new_signal(drain_window=0.25)
    async with one_way_stream(transport) as (_send, receive):
        reader = ServerReader(receive, signal, first_bytes_idle=True, timeout=10)
        async with trio.open_nursery() as nursery:
            pending = Pending()
            nursery.start_soon(pending.run, reader.readline)
            await wait_all_tasks_blocked()
            assert signal._stats.idle == 1
            start = trio.current_time()
            signal.start()
        # End-of-stream, not the TimeoutError of the reader's own timeout.
        assert pending.result == b""
        assert trio.current_time() - start == pytest.approx(0.25)
        assert signal._stats.idle == 0


async def test_a_reader_timeout_inside_the_drain_window_is_still_a_timeout(
    autojump_clock: trio.testing.MockClock, new_signal: SignalFactory
) -> None:
    signal = new_signal(drain_window=5.0)
    async with socket_stream_pair() as (near, _far):
        reader = ServerReader(near, signal, first_bytes_idle=True, timeout=1.0)
        signal.start()
        with pytest.raises(TimeoutError):
            await reader.readline()


# --- AsyncBufferedWriter -------------------------------------------------------------


async def test_writer_is_unbuffered_by_default() -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        writer = AsyncBufferedWriter(near)
        peer = Collector(far)
        nursery.start_soon(peer.run)
        assert await writer.write(b"hello ") == 6
        await wait_all_tasks_blocked()
        assert peer.data == b"hello "  # there without any flush
        assert await writer.write(b"world") == 5
        await wait_all_tasks_blocked()
        assert peer.data == b"hello world"
        await writer.flush()  # nothing buffered: a harmless no-op
        await near.send_eof()


async def test_buffered_writer_sends_on_flush_or_when_full() -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        writer = AsyncBufferedWriter(near, buffer_size=10)
        peer = Collector(far)
        nursery.start_soon(peer.run)
        assert await writer.write(b"abcd") == 4
        assert await writer.write(b"efgh") == 4
        await wait_all_tasks_blocked()
        assert peer.data == b""  # 8 < 10 bytes: still buffered
        await writer.flush()
        await wait_all_tasks_blocked()
        assert peer.data == b"abcdefgh"

        await writer.write(b"123456789")
        await wait_all_tasks_blocked()
        assert peer.data == b"abcdefgh"  # 9 < 10
        await writer.write(b"0")  # reaches buffer_size: sent without a flush
        await wait_all_tasks_blocked()
        assert peer.data == b"abcdefgh1234567890"

        big = b"B" * 25  # larger than the buffer: sent at once, whole
        assert await writer.write(big) == 25
        await wait_all_tasks_blocked()
        assert peer.data == b"abcdefgh1234567890" + big
        await near.send_eof()


@pytest.mark.parametrize("buffer_size", [0, 4])
@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_writer_accepts_bytes_like_objects(
    buffer_size: int, timeout: float | None
) -> None:
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        writer = AsyncBufferedWriter(near, buffer_size=buffer_size, timeout=timeout)
        peer = Collector(far)
        nursery.start_soon(peer.run)
        source = bytearray(b"mutable")
        assert await writer.write(b"bytes,") == 6
        assert await writer.write(source) == 7
        # Changing the caller's buffer afterwards must not change what was
        # written, buffered or not.
        source[:] = b"XXXXXXX"
        assert await writer.write(memoryview(b",view!")[:5]) == 5
        await writer.flush()
        await near.send_eof()
        with trio.fail_after(HANG_LIMIT):
            await peer.closed.wait()
        assert peer.data == b"bytes,mutable,view"


@pytest.mark.parametrize("packet", [False, True], ids=["stream", "packet"])
async def test_write_returns_byte_count_for_wide_memoryview(packet: bool) -> None:
    view = memoryview(array.array("I", [1, 2, 3]))  # 3 items, 12 bytes
    if packet:
        assert await AsyncPacketWriter().write(view) == view.nbytes
        return
    async with socket_stream_pair() as (near, _far):
        assert await AsyncBufferedWriter(near).write(view) == view.nbytes


async def test_writer_timeout_when_peer_does_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socket_stream_pair() as (near, _far):
        writer = AsyncBufferedWriter(near, timeout=3)
        start = trio.current_time()
        # Nobody reads: the socket buffers fill and the send stalls.
        with trio.fail_after(60), pytest.raises(TimeoutError):
            await writer.write(b"x" * FILL_SOCKET_BUFFERS)
        assert trio.current_time() - start == pytest.approx(3)


async def test_writer_timeout_when_flushing_to_a_peer_that_does_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socket_stream_pair() as (near, _far):
        writer = AsyncBufferedWriter(
            near, buffer_size=FILL_SOCKET_BUFFERS + 1, timeout=3
        )
        await writer.write(b"x" * FILL_SOCKET_BUFFERS)  # buffered, not sent
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(TimeoutError):
            await writer.flush()
        assert trio.current_time() - start == pytest.approx(3)


async def test_writer_timeout_measures_stalls_not_total_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    payload = b"y" * (4 * 1024 * 1024)
    async with socket_stream_pair() as (near, far), trio.open_nursery() as nursery:
        writer = AsyncBufferedWriter(near, timeout=5)
        peer = Collector(far)
        # The peer takes everything waiting every 2 s: slow, but never silent
        # for 5 s, so the write must finish however long it takes in all.
        nursery.start_soon(peer.drain_every, 2)
        start = trio.current_time()
        with trio.fail_after(10_000):
            assert await writer.write(payload) == len(payload)
        assert trio.current_time() - start > 5
        await near.send_eof()
        with trio.fail_after(10_000):
            await peer.closed.wait()
        assert peer.data == payload


# --- what an idle connection holds ---------------------------------------------------


def held_by(obj: object) -> list[object]:
    """The objects ``obj`` holds: its slots' values, or its ``__dict__``'s."""
    held: list[object] = []
    for referent in gc.get_referents(obj):
        if isinstance(referent, dict):
            held.extend(referent.values())
        else:
            held.append(referent)
    return held


async def test_readers_and_writers_have_no_instance_dict() -> None:
    # One of each is held for as long as its connection stays open.
    async with socket_stream_pair() as (near, _):
        signal = ShutdownSignal(1.0, trioserve.ServerStats())
        for file in (
            AsyncBufferedReader(near),
            ServerReader(near, signal, first_bytes_idle=True),
            AsyncBufferedWriter(near),
        ):
            assert not hasattr(file, "__dict__"), type(file).__name__


@pytest.mark.parametrize("buffer_size", [0, 1024])
async def test_a_writer_holds_no_buffer_between_messages(buffer_size: int) -> None:
    async with socket_stream_pair() as (near, far):
        writer = AsyncBufferedWriter(near, buffer_size=buffer_size)
        assert not any(isinstance(o, bytearray) for o in held_by(writer))
        await writer.write(b"x" * 10)
        await writer.flush()
        assert not any(isinstance(o, bytearray) for o in held_by(writer))
        # A buffered writer makes its buffer again for the next message.
        await writer.write(b"y" * 10)
        await writer.flush()
        assert await far.receive_some(100) == b"x" * 10 + b"y" * 10


# --- AsyncPacketWriter ----------------------------------------------------------------


async def test_packet_writer_gathers_one_reply() -> None:
    wfile = AsyncPacketWriter()
    assert wfile.getvalue() == b""
    assert await wfile.write(b"abc") == 3
    assert await wfile.write(bytearray(b"de")) == 2
    assert await wfile.write(memoryview(b"fgh")) == 3
    await wfile.flush()  # nothing to send yet: the reply goes out on finish()
    value = wfile.getvalue()
    assert value == b"abcdefgh"
    assert isinstance(value, bytes)
    await wfile.write(b"!")
    # getvalue() is a snapshot, not a view of the growing buffer.
    assert value == b"abcdefgh"
    assert wfile.getvalue() == b"abcdefgh!"


async def test_packet_writer_keeps_bytes_and_copies_what_may_change() -> None:
    # An echo's reply is the datagram's own bytes object: nothing copied.
    datagram = b"echo me\n"
    wfile = AsyncPacketWriter()
    await wfile.write(datagram)
    assert wfile.getvalue() is datagram
    # A buffer changed after it was written does not change the reply.
    buffer = bytearray(b"abc")
    wfile = AsyncPacketWriter()
    await wfile.write(buffer)
    await wfile.write(memoryview(buffer))
    buffer[:] = b"xyz"
    assert wfile.getvalue() == b"abcabc"


# --- properties -----------------------------------------------------------------------

T = TypeVar("T")


@st.composite
def chunked_payloads(draw: st.DrawFn) -> list[bytes]:
    """A payload rich in newlines, cut into non-empty chunks at random places."""
    pieces = draw(
        st.lists(st.one_of(st.just(b"\n"), st.binary(min_size=1, max_size=6)))
    )
    payload = b"".join(pieces)
    cuts = draw(st.sets(st.integers(1, len(payload) - 1))) if len(payload) > 1 else ()
    bounds = [0, *sorted(cuts), len(payload)]
    return [payload[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def expected_lines(payload: bytes) -> list[bytes]:
    """The payload's lines as readline should return them (only \\n ends one)."""
    *complete, last = payload.split(b"\n")
    return [line + b"\n" for line in complete] + ([last] if last else [])


async def feed_chunks(
    chunks: list[bytes],
    receive_size: int,
    consume: Callable[[AsyncBufferedReader], Awaitable[T]],
    max_line_length: int = 65536,
) -> T:
    """Send ``chunks`` one receive at a time; return what ``consume`` returns.

    A memory stream, not a socket: the point is to choose exactly where each
    received chunk ends, which a kernel socket may merge or split. Only one
    direction is needed, hence the one-way half of ``memory_stream_pair``.
    """
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = AsyncBufferedReader(
        receive_stream, receive_size=receive_size, max_line_length=max_line_length
    )
    result: list[T] = []

    async def consumer() -> None:
        result.append(await consume(reader))

    async with receive_stream, trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        for chunk in chunks:
            # Wait until the reader has taken everything sent so far (or has
            # stopped), so this chunk is not merged with the previous one.
            await wait_all_tasks_blocked()
            await send_stream.send_all(chunk)
        await wait_all_tasks_blocked()
        await send_stream.aclose()
    return result[0]


async def readlines(reader: AsyncBufferedReader) -> list[bytes]:
    lines = []
    while line := await reader.readline():
        lines.append(line)
    return lines


@PROPERTY_SETTINGS
@hypothesis.given(chunks=chunked_payloads(), receive_size=st.integers(1, 64))
def test_readline_reassembles_any_chunking(
    chunks: list[bytes], receive_size: int
) -> None:
    payload = b"".join(chunks)
    lines = trio.run(feed_chunks, chunks, receive_size, readlines)
    assert b"".join(lines) == payload
    for line in lines[:-1]:
        assert line.endswith(b"\n")
    for line in lines:
        assert line  # b"" only at the end of the stream
        assert b"\n" not in line[:-1]
    assert lines == expected_lines(payload)


READ_OPS = st.lists(
    st.one_of(
        st.just(("readline", 0)),
        st.tuples(st.just("read"), st.integers(1, 12)),
        st.tuples(st.just("read1"), st.integers(1, 12)),
        st.just(("read1", -1)),
    ),
    min_size=1,
    max_size=8,
)


@PROPERTY_SETTINGS
@hypothesis.given(
    chunks=chunked_payloads(), receive_size=st.integers(1, 16), ops=READ_OPS
)
def test_mixed_reads_return_every_byte_once_in_order(
    chunks: list[bytes], receive_size: int, ops: list[tuple[str, int]]
) -> None:
    payload = b"".join(chunks)

    async def consume(reader: AsyncBufferedReader) -> list[tuple[str, int, bytes]]:
        results = []
        for name, n in itertools.cycle(ops):
            if name == "readline":
                data = await reader.readline()
            elif name == "read":
                data = await reader.read(n)
            else:
                data = await reader.read1(n)
            results.append((name, n, data))
            if not data:  # every n here is nonzero, so b"" means EOF
                break
        return results

    results = trio.run(feed_chunks, chunks, receive_size, consume)
    assert b"".join(data for _, _, data in results) == payload
    received = 0
    for name, n, data in results:
        received += len(data)
        at_eof = received == len(payload)
        if name == "read":
            assert len(data) == n or at_eof  # exactly n unless the stream ended
        elif name == "read1":
            assert n < 0 or len(data) <= n
            assert data or at_eof
        else:
            assert data.endswith(b"\n") or at_eof
            assert b"\n" not in data[:-1]


@PROPERTY_SETTINGS
@hypothesis.given(
    chunks=chunked_payloads(),
    receive_size=st.integers(1, 16),
    max_line_length=st.integers(1, 10),
)
def test_line_too_long_exactly_when_a_line_exceeds_the_limit(
    chunks: list[bytes], receive_size: int, max_line_length: int
) -> None:
    expected = expected_lines(b"".join(chunks))
    too_long = [len(line) > max_line_length for line in expected]
    first_bad = too_long.index(True) if any(too_long) else None

    async def consume(reader: AsyncBufferedReader) -> tuple[list[bytes], bool, int]:
        lines: list[bytes] = []
        try:
            while line := await reader.readline():
                lines.append(line)
        except LineTooLong:
            return lines, True, len(reader._buffer)
        return lines, False, len(reader._buffer)

    lines, raised, buffered = trio.run(
        feed_chunks, chunks, receive_size, consume, max_line_length
    )
    if first_bad is None:
        assert not raised
        assert lines == expected
    else:
        assert raised
        assert lines == expected[:first_bad]
        assert buffered <= max_line_length + receive_size


async def apply_reads(
    reader: AsyncBufferedReader | AsyncPacketReader, ops: list[tuple[str, int]]
) -> list[bytes | str]:
    """Each op's result in turn, ``"LineTooLong"`` ending the list if raised."""
    results: list[bytes | str] = []
    for name, n in ops:
        try:
            if name == "readline":
                results.append(await reader.readline())
            elif name == "read":
                results.append(await reader.read(n))
            else:
                results.append(await reader.read1(n))
        except LineTooLong:
            results.append("LineTooLong")
            break
    return results


@PROPERTY_SETTINGS
@hypothesis.given(
    payload=st.lists(st.one_of(st.just(b"\n"), st.binary(max_size=6))).map(b"".join),
    ops=READ_OPS,
    max_line_length=st.integers(1, 10),
)
def test_packet_reader_reads_as_a_stream_of_that_one_datagram_would(
    payload: bytes, ops: list[tuple[str, int]], max_line_length: int
) -> None:
    # Delivered in one chunk, the payload is all a stream reader has too, so
    # every read (read1 included) must give exactly the same bytes.
    ops = [*ops, ("read", -1), ("readline", 0)]  # then the rest, then the end
    from_stream = trio.run(
        feed_chunks,
        [payload] if payload else [],
        max(len(payload), 1),
        lambda reader: apply_reads(reader, ops),
        max_line_length,
    )
    from_packet = trio.run(
        apply_reads, AsyncPacketReader(payload, max_line_length=max_line_length), ops
    )
    assert from_packet == from_stream


async def test_ready_reads_still_checkpoint_so_a_flood_cannot_starve_others() -> None:
    # A peer that keeps the socket full would let a reader run without ever
    # yielding; the reader must checkpoint every READY_OPERATIONS_PER_CHECKPOINT
    # ready reads, so that other tasks (here a ticker) get their turn.
    from trioserve._socketio import READY_OPERATIONS_PER_CHECKPOINT

    left, right = trio.socket.socketpair()
    async with trio.SocketStream(left) as server_side, trio.SocketStream(right) as peer:
        await peer.send_all(b"x" * 32768)  # fits the socket buffers: all ready
        reader = AsyncBufferedReader(server_side, receive_size=16)
        reads_since_tick = worst = ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal reads_since_tick, worst, ticks
            while not done:
                await trio.lowlevel.checkpoint()
                ticks += 1
                worst = max(worst, reads_since_tick)
                reads_since_tick = 0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for _ in range(1000):
                assert await reader.read1() == b"x" * 16
                reads_since_tick += 1
            done = True
        # Without the checkpoints the ticker would not run until the reader
        # had done all 1000 reads. (Trio runs each batch of tasks in random
        # order, so the ticker may see a few of the reader's stretches at
        # once: the bound is loose, the difference is not.)
        assert worst <= 4 * READY_OPERATIONS_PER_CHECKPOINT
        assert ticks >= 1000 // (4 * READY_OPERATIONS_PER_CHECKPOINT)


async def test_a_drained_reader_looks_again_before_it_waits(
    readable_waits: collections.Counter[int],
) -> None:
    # A client that sends its next line as soon as it has the reply, without
    # checkpointing (like a peer in another process): after the reader
    # empties the socket it checkpoints and receives again, and the client
    # has sent by the second look whichever order Trio runs the batch in. So
    # the reader waits only while the client is silent: before the first
    # line and after the last. Without the looks it would wait for each.
    rounds = 100
    server_sock, client = stdlib_socket.socketpair()
    client.setblocking(False)
    with client:
        server_side = trio.socket.from_stdlib_socket(server_sock)
        async with trio.SocketStream(server_side) as near:
            reader = AsyncBufferedReader(near)
            writer = AsyncBufferedWriter(near)

            async def echo() -> None:
                while line := await reader.readline():
                    await writer.write(line)

            with trio.fail_after(HANG_LIMIT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(echo)
                    await wait_all_tasks_blocked()
                    for n in range(rounds):
                        client.send(b"%d\n" % n)
                        await trio.lowlevel.wait_readable(client)
                        assert client.recv(100) == b"%d\n" % n
                    await wait_all_tasks_blocked()
                    assert readable_waits[near.socket.fileno()] == 2
                    client.shutdown(stdlib_socket.SHUT_WR)


async def test_idle_reader_on_a_stream_that_is_not_a_socket_leaves_at_shutdown(
    new_signal: SignalFactory,
) -> None:
    # Streams other than plain sockets (TLS, memory streams) take the other
    # road: a cancel scope that start() cancels.
    signal = new_signal()
    send, receive = trio.testing.memory_stream_one_way_pair()
    async with trio.open_nursery() as nursery:
        reader = ServerReader(receive, signal, first_bytes_idle=True)
        pending = Pending()
        nursery.start_soon(pending.run, reader.readline)
        await wait_all_tasks_blocked()
        assert signal._idle_scopes
        signal.start()
        with trio.fail_after(HANG_LIMIT):
            await pending.done.wait()
        assert pending.result == b""
        assert not signal._idle_scopes
    await send.aclose()
