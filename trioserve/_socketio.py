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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import trio

#: Ready operations a task may do in a row before it checkpoints anyway.
READY_OPERATIONS_PER_CHECKPOINT = 32

#: How many times a reader that finds its socket empty checkpoints and
#: receives again before it waits for the socket to become readable.
LOOKS_BEFORE_WAITING = 2

_Source = TypeVar("_Source")
_Received = TypeVar("_Received")


def stdlib_socket_of(sock: trio.socket.SocketType) -> socket.socket | None:
    """The stdlib socket inside a Trio socket, or None if it cannot be had.

    None too for a stand-in that is not a Trio socket (as tests wrap one to
    make it fail): its own methods must be called, not the socket's below.
    """
    if not isinstance(sock, trio.socket.SocketType):
        return None
    # Trio's socket wraps the stdlib one as _sock; if a Trio release changes
    # that, we lose only the fast path.
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else None


def socket_under(resource: object) -> trio.socket.SocketType | socket.socket | None:
    """The socket a Trio stream or listener runs over, through any TLS layer.

    A socket (Trio's or the stdlib's) is its own; None where there is none,
    as under an in-memory stream.
    """
    while not isinstance(resource, (trio.socket.SocketType, socket.socket)):
        sock = getattr(resource, "socket", None)
        if isinstance(sock, trio.socket.SocketType):
            return sock
        inner = getattr(resource, "transport_stream", None) or getattr(
            resource, "transport_listener", None
        )
        if inner is None:
            return None
        resource = inner
    return resource


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

    def receive(self, size: int, waits: ReadWaits) -> Coroutine[Any, Any, bytes | None]:
        """The next chunk, to ``await``: :func:`receive_when_ready` on this socket.

        Up to ``size`` bytes, ``b""`` at end of stream; None if the time of
        its wait ran out.
        """
        # After a receive that took all the socket had, the next message is
        # most likely not there yet: a receive at once would only fail with
        # EAGAIN, a system call and a Python exception. So the loop looks
        # only after the others have run.
        pacer = None if self.drained else self
        return receive_when_ready(
            SocketIO.try_receive, self, size, self.sock, pacer, waits
        )

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


class WaitScopes(Protocol):
    """What decides whether, and for how long, a wait may go on: its scope.

    Asked only when a wait is about to begin, so a receive that finds its
    data at once pays for no scope.
    """

    def open_wait_scope(self) -> trio.CancelScope | None:
        """The scope to wait in, or None to wait as long as it takes."""

    def close_wait_scope(self, scope: trio.CancelScope) -> None:
        """Take back a scope from :meth:`open_wait_scope`: its wait is over."""


class ReadWaits(Protocol):
    """How a receive waits for its socket: :func:`receive_when_ready`'s wait."""

    def readable(self, sock: socket.socket) -> Awaitable[bool]:
        """Wait until ``sock`` is readable: True; False if the wait's time ran out.

        A server's reader parks with its ``ReadinessWatcher`` where it can;
        otherwise this is :func:`readable_within` its scopes.
        """


async def readable_within(sock: socket.socket, scopes: WaitScopes) -> bool:
    """Wait until ``sock`` is readable, in the scope ``scopes`` gives.

    True once it is; False if the scope ended the wait.
    """
    scope = scopes.open_wait_scope()
    if scope is None:
        await trio.lowlevel.wait_readable(sock)
        return True
    try:
        with scope:
            await trio.lowlevel.wait_readable(sock)
    finally:
        scopes.close_wait_scope(scope)
    return not scope.cancelled_caught


async def receive_when_ready(
    receive: Callable[[_Source, int], _Received | None],
    source: _Source,
    size: int,
    sock: socket.socket,
    pacer: Pacer | None,
    waits: ReadWaits | None,
) -> _Received | None:
    """``receive(source, size)``, the first time it gets something.

    The one receive-and-wait loop for sockets. ``receive`` is non-blocking:
    it returns None when ``sock`` has nothing ready. The loop receives at
    once, paced by ``pacer`` (see :class:`Pacer`); with ``pacer`` None it
    does not, because the caller has just found ``sock`` empty. Then it
    looks again after a checkpoint, up to :data:`LOOKS_BEFORE_WAITING`
    times, and only then waits for ``sock`` to become readable, as
    ``waits`` says. Returns None if that wait's time ran out (after one
    last look: bytes that arrived as it ended are taken, not left behind);
    without ``waits`` it waits as long as it takes.
    """
    # The caller awaits this coroutine itself, with no helper in between:
    # an idle connection keeps every coroutine on its stack in memory for
    # as long as it is idle (see benchmarks/README.md, "Measured costs
    # behind the code: coroutines on an idle stack").
    if pacer is not None:
        if pacer.due():
            await trio.lowlevel.checkpoint()
        received = receive(source, size)
        if received is not None:
            return received
    # Why: see benchmarks/README.md, "Measured costs behind the code: looks
    # before waiting".
    for _ in range(LOOKS_BEFORE_WAITING):
        await trio.lowlevel.checkpoint()
        received = receive(source, size)
        if received is not None:
            return received
    while True:
        if waits is None:
            await trio.lowlevel.wait_readable(sock)
        elif not await waits.readable(sock):
            return receive(source, size)
        received = receive(source, size)
        if received is not None:
            return received


def _try_peek(sock: socket.socket, size: int) -> bytes | None:
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # An error is an answer too: the reads will meet it.


async def wait_until_spoken(stream: trio.SocketStream, waits: ReadWaits) -> bool:
    """Wait until the peer sends something (or closes); False if ``waits`` ended it.

    Nothing is consumed: the bytes stay in the socket for whoever reads it.
    """
    sock = stdlib_socket_of(stream.socket)
    if sock is None:
        # Without the stdlib socket there is no peek: take the connection
        # as having spoken, and let its reads wait.
        await trio.lowlevel.checkpoint()
        return True
    return await receive_when_ready(_try_peek, sock, 1, sock, None, waits) is not None


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
    # No stdlib socket inside: a stand-in, such as trioserve.testing's,
    # whose sendto neither waits nor looks at cancellation.
    await sock.sendto(data, address)
