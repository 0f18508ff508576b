"""The socket servers: TCP, UDP, Unix stream and Unix datagram."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket as stdlib_socket
import ssl
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, cast

import trio

from ._handlers import BaseRequestHandler
from ._keepalive import check_tcp_keepalive
from ._lingering import close_without_reset
from ._listeners import (
    DatagramListener,
    Listener,
    Origin,
    RequestSource,
    StreamListener,
    close_unused,
    every_interface,
    family_of,
    new_socket,
)
from ._plan import forwarding, skippable
from ._proxy import (
    ProxyMode,
    ProxyProtocolError,
    ended_early,
    parse_proxy_header,
    receive_proxy_header,
)
from ._server import DEFAULT, BaseServer, _Default
from ._shielding import shieldable_from_first_wait
from ._socketio import wait_until_spoken
from ._warning_limiter import WarningLimiter

LOGGER = logging.getLogger("trioserve")

# Linux caps the listen backlog at net.core.somaxconn (4096 by default), so
# asking for more costs nothing and lets a bursty server keep its backlog as
# deep as the administrator allows; socketserver's 5 drops connections under
# any real load.
DEFAULT_REQUEST_QUEUE_SIZE = 65535

#: Seconds between two warnings about dropped requests, per server: datagrams
#: and connections refused for their PROXY header (or lack of one).
DROP_WARNING_INTERVAL = 10.0


_SocketServerT = TypeVar("_SocketServerT", bound="TCPServer")

#: ``proxy_protocol``'s values: "off", or the versions accepted.
ProxyProtocolMode = Literal["off", "v1", "v2", "auto"]

#: :attr:`TCPServer.binding`'s values.
Binding = Literal["lazy", "manual", "bound", "adopted", "closed"]


class TCPServer(BaseServer):
    """A stream server: ``socketserver.TCPServer`` on Trio.

    Each request is a :class:`trio.SocketStream`, with ``TCP_NODELAY`` set
    (socketserver leaves Nagle's algorithm on, which delays small replies),
    or with ``ssl_context`` a :class:`trio.SSLStream` over one. The TLS
    handshake then happens in the request's own task, before the handler
    runs, under :attr:`handshake_timeout`, so a slow client never holds up
    accepting. A client that closes without TLS's close_notify is taken as
    ending the stream, as web servers do: a protocol that must detect
    truncation frames its messages.

    A connection being prepared (its PROXY header read, its TLS handshake
    done) does not count against ``max_concurrent_requests``: it takes a
    request slot only once prepared, so clients that connect and say
    nothing hold up no one but themselves. Connections being prepared, and
    prepared ones waiting for a request slot, are bounded by
    :attr:`max_concurrent_handshakes` instead: with that many, the server
    stops accepting until one of them is done.

    Construction does no I/O. With ``bind_and_activate=True`` the socket is
    made, bound and put to listen once, on ``async with server`` or at the
    start of :meth:`serve_forever` or :meth:`handle_request`, whichever comes
    first; a bind failure raises its :exc:`OSError` there and leaves no
    socket open. With ``bind_and_activate=False`` the socket is made at once,
    so you can set options on :attr:`socket`, then await :meth:`server_bind`
    and :meth:`server_activate` yourself.

    IPv6 listeners are IPv6-only (``IPV6_V6ONLY``), as in Trio and asyncio,
    so an IPv4 and an IPv6 listener can share a port. Host ``""`` (or
    ``None``) means every interface of both families: the server listens on
    ``0.0.0.0`` and on ``::``, on the same port. :attr:`server_address` is
    then ``("0.0.0.0", port)`` and ``("::", port)`` comes first in
    :attr:`extra_addresses`, from construction on, so
    :attr:`server_addresses` lists both; with port 0 the IPv6 listener
    binds the port the IPv4 one got. (Only ``0.0.0.0`` on a host without
    IPv6; a subclass whose :attr:`address_family` is ``AF_INET6`` gets
    ``::`` alone. Host ``"0.0.0.0"`` or ``"::"`` chooses one family.)

    Args:
      server_address: ``(host, port)``; port 0 picks a free port, and
        :attr:`server_address` holds the real address once bound.
      RequestHandlerClass: The handler class, usually a
        :class:`StreamRequestHandler` subclass.
      bind_and_activate: Whether the server binds and listens by itself.
      extra_addresses: More addresses to listen on, each an IP
        ``(host, port)`` or a Unix socket path, whatever the class's family:
        all listeners share one handler nursery, one concurrency bound, one
        shutdown and one :attr:`~BaseServer.stats`. See
        :attr:`server_addresses`. Host ``""`` means both families here too.
      ssl_context: Serve TLS with this server-side context.
      handshake_timeout, max_concurrent_handshakes, proxy_protocol,
      trusted_proxies, tcp_keepalive: Override the class attributes of
        those names.
      max_concurrent_requests, max_connections_per_peer, request_timeout,
      idle_timeout, shutdown_timeout, drain_window: As on :class:`BaseServer`.
    """

    #: The socket family: ``AF_INET``, as in socketserver. A server's own
    #: ``address_family`` follows its address: ``AF_INET6`` for an IPv6
    #: literal host (no subclass needed), ``AF_INET`` for an IPv4 one,
    #: ``AF_UNIX`` for a path, and the class's for a host name or ``""``.
    #: Set it to ``AF_INET6`` on a subclass to bind host names in IPv6.
    address_family: stdlib_socket.AddressFamily = stdlib_socket.AF_INET
    socket_type: stdlib_socket.SocketKind = stdlib_socket.SOCK_STREAM
    #: Set ``SO_REUSEADDR`` before binding. True here (socketserver: False)
    #: so a restarted server can bind while old connections sit in TIME_WAIT;
    #: binding over a live listener still fails with ``EADDRINUSE``.
    allow_reuse_address: bool = True
    #: Set ``SO_REUSEPORT`` before binding, so several processes can share
    #: the address.
    allow_reuse_port: bool = False
    #: The listen backlog (socketserver: 5); the kernel caps it.
    request_queue_size: int = DEFAULT_REQUEST_QUEUE_SIZE
    #: Seconds a new connection has for its PROXY header and TLS handshake,
    #: together. A handshake that fails or runs out of time
    #: drops the connection: logged at DEBUG and counted in
    #: ``stats.dropped``, not reported to ``handle_error``, since port
    #: scanners and plain-text clients do it all day. (A missing or bad
    #: PROXY header is dropped too, but logged at WARNING: it means a
    #: misconfigured proxy or a client going around it; at most once every
    #: 10 seconds per server, the next warning saying how many were not
    #: logged.)
    handshake_timeout: float = 10.0
    #: The most connections being prepared at once (PROXY header and TLS
    #: handshake), counting prepared ones that wait for a
    #: ``max_concurrent_requests`` slot; ``None`` means no bound. Only where
    #: there is something to prepare (``ssl_context`` or ``proxy_protocol``).
    #: At the bound the server stops accepting until one is done, so silent
    #: connections, each let go after :attr:`handshake_timeout`, stop service
    #: only once there are this many at once: keep it above the handshakes
    #: a busy moment brings, and below the process's descriptor limit.
    max_concurrent_handshakes: int | None = 1000
    #: Whether each connection starts with a PROXY protocol header (HAProxy's
    #: spec) giving the real client's address: ``"off"``, ``"v1"``, ``"v2"``,
    #: or ``"auto"`` for either. With it on, a connection from a peer not in
    #: :attr:`trusted_proxies`, or whose header is malformed or late, is
    #: closed, logged at WARNING (at most once every 10 seconds per server,
    #: so that no peer can flood the log) and counted in ``stats.dropped``;
    #: otherwise ``client_address`` becomes the address the header gives (a
    #: ``LOCAL`` or ``UNKNOWN`` header, as a proxy's health check sends,
    #: leaves the real peer's). The header is read in the request's own task, before
    #: any TLS handshake and after ``verify_request``, which therefore sees
    #: the proxy's address. Datagram servers take version 2 only (``"auto"``
    #: means ``"v2"`` there): see :class:`UDPServer`.
    proxy_protocol: ProxyProtocolMode = "off"
    #: The peers allowed to send PROXY headers: IP addresses or networks
    #: (``"10.0.0.0/8"``), and ``"unix"`` for every peer on a Unix socket.
    trusted_proxies: Sequence[str] = ()
    #: TCP keepalive for every accepted TCP connection, as
    #: ``(idle, interval, count)``: after ``idle`` seconds without traffic
    #: the kernel probes the peer every ``interval`` seconds, and resets the
    #: connection after ``count`` unanswered probes, so a handler waiting on
    #: a peer that vanished sees its read fail. Seconds are rounded up to
    #: whole ones; a bad value raises :exc:`ValueError` when the server is
    #: made (or starts serving, for one set later). ``None`` leaves the
    #: system's defaults (on Linux: off unless the socket asks for it). The
    #: listening socket and Unix connections are left alone.
    tcp_keepalive: tuple[float, float, int] | None = None

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: type[BaseRequestHandler],
        bind_and_activate: bool = True,
        *,
        extra_addresses: Sequence[Any] = (),
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | _Default = DEFAULT,
        max_concurrent_handshakes: int | _Default | None = DEFAULT,
        proxy_protocol: ProxyProtocolMode | _Default = DEFAULT,
        trusted_proxies: Sequence[str] | _Default = DEFAULT,
        tcp_keepalive: tuple[float, float, int] | _Default | None = DEFAULT,
        max_concurrent_requests: int | _Default | None = DEFAULT,
        max_connections_per_peer: int | _Default | None = DEFAULT,
        request_timeout: float | _Default | None = DEFAULT,
        idle_timeout: float | _Default | None = DEFAULT,
        shutdown_timeout: float | _Default = DEFAULT,
        drain_window: float | _Default = DEFAULT,
    ) -> None:
        super().__init__(
            server_address,
            RequestHandlerClass,
            max_concurrent_requests=max_concurrent_requests,
            max_connections_per_peer=max_connections_per_peer,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            shutdown_timeout=shutdown_timeout,
            drain_window=drain_window,
        )
        if ssl_context is not None and self.socket_type != stdlib_socket.SOCK_STREAM:
            raise ValueError(
                "ssl_context needs a stream server (DTLS is not supported)"
            )
        #: The server-side TLS context, or ``None`` for plain TCP.
        self.ssl_context = ssl_context
        self._set_options(
            handshake_timeout=handshake_timeout,
            max_concurrent_handshakes=max_concurrent_handshakes,
            proxy_protocol=proxy_protocol,
            trusted_proxies=trusted_proxies,
            tcp_keepalive=tcp_keepalive,
        )
        self.tcp_keepalive = check_tcp_keepalive(self.tcp_keepalive)
        if (
            self.tcp_keepalive is not None
            and self.socket_type != stdlib_socket.SOCK_STREAM
        ):
            raise ValueError("tcp_keepalive needs a stream server")
        if (limit := self.max_concurrent_handshakes) is not None and limit < 1:
            raise ValueError("max_concurrent_handshakes must be at least 1, or None")
        self._trusted_networks = _trusted_networks(
            self.proxy_protocol, self.trusted_proxies
        )
        # Requests refused for their PROXY header are logged through this:
        # an untrusted peer can send them as fast as it can connect.
        self._drop_warnings = WarningLimiter(LOGGER, DROP_WARNING_INTERVAL)
        if (
            self.proxy_protocol == "v1"
            and self.socket_type != stdlib_socket.SOCK_STREAM
        ):
            raise ValueError(
                "proxy_protocol='v1' needs a stream server: PROXY version 1 is "
                "a line of text for TCP; a datagram server takes 'v2' (or "
                "'auto', which means v2 for datagrams)"
            )
        self.address_family = family_of(server_address, type(self).address_family)
        addresses: list[Any] = []
        # Indices in server_addresses of the "::" listeners that host ""
        # added, whose port 0 means the port of the 0.0.0.0 one before them.
        self._same_port_as_previous: set[int] = set()
        for index, address in enumerate([server_address, *extra_addresses]):
            family = self.address_family if index == 0 else family_of(address)
            listened = every_interface(address, family)
            if len(listened) == 2:
                self._same_port_as_previous.add(len(addresses) + 1)
            addresses += listened
        self.server_address, *extras = addresses
        #: The addresses listened on besides :attr:`server_address`; real
        #: (bound) addresses once the server is bound.
        self.extra_addresses = extras
        self._listeners: list[Listener] = []
        # What server.socket is while there is no listener: see socket.
        self._placeholder: trio.socket.SocketType | None = None
        self._binding: Binding = "lazy" if bind_and_activate else "manual"
        if not bind_and_activate:
            self._listeners = [self._new_listener(self.address_family)]

    @classmethod
    def from_socket(
        cls: type[_SocketServerT],
        sock: stdlib_socket.socket | int,
        RequestHandlerClass: type[BaseRequestHandler],
        **options: Any,
    ) -> _SocketServerT:
        """A server on a socket that is already bound, such as an inherited one.

        Args:
          sock: A bound :class:`socket.socket`, or its file descriptor (a
            socket passed by a parent process, systemd, or a supervisor).
            The server takes it over and closes it in :meth:`server_close`;
            it is put to listen if it is a stream socket. A stream server
            takes any stream socket (TCP or Unix), a datagram server any
            datagram socket; a Unix socket file is left in place on close,
            since the server did not make it.
          RequestHandlerClass: The handler class.
          **options: The keyword options of the constructor.

        Raises:
          ValueError: the socket's type does not suit the class (a datagram
            socket for a stream server, or the other way round).
        """
        if isinstance(sock, int):
            sock = stdlib_socket.socket(fileno=sock)
        if sock.type != cls.socket_type:
            stream = cls.socket_type == stdlib_socket.SOCK_STREAM
            kind = "stream" if stream else "datagram"
            raise ValueError(f"{cls.__name__} needs a {kind} socket, not {sock!r}")
        # Made to bind lazily, it makes no socket of its own; handed this
        # one, already bound, it has nothing left to bind.
        server = cls(sock.getsockname(), RequestHandlerClass, **options)
        server.adopt_sockets([sock])
        return server

    def adopt_sockets(self, socks: Sequence[stdlib_socket.socket]) -> None:
        """Serve on these bound sockets instead of binding any of its own.

        The first becomes :attr:`socket`, the others the extra listeners;
        stream sockets are put to listen. The server takes them over and
        closes them in :meth:`server_close`, leaving any Unix socket file in
        place, since it did not make it. For a supervisor that binds once
        and hands the sockets to worker processes, each of which builds its
        server as usual and adopts them; :meth:`from_socket` does it for one
        socket. :attr:`binding` becomes ``"adopted"``.

        Raises:
          RuntimeError: the server is bound already (or closed).
        """
        if self._binding not in ("lazy", "manual"):
            raise RuntimeError(f"{self!r} already has its sockets")
        for unbound in self._listeners:
            # bind_and_activate=False's socket, made for options.
            close_unused(unbound.socket)
        self._listeners = [
            self._listener_on(trio.socket.from_stdlib_socket(sock), "adopted")
            for sock in socks
        ]
        first = self._listeners[0].socket
        self.address_family = stdlib_socket.AddressFamily(first.family)
        self.server_address, *self.extra_addresses = [
            listener.socket.getsockname() for listener in self._listeners
        ]
        self._same_port_as_previous = set()
        self._binding = "adopted"
        for listener in self._listeners:
            listener.listen(self.request_queue_size)

    def _new_listener(self, family: int) -> Listener:
        """A listener on a new socket of ``family``, to bind."""
        return self._listener_on(new_socket(family, self.socket_type))

    def _listener_on(
        self, sock: trio.socket.SocketType, origin: Origin = "made"
    ) -> Listener:
        """The listener for ``sock``: here, one that accepts connections."""
        return StreamListener(sock, origin)

    @property
    def binding(self) -> Binding:
        """Where the server is in binding its sockets.

        - ``"lazy"``: not bound yet; it binds by itself on ``async with
          server``, :meth:`serve_forever` or :meth:`handle_request`
          (``bind_and_activate=True``). Also after a bind that failed.
        - ``"manual"``: not bound yet, and waiting for you to await
          :meth:`server_bind` and :meth:`server_activate`
          (``bind_and_activate=False``).
        - ``"bound"``: its own sockets are bound, by the server itself or by
          your call of :meth:`server_bind`.
        - ``"adopted"``: it serves sockets it was handed
          (:meth:`from_socket`, :meth:`adopt_sockets`), which it did not bind.
        - ``"closed"``: :meth:`server_close` has run.
        """
        return self._binding

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening :mod:`trio.socket` socket (the first, with several).

        Reading it never raises. Before a server that binds by itself has
        bound, it is a closed socket of the server's family and type
        (``fileno()`` is -1): the real one is made when the server binds, so
        that construction opens nothing. With ``bind_and_activate=False`` it
        is a new socket from the start, ready for options. After
        :meth:`server_close` or a failed bind it is the socket, closed:
        ``server.socket.fileno() == -1``, as in socketserver.
        """
        if self._listeners:
            return self._listeners[0].socket
        if self._placeholder is None:
            try:
                placeholder = stdlib_socket.socket(
                    self.address_family, self.socket_type
                )
            except OSError:  # an IPv6 address on a host without IPv6
                placeholder = stdlib_socket.socket(type=self.socket_type)
            self._placeholder = trio.socket.from_stdlib_socket(placeholder)
            close_unused(self._placeholder)
        return self._placeholder

    @property
    def sockets(self) -> list[trio.socket.SocketType]:
        """Every listening socket: :attr:`socket` first, then the extra ones."""
        return [listener.socket for listener in self._listeners] or [self.socket]

    @property
    def server_addresses(self) -> list[Any]:
        """Every address listened on: :attr:`server_address` first."""
        return [self.server_address, *self.extra_addresses]

    def fileno(self) -> int:
        """The (first) listening socket's file descriptor; -1 when it has none."""
        return self.socket.fileno()

    async def _ensure_activated(self) -> None:
        if self._binding == "closed":
            raise trio.ClosedResourceError(f"{self!r} is closed")
        if self._binding != "lazy":
            await trio.lowlevel.checkpoint()
            return
        self._listeners = [self._new_listener(self.address_family)]
        try:
            await self.server_bind()
            await self.server_activate()
        except BaseException:
            await self.server_close()
            # Not closed for good: a later call may try again, on a new
            # socket. Until then, server.socket is the closed one.
            self._binding = "lazy"
            del self._listeners[1:]
            raise
        self._binding = "bound"

    async def server_bind(self) -> None:
        """Bind every listener; :attr:`server_addresses` become real.

        Sets the reuse options first (:attr:`allow_reuse_address`,
        :attr:`allow_reuse_port`). For a Unix socket, a socket file left by
        a server that died is removed first; one a live server listens on
        makes binding fail with ``EADDRINUSE``.

        Raises:
          OSError: binding failed; the message names the address.
        """
        if not self._listeners:
            # Not made to bind: binding the closed placeholder fails as such.
            self._listeners = [self._listener_on(self.socket)]
        listeners = self._listeners
        bound: list[Any] = []
        for index, address in enumerate(self.server_addresses):
            if index in self._same_port_as_previous and address[1] == 0:
                address = (address[0], bound[-1][1])
            if index == len(listeners):
                # Appended before it binds: whatever fails, server_close
                # closes every socket made.
                listeners.append(self._new_listener(family_of(address)))
            bound.append(
                await listeners[index].bind(
                    address,
                    reuse_address=self.allow_reuse_address,
                    reuse_port=self.allow_reuse_port,
                )
            )
        self.server_address, *self.extra_addresses = bound
        if self._binding == "manual":
            self._binding = "bound"

    async def server_activate(self) -> None:
        """Listen on every listener, with a backlog of :attr:`request_queue_size`."""
        for listener in self._listeners:
            listener.listen(self.request_queue_size)
        await trio.lowlevel.checkpoint()

    async def server_close(self) -> None:
        """Close the listening sockets and remove the socket files they made.

        Idempotent. Closing them while :meth:`serve_forever` runs ends
        accepting, and the requests in flight get the shutdown grace period.
        Connections the kernel had already completed by then (the listen
        backlog) are not reset, as closing a listener does to them: they are
        taken first and handled like the requests in flight, as far as
        ``max_concurrent_requests`` allows. A client behind a load balancer
        therefore sees either a refused connection, which the balancer
        retries elsewhere, or a served one.
        """
        self._binding = "closed"
        backlog = self._take_backlog()
        # No checkpoint since the backlog was emptied, so no connection can
        # have slipped in to be reset by the close.
        for listener in self._listeners:
            listener.close()
        for request, client_address in backlog:
            # Handled in the serving nursery, never here: closing awaits no
            # user code, and these requests get the shutdown's grace period.
            self._hand_over(request, client_address)
        await trio.lowlevel.checkpoint()

    def _take_backlog(self) -> list[tuple[Any, Any]]:
        """Take, without waiting, the requests that wait on the listeners.

        Only while serving (there is a nursery to handle them in), and only
        as many as free ``max_concurrent_requests`` slots: the rest would
        have waited anyway. Each is a ``(request, client_address)`` pair.
        """
        serving = self._serving
        taken: list[tuple[Any, Any]] = []
        if serving is None:
            return taken
        for listener in self._listeners:
            while True:
                if serving.slots is not None:
                    try:
                        serving.slots.acquire_nowait()
                    except trio.WouldBlock:
                        return taken
                waiting = listener.take_waiting()
                if waiting is None:
                    serving.release_slot()
                    break
                taken.append(waiting)
        return taken

    def _request_sources(self) -> list[RequestSource]:
        # As it is when serving starts, like the server's other options.
        keepalive = check_tcp_keepalive(self.tcp_keepalive)
        for listener in self._listeners:
            if isinstance(listener, StreamListener):
                listener.tcp_keepalive = keepalive
        sources = [listener.source() for listener in self._listeners]
        return self._sources_of(self.sockets, sources)

    @forwarding
    async def get_request(
        self, listener: trio.socket.SocketType | None = None
    ) -> tuple[Any, Any]:
        """Accept a connection; return ``(SocketStream, client_address)``.

        Accepts on ``listener``, by default :attr:`socket`. (With
        ``extra_addresses``, the server calls this with each listener; an
        override must take that argument.) Under TLS the stream becomes a
        :class:`trio.SSLStream` later, in the request's own task, after its
        handshake.
        """
        sock = self.socket if listener is None else listener
        for each in self._listeners:
            if each.socket is sock:
                return await each.source().wait()
        raise ValueError(f"{sock!r} is not one of {self!r}'s listeners")

    def _prepares_requests(self) -> bool:
        return self.proxy_protocol != "off" or self.ssl_context is not None

    def _preparing_limit(self) -> int | _Default | None:
        # Reading a PROXY header or shaking hands waits for the client.
        if self.socket_type == stdlib_socket.SOCK_STREAM and self._prepares_requests():
            return self.max_concurrent_handshakes
        return DEFAULT

    async def _prepare_request(
        self, request: Any, client_address: Any
    ) -> tuple[Any, Any] | None:
        with trio.move_on_after(self.handshake_timeout):
            if not await self._first_byte_before_shutdown(request):
                LOGGER.debug(
                    "closed %r: shutting down, and it sent nothing", client_address
                )
                return None
            if self.proxy_protocol != "off":
                client_address = await self._read_proxy_header(request, client_address)
                if client_address is None:
                    return None
            if self.ssl_context is None:
                return request, client_address
            stream = trio.SSLStream(request, self.ssl_context, server_side=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                LOGGER.debug("TLS handshake with %r failed: %r", client_address, exc)
                return None
            return stream, client_address
        if self.proxy_protocol != "off":
            self._drop_warnings.warning(
                "closed %r: no PROXY header in time", client_address
            )
        else:
            LOGGER.debug("TLS handshake with %r timed out", client_address)
        return None

    async def _first_byte_before_shutdown(self, stream: trio.SocketStream) -> bool:
        """Wait until the client sends something; False if shutdown starts first.

        A connection that has not spoken yet is idle, like one between
        messages: shutdown lets it go at once instead of waiting out the
        grace period for a handshake that may never come. One whose bytes
        have already arrived has spoken, shutdown or not (a connection
        taken from the backlog at close, say).
        """
        return await wait_until_spoken(stream, self._shutdown_signal)

    async def _read_proxy_header(self, stream: trio.SocketStream, peer: Any) -> Any:
        """The client address a trusted proxy's header gives; None to drop."""
        if not _is_trusted(peer, self._trusted_networks):
            self._drop_warnings.warning(
                "closed a connection from %r: not a trusted proxy", peer
            )
            return None
        mode = cast(ProxyMode, self.proxy_protocol)
        try:
            header = await receive_proxy_header(stream.socket, mode)
        except (ProxyProtocolError, OSError) as exc:
            self._drop_warnings.warning("closed a connection from %r: %s", peer, exc)
            return None
        return peer if header.source is None else header.source

    @shieldable_from_first_wait
    async def close_request(self, request: Any) -> None:
        """Close the request's stream without resetting the connection.

        Under TLS it sends close_notify first. Then it lingers: it shuts the
        connection for writing, so the client reads everything written and
        then a clean end-of-stream, and reads and discards what the client
        still sends until the client closes too, for at most
        :attr:`~BaseServer.drain_window` seconds.
        Closing at once would make the kernel reset a connection whose
        client is still sending, such as a keep-alive client whose next
        request is on its way, and a reset can destroy a reply the client
        has not read yet.
        """
        # A peer that has already gone cannot take a close_notify; the socket
        # is closed all the same.
        with contextlib.suppress(trio.BrokenResourceError):
            await close_without_reset(request, linger=self.drain_window)


def _trusted_networks(
    mode: str, trusted: Sequence[str]
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network | str]:
    if mode not in ("off", "v1", "v2", "auto"):
        raise ValueError(f"proxy_protocol must be off, v1, v2 or auto, not {mode!r}")
    if isinstance(trusted, str):
        raise TypeError("trusted_proxies is a list of addresses, not one string")
    if mode != "off" and not trusted:
        raise ValueError("proxy_protocol needs trusted_proxies: who may send headers")
    return [
        entry if entry == "unix" else ipaddress.ip_network(entry, strict=False)
        for entry in trusted
    ]


def _is_trusted(
    peer: Any, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network | str]
) -> bool:
    if not isinstance(peer, tuple):
        return "unix" in networks
    address = ipaddress.ip_address(peer[0].partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(
        not isinstance(network, str) and address in network for network in networks
    )


class _RelayedDatagram(tuple[bytes, trio.socket.SocketType]):
    """A datagram's ``(payload, socket)`` pair, relayed by a PROXY protocol proxy.

    Still the pair a handler unpacks; ``reply_address`` is the proxy that
    sent it, where the reply must go (the handler's ``reply_address``).
    Plain datagrams stay plain tuples, which cost less to make.
    """

    reply_address: Any

    def __new__(
        cls, payload: bytes, sock: trio.socket.SocketType, reply_address: Any
    ) -> _RelayedDatagram:
        datagram = super().__new__(cls, (payload, sock))
        datagram.reply_address = reply_address
        return datagram


class UDPServer(TCPServer):
    """A datagram server: ``socketserver.UDPServer`` on Trio.

    Each request is the pair ``(data, socket)``, one datagram and the
    server's socket to reply on; use :class:`DatagramRequestHandler`. A
    datagram longer than :attr:`max_packet_size` is dropped, logged and
    counted in ``stats.malformed`` instead of being handled cut short.

    With :attr:`~TCPServer.proxy_protocol` ``"v2"`` (or ``"auto"``, which
    means the same here: version 1 is text for TCP only, and ``"v1"`` raises
    :exc:`ValueError`), every datagram must start with a PROXY protocol
    version 2 header, as a proxy relaying UDP or Unix datagrams sends it.
    The header is taken off in the request's task, as for a stream, after
    ``verify_request`` (which sees the proxy's address and the datagram as
    received); the handler then gets the payload after the header as its
    ``packet``, the client the header names as its ``client_address`` (the
    sender's own for a ``LOCAL`` header or one with no address), and the
    sender, the proxy that relays the reply, as its
    :attr:`~DatagramRequestHandler.reply_address`. A datagram whose sender
    is not in :attr:`~TCPServer.trusted_proxies`, or whose header is missing
    or malformed, is dropped unhandled, logged at WARNING and counted in
    ``stats.dropped``, as a stream's would be; the datagrams after it are
    served as usual.

    Dropped datagrams are logged at most once every 10 seconds per server
    (the next warning says how many were not logged), so a sender of bad
    datagrams cannot flood the log; ``stats`` counts every one.

    A datagram's request starts eagerly: it runs in the task that received
    it until it first waits, and most handlers are done by then (building
    the reply and sending it does not wait while the socket takes it), with
    no task of their own to pay for. A handler that does wait, on a lock, a
    timer, another server, keeps that task from then on, exactly as if it
    had been given one, and a new task takes over receiving, so the next
    datagrams do not wait for it. Each request sees the context variables
    as they were when it started, as a task would.
    """

    socket_type = stdlib_socket.SOCK_DGRAM
    _runs_requests_in_place = True
    #: Off, as in socketserver: for UDP it would let two servers share a port.
    allow_reuse_address = False
    #: The longest datagram handled, in bytes.
    max_packet_size: int = 8192

    def _listener_on(
        self, sock: trio.socket.SocketType, origin: Origin = "made"
    ) -> Listener:
        """The listener for ``sock``: here, one that receives datagrams."""
        return DatagramListener(
            sock,
            origin,
            max_packet_size=self.max_packet_size,
            oversized=self._drop_oversized,
        )

    async def server_activate(self) -> None:
        """Nothing to do: datagram sockets do not listen."""
        await trio.lowlevel.checkpoint()

    def _request_sources(self) -> list[RequestSource]:
        for listener in self._listeners:
            # As it is when serving starts, like the server's other options.
            assert isinstance(listener, DatagramListener)
            listener.max_packet_size = self.max_packet_size
        return super()._request_sources()

    @forwarding
    async def get_request(
        self, listener: trio.socket.SocketType | None = None
    ) -> tuple[Any, Any]:
        """Receive a datagram; return ``((data, socket), client_address)``.

        Receives on ``listener``, by default :attr:`socket`, as for
        :meth:`TCPServer.get_request`. A datagram longer than
        :attr:`max_packet_size` is dropped, and the next one taken.
        """
        return await super().get_request(listener)

    async def server_close(self) -> None:
        """Close the socket; while serving, once the requests in flight are done.

        Idempotent. A datagram server replies on the socket it receives on,
        so closing it while :meth:`serve_forever` runs stops receiving at
        once and begins the shutdown, but the socket itself closes when
        serving has ended: the requests in flight still get to send their
        replies, within the grace period. Datagrams already in the socket's
        buffer are taken first and handled like them, as far as
        ``max_concurrent_requests`` allows, instead of being dropped.
        """
        serving = self._serving
        if serving is None or self._binding == "closed":
            await super().server_close()
            return
        self._binding = "closed"
        for request, client_address in self._take_backlog():
            self._hand_over(request, client_address)
        if not self._shutdown_signal.started:
            self._begin_shutdown(serving, self.shutdown_timeout)
        await trio.lowlevel.checkpoint()

    def _serving_ended(self) -> None:
        # The close that server_close put off until the last reply.
        if self._binding == "closed":
            for listener in self._listeners:
                listener.close()

    def _drop_oversized(self, client_address: Any) -> None:
        self.stats.malformed += 1
        self._drop_warnings.warning(
            "dropped a datagram from %r longer than max_packet_size (%d bytes)",
            client_address,
            self.max_packet_size,
        )

    def _prepares_requests(self) -> bool:
        return self.proxy_protocol != "off"

    async def _prepare_request(
        self, request: Any, client_address: Any
    ) -> tuple[Any, Any] | None:
        # The PROXY header comes off here, where TCPServer reads its own,
        # rather than in get_request: verify_request and the per-peer limit
        # then see the proxy for datagrams as they do for streams, and a bad
        # header is counted as a stream's is, in stats.dropped (get_request's
        # drops are never accepted: stats.malformed). The header is all in
        # hand, so this is a parse without I/O.
        return self._take_proxy_header(request, client_address)

    def _take_proxy_header(
        self, request: tuple[bytes, trio.socket.SocketType], sender: Any
    ) -> tuple[_RelayedDatagram, Any] | None:
        """The payload and the client a trusted proxy's header names; None to drop."""
        if not _is_trusted(sender, self._trusted_networks):
            self._drop_warnings.warning(
                "dropped a datagram from %r: not a trusted proxy", sender
            )
            return None
        data, sock = request
        try:
            # Version 2 whatever the mode: version 1 has no datagram form.
            parsed = parse_proxy_header(data, "v2")
            if parsed is None:
                raise ended_early(data)
        except ProxyProtocolError as exc:
            self._drop_warnings.warning("dropped a datagram from %r: %s", sender, exc)
            return None
        header, length = parsed
        payload = data[length:]
        client_address = sender if header.source is None else header.source
        return _RelayedDatagram(payload, sock, sender), client_address

    @skippable
    async def close_request(self, request: Any) -> None:
        """Nothing to do: a datagram has no connection of its own."""


class UnixStreamServer(TCPServer):
    """A stream server on a Unix socket: ``socketserver.UnixStreamServer`` on Trio.

    ``server_address`` is the socket's path. A socket file left by a server
    that died is removed before binding; one a live server listens on makes
    binding fail with ``EADDRINUSE``. :meth:`server_close` removes the file
    the server made.
    """

    address_family = stdlib_socket.AF_UNIX
    allow_reuse_address = False


class UnixDatagramServer(UDPServer):
    """A datagram server on a Unix socket: ``socketserver.UnixDatagramServer`` on Trio.

    The socket file is managed as for :class:`UnixStreamServer`. Replies go
    to the client's own bound path; a client that did not bind gets none.
    """

    address_family = stdlib_socket.AF_UNIX
