"""Running servers as a service: until a signal, then a graceful shutdown."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import trio

from ._notify import Notifier, describe_counters
from ._server import BaseServer, counted
from ._socketio import LOOKS_BEFORE_WAITING

LOGGER = logging.getLogger("trioserve")

# The signals that stop a service: the first shuts down gracefully, a second
# cancels what is still running.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a service watches: those, and SIGHUP, which it ignores.
WATCHED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


async def serve_until_signalled(
    servers: Sequence[BaseServer],
    *,
    reload: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
) -> bool:
    """Serve ``servers`` until SIGINT or SIGTERM, then shut them down gracefully.

    This is the main loop of a service. Every server is bound first (so a bad
    address fails before anything serves), then each runs
    :meth:`~BaseServer.serve_forever`, and ``task_status.started()`` reports
    their real addresses. The first SIGINT or SIGTERM starts a graceful
    :meth:`~BaseServer.shutdown` of all of them at once, closes their
    listening sockets at once (so new clients are refused while the requests
    in flight finish), and logs how many requests are in flight (idle
    keep-alive connections are not requests in flight); a second
    signal cancels the requests still running.
    SIGHUP runs ``reload()`` in a task of its own, if given (the command
    line's reloads the TLS certificate and key); without it SIGHUP is
    logged and otherwise ignored, so closing a terminal does not kill the
    service. Every server is closed before this returns.

    Under systemd (when ``NOTIFY_SOCKET`` is set), it tells systemd
    ``READY=1`` once every server serves, ``STOPPING=1`` at the first
    signal, a ``STATUS=`` line with the servers' counters, and, with
    ``WatchdogSec=``, pings the watchdog from the event loop; see
    "Readiness, status and the watchdog" in the deploying guide.

    Must be called from the main thread (where Python handles signals).

    Returns:
      True if the shutdown was graceful; False if a second signal forced it.
    """
    forced = False
    notifier = Notifier.from_environment(
        lambda: describe_counters(server.stats for server in servers)
    )
    with trio.open_signal_receiver(*WATCHED_SIGNALS) as signals:
        async with AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            async with trio.open_nursery() as nursery:

                async def shut_down_all() -> None:
                    await _shut_down(servers)
                    # Every serve_forever has returned; stop watching signals.
                    nursery.cancel_scope.cancel()

                for server in servers:
                    await nursery.start(server.serve_forever)
                task_status.started([server.server_address for server in servers])
                notifier.ready()
                nursery.start_soon(notifier.keep_alive)

                async def stop(name: str) -> None:
                    notifier.stopping()
                    await _report_stopping(name, servers)
                    nursery.start_soon(shut_down_all)

                def force(name: str) -> None:
                    nonlocal forced
                    LOGGER.warning("%s again: cancelling every request", name)
                    forced = True
                    nursery.cancel_scope.cancel()

                def start_reload(name: str) -> None:
                    assert reload is not None
                    LOGGER.warning("%s: reloading", name)
                    nursery.start_soon(_reload, reload, notifier)

                await follow_stop_signals(
                    signals, stop, force, None if reload is None else start_reload
                )
    notifier.stopped()
    return not forced


async def _shut_down(servers: Sequence[BaseServer]) -> None:
    """Shut every server down gracefully, at once, and close them."""
    async with trio.open_nursery() as shutdowns:
        for server in servers:
            shutdowns.start_soon(server.shutdown)
        # Stop listening at once: a load balancer's health check then fails
        # and new clients are refused, not left in the backlog to be reset
        # after the grace.
        for server in servers:
            await server.server_close()


async def _report_stopping(name: str, servers: Sequence[BaseServer]) -> None:
    """Log the stop: how many requests are in flight, and how long they get."""
    # A handler that has just replied is about to wait for its next
    # message: it looks again a few times first (see
    # _socketio.receive_when_ready), and only then counts as idle. Let it
    # get there, so the count is of connections, not of a moment.
    for _ in range(LOOKS_BEFORE_WAITING + 1):
        await trio.lowlevel.checkpoint()
    active = sum(server.stats.active for server in servers)
    idle = sum(server.stats.idle for server in servers)
    LOGGER.warning(
        "%s: shutting down; %s in flight and %s, with up to %s s to finish",
        name,
        counted(active - idle, "request"),
        counted(idle, "idle connection"),
        max(server.shutdown_timeout for server in servers),
    )


async def _reload(reload: Callable[[], Awaitable[object]], notifier: Notifier) -> None:
    """Run ``reload``, telling systemd it reloads (``Type=notify-reload``)."""
    with notifier.reloading():
        await reload()


async def follow_stop_signals(
    signals: AsyncIterator[int],
    stop: Callable[[str], Awaitable[None]],
    force: Callable[[str], None],
    reload: Callable[[str], None] | None = None,
) -> None:
    """The one loop over a service's signals, until ``signals`` ends.

    The first SIGINT or SIGTERM awaits ``stop`` (a graceful stop), a second
    calls ``force``; each is given the signal's name. SIGHUP calls
    ``reload`` (which must not wait: a stop may follow at once) until the
    service is stopping; without ``reload`` it is logged and otherwise
    ignored, so closing a terminal does not kill the service.
    """
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum not in STOP_SIGNALS:
            if reload is None or stopping:
                LOGGER.info("%s: ignored; send SIGTERM to stop", name)
            else:
                reload(name)
        elif stopping:
            force(name)
        else:
            stopping = True
            await stop(name)
