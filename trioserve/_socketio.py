"""Socket I/O that skips Trio's scheduler while the socket is ready.

Trio's socket operations checkpoint twice each, even when the socket is
ready: for a small read or write, that scheduler round trip is most of the
cost. Here an operation first tries the non-blocking call; only if it would
block does the task wait, with ``wait_readable``/``wait_writable``. A task
that keeps finding its socket ready still checkpoints every
:data:`READY_OPERATIONS_PER_CHECKPOINT` operations, so a peer that floods us
cannot starve the other connections, and cancellation is noticed.

A reader that finds its socket empty looks again before it waits, up to
:data:`LOOKS_BEFORE_WAITING` times: it checkpoints, letting every other
runnable task and the I/O poll have their turn, and receives again. A peer
that answers at once (a client, or a proxy on the same host, that sends the
next request as soon as it has the reply) has usually done so by then, and
the read succeeds without a wait. A wait costs far more than a checkpoint:
Trio registers the socket with epoll (a system call per wait), and if
nothing else is runnable the thread sleeps and must be woken. On a busy
server the first look nearly always finds the next message, since the
other connections' work fills the scheduler round; with one client the
second look catches a client a little slower than one round. See
``benchmarks/README.md`` for what each bought.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import trio

#: Ready operations a task may do in a row before it checkpoints anyway.
READY_OPERATIONS_PER_CHECKPOINT = 32

#: How many times a reader that finds its socket empty checkpoints and
#: receives again before it waits for the socket to become readable.
LOOKS_BEFORE_WAITING = 2


def stdlib_socket_of(sock: trio.socket.SocketType) -> socket.socket | None:
    """The stdlib socket inside a Trio socket, or None if it cannot be had."""
    # Trio's socket wraps the stdlib one as _sock; if a Trio release changes
    # that, we lose only the fast path.
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else None


class Pacer:
    """Counts ready operations; checkpoints after enough of them in a row.

    The checkpoint comes before an operation, never after it: a task
    cancelled there has then not taken the bytes or sent them, which is
    what Trio promises of an operation that raises :exc:`trio.Cancelled`.
    """

    __slots__ = ("_ready",)

    def __init__(self) -> None:
        self._ready = 0

    def due(self) -> bool:
        """Count one ready operation; True when the caller must checkpoint.

        A plain method rather than a coroutine that checkpoints: it runs on
        every message, and only one call in many needs to await anything.
        """
        self._ready += 1
        if self._ready < READY_OPERATIONS_PER_CHECKPOINT:
            return False
        self._ready = 0
        return True


class SocketIO(Pacer):
    """Reads and writes on a connected stream socket, Trio only to wait.

    Errors are the ones :class:`trio.SocketStream` raises:
    :exc:`trio.BrokenResourceError` for a reset or a broken pipe,
    :exc:`trio.ClosedResourceError` for a closed socket.
    """

    __slots__ = ("drained", "sock")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        #: The stdlib socket, for ``trio.lowlevel.wait_readable`` and kin.
        self.sock = sock
        #: Whether the last receive took all the socket had: it returned
        #: fewer bytes than asked for.
        self.drained = False

    @classmethod
    def of_stream(cls, stream: object) -> SocketIO | None:
        """The fast path for ``stream``, if it is a plain SocketStream."""
        if type(stream) is not trio.SocketStream:
            return None
        sock = stdlib_socket_of(stream.socket)
        return None if sock is None else cls(sock)

    def try_receive(self, size: int) -> bytes | None:
        """Up to ``size`` bytes (``b""`` at end of stream); None if none are ready."""
        try:
            data = self.sock.recv(size)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _trio_error(exc) from exc
        self.drained = len(data) < size
        return data

    def try_send(self, data: bytes | memoryview) -> int:
        """Send what the socket takes now; return how many bytes (maybe 0)."""
        try:
            return self.sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _trio_error(exc) from exc

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)


def _trio_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def look_again_or_wait(sock: socket.socket, looks: int) -> int:
    """After a receive found ``sock`` empty: checkpoint, or wait until readable.

    ``looks`` is how many checkpoints were taken since the last receive that
    got something or the last wait: below :data:`LOOKS_BEFORE_WAITING` this
    checkpoints (the caller then looks again), otherwise it waits. Returns
    the count to pass next time.
    """
    if looks < LOOKS_BEFORE_WAITING:
        await trio.lowlevel.checkpoint()
        return looks + 1
    await trio.lowlevel.wait_readable(sock)
    return 0


async def receive_datagram(
    sock: trio.socket.SocketType, size: int, pacer: Pacer
) -> tuple[bytes, Any]:
    """The next datagram on ``sock``: ``(data, sender)``.

    ``data`` holds at most ``size + 1`` bytes: a datagram longer than
    ``size`` comes back longer than ``size``, cut short. That is how
    ``recvfrom`` tells it; ``recvmsg``'s ``MSG_TRUNC`` flag would, but
    ``recvmsg`` costs 0.18 µs more per datagram.
    """
    inner = stdlib_socket_of(sock)
    if inner is None:
        return await sock.recvfrom(size + 1)
    looks = 0
    # Paced before the receive (see Pacer).
    if pacer.due():
        await trio.lowlevel.checkpoint()
    while True:
        try:
            return inner.recvfrom(size + 1)
        except BlockingIOError:
            looks = await look_again_or_wait(inner, looks)


async def send_datagram(
    sock: trio.socket.SocketType, data: bytes, address: Any
) -> None:
    """Send one datagram: at once if the socket takes it, else once it can.

    Up to its first wait it neither checks for cancellation nor enters a
    cancel scope, and that wait is a plain ``wait_writable``, so a caller
    may be marked ``shieldable_from_first_wait``.
    """
    inner = stdlib_socket_of(sock)
    if inner is not None:
        while True:
            try:
                inner.sendto(data, address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(inner)
            else:
                return
    # Not Trio's sendto at once: it checks for cancellation before waiting.
    await trio.lowlevel.wait_writable(sock)
    await sock.sendto(data, address)
