"""The request plan: what each request goes through, decided once.

socketserver looks a server's hooks up for every request. Most servers keep
most hooks as they are, and a hook as it is often does nothing (a datagram
has no connection to close) or only what the server could do itself without
awaiting it. So the server decides once, when serving starts, which
callable each step of a request awaits, or that it skips the step; and
decides again whenever one of :attr:`RequestPlan.SOURCES` is set on the
server while it serves, which takes effect from the next request, as in
socketserver.

A hook tells the plan what it is by a function attribute that a decorator
sets (:func:`skippable`, :func:`forwarding`). The attribute holds the
function itself, so a wrapper that copies it (:func:`functools.wraps` does)
is not taken for the hook it wraps.

The module also holds the one table that classifies what ends a request:
the counter of :class:`~trioserve.ServerStats` it lands in, and how the
default ``handle_error`` logs it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, Final, TypeVar

import attrs
import trio

from ._stats import RequestDurations, ServerStats
from ._streams import LineTooLong

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

_Hook = TypeVar("_Hook", bound=Callable[..., Awaitable[Any]])

# The function attributes the decorators below set (and _shielding's).
SKIPPABLE: Final = "__trioserve_skippable__"
FORWARDING: Final = "__trioserve_forwarding__"
SHIELDABLE: Final = "__trioserve_shieldable__"


def mark(hook: _Hook, marker: str) -> _Hook:
    """Set ``marker`` on ``hook``, to the function itself: see the module."""
    setattr(hook, marker, hook)
    return hook


def is_marked(hook: Callable[..., Any], marker: str) -> bool:
    """Whether ``hook`` (a function, or a method bound to it) carries ``marker``."""
    function = getattr(hook, "__func__", hook)
    return getattr(function, marker, None) is function


def skippable(hook: _Hook) -> _Hook:
    """Mark a server hook that the plan may skip: awaiting it changes nothing.

    For a hook that does nothing, or, for ``verify_request``, one that
    admits every request. An override is not marked, so it is awaited.
    """
    return mark(hook, SKIPPABLE)


def forwarding(hook: _Hook) -> _Hook:
    """Mark a server hook that only awaits what the plan can await itself.

    ``process_request`` runs the request, ``finish_request`` the handler,
    ``shutdown_request`` ``close_request``: the plan awaits that directly,
    a coroutine fewer per request. An override is not marked, so it is
    awaited.
    """
    return mark(hook, FORWARDING)


#: A step handed ``(request, client_address)``.
Step = Callable[[Any, Any], Awaitable[None]]


@attrs.frozen
class RequestPlan:
    """The steps of a request, each the callable to await, or None to skip it.

    In order: ``verify``, then ``process`` (which starts ``run``), and in the
    request's run, ``prepare``, ``take_slot``, ``handle``, and ``close``
    whatever happened.
    """

    #: The server attributes a plan is made from: setting one on a serving
    #: server makes a new plan.
    SOURCES: ClassVar[frozenset[str]] = frozenset(
        {
            "verify_request",
            "process_request",
            "finish_request",
            "shutdown_request",
            "close_request",
            "RequestHandlerClass",
            "request_timeout",
            "request_durations",
        }
    )

    #: ``verify_request``; None admits every request.
    verify: Callable[[Any, Any], Awaitable[bool]] | None
    #: ``process_request``, or ``run`` itself while that is all it does.
    process: Step
    #: The request's run: awaited right here where the server runs requests
    #: in place (a datagram server), started in a task of its own otherwise.
    run: Step
    #: Makes an accepted request ready for its handler: the request and
    #: client address to handle, or None to drop it. None: nothing to do.
    prepare: Callable[[Any, Any], Awaitable[tuple[Any, Any] | None]] | None
    #: Once prepared, trades the request's slot (of those being prepared)
    #: for a ``max_concurrent_requests`` one, and returns that. None: a
    #: request keeps the slot it was accepted with.
    take_slot: Callable[[], Awaitable[trio.Semaphore | None]] | None
    #: Runs the handler: ``finish_request``, or the handler directly, within
    #: ``request_timeout`` if there is one.
    handle: Step
    #: ``shutdown_request``, or ``close_request`` while that is all the
    #: former does, awaited shielded; None when it would do nothing.
    close: Callable[[Any], Coroutine[Any, Any, None]] | None
    #: Where each request's duration is counted; None: requests are not timed.
    durations: RequestDurations | None


async def within_deadline(
    handle: Step, timeout: float, request: Any, client_address: Any
) -> None:
    """Await ``handle``; raise :exc:`TimeoutError` if ``timeout`` cut it off."""
    with trio.move_on_after(timeout) as deadline:
        await handle(request, client_address)
    if deadline.cancelled_caught:
        raise TimeoutError(f"request not done within request_timeout ({timeout} s)")


@attrs.frozen
class ErrorKind:
    """What an exception that ended a request is, for stats and for the log."""

    #: The :class:`~trioserve.ServerStats` counter it adds to.
    counter: str
    #: The level the default ``handle_error`` logs it at.
    level: int
    #: The words before the client address in that one line; None: an
    #: unexpected error, logged with its traceback.
    phrase: str | None = None


# What peers cause in the normal run of a public server: one log line
# without a traceback. The first kind an error consists of wins.
ERROR_KINDS: Final = (
    (
        trio.BrokenResourceError,
        ErrorKind("disconnected", logging.DEBUG, "connection lost mid-request from"),
    ),
    (TimeoutError, ErrorKind("timed_out", logging.INFO, "request timed out from")),
    (LineTooLong, ErrorKind("failed", logging.WARNING, "line too long from")),
)
# Anything else.
UNEXPECTED: Final = ErrorKind("failed", logging.ERROR)


def _consists_of(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` is a ``kind``, or a group of nothing but ``kind``s.

    A handler's own nursery wraps what its tasks raise in an exception group,
    so a reset seen by a relay task arrives as a group of one.
    """
    if isinstance(error, BaseExceptionGroup):
        return error.split(kind)[1] is None
    return isinstance(error, kind)


def classify(error: BaseException | None) -> ErrorKind:
    """The kind of ``error``, an exception that ended a request."""
    if error is not None:
        for kind, what in ERROR_KINDS:
            if _consists_of(error, kind):
                return what
    return UNEXPECTED


def count_error(stats: ServerStats, error: BaseException) -> None:
    """Count a request that ``error`` ended: disconnected, timed out or failed."""
    counter = classify(error).counter
    setattr(stats, counter, getattr(stats, counter) + 1)
