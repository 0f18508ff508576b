"""Request handlers: the object that serves one request, and its lifecycle."""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from ._credentials import PeerCredentials, peer_credentials
from ._shielding import shieldable_from_first_wait, start_shielded
from ._socketio import send_datagram
from ._streams import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_RECEIVE_SIZE,
    AsyncBufferedWriter,
    AsyncPacketReader,
    AsyncPacketWriter,
    AsyncReader,
    AsyncWriter,
)

if TYPE_CHECKING:
    from ._server import BaseServer

LOGGER = logging.getLogger("trioserve")

#: The handler methods the server awaits.
HANDLER_HOOKS: Final = ("setup", "handle", "finish")


class SyncHookError(TypeError):
    """A hook that the server awaits is a plain ``def``.

    socketserver's habit: without this check every request would log
    "coroutine ... was never awaited" and a traceback instead.
    """


def _is_sync(hook: object) -> bool:
    """Whether ``hook`` is a plain function (or method), not an async one.

    A decorated function counts as async if the function it wraps
    (``__wrapped__``, as :func:`functools.wraps` sets) is. Other callables
    (objects, partials, mocks) cannot be told apart cheaply and are trusted.
    """
    function = getattr(hook, "__func__", hook)
    if not inspect.isfunction(function):
        return False
    return not (
        inspect.iscoroutinefunction(function)
        or inspect.iscoroutinefunction(inspect.unwrap(function))
    )


def check_async_hooks(owner: object, names: Iterable[str]) -> None:
    """Raise :exc:`SyncHookError` if a hook named in ``names`` is a plain ``def``.

    ``owner`` is the class (or object) to look the hooks up on; names it does
    not have are skipped.
    """
    for name in names:
        if _is_sync(getattr(owner, name, None)):
            where = owner if isinstance(owner, type) else type(owner)
            raise SyncHookError(
                f"{where.__name__}.{name}() must be async def: trioserve awaits it"
            )


class BaseRequestHandler:
    """The base of every request handler.

    The server makes one instance per request, passing the ``request``, the
    ``client_address`` and itself, then awaits :meth:`setup`, :meth:`handle`
    and :meth:`finish` in that order. :meth:`finish` runs whenever
    :meth:`setup` returned, also when :meth:`handle` raised or was cancelled;
    it runs shielded from cancellation for at most :attr:`finish_timeout`
    seconds, so cleanup gets done even while the server is being cancelled.
    If :meth:`setup` raises, :meth:`finish` is not called.

    An exception that escapes reaches the server's ``handle_error``; the
    server keeps serving.

    :meth:`setup`, :meth:`handle` and :meth:`finish` must be ``async def``:
    a plain ``def`` (socketserver's habit) raises :exc:`TypeError`, naming
    the method, when the class is defined or handed to a server.
    """

    #: Seconds :meth:`finish` may run, shielded from cancellation; ``None``
    #: means no bound (a ``finish`` that hangs then stalls shutdown forever).
    finish_timeout: float | None = 2.0
    #: Deprecated, and without effect: a datagram server runs every request
    #: in place until it first waits (see :class:`~trioserve.UDPServer`), so
    #: a handler no longer says whether it waits. Setting it in a class
    #: warns.
    inline: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Refused where it is written, before any request.
        check_async_hooks(cls, [name for name in HANDLER_HOOKS if name in vars(cls)])
        if "inline" in vars(cls):
            warnings.warn(
                f"{cls.__name__}.inline has no effect, and is deprecated: a "
                "datagram server runs every handler in place until it waits",
                DeprecationWarning,
                stacklevel=2,
            )

    def __init__(self, request: Any, client_address: Any, server: BaseServer) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server

    async def setup(self) -> None:
        """Prepare to handle the request. Does nothing by default."""

    async def handle(self) -> None:
        """Serve the request. Does nothing by default; override this."""

    @shieldable_from_first_wait
    async def finish(self) -> None:
        """Clean up after :meth:`handle`. Does nothing by default."""


async def run_handler(
    handler_class: type[BaseRequestHandler],
    server: BaseServer,
    request: Any,
    client_address: Any,
) -> None:
    """Make a ``handler_class`` for the request and await its lifecycle.

    ``setup``, ``handle`` and ``finish``, with the guarantees above.
    """
    handler = handler_class(request, client_address, server)
    await handler.setup()
    try:
        await handler.handle()
    finally:
        rest = start_shielded(handler.finish, timeout=handler.finish_timeout)
        if rest is not None and await rest:
            LOGGER.warning(
                "finish() of %s for %r was cut off after finish_timeout (%s s)",
                type(handler).__name__,
                handler.client_address,
                handler.finish_timeout,
            )


class StreamRequestHandler(BaseRequestHandler):
    """A handler for stream servers (TCP, Unix, TLS) with ``rfile`` and ``wfile``.

    After :meth:`setup`:

    - ``self.connection`` is the request's Trio stream: a
      :class:`trio.SocketStream`, or a :class:`trio.SSLStream` under TLS.
    - ``self.rfile`` is an :class:`~trioserve.AsyncBufferedReader` over it:
      ``await rfile.readline()``, ``await rfile.read(n)``,
      ``await rfile.read1(n)``, ``async for line in rfile``.
    - ``self.wfile`` is an :class:`~trioserve.AsyncBufferedWriter` over it:
      ``await wfile.write(data)``, ``await wfile.flush()``, and
      ``await wfile.send_eof()`` to half-close (not under TLS). It is
      flushed by :meth:`finish`.

    (Both are declared by what they share with a datagram handler's, as an
    :class:`~trioserve.AsyncReader` and an :class:`~trioserve.AsyncWriter`;
    a handler that uses more, such as ``wfile.timeout``, declares
    ``wfile: trioserve.AsyncBufferedWriter``.)

    When a graceful shutdown starts, a read that is waiting for the first
    byte of a new message waits at most the server's ``drain_window`` for
    one already on its way, then returns end-of-stream (``readline()``
    returns ``b""``, ``async for`` ends), so an idle connection leaves
    without waiting for the grace period. A read holding part of a message
    keeps waiting for the rest. Read through ``rfile`` (``read1`` to feed a
    parser of your own): a read on ``self.connection`` itself is not known
    to be idle, so it holds up a shutdown for the whole grace period.

    A read through ``rfile`` that waits while another task closes the
    connection raises :exc:`trio.ClosedResourceError` within a second (on
    Linux the wait is parked with the server, which looks for closed
    sockets once a second), not at once as a wait on ``self.connection``
    would.
    """

    #: The most bytes one receive asks the stream for.
    rbufsize: int = DEFAULT_RECEIVE_SIZE
    #: ``0``: every write is sent at once. More: writes gather until that many
    #: bytes are buffered, or until ``flush()``/``finish()``.
    wbufsize: int = 0
    #: Seconds a read or a write may make no progress before it raises
    #: :exc:`TimeoutError`; ``None`` waits forever.
    timeout: float | None = None
    #: The longest line ``rfile`` accepts, in bytes with its ``\n``; a longer
    #: one raises :exc:`trioserve.LineTooLong`.
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH

    connection: trio.abc.Stream
    # Typed by what streams and datagrams share, so that a mixin that
    # declares them so combines with either handler class; a subclass that
    # needs more declares AsyncBufferedReader/AsyncBufferedWriter itself.
    rfile: AsyncReader
    wfile: AsyncWriter

    @property
    def peer_credentials(self) -> PeerCredentials | None:
        """``(pid, uid, gid)`` of the client of a Unix stream server.

        As :func:`trioserve.peer_credentials` gives them for the request:
        None on TCP; :exc:`NotImplementedError` on a Unix socket outside
        Linux. Each read asks the kernel (one ``getsockopt``).
        """
        return peer_credentials(self.request)

    async def setup(self) -> None:
        """Set ``connection``, ``rfile`` and ``wfile``; call it from an override."""
        self.connection = self.request
        self.rfile = self.server.make_reader(
            self.connection,
            receive_size=self.rbufsize,
            max_line_length=self.max_line_length,
            timeout=self.timeout,
        )
        self.wfile = AsyncBufferedWriter(
            self.connection, buffer_size=self.wbufsize, timeout=self.timeout
        )

    @shieldable_from_first_wait
    async def finish(self) -> None:
        """Flush ``wfile``; call it from an override."""
        wfile = self.wfile
        if isinstance(wfile, AsyncBufferedWriter) and not wfile.buffered:
            return
        # The flush may wait, and may look at cancellation first: the shield
        # must be in place before it, and this checkpoint, which does
        # neither, is where it begins (see shieldable_from_first_wait).
        await trio.lowlevel.cancel_shielded_checkpoint()
        # If the peer has gone, there is nobody left to deliver to.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await wfile.flush()


class DatagramRequestHandler(BaseRequestHandler):
    """A handler for datagram servers (UDP, Unix datagram).

    ``self.request`` is the pair ``(data, socket)``; :meth:`setup` unpacks
    it into ``self.packet`` and ``self.socket``, sets :attr:`reply_address`,
    and makes ``self.rfile`` an :class:`~trioserve.AsyncPacketReader` over
    the datagram's bytes and ``self.wfile`` an
    :class:`~trioserve.AsyncPacketWriter`. :meth:`finish` sends whatever was
    written to :attr:`reply_address` (``client_address``, unless a PROXY
    protocol proxy relayed the datagram) as one datagram; nothing is sent if
    nothing was written. ``rfile`` and ``wfile`` have the same async
    interface as :class:`StreamRequestHandler`'s, so one ``handle()`` body,
    written as a mixin, serves streams and datagrams alike. Both handler
    classes declare ``rfile`` as an :class:`~trioserve.AsyncReader` and
    ``wfile`` as an :class:`~trioserve.AsyncWriter`, the protocols that
    interface makes, so a mixin that declares them the same way type-checks
    (``mypy --strict``) with either class::

        class Shout(trioserve.BaseRequestHandler):
            rfile: trioserve.AsyncReader
            wfile: trioserve.AsyncWriter

            async def handle(self) -> None:
                async for line in self.rfile:
                    await self.wfile.write(line.upper())

        class StreamShout(Shout, trioserve.StreamRequestHandler): ...
        class DatagramShout(Shout, trioserve.DatagramRequestHandler): ...
    """

    #: The longest line ``rfile`` accepts, as for streams.
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH

    packet: bytes
    socket: trio.socket.SocketType
    #: Where the reply goes, set by :meth:`setup`: ``client_address``, except
    #: for a datagram that a PROXY protocol proxy relayed (see
    #: :class:`~trioserve.UDPServer`). Then ``client_address`` is the client
    #: the proxy's header names and ``packet`` what followed the header,
    #: but the reply must go back to the proxy, the datagram's sender, which
    #: relays it to the client: that is ``reply_address``. A handler that
    #: sends replies of its own should send them here too.
    reply_address: Any
    # As on StreamRequestHandler: what streams and datagrams share.
    rfile: AsyncReader
    wfile: AsyncWriter

    async def setup(self) -> None:
        """Set ``packet``, ``socket``, ``reply_address``, ``rfile``, ``wfile``.

        Call it from an override.
        """
        request = self.request
        self.packet, self.socket = request
        # A server that took a PROXY header off the datagram gives the
        # sender with the request (a pair with that attribute); otherwise the
        # reply goes to the client.
        self.reply_address = getattr(request, "reply_address", self.client_address)
        self.rfile = AsyncPacketReader(
            self.packet, max_line_length=self.max_line_length
        )
        self.wfile = AsyncPacketWriter()

    @shieldable_from_first_wait
    async def finish(self) -> None:
        """Send what was written to ``wfile``, if anything, to ``reply_address``.

        Call it from an override.
        """
        reply = cast(AsyncPacketWriter, self.wfile).getvalue()
        # A Unix datagram client that did not bind a path has no address.
        if reply and self.reply_address:
            await send_datagram(self.socket, reply, self.reply_address)
