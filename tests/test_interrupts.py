"""Ctrl-C and SystemExit inside a server come out of ``serve_forever`` bare.

Trio raises KeyboardInterrupt in one task and the nurseries cancel the rest;
``serve_forever`` lets that one exception out on its own, not wrapped in
nested exception groups, so a program stopped with Ctrl-C ends as any other
Python program does. (``test_docs.py`` presses Ctrl-C on the README's first
example, in a real process.)
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
import trio.testing

import trioserve

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_a_lone_interrupt_leaves_serve_forever_bare(
    interrupt: type[BaseException], autojump_clock: trio.testing.MockClock
) -> None:
    # Any task of the server will do: here the one that runs service_actions,
    # while the accept loop waits and is cancelled.
    class Interrupted(trioserve.TCPServer):
        async def service_actions(self) -> None:
            raise interrupt

    server = Interrupted(("127.0.0.1", 0), trioserve.StreamRequestHandler)
    with trio.fail_after(10):
        async with server:
            with pytest.raises(interrupt) as caught:
                await server.serve_forever(poll_interval=0.1)
    assert type(caught.value) is interrupt
    assert not server.is_serving()


async def test_an_interrupt_with_an_error_stays_a_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Another error besides the interrupt must not be lost: the group stays.
    class Failing(trioserve.TCPServer):
        async def service_actions(self) -> None:
            raise KeyboardInterrupt

        async def get_request(
            self, listener: trio.socket.SocketType | None = None
        ) -> tuple[Any, Any]:
            with trio.CancelScope(shield=True):
                await trio.sleep(1)
            raise RuntimeError("accept failed")

    server = Failing(("127.0.0.1", 0), trioserve.StreamRequestHandler)
    with trio.fail_after(10):
        async with server:
            with pytest.raises(BaseExceptionGroup) as caught:
                await server.serve_forever(poll_interval=0.1)
    interrupts, rest = caught.value.split(KeyboardInterrupt)
    assert interrupts is not None
    assert rest is not None
    assert rest.split(RuntimeError)[0] is not None
