"""BaseServer: the request lifecycle, concurrency, timeouts and shutdown."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar, copy_context
from enum import Enum
from functools import partial
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar, cast

import attrs
import trio

from ._eager import FINISHED, first_step, resume
from ._handlers import HANDLER_HOOKS, BaseRequestHandler, check_async_hooks, run_handler
from ._listeners import ACCEPT_RETRY_DELAY, AcceptErrors, RequestSource
from ._plan import (
    FORWARDING,
    SKIPPABLE,
    RequestPlan,
    classify,
    count_error,
    forwarding,
    is_marked,
    skippable,
    within_deadline,
)
from ._shielding import await_shielded, start_shielded
from ._shutdown import ShutdownSignal
from ._stats import RequestDurations, ServerStats
from ._streams import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_RECEIVE_SIZE,
    AsyncBufferedReader,
    ServerReader,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

LOGGER = logging.getLogger("trioserve")

# shutdown_request runs shielded, so that a request cancelled from outside
# still releases its socket; this bound keeps an override that hangs from
# stalling shutdown for ever.
REQUEST_CLOSE_TIMEOUT: Final = 1.0

# Every request task's name, the one Trio would make from the function: one
# string for them all, where Trio would format a new one for each task,
# held for as long as its connection stays open.
REQUEST_TASK_NAME: Final = f"{__name__}.BaseServer._request_task"

# The servers whose serve_forever (or handle_request) encloses the current
# task. shutdown() called from inside one of them must not wait for it to
# return: it would be waiting for itself.
_ENCLOSING_SERVERS: ContextVar[tuple[BaseServer, ...]] = ContextVar(
    "trioserve_enclosing_servers", default=()
)


class _Default(Enum):
    TOKEN = "DEFAULT"


_ServerT = TypeVar("_ServerT", bound="BaseServer")

# The server's hooks, all awaited: a plain def for any of them is refused.
SERVER_HOOKS: Final = (
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
    "handle_error",
    "handle_timeout",
    "service_actions",
    "server_bind",
    "server_activate",
    "server_close",
    "get_request",
    "serve_forever",
    "handle_request",
    "shutdown",
)

#: Marks a constructor option that was not given: the class attribute applies.
DEFAULT: Final = _Default.TOKEN


def _peer_of(client_address: Any) -> Any:
    """The host part of an IP address; None where peers are not told apart."""
    if isinstance(client_address, tuple) and client_address:
        return client_address[0]
    return None


@attrs.define(eq=False)
class _Serving:
    """The state of one ``serve_forever`` or ``handle_request`` call."""

    nursery: trio.Nursery
    finished: trio.Event
    # Taken before each accept, given back when the request is done (or
    # traded, see RequestPlan.take_slot): the backpressure bound.
    # max_concurrent_requests, or max_concurrent_handshakes where requests
    # are prepared apart (see BaseServer._preparing_limit).
    slots: trio.Semaphore | None
    # Where requests are prepared apart: the max_concurrent_requests bound,
    # taken once prepared. A client slow to shake hands then never keeps an
    # established one from its handler.
    request_slots: trio.Semaphore | None = None
    # The cancel scopes around waits for a request (each accept task's, while
    # it waits; handle_request's): the shutdown cancels them to stop
    # accepting.
    accept_scopes: set[trio.CancelScope] = attrs.Factory(set)
    # serve_forever's: the nursery of the accept tasks (and of the requests
    # they start in place and that went on to wait), their number, and the
    # scope of the service actions, which run while any accepts.
    accepting: trio.Nursery | None = None
    accept_tasks: int = 0
    service_actions: trio.CancelScope = attrs.Factory(trio.CancelScope)
    # Requests in flight per peer host, kept only under a per-peer limit.
    peers: dict[Any, int] = attrs.Factory(dict)
    # The client addresses of the requests that a shutdown cancelled.
    cut_off: list[Any] = attrs.Factory(list)
    # What each request goes through; set once the server has made it.
    plan: RequestPlan = attrs.field(init=False)

    def admit_peer(self, client_address: Any, limit: int) -> bool:
        """Count the request against its peer; False if the peer is at ``limit``."""
        peer = _peer_of(client_address)
        if peer is None:
            return True
        count = self.peers.get(peer, 0)
        if count >= limit:
            return False
        self.peers[peer] = count + 1
        return True

    def release_slot(self) -> None:
        """Give back a slot taken before an accept."""
        if self.slots is not None:
            self.slots.release()

    async def trade_slot(self) -> trio.Semaphore | None:
        """Trade a prepared request's slot for a request slot; return the new one.

        Waits, still holding the old slot, for a request slot to be free.
        """
        if self.request_slots is not None:
            await self.request_slots.acquire()
        self.release_slot()
        return self.request_slots

    def release(self, client_address: Any, slot: trio.Semaphore | None) -> None:
        """Give back what an admitted request held: ``slot`` and its peer count."""
        if slot is not None:
            slot.release()
        if not self.peers:
            return
        peer = _peer_of(client_address)
        if peer in self.peers:
            count = self.peers.pop(peer) - 1
            if count:
                self.peers[peer] = count


# How many of the requests a shutdown cancelled its warning names.
CUT_OFF_ADDRESSES_SHOWN: Final = 3


def counted(count: int, noun: str) -> str:
    """``"1 request"``, ``"2 requests"``: ``count`` and ``noun``, in the plural
    unless it is one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _report_cut_off(client_addresses: list[Any]) -> None:
    """Log the one warning about the requests the shutdown's deadline cancelled."""
    count = len(client_addresses)
    named = ", ".join(map(repr, client_addresses[:CUT_OFF_ADDRESSES_SHOWN]))
    if count > CUT_OFF_ADDRESSES_SHOWN:
        named += f" and {count - CUT_OFF_ADDRESSES_SHOWN} more"
    LOGGER.warning(
        "shutdown cancelled %s still running at its deadline, from %s",
        counted(count, "request"),
        named,
    )


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class BaseServer:
    """The base of all servers: ``socketserver.BaseServer`` on Trio.

    A server hands each request to ``RequestHandlerClass`` in a task of its
    own. It does no I/O of its own; :class:`TCPServer` and its kin add the
    socket. Subclasses override the hooks below, all of which are async: a
    plain ``def`` override, or a handler class with a plain ``def`` ``setup``,
    ``handle`` or ``finish``, raises :exc:`TypeError` naming the method, when
    the class is defined or the server constructed.

    Args:
      server_address: Where to listen, in the form the socket family takes.
      RequestHandlerClass: A :class:`BaseRequestHandler` subclass; one
        instance serves each request.
      max_concurrent_requests, max_connections_per_peer, request_timeout,
      idle_timeout, shutdown_timeout, drain_window: Override the class
        attributes of those names.
    """

    #: Seconds :meth:`handle_request` waits for a request before it awaits
    #: :meth:`handle_timeout`; ``None`` waits forever.
    timeout: float | None = None
    # Whether a request runs in the accept task that took it, up to its first
    # wait, instead of in a task of its own from the start (see
    # _take_requests). For datagrams, most of which need no task at all; a
    # stream's request waits for its bytes at once, and would only pay for
    # the hand-over.
    _runs_requests_in_place: ClassVar[bool] = False
    #: Seconds :meth:`shutdown` lets requests in flight run before it cancels
    #: them. ``math.inf`` waits for them however long they take.
    shutdown_timeout: float = 5.0
    #: The most requests handled at once; ``None`` means no bound. At the
    #: bound the server stops accepting until a request finishes, so excess
    #: clients wait in the listen backlog instead of in memory. (Under TLS
    #: or the PROXY protocol, a connection takes its slot once its handshake
    #: is done; until then it counts against
    #: :attr:`TCPServer.max_concurrent_handshakes` instead.)
    max_concurrent_requests: int | None = None
    #: The most requests handled at once for one peer host; a connection
    #: beyond it is closed at accept and counted in ``stats.rejected``, so
    #: one client cannot take every slot. ``None`` means no limit. Applies
    #: to IP peers (a Unix socket's peers cannot be told apart).
    max_connections_per_peer: int | None = None
    #: Seconds a whole request may take, handler and all; past it the handler
    #: is cancelled, ``finish()`` runs, and ``handle_error`` sees a
    #: :exc:`TimeoutError`. ``None`` means no deadline.
    request_timeout: float | None = None
    #: Seconds a stream handler's ``rfile`` may wait between messages: a read
    #: that starts with nothing buffered must deliver its message within this
    #: time. If nothing at all arrived, the read returns end-of-stream (an
    #: idle connection is let go quietly); if part of a message arrived, it
    #: raises :exc:`TimeoutError` (a client trickling bytes, as in slowloris).
    #: ``None`` means no limit.
    idle_timeout: float | None = None
    #: Seconds the server allows for bytes on their way to it, about a
    #: network round trip and then some. When shutdown starts, a stream
    #: connection idle between messages (or that becomes idle after) has
    #: this long for a message already on its way: a keep-alive client
    #: sends its next request as soon as it has the last reply, so under
    #: load most "idle" connections have one in flight. A message that
    #: starts within the window is served, with the grace period; with
    #: none, the handler's read returns end-of-stream. And a stream server
    #: closing a connection lingers this long at most for the client's
    #: end-of-stream (see :meth:`TCPServer.close_request`). Only
    #: connections idle or closing at that moment wait, so a server without
    #: them shuts down at once.
    drain_window: float = 0.25

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Refused where it is written, before any request.
        check_async_hooks(cls, [name for name in SERVER_HOOKS if name in vars(cls)])

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: type[BaseRequestHandler],
        *,
        max_concurrent_requests: int | _Default | None = DEFAULT,
        max_connections_per_peer: int | _Default | None = DEFAULT,
        request_timeout: float | _Default | None = DEFAULT,
        idle_timeout: float | _Default | None = DEFAULT,
        shutdown_timeout: float | _Default = DEFAULT,
        drain_window: float | _Default = DEFAULT,
    ) -> None:
        # A hook made synchronous after its class was defined, too.
        check_async_hooks(RequestHandlerClass, HANDLER_HOOKS)
        check_async_hooks(type(self), SERVER_HOOKS)
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self._set_options(
            max_concurrent_requests=max_concurrent_requests,
            max_connections_per_peer=max_connections_per_peer,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            shutdown_timeout=shutdown_timeout,
            drain_window=drain_window,
        )
        for name in ("max_concurrent_requests", "max_connections_per_peer"):
            if (limit := getattr(self, name)) is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1, or None")
        for name in (
            "request_timeout",
            "idle_timeout",
            "shutdown_timeout",
            "drain_window",
        ):
            if (seconds := getattr(self, name)) is not None and seconds < 0:
                raise ValueError(f"{name} must not be negative")
        #: The server's :class:`ServerStats`.
        self.stats = ServerStats()
        #: How long the server's requests took, as a :class:`RequestDurations`
        #: histogram; None (the default) times nothing, which is free. The
        #: metrics (:func:`serve_metrics`, ``--metrics``) set one; set one
        #: yourself to time requests, before or while serving.
        self.request_durations: RequestDurations | None = None
        # What accept errors make it do (see AcceptErrors).
        self._accept_errors = AcceptErrors(self.stats)
        self._serving: _Serving | None = None
        self._accepting = False
        # Handlers' readers watch this to leave promptly when shutdown
        # starts; each serve_forever gets a fresh one.
        self._shutdown_signal = ShutdownSignal(self.drain_window, self.stats)

    def _set_options(self, **options: Any) -> None:
        """Set on the server each constructor option that was given.

        One not given (``DEFAULT``) leaves the class attribute in force.
        """
        for name, value in options.items():
            if value is not DEFAULT:
                setattr(self, name, value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.server_address!r}>"

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A hook set on the server while it serves is awaited from the next
        # request on, as in socketserver, which looks hooks up every time.
        if name in RequestPlan.SOURCES:
            serving = getattr(self, "_serving", None)
            if serving is not None:
                serving.plan = self._plan_requests(
                    serving, trades_slot=serving.plan.take_slot is not None
                )

    async def __aenter__(self: _ServerT) -> _ServerT:
        await self._ensure_activated()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.server_close()

    async def _ensure_activated(self) -> None:
        """Bind and activate, once, if the server was built to do so.

        :class:`BaseServer` has nothing to bind; :class:`TCPServer` binds here.
        """
        await trio.lowlevel.checkpoint()

    # -- serving -----------------------------------------------------------

    def is_serving(self) -> bool:
        """True exactly while :meth:`serve_forever` accepts new requests."""
        return self._accepting

    def make_reader(
        self,
        stream: trio.abc.ReceiveStream,
        *,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        timeout: float | None = None,
    ) -> AsyncBufferedReader:
        """A reader over a request's ``stream`` that keeps this server's rules.

        :meth:`StreamRequestHandler.setup` makes ``rfile`` here; a handler
        that reads through a reader of its own should make it here too. The
        arguments are the reader's own; the server adds its rules for the
        waits between messages:

        - :attr:`idle_timeout`: a read that starts with nothing buffered
          must deliver its message within it.
        - Shutdown: once :meth:`shutdown` starts, a read waiting for the
          first byte of a new message waits at most :attr:`drain_window`
          for one already on its way, then returns end-of-stream. The wait
          for a connection's very first bytes counts as such a wait, except
          behind a PROXY protocol proxy, where a new connection means a
          client has connected and its first bytes may be a network round
          trip behind.

        Each call makes a new :class:`AsyncBufferedReader`; it reads nothing
        until asked.
        """
        # Only TCPServer and its kin know the PROXY protocol.
        proxied = getattr(self, "proxy_protocol", "off") != "off"
        return ServerReader(
            stream,
            self._shutdown_signal,
            first_bytes_idle=not proxied,
            receive_size=receive_size,
            max_line_length=max_line_length,
            timeout=timeout,
            idle_timeout=self.idle_timeout,
        )

    async def serve_forever(
        self,
        poll_interval: float = 0.5,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and handle requests until :meth:`shutdown`.

        Binds and activates first if that has not happened yet. Each request
        is checked by :meth:`verify_request` and passed to
        :meth:`process_request`, which by default handles it in a new task of
        a nursery that this call owns; so when this call returns, no request
        is running. :meth:`service_actions` runs every ``poll_interval``
        seconds while accepting.

        Use it with ``nursery.start``: ``task_status.started()`` reports
        ``server_address`` once the server is listening.

        Resource handling:
          Accepting stops when :meth:`shutdown` is called or the listening
          socket is closed (:meth:`server_close`); requests in flight then
          get ``shutdown_timeout`` seconds to finish and are cancelled after
          that. The listening socket stays open until :meth:`server_close`,
          so ``serve_forever`` may be called again.

        Cancellation:
          If this call is cancelled, every request is cancelled, each
          handler whose ``setup()`` completed still runs ``finish()``
          (shielded, for at most its ``finish_timeout``), each request is
          closed, and :exc:`trio.Cancelled` propagates.

        Error handling:
          An exception from a handler goes to :meth:`handle_error` and
          serving goes on. Out-of-resource errors from accept (``EMFILE``,
          ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) are retried after a pause
          that doubles from 0.1 s up to 1 s while they go on, so accepting
          resumes within a second of the pressure lifting; each is counted
          in ``stats.accept_errors``, and they are logged at ERROR at most
          once every 10 seconds (a line says how many were not logged).
          Errors that concern one pending connection
          (``ECONNABORTED`` and kin) are skipped. Any other error, and any
          :exc:`BaseException` that is not an :exc:`Exception`, ends
          serving and propagates: a lone :exc:`KeyboardInterrupt` or
          :exc:`SystemExit` as itself, anything else wrapped in an exception
          group by the nursery it escapes.
        """
        async with (
            self._serve(
                self.max_concurrent_requests, self._preparing_limit()
            ) as serving,
            trio.open_nursery() as accepting,
        ):
            serving.accepting = accepting
            for source in self._request_sources():
                self._start_accepting(serving, source)
            self._accepting = True
            task_status.started(self.server_address)
            with serving.service_actions:
                await self._run_service_actions(poll_interval)

    async def handle_request(self) -> None:
        """Wait for one request and handle it to completion.

        Binds and activates first if that has not happened yet. Waits at
        most :attr:`timeout` seconds (``None``: for ever); if none comes, it
        awaits :meth:`handle_timeout` and returns. A :meth:`shutdown` while
        it waits makes it return at once.
        """
        async with self._serve(None) as serving:
            wait = math.inf if self.timeout is None else self.timeout
            # Each listener waits in a task of its own; the first request
            # ends the race. Trio's accept and receive cannot be undone, so a
            # listener that took a request as the race ended keeps it: it is
            # handled too, not dropped.
            taken: list[tuple[Any, Any]] = []
            with trio.CancelScope() as waiting, trio.move_on_after(wait) as timer:
                serving.accept_scopes.add(waiting)
                async with trio.open_nursery() as race:
                    for source in self._request_sources():
                        race.start_soon(
                            self._take_first, source, taken, race.cancel_scope
                        )
            if not taken:
                if timer.cancelled_caught:
                    await self.handle_timeout()
                return
            for request, client_address in taken[1:]:
                self._hand_over(request, client_address)
            await self._handle_accepted(serving, *taken[0])

    @asynccontextmanager
    async def _serve(
        self,
        max_concurrent: int | None,
        max_preparing: int | _Default | None = DEFAULT,
    ) -> AsyncIterator[_Serving]:
        if self._serving is not None:
            raise RuntimeError(f"{self!r} is already serving")
        await self._ensure_activated()
        slots = None if max_concurrent is None else trio.Semaphore(max_concurrent)
        request_slots = None
        if max_preparing is not DEFAULT:
            request_slots = slots
            slots = None if max_preparing is None else trio.Semaphore(max_preparing)
        finished = trio.Event()
        enclosing = _ENCLOSING_SERVERS.set((*_ENCLOSING_SERVERS.get(), self))
        serving: _Serving | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._shutdown_signal = signal = ShutdownSignal(
                    self.drain_window, self.stats
                )
                if signal.watcher is not None:
                    signal.watcher.start()
                serving = _Serving(nursery, finished, slots, request_slots)
                serving.plan = self._plan_requests(
                    serving, trades_slot=max_preparing is not DEFAULT
                )
                self._serving = serving
                yield serving
        except BaseExceptionGroup as group:
            # Cancelled from outside, every task ends in Cancelled, and the
            # nurseries wrap those in groups. Let it propagate as the one
            # Cancelled it is. Ctrl-C is raised in one task and cancels the
            # rest: let that lone KeyboardInterrupt (or SystemExit) out bare
            # too, so it ends the program as it ends any other. A group that
            # holds anything else stays whole.
            _, others = group.split(trio.Cancelled)
            if others is None:
                raise _first_leaf(group) from None
            interrupt = _first_leaf(others)
            _, rest = others.split(lambda error: error is interrupt)
            if rest is None and isinstance(interrupt, (KeyboardInterrupt, SystemExit)):
                raise interrupt from None
            raise
        finally:
            watcher = self._shutdown_signal.watcher
            if watcher is not None:
                watcher.stop()
            self._accepting = False
            self._serving = None
            finished.set()
            _ENCLOSING_SERVERS.reset(enclosing)
            if serving is not None and serving.cut_off:
                _report_cut_off(serving.cut_off)
            self._serving_ended()

    def _serving_ended(self) -> None:
        """Called as ``serve_forever`` or ``handle_request`` returns; nothing here."""

    async def _run_service_actions(self, poll_interval: float) -> None:
        while True:
            await trio.sleep(poll_interval)
            await self.service_actions()

    def _request_sources(self) -> list[RequestSource]:
        """Where each listener's accept task takes its requests from.

        Here, with no listeners of its own, :meth:`get_request`.
        """
        return [RequestSource(self.get_request)]

    def _sources_of(
        self, listeners: Sequence[Any], sources: Sequence[RequestSource]
    ) -> list[RequestSource]:
        """The accept tasks' ``sources``, one per listener, unless
        :meth:`get_request` is overridden: then it is awaited for every
        request, given the listener to take it from where there are several
        (so an override must take that argument)."""
        if is_marked(self.get_request, FORWARDING):
            return list(sources)
        if len(listeners) == 1:
            return [RequestSource(self.get_request)]
        taking = cast(Callable[[Any], Awaitable[tuple[Any, Any]]], self.get_request)
        return [RequestSource(partial(taking, listener)) for listener in listeners]

    def _start_accepting(self, serving: _Serving, source: RequestSource) -> None:
        """Start an accept task taking requests from ``source``."""
        assert serving.accepting is not None
        serving.accept_tasks += 1
        serving.accepting.start_soon(self._accept_requests, serving, source)

    async def _accept_requests(self, serving: _Serving, source: RequestSource) -> None:
        """An accept task: it takes requests from ``source`` until accepting stops.

        As in Trio's ``serve_listeners``, one such task per listener. Each
        request starts right here (see :meth:`_take_requests`); one that
        waits keeps this task, and a new accept task takes over.
        """
        with trio.CancelScope() as scope:
            try:
                rest = await self._take_requests(serving, source, scope)
            finally:
                serving.accept_scopes.discard(scope)
                serving.accept_tasks -= 1
                if not serving.accept_tasks:
                    self._stopped_accepting(serving)
            if rest is not None:
                # Outside serving.accept_scopes for good: the shutdown does
                # not cancel a request, it gives it the grace period.
                await rest

    async def _take_requests(
        self, serving: _Serving, source: RequestSource, scope: trio.CancelScope
    ) -> Awaitable[None] | None:
        """Take requests from ``source`` and start each, in this task.

        Returns when accepting stops, or with the rest of a request that is
        about to wait, to be awaited in this task: a new accept task has
        taken over. ``scope`` is this task's: in ``serving.accept_scopes``
        while the task waits for a request (the shutdown cancels it there),
        out of it while a request runs.

        A request starts eagerly: it runs here up to its first wait, in a
        context of its own, and most datagrams are done by then, without a
        task of their own (see benchmarks/README.md, "Measured costs behind
        the code: eager start"). A stream server's request, whose first
        step starts its task, is no different. At ``max_concurrent_requests``
        it stops taking requests, holding the one it has (so with several
        listeners, at most one request per listener waits above the bound)
        until a slot frees.
        """
        slots = serving.slots
        errors = self._accept_errors
        waiting = serving.accept_scopes
        wait, ready, pacer = source.wait, source.ready, source.pacer
        waiting.add(scope)
        # Checked each time round: the shutdown may have come before this
        # task ran, or from a request started here.
        while self._accepting:
            # Awaited here, not through a helper: a coroutine fewer per
            # request (see benchmarks/README.md, "Measured costs behind the
            # code: inlined datagram read").
            try:
                accepted = None
                if ready is not None:
                    # Paced before a request is taken, so that the shutdown's
                    # cancellation never strikes one already taken.
                    if pacer is not None and pacer.due():
                        await trio.lowlevel.checkpoint()
                    accepted = ready()
                if accepted is None:
                    accepted = await wait()
            except (OSError, trio.ClosedResourceError) as exc:
                if await errors.retry_after(exc):
                    continue
                return None
            errors.delay = ACCEPT_RETRY_DELAY
            if slots is not None:
                await self._wait_for_slot(serving, slots, accepted)
            waiting.discard(scope)
            if not self._accepting:
                # The shutdown came as the request did (and cancelled the
                # scope, which the handler must not see): it reached us, so
                # it is handled, with the grace period, in a task of its own.
                self._hand_over(*accepted)
                return None
            context = copy_context()
            handling = self._handle_accepted(serving, *accepted)
            message = first_step(handling, context)
            if message is not FINISHED:
                self._start_accepting(serving, source)
                return resume(handling, message, context)
            waiting.add(scope)
        return None

    def _stopped_accepting(self, serving: _Serving) -> None:
        """Every accept task has stopped: by the shutdown, or because the
        sockets were closed, in which case the shutdown begins here."""
        if not self._shutdown_signal.started:
            self._begin_shutdown(serving, self.shutdown_timeout)
        serving.service_actions.cancel()

    async def _wait_for_slot(
        self, serving: _Serving, slots: trio.Semaphore, accepted: tuple[Any, Any]
    ) -> None:
        """Wait, holding ``accepted``, for one of the ``slots`` to be free."""
        try:
            await slots.acquire()
        except BaseException:
            # Shutdown began while it waited above the bound: it reached us,
            # so it waits on, for the grace period.
            serving.nursery.start_soon(self._handle_when_slot_frees, serving, *accepted)
            raise

    async def _handle_when_slot_frees(
        self, serving: _Serving, request: Any, client_address: Any
    ) -> None:
        assert serving.slots is not None
        try:
            await serving.slots.acquire()
        except BaseException:
            await self._close_request(request)
            raise
        await self._handle_accepted(serving, request, client_address)

    async def _take_first(
        self,
        source: RequestSource,
        taken: list[tuple[Any, Any]],
        race: trio.CancelScope,
    ) -> None:
        """For :meth:`handle_request`: the first request from ``source``, if
        it is first of all, ends the ``race``."""
        while True:
            try:
                taken.append(await source.take())
            except (OSError, trio.ClosedResourceError) as exc:
                if await self._accept_errors.retry_after(exc):
                    continue
                return
            race.cancel()
            return

    def _hand_over(self, request: Any, client_address: Any) -> None:
        """Handle a request taken outside the accept tasks, in the nursery.

        For connections taken from the backlog as the listener closes: the
        caller (closing) awaits nothing of the user's, and the request gets
        the shutdown's grace period like any other.
        """
        serving = self._serving
        assert serving is not None
        serving.nursery.start_soon(
            self._handle_accepted, serving, request, client_address
        )

    async def _handle_accepted(
        self, serving: _Serving, request: Any, client_address: Any
    ) -> None:
        # Like socketserver's _handle_request_noblock: whatever happens, a
        # request that was not handed to a request task is shut down here.
        self.stats.accepted += 1
        plan = serving.plan
        limit = self.max_connections_per_peer
        if limit is not None and not serving.admit_peer(client_address, limit):
            self.stats.rejected += 1
            LOGGER.debug("refused %r: at max_connections_per_peer", client_address)
            serving.release_slot()
            await self._close_request(request)
            return
        handed_off = False
        try:
            if plan.verify is None or await plan.verify(request, client_address):
                await plan.process(request, client_address)
                handed_off = True
            else:
                self.stats.rejected += 1
        except Exception as exc:
            count_error(self.stats, exc)
            await self.handle_error(request, client_address)
        finally:
            if not handed_off:
                # Released first, as a request's run does.
                serving.release(client_address, serving.slots)
                await self._close_request(request)

    async def _request_task(
        self, serving: _Serving, request: Any, client_address: Any
    ) -> None:
        """A request's run: the steps of ``serving.plan`` from ``prepare`` on."""
        plan = serving.plan
        stats = self.stats
        stats.active += 1
        durations = plan.durations
        # perf_counter: a third of trio.current_time()'s cost, per request.
        started = 0.0 if durations is None else perf_counter()
        # What the peer limit counted, before a PROXY header may change it.
        connected_from = client_address
        slot = serving.slots
        try:
            if plan.prepare is not None:
                prepared = await plan.prepare(request, client_address)
                if prepared is None:
                    stats.dropped += 1
                    return
                request, client_address = prepared
                if plan.take_slot is not None:
                    slot = await plan.take_slot()
            await plan.handle(request, client_address)
            stats.completed += 1
        except Exception as exc:
            count_error(stats, exc)
            await self.handle_error(request, client_address)
        except BaseException:
            stats.cancelled += 1
            if self._shutdown_signal.started:
                serving.cut_off.append(client_address)
            raise
        finally:
            stats.active -= 1
            if durations is not None:
                # Where every request that ran ends: its duration, the close
                # not included (a stream's lingers for the peer).
                durations.observe(perf_counter() - started)
            # The request is over: its close, which may linger for the
            # client's goodbye after the client has seen the end, holds
            # neither a slot nor its peer's count, so a client that saw the
            # end may connect again at once.
            serving.release(connected_from, slot)
            close = plan.close
            if close is not None:
                # What _close_request does, without a coroutine of its own.
                rest = start_shielded(close, request, timeout=REQUEST_CLOSE_TIMEOUT)
                if rest is not None:
                    await rest

    async def _start_request_task(
        self, serving: _Serving, request: Any, client_address: Any
    ) -> None:
        serving.nursery.start_soon(
            self._request_task,
            serving,
            request,
            client_address,
            name=REQUEST_TASK_NAME,
        )

    def _plan_requests(self, serving: _Serving, *, trades_slot: bool) -> RequestPlan:
        """Decide what each request goes through, from the hooks as they are now.

        ``trades_slot``: whether a prepared request trades its slot for a
        ``max_concurrent_requests`` one (see :meth:`_preparing_limit`).
        """
        # Why skip and forward: see benchmarks/README.md, "Measured costs
        # behind the code: skipped hooks".
        if self._runs_requests_in_place:
            run = partial(self._request_task, serving)
        else:
            run = partial(self._start_request_task, serving)
        handle = self.finish_request
        if is_marked(handle, FORWARDING):
            handle = partial(run_handler, self.RequestHandlerClass, self)
        if self.request_timeout is not None:
            handle = partial(within_deadline, handle, self.request_timeout)
        close = self.shutdown_request
        if is_marked(close, FORWARDING):
            close = self.close_request
        verify = self.verify_request
        process = self.process_request
        return RequestPlan(
            verify=None if is_marked(verify, SKIPPABLE) else verify,
            process=run if is_marked(process, FORWARDING) else process,
            run=run,
            prepare=self._prepare_request if self._prepares_requests() else None,
            take_slot=serving.trade_slot if trades_slot else None,
            handle=handle,
            close=None if is_marked(close, SKIPPABLE) else close,
            durations=self.request_durations,
        )

    def _prepares_requests(self) -> bool:
        """Whether requests need :meth:`_prepare_request`, asked as serving starts.

        False skips it. Here there is nothing to prepare.
        """
        return False

    def _preparing_limit(self) -> int | _Default | None:
        """The bound on requests being prepared, asked as serving starts.

        DEFAULT, as here, where preparing does not wait: a request holds one
        ``max_concurrent_requests`` slot from accept on. Otherwise requests
        are prepared apart: those being prepared hold a slot of their own,
        bounded by this (None: no bound), and take a
        ``max_concurrent_requests`` slot once prepared.
        """
        return DEFAULT

    async def _prepare_request(
        self, request: Any, client_address: Any
    ) -> tuple[Any, Any] | None:
        """Make an accepted request ready for its handler, in the request's task.

        Returns the ``(request, client_address)`` to handle, or None to drop
        the request (counted in ``stats.dropped``) without troubling
        ``handle_error``. Here it returns them unchanged, at once;
        :class:`TCPServer` reads a PROXY header and does the TLS handshake
        here.
        """
        return request, client_address

    async def _close_request(self, request: Any) -> None:
        """Close a request that never reached its run, as the plan says."""
        serving = self._serving
        close = self.shutdown_request if serving is None else serving.plan.close
        if close is not None:
            await await_shielded(close, request, timeout=REQUEST_CLOSE_TIMEOUT)

    # -- shutdown ----------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop serving gracefully; return once :meth:`serve_forever` has returned.

        Accepting stops at once, and :meth:`is_serving` turns False, so a
        handler can say goodbye in its protocol. A stream connection idle
        between messages gets :attr:`drain_window` seconds for a message
        already on its way, which is served; with none, its handler's read
        returns end-of-stream. Requests in flight get ``timeout`` seconds
        (default: :attr:`shutdown_timeout`) to finish; those still running
        then are cancelled, their ``finish()`` runs, and one warning names
        them. Every connection is closed without a reset (see
        :meth:`TCPServer.close_request`).

        Returns at once if nothing is serving. Calling it again is harmless;
        a shorter ``timeout`` brings the deadline forward, a longer one does
        not extend it. Called from inside a handler (or any task that
        ``serve_forever`` encloses), it starts the shutdown and returns
        without waiting, since waiting would be waiting for itself.
        """
        serving = self._serving
        if serving is None:
            await trio.lowlevel.checkpoint()
            return
        self._begin_shutdown(
            serving, self.shutdown_timeout if timeout is None else timeout
        )
        if self in _ENCLOSING_SERVERS.get():
            await trio.lowlevel.checkpoint()
            return
        await serving.finished.wait()

    def _begin_shutdown(self, serving: _Serving, grace: float) -> None:
        self._accepting = False
        for waiting in serving.accept_scopes:
            waiting.cancel()
        self._shutdown_signal.start()
        requests = serving.nursery.cancel_scope
        requests.deadline = min(requests.deadline, trio.current_time() + grace)

    # -- hooks -------------------------------------------------------------

    async def server_activate(self) -> None:
        """Start listening. Does nothing here; :class:`TCPServer` listens."""

    async def server_close(self) -> None:
        """Release the server's resources. Idempotent."""
        await trio.lowlevel.checkpoint()

    async def get_request(self) -> tuple[Any, Any]:
        """Wait for the next request; return ``(request, client_address)``."""
        raise NotImplementedError

    @skippable
    async def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return False to close the request unhandled. True by default."""
        return True

    @forwarding
    async def process_request(self, request: Any, client_address: Any) -> None:
        """Start handling the request in a task of its own.

        The task awaits :meth:`finish_request`, then :meth:`shutdown_request`.
        (A datagram server handles it right here instead, in the accept task
        that took it, which the request keeps if it waits: see
        :class:`UDPServer`.) An override should await
        ``super().process_request(...)``: that also keeps the counters and
        the ``max_concurrent_requests`` bound.
        """
        serving = self._serving
        if serving is None:
            raise RuntimeError("process_request() is only called while serving")
        await serving.plan.run(request, client_address)

    @forwarding
    async def finish_request(self, request: Any, client_address: Any) -> None:
        """Handle the request: make the handler and run its lifecycle."""
        await run_handler(self.RequestHandlerClass, self, request, client_address)

    @forwarding
    async def shutdown_request(self, request: Any) -> None:
        """Shut the request down and close it: :meth:`close_request` here."""
        await self.close_request(request)

    @skippable
    async def close_request(self, request: Any) -> None:
        """Clean up one request. Does nothing here."""

    async def handle_error(self, request: Any, client_address: Any) -> None:
        """Report an exception that escaped a handler; serving goes on.

        Awaited from inside the ``except`` block, so :func:`sys.exception`
        (or :func:`sys.exc_info`) gives the exception. The default logs it
        with its traceback and the client address on the ``trioserve``
        logger, at ERROR level. What peers cause all day on a public server
        gets one line without a traceback instead: a peer that reset or
        vanished (:exc:`trio.BrokenResourceError`) at DEBUG, a timeout
        (:exc:`TimeoutError`) at INFO, and a line over ``max_line_length``
        (:exc:`~trioserve.LineTooLong`) at WARNING.
        """
        error = sys.exc_info()[1]
        kind = classify(error)
        if kind.phrase is not None:
            LOGGER.log(kind.level, "%s %r: %s", kind.phrase, client_address, error)
        else:
            LOGGER.log(
                kind.level,
                "exception while handling the request from %r",
                client_address,
                exc_info=True,
            )

    async def handle_timeout(self) -> None:
        """Awaited when :meth:`handle_request` waited :attr:`timeout` in vain."""

    async def service_actions(self) -> None:
        """Awaited every ``poll_interval`` seconds while :meth:`serve_forever` runs."""
