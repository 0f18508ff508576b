"""Running a coroutine's first step by hand, and the rest later.

Most of a datagram's handling, and most cleanup, never waits: it runs from
start to end in its first step. Awaiting such a coroutine through Trio's
machinery (a task of its own, or a cancel scope around it) costs more than
the work itself (see benchmarks/README.md, "Measured costs behind the code:
eager start"). So the server and :mod:`._shielding` run the first step
themselves, in the calling task, with :func:`first_step`; only a coroutine
that is about to wait costs anything more, and :func:`resume` goes on
awaiting it from the wait it is about to make.

Whatever the coroutine did in its first step it did in the calling task:
a wait it is about to make is registered for that task, and cancel scopes
it entered are on that task's stack. So the rest must be awaited in the
same task, from inside every cancel scope that was open around the first
step.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from contextvars import Context
from typing import Any, Final

#: What :func:`first_step` returns for a coroutine that finished in it.
FINISHED: Final = object()


def first_step(coroutine: Coroutine[Any, Any, None], context: Context | None) -> Any:
    """Run ``coroutine`` up to its first wait; return what it yields there.

    That is the Trio trap it is about to wait with, to pass to
    :func:`resume`; :data:`FINISHED` if it returned instead. ``context``:
    the :class:`contextvars.Context` to run it in (None: the caller's), as
    a new task gets a copy of its parent's. Exceptions propagate.
    """
    # next() with a default: a coroutine that returns raises no StopIteration.
    if context is None:
        return next(coroutine.__await__(), FINISHED)
    return context.run(next, coroutine.__await__(), FINISHED)


@types.coroutine
def resume(
    coroutine: Coroutine[Any, Any, None], message: Any, context: Context | None
) -> Generator[Any, Any, None]:
    """Go on awaiting ``coroutine``, whose first step yielded ``message``.

    What ``await coroutine`` would do from there on: pass what it yields to
    Trio's scheduler, and what the scheduler sends or throws back to it,
    each step run in ``context`` (None: the awaiting task's).
    """
    send: Any = coroutine.send
    throw: Any = coroutine.throw
    while True:
        try:
            reply = yield message
        except BaseException as exc:
            try:
                message = throw(exc) if context is None else context.run(throw, exc)
            except StopIteration:
                return
        else:
            try:
                message = send(reply) if context is None else context.run(send, reply)
            except StopIteration:
                return
