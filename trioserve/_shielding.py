"""Shielding cleanup from cancellation, at no cost when it does not wait.

Cleanup (a handler's ``finish()``, closing a request) must run to its end
even while the server is being cancelled, so it runs in a shielded cancel
scope. Entering and leaving a Trio cancel scope with a deadline costs as
much as the rest of a datagram's handling (see benchmarks/README.md,
"Measured costs behind the code: deferred shield"), and most cleanup never
waits: a datagram handler's reply goes out at once, and a datagram has no
connection to close. Cancellation is delivered only where a coroutine
waits, so until its first wait a coroutine needs no shield. For a coroutine
known to be plain up to that first wait, :func:`await_shielded` runs it up
to that wait (which, for most cleanup, is its end) and only then, if it
waits at all, enters the shielded scope and lets it go on in there.

Most coroutines are not plain in that sense, so the shield is deferred
only for functions marked :func:`shieldable_from_first_wait` (a function
attribute, as the request plan's markers are: see ``_plan``). One that
opens a cancel scope and waits inside it (``trio.sleep`` does) would have
our shield nested inside its scope, and its scope would close first, which
Trio refuses. One that looks at its cancellation before it waits (Trio's
socket methods do, through ``checkpoint_if_cancelled``) would see the
cancellation that the shield, entered a moment later, then hides from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from ._eager import FINISHED, first_step, resume
from ._plan import SHIELDABLE, mark

_Function = TypeVar("_Function", bound=Callable[..., Coroutine[Any, Any, None]])


def shieldable_from_first_wait(function: _Function) -> _Function:
    """Mark an async function whose shield :func:`await_shielded` may defer.

    Only for a function that, up to and including its first wait, neither
    enters a cancel scope it has not left again nor looks at cancellation:
    its first wait must be a plain one, such as
    :func:`trio.lowlevel.wait_writable` or :meth:`trio.Event.wait`. Overrides
    are not covered: a subclass's ``finish()`` is shielded from the start
    unless it is marked too.
    """
    return mark(function, SHIELDABLE)


def start_shielded(
    function: Callable[..., Coroutine[Any, Any, None]],
    *args: object,
    timeout: float | None,
) -> Awaitable[bool] | None:
    """Start :func:`await_shielded`'s work without awaiting anything yet.

    For a marked function, runs ``function(*args)`` up to its first wait and
    returns None if it finished there; otherwise, and for any other
    function, returns what is left, to be awaited: it runs shielded and
    returns True if ``timeout`` cut it off. Exceptions from the first step
    propagate from here.

    The hot path calls this rather than :func:`await_shielded`: most cleanup
    finishes in its first step, and then the coroutine that
    :func:`await_shielded` is would be all it costs (see
    benchmarks/README.md, "Measured costs behind the code: deferred
    shield").
    """
    # is_marked(function, SHIELDABLE), without a call on the hot path.
    inner = getattr(function, "__func__", function)
    if getattr(inner, SHIELDABLE, None) is inner:
        coroutine = function(*args)
        # The first step runs here, in this task, exactly as the first step
        # of ``await coroutine`` would.
        message = first_step(coroutine, None)
        if message is FINISHED:
            return None
        # It is about to wait, in this task's own cancel scope: from here on
        # it needs the shield. Nothing runs between its yield and the scope
        # _shielded enters, so no cancellation can slip in.
        return _shielded(resume(coroutine, message, None), timeout)
    return _shielded(function(*args), timeout)


async def _shielded(rest: Awaitable[None], timeout: float | None) -> bool:
    with trio.CancelScope(shield=True) as scope:
        if timeout is not None:
            scope.relative_deadline = timeout
        await rest
    return scope.cancelled_caught


async def await_shielded(
    function: Callable[..., Coroutine[Any, Any, None]],
    *args: object,
    timeout: float | None,
) -> bool:
    """Await ``function(*args)`` shielded from cancellation, for ``timeout`` s.

    Returns True if ``timeout`` passed and cut it off (with
    :exc:`trio.Cancelled`, caught here); ``None`` means no bound. Exceptions
    from ``function`` propagate. ``function`` may be a bound method. For a
    marked function the bound counts from its first wait; what it does
    before that takes no time to speak of.
    """
    rest = start_shielded(function, *args, timeout=timeout)
    return rest is not None and await rest
