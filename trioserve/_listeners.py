"""Listeners: the sockets a server accepts connections or receives datagrams on.

A listener owns one socket from birth to close: making it (IPv6-only for
IPv6, as in Trio and asyncio), the reuse options, binding (removing a Unix
socket file a dead server left behind), listening, taking what waits in it
without waiting (when it closes), and closing it (removing the socket file
it made). It is made by the server (``origin`` "made") or adopted from a
socket that something else bound (``origin`` "adopted": an inherited file
descriptor, a supervisor's socket). :class:`AcceptErrors` is the policy for
what accept and receive raise, as Trio's ``serve_listeners`` has it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket as stdlib_socket
import stat
from collections.abc import Awaitable, Callable
from functools import cache, partial
from typing import Any, Final, Literal, cast

import attrs
import trio

from ._keepalive import TCPKeepalive, set_tcp_keepalive
from ._socketio import Pacer, receive_when_ready, stdlib_socket_of
from ._stats import ServerStats
from ._warning_limiter import WarningLimiter

LOGGER = logging.getLogger("trioserve")

# Errors that accept(2) returns when the process or the system has run out of
# something. Retrying at once would spin; the pressure usually lifts when
# other connections close, so we pause and try again.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)

# How long to pause after one of those errors: this long after the first,
# twice as long after each one that follows it, up to ACCEPT_RETRY_MAX_DELAY.
# The pressure may last (a descriptor leak, a flood): backing off spares the
# CPU, and the cap bounds how long a waiting client still waits once it has
# lifted. A successful accept starts over from the shortest pause.
ACCEPT_RETRY_DELAY: Final = 0.1
ACCEPT_RETRY_MAX_DELAY: Final = 1.0

# Seconds between two log lines about those errors, per server: the first is
# logged at once, the next one says how many were not.
ACCEPT_ERROR_LOG_INTERVAL: Final = 10.0

# Errors that concern one pending connection, not the listening socket: the
# peer went away before we accepted, or (per accept(2) on Linux) a network
# error already pending on the new socket. The next accept may well succeed.
ACCEPT_TRANSIENT_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "ECONNRESET",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EINTR",
    )
    if hasattr(errno, name)
)

# Errors that mean the listening socket itself is closed: serving is over.
ACCEPT_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})

#: Where a listener's socket came from.
Origin = Literal["made", "adopted"]

#: What a listener hands on: ``(request, client_address)``.
Accepted = tuple[Any, Any]


@attrs.frozen
class RequestSource:
    """Where an accept task takes its requests from.

    ``wait`` waits for the next request. ``ready``, where a listener has
    one, takes a request that is already waiting, or returns None, without
    a coroutine; the accept task tries it first, checkpointing when
    ``pacer`` says so, and awaits ``wait`` only when ``ready`` found nothing
    (see benchmarks/README.md, "Measured costs behind the code: ready
    datagrams taken without a coroutine").
    """

    wait: Callable[[], Awaitable[Accepted]]
    ready: Callable[[], Accepted | None] | None = None
    pacer: Pacer | None = None

    async def take(self) -> Accepted:
        """The next request: one already waiting if there is, else the next.

        Unpaced: for a single request, as ``handle_request`` takes it. One
        already waiting is taken before this first yields, so a race of
        listeners cancelled by the first to take a request cannot cancel
        another that found one too.
        """
        accepted = None if self.ready is None else self.ready()
        return await self.wait() if accepted is None else accepted


def family_of(
    address: Any,
    default: stdlib_socket.AddressFamily = stdlib_socket.AF_INET,
) -> stdlib_socket.AddressFamily:
    """AF_UNIX for a path, the family of an IP literal host, else ``default``."""
    if isinstance(address, (str, bytes, os.PathLike)):
        return stdlib_socket.AF_UNIX
    try:
        host = ipaddress.ip_address(address[0])
    except (ValueError, TypeError, IndexError):
        return default
    return stdlib_socket.AF_INET6 if host.version == 6 else stdlib_socket.AF_INET


@cache
def _has_ipv6() -> bool:
    """Whether this host can make IPv6 sockets (a kernel may have IPv6 off)."""
    try:
        stdlib_socket.socket(stdlib_socket.AF_INET6, stdlib_socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def every_interface(address: Any, family: int) -> list[Any]:
    """The addresses to listen on for ``address``.

    Host ``""`` or ``None`` in IPv4 means every interface of both families:
    ``0.0.0.0`` and ``::`` (IPv4 alone on a host without IPv6). Any other
    address stands for itself.
    """
    if not isinstance(address, tuple) or len(address) != 2:
        return [address]
    host, port = address
    if host not in ("", None):
        return [address]
    if family != stdlib_socket.AF_INET:
        return [("", port)]
    if not _has_ipv6():
        return [("0.0.0.0", port)]
    return [("0.0.0.0", port), ("::", port)]


def close_unused(sock: trio.socket.SocketType) -> None:
    """Close a socket no task waits on, also outside ``trio.run`` (where
    Trio's ``close()`` cannot tell the run it is closing)."""
    inner = stdlib_socket_of(sock)
    (sock if inner is None else inner).close()


def new_socket(family: int, socket_type: int) -> trio.socket.SocketType:
    """A socket to bind a listener on."""
    # The stdlib's constructor, not trio.socket.socket: this also runs
    # outside trio.run (bind_and_activate=False, a worker's servers).
    sock = trio.socket.from_stdlib_socket(stdlib_socket.socket(family, socket_type))
    if family == stdlib_socket.AF_INET6:
        # As Trio and asyncio do. A dual-stack "::" listener (Linux's
        # default) takes the IPv4 port too, so a 0.0.0.0 listener on the
        # same port fails with EADDRINUSE. Set before server_bind, so an
        # override of it (or bind_and_activate=False) can turn it off.
        try:
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
        except BaseException:
            close_unused(sock)
            raise
    return sock


def _remove_if_stale(path: str | bytes, socket_type: int) -> None:
    """Unlink the socket file at ``path`` if no process listens on it any more.

    A server that died without closing leaves its socket file behind, and
    binding over it fails. We may remove it only if nobody answers: a
    refused connection proves that. A live server accepts (and is left
    alone, so bind reports ``EADDRINUSE``); anything that is not a socket
    is left alone too.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    with stdlib_socket.socket(stdlib_socket.AF_UNIX, socket_type) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            LOGGER.info("removing stale socket file %r", path)
            os.unlink(path)
        except OSError:
            pass


def _socket_file(sock: trio.socket.SocketType, address: Any) -> str | bytes | None:
    """The path of the file binding ``sock`` to ``address`` makes, if any.

    None for IP, and for Linux's abstract namespace (a leading NUL), which
    has no file to manage.
    """
    if sock.family != stdlib_socket.AF_UNIX:
        return None
    path = os.fspath(address)
    return None if path[:1] in ("\0", b"\0", "", b"") else path


@attrs.define(eq=False)
class Listener:
    """One socket a server takes requests from; see the module."""

    socket: trio.socket.SocketType
    origin: Origin = "made"
    # (path, st_dev, st_ino) of the Unix socket file bind made, so that
    # close removes that file and not one made at the same path since.
    socket_file: tuple[str | bytes, int, int] | None = None

    async def bind(self, address: Any, *, reuse_address: bool, reuse_port: bool) -> Any:
        """Bind to ``address``; return the real address (port 0 resolved).

        ``reuse_address`` and ``reuse_port`` set SO_REUSEADDR and
        SO_REUSEPORT first, on IP sockets. For a Unix socket, a socket file
        left by a server that died is removed first.

        Raises:
          OSError: binding failed; the message names the address.
        """
        sock = self.socket
        ip = sock.family != stdlib_socket.AF_UNIX
        # Unix sockets have no port to share: Linux refuses the options.
        if reuse_address and ip:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        if reuse_port and ip and hasattr(stdlib_socket, "SO_REUSEPORT"):
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
        path = _socket_file(sock, address)
        try:
            if path is not None:
                _remove_if_stale(path, sock.type)
            await sock.bind(address)
        except OSError as exc:
            if exc.errno is None:
                raise
            # Say which address: a service often binds several. OSError()
            # picks the subclass for the errno, so callers can still catch
            # PermissionError and the like.
            message = f"could not bind {address!r}: {exc.strerror}"
            raise OSError(exc.errno, message) from exc
        if path is not None:
            info = os.stat(path)
            self.socket_file = (path, info.st_dev, info.st_ino)
        return sock.getsockname()

    def listen(self, backlog: int) -> None:
        """Put a bound stream socket to listen; a datagram socket needs nothing."""
        if self.socket.type == stdlib_socket.SOCK_STREAM:
            self.socket.listen(backlog)

    def close(self) -> None:
        """Close the socket; remove the socket file :meth:`bind` made."""
        self.socket.close()
        made, self.socket_file = self.socket_file, None
        if made is not None:
            path, device, inode = made
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == (device, inode):
                    os.unlink(path)

    def source(self) -> RequestSource:
        """Where the next request, ``(request, client_address)``, comes from."""
        raise NotImplementedError

    def take_waiting(self) -> Accepted | None:
        """The next request already waiting in the socket, or None; never waits."""
        raise NotImplementedError


@attrs.define(eq=False)
class StreamListener(Listener):
    """A listening stream socket: each request is a :class:`trio.SocketStream`.

    With ``tcp_keepalive``, every connection accepted on a TCP socket gets
    those keepalive times (see ``_keepalive``); a Unix socket has none to
    set.
    """

    #: ``(idle, interval, count)`` for accepted TCP connections, or None to
    #: leave the system's defaults.
    tcp_keepalive: TCPKeepalive | None = attrs.field(default=None, kw_only=True)
    # Paces the accepts that find a connection ready (see _socketio.Pacer).
    pacer: Pacer = attrs.Factory(Pacer)

    def source(self) -> RequestSource:
        inner = stdlib_socket_of(self.socket)
        if inner is None:
            if self._keepalive() is None:
                return RequestSource(self.accept)
            return RequestSource(self._accept_keeping_alive)
        # As a datagram listener's fast path: connections already waiting
        # are taken by a plain call, and the receive-and-wait loop waits for
        # the next once the backlog is empty (see benchmarks/README.md,
        # "Measured costs behind the code: ready connections accepted
        # without a coroutine").
        try_accept = partial(self._try_accept, inner)
        wait = partial(receive_when_ready, try_accept, None, 0, inner, None, None)
        return RequestSource(
            cast(Callable[[], Awaitable[Accepted]], wait),
            ready=try_accept,
            pacer=self.pacer,
        )

    def _try_accept(
        self, inner: stdlib_socket.socket, _source: object = None, _size: int = 0
    ) -> Accepted | None:
        """The next connection waiting, or None; never waits.

        Errors are accept's, as Trio's ``accept`` raises them. Its last
        arguments are the ones ``receive_when_ready`` passes, unused.
        """
        try:
            connection, client_address = inner.accept()
        except BlockingIOError:
            return None
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(connection))
        self._set_options(stream)
        return stream, client_address

    async def accept(self) -> Accepted:
        """Accept the next connection."""
        connection, client_address = await self.socket.accept()
        return trio.SocketStream(connection), client_address

    async def _accept_keeping_alive(self) -> Accepted:
        stream, client_address = await self.accept()
        self._set_options(stream)
        return stream, client_address

    def _keepalive(self) -> TCPKeepalive | None:
        """The keepalive times to set on accepted connections, if any."""
        if self.socket.family not in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
            return None
        return self.tcp_keepalive

    def _set_options(self, stream: trio.SocketStream) -> None:
        keepalive = self._keepalive()
        if keepalive is None:
            return
        try:
            set_tcp_keepalive(stream.socket, keepalive)
        except OSError:
            # As an accept that failed: the caller sees the errno (a peer
            # that already reset is skipped), and nothing is left open.
            stream.socket.close()
            raise

    def take_waiting(self) -> Accepted | None:
        inner = stdlib_socket_of(self.socket)
        if inner is None:
            return None
        # None too for a connection that died waiting.
        with contextlib.suppress(OSError):
            return self._try_accept(inner)
        return None


@attrs.define(eq=False)
class DatagramListener(Listener):
    """A datagram socket: each request is ``((data, socket), sender)``.

    A datagram longer than ``max_packet_size`` is handed to ``oversized``
    (with its sender) instead, and the next one is taken.
    """

    #: The longest datagram handed on, in bytes.
    max_packet_size: int = attrs.field(kw_only=True)
    #: Told the sender of each datagram longer than that, which is dropped.
    oversized: Callable[[Any], None] = attrs.field(kw_only=True)
    # Paces the receives that find a datagram ready (see _socketio.Pacer).
    pacer: Pacer = attrs.Factory(Pacer)

    def source(self) -> RequestSource:
        try_receive = self._try_receive()
        if try_receive is None:
            return RequestSource(self.receive)
        # The fast path: datagrams already waiting are taken by a plain call,
        # and the one receive-and-wait loop, with no coroutine of ours
        # around it, waits for the next once the socket is empty (pacer
        # None: the caller has just found it so). It never gives up, so it
        # never returns None.
        inner = cast(stdlib_socket.socket, stdlib_socket_of(self.socket))
        receive = partial(receive_when_ready, try_receive, None, 0, inner, None, None)
        return RequestSource(
            cast(Callable[[], Awaitable[Accepted]], receive),
            ready=try_receive,
            pacer=self.pacer,
        )

    async def receive(self) -> Accepted:
        """Receive the next datagram, through Trio's socket."""
        while True:
            # One byte more than the bound: a datagram that fills it is too
            # long (how recvfrom tells it; see benchmarks/README.md,
            # "Measured costs behind the code: recvfrom, not recvmsg").
            data, sender = await self.socket.recvfrom(self.max_packet_size + 1)
            if len(data) <= self.max_packet_size:
                return (data, self.socket), sender
            self.oversized(sender)

    def take_waiting(self) -> Accepted | None:
        try_receive = self._try_receive()
        if try_receive is None:
            return None
        with contextlib.suppress(OSError):
            return try_receive()
        return None

    def _try_receive(self) -> Callable[..., Accepted | None] | None:
        """A function that returns the next datagram ready, or None; it never
        waits. None where the stdlib socket cannot be had.

        Its arguments are the ones ``receive_when_ready`` passes, unused:
        what it needs is bound here, once, rather than looked up for every
        datagram.
        """
        sock = self.socket
        inner = stdlib_socket_of(sock)
        if inner is None:
            return None
        size = self.max_packet_size
        receive_size = size + 1  # see receive
        oversized = self.oversized

        def try_receive(_source: object = None, _size: int = 0) -> Accepted | None:
            while True:
                try:
                    data, sender = inner.recvfrom(receive_size)
                except BlockingIOError:
                    return None
                if len(data) <= size:
                    return (data, sock), sender
                oversized(sender)

        return try_receive


@attrs.define(eq=False)
class AcceptErrors:
    """What a server does when accept (or a datagram receive) raises.

    Out-of-resource errors pause accepting (see ``ACCEPT_RETRY_DELAY``),
    counted and logged at a bounded rate; one pending connection's errors
    are skipped; a closed socket ends accepting; anything else is raised.
    """

    stats: ServerStats
    log: WarningLimiter = attrs.Factory(
        lambda: WarningLimiter(LOGGER, ACCEPT_ERROR_LOG_INTERVAL)
    )
    delay: float = ACCEPT_RETRY_DELAY

    async def retry_after(self, exc: OSError | trio.ClosedResourceError) -> bool:
        """Deal with ``exc``: True to try again, False if the socket is closed."""
        if isinstance(exc, trio.ClosedResourceError):
            return False
        if exc.errno in ACCEPT_CLOSED_ERRNOS:
            return False
        if exc.errno in ACCEPT_CAPACITY_ERRNOS:
            self.stats.accept_errors += 1
            delay = self.delay
            self.delay = min(2 * delay, ACCEPT_RETRY_MAX_DELAY)
            self.log.error(
                "accept failed with %s (%s); retrying in %s seconds",
                errno.errorcode[exc.errno],
                os.strerror(exc.errno),
                delay,
            )
            await trio.sleep(delay)
        elif exc.errno in ACCEPT_TRANSIENT_ERRNOS:
            LOGGER.debug("accept failed with %r; skipping", exc)
        else:
            raise exc
        return True
