"""Async buffered files over a Trio stream or a datagram: ``rfile`` and ``wfile``.

The reader keeps one ``bytearray``. Bytes are appended at the end as they
arrive and consumed from the front; CPython deletes from the front of a
``bytearray`` without moving the rest, so consuming is cheap however many
lines one chunk holds. A line search resumes where the previous one stopped,
so a line that trickles in one byte at a time is scanned once, not once per
byte. Together these keep reading linear in the bytes received.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any, Protocol, TypeVar

import trio

from ._shutdown import ShutdownSignal
from ._socketio import SocketIO, readable_within

#: How many bytes one receive asks the stream for, unless told otherwise.
DEFAULT_RECEIVE_SIZE = 65536

#: The longest line, in bytes and counting its ``\n``, a reader accepts unless
#: told otherwise. Without a bound, a peer that never sends ``\n`` makes the
#: buffer grow until the process runs out of memory.
DEFAULT_MAX_LINE_LENGTH = 65536

# A write under a timeout is sent in pieces of at most this many bytes, each
# with its own deadline: the timeout bounds how long the peer may leave us
# without progress, not how long a large write may take in all.
TIMED_SEND_CHUNK = 65536


class LineTooLong(ValueError):
    """A line exceeded the reader's ``max_line_length``.

    Raised by :meth:`AsyncBufferedReader.readline` (and ``async for``) as soon
    as the buffered bytes prove the line too long, before the rest of it is
    read. The connection's position within its byte stream is then unknown,
    so the reader must not be used again: let the exception end the request.
    """


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    # len() of a memoryview counts items, which are wider than bytes for
    # formats such as "I"; a write reports bytes, as io's do.
    return data.nbytes if type(data) is memoryview else len(data)


# Stands in for a timeout's cancel scope when there is no timeout.
_UNTIMED = contextlib.nullcontext()


def _check_max_line_length(max_line_length: int) -> None:
    if max_line_length < 1:
        raise ValueError("max_line_length must be at least 1")


def _line_too_long(max_line_length: int) -> LineTooLong:
    return LineTooLong(
        f"line longer than max_line_length ({max_line_length} bytes) without a newline"
    )


_Lines = TypeVar("_Lines", bound="_LineIterator")


class _LineIterator:
    """``async for line in reader``: each :meth:`readline` until ``b""``."""

    __slots__ = ()

    async def readline(self) -> bytes:
        raise NotImplementedError

    def __aiter__(self: _Lines) -> _Lines:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class AsyncReader(Protocol):
    """What every handler's ``rfile`` can do, for streams and datagrams alike.

    :class:`AsyncBufferedReader` (a stream handler's ``rfile``) and
    :class:`AsyncPacketReader` (a datagram handler's) both have it. Annotate
    ``rfile`` with it in a mixin whose ``handle()`` serves both, and the
    mixin type-checks with either handler class (see
    :class:`~trioserve.DatagramRequestHandler`). A handler that needs more
    of one class (a stream's ``timeout``, say) declares that class instead:
    ``rfile: trioserve.AsyncBufferedReader``.
    """

    async def readline(self) -> bytes:
        """The next line with its ``\\n``; ``b""`` at the end."""
        ...

    async def read(self, n: int = -1) -> bytes:
        """``n`` bytes, fewer only at the end; ``n < 0``: everything left."""
        ...

    async def read1(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n < 0``: any number) with at most one receive."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for line in rfile``: each line until the end."""
        ...


class AsyncWriter(Protocol):
    """What every handler's ``wfile`` can do, for streams and datagrams alike.

    :class:`AsyncBufferedWriter` and :class:`AsyncPacketWriter` both have
    it; see :class:`AsyncReader`.
    """

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data`` (or buffer it); return its length in bytes."""
        ...

    async def flush(self) -> None:
        """Send whatever is buffered."""
        ...


class _Receiver(Protocol):
    """A receive strategy: how a reader gets the next chunk of its stream."""

    def receive(
        self, size: int, rules: _WaitRules
    ) -> Awaitable[bytes | bytearray | None]:
        """The next chunk, to ``await``: ``b""`` at the end of the stream, None
        if ``rules`` ended the wait."""


class _StreamReceiver:
    """The receive strategy for any stream but a plain socket (TLS, say).

    (A plain :class:`trio.SocketStream` takes :class:`SocketIO`, which
    receives without Trio's scheduler while the socket is ready.)
    """

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream

    async def receive(self, size: int, rules: _WaitRules) -> bytes | bytearray | None:
        # Nothing tells whether the stream has data ready, so every receive
        # runs in its scope.
        scope = rules.open_wait_scope()
        try:
            with scope or _UNTIMED:
                return await self.stream.receive_some(size)
        except trio.BrokenResourceError as exc:
            # Most TLS clients close without sending close_notify. Take that
            # as the end of the stream, as web servers do; a protocol that
            # must detect truncation frames its messages.
            if isinstance(exc.__cause__, ssl.SSLEOFError):
                return b""
            raise
        finally:
            if scope is not None:
                rules.close_wait_scope(scope)
        # A cancelled receive leaves a TLS stream as it was: bytes already
        # in its buffers are still there for the next receive.
        return None


class _WaitRules:
    """When a reader's wait for data ends: the deadlines of its waits.

    They are those of ``timeout``; of ``idle_timeout`` for the message being
    read; and, for a wait between messages, of a server's shutdown signal.
    Only a wait needs them: a read that finds its data at once has kept
    every deadline, so it pays for no scope.
    """

    __slots__ = (
        "buffer",
        "idle_signal",
        "idle_timeout",
        "may_idle",
        "message_deadline",
        "signal",
        "timeout",
    )

    def __init__(
        self, buffer: bytearray, timeout: float | None, idle_timeout: float | None
    ) -> None:
        #: The reader's buffer: a wait with nothing in it is between messages.
        self.buffer = buffer
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        #: When the message being read must be complete, under idle_timeout;
        #: None until its first wait sets it (see ``_start_reading``).
        self.message_deadline: float | None = math.inf
        #: The shutdown signal that ends waits between messages, if any.
        self.signal: ShutdownSignal | None = None
        #: Whether a wait with nothing buffered is idle for ``signal``: from
        #: the first bytes on, or from the start if so asked.
        self.may_idle = True
        # The signal whose scope the current wait runs in, to hand it back.
        self.idle_signal: ShutdownSignal | None = None

    def _idle_signal(self) -> ShutdownSignal | None:
        return self.signal if self.may_idle and not self.buffer else None

    def _deadline(self) -> float:
        """When a wait that begins now must end, the drain window aside."""
        deadline = self.message_deadline
        if deadline is None or self.timeout is not None:
            now = trio.current_time()
            if deadline is None:
                # The message's first wait: its idle_timeout counts from
                # here, a few receives after the read began, not from a
                # clock read on every read.
                assert self.idle_timeout is not None
                deadline = self.message_deadline = now + self.idle_timeout
            if self.timeout is not None:
                deadline = min(deadline, now + self.timeout)
        return deadline

    def readable(self, sock: socket.socket) -> Awaitable[bool]:
        """Wait until ``sock`` is readable: True; False if a deadline ended it.

        A server's reader parks with the shutdown signal's watcher while it
        runs; any other waits in :meth:`open_wait_scope`'s scope.
        """
        signal = self.signal
        watcher = None if signal is None else signal.watcher
        if watcher is None or not watcher.running:
            return readable_within(sock, self)
        idle = self.may_idle and not self.buffer
        return watcher.wait_readable(sock, self._deadline(), idle)

    def open_wait_scope(self) -> trio.CancelScope | None:
        """The scope a wait for data runs in: None if nothing can end it."""
        self.idle_signal = signal = self._idle_signal()
        scope = None if signal is None else signal.open_wait_scope()
        deadline = self._deadline()
        if deadline != math.inf:
            if scope is None:
                scope = trio.CancelScope()
            scope.deadline = min(scope.deadline, deadline)
        return scope

    def close_wait_scope(self, scope: trio.CancelScope) -> None:
        """Hand a scope back to the shutdown signal, if it gave it."""
        signal = self.idle_signal
        if signal is not None:
            self.idle_signal = None
            signal.close_wait_scope(scope)

    def ended(self) -> bytes:
        """What a wait that its scope ended gives: end-of-stream or a timeout.

        End-of-stream if shutdown's drain window is over (an idle connection
        with nothing on its way is let go), or if ``idle_timeout`` passed
        with no byte of a new message; :exc:`TimeoutError` if it passed with
        part of one, or if ``timeout`` passed.
        """
        now = trio.current_time()
        signal = self._idle_signal()
        if signal is not None and now >= signal.drain_deadline:
            return b""
        if self.message_deadline is not None and now >= self.message_deadline:
            if not self.buffer:
                return b""
            raise TimeoutError(
                f"message not complete within idle_timeout ({self.idle_timeout} s)"
            )
        raise TimeoutError(f"no data received for {self.timeout} seconds")


async def _end_of_stream() -> bytes:
    await trio.lowlevel.checkpoint()
    return b""


class AsyncBufferedReader(_LineIterator):
    """A buffered reader over a :class:`trio.abc.ReceiveStream`: a handler's ``rfile``.

    A stream handler's ``rfile`` comes from the server's
    :meth:`~trioserve.BaseServer.make_reader`, which also lets an idle
    connection go when the server shuts down.

    Args:
      stream: The stream to read.
      receive_size: The most bytes one receive asks the stream for.
      max_line_length: The longest line :meth:`readline` returns, in bytes,
        counting its ``\\n``.
      timeout: Seconds one receive may go without data before
        :exc:`TimeoutError` is raised; ``None`` waits forever.
      idle_timeout: Seconds a read that starts between messages (nothing
        buffered) may take to deliver its message. If nothing arrived it
        returns end-of-stream; if part of a message arrived it raises
        :exc:`TimeoutError`. ``None`` waits forever.

    Errors:
      :exc:`LineTooLong` from :meth:`readline`; :exc:`TimeoutError` when
      ``timeout`` passes without data; whatever the stream raises
      (:exc:`trio.BrokenResourceError` when the peer resets the connection);
      :exc:`trio.BusyResourceError` when two tasks read at once.
    """

    # Slotted: one is held for as long as its connection stays open. Why:
    # see benchmarks/README.md, "Measured costs behind the code: what an
    # idle connection holds".
    __slots__ = (
        "_buffer",
        "_eof",
        "_reading",
        "_receiver",
        "_rules",
        "_scanned",
        "_stream",
        "max_line_length",
        "receive_size",
    )

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        *,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        if receive_size < 1:
            raise ValueError("receive_size must be at least 1")
        _check_max_line_length(max_line_length)
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False
        # Bytes at the front of the buffer already searched for b"\n".
        self._scanned = 0
        # Whether a task is reading: see _start_reading.
        self._reading = False
        self.receive_size = receive_size
        self.max_line_length = max_line_length
        self._rules = _WaitRules(self._buffer, timeout, idle_timeout)
        # The receive strategy, picked once: a plain socket is read without
        # Trio's scheduler while it has data; any other stream through
        # receive_some.
        self._receiver: _Receiver = SocketIO.of_stream(stream) or _StreamReceiver(
            stream
        )

    @property
    def timeout(self) -> float | None:
        """Seconds one receive may go without data; ``None`` waits forever."""
        return self._rules.timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._rules.timeout = seconds

    @property
    def idle_timeout(self) -> float | None:
        """Seconds a read that starts between messages may take; ``None``: no limit."""
        return self._rules.idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float | None) -> None:
        self._rules.idle_timeout = seconds

    async def _receive(self) -> bool:
        """Append one chunk from the stream to the buffer; False at end of stream."""
        data = self._received(await self._receive_chunk())
        self._buffer += data
        return bool(data)

    def _receive_chunk(self) -> Awaitable[bytes | bytearray | None]:
        """The stream's next chunk, to ``await`` and pass to :meth:`_received`.

        Not a coroutine itself but the strategy's: a coroutine fewer on an
        idle connection's stack (see ``receive_when_ready``).
        """
        if self._eof:
            return _end_of_stream()
        return self._receiver.receive(self.receive_size, self._rules)

    def _received(self, data: bytes | bytearray | None) -> bytes | bytearray:
        """What :meth:`_receive_chunk` gave, with a wait its scope ended settled."""
        if data is None:
            data = self._rules.ended()
        self._eof = not data
        self._rules.may_idle = True
        return data

    def _take(self, size: int) -> bytes:
        if size >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        self._scanned = 0
        return data

    def _start_reading(self) -> None:
        # Two tasks interleaving reads would corrupt the buffer between
        # awaits: that is a loud error instead, as in Trio's streams. A flag
        # rather than a context manager, whose bound __exit__ a read would
        # keep for as long as its connection stays idle.
        if self._reading:
            raise trio.BusyResourceError(
                "another task is already reading from this file"
            )
        self._reading = True
        # A read that starts between messages (nothing buffered) must have
        # its message within idle_timeout; the waits keep that deadline.
        rules = self._rules
        if rules.idle_timeout is not None and not self._buffer:
            rules.message_deadline = None
        else:
            rules.message_deadline = math.inf

    async def readline(self) -> bytes:
        """Return the next line with its ``\\n``; ``b""`` at end of stream.

        The last line of a stream may lack its ``\\n``.

        Raises:
          LineTooLong: the line is longer than ``max_line_length``.
        """
        return await self._next_line()

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        # Not a coroutine itself but the one that reads: `async for` then
        # waits with one coroutine fewer on an idle connection's stack.
        return self._next_line(stop_at_end=True)

    async def _next_line(self, stop_at_end: bool = False) -> bytes:
        """:meth:`readline`; at end of stream, StopAsyncIteration if asked."""
        self._start_reading()
        try:
            # The line loop is here, not in a helper, and receives without
            # _receive: a coroutine fewer on an idle connection's stack (see
            # receive_when_ready).
            while True:
                end = self._buffer.find(b"\n", self._scanned) + 1
                if end:
                    if end > self.max_line_length:
                        raise _line_too_long(self.max_line_length)
                    return self._take(end)
                self._scanned = len(self._buffer)
                if self._scanned > self.max_line_length:
                    raise _line_too_long(self.max_line_length)
                data = self._received(await self._receive_chunk())
                if not data:
                    break
                self._buffer += data
        finally:
            self._reading = False
        if stop_at_end and not self._buffer:
            raise StopAsyncIteration
        return self._take(len(self._buffer))

    async def read(self, n: int = -1) -> bytes:
        """Return ``n`` bytes, fewer only at end of stream; ``n < 0`` reads to the end.

        Reading to the end keeps everything in memory: prefer :meth:`read1`
        or :meth:`readline` for input whose size the peer chooses.
        """
        self._start_reading()
        try:
            return await self._read(n)
        finally:
            self._reading = False

    async def _read(self, n: int) -> bytes:
        if n < 0:
            while await self._receive():
                pass
            return self._take(len(self._buffer))
        while len(self._buffer) < n and await self._receive():
            pass
        return self._take(n)

    async def read1(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (``n < 0``: any number) with at most one receive.

        Returns what is buffered if anything is, else the next chunk the
        stream delivers; ``b""`` only at end of stream. This is the call for
        relaying bytes as they come, whatever their framing.
        """
        self._start_reading()
        try:
            if self._buffer:
                return self._take(len(self._buffer) if n < 0 else n)
            return self._up_to(n, self._received(await self._receive_chunk()))
        finally:
            self._reading = False

    def _up_to(self, n: int, chunk: bytes | bytearray) -> bytes:
        # Nothing buffered: hand the chunk over as it came, without copying
        # it through the buffer, unless it holds more than was asked for.
        if 0 <= n < len(chunk):
            self._buffer += chunk
            return self._take(n)
        return chunk if type(chunk) is bytes else bytes(chunk)


class ServerReader(AsyncBufferedReader):
    """The reader :meth:`BaseServer.make_reader` makes: it follows a shutdown too.

    A wait for the first byte of a new message (nothing buffered) waits at
    most ``signal``'s drain window once the shutdown starts, then returns
    end-of-stream: that is how idle connections leave promptly, and how a
    message already on its way is still read. A read with bytes of a
    message in hand keeps waiting for the rest. ``first_bytes_idle`` says
    whether the wait for the stream's very first bytes is idle too (it
    always is for ``idle_timeout``): not for a connection a proxy opened on
    a client's behalf, whose first bytes are on their way.
    """

    __slots__ = ()

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        signal: ShutdownSignal,
        *,
        first_bytes_idle: bool,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(
            stream,
            receive_size=receive_size,
            max_line_length=max_line_length,
            timeout=timeout,
            idle_timeout=idle_timeout,
        )
        self._rules.signal = signal
        self._rules.may_idle = first_bytes_idle


class AsyncBufferedWriter:
    """A writer over a :class:`trio.abc.SendStream`: a stream handler's ``wfile``.

    Args:
      stream: The stream to write to.
      buffer_size: ``0`` (the default) sends every :meth:`write` at once;
        otherwise writes gather in a buffer that is sent when it reaches
        this many bytes, on :meth:`flush`, and when the handler finishes.
      timeout: Seconds a send may go without progress before
        :exc:`TimeoutError` is raised; ``None`` waits forever. After a
        timeout the stream is broken and must be closed.

    Errors:
      :exc:`TimeoutError` as above; whatever the stream raises
      (:exc:`trio.BrokenResourceError` when the peer has gone);
      :exc:`trio.BusyResourceError` when two tasks write at once.
    """

    # As the reader's.
    __slots__ = ("_buffer", "_io", "_stream", "_writing", "buffer_size", "timeout")

    def __init__(
        self,
        stream: trio.abc.SendStream,
        *,
        buffer_size: int = 0,
        timeout: float | None = None,
    ) -> None:
        self._stream = stream
        # Made by the first write it holds: an unbuffered writer (the
        # default) never needs one.
        self._buffer: bytearray | None = None
        # Whether a task is writing: see _start_writing.
        self._writing = False
        self.buffer_size = buffer_size
        self.timeout = timeout
        self._io = SocketIO.of_stream(stream)

    @property
    def buffered(self) -> int:
        """How many bytes :meth:`write` holds in the buffer, not yet sent."""
        return 0 if self._buffer is None else len(self._buffer)

    def _start_writing(self) -> None:
        # As _start_reading, for writes.
        if self._writing:
            raise trio.BusyResourceError("another task is already writing to this file")
        self._writing = True

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data`` (or buffer it, see ``buffer_size``); return its length."""
        self._start_writing()
        try:
            if self.buffer_size <= 0:
                await self._send(data)
            else:
                if self._buffer is None:
                    self._buffer = bytearray()
                self._buffer += data
                if len(self._buffer) >= self.buffer_size:
                    await self._send_buffer()
            return _nbytes(data)
        finally:
            self._writing = False

    async def flush(self) -> None:
        """Send whatever :meth:`write` has buffered."""
        self._start_writing()
        try:
            await self._send_buffer()
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        """Flush, then shut the write side: the peer reads to end-of-stream.

        A half-close: the handler keeps reading what the peer sends after
        it, as a peer that reads until end-of-stream before it answers
        needs. A write after it raises :exc:`trio.ClosedResourceError`
        (``buffer_size`` becomes 0, so that none waits in the buffer).
        Calling it again does nothing.

        Raises:
          io.UnsupportedOperation: the stream cannot half-close, as on TLS:
            Trio's :class:`trio.SSLStream` has no ``send_eof``. Nothing is
            flushed or closed then.
        """
        stream = self._stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            if isinstance(stream, _WriteSideClosed):
                await trio.lowlevel.checkpoint()
                return
            name = type(stream).__name__
            kind = "TLS" if isinstance(stream, trio.SSLStream) else name
            raise io.UnsupportedOperation(
                f"send_eof() cannot half-close a {kind} connection: Trio's "
                f"{name} cannot end its sending side and go "
                f"on receiving"
            )
        self._start_writing()
        try:
            await self._send_buffer()
            await stream.send_eof()
            # Writes from now on meet this instead of the socket, at once:
            # none is held back in the buffer.
            self._stream = _WriteSideClosed()
            self._io = None
            self.buffer_size = 0
        finally:
            self._writing = False

    async def _send_buffer(self) -> None:
        buffer = self._buffer
        if buffer:
            # Dropped, not cleared: a writer that waits between messages
            # holds no buffer.
            data = bytes(buffer)
            self._buffer = None
            await self._send(data)

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        io = self._io
        if io is not None:
            # Sockets take bytes as they are; other buffers as bytes too.
            # Paced before the send (see Pacer).
            if io.due():
                await trio.lowlevel.checkpoint()
            view = data if type(data) is bytes else memoryview(data).cast("B")
            sent = io.try_send(view)
            while sent < len(view):
                await self._wait_writable(io)
                sent += io.try_send(memoryview(view)[sent:])
            return
        if self.timeout is None:
            await self._stream.send_all(data)
            return
        with memoryview(data) as view:
            for start in range(0, max(len(view), 1), TIMED_SEND_CHUNK):
                with trio.move_on_after(self.timeout) as scope:
                    await self._stream.send_all(view[start : start + TIMED_SEND_CHUNK])
                if scope.cancelled_caught:
                    raise TimeoutError(f"peer took no data for {self.timeout} seconds")

    async def _wait_writable(self, io: SocketIO) -> None:
        if self.timeout is None:
            await io.wait_writable()
            return
        with trio.move_on_after(self.timeout):
            await io.wait_writable()
            return
        raise TimeoutError(f"peer took no data for {self.timeout} seconds")


class _WriteSideClosed(trio.abc.SendStream):
    """What a writer writes to after :meth:`AsyncBufferedWriter.send_eof`."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.ClosedResourceError("the write side was shut by send_eof()")

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.ClosedResourceError("the write side was shut by send_eof()")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class AsyncPacketReader(_LineIterator):
    """A datagram handler's ``rfile``: reads the bytes of one datagram.

    It has the reading interface of :class:`AsyncBufferedReader`
    (:meth:`readline`, :meth:`read`, :meth:`read1`, ``async for``), so one
    ``handle()`` body serves streams and datagrams alike; the datagram is its
    whole stream, so it ends where the datagram ends. Everything is in hand,
    so no read waits: like :class:`AsyncPacketWriter`, it never yields to
    Trio's scheduler, which keeps a datagram's handler as cheap as a plain
    function call.

    Args:
      data: The datagram's bytes.
      max_line_length: The longest line :meth:`readline` returns, in bytes,
        counting its ``\\n``.

    Errors:
      :exc:`LineTooLong` from :meth:`readline`.
    """

    __slots__ = ("_data", "_position", "max_line_length")

    def __init__(
        self, data: bytes, *, max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    ) -> None:
        _check_max_line_length(max_line_length)
        self._data = data
        self._position = 0
        self.max_line_length = max_line_length

    def _take(self, end: int) -> bytes:
        """Read on to ``end``, or to the datagram's end if that comes first."""
        data = self._data
        start = self._position
        self._position = end = min(end, len(data))
        # The whole datagram: the bytes object itself, not a copy.
        return data if start == 0 and end == len(data) else data[start:end]

    def _next_line(self) -> bytes:
        start = self._position
        end = self._data.find(b"\n", start) + 1 or len(self._data)
        if end - start > self.max_line_length:
            raise _line_too_long(self.max_line_length)
        return self._take(end)

    async def readline(self) -> bytes:
        """Return the next line with its ``\\n``; ``b""`` at the datagram's end.

        The last line may lack its ``\\n``.

        Raises:
          LineTooLong: the line is longer than ``max_line_length``.
        """
        return self._next_line()

    async def __anext__(self) -> bytes:
        # Not through readline(): a coroutine fewer per line, and the loop
        # over a datagram's lines is the obvious handler's whole work (see
        # benchmarks/README.md, "Measured costs behind the code: datagram
        # handler lifecycle").
        line = self._next_line()
        if not line:
            raise StopAsyncIteration
        return line

    async def read(self, n: int = -1) -> bytes:
        """Return ``n`` bytes, fewer only at the datagram's end; ``n < 0``: the rest."""
        # _take inlined: an echo reads twice per datagram. Why: see
        # benchmarks/README.md, "Measured costs behind the code: inlined
        # datagram read".
        data = self._data
        start = self._position
        self._position = end = len(data) if n < 0 else min(start + n, len(data))
        return data if start == 0 and end == len(data) else data[start:end]

    #: The same as :meth:`read`: the whole datagram is one receive.
    read1 = read


class AsyncPacketWriter:
    """A datagram handler's ``wfile``: gathers what is written into one reply.

    It has the writing interface of :class:`AsyncBufferedWriter`, so one
    ``handle()`` body serves streams and datagrams alike; the handler's
    ``finish()`` sends :meth:`getvalue` as one datagram if it is not empty.
    """

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` to the reply, without waiting; return its length."""
        if type(data) is bytes:
            # Immutable, so kept as it is: an echo's reply is then the
            # datagram's own bytes object, never copied.
            self._chunks.append(data)
            return len(data)
        self._chunks.append(bytes(data))
        return _nbytes(data)

    async def flush(self) -> None:
        """Do nothing: the reply is sent as one datagram when the handler finishes."""

    def getvalue(self) -> bytes:
        """Everything written so far."""
        return b"".join(self._chunks)
