"""Closing a stream connection without resetting it: a lingering close.

A socket closed while bytes from its peer are unread, or still arriving,
makes the kernel answer with a reset (RST). The peer then cannot tell
whether its last request was processed, and the reset can destroy a reply
that was already sent but that the peer had not yet read. That happens all
the time on a keep-alive connection: the server decides to close (its
handler returned, or the server shuts down) while the client's next request
is on its way.

So the server closes as web servers do: it shuts its write side (the peer
sees a clean end-of-stream after everything written), reads and discards
what the peer still sends until the peer's own end-of-stream, and only then
closes; for at most the server's ``drain_window``, the time it allows for
bytes on their way. If the peer has already closed, which is the usual end
of a connection, that costs one receive.
"""

from __future__ import annotations

import socket
from typing import Final

import trio

from ._socketio import stdlib_socket_of

# The most bytes one discarding receive takes.
DISCARD_SIZE: Final = 65536


async def close_without_reset(stream: trio.abc.AsyncResource, linger: float) -> None:
    """Close ``stream``, lingering first if it is a socket connection.

    A :class:`trio.SocketStream` is shut for writing, drained and closed.
    A :class:`trio.SSLStream` over one sends its ``close_notify`` first; the
    connection then lingers the same way. Any other stream is just closed.
    The lingering lasts ``linger`` seconds at most: a peer that takes
    longer to close, or never does, is closed on regardless. Cancellation
    cuts it short too; the stream is closed all the same.

    Up to its first wait it neither looks at cancellation nor enters a
    cancel scope, and that wait is a plain one, so a caller may be marked
    ``shieldable_from_first_wait``: a socket connection whose peer has
    closed already, the usual end, is closed without waiting at all, and
    then costs its caller no shield (see benchmarks/README.md, "Measured
    costs behind the code: deferred shield").
    """
    if isinstance(stream, trio.SocketStream):
        sock = stdlib_socket_of(stream.socket)
        try:
            if sock is not None:
                await _linger(sock, linger)
        finally:
            # What aclose() does, without its checkpoint: that would be a
            # wait that looks at cancellation.
            stream.socket.close()
        return
    # Closing any other stream may look at cancellation at once; a plain
    # wait first lets a caller's deferred shield go on before it does.
    await trio.lowlevel.cancel_shielded_checkpoint()
    transport = getattr(stream, "transport_stream", None)
    if not isinstance(stream, trio.SSLStream) or not isinstance(
        transport, trio.SocketStream
    ):
        await stream.aclose()
        return
    sock = stdlib_socket_of(transport.socket)
    if sock is None:
        await stream.aclose()
        return
    # The TLS layer closes its socket once it has sent close_notify; a
    # duplicate keeps the connection open for the lingering.
    connection = sock.dup()
    connection.setblocking(False)
    try:
        await stream.aclose()
        await _linger(connection, linger)
    finally:
        connection.close()


async def _linger(sock: socket.socket, timeout: float) -> None:
    """Shut ``sock`` for writing and discard its input until the peer's end.

    Returns at once, without waiting, if the peer has closed already; its
    first wait is a plain one (see :func:`close_without_reset`).
    """
    if _discard_ready(sock):
        # The peer has closed (or reset): nothing more can arrive.
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    # Plain, before the timeout's scope: a caller's deferred shield goes on
    # here, outside that scope, as it must.
    await trio.lowlevel.cancel_shielded_checkpoint()
    with trio.move_on_after(timeout):
        while not _discard_ready(sock):
            await trio.lowlevel.wait_readable(sock)


def _discard_ready(sock: socket.socket) -> bool:
    """Discard what ``sock`` holds; True once the peer has closed (or reset).

    Takes at most a few receives, so that a peer that floods cannot keep
    the task from yielding.
    """
    for _ in range(4):
        try:
            if not sock.recv(DISCARD_SIZE):
                return True
        except BlockingIOError:
            return False
        except OSError:
            return True
    return False
